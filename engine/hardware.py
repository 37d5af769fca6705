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

Device numbering. NVML enumerates GPUs in PCI bus order; CUDA does so only when
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (its own default is "fastest first"). The engine
assumes PCI order: :func:`discover` sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` when it is
unset (:func:`ensure_pci_bus_order`; it takes effect only if CUDA is not initialised
yet, so faces should call it early). ``CUDA_VISIBLE_DEVICES`` is honoured the way CUDA
reads it: a list of NVML indices (``"2,0"`` makes ``cuda:0`` NVML GPU 2 and ``cuda:1``
NVML GPU 0) or of UUIDs / UUID prefixes (``"GPU-8f3c..."``), read up to the first
entry that names no GPU; an empty value hides every GPU. :attr:`Device.index` is the
CUDA index (what ``torch`` calls ``cuda:N``), :attr:`Device.nvml_index` the NVML index
to pass to :class:`Nvml`.
"""

from __future__ import annotations

import enum
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from engine.errors import DeviceError

__all__ = [
    "GPU_SPECS",
    "Device",
    "GpuSpec",
    "HardwareInfo",
    "Nvml",
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
    "set_nvml_module",
    "supports_bf16",
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
    """One device the engine can run on: a CUDA GPU or the host CPU."""

    id: str  # "cpu" or "cuda:0"
    kind: Literal["cpu", "cuda"]
    index: int | None  # CUDA index, None for the CPU
    name: str  # NVML product name, or CPU model name
    gpu_type: str | None  # short family for GPUs, None for the CPU
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: tuple[int, int] | None
    energy_supported: bool  # NVML total-energy counter readable (Volta and newer)
    uuid: str | None = None
    cores: int | None = None  # CPU logical cores (CPU device only)
    nvml_index: int | None = None  # NVML index (differs from `index` under CUDA_VISIBLE_DEVICES)

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
    """Everything :func:`discover` found: devices (GPUs first, the CPU last) and versions."""

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

    @property
    def gpus(self) -> tuple[Device, ...]:
        """The CUDA devices, in CUDA index order."""
        return tuple(d for d in self.devices if d.kind == "cuda")

    @property
    def cpu(self) -> Device:
        """The host CPU device."""
        for d in self.devices:
            if d.kind == "cpu":
                return d
        raise DeviceError("no cpu device was discovered", field="device")  # pragma: no cover

    def device(self, device_id: str) -> Device:
        """The device named ``"cpu"``, ``"cuda"`` (the first GPU), ``"cuda:N"`` or ``"gpu:N"``.

        Raises :class:`DeviceError` naming the devices that exist when there is no such one.
        """
        key = device_id.strip().lower()
        match = re.fullmatch(r"(cuda|gpu)(?::([0-9]+))?", key)
        if key == "cpu":
            return self.cpu
        if match is not None:
            index = int(match.group(2)) if match.group(2) is not None else 0
            for d in self.gpus:
                if d.index == index:
                    return d
        existing = ", ".join(d.id for d in self.devices)
        raise DeviceError(
            f"no device {device_id!r} on this machine; available: {existing}", field="device"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (``aitbc-engine info --json``)."""
        return {
            "devices": [d.to_dict() for d in self.devices],
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

    def name(self, index: int) -> str | None:
        """Product name, e.g. ``"NVIDIA A100-SXM4-80GB"``."""
        value = self._device_call("nvmlDeviceGetName", index)
        return None if value is None else _text(value)

    def uuid(self, index: int) -> str | None:
        """GPU UUID, e.g. ``"GPU-8f3c..."``."""
        value = self._device_call("nvmlDeviceGetUUID", index)
        return None if value is None else _text(value)

    def memory_info(self, index: int) -> tuple[int, int] | None:
        """(total, free) device memory in bytes."""
        info = self._device_call("nvmlDeviceGetMemoryInfo", index)
        if info is None:
            return None
        return int(info.total), int(info.free)

    def compute_capability(self, index: int) -> tuple[int, int] | None:
        """CUDA compute capability (major, minor)."""
        value = self._device_call("nvmlDeviceGetCudaComputeCapability", index)
        if value is None:
            return None
        major, minor = value
        return int(major), int(minor)

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
    """NVML indices of the GPUs CUDA sees, in CUDA index order.

    ``uuids`` holds one entry per NVML GPU (None when unknown); ``visible`` is the value of
    ``CUDA_VISIBLE_DEVICES`` (None: unset, every GPU visible). Entries are integer NVML
    indices or UUID prefixes; like CUDA, reading stops at the first entry that names no
    GPU (or one already named).
    """
    count = len(uuids)
    if visible is None:
        return list(range(count))
    chosen: list[int] = []
    for raw in visible.split(","):
        entry = raw.strip()
        index: int | None = None
        if re.fullmatch(r"\d+", entry):
            index = int(entry) if int(entry) < count else None
        elif entry:
            prefix = entry.lower()
            matches = [
                i for i, u in enumerate(uuids) if u is not None and u.lower().startswith(prefix)
            ]
            index = matches[0] if len(matches) == 1 else None
        if index is None or index in chosen:
            break
        chosen.append(index)
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


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- discovery

_cache_lock = threading.Lock()
_cached_info: tuple[Any, HardwareInfo] | None = None  # (NVML module it came from, info)


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
) -> HardwareInfo:
    """Find this machine's devices: GPUs through NVML (CUDA index order), then the CPU.

    With ``nvml`` given, that session is queried (and left open). Without it a session is
    opened on :func:`nvml_module` and closed again, and the result is remembered:
    ``refresh_free_memory=False`` returns the remembered snapshot (free memory as it was)
    instead of asking NVML again. Never raises because NVML is missing: ``nvml_error``
    says why there are no GPUs. ``cuda_visible_devices`` overrides the environment's
    ``CUDA_VISIBLE_DEVICES`` (None: all GPUs visible).
    """
    global _cached_info
    if nvml is None and not refresh_free_memory:
        with _cache_lock:
            cached = _cached_info
        if cached is not None and cached[0] is _current_module_or_none():
            return cached[1]
    ensure_pci_bus_order()
    visible = (
        os.environ.get("CUDA_VISIBLE_DEVICES")
        if cuda_visible_devices is _Env.FROM_ENVIRONMENT
        else cuda_visible_devices
    )
    if nvml is not None:
        return _discover_with(nvml, visible)
    session = Nvml()
    try:
        info = _discover_with(session, visible)
    finally:
        session.close()
    with _cache_lock:
        _cached_info = (_current_module_or_none(), info)
    return info


def _current_module_or_none() -> Any | None:
    try:
        return nvml_module()
    except ImportError:
        return None


def _discover_with(nvml: Nvml, visible: str | None) -> HardwareInfo:
    gpus: list[Device] = []
    if nvml.available():
        count = nvml.device_count()
        uuids = [nvml.uuid(i) for i in range(count)]
        for cuda_index, nvml_index in enumerate(cuda_visible_nvml_indices(uuids, visible)):
            name = nvml.name(nvml_index) or f"GPU {nvml_index}"
            total, free = nvml.memory_info(nvml_index) or (0, 0)
            gpus.append(
                Device(
                    id=f"cuda:{cuda_index}",
                    kind="cuda",
                    index=cuda_index,
                    name=name,
                    gpu_type=gpu_type_from_name(name),
                    memory_total_bytes=total,
                    memory_free_bytes=free,
                    compute_capability=nvml.compute_capability(nvml_index),
                    energy_supported=nvml.energy_millijoules(nvml_index) is not None,
                    uuid=uuids[nvml_index],
                    nvml_index=nvml_index,
                )
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
        devices=(*gpus, cpu),
        driver_version=nvml.driver_version(),
        cuda_version=nvml.cuda_driver_version(),
        nvml_available=nvml.available(),
        nvml_error=nvml.error(),
        cpu_name=cpu_name,
        cpu_cores=cores,
        cpu_memory_total_bytes=mem_total,
        python_version=platform.python_version(),
        torch_version=_package_version("torch"),
        transformers_version=_package_version("transformers"),
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
