"""Benchmark scenarios, run through the same :class:`~engine.Engine` and Meter as real jobs.

* ``load``: cold load (first in this process), reloads after eviction, a warm pool hit.
* ``single``: one job at a time over a grid of prompt lengths and new-token counts.
* ``offline``: ``B`` jobs submitted at once to ``Engine(batch_size=B)``, which gathers
  them into one decode batch; each result's ``profile.batch_size`` is recorded.

Single-stream jobs run in the configuration ``run``, ``serve`` and ``mine`` use
(torch's default thread count, the engine's default batch size, ``decode="auto"``)
unless the config says otherwise (``threads``, ``batch_size``, ``decode``); the
report records it (``environment.run_config``) with the cost model fitted on
those runs, so that ``price`` can tell when an estimate is for another one.

Prompts are seeded random token ids of exact length (``prompt_token_ids``, no
special tokens), decoded greedily to ``max_tokens``. Each point first runs
``warmup_runs`` discarded runs, then repeats until both ``min_runs`` and
``min_seconds`` are reached (at most ``max_runs``); raw per-run values are kept.
"""

from __future__ import annotations

import functools
import gc
import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.base import package_version
from engine.bench.report import (
    BatchRecord,
    BenchConfig,
    Checks,
    Environment,
    LoadResult,
    OfflinePoint,
    PointMetrics,
    Report,
    RunRecord,
    SinglePoint,
    with_cost_model,
)
from engine.bench.roofline import Roofline, device_bandwidth, kv_bytes_per_token
from engine.bench.run_config import recorded_run_config
from engine.bench.stats import summarize
from engine.errors import EngineError
from engine.executor import Engine, JobHandle
from engine.hardware import Device, Nvml
from engine.jobs import GenerationOutput, GenerationParams, Job, JobResult
from engine.loading import LoadedModel
from engine.metering import Meter, MeterWindow
from engine.registry import Registry

QUICK = {"scenarios": ["load", "single", "offline"], "prompt_tokens": [16, 64],
         "new_tokens": [8, 24], "batch_sizes": [1, 2, 4], "offline_prompt_tokens": 16,
         "offline_new_tokens": 16, "min_runs": 2, "min_seconds": 0.5, "warmup_runs": 1,
         "load_repeats": 1, "quick": True}


class BenchError(EngineError):
    """A benchmark could not run as asked (a failed job, a bad grid)."""

    code = "bench_error"


def quick_config(model: str, **overrides: Any) -> BenchConfig:
    """The ``--quick`` configuration: a small grid and two measured runs per point, in the
    configuration jobs run in (torch's default threads, as ``run``; ``threads=1`` pins one,
    which the report records and ``price`` warns about)."""
    return BenchConfig(model=model, **{**QUICK, **overrides})


@dataclass
class RecordingMeter(Meter):
    """The engine's :class:`Meter`, keeping each job clock it opens so the bench can read
    the per-token timestamps (inter-token latency) that :class:`Metrics` summarises."""

    recorded: list[MeterWindow] = field(default_factory=list, init=False)

    def clock(self) -> MeterWindow:
        """A new job clock, remembered."""
        w = super().clock()
        self.recorded.append(w)
        return w

    def take(self) -> list[MeterWindow]:
        """The job clocks opened since the last call."""
        out, self.recorded = self.recorded, []
        return out


class _Progress:
    """Rich progress bars on stderr (or nothing)."""

    def __init__(self, enabled: bool, total: int):
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("bench", total=total)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def make_prompt_ids(length: int, vocab_size: int, *, seed: int,
                    avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``length`` seeded random token ids in ``[0, vocab_size)``, none of them in ``avoid``."""
    if length < 1:
        raise BenchError(f"prompt length {length} must be at least 1", field="prompt_tokens")
    rng = random.Random(seed * 1_000_003 + length)
    ids: list[int] = []
    while len(ids) < length:
        token = rng.randrange(vocab_size)
        if token not in avoid:
            ids.append(token)
    return ids


def _check_config(config: BenchConfig, context_length: int) -> None:
    for name in ("prompt_tokens", "new_tokens", "batch_sizes"):
        values = getattr(config, name)
        if not values or any(v < 1 for v in values):
            raise BenchError(f"{name.replace('_', '-')} must be a list of positive integers",
                             field=name)
    if config.min_runs < 1 or config.max_runs < config.min_runs:
        raise BenchError("min-runs must be at least 1 and at most max-runs", field="min_runs")
    if config.batch_size is not None and config.batch_size < 1:
        raise BenchError("batch-size must be at least 1", field="batch_size")
    shapes = [(p, n) for p in config.prompt_tokens for n in config.new_tokens]
    shapes.append((config.offline_prompt_tokens, config.offline_new_tokens))
    for p, n in shapes:
        if p + n > context_length:
            raise BenchError(f"a {p}-token prompt plus {n} new tokens exceeds the model's "
                             f"context length of {context_length}", field="prompt_tokens")


def _record(result: JobResult, latency: float, window: MeterWindow | None) -> RunRecord:
    if not result.ok or result.metrics is None or not isinstance(result.output, GenerationOutput):
        err = result.error
        raise BenchError(f"benchmark job {result.job_id} failed: "
                         f"{err.code + ': ' + err.message if err else 'no output'}")
    m = result.metrics
    itl: list[float] = []
    if window is not None:
        itl = window.stop().inter_token_seconds
    profile = result.profile
    return RunRecord(job_id=result.job_id, prompt_tokens=m.prompt_tokens,
                     completion_tokens=m.completion_tokens,
                     finish_reason=result.output.finish_reason, latency_seconds=latency,
                     execution_seconds=m.execution_time_seconds, ttft_seconds=m.ttft_seconds,
                     tpot_seconds=m.tpot_seconds, inter_token_seconds=itl,
                     gpu_seconds=m.gpu_time_seconds, queue_seconds=m.queue_seconds,
                     commitment_seconds=m.commitment_seconds, energy_joules=m.energy_joules,
                     peak_memory_bytes=m.peak_memory_bytes,
                     batched=bool(profile and profile.batched),
                     batch_size=profile.batch_size if profile else 1, measurement=m.measurement)


def _repeat(config: BenchConfig, once: Callable[[], float]) -> tuple[int, float]:
    """Call ``once`` (returns its seconds) until min count and min duration are both met."""
    runs, spent = 0, 0.0
    while runs < config.max_runs and (runs < config.min_runs or spent < config.min_seconds):
        spent += once()
        runs += 1
    return runs, spent


def _metrics(runs: list[RunRecord], *, wall_seconds: float, requests: int, batch_size: int,
             device_count: int, is_gpu: bool, roofline: Roofline | None) -> PointMetrics:
    completion = sum(r.completion_tokens for r in runs)
    total = completion + sum(r.prompt_tokens for r in runs)
    latency = summarize(r.latency_seconds for r in runs)
    execution = summarize(r.execution_seconds for r in runs)
    assert latency is not None and execution is not None
    tpot = summarize(r.tpot_seconds for r in runs)
    decode_rate = batch_size / tpot.mean if tpot is not None and tpot.mean > 0 else None
    energy = [r.energy_joules for r in runs]
    joules = math.fsum(e for e in energy if e is not None) if all(
        e is not None for e in energy) else None
    mean_prompt = sum(r.prompt_tokens for r in runs) / len(runs)
    mean_completion = completion / len(runs)
    bound = eff = None
    if roofline is not None:
        bound = roofline.bound(mean_prompt + mean_completion / 2, batch_size)
        if decode_rate is not None:
            eff = decode_rate / bound
    peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
    gpu_total = math.fsum(r.gpu_seconds for r in runs)
    return PointMetrics(
        runs=len(runs), measured_seconds=wall_seconds, mean_prompt_tokens=mean_prompt,
        mean_completion_tokens=mean_completion,
        ttft=summarize(r.ttft_seconds for r in runs), tpot=tpot,
        itl=summarize(v for r in runs for v in r.inter_token_seconds),
        latency=latency, execution_time=execution,
        output_tokens_per_s=completion / wall_seconds, total_tokens_per_s=total / wall_seconds,
        requests_per_s=requests / wall_seconds, decode_tokens_per_s=decode_rate,
        peak_memory_bytes=max(peaks) if peaks else None,
        energy_joules=summarize(energy) if joules is not None else None,
        tokens_per_joule=total / joules if joules else None,
        gpu_seconds_per_1k_tokens=1000 * gpu_total / total if is_gpu and total else None,
        device_seconds_per_1k_tokens=1000 * wall_seconds * device_count / total if total else 0.0,
        roofline_bound_tokens_per_s=bound, roofline_efficiency=eff)


@contextmanager
def _nvml_session(devices: Sequence[Device]) -> Iterator[Nvml | None]:
    if not any(d.kind == "cuda" for d in devices):
        yield None
        return
    session = Nvml()
    try:
        yield session
    finally:
        session.close()


def _process_memory(device: Device) -> tuple[int | None, str]:
    if device.kind == "cuda" and device.index is not None:
        import torch

        return int(torch.cuda.memory_allocated(device.index)), \
            f"torch.cuda.memory_allocated on {device.id}"
    import psutil

    return int(psutil.Process().memory_info().rss), "resident set size of this process"


class _Bench:
    def __init__(self, config: BenchConfig, engine: Engine, meter: RecordingMeter,
                 progress: _Progress):
        self.config = config
        self.engine = engine
        self.meter = meter
        self.progress = progress
        self.device = engine.devices[0]
        self.loaded: LoadedModel | None = None
        self.roofline: Roofline | None = None
        self.avoid: set[int] = set()
        self.vocab = 0

    def job(self, prompt_tokens: int, new_tokens: int, index: int) -> Job:
        ids = make_prompt_ids(prompt_tokens, self.vocab, seed=self.config.seed + index,
                              avoid=self.avoid)
        return Job(model=self.config.model, prompt_token_ids=ids,
                   params=GenerationParams(max_tokens=new_tokens, temperature=0.0))

    # -------------------------------------------------------------- load
    def load(self, measure: bool) -> LoadResult | None:
        name = self.config.model
        t0 = time.perf_counter()
        self.loaded = self.engine.load(name)
        cold = time.perf_counter() - t0
        tokenizer = self.loaded.tokenizer
        specials = getattr(tokenizer, "all_special_ids", None) or []
        self.avoid = set(self.loaded.eos_token_ids()) | {int(i) for i in specials}
        self.vocab = int(self.loaded.model.config.vocab_size)
        if not measure:
            return None
        reloads: list[float] = []
        for _ in range(self.config.load_repeats):
            self.progress.describe(f"load: reload {len(reloads) + 1}/{self.config.load_repeats}")
            self.engine.evict(name)
            self.loaded = None
            gc.collect()
            t0 = time.perf_counter()
            self.loaded = self.engine.load(name)
            reloads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.loaded = self.engine.load(name)
        hit = time.perf_counter() - t0
        memory, method = _process_memory(self.device)
        return LoadResult(
            cold_load_seconds=cold, reload_seconds=reloads, reload=summarize(reloads),
            pool_hit_seconds=hit, weight_bytes=self.loaded.memory_bytes,
            memory_after_load_bytes=memory, memory_method=method,
            note="Cold: the first load in this process (the OS page cache may already hold "
                 "the files). Reload: after evicting the model from the pool, files cached. "
                 "Pool hit: asking for the model while it is warm.")

    # -------------------------------------------------------------- single
    def single(self) -> list[SinglePoint]:
        points = []
        for p in self.config.prompt_tokens:
            for n in self.config.new_tokens:
                self.progress.describe(f"single: prompt {p}, new {n}")
                job_index = 0

                def once(record: list[RunRecord] | None, p: int = p, n: int = n) -> float:
                    nonlocal job_index
                    job = self.job(p, n, job_index)
                    job_index += 1
                    self.meter.take()
                    t0 = time.perf_counter()
                    result = self.engine.run(job)
                    latency = time.perf_counter() - t0
                    windows = self.meter.take()
                    run = _record(result, latency, windows[-1] if windows else None)
                    if record is not None:
                        record.append(run)
                    return latency

                for _ in range(self.config.warmup_runs):
                    once(None)
                runs: list[RunRecord] = []
                _repeat(self.config, functools.partial(once, runs))
                metrics = _metrics(runs, wall_seconds=math.fsum(r.latency_seconds for r in runs),
                                   requests=len(runs), batch_size=1,
                                   device_count=self._device_count(),
                                   is_gpu=self.device.kind == "cuda", roofline=self.roofline)
                points.append(SinglePoint(prompt_tokens=p, new_tokens=n,
                                          warmup_runs=self.config.warmup_runs, metrics=metrics,
                                          runs=runs))
                self.progress.advance()
        return points

    def _device_count(self) -> int:
        return len(self.loaded.devices) if self.loaded is not None else 1

    # -------------------------------------------------------------- offline
    def offline(self) -> list[OfflinePoint]:
        cfg = self.config
        p, n = cfg.offline_prompt_tokens, cfg.offline_new_tokens
        points = []
        for size in cfg.batch_sizes:
            self.progress.describe(f"offline: batch {size}")
            with Engine(self.engine.registry, hardware=self.engine.hardware,
                        devices=[d.id for d in self.engine.devices], pool=self.engine.pool,
                        meter=self.engine.meter, weights=self.engine.weights,
                        dtype=self.engine.dtype, batch_size=size, decode=self.engine.decode,
                        batch_window_seconds=1.0) as batch_engine:
                counter = 0

                def once(record: list[BatchRecord] | None, size: int = size,
                         batch_engine: Engine = batch_engine) -> float:
                    nonlocal counter
                    jobs = [self.job(p, n, counter + k) for k in range(size)]
                    counter += size
                    t0 = time.perf_counter()
                    handles: list[JobHandle] = [batch_engine.submit(j) for j in jobs]
                    runs = []
                    for h in handles:
                        result = h.result()
                        runs.append(_record(result, time.perf_counter() - t0, None))
                    wall = time.perf_counter() - t0
                    if record is not None:
                        record.append(BatchRecord(wall_seconds=wall, jobs=runs))
                    return wall

                for _ in range(cfg.warmup_runs):
                    once(None)
                batches: list[BatchRecord] = []
                _repeat(cfg, functools.partial(once, batches))
            jobs = [j for b in batches for j in b.jobs]
            observed = sorted({j.batch_size for j in jobs})
            if observed == [size]:
                batching = "engine decode batch" if size > 1 else "single job"
            elif observed == [1]:
                batching = "sequential (the engine ran the jobs one at a time)"
            else:
                batching = f"partial (the engine formed batches of {observed})"
            metrics = _metrics(jobs, wall_seconds=math.fsum(b.wall_seconds for b in batches),
                               requests=len(jobs), batch_size=size,
                               device_count=self._device_count(),
                               is_gpu=self.device.kind == "cuda", roofline=self.roofline)
            points.append(OfflinePoint(batch_size=size, prompt_tokens=p, new_tokens=n,
                                       warmup_batches=cfg.warmup_runs, batching=batching,
                                       observed_batch_sizes=observed, metrics=metrics,
                                       batches=batches))
            self.progress.advance()
        return points


def _checks(single: list[SinglePoint], offline: list[OfflinePoint]) -> Checks:
    throughput = 0.0
    timeline = 0.0
    all_runs: list[RunRecord] = []
    for sp in single:
        tokens = sum(r.completion_tokens for r in sp.runs)
        latency = math.fsum(r.latency_seconds for r in sp.runs)
        throughput = max(throughput, abs(sp.metrics.output_tokens_per_s * latency / tokens - 1))
        all_runs += sp.runs
    for op in offline:
        tokens = sum(j.completion_tokens for b in op.batches for j in b.jobs)
        wall = math.fsum(b.wall_seconds for b in op.batches)
        throughput = max(throughput, abs(op.metrics.output_tokens_per_s * wall / tokens - 1))
        all_runs += [j for b in op.batches for j in b.jobs]
    for r in all_runs:
        if r.ttft_seconds is not None and r.tpot_seconds is not None and r.completion_tokens > 1:
            line = (r.ttft_seconds + (r.completion_tokens - 1) * r.tpot_seconds
                    + (r.commitment_seconds or 0.0))
            timeline = max(timeline, abs(line / r.execution_seconds - 1))
    return Checks(max_throughput_deviation=throughput, max_timeline_deviation=timeline)


def run_bench(config: BenchConfig, *, registry: Registry | str | Path | None = None,
              progress: bool = False, probe_bandwidth: bool = True) -> Report:
    """Run the configured scenarios and return the report (write it with ``write_report``)."""
    import torch

    started = time.perf_counter()
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    reg = registry if isinstance(registry, Registry) else Registry.load(registry)
    spec = reg.get(config.model)
    if spec.task != "text-generation":
        raise BenchError(f"model {spec.name!r} does {spec.task!r}; the benchmark measures "
                         "text-generation models", field="model")
    _check_config(config, spec.context_length)
    from engine.hardware import discover

    hardware = discover()
    devices = [hardware.device(config.device)] if config.device else (
        list(hardware.gpus[:max(1, spec.gpu_count)]) or [hardware.cpu])
    total = len(config.prompt_tokens) * len(config.new_tokens) * ("single" in config.scenarios) \
        + len(config.batch_sizes) * ("offline" in config.scenarios) + 1
    bar = _Progress(progress, total)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        if config.threads < 1:
            raise BenchError("threads must be at least 1", field="threads")
        torch.set_num_threads(config.threads)
    with _nvml_session(devices) as nvml:
        meter = RecordingMeter(nvml=nvml)
        engine = Engine(reg, hardware=hardware, devices=[d.id for d in devices], nvml=nvml,
                        meter=meter, weights=config.weights, dtype=config.dtype,
                        batch_size=config.batch_size, decode=config.decode)
        try:
            bench = _Bench(config, engine, meter, bar)
            bar.describe(f"load {config.model}")
            load = bench.load("load" in config.scenarios)
            bar.advance()
            loaded = bench.loaded
            assert loaded is not None
            bw = device_bandwidth(bench.device, probe=probe_bandwidth)
            if bw is not None:
                bench.roofline = Roofline(
                    bandwidth_gbps=bw[0], bandwidth_source=bw[1],
                    weight_bytes=loaded.memory_bytes,
                    kv_bytes_per_token=kv_bytes_per_token(loaded.model.config, loaded.dtype_name))
            single = bench.single() if "single" in config.scenarios else []
            run_config = recorded_run_config(engine, loaded)
            offline = bench.offline() if "offline" in config.scenarios else []
            fast_paths = [stats.to_dict() for stats in engine.fast_paths()]
        finally:
            engine.close()
            bar.close()
            torch.set_num_threads(threads_before)
    device = bench.device
    env = Environment(
        engine_version=package_version("aitbc-engine") or "unknown",
        python_version=platform.python_version(), torch_version=package_version("torch"),
        transformers_version=package_version("transformers"), platform=platform.platform(),
        device=device.to_dict(), driver_version=hardware.driver_version,
        cuda_version=hardware.cuda_version, cpu_name=hardware.cpu_name,
        cpu_cores=hardware.cpu_cores, torch_threads=run_config.torch_threads, model=spec.name,
        architecture=spec.architecture, parameters=spec.parameters, weights=config.weights,
        weights_digest=loaded.weights_digest, dtype=loaded.dtype_name,
        device_class=loaded.device_class, run_config=run_config)
    notes = []
    if run_config.torch_threads != threads_before:
        notes.append(f"jobs ran with {run_config.torch_threads} torch thread(s); run, serve and "
                     f"mine use torch's default here ({threads_before}): estimates from this "
                     "profile are for the benchmark's configuration")
    early = [r for sp in single for r in sp.runs if r.finish_reason != "length"]
    if early:
        notes.append(f"{len(early)} single-stream run(s) ended before max_tokens (EOS or stop); "
                     "their true token counts are used.")
    over = [sp for sp in single if (sp.metrics.roofline_efficiency or 0) > 1]
    if over:
        notes.append("a measured decode rate exceeds the roofline bound: the bandwidth figure "
                     "is too low for this machine (a probe taken under load?)")
    policy = {
        "configuration": "single-stream jobs run in the configuration run, serve and mine use "
                         "(torch's default threads, the engine's default batch size, "
                         "decode 'auto') unless threads, batch_size or decode say otherwise; "
                         "environment.run_config records it",
        "cost model": "fitted on the single-stream runs (engine.bench.cost_model): "
                      "execution seconds = fixed + prefill x prompt tokens + decode x output "
                      "tokens, least squares weighted by 1/seconds",
        "warm-up": f"{config.warmup_runs} discarded run(s) (offline: batch(es)) of the same "
                   "shape before each point; the model is loaded before any point",
        "repeats": f"each point repeats until at least {config.min_runs} measured run(s) AND "
                   f"{config.min_seconds:g} s of measured time (at most {config.max_runs} runs)",
        "prompts": "seeded random token ids of exact length (prompt_token_ids), no special "
                   "tokens; greedy decoding to max_tokens",
        "latency": "client side, from submit to result; execution time is the engine's "
                   "meter (Metrics.execution_time_seconds)",
        "ttft/tpot/itl": "from the meter's per-token timestamps: TTFT is the window start to "
                         "the first token, TPOT the mean gap after it, ITL every gap",
        "throughput": "tokens / summed latency (single stream) or / summed batch wall time "
                      "(offline); requests/s likewise",
        "peak memory": "the meter's peak_memory_bytes: CUDA max allocated on a GPU, growth of "
                       "the process's resident memory during the job on the CPU",
        "fast-path warm-up": "each decode-step capture (per model, dtype and cache-length "
                             "bucket) happens before a job's clock starts, billed to no job; "
                             "fast_paths lists each with its warm-up seconds",
        "offline batching": "B jobs submitted at once to Engine(batch_size=B), which gathers "
                            "them into one left-padded decode batch (the engine's own "
                            "batching); the batch size each job ran in is read from its "
                            "result's profile.batch_size ('observed')",
    }
    return with_cost_model(Report(
        created_at=created, duration_seconds=time.perf_counter() - started, environment=env,
        config=config, policy=policy, roofline=bench.roofline, load=load, single_stream=single,
        offline=offline, checks=_checks(single, offline), notes=notes, fast_paths=fast_paths))


def merge_reports(reports: Sequence[Report]) -> Report:
    """One report from several runs of the same single-stream grid (e.g. rounds interleaved
    with other work): each point's raw runs are concatenated and its metrics recomputed."""
    if not reports:
        raise BenchError("no reports to merge")
    first = reports[0]
    shapes = [(p.prompt_tokens, p.new_tokens) for p in first.single_stream]
    for other in reports[1:]:
        if [(p.prompt_tokens, p.new_tokens) for p in other.single_stream] != shapes or \
                other.environment.weights_digest != first.environment.weights_digest or \
                other.environment.run_config != first.environment.run_config:
            raise BenchError("only reports of the same model and grid (and run configuration) "
                             "can be merged")
    device = first.environment.device
    points = []
    for k, point in enumerate(first.single_stream):
        runs = [r for rep in reports for r in rep.single_stream[k].runs]
        metrics = _metrics(runs, wall_seconds=math.fsum(r.latency_seconds for r in runs),
                           requests=len(runs), batch_size=1, device_count=1,
                           is_gpu=device.get("kind") == "cuda", roofline=first.roofline)
        points.append(point.model_copy(update={"runs": runs, "metrics": metrics}))
    return with_cost_model(first.model_copy(update={
        "single_stream": points, "offline": [], "load": first.load,
        "duration_seconds": math.fsum(r.duration_seconds for r in reports),
        "checks": _checks(points, []),
        "notes": [*first.notes, f"merged from {len(reports)} rounds of the same grid"]}))
