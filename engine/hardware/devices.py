"""What discovery finds: :class:`Device` (a GPU, MIG instance or the CPU) and
:class:`HardwareInfo` (every device, versions, and why a GPU is not used)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from engine.errors import DeviceError
from engine.hardware.specs import supports_bf16

__all__ = ["Device", "HardwareInfo"]


@dataclass(frozen=True)
class Device:
    """One device: a CUDA GPU (or MIG instance) or the host CPU.

    GPUs that torch cannot drive are still described, with ``usable=False``, the reason,
    an ``id`` of the form ``"nvml:N"`` (``"nvml:N:mig:M"`` for a MIG instance) and no
    CUDA index; :attr:`HardwareInfo.gpus` leaves them out.
    """

    id: str  # "cpu", "cuda:0", or "nvml:1" / "nvml:1:mig:0" for a GPU torch cannot drive
    kind: Literal["cpu", "cuda"]
    index: int | None  # CUDA index as torch numbers it; None for the CPU and unusable GPUs
    name: str  # NVML product name (MIG: "<GPU> MIG <profile>"), or CPU model name
    gpu_type: str | None  # short family for GPUs, None for the CPU
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: tuple[int, int] | None
    energy_supported: bool  # NVML total-energy counter readable (Volta and newer; not MIG)
    uuid: str | None = None  # NVML UUID: "GPU-..." or, for a MIG instance, "MIG-..."
    cores: int | None = None  # CPU logical cores (CPU device only)
    # NVML index of the GPU (of the parent GPU for a MIG instance: pass it with
    # `mig_index` to Nvml.mig_handle, not to the index-based readings).
    nvml_index: int | None = None
    usable: bool = True  # False: listed for information, never run on
    unusable_reason: str | None = None  # why torch cannot drive it (None when usable)
    mig: bool = False  # a MIG instance of the GPU `parent_uuid`
    parent_uuid: str | None = None  # MIG instance: its GPU's UUID
    mig_index: int | None = None  # MIG instance: its NVML MIG device index on the parent
    # Why a GPU's energy counter is not read (NVML's reason, e.g. "Not Supported", or
    # MIG's board-wide counter); None where it is, and for the CPU.
    energy_unsupported_reason: str | None = None

    @property
    def supports_bf16(self) -> bool:
        """Whether the device computes in BF16 natively (CUDA compute capability ≥ 8.0)."""
        return self.compute_capability is not None and supports_bf16(self.compute_capability)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields of the device."""
        out = asdict(self)
        if self.compute_capability is not None:
            out["compute_capability"] = list(self.compute_capability)
        return out


@dataclass(frozen=True)
class HardwareInfo:
    """Everything :func:`discover` found: devices and versions.

    ``devices`` holds the usable GPUs (in CUDA index order), then the GPUs torch cannot
    drive (NVML order), then the CPU.
    """

    devices: tuple[Device, ...]
    driver_version: str | None
    cuda_version: str | None  # CUDA version the driver supports, "12.4"
    nvml_available: bool
    nvml_error: str | None  # why NVML is not used, e.g. "NVML Shared Library Not Found"
    cpu_name: str
    cpu_cores: int
    cpu_memory_total_bytes: int
    python_version: str
    torch_version: str | None
    transformers_version: str | None
    # Set when NVML sees at least one GPU but none is usable: why the CPU is used instead.
    cpu_fallback_reason: str | None = None

    @property
    def gpus(self) -> tuple[Device, ...]:
        """The usable CUDA devices, in CUDA index order."""
        return tuple(d for d in self.devices if d.kind == "cuda" and d.usable)

    @property
    def unusable_gpus(self) -> tuple[Device, ...]:
        """GPUs NVML lists but torch cannot drive, each with its ``unusable_reason``."""
        return tuple(d for d in self.devices if d.kind == "cuda" and not d.usable)

    @property
    def cpu(self) -> Device:
        """The host CPU device."""
        for d in self.devices:
            if d.kind == "cpu":
                return d
        raise DeviceError("no cpu device was discovered", field="device")  # pragma: no cover

    def device(self, device_id: str) -> Device:
        """The device named ``"cpu"``, ``"cuda"`` (the first usable GPU), ``"cuda:N"``, ``"gpu:N"``.

        ``"nvml:N"`` (``"nvml:N:mig:M"``) names a GPU by its NVML index. Raises
        :class:`DeviceError` naming the devices that exist when there is no such usable
        one, and why the GPUs torch cannot drive are not used.
        """
        key = device_id.strip().lower()
        if key == "cpu":
            return self.cpu
        match = re.fullmatch(r"(cuda|gpu)(?::([0-9]+))?", key)
        if match is not None:
            for d in self.gpus:
                if match.group(2) is None or d.index == int(match.group(2)):
                    return d
        wants_gpu = match is not None or key.startswith("nvml:")
        for d in self.devices:
            if d.kind == "cuda" and key == _nvml_id(d):
                if d.usable:
                    return d
                raise DeviceError(
                    f"{d.name} ({d.id}) cannot be used: {d.unusable_reason}", field="device"
                )
        existing = ", ".join(d.id for d in self.devices if d.usable)
        message = f"no device {device_id!r} on this machine; available: {existing}"
        if wants_gpu and self.cpu_fallback_reason:
            message += f"; no GPU is usable: {self.cpu_fallback_reason}"
        elif wants_gpu and self.unusable_gpus:
            message += "; not usable: " + "; ".join(
                f"{d.id} ({d.name}): {d.unusable_reason}" for d in self.unusable_gpus
            )
        raise DeviceError(message, field="device")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (``aitbc-engine info --json``)."""
        return {
            "devices": [d.to_dict() for d in self.devices],
            "unusable_gpus": [
                {"id": d.id, "name": d.name, "uuid": d.uuid, "reason": d.unusable_reason}
                for d in self.unusable_gpus
            ],
            "cpu_fallback_reason": self.cpu_fallback_reason,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "nvml_available": self.nvml_available,
            "nvml_error": self.nvml_error,
            "cpu_name": self.cpu_name,
            "cpu_cores": self.cpu_cores,
            "cpu_memory_total_bytes": self.cpu_memory_total_bytes,
            "python_version": self.python_version,
            "torch_version": self.torch_version,
            "transformers_version": self.transformers_version,
        }


def _nvml_id(device: Device) -> str | None:
    """``"nvml:N"`` (``"nvml:N:mig:M"``) for a GPU, whatever its ``id``; None for the CPU."""
    if device.nvml_index is None:
        return None
    if device.mig_index is not None:
        return f"nvml:{device.nvml_index}:mig:{device.mig_index}"
    return f"nvml:{device.nvml_index}"
