"""The mining agent: register, heartbeat, take jobs, run them through the Engine, submit.

Order of work on start: establish the session (register, or for ``doc`` reuse
the saved identity), submit whatever the outbox holds, deal with jobs that
were accepted by a process that died (re-run, or drop with a log line; see
:meth:`Coordinator.still_assigned` and each dialect's docstring), run the jobs
the coordinator shows assigned to us that the journal never saw
(:meth:`Coordinator.assigned_jobs`: a kill between the poll's reply and the
journal), then loop.

Exactly once: a job is journalled the moment its bytes arrive (the dialect's
``on_arrival`` hook, before the payload is even read), every finished job is
journalled before it is submitted, and leaves the journal only on the
coordinator's acknowledgement. A submission is marked in the journal before it
is sent. A result whose delivery is uncertain (a timeout or a cut connection
after sending, a crash while sending) is never resent blind: where the
coordinator stores and pays every copy (``aitbc``), the agent first asks it
(:meth:`Coordinator.delivery`, after ``delivery_settle_seconds`` so that a
request the coordinator is still working on can land) and resends only on "not
delivered"; where it cannot be asked, the body stays in the journal and the
agent asks again later.
Where the coordinator refuses a copy (``doc``), a ``409`` on the resubmission
is read as it already holding our own result.

Stopping: SIGINT/SIGTERM end every wait (idle, backoff, ``Retry-After``)
within a fraction of a second; no poll is sent after a stop is requested; a
running job finishes and is submitted (bounded by ``shutdown_timeout``; a job
still running then is left in the journal and run again on the next start);
then the miner says goodbye (a heartbeat of 0 and deregistration). After a
``401`` nothing more is sent.

Idle back-off: after each empty poll the pause doubles from ``idle_seconds``
(2 s) up to ``max_idle_seconds`` (30 s), with ±20 % jitter so that miners
behind one address spread out; one job brings it back to 2 s.

Errors: ``401`` stops the agent (:class:`UnauthorizedError` propagates, never a
loop); a miner the coordinator forgot is registered again; ``409`` on accept
skips; a refused body (400/422) is kept in the journal as ``rejected``; any
other coordinator error is logged and retried later with backoff.

The agent knows nothing of torch: it is handed an Engine (anything with
``submit(job) -> handle``).
"""

from __future__ import annotations

import logging
import random
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
    DeliveryUncertainError,
    DialectMismatchError,
    JournalUnavailableError,
    NotFoundError,
    RateLimitedError,
    RequestAbortedError,
    UnauthorizedError,
    ValidationFailedError,
    redact,
)
from engine.coordinator.outbox import Outbox
from engine.coordinator.receipts import ReceiptVerifier
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
    idle_seconds: float = 2.0  # pause after the first empty poll
    max_idle_seconds: float = 30.0  # the pause doubles per empty poll up to this
    idle_jitter: float = 0.2  # each pause is scaled by a random factor in 1 ± this
    error_backoff_seconds: float = 1.0  # first pause after a coordinator error (doubles, capped)
    max_error_backoff_seconds: float = 30.0
    retry_pending_seconds: float = 5.0  # how often unacknowledged results are resent
    # After an attempt whose delivery is uncertain, how long to leave the coordinator to
    # finish a request it may still be working on before asking whether it arrived.
    delivery_settle_seconds: float = 30.0
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
    delivery_unconfirmed: int = 0  # resends held back because delivery could not be checked
    recovered_assigned: int = 0  # jobs the coordinator showed ours that the journal never saw
    left_for_next_start: int = 0  # jobs still running at the shutdown deadline
    idle_polls: int = 0
    receipts_verified: int = 0
    receipts_invalid: int = 0
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
                 capabilities: Capabilities, config: AgentConfig | None = None, *,
                 receipts: ReceiptVerifier | None = None) -> None:
        """``receipts`` checks each receipt's signature against the coordinator's public key
        (without one, signed receipts are kept as ``no_key``, unsigned ones as ``unsigned``)."""
        self.coordinator = coordinator
        self.receipts = receipts or ReceiptVerifier()
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
        self._idle_streak = 0
        self._uncertain_at: dict[str, float] = {}  # job id -> when its delivery became uncertain
        self._rng = random.Random()
        self._taking = True
        coordinator.client.abort = self._stop  # every wait inside a call ends on stop

    # ------------------------------------------------------------ control
    def stop(self) -> None:
        """Stop taking jobs; running ones finish (up to ``shutdown_timeout``) and are submitted."""
        self._begin_stop()

    def _begin_stop(self, *, hard: bool = False) -> None:
        """Stop; a journal write waiting on a full disk gets ``shutdown_timeout`` (0 if hard)."""
        if hard:
            self._hard_stop.set()
            self.outbox.stop_retrying()
        elif not self._stop.is_set():
            timer = threading.Timer(self.config.shutdown_timeout, self.outbox.stop_retrying)
            timer.daemon = True
            timer.start()
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop gracefully; a second one cancels the running jobs."""
        def handler(signum: int, frame: FrameType | None) -> None:
            if self._stop.is_set():
                log.warning("second %s: cancelling running jobs", signal.Signals(signum).name)
                self._begin_stop(hard=True)
            else:
                log.warning("%s: finishing running jobs, then stopping",
                            signal.Signals(signum).name)
                self._begin_stop()

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
            self._recover_assigned()
            self._loop()
        except UnauthorizedError as exc:
            self._fatal = exc  # nothing more is sent with a rejected key
        except RequestAbortedError:
            pass  # a stop ended a wait inside a call
        except JournalUnavailableError as exc:
            log.error("%s", exc.message)  # a stop ended a wait for the disk
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
            except (UnauthorizedError, DialectMismatchError):
                raise  # never retried: the key or the dialect must change
            except CoordinatorError as exc:
                self.report.errors[type(exc).__name__] += 1
                log.warning("cannot register at %s: %s; retrying in %.1fs",
                            self.coordinator.base_url, exc.message, delay)
                if self._stop.wait(delay):
                    raise
                delay = min(self.config.max_error_backoff_seconds, delay * 2)

    def _save_identity(self) -> None:
        ident = self.coordinator.identity
        if not self.coordinator.issues_keys:
            # The operator's key comes from the environment or a flag each start: the journal
            # keeps only the miner id (and no session token either).
            self.outbox.save_identity(self.coordinator.scope(), {"miner_id": ident.miner_id})
            return
        self.outbox.save_identity(self.coordinator.scope(), {
            "miner_id": ident.miner_id, "api_key": ident.api_key, "extra": ident.extra})

    def _reregister(self) -> None:
        log.warning("the coordinator no longer knows miner %s; registering again",
                    self.coordinator.miner_id)
        self.report.reregistered += 1
        self._establish()
        self._heartbeat_now()  # eligible for jobs again at once
        self._recover_assigned()

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
                if self.inflight == 0 and not self._settling():
                    break
                self._stop.wait(0.02)
                continue
            if self.inflight >= self.config.max_concurrent:
                time.sleep(0.02)
                continue
            wait = self.config.poll_wait_seconds if self.inflight == 0 else 0.0
            if self._stop.is_set():
                break  # no poll once a stop is requested
            try:
                assigned = self.coordinator.next_job(wait_seconds=wait,
                                                     on_arrival=self._journal_arrival)
            except UnauthorizedError:
                raise
            except RequestAbortedError:
                break
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
            self._idle_streak = 0
            self._start(assigned)

    def idle_pause(self) -> float:
        """The pause after the current run of empty polls: doubling from ``idle_seconds``
        to ``max_idle_seconds``, jittered by ``idle_jitter``."""
        cfg = self.config
        base = min(cfg.max_idle_seconds, cfg.idle_seconds * 2 ** max(0, self._idle_streak - 1))
        return base * (1 + self._rng.uniform(-cfg.idle_jitter, cfg.idle_jitter))

    def _journal_arrival(self, job_id: str, payload: Any) -> None:
        """The dialect's on_arrival hook: journal the job before anything else is done."""
        self.outbox.accepted(self.scope, job_id, payload)

    def _idle(self) -> None:
        self._idle_streak += 1
        self.report.idle_polls += 1
        pause = self.idle_pause()
        capped = self.config.idle_seconds * 2 ** (self._idle_streak - 1) \
            >= self.config.max_idle_seconds
        first_at_cap = capped and self.config.idle_seconds * 2 ** (self._idle_streak - 2) \
            < self.config.max_idle_seconds
        # The rate is logged once when it settles (and each pause with -v -v).
        (log.info if first_at_cap else log.debug)(
            "no job at %s: next poll in %.1fs (about %.1f polls a minute)",
            self.coordinator.base_url, pause, 60.0 / max(pause, 1e-3))
        deadline = time.monotonic() + pause
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
            if self.outbox.get(scope, assigned.job_id) is not None:
                self.outbox.drop(scope, assigned.job_id, "assigned again after it was "
                                 "acknowledged; not run again")
            return
        if ack is not None:
            # We read a 409 as the coordinator holding our own earlier result; assigning the
            # job again shows it does not, so it is run again.
            log.warning("job %s is assigned again after a 409 we took for our own earlier "
                        "result; running it again", assigned.job_id)
            self.outbox.forget_ack(scope, assigned.job_id)
        if journal:
            entry = self.outbox.get(scope, assigned.job_id)
            if entry is None or entry.state != "accepted":  # else journalled on arrival
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
        if prior_attempts > 0 and not self.coordinator.dedupes_results:
            settled = self._settle_uncertain(job_id, kind)
            if settled is not None:
                return settled
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
            if isinstance(exc, DeliveryUncertainError) or exc.uncertain:
                self._uncertain_at[job_id] = time.monotonic()
            log.warning("job %s: %s not delivered yet (%s); kept in the journal, will resend",
                        job_id, kind, exc.message)
            self.outbox.attempted(scope, job_id, exc.message)
            return False
        if not ack.reported:
            self.outbox.drop(scope, job_id, "the coordinator has no way to report a failure; "
                                            "the job is left to expire")
            self.report.dropped += 1
            return True
        check = self.receipts.check(ack.receipt) if ack.receipt is not None else None
        if check is not None and check.status == "invalid":
            log.warning("job %s: the receipt's signature does not verify with the coordinator "
                        "key (%s); kept apart as invalid", job_id, check.reason)
            self.report.receipts_invalid += 1
        elif check is not None and check.verified:
            self.report.receipts_verified += 1
        self.outbox.acknowledge(scope, job_id, receipt=ack.receipt, duplicate=ack.duplicate,
                                receipt_check=check)
        if ack.duplicate:
            self.report.duplicates_recognised += 1
        if kind == "result":
            self.report.results_submitted += 1
        else:
            self.report.failures_reported += 1
        return True

    def _settling(self) -> bool:
        """Whether a result of uncertain delivery is still waiting to be asked about (a
        ``--once`` or ``--max-jobs`` run stays until it is settled; a stop does not wait)."""
        if not self._uncertain_at:
            return False
        pending = {e.job_id for e in self.outbox.pending(self.scope)}
        for job_id in list(self._uncertain_at):
            if job_id not in pending:
                del self._uncertain_at[job_id]
        return bool(self._uncertain_at)

    def _settle_uncertain(self, job_id: str, kind: Literal["result", "failure"]) -> bool | None:
        """An earlier attempt may have landed: ask before resending. None: send it now;
        True: settled without sending (delivered, or no longer ours); False: kept."""
        scope = self.scope
        since = self._uncertain_at.get(job_id)
        if since is not None and time.monotonic() - since < self.config.delivery_settle_seconds:
            return False  # the earlier request may still be landing: ask later
        self._uncertain_at.pop(job_id, None)  # asked once now; a run may end after this
        try:
            verdict = self.coordinator.delivery(job_id, kind)
            reason = ""
        except UnauthorizedError as exc:
            self._fatal = exc
            return False
        except CoordinatorError as exc:
            verdict, reason = "unknown", exc.message
        if verdict == "not_delivered":
            log.info("job %s: %s confirms our earlier %s did not arrive; sending it",
                     job_id, self.coordinator.base_url, kind)
            return None
        if verdict == "delivered":
            log.info("job %s: %s already holds our %s from an earlier attempt; not sent again",
                     job_id, self.coordinator.base_url, kind)
            self.outbox.acknowledge(scope, job_id, duplicate=True)
            self.report.duplicates_recognised += 1
            return True
        if verdict == "not_ours":
            log.warning("job %s: dropped, %s no longer shows it assigned to us", job_id,
                        self.coordinator.base_url)
            self.outbox.drop(scope, job_id, "no longer assigned to us; our earlier "
                             f"{kind} did not arrive")
            self.report.dropped += 1
            return True
        why = f" ({reason})" if reason else ""
        log.warning("job %s: cannot confirm whether our earlier %s arrived%s; kept in the "
                    "journal and not resent blind (a resent result is paid twice); will ask "
                    "again", job_id, kind, why)
        self.outbox.attempted(scope, job_id, f"delivery unconfirmed{why}")
        self.report.delivery_unconfirmed += 1
        return False

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

    def _recover_assigned(self) -> None:
        """Run the jobs the coordinator shows running for us that the journal never saw."""
        if self._fatal is not None or self._stop.is_set():
            return
        try:
            assigned = self.coordinator.assigned_jobs()
        except UnauthorizedError:
            raise
        except CoordinatorError as exc:
            log.warning("cannot ask %s which jobs are assigned to us (%s); a job taken by a "
                        "process killed before journalling it stays with the coordinator",
                        self.coordinator.base_url, exc.message)
            return
        scope = self.scope
        for job in assigned or []:
            with self._lock:
                running = job.job_id in self._running
            if running or self.outbox.get(scope, job.job_id) is not None \
                    or self.outbox.was_acked(scope, job.job_id):
                continue
            log.warning("job %s is assigned to us at %s but was never journalled (a process "
                        "stopped between the poll's reply and the journal); running it",
                        job.job_id, self.coordinator.base_url)
            self.outbox.accepted(scope, job.job_id, job.payload)
            self.report.recovered_assigned += 1
            taken = self.report.jobs_taken
            self._start(job, journal=False)
            self.report.jobs_taken = taken

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
                self.outbox.stop_retrying()
                with self._lock:
                    running = list(self._running.values())
                    self._running.clear()
                for r in running:
                    # Not reported as failed: the journal keeps it as accepted and the next
                    # start runs it again (or drops it if it is no longer ours).
                    log.warning("job %s: still running at shutdown; cancelled and left in the "
                                "journal %s for the next start", r.job.job_id, self.outbox.path)
                    r.handle.cancel()
                    self.report.left_for_next_start += 1
                break
            try:
                self._collect()
            except JournalUnavailableError as exc:
                log.error("%s", exc.message)
                break
            time.sleep(0.02)
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=5)
        if self._fatal is None:
            try:
                self._drain_outbox(quiet=True)
            except CoordinatorError as exc:
                self._fatal = self._fatal or exc
            except JournalUnavailableError as exc:
                log.error("%s", exc.message)
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
