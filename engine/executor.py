"""Engine: takes jobs, places them on devices, runs them through pool, task, meter and hash.

``Engine.run(job)`` runs one job and waits; ``Engine.submit(job)`` queues it and
returns a :class:`JobHandle`. A dispatcher thread takes queued jobs in order,
waits until the devices a job needs have a free slot (``max_concurrent`` per
device; a model with ``gpu_count`` n holds n GPUs), prefers devices where the
model is already warm, gathers compatible generation jobs into one batch
(``batch_size``, ``batch_window_seconds``) and hands the batch to a runner
thread. While that batch decodes, jobs for the same model that queue later
take the rows that finished (never ahead of an earlier job for another model
that waits for the device), and each job's result is delivered when its own
row ends. Any failure inside a job becomes a failed :class:`JobResult`; the
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
from typing import Any, Literal

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
from engine.kernels import KERNEL_NAME
from engine.loading import LoadedModel, PoolKey, Weights
from engine.metering import BatchLedger, JobShare, Measurement, Meter, MeterWindow
from engine.pool import ModelPool, release_memory
from engine.registry import ModelSpec, Registry

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
                self._running.add(id(head))
                for d in devices:
                    self._slots[d.id] += 1
            batch = [head, *self._gather(head)]
            threading.Thread(target=self._run_batch, args=(batch, devices),
                             name=f"engine-run-{head.job.job_id[:8]}", daemon=True).start()

    def _batchable(self, item: _Queued, model: str) -> bool:
        return item.job.task == "text-generation" and item.job.model == model

    def _take_mates(self, model: str, limit: int, *, in_order: bool) -> list[_Queued]:
        """Up to ``limit`` queued generation jobs for ``model``, taken off the queue as running.

        ``in_order`` stops at the first queued job that cannot come along and is
        itself waiting for a device, so a running batch never overtakes it.
        Call with ``self._cond`` held.
        """
        mates: list[_Queued] = []
        for item in list(self._queue):
            if len(mates) >= limit:
                break
            if self._batchable(item, model):
                self._queue.remove(item)
                self._running.add(id(item))
                mates.append(item)
            elif in_order and item.spec is not None and self._free_set(item.spec) is None:
                break
        return mates

    def _gather(self, head: _Queued) -> list[_Queued]:
        """More queued jobs that can start ``head``'s decode batch with it."""
        if self.batch_size <= 1 or head.job.task != "text-generation":
            return []
        deadline = time.monotonic() + self.batch_window_seconds
        mates: list[_Queued] = []
        with self._cond:
            while len(mates) + 1 < self.batch_size:
                mates += self._take_mates(head.job.model, self.batch_size - 1 - len(mates),
                                          in_order=False)
                left = deadline - time.monotonic()
                if len(mates) + 1 >= self.batch_size or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
        return mates

    def _join_queued(self, model: str, free: int) -> list[_Queued]:
        """Queued jobs that take free rows of a running batch between two decode steps."""
        with self._cond:
            return self._take_mates(model, free, in_order=True)

    # ------------------------------------------------------------ running
    def _run_batch(self, batch: list[_Queued], devices: list[Device]) -> None:
        run = _Run(self, list(batch))
        try:
            self._execute(run, devices)
        except BaseException as exc:  # a bug must still answer every job
            log.exception("batch failed")
            run.fail_open(ExecutionError(f"internal error: {exc}"))
        finally:
            run.fail_open(ExecutionError("internal error: the job ended without a result"))
            with self._cond:
                for d in devices:
                    self._slots[d.id] -= 1
                self._cond.notify_all()

    def _execute(self, run: _Run, devices: list[Device]) -> None:
        spec = run.items[0].spec
        assert spec is not None
        started = time.monotonic()
        for item in run.items:
            item.future.set_running_or_notify_cancel()
        try:
            with self.pool.use(spec, devices, weights=self.weights, dtype=self.dtype) as (
                    loaded, load_seconds):
                if loaded.linear_kernel == KERNEL_NAME:
                    from engine.kernels.rowgemm import hand_threads_to_kernel

                    hand_threads_to_kernel()  # this thread is the batch's own
                if spec.task == "embedding":
                    for item in list(run.items):
                        run.deliver(item, self._run_embedding(loaded, item, load_seconds,
                                                              started))
                    return
                self._run_generation(loaded, run, load_seconds, started)
        except EngineError as exc:
            run.fail_open(exc)
        except Exception as exc:
            err = _classify(exc)
            release_memory(devices)
            run.fail_open(err)

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
        metrics = _metrics(measured, JobShare.alone(measured), load_seconds=load_seconds,
                           prompt_tokens=sum(lengths), completion_tokens=0,
                           queue_seconds=queued_until - item.submitted)
        return self._completed(job, loaded, output, metrics, 1, "encoder")

    def _run_generation(self, loaded: LoadedModel, run: _Run, load_seconds: float,
                        started: float) -> None:
        """Decode the run's jobs; on the dynamic path, queued jobs join as rows come free."""
        if len(run.items) == 1 and self._wants_static(loaded):
            result = self._run_static(loaded, run.items[0], load_seconds, started)
            if result is not None:
                run.deliver(run.items[0], result)
                return
        self._run_rolling(loaded, run, load_seconds, started)

    def _run_static(self, loaded: LoadedModel, item: _Queued, load_seconds: float,
                    started: float) -> JobResult | None:
        """One job on the static-cache fast path; None when the path itself broke (it is then
        logged and not used for this model again)."""
        from engine.tasks.generation import GenerationRequest, encode_prompt
        from engine.tasks.static_decode import decode_label, generate_static

        held = self.meter.window(loaded.devices)
        clock = self.meter.clock()
        with loaded.lock:
            held.start()
            clock.start()
            try:
                req = GenerationRequest(job=item.job, window=clock,
                                        deadline=self._deadline(time.monotonic()),
                                        cancelled=item.cancelled.is_set,
                                        prompt_ids=encode_prompt(loaded, item.job))
                outcome: GenerationOutput | Exception = generate_static(loaded, req)
            except EngineError as exc:
                outcome = exc
            except Exception as exc:
                held.stop()
                log.warning("the static-cache decode path failed on %s (%s: %s); using the "
                            "dynamic-cache path for this model from now on", loaded.key,
                            type(exc).__name__, exc)
                self._static_broken.add(loaded.key)
                release_memory(loaded.devices)
                return None
            own, measured = clock.stop(), held.stop()
        if isinstance(outcome, Exception):
            return _failed(item.job, _classify(outcome))
        metrics = _metrics(own, JobShare.alone(measured), load_seconds=load_seconds,
                           prompt_tokens=len(req.prompt_ids),
                           completion_tokens=len(outcome.token_ids),
                           queue_seconds=started - item.submitted)
        return self._completed(item.job, loaded, outcome, metrics, 1, decode_label(loaded))

    def _run_rolling(self, loaded: LoadedModel, run: _Run, load_seconds: float,
                     started: float) -> None:
        """The dynamic-cache loop over a batch whose rows come and go between steps.

        Each job has its own clock window; the devices' windows are kept by a
        :class:`BatchLedger` and shared by token work among the jobs in each.
        A job's result is delivered the moment its row ends.
        """
        from engine.tasks.generation import DecodeBatch, GenerationRequest, encode_prompt

        batch = DecodeBatch(loaded)
        ledger = BatchLedger(self.meter, loaded.devices)
        # id(request) -> (item, request, queue seconds, load seconds)
        rows: dict[int, tuple[_Queued, GenerationRequest, float, float]] = {}

        def finish(ended: list[tuple[GenerationRequest, GenerationOutput | Exception]]) -> None:
            shares = ledger.leave([id(req) for req, _ in ended])
            for req, outcome in ended:
                item, _, queued, load = rows.pop(id(req))
                if isinstance(outcome, Exception):
                    run.deliver(item, _failed(item.job, _classify(outcome)))
                    continue
                assert req.window is not None
                share = shares[id(req)]
                metrics = _metrics(req.window.stop(), share, load_seconds=load,
                                   prompt_tokens=len(req.prompt_ids),
                                   completion_tokens=len(outcome.token_ids),
                                   queue_seconds=queued)
                run.deliver(item, self._completed(item.job, loaded, outcome, metrics,
                                                  share.peak_batch, "dynamic-cache"))

        def admit(items: list[_Queued], load: float, queued_until: float | None) -> None:
            joining: list[GenerationRequest] = []
            clocks: list[tuple[int, MeterWindow, int]] = []
            for item in items:
                clock = self.meter.clock().start()
                now = time.monotonic()
                try:
                    ids = encode_prompt(loaded, item.job)
                except EngineError as exc:
                    run.deliver(item, _failed(item.job, exc))
                    continue
                req = GenerationRequest(job=item.job, window=clock,
                                        deadline=self._deadline(now),
                                        cancelled=item.cancelled.is_set, prompt_ids=ids)
                rows[id(req)] = (item, req, (queued_until or now) - item.submitted, load)
                joining.append(req)
                clocks.append((id(req), clock, len(ids)))
            if joining:
                ledger.join_many(clocks)
                finish(batch.add(joining))

        with loaded.lock:
            try:
                admit(list(run.items), load_seconds, started)
                while len(batch):
                    finish(batch.step())
                    free = self.batch_size - len(batch)
                    if free > 0 and len(batch) and batch.mergeable:
                        joined = self._join_queued(loaded.spec.name, free)
                        if joined:
                            for item in joined:
                                item.future.set_running_or_notify_cancel()
                            run.items.extend(joined)
                            admit(joined, 0.0, None)
            except Exception as exc:
                err = _classify(exc)
                batch.abort()
                release_memory(loaded.devices)
                for item, _, _, _ in rows.values():
                    run.deliver(item, _failed(item.job, err))
                rows.clear()
            finally:
                ledger.close()

    def _wants_static(self, loaded: LoadedModel) -> bool:
        if loaded.key in self._static_broken or self.decode == "dynamic":
            return False
        return self.decode == "static" or loaded.devices[0].kind == "cuda"

    def _completed(self, job: Job, loaded: LoadedModel, output: GenerationOutput | EmbeddingOutput,
                   metrics: Metrics, batch_size: int, decode: str = "dynamic-cache") -> JobResult:
        profile = ExecutionProfile(
            model=loaded.spec.name, weights=loaded.weights, weights_digest=loaded.weights_digest,
            dtype=loaded.dtype_name, device_class=loaded.device_class,
            device_count=len(loaded.devices), torch_version=_version("torch"),
            transformers_version=_version("transformers"), engine_version=ENGINE_VERSION,
            hash_version=HASH_VERSION, decode=decode, batched=batch_size > 1,
            batch_size=batch_size, linear_kernel=loaded.linear_kernel)
        return JobResult(job_id=job.job_id, model=job.model, task=job.task, status="completed",
                         output=output, result_hash=result_hash(job, output, loaded.weights_digest),
                         metrics=metrics, profile=profile)


def _metrics(own: Measurement, share: JobShare, *, load_seconds: float, prompt_tokens: int,
             completion_tokens: int, queue_seconds: float) -> Metrics:
    """A job's metrics: its own clock (wall, token times) and its share of the device windows."""
    shared = share.peak_batch > 1
    return Metrics(execution_time_seconds=own.wall_seconds, gpu_time_seconds=share.gpu_seconds,
                   load_time_seconds=load_seconds, device=share.device,
                   gpu_count=share.gpu_count,
                   measurement=share.method + ("+shared-by-token-work" if shared else ""),
                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   ttft_seconds=own.ttft_seconds, tpot_seconds=own.tpot_seconds,
                   gpu_busy_seconds=share.gpu_busy_seconds, energy_joules=share.energy_joules,
                   peak_memory_bytes=share.peak_memory_bytes, queue_seconds=queue_seconds)


class _Run:
    """The jobs one runner thread answers: those it started with and those that joined."""

    def __init__(self, engine: Engine, items: list[_Queued]):
        self.engine = engine
        self.items = items
        self._answered: set[int] = set()

    def deliver(self, item: _Queued, result: JobResult) -> None:
        """Answer one job (once), and let the dispatcher know it left the device."""
        if id(item) in self._answered:
            return
        self._answered.add(id(item))
        with self.engine._cond:
            self.engine._running.discard(id(item))
            self.engine._cond.notify_all()
        if not item.future.done():
            item.future.set_result(result)
        _log_result(result)

    def fail_open(self, err: EngineError) -> None:
        """Answer every job not answered yet with ``err``."""
        for item in list(self.items):
            if id(item) not in self._answered:
                self.deliver(item, _failed(item.job, err))


def _classify(exc: BaseException) -> EngineError:
    """Map an exception from inside a job to a typed engine error (a typed one stays itself)."""
    import torch

    if isinstance(exc, EngineError):
        return exc
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
