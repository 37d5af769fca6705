"""Engine: the library's front door, wiring the scheduler, the device runners and the pool.

``Engine.run(job)`` runs one job and waits; ``Engine.submit(job)`` queues it
and returns a :class:`JobHandle`. Each accepted job becomes a ticket in the
:class:`~engine.scheduler.Scheduler` (arrival order, device slots, batching);
a dispatcher thread turns each assignment the scheduler hands out into a
:class:`~engine.works.Work` and gives it to the
:class:`~engine.runner.DeviceRunner` of its first device, the one thread that
runs models there. Any failure inside a job becomes a failed
:class:`JobResult`; the engine goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import DeviceError, EngineError, InvalidJobError, JobCancelledError
from engine.hardware import Device, HardwareInfo, Nvml, discover
from engine.jobs import Job, JobResult
from engine.loading import LoadedModel, Weights, resolve_dtype_name
from engine.metering import Meter
from engine.options import RunOptions, uses_model_operators
from engine.outcomes import ENGINE_VERSION, failed_result, log_result
from engine.payloads import parse_payload
from engine.pool import ModelPool
from engine.registry import ModelSpec, Registry
from engine.scheduler import Scheduler, SchedulerClosed, Ticket
from engine.works import Decode, QueuedJob, RunContext, Work, make_work

if TYPE_CHECKING:  # torch-heavy: imported when the first runner starts, not by `import engine`
    from engine.runner import DeviceRunner
    from engine.tasks.generation import TokenCallback
    from engine.tasks.static_decode import DecoderStats, GraphBackend

__all__ = ["ENGINE_VERSION", "Decode", "Engine", "JobHandle", "default_batch_size"]

CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32


def default_batch_size(devices: Sequence[Device]) -> int:
    """How many generation jobs of one model decode together by default on ``devices``."""
    return GPU_BATCH_SIZE if any(d.kind == "cuda" for d in devices) else CPU_BATCH_SIZE


class JobHandle:
    """A queued or running job: wait for its result, or cancel it."""

    def __init__(self, item: QueuedJob, engine: Engine):
        self._item = item
        self._engine = engine

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self._item.job.job_id

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job's result (always a :class:`JobResult`, completed or failed)."""
        return self._item.future.result(timeout)

    def done(self) -> bool:
        """True once the result is ready."""
        return self._item.future.done()

    def running(self) -> bool:
        """True while the job is on a device."""
        return self._item.future.running()

    def add_done_callback(self, fn: Callable[[JobHandle], object]) -> None:
        """Call ``fn(handle)`` once the result is ready (at once if it is), on that thread."""
        self._item.future.add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        """Cancel the job: a queued job is dropped, a running one stops at its next token."""
        return self._engine._cancel(self._item)


class Engine:
    """The engine as a library: ``Engine().run(job)``.

    ``devices`` names the device ids to use (default: every usable GPU, else
    the CPU). ``weights="random"`` runs every model with seeded random weights
    (benchmarks where the hub is out of reach). ``job_timeout`` bounds each
    job's time on its device, in seconds. ``batch_size`` is how many
    generation jobs of one model decode together (default: 8 on the CPU, 32
    on GPUs; 1 turns batching off); ``batch_window_seconds`` how long a new
    batch waits for mates. ``max_concurrent`` is how many works share a
    device step by step. ``decode`` picks the decode path (``auto``: the
    static cache replayed as a CUDA graph for a single job on one GPU, the
    dynamic cache elsewhere, whose steps a native GGUF model takes with the
    engine's fused C step; ``dynamic``: the dynamic cache with the model's own
    operators, so native results keep the float32 path's floats); ``graphs``
    replaces how decode steps are captured (tests).
    The options are checked by :class:`engine.options.RunOptions`: a value out
    of range raises :class:`~engine.options.OptionError` (a ``ValueError``).
    """

    def __init__(self, registry: Registry | str | Path | None = None, *,
                 hardware: HardwareInfo | None = None, devices: Sequence[str] | None = None,
                 pool: ModelPool | None = None, nvml: Nvml | None = None,
                 meter: Meter | None = None, max_concurrent: int = 1,
                 job_timeout: float | None = None, weights: Weights = "pretrained",
                 dtype: str | None = None, batch_size: int | None = None,
                 batch_window_seconds: float = 0.0, decode: Decode = "auto",
                 graphs: GraphBackend | None = None):
        checked = RunOptions.check(max_concurrent=max_concurrent, batch_size=batch_size,
                                   batch_window_seconds=batch_window_seconds,
                                   job_timeout=job_timeout, decode=decode, dtype=dtype,
                                   weights=weights)
        max_concurrent, batch_size = checked.max_concurrent, checked.batch_size
        batch_window_seconds, job_timeout = checked.batch_window_seconds, checked.job_timeout
        self.registry = registry if isinstance(registry, Registry) else Registry.load(registry)
        self.hardware = hardware or discover(nvml)
        self._own_nvml: Nvml | None = None
        if nvml is None and meter is None and self.hardware.gpus:
            # Kept open for energy readings over the engine's life; closed by close().
            nvml = self._own_nvml = Nvml()
        if devices:
            chosen = [self.hardware.device(d) for d in devices]
        else:
            chosen = list(self.hardware.gpus) or [self.hardware.cpu]
        self.devices: tuple[Device, ...] = tuple(dict.fromkeys(chosen))
        self.pool = pool or ModelPool()
        self.meter = meter or Meter(nvml=nvml)
        self.max_concurrent = max_concurrent
        self.job_timeout = job_timeout
        self.weights: Weights = weights
        self.dtype = dtype
        self.batch_size = batch_size or default_batch_size(self.devices)
        self.batch_window_seconds = batch_window_seconds
        self.decode: Decode = decode
        self.scheduler = Scheduler([d.id for d in self.devices], max_concurrent=max_concurrent,
                                   batch_size=self.batch_size,
                                   batch_window_seconds=batch_window_seconds,
                                   prefer=self._is_warm)
        self._graphs = graphs
        self._lock = threading.Lock()
        self._running: set[QueuedJob] = set()
        self._runners: dict[str, DeviceRunner] = {}
        self._dispatcher: threading.Thread | None = None
        self._closed = False
        self._context = RunContext(
            pool=self.pool, meter=self.meter, scheduler=self.scheduler, weights=weights,
            dtype=dtype, job_timeout=job_timeout, batch_size=self.batch_size, decode=decode,
            started=self._started, deliver=self._deliver,
            cpu_fallback_reason=getattr(self.hardware, "cpu_fallback_reason", None))

    # ------------------------------------------------------------ public API
    def run(self, job: Job | Mapping[str, Any] | str | bytes, *,
            timeout: float | None = None, on_token: TokenCallback | None = None) -> JobResult:
        """Run one job and return its result; failures come back as failed results."""
        return self.submit(job, on_token=on_token).result(timeout)

    def submit(self, job: Job | Mapping[str, Any] | str | bytes, *,
               on_token: TokenCallback | None = None) -> JobHandle:
        """Queue a job (a :class:`Job` or any payload :func:`parse_payload` takes).

        A model named by one of its registry aliases runs (and is hashed) under its
        registry name. ``on_token`` hears each token of a generation job as it is decoded
        (:class:`~engine.tasks.generation.StreamedToken`, on the device's thread).
        """
        future: Future[JobResult] = Future()
        try:
            parsed = job if isinstance(job, Job) else parse_payload(job)
        except InvalidJobError as exc:
            ident = job.get("job_id") if isinstance(job, Mapping) else None
            bad = Job.model_construct(job_id=str(ident or "invalid"), model="",
                                      task="text-generation")
            future.set_result(failed_result(bad, exc))
            return JobHandle(QueuedJob(bad, future, time.monotonic()), self)
        if self.registry.canonical(parsed.model) != parsed.model:
            parsed = parsed.model_copy(update={"model": self.registry.canonical(parsed.model)})
        item = QueuedJob(parsed, future, time.monotonic(), on_token=on_token)
        try:
            item.spec = self._check_job(parsed)
        except EngineError as exc:
            future.set_result(failed_result(parsed, exc))
            return JobHandle(item, self)
        spec = item.spec
        item.ticket = Ticket(model=spec.name, payload=item, submitted=item.submitted,
                             candidates=tuple(tuple(d.id for d in s)
                                              for s in self._candidate_sets(spec)),
                             batchable=parsed.task == "text-generation",
                             exclusive=spec.gpu_count > 1)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._ensure_dispatcher()
        self.scheduler.push(item.ticket)
        return JobHandle(item, self)

    def load(self, name: str, *, device: str | None = None) -> LoadedModel:
        """Warm a model (on ``device`` or the first device that can hold it)."""
        spec = self.registry.get(name)
        devices = [self.hardware.device(device)] if device else self._candidate_sets(spec)[0]
        loaded, _ = self.pool.get(spec, devices, weights=self.weights, dtype=self.dtype,
                                  model_operators=uses_model_operators(self.decode))
        return loaded

    def evict(self, name: str | None = None) -> list[str]:
        """Evict idle warm models (all, or one by name) and what was built on them."""
        return [str(k) for k in self.pool.evict(name)]

    def fast_paths(self) -> list[DecoderStats]:
        """The fast path's decoders of every warm model: capture counts, warm-up, replays."""
        return [decoder.stats for loaded in self.pool.warm()
                for decoder in loaded.fast_paths.values()]

    def queue_length(self) -> int:
        """Jobs waiting for a device."""
        return self.scheduler.pending()

    def running_count(self) -> int:
        """Jobs on a device now."""
        with self._lock:
            return len(self._running)

    def close(self, *, cancel_pending: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs; cancel queued ones (by default) and wait for running ones."""
        with self._lock:
            self._closed = True
        if cancel_pending:
            for ticket in self.scheduler.close():
                item: QueuedJob = ticket.payload
                item.future.set_result(failed_result(item.job, JobCancelledError(
                    f"job {item.job.job_id} was cancelled: the engine is shutting down")))
        else:
            self._drain(timeout)
            self.scheduler.close()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        for runner in list(self._runners.values()):
            runner.stop(timeout)
        if self._own_nvml is not None and not self._running:
            self._own_nvml.close()
            self._own_nvml = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ validation
    def _check_job(self, job: Job) -> ModelSpec:
        spec = self.registry.get(job.model)
        if spec.task != job.task:
            raise InvalidJobError(f"model {spec.name!r} does the task {spec.task!r}, not "
                                  f"{job.task!r}", field="task")
        if job.task == "text-generation" and job.params.max_tokens >= spec.context_length:
            raise InvalidJobError(f"max_tokens {job.params.max_tokens} is not below "
                                  f"{spec.name}'s context length of {spec.context_length}",
                                  field="max_tokens", code="context_length_exceeded")
        candidates = self._candidate_sets(spec)
        if not candidates:
            raise DeviceError(f"model {spec.name!r} needs {spec.gpu_count} GPU(s); this engine "
                              f"uses {', '.join(d.id for d in self.devices)}", field="model")
        # A dtype this model cannot take (native for a non-GGUF model, bfloat16 on a V100)
        # fails the job here, at submission, not later on the dispatcher's thread.
        usable = [devices for devices in candidates if self._dtype_error(spec, devices) is None]
        if not usable:
            error = self._dtype_error(spec, candidates[0])
            assert error is not None
            raise error
        return spec

    def _dtype_error(self, spec: ModelSpec, devices: list[Device]) -> EngineError | None:
        try:
            resolve_dtype_name(spec, devices[0], self.dtype, self.weights)
        except EngineError as exc:
            return exc
        return None

    def _candidate_sets(self, spec: ModelSpec) -> list[list[Device]]:
        gpus = [d for d in self.devices if d.kind == "cuda"]
        if spec.gpu_count > 1:
            if len(gpus) < spec.gpu_count:
                return []
            return [gpus[i:i + spec.gpu_count] for i in range(0, len(gpus) - spec.gpu_count + 1)]
        return [[d] for d in self.devices]

    def _is_warm(self, model: str, device_ids: tuple[str, ...]) -> bool:
        devices = [self.hardware.device(d) for d in device_ids]
        spec = self.registry.get(model)
        try:
            key = self.pool.key_for(spec, devices, self.weights, self.dtype,
                                    model_operators=uses_model_operators(self.decode))
        except EngineError:
            return False  # not loadable there in this dtype: certainly not warm
        return self.pool.peek(key) is not None

    # ------------------------------------------------------------ job life
    def _cancel(self, item: QueuedJob) -> bool:
        if item.ticket is not None and self.scheduler.remove(item.ticket):
            item.future.set_result(failed_result(item.job, JobCancelledError(
                f"job {item.job.job_id} was cancelled before it started")))
            return True
        if item.future.done():
            return False
        item.cancelled.set()
        return True

    def _started(self, item: QueuedJob) -> None:
        with self._lock:
            self._running.add(item)
        item.future.set_running_or_notify_cancel()

    def _deliver(self, item: QueuedJob, result: JobResult) -> None:
        with self._lock:
            self._running.discard(item)
        if not item.future.done():
            item.future.set_result(result)
        log_result(result)

    def _drain(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.scheduler.pending() or self.running_count():
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(0.01)

    # ------------------------------------------------------------ dispatching
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(target=self._dispatch_loop,
                                                name="engine-dispatcher", daemon=True)
            self._dispatcher.start()

    def _runner(self, device: Device) -> DeviceRunner:
        from engine.runner import DeviceRunner

        runner = self._runners.get(device.id)
        if runner is None:
            runner = self._runners[device.id] = DeviceRunner(
                device, meter=self.meter, on_done=self._work_done, graphs=self._graphs)
        return runner

    def _dispatch_loop(self) -> None:
        while True:
            try:
                assignment = self.scheduler.next()
            except SchedulerClosed:
                return
            if assignment is None:
                continue
            devices = [self.hardware.device(d) for d in assignment.devices]
            self._runner(devices[0]).submit(make_work(self._context, assignment, devices))

    def _work_done(self, work: Work) -> None:
        self.scheduler.release(work.assignment)
