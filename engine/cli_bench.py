"""``aitbc-engine bench`` and ``aitbc-engine price``: thin faces over engine.bench and pricing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _scenarios(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in ("load", "single", "offline")]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"scenarios are load, single, offline; got {text!r}")
    return names


def register(subparsers: Any) -> None:
    """Add the ``bench`` and ``price`` subcommands."""
    from engine.cli import add_engine_options

    p = subparsers.add_parser("bench", help="benchmark a model: load, single stream, offline "
                                            "batches; writes report.json, report.md, plots")
    p.add_argument("--registry", type=Path, default=None,
                   help="model registry file (default: $AITBC_ENGINE_REGISTRY or the "
                        "packaged models.yaml)")
    add_engine_options(p)
    p.add_argument("model", help="registry name of the model")
    p.add_argument("--scenario", type=_scenarios, default=None,
                   help="comma-separated: load,single,offline (default: all)")
    p.add_argument("--prompt-tokens", type=_ints, default=None,
                   help="single-stream prompt lengths (default 32,128,512)")
    p.add_argument("--new-tokens", type=_ints, default=None,
                   help="single-stream new-token counts (default 32,128)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help="offline batch sizes (default 1,2,4,8)")
    p.add_argument("--min-runs", type=int, default=None, help="measured runs per point, at least")
    p.add_argument("--min-seconds", type=float, default=None,
                   help="measured seconds per point, at least")
    p.add_argument("--warmup-runs", type=int, default=None,
                   help="discarded runs before each point (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default: torch's; --quick: 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default bench-MODEL-UTCTIME)")
    p.add_argument("--quick", action="store_true",
                   help="a small grid and two runs per point (about a minute on a CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-bandwidth-probe", action="store_true",
                   help="CPU roofline from the cached bandwidth figure, without fresh probes")
    p.set_defaults(handler=_cmd_bench)

    p = subparsers.add_parser("price", help="estimate a job's time and price from a bench "
                                            "report")
    p.add_argument("--profile", type=Path, required=True,
                   help="report.json from `aitbc-engine bench` (or its directory)")
    p.add_argument("--price-per-hour", type=float, required=True,
                   help="target price per GPU hour, in the network's currency")
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--gpu-count", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(handler=_cmd_price)


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    from engine.bench.report import BenchConfig, write_report
    from engine.bench.scenarios import quick_config, run_bench

    options: dict[str, Any] = {
        "weights": args.weights, "device": args.device, "dtype": args.dtype,
        "scenarios": args.scenario, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "batch_sizes": args.batch_sizes,
        "min_runs": args.min_runs, "min_seconds": args.min_seconds,
        "warmup_runs": args.warmup_runs, "threads": args.threads}
    given = {k: v for k, v in options.items() if v is not None}
    config = quick_config(args.model, **given) if args.quick else BenchConfig(
        model=args.model, **given)
    out = args.out or Path(f"bench-{args.model}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    report = run_bench(config, registry=args.registry, progress=not args.no_progress,
                       probe_bandwidth=not args.no_bandwidth_probe)
    paths = write_report(report, out)
    from rich.console import Console

    console = Console()
    for sp in report.single_stream:
        m = sp.metrics
        console.print(f"single prompt {sp.prompt_tokens:>5} new {sp.new_tokens:>4}: "
                      f"TTFT p50 {1000 * m.ttft.p50 if m.ttft else float('nan'):.1f} ms, "
                      f"TPOT {1000 * m.tpot.mean if m.tpot else float('nan'):.1f} ms, "
                      f"{m.output_tokens_per_s:.1f} tok/s")
    for op in report.offline:
        console.print(f"offline batch {op.batch_size:>3}: {op.metrics.output_tokens_per_s:.1f} "
                      f"tok/s ({op.batching})")
    console.print(f"wrote {', '.join(str(p) for p in paths)} in {report.duration_seconds:.0f} s")
    return 0


def _cmd_price(args: argparse.Namespace) -> int:
    from engine.pricing import estimate, load_profile

    profile = load_profile(args.profile)
    est = estimate(profile, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                   price_per_hour=args.price_per_hour, gpu_count=args.gpu_count)
    if args.json:
        print(json.dumps({"profile": profile.model_dump(mode="json"),
                          "estimate": est.model_dump(mode="json")}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    fit = profile.cost_model
    table = Table(title=f"{est.model} on {profile.device_class} ({profile.source})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in [
        ("prompt tokens / max tokens", f"{est.prompt_tokens} / {est.max_tokens}"),
        ("estimated_time", f"{est.estimated_time:.3f} s"),
        ("gpu_seconds", f"{est.gpu_seconds:.3f} ({est.gpu_count} GPU)"),
        ("price", f"{est.price:.8f} at {est.price_per_hour:g}/GPU-hour"),
        ("break-even per 1k tokens", f"{est.break_even_price_per_1k_tokens:.8f}"),
        ("break-even per 1k output tokens", f"{est.break_even_price_per_1k_output_tokens:.8f}"),
        ("fit error", f"RMSE {fit.rmse_seconds:.4f} s, max {100 * fit.max_relative_error:.1f}% "
                      f"over {fit.points} runs"),
    ]:
        table.add_row(name, value)
    Console().print(table)
    print(f"model: {fit.fixed_seconds:.4f} s + {fit.prefill_seconds_per_token * 1000:.3f} ms x "
          f"prompt + {fit.decode_seconds_per_token * 1000:.2f} ms x output; {est.assumption}")
    return 0

