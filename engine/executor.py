"""Engine: takes jobs, places them on devices, runs them through pool, task, meter and hash.

``Engine.run(job)`` runs one job and waits; ``Engine.submit(job)`` queues it and
returns a :class:`JobHandle`. A dispatcher thread takes queued jobs in order,
waits until the devices a job needs have a free slot (``max_concurrent`` per
device; a model with ``gpu_count`` n holds n GPUs), prefers devices where the
model is already warm, gathers compatible generation jobs into one batch
(``batch_size``, ``batch_window_seconds``) and hands the batch to a runner
thread. Any failure inside a job becomes a failed :class:`JobResult`; the
engine goes on.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.errors import (
    DeviceError,
    DeviceOutOfMemoryError,
    EngineError,
    ExecutionError,
    InvalidJobError,
    JobCancelledError,
    JobTimeoutError,
)
from engine.hardware import Device, HardwareInfo, Nvml, discover
from engine.hashing import HASH_VERSION, result_hash
from engine.jobs import (
    EmbeddingOutput,
    ExecutionProfile,
    GenerationOutput,
    Job,
    JobErrorInfo,
    JobResult,
    Metrics,
    parse_payload,
)
from engine.loading import LoadedModel, PoolKey, Weights
from engine.metering import Measurement, Meter, MeterWindow, share_by_work
from engine.pool import ModelPool, release_memory
from engine.registry import ModelSpec, Registry

if TYPE_CHECKING:
    from engine.tasks.generation import GenerationRequest

log = logging.getLogger(__name__)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


ENGINE_VERSION = _version("aitbc-engine")

# "auto": the static-cache path with CUDA graphs for single jobs on CUDA, the
# dynamic-cache loop everywhere else (on the CPU the static cache does not pay).
Decode = Literal["auto", "dynamic", "static"]


@dataclass
class _Queued:
    job: Job
    future: Future[JobResult]
    submitted: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    spec: ModelSpec | None = None


class JobHandle:
    """A queued or running job: wait for its result, or cancel it."""

    def __init__(self, item: _Queued, engine: Engine):
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

    def cancel(self) -> bool:
        """Cancel the job: a queued job is dropped, a running one stops at its next token."""
        return self._engine._cancel(self._item)


class Engine:
    """The engine as a library: ``Engine().run(job)``.

    ``devices`` names the device ids to use (default: every GPU, else the CPU).
    ``weights="random"`` runs every model with seeded random weights (benchmarks
    where the hub is out of reach). ``job_timeout`` bounds each job's time on
    its device, in seconds. ``decode`` picks the single-stream decode path
    (``auto``: static cache with CUDA graphs on GPUs, dynamic cache on the CPU).
    """

    def __init__(self, registry: Registry | str | Path | None = None, *,
                 hardware: HardwareInfo | None = None, devices: Sequence[str] | None = None,
                 pool: ModelPool | None = None, nvml: Nvml | None = None,
                 meter: Meter | None = None, max_concurrent: int = 1,
                 job_timeout: float | None = None, weights: Weights = "pretrained",
                 dtype: str | None = None, batch_size: int = 1,
                 batch_window_seconds: float = 0.0, decode: Decode = "auto"):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
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
        self.batch_size = batch_size
        self.batch_window_seconds = batch_window_seconds
        self.decode: Decode = decode
        self._static_broken: set[PoolKey] = set()
        self._slots = {d.id: 0 for d in self.devices}
        self._queue: deque[_Queued] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: set[int] = set()
        self._dispatcher: threading.Thread | None = None

    # ------------------------------------------------------------ public API
    def run(self, job: Job | Mapping[str, Any] | str | bytes, *,
            timeout: float | None = None) -> JobResult:
        """Run one job and return its result; failures come back as failed results."""
        return self.submit(job).result(timeout)

    def submit(self, job: Job | Mapping[str, Any] | str | bytes) -> JobHandle:
        """Queue a job (a :class:`Job` or any payload :func:`parse_payload` takes)."""
        future: Future[JobResult] = Future()
        try:
            parsed = job if isinstance(job, Job) else parse_payload(job)
        except InvalidJobError as exc:
            ident = job.get("job_id") if isinstance(job, Mapping) else None
            bad = Job.model_construct(job_id=str(ident or "invalid"), model="",
                                      task="text-generation")
            item = _Queued(bad, future, time.monotonic())
            future.set_result(_failed(bad, exc))
            return JobHandle(item, self)
        item = _Queued(parsed, future, time.monotonic())
        try:
            item.spec = self._check_job(parsed)
        except EngineError as exc:
            future.set_result(_failed(parsed, exc))
            return JobHandle(item, self)
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(item)
            self._ensure_dispatcher()
            self._cond.notify_all()
        return JobHandle(item, self)

    def load(self, name: str, *, device: str | None = None) -> LoadedModel:
        """Warm a model (on ``device`` or the first device that can hold it)."""
        spec = self.registry.get(name)
        devices = [self.hardware.device(device)] if device else self._candidate_sets(spec)[0]
        loaded, _ = self.pool.get(spec, devices, weights=self.weights, dtype=self.dtype)
        return loaded

    def evict(self, name: str | None = None) -> list[str]:
        """Evict idle warm models (all, or one by name); returns the keys evicted."""
        return [str(k) for k in self.pool.evict(name)]

    def queue_length(self) -> int:
        """Jobs waiting for a device."""
        with self._cond:
            return len(self._queue)

    def running_count(self) -> int:
        """Jobs on a device now."""
        with self._cond:
            return len(self._running)

    def close(self, *, cancel_pending: bool = True, timeout: float | None = None) -> None:
        """Stop taking jobs; cancel queued ones (by default) and wait for running ones."""
        with self._cond:
            self._closed = True
            pending = list(self._queue) if cancel_pending else []
            if cancel_pending:
                self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            item.future.set_result(_failed(item.job, JobCancelledError(
                f"job {item.job.job_id} was cancelled: the engine is shutting down")))
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
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
        if not self._candidate_sets(spec):
            raise DeviceError(f"model {spec.name!r} needs {spec.gpu_count} GPU(s); this engine "
                              f"uses {', '.join(d.id for d in self.devices)}", field="model")
        return spec

    def _candidate_sets(self, spec: ModelSpec) -> list[list[Device]]:
        gpus = [d for d in self.devices if d.kind == "cuda"]
        if spec.gpu_count > 1:
            if len(gpus) < spec.gpu_count:
                return []
            return [gpus[i:i + spec.gpu_count] for i in range(0, len(gpus) - spec.gpu_count + 1)]
        return [[d] for d in self.devices]

    # ------------------------------------------------------------ cancellation
    def _cancel(self, item: _Queued) -> bool:
        with self._cond:
            if item in self._queue:
                self._queue.remove(item)
                queued = True
            else:
                queued = False
        if queued:
            item.future.set_result(_failed(item.job, JobCancelledError(
                f"job {item.job.job_id} was cancelled before it started")))
            return True
        if item.future.done():
            return False
        item.cancelled.set()
        return True

    # ------------------------------------------------------------ dispatching
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(target=self._dispatch_loop,
                                                name="engine-dispatcher", daemon=True)
            self._dispatcher.start()

    def _free_set(self, spec: ModelSpec) -> list[Device] | None:
        sets = [s for s in self._candidate_sets(spec)
                if all(self._slots[d.id] < self.max_concurrent for d in s)]
        if not sets:
            return None
        weights = self.weights

        def score(devices: list[Device]) -> tuple[int, int]:
            warm = self.pool.peek(self.pool.key_for(spec, devices, weights, self.dtype))
            return (0 if warm is not None else 1, sum(self._slots[d.id] for d in devices))

        return min(sets, key=score)

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._queue:
                        if self._closed and not self._running:
                            return
                        self._cond.wait(0.5)
                        if self._closed and not self._queue and not self._running:
                            return
                        continue
                    head = self._queue[0]
                    assert head.spec is not None
                    devices = self._free_set(head.spec)
                    if devices is not None:
                        break
                    self._cond.wait(0.5)
                self._queue.popleft()
                for d in devices:
                    self._slots[d.id] += 1
            batch = [head, *self._gather(head)]
            with self._cond:
                for item in batch:
                    self._running.add(id(item))
            threading.Thread(target=self._run_batch, args=(batch, devices),
                             name=f"engine-run-{head.job.job_id[:8]}", daemon=True).start()

    def _gather(self, head: _Queued) -> list[_Queued]:
        """More queued jobs that can share ``head``'s decode batch."""
        if self.batch_size <= 1 or head.job.task != "text-generation":
            return []
        deadline = time.monotonic() + self.batch_window_seconds
        mates: list[_Queued] = []
        with self._cond:
            while len(mates) + 1 < self.batch_size:
                for item in list(self._queue):
                    if len(mates) + 1 >= self.batch_size:
                        break
                    if item.job.model == head.job.model and item.job.task == "text-generation":
                        self._queue.remove(item)
                        mates.append(item)
                left = deadline - time.monotonic()
                if len(mates) + 1 >= self.batch_size or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
        return mates

    # ------------------------------------------------------------ running
    def _run_batch(self, batch: list[_Queued], devices: list[Device]) -> None:
        try:
            results = self._execute(batch, devices)
        except BaseException as exc:  # a bug must still answer every job
            log.exception("batch failed")
            results = [_failed(i.job, ExecutionError(f"internal error: {exc}")) for i in batch]
        finally:
            with self._cond:
                for d in devices:
                    self._slots[d.id] -= 1
                for item in batch:
                    self._running.discard(id(item))
                self._cond.notify_all()
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
            _log_result(result)

    def _execute(self, batch: list[_Queued], devices: list[Device]) -> list[JobResult]:
        spec = batch[0].spec
        assert spec is not None
        started = time.monotonic()
        for item in batch:
            item.future.set_running_or_notify_cancel()
        try:
            with self.pool.use(spec, devices, weights=self.weights, dtype=self.dtype) as (
                    loaded, load_seconds):
                if spec.task == "embedding":
                    return [self._run_embedding(loaded, item, load_seconds, started)
                            for item in batch]
                return self._run_generation(loaded, batch, load_seconds, started)
        except EngineError as exc:
            return [_failed(item.job, exc) for item in batch]
        except Exception as exc:
            err = _classify(exc)
            release_memory(devices)
            return [_failed(item.job, err) for item in batch]

    def _deadline(self, start: float) -> float:
        return start + self.job_timeout if self.job_timeout else float("inf")

    def _run_embedding(self, loaded: LoadedModel, item: _Queued, load_seconds: float,
                       queued_until: float) -> JobResult:
        from engine.tasks.embedding import count_tokens, embed

        job = item.job
        window = self.meter.window(loaded.devices)
        try:
            lengths = count_tokens(loaded, job)
            with window:
                output = embed(loaded, job)
            measured = window.stop()
            if measured.wall_seconds > (self.job_timeout or float("inf")):
                raise JobTimeoutError(f"job {job.job_id} took {measured.wall_seconds:.1f} s, "
                                      f"past its limit of {self.job_timeout} s")
            if item.cancelled.is_set():
                raise JobCancelledError(f"job {job.job_id} was cancelled")
        except EngineError as exc:
            return _failed(job, exc)
        except Exception as exc:
            release_memory(loaded.devices)
            return _failed(job, _classify(exc))
        metrics = _metrics(measured, measured, load_seconds=load_seconds,
                           prompt_tokens=sum(lengths), completion_tokens=0,
                           queue_seconds=queued_until - item.submitted,
                           gpu_seconds=measured.gpu_seconds,
                           gpu_busy_seconds=measured.gpu_busy_seconds,
                           energy_joules=measured.energy_joules)
        return self._completed(job, loaded, output, metrics, 1, "encoder")

    def _run_generation(self, loaded: LoadedModel, batch: list[_Queued], load_seconds: float,
                        queued_until: float) -> list[JobResult]:
        from engine.tasks.generation import GenerationRequest, encode_prompt

        results: dict[int, JobResult] = {}
        requests: list[tuple[int, GenerationRequest]] = []
        for n, item in enumerate(batch):
            try:
                ids = encode_prompt(loaded, item.job)
            except EngineError as exc:
                results[n] = _failed(item.job, exc)
                continue
            requests.append((n, GenerationRequest(job=item.job, prompt_ids=ids,
                                                  cancelled=item.cancelled.is_set)))
        if requests:
            reqs = [r for _, r in requests]
            outcomes, held, own, decode = self._decode(loaded, reqs)
            work = [len(r.prompt_ids) + len(o.token_ids) if isinstance(o, GenerationOutput)
                    else len(r.prompt_ids) for r, o in zip(reqs, outcomes, strict=True)]
            gpu = share_by_work(held.gpu_seconds, work)
            busy = share_by_work(held.gpu_busy_seconds, work) if held.gpu_busy_seconds is not None \
                else [None] * len(work)
            energy = share_by_work(held.energy_joules, work) if held.energy_joules is not None \
                else [None] * len(work)
            for k, ((n, req), outcome) in enumerate(zip(requests, outcomes, strict=True)):
                job = batch[n].job
                if isinstance(outcome, Exception):
                    err = outcome if isinstance(outcome, EngineError) else _classify(outcome)
                    results[n] = _failed(job, err)
                    continue
                metrics = _metrics(own[k], held, load_seconds=load_seconds,
                                   prompt_tokens=len(req.prompt_ids),
                                   completion_tokens=len(outcome.token_ids),
                                   queue_seconds=queued_until - batch[n].submitted,
                                   gpu_seconds=gpu[k], gpu_busy_seconds=busy[k],
                                   energy_joules=energy[k], shared=len(reqs) > 1)
                results[n] = self._completed(job, loaded, outcome, metrics, len(reqs), decode)
        return [results[n] for n in range(len(batch))]

    def _wants_static(self, loaded: LoadedModel) -> bool:
        if loaded.key in self._static_broken or self.decode == "dynamic":
            return False
        return self.decode == "static" or loaded.devices[0].kind == "cuda"

    def _decode(self, loaded: LoadedModel, requests: list[GenerationRequest]
                ) -> tuple[list[GenerationOutput | Exception], Measurement, list[Measurement], str]:
        """Decode on the fast path where it applies; if that path breaks for a reason that is
        not the job's, log it, use the dynamic-cache loop for this model from now on, and
        run the jobs again there."""
        from engine.tasks.static_decode import decode_label

        if len(requests) == 1 and self._wants_static(loaded):
            try:
                return (*self._decode_with(loaded, requests, static=True), decode_label(loaded))
            except Exception as exc:
                log.warning("the static-cache decode path failed on %s (%s: %s); using the "
                            "dynamic-cache path for this model from now on", loaded.key,
                            type(exc).__name__, exc)
                self._static_broken.add(loaded.key)
                release_memory(loaded.devices)
        return (*self._decode_with(loaded, requests, static=False), "dynamic-cache")

    def _decode_with(self, loaded: LoadedModel, requests: list[GenerationRequest], *,
                     static: bool
                     ) -> tuple[list[GenerationOutput | Exception], Measurement, list[Measurement]]:
        """One decode under the model's lock, with fresh windows: the outcomes, the device
        window's measurement and each job's own."""
        from engine.tasks.generation import generate
        from engine.tasks.static_decode import generate_static

        shared = len(requests) > 1
        # Alone, a job's window is the device window; in a batch each job
        # gets a clock and the device window is shared by token work.
        device_window = self.meter.window(loaded.devices)
        windows = [MeterWindow([], None, track_memory=False) if shared else device_window
                   for _ in requests]
        with loaded.lock:
            device_window.start()
            now = time.monotonic()
            for req, window in zip(requests, windows, strict=True):
                if shared:
                    window.start()
                req.window = window
                req.deadline = self._deadline(now)
            outcomes: list[GenerationOutput | Exception]
            try:
                if static:
                    try:
                        outcomes = [generate_static(loaded, requests[0])]
                    except EngineError as exc:
                        outcomes = [exc]
                else:
                    outcomes = generate(loaded, requests)
            except Exception:
                device_window.stop()
                raise
            held = device_window.stop()
        return outcomes, held, [w.stop() for w in windows]

    def _completed(self, job: Job, loaded: LoadedModel, output: GenerationOutput | EmbeddingOutput,
                   metrics: Metrics, batch_size: int, decode: str = "dynamic-cache") -> JobResult:
        profile = ExecutionProfile(
            model=loaded.spec.name, weights=loaded.weights, weights_digest=loaded.weights_digest,
            dtype=loaded.dtype_name, device_class=loaded.device_class,
            device_count=len(loaded.devices), torch_version=_version("torch"),
            transformers_version=_version("transformers"), engine_version=ENGINE_VERSION,
            hash_version=HASH_VERSION, decode=decode, batched=batch_size > 1,
            batch_size=batch_size)
        return JobResult(job_id=job.job_id, model=job.model, task=job.task, status="completed",
                         output=output, result_hash=result_hash(job, output, loaded.weights_digest),
                         metrics=metrics, profile=profile)


def _metrics(own: Measurement, held: Measurement, *, load_seconds: float, prompt_tokens: int,
             completion_tokens: int, queue_seconds: float, gpu_seconds: float,
             gpu_busy_seconds: float | None, energy_joules: float | None,
             shared: bool = False) -> Metrics:
    """A job's metrics: its own clock (wall, token times) and its share of the device window."""
    return Metrics(execution_time_seconds=own.wall_seconds, gpu_time_seconds=gpu_seconds,
                   load_time_seconds=load_seconds, device=held.device, gpu_count=held.gpu_count,
                   measurement=held.method + ("+shared-by-token-work" if shared else ""),
                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   ttft_seconds=own.ttft_seconds, tpot_seconds=own.tpot_seconds,
                   gpu_busy_seconds=gpu_busy_seconds, energy_joules=energy_joules,
                   peak_memory_bytes=held.peak_memory_bytes, queue_seconds=queue_seconds)


def _classify(exc: BaseException) -> EngineError:
    """Map an unexpected exception from inside a job to a typed engine error."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return DeviceOutOfMemoryError(f"the device ran out of memory: {exc}")
    return ExecutionError(f"{type(exc).__name__}: {exc}")


def _failed(job: Job, err: EngineError) -> JobResult:
    return JobResult(job_id=job.job_id, model=job.model, task=job.task, status="failed",
                     error=JobErrorInfo(code=err.code, message=err.message, field=err.field))


def _log_result(result: JobResult) -> None:
    if result.ok and result.metrics is not None:
        log.info("job %s model=%s hash=%s exec=%.3fs gpu=%.3fs", result.job_id, result.model,
                 result.result_hash, result.metrics.execution_time_seconds,
                 result.metrics.gpu_time_seconds)
    elif result.error is not None:
        log.warning("job %s model=%s failed: %s: %s", result.job_id, result.model,
                    result.error.code, result.error.message)
