"""The local HTTP API (``aitbc-engine serve``): the engine for miner software in any language.

A small FastAPI app, thin over the library: every route calls the same
:class:`~engine.executor.Engine`, pool, registry and hardware functions as the
command line, so a job posted here gets the same result and ``result_hash`` as
``aitbc-engine run`` and ``Engine.run``.

Routes (every one but ``/health`` needs ``Authorization: Bearer <token>``):

==========================  ===================================================
``GET /health``             ``{"status": "ok" | "loading" | "error", ...}``
``GET /v1/hardware``        the devices, as ``aitbc-engine info --json``, and fast-path warm-ups
``GET /v1/models``          the registry, with availability and warm state
``POST /v1/models/{name}/load``  warm a model; ``DELETE /v1/models/{name}`` evicts
``POST /v1/jobs``           run a job (engine JSON or any coordinator payload)
``GET /v1/jobs/{id}``       state and result of an accepted job
``DELETE /v1/jobs/{id}``    cancel it
``POST /v1/estimate``       pricing estimate from a stored profile (only when
                            :mod:`engine.pricing` exists and a profile is given)
``GET /metrics``            Prometheus text
==========================  ===================================================

Answers to ``POST /v1/jobs``: an input error found before the job runs is a 4xx
(422 malformed, with the field named; 404 unknown model; 409 a job id already
taken or a model this engine's devices cannot hold; 503 with ``Retry-After``
when the queue is full). Once accepted, the job's outcome is a
:class:`~engine.jobs.JobResult`: ``?wait=true`` (the default) answers 200 with
it whether the job completed or failed while running (``status`` says which),
``?wait=false`` answers 202 with the job id at once.

Every error body is ``{"error": {"code", "message", "field"?}}``.

The token is read from (or generated on first start into) ``<state_dir>/token``
with file mode 0600 unless one is given. The state directory defaults to
``$AITBC_ENGINE_STATE`` or else platformdirs' ``user_state_dir("aitbc-engine")``
(``~/.local/state/aitbc-engine`` on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import ipaddress
import logging
import math
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import hardware, loading
from engine.errors import EngineError
from engine.executor import ENGINE_VERSION, Engine, JobHandle
from engine.jobs import Job, JobResult, parse_payload

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_QUEUE = 64
DEFAULT_HISTORY = 1000
TOKEN_FILE = "token"
STATE_ENV = "AITBC_ENGINE_STATE"
MAX_RETRY_AFTER_SECONDS = 60

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]

# Error codes found before a job runs, and the HTTP status each one maps to.
_STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_model": 404,
    "unknown_job": 404,
    "method_not_allowed": 405,
    "job_exists": 409,
    "job_finished": 409,
    "model_in_use": 409,
    "no_profile": 409,
    "invalid_device": 409,
    "insufficient_memory": 409,
    "weights_unavailable": 409,
    "unsafe_weights": 409,
    "payload_too_large": 413,
    "pricing_error": 422,
    "invalid_job": 422,
    "unsupported_job_type": 422,
    "context_length_exceeded": 422,
    "validation_error": 422,
    "queue_full": 503,
    "shutting_down": 503,
}
_PRE_RUN_CODES = {"invalid_job", "unsupported_job_type", "context_length_exceeded",
                  "unknown_model", "invalid_device"}


class ServerError(EngineError):
    """An error the API answers with a given HTTP status (and optional headers)."""

    code = "server_error"

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, field=field, code=code)
        self.status = status
        self.headers = headers or {}


class TokenFileError(EngineError):
    """The API token file exists but cannot be used."""

    code = "invalid_token_file"


# ------------------------------------------------------------------ state dir and token

def default_state_dir() -> Path:
    """Where the server keeps its token: ``$AITBC_ENGINE_STATE`` or the user state dir."""
    env = os.environ.get(STATE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir("aitbc-engine"))


def mask_secret(secret: str) -> str:
    """A secret shown safely: its first 4 characters and its length."""
    return f"{secret[:4]}… ({len(secret)} chars)" if len(secret) > 8 else "****"


def load_or_create_token(state_dir: Path) -> tuple[str, Path, bool]:
    """The API token in ``state_dir/token``, made (mode 0600) on first use.

    Returns ``(token, path, created)``. A token file readable by others is
    tightened to 0600 with a warning.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(token + "\n")
        return token, path, True
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("token file %s had mode %o; tightening it to 600", path, mode)
            path.chmod(0o600)
        existing = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the API token file {path}: {exc}; fix its "
                             "permissions or delete it to have a new token made") from exc
    if not existing or any(c.isspace() for c in existing):
        raise TokenFileError(f"the API token file {path} is empty or holds whitespace; delete "
                             "it to have a new token made, or pass --token")
    return existing, path, False


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------ request / response shapes

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


class JobView(BaseModel):
    """An accepted job: its state and, once finished, its result."""

    job_id: str
    model: str
    task: str
    state: JobState
    accepted_at: str
    finished_at: str | None = None
    result: JobResult | None = None


class CancelView(BaseModel):
    """The answer to ``DELETE /v1/jobs/{id}``."""

    job_id: str
    state: Literal["cancelled", "cancelling"]


class ModelView(BaseModel):
    """One registry entry with where its weights are and whether it is warm."""

    name: str
    task: str
    architecture: str
    parameters: int
    context_length: int
    gpu_count: int
    min_gpu_memory_mb: int
    source: str
    available: bool
    reason: str
    location: str | None = None
    size_bytes: int | None = None
    runnable: bool
    warm: bool
    warm_on: list[str]


class ModelList(BaseModel):
    """``GET /v1/models``."""

    registry: str | None
    weights: str
    models: list[ModelView]


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


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    413: {"model": ErrorBody, "description": "request body over the size limit"},
    422: {"model": ErrorBody, "description": "malformed request"},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    out = dict(_ERRORS)
    for c in codes:
        out[c] = {"model": ErrorBody}
    return out


def _coordinator_payload_schemas() -> list[dict[str, Any]]:
    """JSON schemas of the coordinator payload shapes (PROTOCOLS.md "Job payloads")."""
    strings = {"type": "array", "items": {"type": "string"}}
    return [
        {"title": "FlatInference", "type": "object", "required": ["type", "model", "prompt"],
         "properties": {"type": {"const": "inference"}, "job_id": {"type": "string"},
                        "model": {"type": "string"}, "prompt": {"type": "string"},
                        "max_tokens": {"type": "integer"}, "temperature": {"type": "number"},
                        "top_p": {"type": "number"}, "top_k": {"type": "integer"},
                        "seed": {"type": "integer"},
                        "repetition_penalty": {"type": "number"},
                        "stop": {"anyOf": [{"type": "string"}, strings]}},
         "additionalProperties": False},
        {"title": "ServiceRequest", "type": "object",
         "required": ["service_type", "service_request"],
         "properties": {"service_type": {"const": "llm_inference"}, "job_id": {"type": "string"},
                        "service_request": {
                            "type": "object", "required": ["model", "prompt"],
                            "properties": {"model": {"type": "string"},
                                           "prompt": {"type": "string"},
                                           "max_tokens": {"type": "integer"},
                                           "temperature": {"type": "number"},
                                           "top_p": {"type": "number"},
                                           "top_k": {"type": "integer"},
                                           "repetition_penalty": {"type": "number"},
                                           "seed": {"type": "integer"},
                                           "stop_sequences": strings,
                                           "stream": {"type": "boolean"}},
                            "additionalProperties": False}},
         "additionalProperties": False},
        {"title": "EmbeddingPayload", "type": "object", "required": ["type", "model", "input"],
         "properties": {"type": {"const": "embedding"}, "job_id": {"type": "string"},
                        "model": {"type": "string"},
                        "input": {"anyOf": [{"type": "string"}, strings]}},
         "additionalProperties": False},
    ]


# ------------------------------------------------------------------ job store

def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


@dataclass
class JobRecord:
    """An accepted job, its handle in the engine and, once finished, its result."""

    job: Job
    handle: JobHandle
    accepted_at: float
    waiter: Future[JobResult] | None = None
    result: JobResult | None = None
    finished_at: float | None = None

    @property
    def state(self) -> JobState:
        """Where the job is: queued, running, completed, failed or cancelled."""
        result = self.result
        if result is None and self.handle.done():
            result = self.handle.result()
        if result is not None:
            if result.error is not None and result.error.code == "cancelled":
                return "cancelled"
            return result.status
        return "running" if self.handle.running() else "queued"

    def view(self) -> JobView:
        """The JSON view of the record."""
        return JobView(job_id=self.job.job_id, model=self.job.model, task=self.job.task,
                       state=self.state, accepted_at=_iso(self.accepted_at) or "",
                       finished_at=_iso(self.finished_at), result=self.result)


class JobStore:
    """Accepted jobs by id: every unfinished one, and the latest ``history`` finished ones."""

    def __init__(self, history: int = DEFAULT_HISTORY):
        if history < 0:
            raise ValueError("history must be 0 or more")
        self._history = history
        self._active: dict[str, JobRecord] = {}
        self._finished: OrderedDict[str, JobRecord] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def history(self) -> int:
        """How many finished jobs are kept."""
        return self._history

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._active or job_id in self._finished

    def add(self, record: JobRecord) -> None:
        """Track a newly accepted job."""
        with self._lock:
            self._active[record.job.job_id] = record

    def get(self, job_id: str) -> JobRecord | None:
        """The record of ``job_id``, or None when unknown or dropped from history."""
        with self._lock:
            return self._active.get(job_id) or self._finished.get(job_id)

    def finish(self, record: JobRecord) -> None:
        """Move a finished job to the bounded history."""
        with self._lock:
            self._active.pop(record.job.job_id, None)
            self._finished[record.job.job_id] = record
            while len(self._finished) > self._history:
                self._finished.popitem(last=False)

    def active_count(self) -> int:
        """Accepted jobs not finished yet."""
        with self._lock:
            return len(self._active)

    def active(self) -> list[JobRecord]:
        """The accepted jobs not finished yet, oldest first."""
        with self._lock:
            return list(self._active.values())


# ------------------------------------------------------------------ metrics

class _LiveCollector:
    """Gauges read from the engine at scrape time."""

    def __init__(self, service: ApiService):
        self._service = service

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        engine = self._service.engine
        queued, running = engine.queue_length(), engine.running_count()
        jobs = GaugeMetricFamily("aitbc_engine_jobs", "Jobs in the engine now, by state",
                                 labels=["state"])
        jobs.add_metric(["queued"], queued)
        jobs.add_metric(["running"], running)
        yield jobs
        yield GaugeMetricFamily("aitbc_engine_queue_length", "Jobs waiting for a device",
                                value=queued)
        yield GaugeMetricFamily("aitbc_engine_jobs_in_flight",
                                "Jobs accepted by the API and not finished",
                                value=self._service.store.active_count())
        warm = GaugeMetricFamily("aitbc_engine_models_loaded", "Warm models, by model",
                                 labels=["model"])
        counts: dict[str, int] = {}
        for loaded in engine.pool.warm():
            counts[loaded.spec.name] = counts.get(loaded.spec.name, 0) + 1
        for name, n in sorted(counts.items()):
            warm.add_metric([name], n)
        yield warm


class ApiMetrics:
    """The app's Prometheus metrics, on their own registry."""

    def __init__(self, service: ApiService):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("aitbc_engine_jobs_finished", "Jobs finished, by model and outcome",
                            ["model", "status"], registry=r)
        self.rejected = Counter("aitbc_engine_jobs_rejected",
                                "Jobs refused before running, by error code", ["code"],
                                registry=r)
        self.duration = Histogram(
            "aitbc_engine_job_duration_seconds", "Execution time of completed jobs", ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                     600), registry=r)
        self.queue_wait = Histogram(
            "aitbc_engine_job_queue_seconds", "Time completed jobs waited for a device",
            ["model"], buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=r)
        self.gpu_seconds = Counter("aitbc_engine_gpu_seconds", "GPU seconds held by jobs",
                                   ["model"], registry=r)
        self.energy = Counter("aitbc_engine_energy_joules",
                              "Energy measured by NVML for jobs (absent where not measured)",
                              ["model"], registry=r)
        self.tokens = Counter("aitbc_engine_tokens", "Tokens processed, by kind",
                              ["model", "kind"], registry=r)
        r.register(_LiveCollector(service))

    def observe(self, result: JobResult) -> None:
        """Count a finished job."""
        status = ("cancelled" if result.error is not None and result.error.code == "cancelled"
                  else result.status)
        self.jobs.labels(result.model, status).inc()
        m = result.metrics
        if not result.ok or m is None:
            return
        self.duration.labels(result.model).observe(m.execution_time_seconds)
        if m.queue_seconds is not None:
            self.queue_wait.labels(result.model).observe(max(0.0, m.queue_seconds))
        self.gpu_seconds.labels(result.model).inc(m.gpu_time_seconds)
        if m.energy_joules is not None:
            self.energy.labels(result.model).inc(m.energy_joules)
        self.tokens.labels(result.model, "prompt").inc(m.prompt_tokens)
        self.tokens.labels(result.model, "completion").inc(m.completion_tokens)


# ------------------------------------------------------------------ the service

def _pricing_module() -> ModuleType | None:
    """:mod:`engine.pricing` when it exists and offers ``load_profile`` and ``estimate``."""
    try:
        if importlib.util.find_spec("engine.pricing") is None:
            return None
        module = importlib.import_module("engine.pricing")
    except ImportError:
        return None
    if all(callable(getattr(module, n, None)) for n in ("load_profile", "estimate")):
        return module
    return None


class ApiService:
    """What the routes call: admission, the job store, waiting, metrics, preloading."""

    def __init__(self, engine: Engine, *, max_queue: int, history: int,
                 preload: Sequence[str] = ()):
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        self.engine = engine
        self.max_queue = max_queue
        self.store = JobStore(history)
        self.metrics = ApiMetrics(self)
        self.capacity = max(1, len(engine.devices) * engine.max_concurrent * engine.batch_size)
        self.limit = self.capacity + max_queue
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_seconds = 1.0
        self._waiters = ThreadPoolExecutor(max_workers=self.limit,
                                           thread_name_prefix="api-waiter")
        self.preload = list(preload)
        self.preload_done = threading.Event()
        self.preload_errors: dict[str, str] = {}
        if not self.preload:
            self.preload_done.set()

    # -- preload
    def start_preload(self) -> None:
        """Warm the preload models in a background thread (health says ``loading`` meanwhile)."""
        if self.preload_done.is_set():
            return

        def work() -> None:
            for name in self.preload:
                try:
                    self.engine.load(name)
                    log.info("preloaded %s", name)
                except EngineError as exc:
                    self.preload_errors[name] = f"{exc.code}: {exc.message}"
                    log.error("cannot preload %s: %s: %s", name, exc.code, exc.message)
                except Exception as exc:  # the server stays up and says what failed
                    self.preload_errors[name] = f"{type(exc).__name__}: {exc}"
                    log.exception("cannot preload %s", name)
            self.preload_done.set()

        threading.Thread(target=work, name="api-preload", daemon=True).start()

    def health(self) -> Health:
        """The health answer."""
        if self.preload_errors:
            status: Literal["ok", "loading", "error"] = "error"
            message: str | None = "; ".join(f"{k}: {v}" for k, v in self.preload_errors.items())
        elif not self.preload_done.is_set():
            status, message = "loading", f"preloading {', '.join(self.preload)}"
        else:
            status, message = "ok", None
        return Health(status=status, version=ENGINE_VERSION,
                      uptime_seconds=round(time.monotonic() - self.started, 3),
                      jobs_in_flight=self.store.active_count(), message=message)

    # -- jobs
    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead over the device capacity."""
        ahead = max(1, self._in_flight - self.capacity + 1)
        return max(1, min(MAX_RETRY_AFTER_SECONDS,
                          math.ceil(self._mean_seconds * ahead / self.capacity)))

    def submit(self, body: bytes | Any) -> JobRecord:
        """Admit a job: parse, check, queue in the engine and start waiting for it."""
        try:
            job = parse_payload(body)
            self.engine.registry.get(job.model)
        except EngineError as exc:
            self.metrics.rejected.labels(exc.code).inc()
            raise
        with self._lock:
            if job.job_id in self.store:
                self.metrics.rejected.labels("job_exists").inc()
                raise ServerError(409, "job_exists", f"a job with id {job.job_id!r} was already "
                                  "accepted; give a new job_id or leave it out", field="job_id")
            if self._in_flight >= self.limit:
                self.metrics.rejected.labels("queue_full").inc()
                wait = self.retry_after()
                raise ServerError(503, "queue_full",
                                  f"the engine has {self._in_flight} job(s) in flight, its limit "
                                  f"({self.capacity} running + {self.max_queue} queued); retry "
                                  f"in {wait} s", headers={"Retry-After": str(wait)})
            try:
                handle = self.engine.submit(job)
            except RuntimeError as exc:
                raise ServerError(503, "shutting_down", f"the engine is not taking jobs: {exc}",
                                  headers={"Retry-After": "5"}) from exc
            if handle.done():
                early = handle.result()
                if not early.ok and early.error is not None \
                        and early.error.code in _PRE_RUN_CODES:
                    self.metrics.rejected.labels(early.error.code).inc()
                    raise EngineError(early.error.message, field=early.error.field,
                                      code=early.error.code)
            record = JobRecord(job=job, handle=handle, accepted_at=time.time())
            self.store.add(record)
            self._in_flight += 1
        record.waiter = self._waiters.submit(self._wait, record)
        return record

    def _wait(self, record: JobRecord) -> JobResult:
        try:
            result = record.handle.result()
        except BaseException as exc:  # never leave a slot taken
            log.exception("waiting for job %s failed", record.job.job_id)
            with self._lock:
                self._in_flight -= 1
            raise exc
        record.finished_at = time.time()
        record.result = result
        self.metrics.observe(result)
        with self._lock:
            self._in_flight -= 1
            if result.ok and result.metrics is not None:
                took = result.metrics.execution_time_seconds + result.metrics.load_time_seconds
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * took
        self.store.finish(record)
        return result

    def record(self, job_id: str) -> JobRecord:
        """The record of ``job_id`` or a 404."""
        record = self.store.get(job_id)
        if record is None:
            raise ServerError(404, "unknown_job", f"no job {job_id!r} here (never accepted, or "
                              f"older than the last {self.store.history} finished jobs)",
                              field="job_id")
        return record

    def cancel(self, job_id: str) -> CancelView:
        """Cancel a queued or running job."""
        record = self.record(job_id)
        if record.result is not None or not record.handle.cancel():
            raise ServerError(409, "job_finished", f"job {job_id!r} has already finished "
                              f"({record.state}); there is nothing to cancel", field="job_id")
        return CancelView(job_id=job_id,
                          state="cancelled" if record.handle.done() else "cancelling")

    def close(self, *, wait: bool) -> None:
        """Stop the waiter threads; ``wait`` for them (once the engine has answered every job)."""
        self._waiters.shutdown(wait=wait, cancel_futures=False)

    def drain(self) -> None:
        """Graceful shutdown: the engine cancels queued jobs, finishes running ones; then close."""
        pending = self.store.active()
        if pending:
            log.warning("shutting down: waiting for %d running job(s), cancelling %d queued",
                        sum(r.state == "running" for r in pending),
                        sum(r.state == "queued" for r in pending))
        self.engine.close(cancel_pending=True)
        self.close(wait=True)
        for record in pending:
            log.warning("shutdown: job %s %s", record.job.job_id, record.state)


# ------------------------------------------------------------------ middleware

class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit (an HTTPException, so FastAPI passes it on)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_text(limit))


def _too_large_text(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


def _too_large(limit: int) -> JSONResponse:
    return _error_response(413, "payload_too_large", _too_large_text(limit))


# ------------------------------------------------------------------ errors

def _error_response(status: int, code: str, message: str, field: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    info: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        info["field"] = field
    return JSONResponse({"error": info}, status_code=status, headers=headers)


def status_for(code: str) -> int:
    """The HTTP status for an engine error code (500 for unexpected ones)."""
    return _STATUS_BY_CODE.get(code, 500)


_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "validation_error", 503: "unavailable"}


def _install_error_handlers(app: FastAPI) -> None:
    async def on_server_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServerError)
        return _error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    async def on_engine_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, EngineError)
        return _error_response(status_for(exc.code), exc.code, exc.message, exc.field)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return _error_response(exc.status_code, code, message,
                               headers=dict(exc.headers) if exc.headers else None)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ())]
        where = loc[0] if loc else ""
        field_name = ".".join(loc[1:]) or where or None
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        message = f"invalid {where or 'request'}"
        if field_name:
            message += f" field '{field_name}'"
        return _error_response(422, "validation_error", f"{message}: {first.get('msg')}{more}",
                               field_name)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

    app.add_exception_handler(ServerError, on_server_error)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


# ------------------------------------------------------------------ the app

_bearer = HTTPBearer(auto_error=False, description="the token from STATE_DIR/token")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def create_app(engine: Engine, *, token: str | None = None, state_dir: Path | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
               history: int = DEFAULT_HISTORY, preload: Sequence[str] = (),
               profile: Path | None = None, close_engine: bool = False) -> FastAPI:
    """The API over ``engine``.

    ``token``: the bearer token every route but ``/health`` requires; None reads
    (or makes, mode 0600) ``state_dir/token`` (``state_dir`` defaults to
    :func:`default_state_dir`). ``max_body_bytes`` bounds request bodies (413),
    ``max_queue`` the jobs waiting beyond what the devices run at once (503),
    ``history`` the finished jobs kept for ``GET /v1/jobs/{id}``. ``preload``
    models are warmed after start-up. ``profile`` is a benchmark report used by
    ``POST /v1/estimate`` (the route exists only when :mod:`engine.pricing` does).
    ``close_engine``: on shutdown, close the engine (queued jobs cancelled, running
    ones finished) before the app stops; :func:`serve` sets it.
    """
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be at least 1")
    if token is None:
        token, token_path, created = load_or_create_token(state_dir or default_state_dir())
        log.info("API token %s %s", "written to" if created else "read from", token_path)
    elif not token or any(c.isspace() for c in token):
        raise ValueError("the API token must be a non-empty string without whitespace")
    for name in preload:
        engine.registry.get(name)  # UnknownModelError before the server starts
    pricing = _pricing_module()
    priced: Any = None
    if pricing is not None and profile is not None:
        priced = pricing.load_profile(profile)
    service = ApiService(engine, max_queue=max_queue, history=history, preload=preload)
    expected = token.encode("utf-8")
    def authorize(credentials: BearerCredentials) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer" or \
                not secrets.compare_digest(credentials.credentials.encode("utf-8"), expected):
            raise ServerError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' "
                              "header is required (the token is in the server's state "
                              "directory, file 'token')",
                              headers={"WWW-Authenticate": "Bearer"})

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start_preload()
        yield
        if close_engine:
            await asyncio.to_thread(service.drain)
        else:
            service.close(wait=False)

    app = FastAPI(title="aitbc-engine local API", version=ENGINE_VERSION,
                  description="Run AITBC network jobs on this machine over HTTP.",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.token = token
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    auth = [Depends(authorize)]

    @app.get("/health", response_model=Health, tags=["meta"])
    def health() -> Health:
        """Liveness without auth: ``ok``, ``loading`` (preloading models) or ``error``."""
        return service.health()

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/hardware", dependencies=auth, tags=["engine"], responses=_errors())
    def get_hardware() -> dict[str, Any]:
        """The devices, drivers and versions (as ``aitbc-engine info --json``), and the
        fast path's captured decode steps with their warm-up seconds."""
        return {**hardware.discover().to_dict(),
                "fast_paths": [stats.to_dict() for stats in engine.fast_paths()]}

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, tags=["models"],
             responses=_errors())
    def list_models() -> ModelList:
        """The registry: each model's availability here and whether it is warm."""
        warm: dict[str, list[str]] = {}
        for loaded in engine.pool.warm():
            warm.setdefault(loaded.spec.name, []).append("+".join(d.id for d in loaded.devices))
        rows = []
        for spec in engine.registry:
            found = loading.availability(spec)
            rows.append(ModelView(
                name=spec.name, task=spec.task, architecture=spec.architecture,
                parameters=spec.parameters, context_length=spec.context_length,
                gpu_count=spec.gpu_count, min_gpu_memory_mb=spec.min_gpu_memory_mb,
                source=spec.source.describe(), **found.to_dict(),
                runnable=found.available or engine.weights == "random",
                warm=spec.name in warm, warm_on=warm.get(spec.name, [])))
        path = engine.registry.path
        return ModelList(registry=str(path) if path else None, weights=engine.weights,
                         models=rows)

    @app.post("/v1/models/{name}/load", dependencies=auth, response_model=LoadView,
              tags=["models"], responses=_errors(404, 409))
    def load_model(name: str) -> LoadView:
        """Warm a model (load it onto the first device that can hold it)."""
        engine.registry.get(name)
        was_warm = engine.pool.is_warm(name)
        loaded = engine.load(name)
        return LoadView(model=name, was_warm=was_warm, devices=[d.id for d in loaded.devices],
                        dtype=loaded.dtype_name, weights=loaded.weights,
                        weights_digest=loaded.weights_digest, memory_bytes=loaded.memory_bytes,
                        load_time_seconds=loaded.load_time_seconds)

    @app.delete("/v1/models/{name}", dependencies=auth, response_model=EvictView,
                tags=["models"], responses=_errors(404, 409))
    def evict_model(name: str) -> EvictView:
        """Evict a warm model; 409 while a job is using it."""
        engine.registry.get(name)
        evicted = engine.evict(name)
        if not evicted and engine.pool.is_warm(name):
            raise ServerError(409, "model_in_use", f"model {name!r} is running a job; evict it "
                              "once its jobs are done", field="name")
        return EvictView(model=name, evicted=evicted)

    job_body = {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [{"$ref": "#/components/schemas/Job"}, *_coordinator_payload_schemas()]}}}}

    @app.post("/v1/jobs", dependencies=auth, tags=["jobs"],
              responses={200: {"model": JobResult, "description": "the job's result "
                                                                  "(completed or failed)"},
                         202: {"model": JobAccepted, "description": "accepted (wait=false)"},
                         **_errors(404, 409, 503)},
              openapi_extra={"requestBody": job_body})
    async def post_job(request: Request, wait: bool = Query(
            True, description="answer with the result (true) or at once with 202 (false)")
    ) -> Response:
        """Run a job given as engine JSON or any coordinator payload shape."""
        body = await request.body()
        record = service.submit(body)
        if not wait:
            url = f"/v1/jobs/{record.job.job_id}"
            return JSONResponse(JobAccepted(job_id=record.job.job_id, state=record.state,
                                            url=url).model_dump(),
                                status_code=202, headers={"Location": url})
        assert record.waiter is not None
        result = await asyncio.shield(asyncio.wrap_future(record.waiter))
        return JSONResponse(result.to_dict())

    @app.get("/v1/jobs/{job_id}", dependencies=auth, response_model=JobView,
             response_model_exclude_none=True, tags=["jobs"], responses=_errors(404))
    def get_job(job_id: str) -> JobView:
        """State and (once finished) result of an accepted job."""
        return service.record(job_id).view()

    @app.delete("/v1/jobs/{job_id}", dependencies=auth, response_model=CancelView,
                status_code=202, tags=["jobs"], responses=_errors(404, 409))
    def cancel_job(job_id: str) -> CancelView:
        """Cancel a job: a queued one is dropped, a running one stops at its next token."""
        return service.cancel(job_id)

    if pricing is not None:
        _add_estimate_route(app, auth, pricing, priced, profile)

    @app.get("/metrics", dependencies=auth, tags=["meta"],
             responses={200: {"content": {"text/plain": {}}}, **_errors()})
    def metrics() -> Response:
        """Prometheus metrics: jobs by state, durations, GPU seconds, energy, tokens, models."""
        return Response(generate_latest(service.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        job_schema = Job.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(job_schema.pop("$defs", {}))
        components["Job"] = job_schema
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    return app


def _add_estimate_route(app: FastAPI, auth: list[Any], pricing: ModuleType, priced: Any,
                        profile: Path | None) -> None:
    estimate_model = getattr(pricing, "Estimate", None)
    view: Any = dict[str, Any]
    if isinstance(estimate_model, type) and issubclass(estimate_model, BaseModel):
        view = create_model("EstimateView", profile=(str, ...), estimate=(estimate_model, ...))

    @app.post("/v1/estimate", dependencies=auth, tags=["pricing"], response_model=view,
              responses=_errors(409))
    def estimate(request: EstimateRequest) -> Any:
        """Estimated time, GPU seconds and price of a job shape, from the stored profile."""
        if priced is None:
            raise ServerError(409, "no_profile", "no benchmark profile is loaded; start the "
                              "server with --profile DIR/report.json (from aitbc-engine bench)")
        profiled = getattr(priced, "model", None)
        if request.model is not None and profiled is not None and request.model != profiled:
            raise ServerError(422, "validation_error", f"the profile is for model {profiled!r}, "
                              f"not {request.model!r}", field="model")
        result = pricing.estimate(priced, prompt_tokens=request.prompt_tokens,
                                  max_tokens=request.max_tokens,
                                  price_per_hour=request.price_per_hour,
                                  gpu_count=request.gpu_count)
        return {"profile": str(profile), "estimate": result.model_dump(mode="json")}


# ------------------------------------------------------------------ serving

@dataclass
class ServeOptions:
    """How :func:`serve` runs the app."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    state_dir: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    history: int = DEFAULT_HISTORY
    preload: list[str] = field(default_factory=list)
    profile: Path | None = None
    log_level: str = "info"
    shutdown_timeout: float | None = None


def build_server(engine: Engine, options: ServeOptions) -> Any:
    """A ``uvicorn.Server`` for the app over ``engine`` (not started)."""
    import uvicorn

    if not is_loopback(options.host):
        log.warning("binding to %s: the API is reachable from other machines; anyone with the "
                    "token can run jobs here", options.host)
    app = create_app(engine, token=options.token, state_dir=options.state_dir,
                     max_body_bytes=options.max_body_bytes, max_queue=options.max_queue,
                     history=options.history, preload=options.preload, profile=options.profile,
                     close_engine=True)
    timeout = None if options.shutdown_timeout is None else math.ceil(options.shutdown_timeout)
    config = uvicorn.Config(app, host=options.host, port=options.port,
                            log_level=options.log_level, timeout_graceful_shutdown=timeout,
                            access_log=options.log_level in ("debug", "trace"))
    return uvicorn.Server(config)


def serve(engine: Engine, options: ServeOptions | None = None,
          on_started: Callable[[Any], None] | None = None) -> None:
    """Serve the API until SIGINT/SIGTERM, then finish running jobs and return.

    On shutdown uvicorn stops taking connections and lets requests in progress
    (``wait=true`` jobs) finish (for at most ``shutdown_timeout`` seconds when
    set); then, in the app's shutdown, the engine cancels jobs still queued and
    waits for the running ones. ``on_started`` is called with the server once
    it listens.
    """
    options = options or ServeOptions()
    server = build_server(engine, options)
    if on_started is not None:
        _notify_when_started(server, on_started)
    server.run()


def _notify_when_started(server: Any, callback: Callable[[Any], None]) -> None:
    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            callback(server)

    threading.Thread(target=watch, name="api-started", daemon=True).start()


@contextlib.contextmanager
def running_server(app: FastAPI, *, host: str = DEFAULT_HOST,
                   log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port; yields the base URL.

    For tests and the load benchmark: the socket is bound before the server
    starts, so there is no race for the port.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="api-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_PORT",
    "ApiService",
    "JobRecord",
    "JobStore",
    "ServeOptions",
    "ServerError",
    "TokenFileError",
    "build_server",
    "create_app",
    "default_state_dir",
    "is_loopback",
    "load_or_create_token",
    "mask_secret",
    "running_server",
    "serve",
    "status_for",
]
