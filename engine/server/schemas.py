"""The local API's request and response shapes (the job payloads are :mod:`engine.payloads`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.inventory import ModelView
from engine.jobqueue import JobRecord, JobState
from engine.jobs import JobResult
from engine.pricing import Estimate


class ErrorInfo(BaseModel):
    """What went wrong: a stable code, a message, the input field to blame when known."""

    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorInfo


class Health(BaseModel):
    """Liveness and readiness."""

    status: Literal["ok", "loading", "error"]
    version: str
    uptime_seconds: float
    jobs_in_flight: int
    message: str | None = None


class JobAccepted(BaseModel):
    """The answer to ``POST /v1/jobs?wait=false``."""

    job_id: str
    state: JobState
    url: str


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class JobView(BaseModel):
    """An accepted job: its state and, once finished, its result."""

    job_id: str
    model: str
    task: str
    state: JobState
    accepted_at: str
    finished_at: str | None = None
    result: JobResult | None = None

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        """The view of an accepted job's record."""
        return cls(job_id=record.job.job_id, model=record.job.model, task=record.job.task,
                   state=record.state, accepted_at=_iso(record.accepted_at) or "",
                   finished_at=_iso(record.finished_at), result=record.result)


class CancelView(BaseModel):
    """The answer to ``DELETE /v1/jobs/{id}``."""

    job_id: str
    state: Literal["cancelled", "cancelling"]


class OpenAIModel(BaseModel):
    """A model as OpenAI's ``GET /v1/models`` lists it (aliases included)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "aitbc-engine"


class ModelList(BaseModel):
    """``GET /v1/models``: the engine's view, and OpenAI's ``object`` and ``data``."""

    registry: str | None
    weights: str
    models: list[ModelView]
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = Field(default_factory=list)


class LoadView(BaseModel):
    """``POST /v1/models/{name}/load``."""

    model: str
    was_warm: bool
    devices: list[str]
    dtype: str
    weights: str
    weights_digest: str
    memory_bytes: int
    load_time_seconds: float


class EvictView(BaseModel):
    """``DELETE /v1/models/{name}``."""

    model: str
    evicted: list[str]


class EstimateRequest(BaseModel):
    """A job shape to price (``model``, when given, must be the profile's)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    prompt_tokens: Annotated[int, Field(ge=1, le=10_000_000)]
    max_tokens: Annotated[int, Field(ge=1, le=10_000_000)]
    price_per_hour: Annotated[float, Field(ge=0.0, le=1e9)]
    gpu_count: Annotated[int, Field(ge=1, le=64)] = 1


class EstimateView(BaseModel):
    """``POST /v1/estimate``: the profile used and the estimate."""

    profile: str
    estimate: Estimate


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    413: {"model": ErrorBody, "description": "request body over the size limit"},
    422: {"model": ErrorBody, "description": "malformed request"},
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: the errors every route may give, and ``codes``."""
    out = dict(_ERRORS)
    for c in codes:
        out[c] = {"model": ErrorBody}
    return out
