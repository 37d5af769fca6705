"""Works: what a device's runner advances, one forward pass per :meth:`Work.step`.

A work is one assignment from the scheduler: a decode batch of generation
jobs for one model (rows join and leave between steps), one generation job
on the static-cache fast path, or one embedding job. It leases its model from
the pool for its whole life, seats each job (its own clock, its entry in the
runner's :class:`~engine.metering.DeviceLedger`), brackets every forward pass
with a ledger step that names the token work each job did in it, and answers
each job the moment its own output is final. The runner interleaves the steps
of every active work on its device, so nothing here blocks between steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.errors import EngineError, ExecutionError, JobCancelledError, JobTimeoutError
from engine.hardware import Device
from engine.jobs import EmbeddingOutput, GenerationOutput, Job, JobResult
from engine.loading import LoadedModel, Weights
from engine.metering import Meter, MeterWindow, StepRecord
from engine.options import Decode, uses_model_operators
from engine.outcomes import classify, completed_result, failed_result, job_metrics
from engine.pool import ModelPool
from engine.registry import ModelSpec
from engine.scheduler import Assignment, Scheduler, Ticket

if TYPE_CHECKING:  # torch-heavy modules: imported where a work runs, not by `import engine`
    from engine.runner import DeviceRunner
    from engine.tasks.generation import DecodeBatch, GenerationRequest, Outcome, TokenCallback
    from engine.tasks.static_decode import StaticDecoder, StaticRun

log = logging.getLogger(__name__)

# Decode (engine.options): "auto" is the static-cache path (graphs on CUDA) for single jobs
# on one GPU, the dynamic-cache loop everywhere else (on the CPU the static cache does not pay),
# whose steps a native model takes with its fused C step; "dynamic" keeps the forward's floats.


@dataclass(eq=False)
class QueuedJob:
    """A job the engine accepted: its future, cancel flag and scheduler ticket."""

    job: Job
    future: Future[JobResult]
    submitted: float
    spec: ModelSpec | None = None
    ticket: Ticket | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_token: TokenCallback | None = None


@dataclass
class RunContext:
    """What works need from the engine that owns them."""

    pool: ModelPool
    meter: Meter
    scheduler: Scheduler
    weights: Weights
    dtype: str | None
    job_timeout: float | None
    batch_size: int
    decode: Decode
    started: Callable[[QueuedJob], None]
    deliver: Callable[[QueuedJob, JobResult], None]
    cpu_fallback_reason: str | None = None


@dataclass(eq=False)
class Seat:
    """A job on its device: its clock and what its metrics need besides the ledger."""

    item: QueuedJob
    clock: MeterWindow
    load_seconds: float
    queue_seconds: float
    prompt_tokens: int = 0
    warmup_seconds: float | None = None
    request: GenerationRequest | None = None


class Work:
    """The common part of every work: the lease, the seats and answering each job once."""

    def __init__(self, ctx: RunContext, assignment: Assignment, devices: Sequence[Device],
                 items: Sequence[QueuedJob]):
        self.ctx = ctx
        self.assignment = assignment
        self.devices = tuple(devices)
        self.items = list(items)
        self.loaded: LoadedModel | None = None
        self.load_seconds = 0.0
        self.started = 0.0
        self._seats: dict[QueuedJob, Seat] = {}
        self._answered: set[QueuedJob] = set()
        self._outbox: list[tuple[QueuedJob, JobResult]] = []
        self._lease = contextlib.ExitStack()
        self._runner: DeviceRunner | None = None

    @property
    def spec(self) -> ModelSpec:
        """The model every job of this work runs."""
        spec = self.items[0].spec
        assert spec is not None
        return spec

    @property
    def runner(self) -> DeviceRunner:
        """The runner this work runs on (set by :meth:`begin`)."""
        assert self._runner is not None, "the work has not begun"
        return self._runner

    def begin(self, runner: DeviceRunner) -> None:
        """Lease the model (loading it if cold); runs on the runner's thread, billed to nobody."""
        self._runner = runner
        for item in self.items:
            self.ctx.started(item)
        self.loaded, self.load_seconds = self._lease.enter_context(self.ctx.pool.use(
            self.spec, self.devices, weights=self.ctx.weights, dtype=self.ctx.dtype,
            model_operators=uses_model_operators(self.ctx.decode)))
        from engine.kernels import KERNEL_NAMES

        if self.loaded.linear_kernel in KERNEL_NAMES:
            from engine.kernels.rowgemm import hand_threads_to_kernel

            hand_threads_to_kernel()  # this thread is the device's own
        self.started = time.monotonic()

    def step(self) -> bool:
        """One forward pass; True when the work has nothing left to do.

        The model's lock is held meanwhile, so anything else that borrows the
        warm model (the verifier) waits for the step boundary.
        """
        assert self.loaded is not None, "the work has not begun"
        with self.loaded.lock:
            return self._step()

    def _step(self) -> bool:
        raise NotImplementedError

    def fail(self, err: EngineError) -> None:
        """Answer every job not answered yet with ``err``."""
        for item in list(self.items):
            self._answer(item, failed_result(item.job, err))

    def end(self) -> None:
        """Release the lease (after a last answer to any job left without one)."""
        self.fail(ExecutionError("internal error: the job ended without a result"))
        self._lease.close()

    # ------------------------------------------------------------ seats
    def _seat(self, item: QueuedJob, clock: MeterWindow, *, load_seconds: float,
              queued_until: float, prompt_tokens: int, warmup_seconds: float | None = None,
              request: GenerationRequest | None = None) -> Seat:
        self.runner.ledger.open(item, self.devices)
        seat = Seat(item, clock, load_seconds, queued_until - item.submitted, prompt_tokens,
                    warmup_seconds, request)
        self._seats[item] = seat
        return seat

    def _deadline(self, start: float) -> float:
        return start + self.ctx.job_timeout if self.ctx.job_timeout else float("inf")

    def _complete(self, seat: Seat, output: GenerationOutput | EmbeddingOutput,
                  decode: str) -> None:
        loaded = self.loaded
        assert loaded is not None
        self._seats.pop(seat.item, None)
        share = self.runner.ledger.close(seat.item)
        completion = len(output.token_ids) if isinstance(output, GenerationOutput) else 0
        metrics = job_metrics(seat.clock.stop(), share, load_seconds=seat.load_seconds,
                              prompt_tokens=seat.prompt_tokens, completion_tokens=completion,
                              queue_seconds=seat.queue_seconds,
                              model_memory_bytes=loaded.memory_bytes,
                              warmup_seconds=seat.warmup_seconds)
        self._answer(seat.item, completed_result(
            seat.item.job, loaded, output, metrics, batch_size=max(1, share.peak_batch),
            decode=decode, cpu_fallback_reason=self.ctx.cpu_fallback_reason))

    def _stopped(self, seat: Seat, err: EngineError) -> None:
        """Answer a seated job that ended without output (cancelled, past its time limit,
        failed) with the device time it held up to then: metrics, but no output or hash."""
        self._seats.pop(seat.item, None)
        share = self.runner.ledger.close(seat.item)
        own = seat.clock.stop()
        loaded = self.loaded
        metrics = job_metrics(own, share, load_seconds=seat.load_seconds,
                              prompt_tokens=seat.prompt_tokens,
                              completion_tokens=len(own.token_times),
                              queue_seconds=seat.queue_seconds,
                              model_memory_bytes=loaded.memory_bytes if loaded else None,
                              warmup_seconds=seat.warmup_seconds)
        self._answer(seat.item, failed_result(seat.item.job, err).model_copy(
            update={"metrics": metrics}))

    def flush(self) -> None:
        """Deliver the answers made since the last flush (the runner calls this after each
        step, and after :meth:`end` for the last one, so a job's result arrives once its
        model's lease is released)."""
        answers, self._outbox = self._outbox, []
        for item, result in answers:
            self.ctx.deliver(item, result)

    def _answer(self, item: QueuedJob, result: JobResult) -> None:
        if item in self._answered:
            return
        self._answered.add(item)
        if self._seats.pop(item, None) is not None:
            with contextlib.suppress(KeyError):  # the seat's ledger entry is gone already
                self.runner.ledger.close(item)
        self._outbox.append((item, result))


class GenerationWork(Work):
    """Generation jobs of one model: a rolling decode batch, or one job on the fast path."""

    def __init__(self, ctx: RunContext, assignment: Assignment, devices: Sequence[Device],
                 items: Sequence[QueuedJob]):
        super().__init__(ctx, assignment, devices, items)
        self._batch: DecodeBatch | None = None
        self._admitting: list[QueuedJob] = []
        self._static: StaticRun | None = None
        self._decoder: StaticDecoder | None = None
        self._by_request: dict[GenerationRequest, Seat] = {}

    def begin(self, runner: DeviceRunner) -> None:
        """Lease the model; a single job may take the fast path (captured here, if new)."""
        from engine.tasks.generation import DecodeBatch

        super().begin(runner)
        loaded = self.loaded
        assert loaded is not None
        # "dynamic" asks for the forward's floats: no fused step.
        self._batch = DecodeBatch(loaded, fused=self.ctx.decode != "dynamic")
        self._admitting = list(self.items)
        if len(self.items) == 1 and self._wants_static(loaded):
            self._begin_static(self.items[0])

    def _step(self) -> bool:
        """Prefill the jobs waiting to join, else one decode step; then let queued jobs join."""
        if self._static is not None:
            return self._static_step()
        batch = self._batch
        assert batch is not None
        if self._admitting:
            joining, self._admitting = self._admitting, []
            self._admit(joining)
        elif len(batch):
            rows = [row.request for row in batch.rows]
            with self.runner.ledger.step(self.devices) as record:
                record.work = {self._by_request[r].item: 1.0 for r in rows}
                ended = batch.step()
                self._bill_commitments(record, ended)
            self._finish(ended, batch.decode_name)
        if len(batch) and batch.mergeable:
            free = self.ctx.batch_size - len(batch)
            tickets = self.ctx.scheduler.join(self.spec.name, self.assignment.devices, free)
            for ticket in tickets:
                item = ticket.payload
                self.ctx.started(item)
                self.items.append(item)
                self._admitting.append(item)
        return not len(batch) and not self._admitting

    def end(self) -> None:
        """Free the fast-path decoder and release the lease."""
        if self._decoder is not None:
            self._decoder.busy = False
        if self._batch is not None:
            self._batch.abort()
        super().end()

    # ------------------------------------------------------------ dynamic path
    def _admit(self, items: list[QueuedJob]) -> None:
        from engine.tasks.generation import GenerationRequest, encode_prompt

        loaded = self.loaded
        batch = self._batch
        assert loaded is not None and batch is not None
        first = not self._by_request and not len(batch)
        joining: list[GenerationRequest] = []
        for item in items:
            clock = self.ctx.meter.clock().start()
            now = time.monotonic()
            try:
                ids = encode_prompt(loaded, item.job)
            except EngineError as exc:
                self._answer(item, failed_result(item.job, exc))
                continue
            request = GenerationRequest(job=item.job, window=clock, deadline=self._deadline(now),
                                        cancelled=item.cancelled.is_set, prompt_ids=ids,
                                        on_token=item.on_token)
            # Jobs that joined a running batch found the model warm: no load time of theirs.
            self._by_request[request] = self._seat(
                item, clock, load_seconds=self.load_seconds if first else 0.0,
                queued_until=self.started if first else now, prompt_tokens=len(ids),
                request=request)
            joining.append(request)
        if not joining:
            return
        with self.runner.ledger.step(self.devices) as record:
            record.work = {self._by_request[r].item: float(len(r.prompt_ids)) for r in joining}
            ended = batch.add(joining)
            self._bill_commitments(record, ended)
        self._finish(ended, batch.decode_name)

    def _bill_commitments(self, record: StepRecord,
                          ended: list[tuple[GenerationRequest, Outcome]]) -> None:
        """Add each ended job's commitment pass (run inside this step) to its token work."""
        from engine.tasks.generation import commitment_work

        extra: dict[QueuedJob, float] = {}
        for request, outcome in ended:
            seat = self._by_request.get(request)
            if seat is not None:
                extra[seat.item] = commitment_work(request, outcome)
        if any(extra.values()):
            record.work = {key: work + extra.get(key, 0.0) for key, work in record.work.items()}

    def _finish(self, ended: list[tuple[GenerationRequest, Outcome]], decode: str) -> None:
        for request, outcome in ended:
            seat = self._by_request.pop(request)
            if isinstance(outcome, Exception):
                self._stopped(seat, classify(outcome))
            else:
                self._complete(seat, outcome, decode)

    # ------------------------------------------------------------ fast path
    def _wants_static(self, loaded: LoadedModel) -> bool:
        if self.ctx.decode == "dynamic" or len(loaded.devices) != 1:
            return False
        return self.ctx.decode == "static" or loaded.devices[0].kind == "cuda"

    def _begin_static(self, item: QueuedJob) -> None:
        from engine.tasks.generation import GenerationRequest, encode_prompt
        from engine.tasks.static_decode import StaticRun, bucket_for

        loaded = self.loaded
        assert loaded is not None
        try:
            ids = encode_prompt(loaded, item.job)
        except EngineError:
            return  # the dynamic path answers it with the same error
        bucket = bucket_for(len(ids) + item.job.params.max_tokens, loaded.spec.context_length)
        with loaded.lock:
            decoder, warmup = self.runner.decoder_for(loaded, bucket)
        if decoder is None:
            return
        decoder.busy = True
        self._decoder = decoder
        decoder.stats.jobs += 1
        clock = self.ctx.meter.clock().start()
        request = GenerationRequest(job=item.job, window=clock,
                                    deadline=self._deadline(time.monotonic()),
                                    cancelled=item.cancelled.is_set, prompt_ids=ids,
                                    on_token=item.on_token)
        self._by_request[request] = self._seat(
            item, clock, load_seconds=self.load_seconds + warmup, queued_until=self.started,
            prompt_tokens=len(ids), warmup_seconds=warmup or None, request=request)
        self._static = StaticRun(decoder, request)
        self._admitting = []

    def _static_step(self) -> bool:
        run = self._static
        assert run is not None and self._decoder is not None
        seat = self._by_request[run.request]
        ended: list[tuple[GenerationRequest, Outcome]] = []
        with self.runner.ledger.step(self.devices) as record:
            record.work = {seat.item: float(run.pending_work)}
            run.advance()
            if run.done:  # the commitment pass runs in the job's last step, billed to it
                ended = [(run.request, run.outcome())]
                self._bill_commitments(record, ended)
        if not run.done:
            return False
        self._finish(ended, self._decoder.label)
        return True


class EmbeddingWork(Work):
    """One embedding job: a single forward pass."""

    def _step(self) -> bool:
        """Embed the job's inputs and answer it."""
        from engine.tasks.embedding import count_tokens, embed

        loaded = self.loaded
        assert loaded is not None
        item = self.items[0]
        job = item.job
        clock = self.ctx.meter.clock().start()
        try:
            lengths = count_tokens(loaded, job)
        except EngineError as exc:
            self._answer(item, failed_result(job, exc))
            return True
        seat = self._seat(item, clock, load_seconds=self.load_seconds,
                          queued_until=self.started, prompt_tokens=sum(lengths))
        with self.runner.ledger.step(self.devices) as record:
            record.work = {item: float(max(1, sum(lengths)))}
            output = embed(loaded, job)
        if self.ctx.job_timeout and clock.elapsed > self.ctx.job_timeout:
            self._answer(item, failed_result(job, JobTimeoutError(
                f"job {job.job_id} took {clock.elapsed:.1f} s, past its limit of "
                f"{self.ctx.job_timeout} s")))
        elif item.cancelled.is_set():
            self._answer(item, failed_result(job, JobCancelledError(
                f"job {job.job_id} was cancelled")))
        else:
            self._complete(seat, output, "encoder")
        return True


def make_work(ctx: RunContext, assignment: Assignment, devices: Sequence[Device]) -> Work:
    """The work for an assignment (its tickets' payloads are :class:`QueuedJob`\\ s)."""
    items = [t.payload for t in assignment.tickets]
    if items[0].job.task == "embedding":
        return EmbeddingWork(ctx, assignment, devices, items)
    return GenerationWork(ctx, assignment, devices, items)
