"""``aitbc-engine verify``: check a claimed result against its job.

Exit status 0 when the result is accepted, 1 when it is rejected, 2 when the
input cannot be used (unreadable files, a job that does not parse, a model the
registry does not know, weights not on this machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.errors import InvalidJobError
from engine.payloads import parse_job_file
from engine.verify import MODES, VerificationInputError, Verifier


def _read(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise VerificationInputError(f"cannot read the {what} file {path}: "
                                     f"{exc.strerror or exc}", field=what) from exc


def register(subparsers: Any) -> None:
    """Add the ``verify`` subcommand."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "verify", help="check a claimed result: integrity, exact re-run, or tolerant check",
        description="Verify that a result is the honest outcome of a job. integrity: the "
                    "result is well formed, its hash recomputes and its weight digest names "
                    "the registry's model (no model run). exact: re-run under the recorded "
                    "profile and compare hashes. tolerant: one teacher-forced forward pass "
                    "checks every claimed token, the stop rule and the text. Exit status: 0 "
                    "accepted, 1 rejected, 2 input unusable.")
    p.add_argument("--registry", type=Path, default=None,
                   help="model registry file (default: $AITBC_ENGINE_REGISTRY or the "
                        "packaged models.yaml)")
    p.add_argument("--job", required=True,
                   help="the job file (engine JSON or a coordinator payload; - for stdin)")
    p.add_argument("--result", required=True, help="the claimed JobResult JSON file")
    p.add_argument("--mode", choices=MODES, default="tolerant",
                   help="how to verify (default: tolerant)")
    p.add_argument("--device", default="cpu",
                   help="device to run models on: cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="precision of tolerant's reference forward pass (default: float32; "
                        "exact always re-runs in the recorded dtype)")
    p.add_argument("--weights", default=None, choices=["pretrained", "random"],
                   help="accept only results made with these weights; also the weights the "
                        "job asks for when the job file names none (default: the job's, "
                        "pretrained unless it says random)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.job == "-" and args.result == "-":
        raise VerificationInputError("only one of --job and --result can be read from stdin")
    try:
        # Read as ``run --job`` reads it: an id-less file gets its content's id, and a file
        # that names no weights asks for --weights' (else pretrained).
        job = parse_job_file(_read(args.job, "job"), weights=args.weights)
    except InvalidJobError as exc:
        raise VerificationInputError(f"the job cannot be used: {exc.message}",
                                     field="job") from exc
    result = _read(args.result, "result")
    with Verifier(args.registry, device=args.device, reference_dtype=args.dtype,
                  require_weights=args.weights) as verifier:
        verdict = verifier.verify(job, result, mode=args.mode)
    if args.json:
        print(verdict.to_json(indent=2))
    else:
        _print_verdict(verdict)
    return 0 if verdict.accepted else 1


def _print_verdict(verdict: Any) -> None:
    from rich.console import Console

    console = Console()
    word = "[green]ACCEPTED[/green]" if verdict.accepted else "[red]REJECTED[/red]"
    console.print(f"{word} ({verdict.mode}, {verdict.cost_seconds:.3f} s)")
    for reason in verdict.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False, soft_wrap=True)
    if verdict.first_suspicious_token is not None:
        console.print(f"  first suspicious token: {verdict.first_suspicious_token}")
    d = verdict.details
    if "tokens_checked" in d:
        console.print(f"  tokens checked: {d['tokens_checked']}, largest gap to the argmax: "
                      f"{d.get('max_normalized_gap', 0.0):.3f} row std (margin "
                      f"{d.get('margin_sigma')})")
