"""Accepted jobs: admission with a queue cap and Retry-After, records, and their outcome.

The local API's job lifecycle, as a library that knows nothing of HTTP (the
mining agent can take jobs through it too):

- :meth:`JobQueue.submit` admits a job: it parses the payload, checks the
  model, refuses a job id already taken (:class:`JobExistsError`) and, once
  ``capacity + max_queue`` jobs are in flight, refuses with
  :class:`QueueFullError` carrying ``retry_after`` seconds (the jobs ahead
  times the mean job time over the capacity). Errors found before the job
  would run (unknown model, context length, device) are raised, not queued.
- Each accepted job is a :class:`JobRecord` in a :class:`JobStore` (every
  unfinished job and the latest ``history`` finished ones).
- No thread waits for a job: the engine's handle calls back when the job is
  done; the callback files the result and completes ``record.finished``,
  which ``await record.outcome()`` waits on from an event loop.
- :class:`JobEvents` listeners (the API's Prometheus metrics) hear of every
  refusal and every finished job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from engine.errors import EngineError
from engine.jobs import Job, JobResult
from engine.payloads import parse_payload

if TYPE_CHECKING:
    from engine.executor import Engine, JobHandle
    from engine.tasks.generation import TokenCallback

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 64
DEFAULT_HISTORY = 1000
MAX_RETRY_AFTER_SECONDS = 60
SHUTDOWN_RETRY_AFTER_SECONDS = 5

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]

# Failures the engine reports before a job runs: the job is refused, not accepted.
PRE_RUN_CODES = frozenset({"invalid_job", "unsupported_job_type", "context_length_exceeded",
                           "unknown_model", "invalid_device"})


class JobQueueError(EngineError):
    """A job refused, or a job id that cannot be acted on."""

    code = "job_queue_error"


class JobExistsError(JobQueueError):
    """A job with this id was already accepted."""

    code = "job_exists"


class UnknownJobError(JobQueueError):
    """No job with this id (never accepted, or dropped from the history)."""

    code = "unknown_job"


class JobFinishedError(JobQueueError):
    """The job has finished: there is nothing to cancel."""

    code = "job_finished"


class RetryLaterError(JobQueueError):
    """Refused for now; ``retry_after`` seconds is when trying again may work."""

    def __init__(self, message: str, *, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(RetryLaterError):
    """As many jobs are in flight as the devices run plus the queue holds."""

    code = "queue_full"


class NotAcceptingError(RetryLaterError):
    """The engine is closing and takes no more jobs."""

    code = "shutting_down"


class JobEvents(Protocol):
    """What a listener of a :class:`JobQueue` hears."""

    def rejected(self, code: str) -> None:
        """A job was refused before it was queued, with this error code."""

    def finished(self, result: JobResult) -> None:
        """An accepted job finished (completed, failed or cancelled)."""


def _cancelled(result: JobResult) -> bool:
    return result.error is not None and result.error.code == "cancelled"


@dataclass
class JobRecord:
    """An accepted job, its handle in the engine and, once finished, its result."""

    job: Job
    handle: JobHandle
    accepted_at: float
    result: JobResult | None = None
    finished_at: float | None = None
    finished: Future[JobResult] = field(default_factory=Future)
    """Completed with the result once the record is filed as finished."""

    @property
    def state(self) -> JobState:
        """Where the job is: queued, running, completed, failed or cancelled."""
        result = self.result
        if result is None and self.handle.done():
            result = self.handle.result()
        if result is not None:
            return "cancelled" if _cancelled(result) else result.status
        return "running" if self.handle.running() else "queued"

    async def outcome(self) -> JobResult:
        """The job's result, awaited without holding a thread (shielded from cancellation)."""
        return await asyncio.shield(asyncio.wrap_future(self.finished))


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


class JobQueue:
    """Admission into an :class:`~engine.executor.Engine`, and the records of accepted jobs."""

    def __init__(self, engine: Engine, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 history: int = DEFAULT_HISTORY):
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        self.engine = engine
        self.max_queue = max_queue
        self.store = JobStore(history)
        self.listeners: list[JobEvents] = []
        self.capacity = max(1, len(engine.devices) * engine.max_concurrent * engine.batch_size)
        self.limit = self.capacity + max_queue
        self._lock = threading.Lock()
        self._in_flight = 0
        self._mean_seconds = 1.0

    @property
    def in_flight(self) -> int:
        """Accepted jobs whose result is not filed yet."""
        with self._lock:
            return self._in_flight

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead over the device capacity."""
        ahead = max(1, self._in_flight - self.capacity + 1)
        return max(1, min(MAX_RETRY_AFTER_SECONDS,
                          math.ceil(self._mean_seconds * ahead / self.capacity)))

    def submit(self, payload: Job | Mapping[str, Any] | str | bytes, *,
               on_token: TokenCallback | None = None) -> JobRecord:
        """Admit a job (a :class:`Job` or any payload shape): check it, queue it, record it.

        ``on_token`` hears each generated token as it is decoded (see
        :meth:`engine.executor.Engine.submit`)."""
        try:
            job = payload if isinstance(payload, Job) else parse_payload(payload)
            self.engine.registry.get(job.model)
        except EngineError as exc:
            self._rejected(exc.code)
            raise
        with self._lock:
            if job.job_id in self.store:
                self._rejected(JobExistsError.code)
                raise JobExistsError(f"a job with id {job.job_id!r} was already accepted; give "
                                     "a new job_id or leave it out", field="job_id")
            if self._in_flight >= self.limit:
                self._rejected(QueueFullError.code)
                wait = self.retry_after()
                raise QueueFullError(
                    f"the engine has {self._in_flight} job(s) in flight, its limit "
                    f"({self.capacity} running + {self.max_queue} queued); retry in {wait} s",
                    retry_after=wait)
            try:
                handle = self.engine.submit(job, on_token=on_token)
            except RuntimeError as exc:
                raise NotAcceptingError(f"the engine is not taking jobs: {exc}",
                                        retry_after=SHUTDOWN_RETRY_AFTER_SECONDS) from exc
            if handle.done():
                early = handle.result()
                if early.error is not None and early.error.code in PRE_RUN_CODES:
                    self._rejected(early.error.code)
                    raise EngineError(early.error.message, field=early.error.field,
                                      code=early.error.code)
            record = JobRecord(job=job, handle=handle, accepted_at=time.time())
            self.store.add(record)
            self._in_flight += 1
        # Outside the lock: a handle already done calls back at once, on this thread.
        handle.add_done_callback(lambda _: self._file(record))
        return record

    def record(self, job_id: str) -> JobRecord:
        """The record of ``job_id``, or :class:`UnknownJobError`."""
        record = self.store.get(job_id)
        if record is None:
            raise UnknownJobError(f"no job {job_id!r} here (never accepted, or older than the "
                                  f"last {self.store.history} finished jobs)", field="job_id")
        return record

    def cancel(self, job_id: str) -> Literal["cancelled", "cancelling"]:
        """Cancel a queued job (dropped at once) or a running one (stops at its next token)."""
        record = self.record(job_id)
        if record.result is not None or not record.handle.cancel():
            raise JobFinishedError(f"job {job_id!r} has already finished ({record.state}); "
                                   "there is nothing to cancel", field="job_id")
        return "cancelled" if record.handle.done() else "cancelling"

    def drain(self) -> None:
        """Shut down: the engine cancels queued jobs and finishes running ones."""
        pending = self.store.active()
        if pending:
            log.warning("shutting down: waiting for %d running job(s), cancelling %d queued",
                        sum(r.state == "running" for r in pending),
                        sum(r.state == "queued" for r in pending))
        self.engine.close(cancel_pending=True)
        for record in pending:
            log.warning("shutdown: job %s %s", record.job.job_id, record.state)

    # -- callbacks
    def _file(self, record: JobRecord) -> None:
        """The job is done (called on the thread that finished it): file its result."""
        try:
            result = record.handle.result(0)
        except BaseException as exc:  # never leave a slot taken
            log.exception("job %s ended without a result", record.job.job_id)
            with self._lock:
                self._in_flight -= 1
            record.finished.set_exception(exc)
            return
        record.finished_at = time.time()
        record.result = result
        for listener in self.listeners:
            self._tell(listener.finished, result)
        with self._lock:
            self._in_flight -= 1
            if result.ok and result.metrics is not None:
                took = result.metrics.execution_time_seconds + result.metrics.load_time_seconds
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * took
        self.store.finish(record)
        record.finished.set_result(result)

    def _rejected(self, code: str) -> None:
        for listener in self.listeners:
            self._tell(listener.rejected, code)

    @staticmethod
    def _tell(hear: Callable[[Any], None], what: object) -> None:
        try:
            hear(what)
        except Exception:  # a listener's failure is not the job's
            log.exception("a job queue listener failed")


__all__ = [
    "DEFAULT_HISTORY",
    "DEFAULT_MAX_QUEUE",
    "MAX_RETRY_AFTER_SECONDS",
    "PRE_RUN_CODES",
    "JobEvents",
    "JobExistsError",
    "JobFinishedError",
    "JobQueue",
    "JobQueueError",
    "JobRecord",
    "JobState",
    "JobStore",
    "NotAcceptingError",
    "QueueFullError",
    "RetryLaterError",
    "UnknownJobError",
]
