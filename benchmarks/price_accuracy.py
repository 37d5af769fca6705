"""How good are price estimates? Build a profile, then run held-out job shapes for real.

    python benchmarks/price_accuracy.py [--model smollm2-135m] [--device cpu] [--out DIR]

1. Benchmarks the model single-stream over a grid of prompt lengths and new-token
   counts (``engine.bench``) and writes the report (the profile) to ``--out``.
2. Runs held-out shapes (prompt and output lengths that are not in the grid)
   through the engine.
3. Reads the cost model the benchmark fitted and stored in the profile
   (``engine.pricing.load_profile``) and compares each held-out job's median
   measured execution time with its estimate, passing the configuration the
   held-out jobs ran in (``engine.bench.run_config``): the estimate warns when
   it differs from the profile's.

Profile and held-out jobs run in the configuration ``run`` uses (torch's
default thread count, the engine's default batch size and decode path);
``--threads N`` pins both to N threads.

Steps 1 and 2 run in ``--rounds`` rounds (profile grid, then each held-out job
once), so that on a machine shared with other work the profile and the
held-out jobs see the same load; ``--rounds 1`` is "profile first, then jobs".
The held-out runs never enter the fit.

Prints one row per job and the median and worst relative error; exits 1 when
they miss the targets (median <= 10%, worst <= 25%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DEFAULT_HELD_OUT = "40x20,100x50,180x12,24x64,200x40,128x80"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        p, _, n = item.strip().partition("x")
        out.append((int(p), int(n)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the accuracy check; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--registry", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the profile and the held-out jobs (default: "
                             "torch's, as run uses; 1 keeps timings steady on a shared CPU)")
    parser.add_argument("--prompt-tokens", type=_ints, default=[16, 64, 256])
    parser.add_argument("--new-tokens", type=_ints, default=[8, 32, 96])
    parser.add_argument("--min-runs", type=int, default=1, help="grid runs per point per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (profile grid, held-out jobs); see the module doc")
    parser.add_argument("--held-out", type=_shapes, default=_shapes(DEFAULT_HELD_OUT),
                        help="PROMPTxNEW shapes, comma-separated (not in the grid)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per held-out job per round")
    parser.add_argument("--out", type=Path, default=Path("price-accuracy"))
    parser.add_argument("--median-target", type=float, default=0.10)
    parser.add_argument("--worst-target", type=float, default=0.25)
    args = parser.parse_args(argv)

    import torch

    from engine.bench.report import BenchConfig, RunConfig, write_report
    from engine.bench.run_config import recorded_run_config
    from engine.bench.scenarios import make_prompt_ids, merge_reports, run_bench
    from engine.executor import Engine
    from engine.jobs import GenerationParams, Job
    from engine.pricing import estimate, load_profile

    grid = {(p, n) for p in args.prompt_tokens for n in args.new_tokens}
    overlap = [s for s in args.held_out if s in grid]
    if overlap:
        parser.error(f"held-out shapes {overlap} are in the profile grid")
    started = time.perf_counter()
    load_before = os.getloadavg()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = [args.device] if args.device else None
    held_out_config: RunConfig | None = None
    reports = []
    times: dict[tuple[int, int], list[float]] = {s: [] for s in args.held_out}
    finishes: dict[tuple[int, int], set[str]] = {s: set() for s in args.held_out}
    for r in range(args.rounds):
        config = BenchConfig(model=args.model, weights=args.weights, device=args.device,
                             scenarios=["single"], prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new_tokens, min_runs=args.min_runs,
                             min_seconds=0.0, warmup_runs=1, threads=args.threads)
        reports.append(run_bench(config, registry=args.registry, progress=sys.stderr.isatty(),
                                 probe_bandwidth=False))
        # The held-out jobs run like the grid did: a freshly loaded model, one warm-up run.
        with Engine(args.registry, devices=devices, weights=args.weights) as engine:
            loaded = engine.load(args.model)
            held_out_config = recorded_run_config(engine, loaded)
            avoid = set(loaded.eos_token_ids()) | set(
                getattr(loaded.tokenizer, "all_special_ids", None) or [])
            vocab = int(loaded.model.config.vocab_size)
            for k, (p, n) in enumerate(args.held_out):
                for rep in range(args.repeats + 1):
                    ids = make_prompt_ids(p, vocab, seed=10_000 + 100 * k + 10 * r + rep,
                                          avoid=avoid)
                    result = engine.run(Job(model=args.model, prompt_token_ids=ids,
                                            params=GenerationParams(max_tokens=n)))
                    if not result.ok or result.metrics is None or result.output is None:
                        print(f"job {p}x{n} failed: {result.error}", file=sys.stderr)
                        return 2
                    if rep == 0:  # warm-up of this shape, as the grid has
                        continue
                    times[(p, n)].append(result.metrics.execution_time_seconds)
                    finishes[(p, n)].add(getattr(result.output, "finish_reason", "?"))
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)",
              flush=True)
    write_report(merge_reports(reports), args.out)
    profile = load_profile(args.out / "report.json")
    fit = profile.cost_model
    print(f"profile: {args.out / 'report.json'} ({len(grid)} shapes, {fit.points} runs)")
    print(f"cost model: {fit.fixed_seconds:.4f} s + {1000 * fit.prefill_seconds_per_token:.3f} "
          f"ms/prompt token + {1000 * fit.decode_seconds_per_token:.2f} ms/output token; fit "
          f"RMSE {fit.rmse_seconds:.4f} s, max rel. error {100 * fit.max_relative_error:.1f}%")
    rows = []
    warnings: list[str] = []
    for p, n in args.held_out:
        actual = statistics.median(times[(p, n)])
        est = estimate(profile, prompt_tokens=p, max_tokens=n, price_per_hour=0.05,
                       run_config=held_out_config)
        warnings = est.warnings
        rows.append({"prompt_tokens": p, "max_tokens": n, "runs": len(times[(p, n)]),
                     "estimated_seconds": est.estimated_time, "actual_seconds": actual,
                     "relative_error": abs(est.estimated_time - actual) / actual,
                     "finish": ",".join(sorted(finishes[(p, n)]))})
    load_after = os.getloadavg()
    errors = [r["relative_error"] for r in rows]
    median, worst = statistics.median(errors), max(errors)
    print()
    print("| prompt | max_tokens | runs | estimated s | actual s (median) | rel. error | finish |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r['max_tokens']} | {r['runs']} | "
              f"{r['estimated_seconds']:.3f} | {r['actual_seconds']:.3f} | "
              f"{100 * r['relative_error']:.1f}% | {r['finish']} |")
    ok = median <= args.median_target and worst <= args.worst_target
    print(f"\nload average (1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the "
          f"end, on {os.cpu_count()} CPU(s); torch threads {torch.get_num_threads()}")
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"\nmedian relative error {100 * median:.1f}% "
          f"(target <= {100 * args.median_target:.0f}%), worst {100 * worst:.1f}% "
          f"(target <= {100 * args.worst_target:.0f}%): "
          f"{'PASS' if ok else 'FAIL'}; total {time.perf_counter() - started:.0f} s")
    (args.out / "price_accuracy.json").write_text(json.dumps(
        {"rows": rows, "median_relative_error": median, "worst_relative_error": worst,
         "load_average": [load_before[0], load_after[0]],
         "cost_model": fit.model_dump(),
         "run_config": held_out_config.model_dump() if held_out_config else None,
         "warnings": warnings, "pass": ok}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
