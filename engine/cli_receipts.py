"""``aitbc-engine receipts``: the jobs the coordinator acknowledged, their prices and receipts.

Reads the miner's journal (the outbox ``mine`` writes) and lists each
acknowledged job with its model, units, unit price, price and the state of
its receipt's signature, then totals per day (UTC) and per model. With
``--coordinator-key`` (or ``AITBC_COORDINATOR_KEY``) every stored receipt is
checked again against that key, without changing the journal. Exit status 0,
or 2 when the journal or the key cannot be read.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.settings import settings

#: How a receipt's state reads in the text listing.
_STATE_TEXT = {"verified": "verified", "invalid": "INVALID", "unsigned": "unsigned",
               "no_key": "signed, no key", None: "not checked"}


def _default_state_dir() -> Path:
    """Where ``mine`` keeps its journal by default (the engine cache dir/miner)."""
    from engine.cache import engine_cache_dir

    return engine_cache_dir() / "miner"


def register(subparsers: Any) -> None:
    """Add the ``receipts`` subcommand."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "receipts", help="list acknowledged jobs: model, units, price, receipt signature",
        description="List the jobs the coordinator acknowledged, from the journal `mine` "
                    "keeps: model, units, unit type, unit price, price and whether the "
                    "coordinator's receipt is signed and verified; totals per day (UTC) and "
                    "per model.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, default=None,
                       help="mine's --state-dir (default: the engine cache dir/miner)")
    where.add_argument("--outbox", type=Path, default=None, metavar="PATH",
                       help="the journal file itself (STATE_DIR/outbox.sqlite3)")
    p.add_argument("--coordinator-key", default=None, metavar="KEY",
                   help="check every receipt again against this Ed25519 public key (64 hex "
                        "digits, base64, or a PEM file; default: $AITBC_COORDINATOR_KEY, else "
                        "show the state recorded when the job was acknowledged)")
    p.add_argument("--scope", default=None,
                   help="only the jobs of this journal scope (as the JSON lists it, e.g. "
                        "aitbc|URL|MINER_ID)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_receipts)


def _journal_path(args: argparse.Namespace) -> Path:
    if args.outbox is not None:
        return Path(args.outbox)
    return Path(args.state_dir or _default_state_dir()) / "outbox.sqlite3"


def _totals(rows: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Per value of ``key``: jobs, units per unit type, price, and the verified share."""
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = r.get(key) or "-"
        g = groups.setdefault(name, {key: name, "jobs": 0, "failures": 0, "units": {},
                                     "price": 0.0, "verified_jobs": 0, "verified_price": 0.0})
        g["jobs"] += 1
        if r["kind"] == "failure":
            g["failures"] += 1
        if r.get("units") is not None:
            unit_type = r.get("unit_type") or "units"
            g["units"][unit_type] = g["units"].get(unit_type, 0.0) + r["units"]
        price = r.get("price") or 0.0
        g["price"] += price
        if r.get("verification") == "verified":
            g["verified_jobs"] += 1
            g["verified_price"] += price
    out = sorted(groups.values(), key=lambda g: g[key])
    for g in out:
        g["price"] = round(g["price"], 6)
        g["verified_price"] = round(g["verified_price"], 6)
        g["units"] = {k: round(v, 6) for k, v in sorted(g["units"].items())}
    return out


def receipts_report(rows: list[dict[str, Any]], journal: Path,
                    rechecked_with: str | None = None) -> dict[str, Any]:
    """The listing as JSON-ready data: ``journal``, ``jobs``, ``totals`` (by day, by model, all)."""
    jobs = [{k: r.get(k) for k in ("day", "scope", "job_id", "kind", "model", "units",
                                    "unit_type", "unit_price", "price", "verification",
                                    "verification_reason", "duplicate", "acked_at")}
            for r in rows]
    everything = _totals(({**r, "all": "all"} for r in rows), "all")
    overall = everything[0] if everything else {"jobs": 0, "failures": 0, "units": {},
                                                "price": 0.0, "verified_jobs": 0,
                                                "verified_price": 0.0}
    overall.pop("all", None)
    return {"journal": str(journal), "rechecked_with_key": rechecked_with, "jobs": jobs,
            "totals": {"by_day": _totals(rows, "day"), "by_model": _totals(rows, "model"),
                       "all": overall}}


def _cmd_receipts(args: argparse.Namespace) -> int:
    from engine.coordinator.outbox import Outbox
    from engine.coordinator.receipts import ReceiptVerifier

    path = _journal_path(args)
    if not path.is_file():
        raise EngineError(f"no miner journal at {path}: `aitbc-engine mine` writes it to "
                          "STATE_DIR/outbox.sqlite3 (its --state-dir; default the engine "
                          "cache dir/miner); pass --state-dir or --outbox", code="usage",
                          field="outbox")
    key = args.coordinator_key or settings().coordinator_key
    verifier = ReceiptVerifier(key) if key else None
    outbox = Outbox(path)
    try:
        rows = outbox.acked(args.scope)
    finally:
        outbox.close()
    if verifier is not None:
        for r in rows:
            if r["receipt"] is None and r["verification"] is None:
                continue  # nothing to check: no receipt came (a duplicate acknowledgement)
            check = verifier.check(r["receipt"])
            r["verification"], r["verification_reason"] = check.status, check.reason
    report = receipts_report(rows, path, verifier.key_id if verifier is not None else None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _num(value: float | None, digits: int = 6) -> str:
    return "-" if value is None else f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"


def _units_text(units: dict[str, float]) -> str:
    return ", ".join(f"{_num(v, 3)} {k}" for k, v in units.items()) or "-"


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    jobs = report["jobs"]
    if not jobs:
        console.print(f"no acknowledged jobs in {report['journal']}", markup=False,
                      highlight=False, soft_wrap=True)
        return
    title = f"acknowledged jobs in {report['journal']}"
    if report["rechecked_with_key"]:
        title += f" (receipts re-checked with key {report['rechecked_with_key']})"
    table = Table(title=title)
    for col in ("day", "job", "model", "units", "unit type", "unit price", "price", "receipt"):
        table.add_column(col, justify="right" if col in ("units", "unit price", "price")
                         else "left", overflow="fold")
    for j in jobs:
        state = _STATE_TEXT.get(j["verification"], str(j["verification"]))
        if j["verification"] is None and j["duplicate"]:
            state = "none (duplicate)"
        if j["kind"] == "failure":
            state = f"failure; {state}"
        style = "red" if j["verification"] == "invalid" else (
            None if j["verification"] == "verified" else "dim")
        table.add_row(j["day"] or "-", j["job_id"], j["model"] or "-", _num(j["units"], 3),
                      j["unit_type"] or "-", _num(j["unit_price"]), _num(j["price"]), state,
                      style=style)
    console.print(table)
    for title, key in (("totals per day (UTC)", "by_day"), ("totals per model", "by_model")):
        t = Table(title=title)
        first = "day" if key == "by_day" else "model"
        for col in (first, "jobs", "units", "price", "verified jobs", "verified price"):
            t.add_column(col, justify="left" if col in (first, "units") else "right")
        for g in report["totals"][key]:
            t.add_row(g[first], str(g["jobs"]), _units_text(g["units"]), _num(g["price"]),
                      str(g["verified_jobs"]), _num(g["verified_price"]))
        console.print(t)
    everything = report["totals"]["all"]
    console.print(f"all: {everything['jobs']} job(s), price {_num(everything['price'])}, of "
                  f"which verified: {everything['verified_jobs']} job(s), price "
                  f"{_num(everything['verified_price'])}", markup=False, highlight=False)
    invalid = [j for j in jobs if j["verification"] == "invalid"]
    for j in invalid:
        console.print(f"INVALID receipt for {j['job_id']}: {j['verification_reason']}",
                      markup=False, highlight=False, soft_wrap=True, style="red")
