"""The mining agent: register, heartbeat, take jobs, run them through the Engine, submit.

Order of work on start: establish the session (register, or for ``doc`` reuse
the saved identity), submit whatever the outbox holds, deal with jobs that
were accepted by a process that died (re-run, or drop with a log line; see
:meth:`Coordinator.still_assigned` and each dialect's docstring), then loop.

Every finished job is journalled before it is submitted and leaves the
journal only on the coordinator's acknowledgement. A submission is marked in
the journal before it is sent, so after a crash a ``409`` on the resubmission
is read as the coordinator already holding our own result.

Errors: ``401`` stops the agent (:class:`UnauthorizedError` propagates, never a
loop); a miner the coordinator forgot is registered again; ``409`` on accept
skips; a refused body (400/422) is kept in the journal as ``rejected``; any
other coordinator error is logged and retried later with backoff.

The agent knows nothing of torch: it is handed an Engine (anything with
``submit(job) -> handle``).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, Protocol

from engine.coordinator.base import AssignedJob, Coordinator, MinerUnknownError, build_job
from engine.coordinator.capabilities import Capabilities
from engine.coordinator.errors import (
    BadRequestError,
    ConflictError,
    CoordinatorError,
    NotFoundError,
    RateLimitedError,
    UnauthorizedError,
    ValidationFailedError,
    redact,
)
from engine.coordinator.outbox import Outbox
from engine.jobs import Job, JobResult

log = logging.getLogger(__name__)


class JobHandleLike(Protocol):
    """What the agent needs of :class:`engine.executor.JobHandle`."""

    def result(self, timeout: float | None = None) -> JobResult: ...
    def done(self) -> bool: ...
    def cancel(self) -> bool: ...


class EngineLike(Protocol):
    """What the agent needs of :class:`engine.executor.Engine`."""

    def submit(self, job: Job) -> Any: ...


@dataclass(frozen=True)
class AgentConfig:
    """How the agent behaves; every interval is in seconds."""

    max_concurrent: int = 1
    max_jobs: int | None = None  # stop taking jobs after this many
    once: bool = False  # take at most one job, then exit
    heartbeat_interval: float = 15.0
    poll_wait_seconds: float = 5.0  # long-poll wait where the dialect has one
    idle_seconds: float = 2.0  # pause after an empty poll
    error_backoff_seconds: float = 1.0  # first pause after a coordinator error (doubles, capped)
    max_error_backoff_seconds: float = 30.0
    retry_pending_seconds: float = 5.0  # how often unacknowledged results are resent
    shutdown_timeout: float = 60.0  # how long running jobs may finish on a stop
    deregister_on_exit: bool = True


@dataclass
class AgentReport:
    """What one run of the agent did."""

    jobs_taken: int = 0
    completed: int = 0
    failed: int = 0
    results_submitted: int = 0
    failures_reported: int = 0
    duplicates_recognised: int = 0
    recovered_submitted: int = 0
    rerun: int = 0
    dropped: int = 0
    rejected: int = 0
    skipped: int = 0
    reregistered: int = 0
    pending_left: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = {k: v for k, v in self.__dict__.items() if k != "errors"}
        out["errors"] = dict(self.errors)
        return out


@dataclass
class _Running:
    job: Job
    handle: Any
    started: float


class Agent:
    """One miner at one coordinator. ``run()`` blocks until done or stopped."""

    def __init__(self, coordinator: Coordinator, engine: EngineLike, outbox: Outbox,
                 capabilities: Capabilities, config: AgentConfig | None = None) -> None:
        self.coordinator = coordinator
        self.engine = engine
        self.outbox = outbox
        self.capabilities = capabilities
        self.config = config or AgentConfig(max_concurrent=capabilities.max_concurrent)
        self.report = AgentReport()
        self._stop = threading.Event()
        self._hard_stop = threading.Event()
        self._need_register = threading.Event()
        self._fatal: BaseException | None = None
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._hb_thread: threading.Thread | None = None
        self._hb_stop = threading.Event()
        self._error_streak = 0
        self._taking = True

    # ------------------------------------------------------------ control
    def stop(self) -> None:
        """Stop taking jobs; running ones finish (up to ``shutdown_timeout``) and are submitted."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop gracefully; a second one cancels the running jobs."""
        def handler(signum: int, frame: FrameType | None) -> None:
            if self._stop.is_set():
                log.warning("second %s: cancelling running jobs", signal.Signals(signum).name)
                self._hard_stop.set()
            else:
                log.warning("%s: finishing running jobs, then stopping",
                            signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    @property
    def inflight(self) -> int:
        """Jobs running now."""
        with self._lock:
            return len(self._running)

    @property
    def scope(self) -> str:
        """The outbox scope of this agent's coordinator."""
        return self.coordinator.scope()

    # ------------------------------------------------------------ main
    def run(self) -> AgentReport:
        """Register, drain the outbox, recover, mine until done or stopped; returns the report."""
        try:
            self._establish()
            self._start_heartbeats()
            self._drain_outbox()
            self._recover_in_flight()
            self._loop()
        finally:
            self._shutdown()
        if self._fatal is not None:
            raise self._fatal
        return self.report

    def _establish(self) -> None:
        delay = self.config.error_backoff_seconds
        while True:
            try:
                self.coordinator.register(self.capabilities)
                self._need_register.clear()
                self._save_identity()
                return
            except UnauthorizedError:
                raise
            except CoordinatorError as exc:
                self.report.errors[type(exc).__name__] += 1
                log.warning("cannot register at %s: %s; retrying in %.1fs",
                            self.coordinator.base_url, exc.message, delay)
                if self._stop.wait(delay):
                    raise
                delay = min(self.config.max_error_backoff_seconds, delay * 2)

    def _save_identity(self) -> None:
        ident = self.coordinator.identity
        self.outbox.save_identity(self.coordinator.scope(), {
            "miner_id": ident.miner_id, "api_key": ident.api_key, "extra": ident.extra})

    def _reregister(self) -> None:
        log.warning("the coordinator no longer knows miner %s; registering again",
                    self.coordinator.miner_id)
        self.report.reregistered += 1
        self._establish()
        self._heartbeat_now()  # eligible for jobs again at once

    def _loop(self) -> None:
        limit = 1 if self.config.once else self.config.max_jobs
        last_retry = time.monotonic()
        while not self._fatal:
            if self._stop.is_set():
                break
            if self._need_register.is_set():
                try:
                    self._reregister()
                except UnauthorizedError:
                    raise
                except CoordinatorError:
                    break  # stop requested while the coordinator was unreachable
            self._collect()
            if time.monotonic() - last_retry >= self.config.retry_pending_seconds:
                self._drain_outbox(quiet=True)
                last_retry = time.monotonic()
            if limit is not None and self.report.jobs_taken >= limit:
                self._taking = False
            if not self._taking:
                if self.inflight == 0:
                    break
                time.sleep(0.02)
                continue
            if self.inflight >= self.config.max_concurrent:
                time.sleep(0.02)
                continue
            wait = self.config.poll_wait_seconds if self.inflight == 0 else 0.0
            try:
                assigned = self.coordinator.next_job(wait_seconds=wait)
            except UnauthorizedError:
                raise
            except MinerUnknownError:
                self._need_register.set()
                continue
            except CoordinatorError as exc:
                self._coordinator_trouble("take a job", exc)
                continue
            self._error_streak = 0
            if assigned is None:
                if self.config.once:
                    log.info("no job available at %s", self.coordinator.base_url)
                    self._taking = False
                    continue
                self._idle()
                continue
            self._start(assigned)

    def _idle(self) -> None:
        deadline = time.monotonic() + self.config.idle_seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            if self.inflight:
                self._collect()
            self._stop.wait(min(0.05, max(0.0, deadline - time.monotonic())))

    def _coordinator_trouble(self, what: str, exc: CoordinatorError) -> None:
        self.report.errors[type(exc).__name__] += 1
        self._error_streak += 1
        delay = min(self.config.max_error_backoff_seconds,
                    self.config.error_backoff_seconds * 2 ** (self._error_streak - 1))
        if isinstance(exc, RateLimitedError) and exc.retry_after:
            delay = max(delay, min(exc.retry_after, self.config.max_error_backoff_seconds))
        log.warning("could not %s: %s; trying again in %.1fs", what, exc.message, delay)
        end = time.monotonic() + delay
        while time.monotonic() < end and not self._stop.is_set():
            self._collect()
            self._stop.wait(min(0.05, max(0.0, end - time.monotonic())))

    # ------------------------------------------------------------ jobs
    def _start(self, assigned: AssignedJob, *, journal: bool = True) -> None:
        scope = self.scope
        ack = self.outbox.ack_of(scope, assigned.job_id)
        if ack is not None and not ack["duplicate"]:
            log.warning("job %s was already acknowledged by %s; not running it again",
                        assigned.job_id, self.coordinator.base_url)
            self.report.skipped += 1
            return
        if ack is not None:
            # We read a 409 as the coordinator holding our own earlier result; assigning the
            # job again shows it does not, so it is run again.
            log.warning("job %s is assigned again after a 409 we took for our own earlier "
                        "result; running it again", assigned.job_id)
            self.outbox.forget_ack(scope, assigned.job_id)
        if journal:
            self.outbox.accepted(scope, assigned.job_id, assigned.payload)
        self.report.jobs_taken += 1
        if assigned.job is None:
            err = assigned.error
            code = err.code if err is not None else "invalid_job"
            message = err.message if err is not None else "the job could not be read"
            log.warning("job %s cannot run here: %s: %s", assigned.job_id, code, message)
            self.report.failed += 1
            body = self.coordinator.failure_body(assigned.job_id, code, message)
            self.outbox.finished(scope, assigned.job_id, "failure", body)
            self._submit(assigned.job_id, "failure", body, prior_attempts=0)
            return
        job = assigned.job
        log.info("job %s model=%s: started", job.job_id, job.model)
        handle = self.engine.submit(job)
        with self._lock:
            self._running[job.job_id] = _Running(job, handle, time.monotonic())

    def _collect(self, *, timeout: float = 0.0) -> None:
        with self._lock:
            done = [(jid, r) for jid, r in self._running.items() if r.handle.done()]
        for jid, r in done:
            result = r.handle.result(timeout)
            with self._lock:
                self._running.pop(jid, None)
            self._finish(r.job, result)

    def _finish(self, job: Job, result: JobResult) -> None:
        scope = self.scope
        if result.ok:
            m = result.metrics
            log.info("job %s model=%s hash=%s exec=%.3fs gpu=%.3fs", job.job_id, result.model,
                     result.result_hash, m.execution_time_seconds if m else 0.0,
                     m.gpu_time_seconds if m else 0.0)
            self.report.completed += 1
            kind: Literal["result", "failure"] = "result"
            body = self.coordinator.result_body(result)
        else:
            err = result.error
            code = err.code if err else "execution_error"
            message = err.message if err else "the job failed"
            log.warning("job %s model=%s failed: %s: %s", job.job_id, job.model, code, message)
            self.report.failed += 1
            kind = "failure"
            body = self.coordinator.failure_body(job.job_id, code, message, result)
        self.outbox.finished(scope, job.job_id, kind, body, result.to_dict())
        self._submit(job.job_id, kind, body, prior_attempts=0)

    def _submit(self, job_id: str, kind: Literal["result", "failure"], body: dict[str, Any],
                *, prior_attempts: int) -> bool:
        """Send one journalled body; True when it left the journal's pending set."""
        scope = self.scope
        if self.outbox.was_acked(scope, job_id):
            log.warning("job %s: already acknowledged; not sending it again", job_id)
            return True
        self.outbox.attempted(scope, job_id, "sending")
        try:
            if kind == "result":
                ack = self.coordinator.submit_result(job_id, body)
            else:
                ack = self.coordinator.report_failure(job_id, body)
                if self.coordinator.heartbeat_after_failure:
                    self._heartbeat_now()
        except UnauthorizedError as exc:
            self._fatal = exc
            self.outbox.attempted(scope, job_id, exc.message)
            return False
        except MinerUnknownError as exc:
            self._need_register.set()
            self.outbox.attempted(scope, job_id, exc.message)
            return False
        except ConflictError as exc:
            if exc.uncertain or prior_attempts > 0:
                log.info("job %s: %s already holds our %s from an earlier attempt (%s)",
                         job_id, self.coordinator.base_url, kind, exc.message)
                self.outbox.acknowledge(scope, job_id, duplicate=True)
                self.report.duplicates_recognised += 1
                return True
            log.warning("job %s: dropped, the coordinator no longer holds it for us: %s",
                        job_id, exc.message)
            self.outbox.drop(scope, job_id, exc.message)
            self.report.dropped += 1
            return True
        except (ValidationFailedError, BadRequestError) as exc:
            log.error("job %s: the coordinator refused our %s body: %s; kept in the journal %s "
                      "as 'rejected' for inspection", job_id, kind, exc.message, self.outbox.path)
            self.outbox.reject(scope, job_id, exc.message)
            self.report.rejected += 1
            return True
        except NotFoundError as exc:
            log.warning("job %s: dropped, the coordinator does not know it: %s", job_id,
                        exc.message)
            self.outbox.drop(scope, job_id, exc.message)
            self.report.dropped += 1
            return True
        except CoordinatorError as exc:
            self.report.errors[type(exc).__name__] += 1
            log.warning("job %s: %s not delivered yet (%s); kept in the journal, will resend",
                        job_id, kind, exc.message)
            self.outbox.attempted(scope, job_id, exc.message)
            return False
        if not ack.reported:
            self.outbox.drop(scope, job_id, "the coordinator has no way to report a failure; "
                                            "the job is left to expire")
            self.report.dropped += 1
            return True
        self.outbox.acknowledge(scope, job_id, receipt=ack.receipt, duplicate=ack.duplicate)
        if ack.duplicate:
            self.report.duplicates_recognised += 1
        if kind == "result":
            self.report.results_submitted += 1
        else:
            self.report.failures_reported += 1
        return True

    # ------------------------------------------------------------ journal replay
    def _drain_outbox(self, *, quiet: bool = False) -> None:
        pending = self.outbox.pending(self.scope)
        if pending and not quiet:
            log.info("outbox: %d journalled result(s) to submit first", len(pending))
        for entry in pending:
            if self._fatal is not None or entry.body is None:
                continue
            if entry.job_id in self._running:
                continue
            kind: Literal["result", "failure"] = "result" if entry.state == "result" \
                else "failure"
            # The "sending" mark of the previous run counts: the earlier attempt may have landed.
            if self._submit(entry.job_id, kind, entry.body, prior_attempts=entry.attempts) \
                    and not quiet:
                self.report.recovered_submitted += 1
        if self._fatal is not None:
            raise self._fatal

    def _recover_in_flight(self) -> None:
        entries = self.outbox.in_flight(self.scope)
        if not entries:
            return
        ids = [e.job_id for e in entries]
        try:
            verdict = self.coordinator.still_assigned(ids)
        except UnauthorizedError:
            raise
        except CoordinatorError as exc:
            log.warning("cannot ask %s which jobs are still ours (%s); re-running %d",
                        self.coordinator.base_url, exc.message, len(ids))
            verdict = None
        for entry in entries:
            if verdict is not None and not verdict.get(entry.job_id, True):
                log.warning("job %s was accepted by a process that died; %s shows it no longer "
                            "assigned to us, so it is dropped", entry.job_id,
                            self.coordinator.base_url)
                self.outbox.drop(self.scope, entry.job_id, "not assigned any more after restart")
                self.report.dropped += 1
                continue
            log.warning("job %s was accepted by a process that died before finishing; "
                        "running it again", entry.job_id)
            self.report.rerun += 1
            taken = self.report.jobs_taken
            self._start(build_job(entry.job_id, entry.payload), journal=False)
            self.report.jobs_taken = taken  # a re-run is not a newly taken job

    # ------------------------------------------------------------ heartbeats
    def _heartbeat_now(self) -> None:
        try:
            self.coordinator.heartbeat(self.inflight)
        except UnauthorizedError as exc:
            self._fatal = exc
            self._stop.set()
        except MinerUnknownError:
            self._need_register.set()
        except CoordinatorError as exc:
            log.info("heartbeat failed: %s", exc.message)

    def _start_heartbeats(self) -> None:
        def beat() -> None:
            while not self._hb_stop.wait(self.config.heartbeat_interval):
                self._heartbeat_now()

        self._heartbeat_now()
        self._hb_thread = threading.Thread(target=beat, name="aitbc-heartbeat", daemon=True)
        self._hb_thread.start()

    # ------------------------------------------------------------ shutdown
    def _shutdown(self) -> None:
        self._taking = False
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.inflight and self._fatal is None:
            if self._hard_stop.is_set() or time.monotonic() > deadline:
                with self._lock:
                    running = list(self._running.values())
                for r in running:
                    log.warning("job %s: cancelled at shutdown", r.job.job_id)
                    r.handle.cancel()
                deadline = float("inf")
            self._collect()
            time.sleep(0.02)
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
        if self._fatal is None:
            try:
                self._drain_outbox(quiet=True)
            except CoordinatorError as exc:
                self._fatal = self._fatal or exc
        self.report.pending_left = len(self.outbox.pending(self.scope))
        if self._fatal is None and self.config.deregister_on_exit \
                and self.coordinator.miner_id is not None:
            try:
                self.coordinator.heartbeat(0)
                self.coordinator.deregister()
            except CoordinatorError as exc:
                log.info("could not deregister: %s", exc.message)
        log.info("agent for %s (miner %s, key %s) stopped: %s", self.coordinator.base_url,
                 self.coordinator.miner_id, redact(self.coordinator.identity.api_key),
                 self.report.to_dict())
