"""A fake NVML module for tests: the pynvml functions the engine uses, over fake GPUs.

Use it through the engine's seam::

    fake = FakeNvml(gpus=[v100(), a100()])
    hardware.set_nvml_module(fake)      # or hardware.Nvml(fake) / hardware.discover(Nvml(fake))

Discovery also asks torch which of those GPUs it can drive (matched by UUID); a
:class:`FakeTorchCuda` answers for torch::

    nvml, torch_cuda = fake_machine([v100(), a100()])   # torch sees both, same order
    info = hardware.discover(Nvml(nvml), torch_cuda=torch_cuda)
    hardware.set_torch_cuda_probe(torch_cuda)            # or for every discover()

A GPU in MIG mode: ``a100().add_mig("3g.40gb", 40 * 2**30)`` (each call adds one instance).

Energy counters only move when told to: ``gpu.advance_energy(mj)``, ``gpu.advance_time(s)``
(at ``gpu.power_watts``), ``fake.advance_time(s)`` for every GPU, or ``gpu.energy_step_mj``
(added after every read, so consecutive reads differ by that much).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.hardware import TorchCudaDevice, TorchCudaView

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

_serial = itertools.count()

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like ``pynvml.NVMLError``: carries the NVML return code in ``.value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class FakeMemory:
    """What ``nvmlDeviceGetMemoryInfo`` returns (bytes)."""

    total: int
    free: int
    used: int


@dataclass
class FakeGpu:
    """One fake GPU. ``memory_free`` defaults to the total; ``uuid`` to one made from the name."""

    name: str
    memory_total: int
    memory_free: int | None = None
    compute_capability: tuple[int, int] = (8, 0)
    energy_supported: bool = True
    uuid: str | None = None
    power_watts: float = 100.0
    energy_mj: int = 0
    energy_step_mj: int = 0
    lost: bool = False  # every call on a lost GPU raises NVML_ERROR_GPU_IS_LOST
    # MIG: None = the GPU has no MIG (NVML says NOT_SUPPORTED); else (current, pending).
    mig_mode: tuple[int, int] | None = None
    # MIG instances by NVML MIG device index; None marks an empty slot.
    mig_instances: list[FakeGpu | None] = field(default_factory=list)
    max_mig_devices: int = 7
    parent: FakeGpu | None = field(default=None, repr=False, compare=False)  # MIG instance's GPU

    def __post_init__(self) -> None:
        if self.memory_free is None:
            self.memory_free = self.memory_total
        if self.uuid is None:
            prefix = "MIG" if self.parent is not None else "GPU"
            digest = hashlib.sha256(f"{self.name}/{next(_serial)}".encode()).hexdigest()
            self.uuid = (
                f"{prefix}-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-"
                f"{digest[20:32]}"
            )

    @property
    def is_mig_instance(self) -> bool:
        """Whether this fake is a MIG instance (of ``parent``)."""
        return self.parent is not None

    def add_mig(self, profile: str, memory_total: int, **overrides: Any) -> FakeGpu:
        """Turn MIG mode on and add one instance (``"<name> MIG <profile>"``); returns it.

        The instance has its own ``MIG-`` UUID and memory, the parent's compute capability,
        and no energy counter (NVML's is board-wide).
        """
        self.mig_mode = (1, 1)
        defaults: dict[str, Any] = {
            "name": f"{self.name} MIG {profile}",
            "memory_total": memory_total,
            "compute_capability": self.compute_capability,
            "energy_supported": False,
            "parent": self,
        }
        instance = FakeGpu(**{**defaults, **overrides})
        self.mig_instances.append(instance)
        return instance

    def advance_energy(self, millijoules: int) -> None:
        """Move the total-energy counter forward."""
        self.energy_mj += int(millijoules)

    def advance_time(self, seconds: float) -> None:
        """Let ``seconds`` pass at ``power_watts``: the counter grows by watts × seconds."""
        self.energy_mj += round(self.power_watts * seconds * 1000)


def v100(**overrides: Any) -> FakeGpu:
    """A Tesla V100-SXM2-16GB (Volta, 7.0, no BF16, energy counter supported)."""
    defaults: dict[str, Any] = {
        "name": "Tesla V100-SXM2-16GB",
        "memory_total": 16 * 2**30,
        "memory_free": 15 * 2**30,
        "compute_capability": (7, 0),
        "power_watts": 250.0,
    }
    return FakeGpu(**{**defaults, **overrides})


def a100(**overrides: Any) -> FakeGpu:
    """An NVIDIA A100-SXM4-80GB (Ampere, 8.0, BF16, energy counter supported)."""
    defaults: dict[str, Any] = {
        "name": "NVIDIA A100-SXM4-80GB",
        "memory_total": 80 * 2**30,
        "memory_free": 79 * 2**30,
        "compute_capability": (8, 0),
        "power_watts": 300.0,
    }
    return FakeGpu(**{**defaults, **overrides})


@dataclass
class FakeNvml:
    """A module-like object with pynvml's names, over ``gpus`` (NVML index = list position).

    ``fail_init=True`` makes ``nvmlInit`` raise ``NVMLError(init_error)``. Calls before
    ``nvmlInit`` raise ``NVML_ERROR_UNINITIALIZED``, as the real library does.
    ``init_calls`` / ``shutdown_calls`` count the session's use. ``fail`` maps an NVML
    function name to the error code every call of it raises (``{"nvmlDeviceGetMemoryInfo":
    NVML_ERROR_NO_PERMISSION}``).
    """

    gpus: Sequence[FakeGpu] = ()
    driver: str = "550.54.15"
    cuda: int = 12040
    fail_init: bool = False
    init_error: int = NVML_ERROR_LIBRARY_NOT_FOUND
    init_calls: int = 0
    shutdown_calls: int = 0
    fail: dict[str, int] = field(default_factory=dict)
    _refcount: int = field(default=0, repr=False)

    NVMLError = NVMLError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1

    def __post_init__(self) -> None:
        self.gpus = list(self.gpus)

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml"):
            code = object.__getattribute__(self, "fail").get(name)
            if code is not None:

                def failing(*args: object) -> Any:
                    raise NVMLError(code)

                return failing
        return object.__getattribute__(self, name)

    # -- helpers for tests

    @property
    def initialized(self) -> bool:
        """Whether an ``nvmlInit`` is outstanding."""
        return self._refcount > 0

    def advance_time(self, seconds: float) -> None:
        """Let ``seconds`` pass on every GPU (see :meth:`FakeGpu.advance_time`)."""
        for gpu in self.gpus:
            gpu.advance_time(seconds)

    def _check(self) -> None:
        if self._refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: object) -> FakeGpu:
        """The GPU or MIG instance behind ``handle`` (raising as NVML does)."""
        self._check()
        if not isinstance(handle, FakeGpu):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        owner = handle.parent if handle.parent is not None else handle
        if all(owner is not g for g in self.gpus) or (
            owner is not handle and all(handle is not m for m in owner.mig_instances)
        ):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if handle.lost or owner.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return handle

    def _physical(self, handle: object) -> FakeGpu:
        """The whole GPU behind ``handle``; a MIG handle is an invalid argument."""
        gpu = self._gpu(handle)
        if gpu.parent is not None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu

    # -- the pynvml API

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.fail_init:
            raise NVMLError(self.init_error)
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.shutdown_calls += 1
        self._refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check()
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        uuid = self._gpu(handle).uuid
        assert uuid is not None
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> FakeMemory:
        gpu = self._gpu(handle)
        free = gpu.memory_total if gpu.memory_free is None else gpu.memory_free
        return FakeMemory(total=gpu.memory_total, free=free, used=gpu.memory_total - free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]:
        return self._gpu(handle).compute_capability

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        gpu = self._gpu(handle)
        if not gpu.energy_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        value = gpu.energy_mj
        gpu.energy_mj += gpu.energy_step_mj
        return value

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        """Board power in milliwatts, as NVML reports it."""
        return round(self._gpu(handle).power_watts * 1000)

    def nvmlDeviceGetMigMode(self, handle: object) -> list[int]:
        """[current, pending] MIG mode; NOT_SUPPORTED on a GPU without MIG."""
        gpu = self._physical(handle)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(gpu.mig_mode)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: object) -> int:
        gpu = self._physical(handle)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_mig_devices if gpu.mig_mode[0] == 1 else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: object, index: int) -> FakeGpu:
        gpu = self._physical(handle)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= index < gpu.max_mig_devices:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        instance = gpu.mig_instances[index] if index < len(gpu.mig_instances) else None
        if gpu.mig_mode[0] != 1 or instance is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return instance

    def nvmlDeviceIsMigDeviceHandle(self, handle: object) -> bool:
        return self._gpu(handle).parent is not None

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: object) -> FakeGpu:
        parent = self._gpu(handle).parent
        if parent is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return parent


# --------------------------------------------------------------------------- torch

# torch.cuda.get_arch_list() of PyTorch's x86-64 wheels.
CU126_ARCHS = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
CU128_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


def _bare_uuid(uuid: str | None) -> str | None:
    """A UUID as torch prints ``get_device_properties(i).uuid``: no ``GPU-``/``MIG-`` prefix."""
    if uuid is None:
        return None
    for prefix in ("GPU-", "MIG-"):
        if uuid.upper().startswith(prefix):
            return uuid[len(prefix) :].lower()
    return uuid.lower()


@dataclass
class FakeTorchCuda:
    """Stands in for torch's view of CUDA: a probe (call it) returning a ``TorchCudaView``.

    ``gpus`` are the fake GPUs (or MIG instances) torch sees, in torch's CUDA index order;
    their UUIDs, names, capabilities and memory are read at each call. ``calls`` counts
    the probes. Build one with :meth:`seeing`, :meth:`cpu_build` or :meth:`unavailable`.
    """

    gpus: Sequence[FakeGpu] = ()
    arch_list: Sequence[str] = CU126_ARCHS
    torch_version: str | None = "2.13.0+cu126"
    cuda_version: str | None = "12.6"
    available: bool = True
    reason: str | None = None
    calls: int = 0

    @classmethod
    def seeing(
        cls,
        gpus: Sequence[FakeGpu],
        order: Sequence[int] | None = None,
        *,
        arch_list: Sequence[str] = CU126_ARCHS,
        torch_version: str = "2.13.0+cu126",
        cuda_version: str = "12.6",
    ) -> FakeTorchCuda:
        """torch sees ``gpus[order[0]]`` as cuda:0, ``gpus[order[1]]`` as cuda:1...

        ``order`` defaults to the list's own order; it may leave GPUs out (torch does not
        see them). A GPU in MIG mode is not a CUDA device: pass its instances.
        """
        positions = range(len(gpus)) if order is None else order
        return cls(
            gpus=[gpus[i] for i in positions],
            arch_list=tuple(arch_list),
            torch_version=torch_version,
            cuda_version=cuda_version,
        )

    @classmethod
    def cpu_build(cls, torch_version: str = "2.13.0+cpu") -> FakeTorchCuda:
        """A torch wheel built without CUDA."""
        return cls(
            torch_version=torch_version,
            cuda_version=None,
            arch_list=(),
            available=False,
            reason=f"torch {torch_version} is a CPU build (torch.version.cuda is None)",
        )

    @classmethod
    def unavailable(cls, reason: str, torch_version: str = "2.13.0+cu128") -> FakeTorchCuda:
        """A CUDA build whose ``torch.cuda.is_available()`` is False (driver too old...)."""
        return cls(
            torch_version=torch_version,
            cuda_version="12.8",
            arch_list=CU128_ARCHS,
            available=False,
            reason=f"torch.cuda.is_available() is False: {reason}",
        )

    def __call__(self) -> TorchCudaView:
        self.calls += 1
        if not self.available:
            return TorchCudaView(
                False, self.reason, self.torch_version, self.cuda_version, tuple(self.arch_list)
            )
        devices = tuple(
            TorchCudaDevice(
                index=i,
                uuid=_bare_uuid(gpu.uuid),
                name=gpu.name,
                capability=gpu.compute_capability,
                total_memory=gpu.memory_total,
            )
            for i, gpu in enumerate(self.gpus)
        )
        return TorchCudaView(
            True, None, self.torch_version, self.cuda_version, tuple(self.arch_list), devices
        )


def cuda_devices_of(gpus: Sequence[FakeGpu]) -> list[FakeGpu]:
    """What CUDA enumerates for ``gpus``: each GPU, or in MIG mode its instances."""
    out: list[FakeGpu] = []
    for gpu in gpus:
        if gpu.mig_mode is not None and gpu.mig_mode[0] == 1:
            out += [m for m in gpu.mig_instances if m is not None]
        else:
            out.append(gpu)
    return out


def fake_machine(
    gpus: Sequence[FakeGpu],
    order: Sequence[int] | None = None,
    *,
    arch_list: Sequence[str] = CU126_ARCHS,
    **nvml_options: Any,
) -> tuple[FakeNvml, FakeTorchCuda]:
    """A fake NVML over ``gpus`` and a CUDA torch that sees every one of them.

    ``order`` is torch's order over the CUDA devices (:func:`cuda_devices_of`); the
    default ``arch_list`` (the CUDA 12.6 wheels) drives V100 through H100.
    """
    nvml = FakeNvml(gpus=gpus, **nvml_options)
    torch_cuda = FakeTorchCuda.seeing(cuda_devices_of(gpus), order, arch_list=arch_list)
    return nvml, torch_cuda
