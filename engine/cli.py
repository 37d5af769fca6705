"""The ``aitbc-engine`` command line: parses, calls the library, prints.

Core commands live here (``models``, ``info``, ``run``); each other face adds
its own subcommand from a small module listed in :data:`COMMAND_MODULES`,
which provides ``register(subparsers)``: the parser set up with a
``handler(args) -> int`` default.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.options import FLAGS, RunOptions

COMMAND_MODULES: tuple[str, ...] = (
    "engine.cli_bench",
    "engine.cli_mine",
    "engine.cli_receipts",
    "engine.cli_serve",
    "engine.cli_verify",
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, default=None,
                        help="model registry file (default: $AITBC_ENGINE_REGISTRY or the "
                             "packaged models.yaml)")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Options every command that runs jobs shares (device, precision, weights)."""
    parser.add_argument("--device", default=None,
                        help="device to run on: cpu, cuda, cuda:N (default: every GPU, else cpu)")
    parser.add_argument("--dtype", default=None,
                        choices=["auto", "float32", "float16", "bfloat16", "native"],
                        help="precision (default: the registry entry's, see DESIGN.md); native "
                             "computes a GGUF model on its own quantized blocks on the CPU, "
                             "float32 on its de-quantized weights")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"],
                        help="'random' builds the true architecture with seeded random weights "
                             "(no download; for benchmarks)")
    parser.add_argument("--decode", default="auto", choices=["auto", "dynamic", "static"],
                        help="decode path: auto = static KV cache with CUDA graphs for a single "
                             "job on a GPU, dynamic cache on the CPU (a native GGUF model's "
                             "prefill and steps in the engine's fused C pass, decode "
                             "fused-step/2); dynamic = the model's own operators (native keeps "
                             "float32's floats)")


def run_options(args: argparse.Namespace, flags: Mapping[str, str] = FLAGS,
                **values: Any) -> RunOptions:
    """The shared engine options of ``args`` with ``values``, checked.

    An out-of-range value raises :class:`~engine.options.OptionError` (code
    ``usage``) naming the option as ``flags`` spells it.
    """
    return RunOptions.check(flags, decode=getattr(args, "decode", "auto"),
                            dtype=getattr(args, "dtype", None),
                            weights=getattr(args, "weights", "pretrained"), **values)


def build_engine(args: argparse.Namespace, options: RunOptions) -> Any:
    """An :class:`~engine.Engine` on ``args``' registry and device, run as ``options`` say."""
    from engine.executor import Engine

    devices = [args.device] if getattr(args, "device", None) else None
    return Engine(getattr(args, "registry", None), devices=devices, **options.engine_kwargs())


# ------------------------------------------------------------------ models

def _cmd_models(args: argparse.Namespace) -> int:
    from engine.inventory import model_rows
    from engine.registry import Registry

    registry = Registry.load(args.registry)
    rows = [row.model_dump() for row in model_rows(registry)]
    if args.json:
        print(json.dumps({"registry": str(registry.path), "models": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {registry.path}")
    for col in ("name", "task", "params", "ctx", "available", "size", "source / reason"):
        table.add_column(col)
    for r in rows:
        size = f"{r['size_bytes'] / 2**20:.0f} MB" if r["size_bytes"] else "-"
        table.add_row(r["name"], r["task"], f"{r['parameters'] / 1e6:.1f}M",
                      str(r["context_length"]), "yes" if r["available"] else "no", size,
                      r["source"] if r["available"] else r["reason"].split(";")[0])
    console = Console()
    console.print(table)
    if any(not r["available"] for r in rows):
        console.print("Models marked 'no' can still run with --weights random (true "
                      "architecture, random weights); `aitbc-engine models --json` gives each "
                      "full reason and the way to get the weights.")
    return 0


# ------------------------------------------------------------------ info

def _cmd_info(args: argparse.Namespace) -> int:
    from engine.hardware import discover
    from engine.inventory import cpu_linear_kernel, hardware_document

    if args.json:
        print(json.dumps(hardware_document(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    info = discover()
    kernel = cpu_linear_kernel()
    console = Console()
    console.print(f"python {info.python_version}, torch {info.torch_version}, "
                  f"transformers {info.transformers_version}")
    console.print(f"NVIDIA driver {info.driver_version or '-'}, CUDA {info.cuda_version or '-'}"
                  + ("" if info.nvml_available else f" (NVML not used: {info.nvml_error})"))
    console.print("CPU linear layers: " + (
        f"the row-invariant kernel ({kernel['reason']})" if kernel["in_use"] else
        "torch's BLAS (AITBC_ENGINE_LINEAR=blas)" if kernel["available"] else
        f"torch's BLAS ({kernel['reason']})"), markup=False)
    blocks = kernel["blocks"]
    console.print("GGUF models (dtype native): " + (
        f"computed on their quantized blocks ({', '.join(blocks['formats'])}), LLaMA "
        f"prefill and decode steps in the engine's fused pass (decode {blocks['decode_step']}; "
        "--decode dynamic: the model's operators)"
        if kernel["in_use"] and blocks["available"] else
        "de-quantized to float32 (AITBC_ENGINE_LINEAR=blas)" if blocks["available"] else
        f"de-quantized to float32 ({blocks['reason'] if kernel['available'] else kernel['reason']})"
    ), markup=False)
    if kernel["build"] is not None:
        build = kernel["build"]
        console.print(f"  kernel build: {build['compiler_version'] or build['compiler']} "
                      f"({build['compiler']}), flags {' '.join(build['flags'])}; instruction "
                      f"set: {' '.join(build['isa']) or '-'}; sha256 {build['sha256']}",
                      markup=False, highlight=False)
    table = Table(title="devices")
    for col in ("id", "name", "type", "memory", "free", "compute", "energy counter", "usable"):
        table.add_column(col)
    for d in info.devices:
        cc = f"{d.compute_capability[0]}.{d.compute_capability[1]}" if d.compute_capability \
            else (f"{d.cores} cores" if d.cores else "-")
        table.add_row(d.id, d.name, d.gpu_type or "cpu", f"{d.memory_total_bytes / 2**30:.1f} GiB",
                      f"{d.memory_free_bytes / 2**30:.1f} GiB", cc,
                      "yes" if d.energy_supported else "no", "yes" if d.usable else "no",
                      style=None if d.usable else "dim")
    console.print(table)
    for d in info.unusable_gpus:
        console.print(f"not used: {d.id} {d.name}: {d.unusable_reason}", markup=False,
                      highlight=False, soft_wrap=True)
    if info.cpu_fallback_reason:
        console.print(f"running on the CPU: {info.cpu_fallback_reason}", markup=False,
                      highlight=False, soft_wrap=True)
    return 0


# ------------------------------------------------------------------ run

def _read_job_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EngineError(f"cannot read job file {path}: {exc.strerror or exc}",
                          code="invalid_job", field="job") from exc


def _cmd_run(args: argparse.Namespace) -> int:
    """Run one job. The job names its weights (``Job.weights``): a job file's own, else
    ``--weights``, else pretrained; the engine runs with the job's, so the result's
    profile matches the job a verifier is given. A job file without an id gets the one
    its content gives (:func:`engine.payloads.parse_job_file`), as ``verify`` does."""
    from engine.payloads import parse_job_file, parse_payload

    if args.job:
        if args.model or args.prompt is not None:
            raise EngineError("give either --job FILE or MODEL --prompt TEXT, not both",
                              code="usage")
        job = parse_job_file(_read_job_file(args.job), weights=args.weights)
        if args.weights is not None and job.weights != args.weights:
            raise EngineError(f"the job file asks for {job.weights} weights, not the "
                              f"{args.weights} weights --weights names", code="usage",
                              field="weights")
    else:
        if not args.model or args.prompt is None:
            raise EngineError("give MODEL and --prompt TEXT, or --job FILE", code="usage")
        params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        if args.seed is not None:
            params["seed"] = args.seed
        if args.top_p is not None:
            params["top_p"] = args.top_p
        if args.top_k is not None:
            params["top_k"] = args.top_k
        if args.stop:
            params["stop"] = args.stop
        job = parse_payload({"model": args.model, "task": "text-generation",
                             "prompt": args.prompt, "params": params,
                             "weights": args.weights or "pretrained"})
    args.weights = job.weights
    options = run_options(args, {**FLAGS, "job_timeout": "--timeout"}, job_timeout=args.timeout)
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the JSON alone
    with build_engine(args, options) as engine:
        result = engine.run(job, on_token=(lambda t: print(t.text, end="", file=out, flush=True))
                            if args.stream else None)
    if args.stream:
        print(file=out, flush=True)
    if args.json:
        print(result.to_json())
    else:
        _print_result(result, streamed=args.stream)
    return 0 if result.ok else 1


def _print_result(result: Any, *, streamed: bool = False) -> None:
    from rich.console import Console

    console = Console()
    err = Console(stderr=True)
    if not result.ok:
        err.print(f"[red]job {result.job_id} failed[/red]: {result.error.code}: "
                  f"{result.error.message}")
        return
    out = result.output
    if hasattr(out, "text"):
        if not streamed:
            console.print(out.text, markup=False, highlight=False)
    else:
        console.print(f"{len(out.embeddings)} vector(s) of {out.dimensions} dimensions")
    m = result.metrics
    console.print(f"[bold]result_hash[/bold] {result.result_hash}")
    parts = [f"exec {m.execution_time_seconds:.3f} s", f"gpu {m.gpu_time_seconds:.3f} s",
             f"load {m.load_time_seconds:.2f} s", f"prompt {m.prompt_tokens} tok",
             f"completion {m.completion_tokens} tok"]
    if m.ttft_seconds is not None:
        parts.append(f"ttft {m.ttft_seconds * 1000:.1f} ms")
    if m.tpot_seconds is not None:
        parts.append(f"tpot {m.tpot_seconds * 1000:.1f} ms")
    if m.energy_joules is not None:
        parts.append(f"energy {m.energy_joules:.2f} J")
    console.print(" · ".join(parts) + f" · {m.device} ({m.measurement})")


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every face's subcommand."""
    parser = argparse.ArgumentParser(prog="aitbc-engine",
                                     description="Run AITBC network jobs on this machine.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list registry models and whether their weights are here")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser("info", help="devices, drivers and versions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("run", help="run one job and print its result, hash and metrics")
    _add_common(p)
    add_engine_options(p)
    p.add_argument("model", nargs="?", help="registry name of the model")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--job", help="a job file (engine JSON or a coordinator payload; - for stdin)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="job time limit in seconds")
    p.add_argument("--json", action="store_true", help="print the JobResult JSON alone")
    p.add_argument("--stream", action="store_true",
                   help="print the text token by token as it is decoded (to stderr with "
                        "--json)")
    # No default: a job file's own weights win over an absent --weights (see _cmd_run).
    p.set_defaults(handler=_cmd_run, weights=None)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    """Log to stderr at the ``-v`` level, through :class:`~engine.logsafe.SafeFormatter`
    (one line per record, control characters escaped, credentials redacted)."""
    from engine.logsafe import safe_handler

    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, handlers=[safe_handler(sys.stderr)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``aitbc-engine`` and ``python -m engine``; returns the exit status."""
    # A write for the tokenizers library (it reads the variable itself), not a setting the
    # engine reads: so it stays an os.environ write, outside engine.settings.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from engine.hardware import ensure_pci_bus_order

    ensure_pci_bus_order()
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args))
    except EngineError as exc:
        print(f"aitbc-engine: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aitbc-engine: interrupted", file=sys.stderr)
        return 130
