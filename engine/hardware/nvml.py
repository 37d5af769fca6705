"""The NVML seam and session: pynvml (or a fake) behind one failure-safe wrapper.

:func:`nvml_module` returns the real ``pynvml`` or a fake injected with
:func:`set_nvml_module`. :class:`Nvml` wraps it. Its readings return ``None`` on failure
(callers rely on that) and keep the typed reason: :attr:`Nvml.last_error` is the
:class:`~engine.hardware.errors.NvmlError` behind the calling thread's last reading
(``NvmlNotSupported``, ``NvmlGpuLost``...). :meth:`Nvml.call` raises it instead, and
:meth:`Nvml.try_call` returns it in place of the value.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from engine.hardware.errors import NvmlError, NvmlNotInitialized, nvml_error_from

__all__ = ["Nvml", "nvml_module", "nvml_seam", "set_nvml_module"]

log = logging.getLogger("engine.hardware")  # the package's one logger, as before the split

_nvml_override: Any | None = None
_nvml_changes = 0  # how often the seam was set: a discovery remembered before is stale


def set_nvml_module(module: Any | None) -> None:
    """Use ``module`` (a fake with pynvml's function names) for NVML; None restores pynvml."""
    global _nvml_override, _nvml_changes
    _nvml_override = module
    _nvml_changes += 1


def nvml_module() -> Any:
    """The NVML module in use: the injected fake, else ``pynvml`` (ImportError if absent)."""
    if _nvml_override is not None:
        return _nvml_override
    import pynvml

    return pynvml


def nvml_seam() -> tuple[Any | None, int]:
    """(the NVML module in use or None without pynvml, how often :func:`set_nvml_module` ran):
    what a remembered discovery is checked against."""
    try:
        module = nvml_module()
    except ImportError:
        module = None
    return module, _nvml_changes


def _cuda_version_string(version: int) -> str:
    """``12040`` → ``"12.4"`` (NVML encodes major*1000 + minor*10)."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """A session over an NVML module: initialised once, every reading failure-safe.

    Any ``NVMLError`` (not supported, GPU lost, not initialised...) turns into ``None``
    (or ``0`` for the device count, ``False``/``[]`` for MIG questions); nothing here
    raises because NVML is missing. The reason is kept, typed: :meth:`init_error` for the
    session, :attr:`last_error` for the calling thread's last reading. :meth:`call`
    raises the typed error instead. :meth:`close` (or leaving a ``with`` block) shuts the
    session down once. Indices are NVML indices (see :mod:`engine.hardware` for how they
    relate to CUDA indices).
    """

    def __init__(self, module: Any | None = None) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, Any] = {}
        self._module: Any | None = None
        self._error_cls: type[BaseException] = Exception
        self._initialized = False
        self._init_error: NvmlError | None = None
        self._local = threading.local()  # .error: this thread's last reading's NvmlError
        try:
            self._module = module if module is not None else nvml_module()
        except ImportError as exc:
            self._init_error = nvml_error_from(exc, "nvmlInit")
            return
        error_cls = getattr(self._module, "NVMLError", None)
        if isinstance(error_cls, type) and issubclass(error_cls, BaseException):
            self._error_cls = error_cls
        try:
            self._module.nvmlInit()
        except Exception as exc:  # NVMLError, OSError...: NVML is unusable here
            self._init_error = nvml_error_from(exc, "nvmlInit")
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
        """Why NVML is unavailable, as text (None when it initialised)."""
        return None if self._init_error is None else self._init_error.message

    def init_error(self) -> NvmlError | None:
        """Why NVML is unavailable, typed: e.g. :class:`NvmlLibraryNotFound` (None when it
        initialised)."""
        return self._init_error

    @property
    def last_error(self) -> NvmlError | None:
        """Why this thread's last reading came back ``None`` (None when it succeeded).

        Per thread, so that a reading on one thread never reports another's failure.
        """
        error: NvmlError | None = getattr(self._local, "error", None)
        return error

    def call(self, fn: str, *args: Any) -> Any:
        """NVML's ``fn(*args)``, raising the typed :class:`NvmlError` when it fails.

        On a session that never initialised it raises why (e.g. ``NvmlDriverNotLoaded``);
        on a closed one :class:`NvmlNotInitialized`.
        """
        if not self._initialized or self._module is None:
            if self._init_error is not None:
                raise self._init_error.again(fn)
            raise NvmlNotInitialized("the NVML session is closed", function=fn)
        try:
            return getattr(self._module, fn)(*args)
        except (self._error_cls, AttributeError) as exc:
            raise nvml_error_from(exc, fn) from exc

    def try_call(self, fn: str, *args: Any) -> Any:
        """NVML's ``fn(*args)``, or the typed :class:`NvmlError` in its place (never raises
        one); also sets :attr:`last_error`."""
        try:
            value = self.call(fn, *args)
        except NvmlError as exc:
            if self._initialized:
                log.debug("NVML %s%r failed: %s", fn, args, exc)
            self._local.error = exc
            return exc
        self._local.error = None
        return value

    def _call(self, fn: str, *args: Any) -> Any | None:
        value = self.try_call(fn, *args)
        return None if isinstance(value, NvmlError) else value

    def _device_call(self, fn: str, index: int, *args: Any) -> Any | None:
        handle = self.handle(index)
        return None if handle is None else self._call(fn, handle, *args)

    def handle(self, index: int) -> Any | None:
        """The NVML handle of GPU ``index`` (cached), or None."""
        with self._lock:
            cached = self._handles.get(index)
        if cached is not None:
            self._local.error = None
            return cached
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
