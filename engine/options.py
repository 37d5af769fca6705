"""The engine's run and serve options and their ranges, checked in one place.

The CLI (``run``, ``serve``, ``mine``), the local API and :class:`~engine.Engine`
all check their options here, so a range is written once. A value out of range
raises :class:`OptionError` (code ``usage``, and a ``ValueError`` too) whose
message names the option as the caller spells it: the library's keyword
(``batch_size must be at least 1, got 0``) by default, the command line's flag
(``--batch-size must be at least 1, got 0``) when the CLI passes ``names``.

A leaf module: of the engine it imports only the errors, the model base and
the registry's dtype names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError

from engine.base import StrictModel
from engine.errors import EngineError
from engine.registry import DtypeName

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "FLAGS",
    "Decode",
    "DtypeName",
    "OptionError",
    "RunOptions",
    "ServeLimits",
    "Weights",
    "uses_model_operators",
]

Decode = Literal["auto", "dynamic", "static"]
"""The decode path (see :class:`~engine.Engine`)."""


def uses_model_operators(decode: Decode) -> bool:
    """Whether ``decode`` computes with transformers' model and its operators, so that a
    native model must be loaded as that model (every path but ``auto``, whose fused pass
    the engine's own model runs)."""
    return decode != "auto"

Weights = Literal["pretrained", "random"]
"""Real weights, or the true architecture with seeded random weights (benchmarks)."""

FLAGS: Mapping[str, str] = {
    "max_concurrent": "--max-concurrent",
    "batch_size": "--batch-size",
    "batch_window_seconds": "--batch-window",
    "job_timeout": "--job-timeout",
    "decode": "--decode",
    "dtype": "--dtype",
    "weights": "--weights",
    "port": "--port",
    "max_queue": "--max-queue",
    "max_body_bytes": "--max-body-bytes",
    "history": "--history",
    "shutdown_timeout": "--shutdown-timeout",
}
"""How the command line spells each option (``mine`` spells ``job_timeout`` ``--timeout``)."""


class OptionError(EngineError, ValueError):
    """An option is out of range or of the wrong type. ``field``: its keyword name;
    ``option``: its name as the message spells it."""

    code = "usage"

    def __init__(self, message: str, *, field: str, option: str):
        super().__init__(message, field=field)
        self.option = option


def _number(value: Any) -> Any:
    """A bound as a person writes it: 0, not 0.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _sentence(error: Mapping[str, Any], name: str) -> str:
    """One pydantic error as a sentence about the option called ``name``."""
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "greater_than_equal":
        return f"{name} must be at least {_number(ctx['ge'])}, got {got}"
    if kind == "greater_than":
        return f"{name} must be more than {_number(ctx['gt'])}, got {got}"
    if kind == "less_than_equal":
        return f"{name} must be at most {_number(ctx['le'])}, got {got}"
    if kind == "literal_error":
        return f"{name} must be one of {ctx['expected']}, got {got!r}"
    if kind == "extra_forbidden":
        return f"{name} is not an option here"
    return f"{name}: {error['msg'].lower()}, got {got!r}"


class _Options(StrictModel):
    @classmethod
    def check(cls, names: Mapping[str, str] | None = None, **values: Any) -> Self:
        """The options ``values`` checked, or :class:`OptionError` for the first bad one.

        ``names`` maps a keyword to how the message spells it (pass :data:`FLAGS`,
        with overrides, from the CLI); unnamed keywords are spelt as they are.
        """
        try:
            return cls(**values)
        except ValidationError as err:
            first = err.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "options"
            name = (names or {}).get(field, field)
            raise OptionError(_sentence(first, name), field=field, option=name) from None


class RunOptions(_Options):
    """How an :class:`~engine.Engine` runs jobs (``run``, ``serve``, ``mine`` and the library)."""

    max_concurrent: int = Field(1, ge=1)
    """Works that share a device step by step."""
    batch_size: int | None = Field(None, ge=1)
    """Generation jobs of one model decoded as one batch; None: the device default, 1: off."""
    batch_window_seconds: float = Field(0.0, ge=0)
    """How long a new batch waits for mates."""
    job_timeout: float | None = Field(None, gt=0)
    """Each job's time limit on its device, in seconds; None: no limit."""
    decode: Decode = "auto"
    dtype: DtypeName | None = None
    weights: Weights = "pretrained"

    def engine_kwargs(self) -> dict[str, Any]:
        """The options as :class:`~engine.Engine` keywords."""
        return self.model_dump()


class ServeLimits(_Options):
    """The local API's limits (``serve``): no defaults here; the server's constants give them."""

    port: int = Field(ge=0, le=65535)
    """TCP port (0: any free port)."""
    max_queue: int = Field(ge=0)
    """Jobs that may wait for a device beyond those running; more get 503."""
    max_body_bytes: int = Field(ge=1)
    """Request body limit (413 above)."""
    history: int = Field(ge=0)
    """Finished jobs kept for ``GET /v1/jobs/ID``."""
    shutdown_timeout: float | None = Field(None, ge=0)
    """Seconds waiting requests get to finish on SIGINT/SIGTERM; None: as long as they take."""
