"""Typed NVML errors: pynvml's ``NVMLError`` return codes mapped to a small tree, as Zeus does.

::

    DeviceError                      (engine.errors)
    └── NvmlError                    any NVML failure; ``nvml_code``, ``function``
        ├── NvmlUnavailable          NVML cannot be used on this machine at all
        │   ├── NvmlLibraryNotFound  pynvml or libnvidia-ml missing (12)
        │   └── NvmlDriverNotLoaded  no NVIDIA kernel driver (9)
        ├── NvmlNotInitialized       nvmlInit not called, or the session is closed (1)
        ├── NvmlNotSupported         this GPU or driver lacks the reading (3, 13; or
        │                            the module has no such function)
        ├── NvmlNoPermission         the reading needs privileges (4)
        ├── NvmlInvalidArgument      no such index or handle (2)
        ├── NvmlNotFound             no such object, e.g. an empty MIG slot (6, 28)
        ├── NvmlGpuLost              the GPU fell off the bus or needs a reset (15, 16)
        └── NvmlTimeout              the driver did not answer in time (10)

Any other code gives a plain :class:`NvmlError`. The message is NVML's own
(``str(error) == "Not Supported"``), so text that quoted pynvml reads the same.
Codes are NVML's C API values, the same in every pynvml release and in test fakes.
"""

from __future__ import annotations

from engine.errors import DeviceError

__all__ = [
    "NvmlDriverNotLoaded",
    "NvmlError",
    "NvmlGpuLost",
    "NvmlInvalidArgument",
    "NvmlLibraryNotFound",
    "NvmlNoPermission",
    "NvmlNotFound",
    "NvmlNotInitialized",
    "NvmlNotSupported",
    "NvmlTimeout",
    "NvmlUnavailable",
    "nvml_error_from",
]


class NvmlError(DeviceError):
    """An NVML call failed. ``nvml_code``: NVML's return code (None when the failure was
    not NVML's, e.g. an ``OSError``); ``function``: the NVML function that failed."""

    code = "nvml_error"
    nvml_codes: tuple[int, ...] = ()  # the NVML return codes this class stands for

    def __init__(
        self, message: str, *, nvml_code: int | None = None, function: str | None = None
    ) -> None:
        super().__init__(message, field="device")
        self.nvml_code = nvml_code
        self.function = function

    def again(self, function: str | None = None) -> NvmlError:
        """A fresh error of the same kind and message (for ``function``, if given)."""
        return type(self)(
            self.message, nvml_code=self.nvml_code, function=function or self.function
        )


class NvmlUnavailable(NvmlError):
    """NVML cannot be used on this machine (the engine then runs without GPUs)."""

    code = "nvml_unavailable"


class NvmlLibraryNotFound(NvmlUnavailable):
    """The NVML library is missing: ``pynvml`` not installed or ``libnvidia-ml.so`` not found."""

    code = "nvml_library_not_found"
    nvml_codes = (12,)  # NVML_ERROR_LIBRARY_NOT_FOUND


class NvmlDriverNotLoaded(NvmlUnavailable):
    """The NVIDIA kernel driver is not loaded."""

    code = "nvml_driver_not_loaded"
    nvml_codes = (9,)  # NVML_ERROR_DRIVER_NOT_LOADED


class NvmlNotInitialized(NvmlError):
    """NVML was not initialised, or the session was closed."""

    code = "nvml_not_initialized"
    nvml_codes = (1,)  # NVML_ERROR_UNINITIALIZED


class NvmlNotSupported(NvmlError):
    """The GPU or driver does not offer this reading (e.g. the energy counter before Volta)."""

    code = "nvml_not_supported"
    nvml_codes = (3, 13)  # NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND


class NvmlNoPermission(NvmlError):
    """The reading needs privileges this process lacks."""

    code = "nvml_no_permission"
    nvml_codes = (4,)  # NVML_ERROR_NO_PERMISSION


class NvmlInvalidArgument(NvmlError):
    """An index or handle NVML does not know."""

    code = "nvml_invalid_argument"
    nvml_codes = (2,)  # NVML_ERROR_INVALID_ARGUMENT


class NvmlNotFound(NvmlError):
    """The object asked for does not exist (an empty MIG slot, a GPU that is gone)."""

    code = "nvml_not_found"
    nvml_codes = (6, 28)  # NVML_ERROR_NOT_FOUND, NVML_ERROR_GPU_NOT_FOUND


class NvmlGpuLost(NvmlError):
    """The GPU fell off the bus or needs a reset before it answers again."""

    code = "nvml_gpu_lost"
    nvml_codes = (15, 16)  # NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED


class NvmlTimeout(NvmlError):
    """The driver did not answer in time."""

    code = "nvml_timeout"
    nvml_codes = (10,)  # NVML_ERROR_TIMEOUT


_BY_CODE: dict[int, type[NvmlError]] = {
    nvml_code: cls
    for cls in (
        NvmlLibraryNotFound,
        NvmlDriverNotLoaded,
        NvmlNotInitialized,
        NvmlNotSupported,
        NvmlNoPermission,
        NvmlInvalidArgument,
        NvmlNotFound,
        NvmlGpuLost,
        NvmlTimeout,
    )
    for nvml_code in cls.nvml_codes
}


def nvml_error_from(exc: BaseException, function: str | None = None) -> NvmlError:
    """The typed error for ``exc``, raised by NVML function ``function``.

    An ``NVMLError`` (anything with an integer ``value``) maps by its code; an
    ``AttributeError`` (the module has no such function) is :class:`NvmlNotSupported`;
    an ``ImportError`` (no pynvml) is :class:`NvmlLibraryNotFound`; anything else a plain
    :class:`NvmlError`. An :class:`NvmlError` is returned as it is.
    """
    if isinstance(exc, NvmlError):
        return exc
    if isinstance(exc, AttributeError):
        return NvmlNotSupported(
            f"this NVML has no {function or exc.name or 'such function'}", function=function
        )
    if isinstance(exc, ImportError):
        return NvmlLibraryNotFound(f"pynvml is not installed ({exc})", function=function)
    value = getattr(exc, "value", None)
    nvml_code = value if isinstance(value, int) and not isinstance(value, bool) else None
    cls = _BY_CODE.get(nvml_code, NvmlError) if nvml_code is not None else NvmlError
    return cls(str(exc) or type(exc).__name__, nvml_code=nvml_code, function=function)
