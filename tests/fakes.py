"""A fake NVML module for tests: the pynvml functions the engine uses, over fake GPUs.

Use it through the engine's seam::

    fake = FakeNvml(gpus=[v100(), a100()])
    hardware.set_nvml_module(fake)      # or hardware.Nvml(fake) / hardware.discover(Nvml(fake))

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

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
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

    def __post_init__(self) -> None:
        if self.memory_free is None:
            self.memory_free = self.memory_total
        if self.uuid is None:
            digest = hashlib.sha256(f"{self.name}/{next(_serial)}".encode()).hexdigest()
            self.uuid = (
                f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
            )

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
    ``init_calls`` / ``shutdown_calls`` count the session's use.
    """

    gpus: Sequence[FakeGpu] = ()
    driver: str = "550.54.15"
    cuda: int = 12040
    fail_init: bool = False
    init_error: int = NVML_ERROR_LIBRARY_NOT_FOUND
    init_calls: int = 0
    shutdown_calls: int = 0
    _refcount: int = field(default=0, repr=False)

    NVMLError = NVMLError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    def __post_init__(self) -> None:
        self.gpus = list(self.gpus)

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
        self._check()
        if not isinstance(handle, FakeGpu) or all(handle is not g for g in self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if handle.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return handle

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
