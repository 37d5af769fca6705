"""``aitbc-engine bench`` and ``aitbc-engine price``: thin faces over engine.bench and pricing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.bench.report import RunConfig
    from engine.pricing import Estimate, Profile


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


# flag, type, help: the grid and repeat options of `bench` (default None: BenchConfig's).
_BENCH_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--scenario", _scenarios, "comma-separated: load,single,offline (default: all)"),
    ("--prompt-tokens", _ints, "single-stream prompt lengths (default 32,128,512)"),
    ("--new-tokens", _ints, "single-stream new-token counts (default 32,128)"),
    ("--batch-sizes", _ints, "offline batch sizes (default 1,2,4,8)"),
    ("--min-runs", int, "measured runs per point, at least"),
    ("--min-seconds", float, "measured seconds per point, at least"),
    ("--warmup-runs", int, "discarded runs before each point (default 1)"),
    ("--threads", int, "torch intra-op threads on CPU (default: torch's, as run, serve and mine "
                       "use; the report records it and price warns when jobs run with another)"),
    ("--batch-size", int, "batch size of the single-stream engine (default: the engine's, as "
                          "run, serve and mine use)"),
)
_CONFIG_KEYS = {"scenario": "scenarios"}  # option dest -> BenchConfig field, where they differ


def _add_registry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, default=None,
                   help="model registry file (default: $AITBC_ENGINE_REGISTRY or the "
                        "packaged models.yaml)")


def register(subparsers: Any) -> None:
    """Add the ``bench`` and ``price`` subcommands."""
    from engine.cli import add_engine_options

    p = subparsers.add_parser("bench", help="benchmark a model: load, single stream, offline "
                                            "batches; writes report.json, report.md, plots")
    _add_registry(p)
    add_engine_options(p)
    p.add_argument("model", help="registry name of the model")
    for flag, kind, text in _BENCH_OPTIONS:
        p.add_argument(flag, type=kind, default=None, help=text)
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
    # The configuration jobs will run in (as run, serve and mine take it): the estimate
    # warns where it differs from the profile's.
    _add_registry(p)
    add_engine_options(p)
    p.add_argument("--batch-size", type=int, default=None,
                   help="the batch size jobs will run with (serve and mine --batch-size; "
                        "default: the engine's)")
    p.set_defaults(handler=_cmd_price)


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    from engine.bench.report import BenchConfig, write_report
    from engine.bench.scenarios import quick_config, run_bench

    options: dict[str, Any] = {"weights": args.weights, "device": args.device,
                               "dtype": args.dtype, "decode": args.decode}
    for flag, _, _ in _BENCH_OPTIONS:
        dest = flag[2:].replace("-", "_")
        options[_CONFIG_KEYS.get(dest, dest)] = getattr(args, dest)
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


def _current_run_config(args: argparse.Namespace,
                        model: str) -> tuple[RunConfig | None, list[str]]:
    """The configuration ``model``'s jobs would run in here (as ``run`` would build its
    engine from these options), or None and why it cannot be told."""
    from engine.bench.run_config import current_run_config
    from engine.errors import EngineError
    from engine.registry import Registry

    try:
        spec = Registry.load(args.registry).get(model)
        return current_run_config(spec, device=args.device, dtype=args.dtype,
                                  decode=args.decode, batch_size=args.batch_size), []
    except EngineError as exc:
        return None, [f"cannot tell the configuration {model}'s jobs run in here "
                      f"({exc.message}); the estimate is for the profile's"]


def _cmd_price(args: argparse.Namespace) -> int:
    import sys

    from engine.pricing import estimate, load_profile

    profile = load_profile(args.profile)
    current, problems = _current_run_config(args, profile.model)
    est = estimate(profile, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                   price_per_hour=args.price_per_hour, gpu_count=args.gpu_count,
                   run_config=current)
    est = est.model_copy(update={"warnings": [*problems, *est.warnings]})
    if args.json:
        print(json.dumps({"profile": profile.model_dump(mode="json"),
                          "run_config": current.model_dump(mode="json") if current else None,
                          "estimate": est.model_dump(mode="json")}, indent=2))
    else:
        _print_estimate(profile, est)
    sys.stdout.flush()
    for warning in est.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _print_estimate(profile: Profile, est: Estimate) -> None:
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

