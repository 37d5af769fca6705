"""What this machine has: GPUs (through NVML), the CPU, and their spec sheets.

This module knows nothing of models or jobs. It answers three questions:

* which devices are here (:func:`discover` → :class:`HardwareInfo`),
* what short family name a GPU has (:func:`gpu_type_from_name`: ``"v100"``, ``"a100"``...),
* how fast a device's memory and arithmetic are (:data:`GPU_SPECS`,
  :func:`memory_bandwidth_gbps`), for rooflines and price estimates.

NVML is reached through one seam: :func:`nvml_module` returns the real ``pynvml`` or a
fake injected with :func:`set_nvml_module`, and :class:`Nvml` wraps it so that every
NVML failure becomes ``None`` (or a recorded error) instead of an exception. Without
NVML (no driver, no library) discovery reports the CPU alone and says why.

Device numbering. NVML and CUDA may number the same GPUs differently (NVML in PCI bus
order, CUDA "fastest first" unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which only counts
before CUDA initialises), so no index is trusted across the two: each GPU NVML lists is
matched to the CUDA device torch reports with the same UUID (compared as lower-case hex,
without the ``GPU-``/``MIG-`` prefix). :attr:`Device.index` is torch's index (``cuda:N``),
:attr:`Device.nvml_index` the NVML index to pass to :class:`Nvml`. ``CUDA_VISIBLE_DEVICES``
still decides which NVML GPUs are listed, read the way CUDA reads it: NVML indices, or
UUID prefixes of GPUs (``"GPU-8f3c..."``) or MIG instances (``"MIG-..."``), up to the
first entry that names nothing; an empty value hides every GPU.

What torch can drive. torch is reached through a second seam: :func:`torch_cuda_view`
returns a :class:`TorchCudaView` from the real probe (:func:`probe_torch_cuda`, which
imports torch lazily and initialises CUDA) or from a fake injected with
:func:`set_torch_cuda_probe`. A GPU that NVML lists but torch cannot drive (a CPU build of
torch, no device with its UUID, or no kernels for its architecture: PyTorch's CUDA 12.8+
wheels dropped sm_70, the CUDA 12.6 wheels keep it) stays in :attr:`HardwareInfo.devices`
with ``usable=False`` and the reason, and is left out of :attr:`HardwareInfo.gpus`; with
no usable GPU, :attr:`HardwareInfo.cpu_fallback_reason` says why the CPU is used.

MIG. A GPU in MIG mode is replaced by its MIG instances, each a device of its own (its
own UUID and memory, ``mig=True``, no energy counter: NVML's is board-wide), matched to
torch by UUID like any GPU. The GPU itself is listed (unusable) only when it has no MIG
instance configured.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import platform
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from engine.base import package_version
from engine.errors import DeviceError

__all__ = [
    "GPU_SPECS",
    "Device",
    "GpuSpec",
    "HardwareInfo",
    "Nvml",
    "TorchCudaDevice",
    "TorchCudaProbe",
    "TorchCudaView",
    "arch_supported",
    "cpu_memory_bandwidth_gbps",
    "cuda_visible_nvml_indices",
    "discover",
    "engine_cache_dir",
    "ensure_pci_bus_order",
    "gpu_spec_for",
    "gpu_type_from_name",
    "measure_cpu_memory_bandwidth_gbps",
    "memory_bandwidth_gbps",
    "nvml_module",
    "probe_torch_cuda",
    "set_nvml_module",
    "set_torch_cuda_probe",
    "supports_bf16",
    "torch_cuda_view",
    "uuid_key",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- spec sheet


@dataclass(frozen=True)
class GpuSpec:
    """One spec-sheet entry: peak figures published by the vendor (dense, no sparsity)."""

    gpu_type: str
    memory_bandwidth_gbps: float  # GB/s, 1e9 bytes per second
    fp32_tflops: float  # non-tensor FP32
    fp16_tflops: float  # dense tensor-core FP16 (FP32 accumulate where the two differ)
    bf16_tflops: float | None  # dense tensor-core BF16; None where the GPU has no BF16
    compute_capability: tuple[int, int]

    def peak_tflops(self, dtype: str) -> float | None:
        """Peak dense TFLOP/s for ``"fp32"``, ``"fp16"`` or ``"bf16"`` (None if unsupported).

        Also accepts torch-style names (``"float16"``, ``"bfloat16"``, ``"float32"``).
        """
        key = _DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower())
        return {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "bf16": self.bf16_tflops}.get(
            key
        )


_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}


# Figures from NVIDIA's data sheets (SXM/flagship variant unless the key says otherwise).
# Tensor figures are dense: the sheets' headline numbers with sparsity are twice these.
# GeForce cards run FP16 tensor math with FP32 accumulate (what PyTorch uses) at half the
# FP16-accumulate rate; the FP32-accumulate figure is given.
GPU_SPECS: dict[str, GpuSpec] = {
    spec_key: GpuSpec(gpu_type, bw, fp32, fp16, bf16, cc)
    for spec_key, gpu_type, bw, fp32, fp16, bf16, cc in [
        # key,        family,    GB/s,   FP32,  FP16,   BF16,   compute capability
        ("v100", "v100", 900.0, 15.7, 125.0, None, (7, 0)),  # V100 SXM2
        ("v100-pcie", "v100", 900.0, 14.0, 112.0, None, (7, 0)),
        ("t4", "t4", 320.0, 8.1, 65.0, None, (7, 5)),
        ("a10", "a10", 600.0, 31.2, 125.0, 125.0, (8, 6)),
        # A10G (AWS G5) has no public NVIDIA sheet; AWS-published figures.
        ("a10g", "a10g", 600.0, 35.0, 70.0, 70.0, (8, 6)),
        ("a40", "a40", 696.0, 37.4, 149.7, 149.7, (8, 6)),
        ("a100", "a100", 2039.0, 19.5, 312.0, 312.0, (8, 0)),  # A100 80GB SXM
        ("a100-40gb", "a100", 1555.0, 19.5, 312.0, 312.0, (8, 0)),  # A100 40GB, SXM or PCIe
        ("a100-pcie", "a100", 1935.0, 19.5, 312.0, 312.0, (8, 0)),  # A100 80GB PCIe
        ("l4", "l4", 300.0, 30.3, 121.0, 121.0, (8, 9)),
        ("l40s", "l40s", 864.0, 91.6, 362.05, 362.05, (8, 9)),
        ("h100", "h100", 3350.0, 67.0, 989.4, 989.4, (9, 0)),  # H100 SXM5
        ("h100-pcie", "h100", 2000.0, 51.0, 756.0, 756.0, (9, 0)),
        ("h100-nvl", "h100", 3900.0, 60.0, 835.0, 835.0, (9, 0)),
        ("h200", "h200", 4800.0, 67.0, 989.4, 989.4, (9, 0)),  # H200 SXM
        ("h200-nvl", "h200", 4800.0, 60.0, 835.0, 835.0, (9, 0)),
        ("rtx3090", "rtx3090", 936.0, 35.6, 71.0, 71.0, (8, 6)),
        ("rtx4090", "rtx4090", 1008.0, 82.6, 165.2, 165.2, (8, 9)),
        ("rtxa6000", "rtxa6000", 768.0, 38.7, 154.8, 154.8, (8, 6)),
        # HGX B200 (1000 W). Revised sheets give 7.7 TB/s; the launch figure is 8 TB/s.
        ("b200", "b200", 8000.0, 75.0, 2250.0, 2250.0, (10, 0)),
    ]
}


def supports_bf16(compute_capability: tuple[int, int]) -> bool:
    """True for compute capability 8.0 (Ampere) and newer, which have BF16 tensor cores."""
    return tuple(compute_capability) >= (8, 0)


def gpu_spec_for(
    gpu_type: str | None, name: str = "", memory_total_bytes: int = 0
) -> GpuSpec | None:
    """The spec-sheet entry for a GPU, picking the variant (PCIe, NVL, 40GB) from its name.

    Returns None for a family the sheet does not list.
    """
    if not gpu_type:
        return None
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    candidates: list[str] = []
    if gpu_type == "a100" and 0 < memory_total_bytes <= 48 * 2**30:
        candidates.append("a100-40gb")
    if "nvl" in tokens:
        candidates.append(f"{gpu_type}-nvl")
    if "pcie" in tokens:
        candidates.append(f"{gpu_type}-pcie")
    candidates.append(gpu_type)
    for key in candidates:
        if key in GPU_SPECS:
            return GPU_SPECS[key]
    return None


# --------------------------------------------------------------------------- GPU names

_DROP_WORDS = frozenset({"nvidia", "tesla", "geforce", "quadro", "gpu", "graphics", "generation"})
# Form factors and memory kinds: SXM2, PCIe, HBM3, NVL, FHHL, DGXS...
_FORM_FACTOR = re.compile(
    r"(sxm\d*|pcie\d*|hbm\d*e?|nvl\d*|nvlink|fhhl|fhfl|dgxs|mxm|\d+gb)", re.ASCII
)
_MEMORY_SIZE = re.compile(r"\b\d+(\.\d+)?\s*[gt]i?b\b", re.ASCII)
_TYPE_MAX_LEN = 64


def gpu_type_from_name(name: str) -> str:
    """Short lower-case family of an NVML product name: ``"Tesla V100-SXM2-16GB"`` → ``"v100"``.

    Vendor words (NVIDIA, Tesla, GeForce, Quadro), memory sizes and form factors (SXM2,
    PCIe, HBM3, NVL...) are dropped; the model id and suffixes such as ``ti`` or ``super``
    are kept. Anything after ``MIG`` (a MIG profile) is ignored. The result always matches
    ``^[a-z0-9]+$``: a name with nothing left gives its cleaned self, or ``"unknown"``.
    """
    text = name.lower()
    text = _MEMORY_SIZE.sub(" ", text)
    tokens = [t for t in re.split(r"[^a-z0-9]+", text) if t]
    if "mig" in tokens:
        tokens = tokens[: tokens.index("mig")]
    kept = [t for t in tokens if t not in _DROP_WORDS and not _FORM_FACTOR.fullmatch(t)]
    result = "".join(kept) or re.sub(r"[^a-z0-9]+", "", name.lower()) or "unknown"
    return result[:_TYPE_MAX_LEN]


# --------------------------------------------------------------------------- devices


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


# --------------------------------------------------------------------------- NVML seam

_nvml_override: Any | None = None


def set_nvml_module(module: Any | None) -> None:
    """Use ``module`` (a fake with pynvml's function names) for NVML; None restores pynvml."""
    global _nvml_override
    _nvml_override = module
    _clear_discovery_cache()


def nvml_module() -> Any:
    """The NVML module in use: the injected fake, else ``pynvml`` (ImportError if absent)."""
    if _nvml_override is not None:
        return _nvml_override
    import pynvml

    return pynvml


def _cuda_version_string(version: int) -> str:
    """``12040`` → ``"12.4"`` (NVML encodes major*1000 + minor*10)."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """A session over an NVML module: initialised once, every call failure-safe.

    Any ``NVMLError`` (not supported, GPU lost, not initialised...) turns into ``None``
    (or ``0`` for the device count); nothing here raises because NVML is missing.
    :meth:`close` (or leaving a ``with`` block) shuts the session down once. Indices are
    NVML indices (see the module docstring for how they relate to CUDA indices).
    """

    def __init__(self, module: Any | None = None) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._module: Any | None = None
        self._error_cls: type[BaseException] = Exception
        self._initialized = False
        self._error: str | None = None
        try:
            self._module = module if module is not None else nvml_module()
        except ImportError as exc:
            self._error = f"pynvml is not installed ({exc})"
            return
        error_cls = getattr(self._module, "NVMLError", None)
        if isinstance(error_cls, type) and issubclass(error_cls, BaseException):
            self._error_cls = error_cls
        try:
            self._module.nvmlInit()
        except Exception as exc:  # NVMLError, OSError...: NVML is unusable here
            self._error = str(exc) or type(exc).__name__
            return
        self._initialized = True

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def available(self) -> bool:
        """True when NVML initialised and the session is open."""
        return self._initialized

    def error(self) -> str | None:
        """Why NVML is unavailable (None when it is available)."""
        return self._error

    def _call(self, fn: str, *args: Any) -> Any | None:
        if not self._initialized or self._module is None:
            return None
        try:
            return getattr(self._module, fn)(*args)
        except (self._error_cls, AttributeError) as exc:
            log.debug("NVML %s%r failed: %s", fn, args, exc)
            return None

    def _device_call(self, fn: str, index: int, *args: Any) -> Any | None:
        handle = self.handle(index)
        return None if handle is None else self._call(fn, handle, *args)

    def handle(self, index: int) -> Any | None:
        """The NVML handle of GPU ``index`` (cached), or None."""
        with self._lock:
            if index in self._handles:
                return self._handles[index]
        handle = self._call("nvmlDeviceGetHandleByIndex", index)
        if handle is not None:
            with self._lock:
                self._handles[index] = handle
        return handle

    def device_count(self) -> int:
        """Number of GPUs NVML sees (0 without NVML)."""
        count = self._call("nvmlDeviceGetCount")
        return int(count) if count is not None else 0

    # Readings by handle: a GPU's (from :meth:`handle`) or a MIG instance's
    # (from :meth:`mig_handles`). A None handle reads as None.

    def name_of(self, handle: Any | None) -> str | None:
        """Product name of a handle (a MIG handle gives e.g. ``"... MIG 1g.10gb"``)."""
        value = None if handle is None else self._call("nvmlDeviceGetName", handle)
        return None if value is None else _text(value)

    def uuid_of(self, handle: Any | None) -> str | None:
        """UUID of a handle: ``"GPU-..."``, or ``"MIG-..."`` for a MIG instance."""
        value = None if handle is None else self._call("nvmlDeviceGetUUID", handle)
        return None if value is None else _text(value)

    def memory_info_of(self, handle: Any | None) -> tuple[int, int] | None:
        """(total, free) memory in bytes of a handle (a MIG instance's own share)."""
        info = None if handle is None else self._call("nvmlDeviceGetMemoryInfo", handle)
        if info is None:
            return None
        return int(info.total), int(info.free)

    def compute_capability_of(self, handle: Any | None) -> tuple[int, int] | None:
        """CUDA compute capability (major, minor) of a handle."""
        value = None if handle is None else self._call("nvmlDeviceGetCudaComputeCapability", handle)
        if value is None:
            return None
        major, minor = value
        return int(major), int(minor)

    # Readings by NVML index.

    def name(self, index: int) -> str | None:
        """Product name, e.g. ``"NVIDIA A100-SXM4-80GB"``."""
        return self.name_of(self.handle(index))

    def uuid(self, index: int) -> str | None:
        """GPU UUID, e.g. ``"GPU-8f3c..."``."""
        return self.uuid_of(self.handle(index))

    def memory_info(self, index: int) -> tuple[int, int] | None:
        """(total, free) device memory in bytes."""
        return self.memory_info_of(self.handle(index))

    def compute_capability(self, index: int) -> tuple[int, int] | None:
        """CUDA compute capability (major, minor)."""
        return self.compute_capability_of(self.handle(index))

    def mig_enabled(self, index: int) -> bool:
        """Whether GPU ``index`` is in MIG mode now (False when unsupported or unknown)."""
        mode = self._device_call("nvmlDeviceGetMigMode", index)
        if mode is None:
            return False
        try:
            current = int(mode[0])
        except (TypeError, ValueError, IndexError):
            return False
        return current == int(getattr(self._module, "NVML_DEVICE_MIG_ENABLE", 1))

    def mig_handles(self, index: int) -> list[tuple[int, Any]]:
        """``(mig_index, handle)`` of each MIG instance of GPU ``index``; empty slots skipped."""
        parent = self.handle(index)
        if parent is None:
            return []
        count = self._call("nvmlDeviceGetMaxMigDeviceCount", parent)
        found: list[tuple[int, Any]] = []
        for mig_index in range(int(count or 0)):
            handle = self.mig_handle(index, mig_index)
            if handle is not None:
                found.append((mig_index, handle))
        return found

    def mig_handle(self, index: int, mig_index: int) -> Any | None:
        """The handle of MIG instance ``mig_index`` of GPU ``index``, or None."""
        return self._device_call("nvmlDeviceGetMigDeviceHandleByIndex", index, mig_index)

    def energy_millijoules(self, index: int) -> int | None:
        """Total energy counter in millijoules since the driver loaded; None if unreadable."""
        value = self._device_call("nvmlDeviceGetTotalEnergyConsumption", index)
        return None if value is None else int(value)

    def power_watts(self, index: int) -> float | None:
        """Current board power draw in watts (NVML reports milliwatts)."""
        value = self._device_call("nvmlDeviceGetPowerUsage", index)
        return None if value is None else float(value) / 1000.0

    def driver_version(self) -> str | None:
        """Driver version string, e.g. ``"550.54.15"``."""
        value = self._call("nvmlSystemGetDriverVersion")
        return None if value is None else _text(value)

    def cuda_driver_version(self) -> str | None:
        """Highest CUDA version the driver supports, e.g. ``"12.4"``."""
        value = self._call("nvmlSystemGetCudaDriverVersion")
        return None if value is None else _cuda_version_string(int(value))

    def close(self) -> None:
        """Shut the session down (idempotent)."""
        with self._lock:
            if not self._initialized:
                return
            self._initialized = False
            self._handles.clear()
        try:
            if self._module is not None:
                self._module.nvmlShutdown()
        except Exception as exc:  # shutting down must never fail the caller
            log.debug("nvmlShutdown failed: %s", exc)


# --------------------------------------------------------------------------- torch seam


@dataclass(frozen=True)
class TorchCudaDevice:
    """One CUDA device as torch numbers and describes it."""

    index: int  # torch's CUDA index: cuda:N
    uuid: str | None  # as torch gives it (bare hex, no "GPU-"/"MIG-" prefix)
    name: str
    capability: tuple[int, int]
    total_memory: int  # bytes


@dataclass(frozen=True)
class TorchCudaView:
    """What the installed torch can drive: whether CUDA works, its kernels, its devices."""

    available: bool
    reason: str | None  # why not, when ``available`` is False
    torch_version: str | None  # "2.13.0+cu128"; None when torch is not importable
    cuda_version: str | None  # torch.version.cuda ("12.8"); None for a CPU (or ROCm) build
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list(): "sm_80", "compute_90"...
    devices: tuple[TorchCudaDevice, ...] = ()

    @property
    def cpu_build(self) -> bool:
        """True when torch is installed but built without CUDA (a CPU or ROCm wheel)."""
        return self.torch_version is not None and self.cuda_version is None


TorchCudaProbe = Callable[[], TorchCudaView]

_torch_probe_override: TorchCudaProbe | None = None
_torch_view_lock = threading.Lock()
_real_torch_view: TorchCudaView | None = None


def set_torch_cuda_probe(probe: TorchCudaProbe | None) -> None:
    """Use ``probe`` (e.g. a fake returning a :class:`TorchCudaView`); None restores torch."""
    global _torch_probe_override
    _torch_probe_override = probe
    _clear_discovery_cache()


def torch_cuda_view() -> TorchCudaView:
    """What torch can drive: the injected probe's answer, else the real probe's (kept).

    The real answer is computed once per process: CUDA's devices do not change once it
    has initialised.
    """
    global _real_torch_view
    probe = _torch_probe_override
    if probe is not None:
        return probe()
    with _torch_view_lock:
        if _real_torch_view is None:
            _real_torch_view = probe_torch_cuda()
        return _real_torch_view


def probe_torch_cuda() -> TorchCudaView:
    """Ask the installed torch what it can drive (imports torch, initialises CUDA).

    Never raises: a missing or broken torch, a CPU build or a CUDA that fails to start
    gives ``available=False`` and the reason.
    """
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install failing on import
        return TorchCudaView(False, f"torch cannot be imported ({exc})", None, None)
    version = str(torch.__version__)
    cuda_version = getattr(torch.version, "cuda", None)
    if cuda_version is None:
        if getattr(torch.version, "hip", None):
            reason = f"torch {version} is a ROCm build, not a CUDA one"
        else:
            reason = f"torch {version} is a CPU build (torch.version.cuda is None)"
        return TorchCudaView(False, reason, version, None)
    cuda_version = str(cuda_version)
    try:
        arch_list = tuple(str(a) for a in torch.cuda.get_arch_list())
    except Exception as exc:  # pragma: no cover - depends on the build
        log.debug("torch.cuda.get_arch_list() failed: %s", exc)
        arch_list = ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = bool(torch.cuda.is_available())
            failure = None
        except Exception as exc:
            available, failure = False, str(exc)
    if not available:
        said = failure or "; ".join(str(w.message).strip() for w in caught)
        reason = "torch.cuda.is_available() is False: " + (
            said or f"torch {version} (CUDA {cuda_version}) finds no CUDA device it can use"
        )
        return TorchCudaView(False, reason, version, cuda_version, arch_list)
    devices: list[TorchCudaDevice] = []
    try:
        count = int(torch.cuda.device_count())
    except Exception as exc:
        reason = f"torch.cuda.device_count() failed: {exc}"
        return TorchCudaView(False, reason, version, cuda_version, arch_list)
    for index in range(count):
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception as exc:  # one broken device must not hide the others
            log.debug("torch.cuda.get_device_properties(%d) failed: %s", index, exc)
            continue
        raw_uuid = getattr(props, "uuid", None)
        devices.append(
            TorchCudaDevice(
                index=index,
                uuid=None if raw_uuid is None else str(raw_uuid),
                name=str(props.name),
                capability=(int(props.major), int(props.minor)),
                total_memory=int(props.total_memory),
            )
        )
    return TorchCudaView(True, None, version, cuda_version, arch_list, tuple(devices))


def uuid_key(uuid: object) -> str:
    """A GPU or MIG UUID in comparable form: lower-case hex, no ``GPU-``/``MIG-`` prefix.

    NVML's ``"GPU-8F3C0A1B-..."`` and torch's ``8f3c0a1b-...`` give the same key.
    """
    text = str(uuid).strip().lower()
    text = text.removeprefix("mig-").removeprefix("gpu-")
    return text.replace("-", "")


_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch built for ``arch_list`` has kernels a GPU of ``capability`` runs.

    ``sm_XY`` machine code runs on X.Y and later minors of major X (``sm_XYa``: on X.Y
    only); ``compute_XY`` PTX is compiled by the driver for any capability ≥ X.Y. An
    empty list (torch does not say) counts as supported.
    """
    if not arch_list:
        return True
    major, minor = capability
    for arch in arch_list:
        match = _ARCH.fullmatch(arch.strip().lower())
        if match is None:
            continue
        kind, number, suffix = match.group(1), int(match.group(2)), match.group(3)
        code = (number // 10, number % 10)
        if suffix == "a":
            if code == (major, minor):
                return True
        elif kind == "sm":
            if code[0] == major and code[1] <= minor:
                return True
        elif code <= (major, minor):
            return True
    return False


def _legacy_sm(capability: tuple[int, int] | None) -> str | None:
    """The ``sm_XY`` that PyTorch's CUDA 12.6 x86 wheels carry and the 12.8+ ones dropped.

    Maxwell (5.0, 5.2), Pascal (6.0, 6.1) and Volta (7.0); None for any other capability.
    """
    if capability is None:
        return None
    if capability in ((5, 0), (5, 2)):
        return "sm_50"
    if capability in ((6, 0), (6, 1)):
        return "sm_60"
    if capability == (7, 0):
        return "sm_70"
    return None


_CU126_INDEX = "pip install torch --index-url https://download.pytorch.org/whl/cu126"


def _arch_reason(view: TorchCudaView, capability: tuple[int, int]) -> str:
    """Why ``view``'s torch cannot drive a GPU of ``capability`` (no kernels for it)."""
    arch = f"sm_{capability[0]}{capability[1]}"
    reason = (
        f"torch {view.torch_version} (CUDA {view.cuda_version}) has no kernels for {arch} "
        f"(compute capability {capability[0]}.{capability[1]}); it was built for "
        f"{', '.join(view.arch_list)}"
    )
    legacy = _legacy_sm(capability)
    if legacy is not None:
        return (
            f"{reason}. PyTorch's CUDA 12.8 and newer wheels dropped {legacy}; "
            f"the CUDA 12.6 wheels carry it: {_CU126_INDEX}"
        )
    return f"{reason}. Install a torch build for {arch} (https://pytorch.org/get-started/locally/)"


# --------------------------------------------------------------------------- CUDA order

_order_warned = False


def ensure_pci_bus_order() -> None:
    """Make CUDA number GPUs in PCI bus order, as NVML does (unless the user chose otherwise).

    Only effective before CUDA initialises in this process.
    """
    global _order_warned
    order = os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if order != "PCI_BUS_ID" and not _order_warned:
        _order_warned = True
        log.warning("CUDA_DEVICE_ORDER=%s: CUDA indices may not match NVML's PCI order", order)


def cuda_visible_nvml_indices(uuids: Sequence[str | None], visible: str | None) -> list[int]:
    """NVML indices of the GPUs ``CUDA_VISIBLE_DEVICES`` selects, in the order it names them.

    ``uuids`` holds one entry per NVML GPU (None when unknown); ``visible`` is the value of
    ``CUDA_VISIBLE_DEVICES`` (None: unset, every GPU visible). Entries are integer NVML
    indices or UUID prefixes; like CUDA, reading stops at the first entry that names no
    GPU (or one already named). Which CUDA index a GPU gets is torch's to say (see the
    module docstring), not this order's.
    """
    return [gpu for gpu, _ in _visible_selection(uuids, [()] * len(uuids), visible)]


def _visible_selection(
    uuids: Sequence[str | None],
    mig_uuids: Sequence[Sequence[str | None]],
    visible: str | None,
) -> list[tuple[int, int | None]]:
    """What ``CUDA_VISIBLE_DEVICES`` selects: ``(gpu, None)`` for a whole GPU, ``(gpu, k)``
    for the ``k``-th MIG instance of ``mig_uuids[gpu]`` (named by a ``MIG-`` UUID prefix).
    """
    count = len(uuids)
    if visible is None:
        return [(i, None) for i in range(count)]
    chosen: list[tuple[int, int | None]] = []
    for raw in visible.split(","):
        entry = raw.strip()
        pick: tuple[int, int | None] | None = None
        if re.fullmatch(r"\d+", entry):
            pick = (int(entry), None) if int(entry) < count else None
        elif entry:
            prefix = entry.lower()
            matches: list[tuple[int, int | None]] = [
                (i, None)
                for i, u in enumerate(uuids)
                if u is not None and u.lower().startswith(prefix)
            ]
            matches += [
                (i, k)
                for i, instances in enumerate(mig_uuids)
                for k, u in enumerate(instances)
                if u is not None and u.lower().startswith(prefix)
            ]
            pick = matches[0] if len(matches) == 1 else None
        if pick is None or pick in chosen or (pick[0], None) in chosen:
            break
        chosen.append(pick)
    return chosen


# --------------------------------------------------------------------------- CPU


def _cpuinfo_field(name: str) -> str | None:
    """The first non-empty ``name`` field of /proc/cpuinfo, or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == name and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_identity() -> str:
    """The CPU's model name and instruction-set flags: what code built for this CPU depends on."""
    return f"{_cpu_name()}|{_cpuinfo_field('flags') or platform.machine()}"


def _cpu_cores() -> int:
    return os.cpu_count() or 1


def _cpu_memory() -> tuple[int, int]:
    """(total, available) host memory in bytes."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except Exception:  # psutil missing or unusable: fall back to sysconf
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = os.sysconf("SC_PHYS_PAGES") * page
            available = os.sysconf("SC_AVPHYS_PAGES") * page
            return int(total), int(available)
        except (ValueError, OSError, AttributeError):
            return 0, 0


# --------------------------------------------------------------------------- discovery

_cache_lock = threading.Lock()
# (NVML module, torch probe) it came from, and the info
_cached_info: tuple[tuple[Any, Any], HardwareInfo] | None = None


def _clear_discovery_cache() -> None:
    global _cached_info
    with _cache_lock:
        _cached_info = None


class _Env(enum.Enum):
    FROM_ENVIRONMENT = "environment"


def discover(
    nvml: Nvml | None = None,
    *,
    refresh_free_memory: bool = True,
    cuda_visible_devices: str | Literal[_Env.FROM_ENVIRONMENT] | None = _Env.FROM_ENVIRONMENT,
    torch_cuda: TorchCudaView | TorchCudaProbe | None = None,
) -> HardwareInfo:
    """Find this machine's devices: GPUs through NVML matched to torch by UUID, then the CPU.

    With ``nvml`` given, that session is queried (and left open). Without it a session is
    opened on :func:`nvml_module` and closed again, and the result is remembered:
    ``refresh_free_memory=False`` returns the remembered snapshot (free memory as it was)
    instead of asking NVML again. Never raises because NVML or torch is missing:
    ``nvml_error`` says why there are no GPUs, each unusable GPU and
    ``cpu_fallback_reason`` why it is not used. ``cuda_visible_devices`` overrides the
    environment's ``CUDA_VISIBLE_DEVICES`` (None: all GPUs visible). ``torch_cuda`` (a
    view or a probe) replaces :func:`torch_cuda_view`; torch is asked only when NVML
    lists a GPU.
    """
    global _cached_info
    remembered = nvml is None and torch_cuda is None
    if remembered and not refresh_free_memory:
        with _cache_lock:
            cached = _cached_info
        if cached is not None and _same_seams(cached[0], _current_seams()):
            return cached[1]
    ensure_pci_bus_order()
    visible = (
        os.environ.get("CUDA_VISIBLE_DEVICES")
        if cuda_visible_devices is _Env.FROM_ENVIRONMENT
        else cuda_visible_devices
    )
    if isinstance(torch_cuda, TorchCudaView):
        probe = _constant_probe(torch_cuda)
    else:
        probe = torch_cuda if torch_cuda is not None else torch_cuda_view
    if nvml is not None:
        return _discover_with(nvml, visible, probe)
    session = Nvml()
    try:
        info = _discover_with(session, visible, probe)
    finally:
        session.close()
    if remembered:
        with _cache_lock:
            _cached_info = (_current_seams(), info)
    return info


def _current_module_or_none() -> Any | None:
    try:
        return nvml_module()
    except ImportError:
        return None


def _current_seams() -> tuple[Any, Any]:
    """The NVML module and the injected torch probe a remembered discovery came from."""
    return _current_module_or_none(), _torch_probe_override


def _same_seams(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    return a[0] is b[0] and a[1] is b[1]


def _constant_probe(view: TorchCudaView) -> TorchCudaProbe:
    def probe() -> TorchCudaView:
        return view

    return probe


@dataclass(frozen=True)
class _Listed:
    """A GPU or MIG instance NVML lists, before it is matched to torch."""

    nvml_index: int
    name: str
    gpu_name: str  # the physical GPU's name (the same as `name` for a whole GPU)
    uuid: str | None
    memory_total: int
    memory_free: int
    capability: tuple[int, int] | None
    energy_supported: bool
    mig_index: int | None = None  # set for a MIG instance
    parent_uuid: str | None = None  # set for a MIG instance
    mig_without_instances: bool = False  # a MIG-mode GPU with no instance configured


def _list_nvml(nvml: Nvml, visible: str | None) -> tuple[int, list[_Listed]]:
    """(GPUs NVML sees, the GPUs and MIG instances ``visible`` selects, NVML order)."""
    count = nvml.device_count()
    uuids = [nvml.uuid(i) for i in range(count)]
    migs: dict[int, list[tuple[int, Any, str | None]]] = {}
    for i in range(count):
        if nvml.mig_enabled(i):
            migs[i] = [(k, h, nvml.uuid_of(h)) for k, h in nvml.mig_handles(i)]
    mig_uuids = [[u for _, _, u in migs.get(i, [])] for i in range(count)]
    whole: set[int] = set()  # GPUs selected whole
    parts: dict[int, set[int]] = {}  # GPU -> positions in migs[gpu] selected one by one
    for gpu, position in _visible_selection(uuids, mig_uuids, visible):
        if position is None:
            whole.add(gpu)
        else:
            parts.setdefault(gpu, set()).add(position)
    listed: list[_Listed] = []
    for gpu in sorted(whole | set(parts)):
        name = nvml.name(gpu) or f"GPU {gpu}"
        total, free = nvml.memory_info(gpu) or (0, 0)
        capability = nvml.compute_capability(gpu)
        if gpu not in migs or not migs[gpu]:
            listed.append(
                _Listed(
                    gpu,
                    name,
                    name,
                    uuids[gpu],
                    total,
                    free,
                    capability,
                    energy_supported=gpu not in migs and nvml.energy_millijoules(gpu) is not None,
                    mig_without_instances=gpu in migs,
                )
            )
            continue
        for position, (mig_index, handle, mig_uuid) in enumerate(migs[gpu]):
            if gpu not in whole and position not in parts[gpu]:
                continue
            mig_name = nvml.name_of(handle) or ""
            if "mig" not in mig_name.lower().split():
                mig_name = f"{name} MIG"
            mig_total, mig_free = nvml.memory_info_of(handle) or (0, 0)
            listed.append(
                _Listed(
                    gpu,
                    mig_name,
                    name,
                    mig_uuid,
                    mig_total,
                    mig_free,
                    nvml.compute_capability_of(handle) or capability,
                    energy_supported=False,  # NVML's energy counter is board-wide
                    mig_index=mig_index,
                    parent_uuid=uuids[gpu],
                )
            )
    return count, listed


def _unmatched_reason(item: _Listed, view: TorchCudaView) -> str:
    """Why ``item`` (which torch can see in principle) has no torch device."""
    if item.mig_without_instances:
        return (
            "MIG mode is enabled but no MIG instance is configured "
            "(create one with nvidia-smi mig -cgi <profile> -C, or disable MIG)"
        )
    if item.uuid is None:
        return "NVML gives no UUID for it, so it cannot be matched to a CUDA device"
    seen = len(view.devices)
    reason = (
        f"torch does not see it: none of the {seen} CUDA device(s) torch sees has UUID {item.uuid}"
    )
    if item.mig_index is not None:
        reason += (
            " (a CUDA process may enumerate only one MIG instance: choose it with "
            f"CUDA_VISIBLE_DEVICES={item.uuid})"
        )
    elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        reason += f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    return reason


def _why_unusable(item: _Listed, view: TorchCudaView, seen: TorchCudaDevice | None) -> str | None:
    """Why torch cannot drive ``item`` (``seen``: the torch device with its UUID), or None."""
    if not view.available:
        return view.reason or "torch cannot use CUDA"
    if seen is None:
        return _unmatched_reason(item, view)
    if arch_supported(seen.capability, view.arch_list):
        return None
    return _arch_reason(view, seen.capability)


def _gpu_device(item: _Listed, seen: TorchCudaDevice | None, reason: str | None) -> Device:
    """The :class:`Device` for a listed GPU: ``cuda:N`` when usable, ``nvml:N`` otherwise."""
    usable = reason is None and seen is not None
    if usable and seen is not None:
        device_id, index = f"cuda:{seen.index}", seen.index
    else:
        mig_part = f":mig:{item.mig_index}" if item.mig_index is not None else ""
        device_id, index = f"nvml:{item.nvml_index}{mig_part}", None
    total, free = item.memory_total, item.memory_free
    if not total and seen is not None:  # NVML could not say: torch's total, nothing in use
        total = free = seen.total_memory
    return Device(
        id=device_id,
        kind="cuda",
        index=index,
        name=item.name,
        gpu_type=gpu_type_from_name(item.name),
        memory_total_bytes=total,
        memory_free_bytes=free,
        compute_capability=item.capability or (seen.capability if seen else None),
        energy_supported=item.energy_supported,
        uuid=item.uuid,
        nvml_index=item.nvml_index,
        usable=usable,
        unusable_reason=None if usable else reason,
        mig=item.mig_index is not None,
        parent_uuid=item.parent_uuid,
        mig_index=item.mig_index,
    )


def _match(listed: Sequence[_Listed], view: TorchCudaView) -> tuple[list[Device], list[Device]]:
    """(usable GPUs in CUDA index order, unusable GPUs in NVML order), matched by UUID."""
    torch_devices = view.devices if view.available else ()
    by_uuid = {uuid_key(d.uuid): d for d in torch_devices if d.uuid is not None}
    usable: list[Device] = []
    unusable: list[Device] = []
    for item in listed:
        seen = None
        if item.uuid is not None and not item.mig_without_instances:
            seen = by_uuid.pop(uuid_key(item.uuid), None)
        device = _gpu_device(item, seen, _why_unusable(item, view, seen))
        (usable if device.usable else unusable).append(device)
    for extra in [*by_uuid.values(), *(d for d in torch_devices if d.uuid is None)]:
        log.debug(
            "torch sees cuda:%d (%s, UUID %s) but NVML does not list it; ignored",
            extra.index,
            extra.name,
            extra.uuid,
        )
    usable.sort(key=lambda d: d.index or 0)
    return usable, unusable


def _gpu_names(listed: Sequence[_Listed]) -> tuple[int, str]:
    """(number of physical GPUs, "Tesla V100-SXM2-16GB, 2× NVIDIA A100-SXM4-80GB")."""
    names: dict[int, str] = {}
    for item in listed:
        names.setdefault(item.nvml_index, item.gpu_name)
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    text = ", ".join(name if n == 1 else f"{n}× {name}" for name, n in counts.items())
    return len(names), text


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _fallback_reason(
    count: int,
    listed: Sequence[_Listed],
    unusable: Sequence[Device],
    view: TorchCudaView | None,
    visible: str | None,
) -> str | None:
    """Why the CPU is used although NVML sees ``count`` GPUs (None when it sees none)."""
    if count == 0:
        return None
    if not listed:
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides the {_plural(count, 'GPU')} NVML sees"
    physical, names = _gpu_names(listed)
    head = f"NVML sees {_plural(physical, 'GPU')} ({names})"
    if view is not None and not view.available:
        text = f"{head} but {view.reason}"
        if view.cpu_build or view.torch_version is None:
            legacy = sorted(
                {
                    d.gpu_type.upper()
                    for d in unusable
                    if d.gpu_type and _legacy_sm(d.compute_capability) is not None
                }
            )
            hint = (
                f"for {', '.join(legacy)}: the CUDA 12.6 wheels, {_CU126_INDEX}"
                if legacy
                else "see https://pytorch.org/get-started/locally/"
            )
            text += f": install a CUDA build of torch ({hint})"
        return text
    details = "; ".join(f"{d.id} ({d.name}): {d.unusable_reason}" for d in unusable)
    return f"{head} but torch can drive none of them: {details}"


def _discover_with(nvml: Nvml, visible: str | None, probe: TorchCudaProbe) -> HardwareInfo:
    count, listed = _list_nvml(nvml, visible) if nvml.available() else (0, [])
    view = probe() if listed else None
    usable, unusable = _match(listed, view) if view is not None else ([], [])
    fallback = None if usable else _fallback_reason(count, listed, unusable, view, visible)
    if fallback is not None and unusable:
        log.warning("no usable GPU, running on the CPU: %s", fallback)
    elif fallback is not None:
        log.info("running on the CPU: %s", fallback)
    elif unusable:
        log.warning(
            "skipping %s torch cannot drive: %s",
            _plural(len(unusable), "GPU"),
            "; ".join(f"{d.id} ({d.name}): {d.unusable_reason}" for d in unusable),
        )
    cpu_name = _cpu_name()
    cores = _cpu_cores()
    mem_total, mem_free = _cpu_memory()
    cpu = Device(
        id="cpu",
        kind="cpu",
        index=None,
        name=cpu_name,
        gpu_type=None,
        memory_total_bytes=mem_total,
        memory_free_bytes=mem_free,
        compute_capability=None,
        energy_supported=False,
        cores=cores,
    )
    return HardwareInfo(
        devices=(*usable, *unusable, cpu),
        driver_version=nvml.driver_version(),
        cuda_version=nvml.cuda_driver_version(),
        nvml_available=nvml.available(),
        nvml_error=nvml.error(),
        cpu_name=cpu_name,
        cpu_cores=cores,
        cpu_memory_total_bytes=mem_total,
        python_version=platform.python_version(),
        torch_version=package_version("torch"),
        transformers_version=package_version("transformers"),
        cpu_fallback_reason=fallback,
    )


# --------------------------------------------------------------------------- bandwidth

_BANDWIDTH_FILE = "cpu_bandwidth.json"
# 1 GiB: well past last-level caches (some server CPUs report 260 MiB of L3).
_PROBE_BYTES = 1024 * 2**20
_PROBE_BUDGET_S = 1.5


def engine_cache_dir() -> Path:
    """The engine's cache directory (created): ``$AITBC_ENGINE_CACHE`` or the user cache dir."""
    env = os.environ.get("AITBC_ENGINE_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        import platformdirs

        path = Path(platformdirs.user_cache_dir("aitbc-engine"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return _cpu_cores()


def _best_time(fn: Callable[[], object], *, reps: int, budget_s: float) -> float:
    """Best wall time of ``fn`` over up to ``reps`` runs (at least two) within ``budget_s``."""
    best = math.inf
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


def measure_cpu_memory_bandwidth_gbps(size_bytes: int = _PROBE_BYTES) -> float:
    """Measure sustained host memory read bandwidth in GB/s (takes about a second).

    Sums a float64 array of ``size_bytes`` (1 GiB, far larger than last-level caches)
    split across one thread per usable core (numpy releases the GIL), best of several runs.
    """
    import numpy as np

    _, available = _cpu_memory()
    if available:
        size_bytes = max(16 * 2**20, min(size_bytes, available // 4))
    data = np.ones(size_bytes // 8, dtype=np.float64)
    threads = min(_usable_cores(), 32)
    chunks = np.array_split(data, threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def read_all() -> None:
            list(pool.map(np.sum, chunks))

        read_all()  # warm up: threads started, pages resident
        seconds = _best_time(read_all, reps=8, budget_s=_PROBE_BUDGET_S)
    return data.nbytes / max(seconds, 1e-9) / 1e9


def _bandwidth_key() -> str:
    return f"{_cpu_name()}|{_cpu_cores()}|{_PROBE_BYTES >> 20}MiB"


def _read_bandwidth_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_memory_bandwidth_gbps(cache_dir: Path | None = None, *, refresh: bool = False) -> float:
    """The host's memory read bandwidth in GB/s, measured once and cached.

    The figure is kept in ``cache_dir/cpu_bandwidth.json`` (default
    :func:`engine_cache_dir`) under the CPU's name and core count; ``refresh=True``
    measures again.
    """
    directory = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    path = directory / _BANDWIDTH_FILE
    key = _bandwidth_key()
    entries = _read_bandwidth_cache(path)
    if not refresh:
        entry = entries.get(key)
        if isinstance(entry, dict):
            value = entry.get("gbps")
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                return float(value)
    gbps = float(measure_cpu_memory_bandwidth_gbps())
    entries[key] = {
        "gbps": gbps,
        "method": f"numpy threaded sum, {_PROBE_BYTES >> 20} MiB float64, best of runs",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache must not stop the engine
        log.warning("could not cache CPU bandwidth in %s: %s", path, exc)
    return gbps


def memory_bandwidth_gbps(device: Device, cache_dir: Path | None = None) -> float | None:
    """Peak memory bandwidth of ``device`` in GB/s.

    GPUs: the spec sheet (None for a family it does not list). CPU: measured once
    (:func:`cpu_memory_bandwidth_gbps`).
    """
    if device.kind == "cpu":
        return cpu_memory_bandwidth_gbps(cache_dir)
    spec = gpu_spec_for(device.gpu_type, device.name, device.memory_total_bytes)
    return spec.memory_bandwidth_gbps if spec is not None else None
