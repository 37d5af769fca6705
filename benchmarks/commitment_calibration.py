"""Calibrate the activation-commitment thresholds: honest profiles against forged models.

For each model (the tiny local GPT-2 and, unless ``--no-smollm2``, the shipped
``smollm2-135m``) this runs the same jobs through the engine under every execution
profile this CPU machine can produce -- float32, bfloat16, float16, alone and batched
(``Engine(batch_size=4)``), the engine's row-invariant CPU kernel and torch's BLAS
(``AITBC_ENGINE_LINEAR=blas``) -- and measures each result's commitment against the
hidden states a float32 verifier recomputes (:func:`engine.commitment.measure`): the
worst index overlap and the worst median / max relative value error over every
committed position. Then the same for forgeries, where the whole result (tokens and
commitment) comes from a tampered model: weights rounded to fp8 e4m3 (per-tensor
scale), int8 (per output channel), an early exit (the last third of the layers
dropped), and another model (a tiny GPT-2 of another seed; random ``smollm2-135m``
weights). Finally the cost of the commitment for a 64-token ``smollm2-135m`` job.

Usage: ``python benchmarks/commitment_calibration.py [--no-smollm2] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from conftest import make_tiny_gpt2, tiny_entry, write_registry

from engine.commitment import (
    BY_DTYPE,
    Commitment,
    Thresholds,
    compute_commitment,
    measure,
    thresholds_for,
)
from engine.executor import Engine
from engine.hardware import discover
from engine.jobs import GenerationOutput, GenerationParams, Job, JobResult
from engine.loading import LoadedModel
from engine.pool import ModelPool
from engine.registry import Registry
from engine.tasks.generation import GenerationRequest, encode_prompt, generate
from engine.verify import teacher_forced_pass

TINY, TINY_B, SMOL = "tiny-gpt2", "tiny-gpt2-b", "smollm2-135m"
TINY_PROMPTS = ["Hello GPU", "The quick brown fox", "Paris is the capital of", "A miner runs",
                "Numbers: 0 1 2", "The end of the text", "Berlin is", "hello network"]
SMOL_PROMPTS = ["The capital of France is", "Once upon a time,", "def add(a, b):",
                "Water boils at"]
PARAMS = [{"max_tokens": 32}, {"max_tokens": 32, "temperature": 0.8, "top_k": 40, "seed": 3}]


def make_jobs(model: str, prompts: Sequence[str]) -> list[Job]:
    """Every prompt with a greedy and a sampled parameter set."""
    return [Job(job_id=f"{model}-{i}-{k}", model=model, prompt=p,
                params=GenerationParams(**params))
            for i, p in enumerate(prompts) for k, params in enumerate(PARAMS)]


@contextmanager
def linear(kind: str) -> Iterator[None]:
    """``AITBC_ENGINE_LINEAR`` set to ``kind`` ("" = the engine's CPU kernel) meanwhile."""
    old = os.environ.get("AITBC_ENGINE_LINEAR")
    os.environ["AITBC_ENGINE_LINEAR"] = kind
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AITBC_ENGINE_LINEAR", None)
        else:
            os.environ["AITBC_ENGINE_LINEAR"] = old


def run_profile(registry: Path, jobs: Sequence[Job], *, dtype: str, batch: int,
                kind: str) -> list[JobResult]:
    """The jobs' results from a fresh engine on the CPU (submitted at once, so they batch)."""
    with linear(kind), Engine(registry, devices=["cpu"], dtype=dtype, batch_size=batch,
                              pool=ModelPool(show_progress=False)) as engine:
        handles = [engine.submit(j) for j in jobs]
        results = [h.result(timeout=3600) for h in handles]
    for r in results:
        if not r.ok:
            raise SystemExit(f"{r.job_id} failed under {dtype}/{batch}/{kind}: {r.error}")
    return results


# ------------------------------------------------------------------ tampered models

def _weights(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, int]]:
    """Every Linear / Conv1D weight with its output-channel axis."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            yield module.weight, 0
        elif type(module).__name__ == "Conv1D":  # GPT-2: weight is [in, out]
            yield module.weight, 1


def fp8_weights(model: torch.nn.Module) -> None:
    """Round every linear weight to fp8 e4m3 with one scale per tensor."""
    with torch.no_grad():
        for w, _ in _weights(model):
            scale = w.abs().max().clamp(min=1e-12) / 448.0
            w.copy_((w / scale).to(torch.float8_e4m3fn).float() * scale)


def int8_weights(model: torch.nn.Module) -> None:
    """Round every linear weight to int8 with one scale per output channel."""
    with torch.no_grad():
        for w, axis in _weights(model):
            amax = w.abs().amax(dim=1 - axis, keepdim=True).clamp(min=1e-12)
            scale = amax / 127.0
            w.copy_((w / scale).round().clamp(-127, 127) * scale)


def early_exit(model: Any) -> None:
    """Drop the last third of the decoder layers."""
    base = model.base_model
    blocks = base.layers if hasattr(base, "layers") else base.h
    keep = max(1, len(blocks) - math.ceil(len(blocks) / 3))
    new = torch.nn.ModuleList(list(blocks)[:keep])
    if hasattr(base, "layers"):
        base.layers = new
    else:
        base.h = new
    cfg = model.config
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, name):
            setattr(cfg, name, keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:keep]


def tampered(loaded: LoadedModel, change: Callable[[Any], None]) -> LoadedModel:
    """A copy of a loaded model with ``change`` applied to its module."""
    model = copy.deepcopy(loaded.model)
    change(model)
    return dataclasses.replace(loaded, model=model, lock=threading.Lock(), fast_paths={})


def forged_outputs(loaded: LoadedModel, jobs: Sequence[Job]) -> list[GenerationOutput]:
    """The jobs run alone on ``loaded``: tokens and commitment both from that model."""
    outs = []
    for job in jobs:
        req = GenerationRequest(job=job, prompt_ids=encode_prompt(loaded, job))
        out = generate(loaded, [req])[0]
        if isinstance(out, Exception):
            raise out
        outs.append(out)
    return outs


# ------------------------------------------------------------------ measuring

def distances(ref: LoadedModel, jobs: Sequence[Job], outputs: Sequence[GenerationOutput],
              dtypes: Sequence[str]) -> dict[str, Any]:
    """Worst distances of the outputs' commitments from the float32 reference's hidden states."""
    overlaps, medians, maxes = [], [], []
    for job, out in zip(jobs, outputs, strict=True):
        assert out.commitment is not None
        ids = encode_prompt(ref, job)
        _, hidden = teacher_forced_pass(ref, ids, out.token_ids)
        found = measure(Commitment.decode(out.commitment), hidden)
        assert found.passed, found.reason
        overlaps += found.overlaps
        medians += found.median_errors
        maxes += found.max_errors
    row: dict[str, Any] = {"positions": len(overlaps), "min_overlap": min(overlaps),
                           "worst_median_error": max(medians), "worst_max_error": max(maxes),
                           "results": len(outputs)}
    for dtype in dtypes:  # rejected results if the claim names this dtype
        verdicts = [compare_row(thresholds_for(dtype), o, m, x)
                    for o, m, x in zip(overlaps, medians, maxes, strict=True)]
        row[f"failing_as_{dtype}"] = sum(1 for rows in _per_result(jobs, outputs, verdicts)
                                         if not all(rows))
    return row


def compare_row(t: Thresholds, overlap: float, median: float, worst: float) -> bool:
    """Whether one position passes thresholds ``t``."""
    return overlap >= t.min_overlap and median <= t.max_median_error and worst <= t.max_error


def _per_result(jobs: Sequence[Job], outputs: Sequence[GenerationOutput],
                verdicts: list[bool]) -> list[list[bool]]:
    rows, at = [], 0
    for _, out in zip(jobs, outputs, strict=True):
        count = Commitment.decode(out.commitment or "").positions
        rows.append(verdicts[at:at + count])
        at += count
    return rows


def calibrate(name: str, registry: Path, prompts: Sequence[str], other: tuple[str, str],
              profiles: Sequence[tuple[str, int, str]]) -> list[dict[str, Any]]:
    """Honest profiles and forgeries of one model; one table row each."""
    jobs = make_jobs(name, prompts)
    reg = Registry.load(registry)
    cpu = discover().device("cpu")
    rows: list[dict[str, Any]] = []
    with linear("blas"):
        pool = ModelPool(show_progress=False)
        ref_lease = pool.use(reg.get(name), [cpu], dtype="float32")
        ref, _ = ref_lease.__enter__()
    for dtype, batch, kind in profiles:
        started = time.perf_counter()
        results = run_profile(registry, jobs, dtype=dtype, batch=batch, kind=kind)
        outs = [r.output for r in results if isinstance(r.output, GenerationOutput)]
        row = {"model": name, "kind": "honest",
               "profile": f"{dtype} batch={batch} {kind or 'row-invariant'}",
               **distances(ref, jobs, outs, [dtype]), "seconds": time.perf_counter() - started}
        row["results_failing"] = row[f"failing_as_{dtype}"]
        rows.append(row)
        print(_line(row), flush=True)
    forgeries: list[tuple[str, LoadedModel]] = [
        ("fp8 e4m3 weights", tampered(ref, fp8_weights)),
        ("int8 per-channel weights", tampered(ref, int8_weights)),
        ("early exit (2/3 of layers)", tampered(ref, early_exit)),
    ]
    other_name, other_weights = other
    with linear("blas"):
        lease = pool.use(reg.get(other_name), [cpu], dtype="float32",
                         weights="random" if other_weights == "random" else "pretrained")
        other_loaded, _ = lease.__enter__()
    forgeries.append((f"another model ({other_name}, {other_weights})", other_loaded))
    for label, model in forgeries:
        started = time.perf_counter()
        outs = forged_outputs(model, jobs)
        row = {"model": name, "kind": "forged", "profile": label,
               **distances(ref, jobs, outs, ["float32", "bfloat16"]),
               "seconds": time.perf_counter() - started}
        row["results_failing"] = row["failing_as_bfloat16"]  # a forger claims the loosest
        rows.append(row)
        print(_line(row), flush=True)
    lease.__exit__(None, None, None)
    ref_lease.__exit__(None, None, None)
    return rows


def _line(row: dict[str, Any]) -> str:
    return (f"{row['model']:<13} {row['kind']:<6} {row['profile']:<40} "
            f"{row['positions']:>5} {row['min_overlap']:>8.3f} {row['worst_median_error']:>10.4g} "
            f"{row['worst_max_error']:>10.4g} {row['results_failing']:>3}/{row['results']:<3}"
            + (f" (as float32: {row['failing_as_float32']}/{row['results']})"
               if "failing_as_float32" in row and row["kind"] == "forged" else ""))


def commitment_cost(registry: Path) -> dict[str, float]:
    """The commitment's share of a 64-new-token smollm2-135m job's execution time (CPU, fp32)."""
    job = Job(job_id="cost", model=SMOL, prompt="Once upon a time, in a small village,",
              params=GenerationParams(max_tokens=64))
    with Engine(registry, devices=["cpu"], pool=ModelPool(show_progress=False)) as engine:
        engine.submit(job).result(timeout=600)  # warm
        runs = [engine.submit(job.model_copy(update={"job_id": f"cost-{i}"})).result(600)
                for i in range(3)]
        spec = engine.registry.get(SMOL)
        with engine.pool.use(spec, [discover().device("cpu")]) as (loaded, _):
            out = runs[0].output
            assert isinstance(out, GenerationOutput)
            ids = encode_prompt(loaded, job)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                compute_commitment(loaded, ids, out.token_ids)
                times.append(time.perf_counter() - t0)
    execs = sorted(r.metrics.execution_time_seconds for r in runs if r.metrics is not None)
    commit = sorted(times)[1]
    return {"execution_seconds_median": execs[1], "commitment_seconds_median": commit,
            "fraction_of_execution": commit / execs[1],
            "commitment_bytes": len(Commitment.decode(out.commitment or "").encode())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true", help="the tiny GPT-2 only")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tiny = make_tiny_gpt2(base / "a", seed=0)
        tiny_b = make_tiny_gpt2(base / "b", seed=1)
        registry = write_registry(base / "models.yaml", {TINY: tiny_entry(tiny),
                                                         TINY_B: tiny_entry(tiny_b)})
        print(f"{'model':<13} {'kind':<6} {'profile':<40} {'pos':>5} {'overlap':>8} "
              f"{'median err':>10} {'max err':>10} failing")
        all_profiles = [("float32", 1, ""), ("float32", 4, ""), ("float32", 1, "blas"),
                        ("float32", 4, "blas"), ("bfloat16", 1, ""), ("bfloat16", 4, ""),
                        ("float16", 1, "")]
        rows = calibrate(TINY, registry, TINY_PROMPTS, (TINY_B, "pretrained"), all_profiles)
        cost: dict[str, float] = {}
        if not args.no_smollm2:
            rows += calibrate(SMOL, registry, SMOL_PROMPTS, (SMOL, "random"), all_profiles)
            cost = commitment_cost(registry)
            print(f"commitment cost, smollm2-135m, 64 new tokens, CPU fp32: "
                  f"{cost['commitment_seconds_median']:.3f} s of "
                  f"{cost['execution_seconds_median']:.3f} s execution "
                  f"({100 * cost['fraction_of_execution']:.1f} %), "
                  f"{cost['commitment_bytes']} characters")
    honest = [r for r in rows if r["kind"] == "honest"]
    forged = [r for r in rows if r["kind"] == "forged"]
    print(f"worst honest: overlap {min(r['min_overlap'] for r in honest):.3f}, median error "
          f"{max(r['worst_median_error'] for r in honest):.4g}, max error "
          f"{max(r['worst_max_error'] for r in honest):.4g}; thresholds by claimed dtype "
          f"{ {k: (t.min_overlap, t.max_median_error, t.max_error) for k, t in BY_DTYPE.items()} }")
    print(f"forged results rejected (claiming bfloat16): "
          f"{sum(r['results_failing'] for r in forged)}/"
          f"{sum(r['results'] for r in forged)}; honest rejected: "
          f"{sum(r['results_failing'] for r in honest)}/{sum(r['results'] for r in honest)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cost": cost}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
