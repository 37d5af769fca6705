"""Typed errors of the engine.

Every error carries a stable machine-readable ``code`` (reported to coordinators
and in failed results), a message a person can act on, and, where one input
field is to blame, that field's name.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    code: str = "engine_error"

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """The error as JSON-ready fields (``code``, ``message`` and ``field`` when known)."""
        out = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


class RegistryError(EngineError):
    """The model registry file is missing, unreadable or invalid."""

    code = "invalid_registry"


class UnknownModelError(EngineError):
    """A job or command named a model that the registry does not hold."""

    code = "unknown_model"


class WeightsUnavailableError(EngineError):
    """The weights of a registry entry cannot be found or fetched here."""

    code = "weights_unavailable"


class UnsafeWeightsError(EngineError):
    """The weights are in a format the engine refuses to load (pickle checkpoints)."""

    code = "unsafe_weights"


class InsufficientMemoryError(EngineError):
    """A model does not fit the free memory of the device it was meant for."""

    code = "insufficient_memory"


class DeviceError(EngineError):
    """A device was named that this machine does not have, or cannot be used."""

    code = "invalid_device"


class InvalidJobError(EngineError):
    """A job or coordinator payload is malformed."""

    code = "invalid_job"


class UnsupportedJobTypeError(InvalidJobError):
    """A payload asks for a kind of work this engine does not do."""

    code = "unsupported_job_type"


class ContextLengthError(InvalidJobError):
    """Prompt plus requested tokens exceed the model's context length."""

    code = "context_length_exceeded"


class JobTimeoutError(EngineError):
    """A job ran past its time limit and was stopped."""

    code = "timeout"


class JobCancelledError(EngineError):
    """A job was cancelled before it finished."""

    code = "cancelled"


class DeviceOutOfMemoryError(EngineError):
    """The device ran out of memory while running a job."""

    code = "out_of_memory"


class ExecutionError(EngineError):
    """Any other failure while running a job."""

    code = "execution_error"


class NumericalOverflowError(EngineError):
    """A model's logits became NaN or infinite: the dtype could not hold its activations."""

    code = "numerical_overflow"
