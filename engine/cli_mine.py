"""``aitbc-engine mine``: run the mining agent against a coordinator (thin: parse, call, print)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from engine.credentials import Secret, SecretSources, choose_secret
from engine.errors import EngineError
from engine.options import FLAGS
from engine.settings import settings


def _default_state_dir() -> Path:
    from engine.hardware import engine_cache_dir

    return engine_cache_dir() / "miner"


def register(subparsers: Any) -> None:
    """Add the ``mine`` subcommand."""
    from engine.cli import add_engine_options

    p = subparsers.add_parser("mine", help="take jobs from a coordinator, run them, submit results")
    p.add_argument("--registry", type=Path, default=None,
                   help="model registry file (default: $AITBC_ENGINE_REGISTRY or the "
                        "packaged models.yaml)")
    add_engine_options(p)
    p.add_argument("--coordinator", required=True, metavar="URL",
                   help="the coordinator's base URL, e.g. https://coordinator.example:8000")
    p.add_argument("--dialect", required=True, choices=["doc", "aitbc", "auto"],
                   help="wire protocol: 'doc' (published Miner API), 'aitbc' (deployed), or "
                        "'auto' (probe the coordinator once and pick; the choice is logged)")
    p.add_argument("--coordinator-key", default=None, metavar="KEY",
                   help="the coordinator's Ed25519 public key (hex, base64 or a PEM file) to "
                        "verify receipts with (default: $AITBC_COORDINATOR_KEY); without one, "
                        "receipts are kept unverified")
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="file holding the API key, mode 600 (default: $AITBC_API_KEY, then "
                        "$AITBC_API_KEY_FILE; for doc, the one registration gave)")
    p.add_argument("--api-key", default=None,
                   help="the API key itself (warned: other local users see it in ps; use "
                        "--api-key-file)")
    p.add_argument("--miner-id", default=None,
                   help="miner id (aitbc: chosen by you, default miner-<hostname>; doc: issued "
                        "at registration)")
    p.add_argument("--max-concurrent", type=int, default=1, help="jobs run at once")
    p.add_argument("--batch-size", type=int, default=None,
                   help="decode up to N running jobs of one model as one batch (default: 8 on "
                        "the CPU, 32 on GPUs; 1 turns batching off; it matters with "
                        "--max-concurrent > 1, which lets the agent take several jobs at once)")
    p.add_argument("--price-per-hour", type=float, default=0.0, help="price offered per hour")
    p.add_argument("--location", default=None, help="region/location announced")
    p.add_argument("--once", action="store_true", help="take at most one job, then exit")
    p.add_argument("--max-jobs", type=int, default=None, help="stop after taking N jobs")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the outbox journal lives (default: the engine cache dir/miner)")
    p.add_argument("--heartbeat-interval", type=float, default=15.0)
    p.add_argument("--poll-wait", type=float, default=5.0,
                   help="long-poll seconds (aitbc)")
    p.add_argument("--idle", type=float, default=2.0,
                   help="pause after the first empty poll, seconds; it doubles per empty poll "
                        "up to --max-idle (jittered ±20%%) and falls back after a job")
    p.add_argument("--max-idle", type=float, default=30.0,
                   help="longest pause between polls while idle, seconds")
    p.add_argument("--delivery-settle", type=float, default=30.0,
                   help="after a result's delivery became uncertain (a timeout, a cut "
                        "connection), seconds to wait before asking the coordinator whether it "
                        "arrived; it is resent only if it did not")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="on SIGINT/SIGTERM, how long a running job may finish and be submitted; "
                        "a job still running then is left in the journal for the next start")
    p.add_argument("--timeout", type=float, default=None, help="job time limit in seconds")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="HTTP read timeout, seconds")
    p.add_argument("--json", action="store_true", help="print the run's report as JSON at exit")
    p.set_defaults(handler=_cmd_mine)


def _cmd_mine(args: argparse.Namespace) -> int:
    from engine.cli import build_engine, run_options
    from engine.coordinator import (
        Agent,
        AgentConfig,
        Outbox,
        ReceiptVerifier,
        UnauthorizedError,
        connect,
        detect_capabilities,
        detect_dialect,
        redact,
    )
    from engine.loading import availability

    run = run_options(args, {**FLAGS, "job_timeout": "--timeout"},
                      max_concurrent=args.max_concurrent, batch_size=args.batch_size,
                      batch_window_seconds=0.05 if args.batch_size != 1 else 0.0,
                      job_timeout=args.timeout)
    logging.getLogger("engine.coordinator").setLevel(
        logging.DEBUG if args.verbose > 1 else logging.INFO)
    if not logging.getLogger().handlers:
        from engine.logsafe import safe_handler

        logging.basicConfig(handlers=[safe_handler(sys.stderr)])
    key = _api_key(args)
    api_key = key.value if key is not None else None
    receipts = ReceiptVerifier(args.coordinator_key or settings().coordinator_key)
    if args.dialect == "auto":
        args.dialect, evidence = detect_dialect(args.coordinator, read_timeout=args.read_timeout)
        logging.getLogger("engine.coordinator").info(
            "dialect auto: %s serves %s (%s)", args.coordinator, args.dialect, evidence)
    if args.dialect == "aitbc" and not api_key:
        raise EngineError("the aitbc dialect needs an API key: pass --api-key-file FILE or "
                          "set AITBC_API_KEY or AITBC_API_KEY_FILE", code="usage")
    miner_id = args.miner_id or (f"miner-{socket.gethostname()}" if args.dialect == "aitbc"
                                 else None)
    state_dir = args.state_dir or _default_state_dir()
    outbox = Outbox(state_dir / "outbox.sqlite3")
    coordinator = connect(args.dialect, args.coordinator, api_key=api_key, miner_id=miner_id,
                          outbox=outbox, read_timeout=args.read_timeout)
    engine = build_engine(args, run)
    weights_here = (lambda spec: True) if engine.weights == "random" \
        else (lambda spec: availability(spec).available)
    caps = detect_capabilities(engine.hardware, engine.registry, devices=engine.devices,
                               is_available=weights_here, max_concurrent=run.max_concurrent,
                               price_per_hour=args.price_per_hour, location=args.location)
    logging.getLogger("engine.coordinator").info(
        "mining at %s (%s) as %s, key %s: %s", coordinator.base_url, args.dialect,
        miner_id or "(new)", redact(api_key), json.dumps(caps.to_dict()))
    if not caps.models:
        print(f"aitbc-engine: warning: no model of the registry can run here "
              f"({engine.registry.path}); see `aitbc-engine models`", file=sys.stderr)
    config = AgentConfig(max_concurrent=run.max_concurrent, max_jobs=args.max_jobs,
                         once=args.once, heartbeat_interval=args.heartbeat_interval,
                         poll_wait_seconds=args.poll_wait, idle_seconds=args.idle,
                         max_idle_seconds=max(args.max_idle, args.idle),
                         shutdown_timeout=args.shutdown_timeout,
                         delivery_settle_seconds=args.delivery_settle)
    agent = Agent(coordinator, engine, outbox, caps, config, receipts=receipts)
    agent.install_signal_handlers()
    try:
        report = agent.run()
    except UnauthorizedError as exc:
        print(f"aitbc-engine: error: the coordinator at {coordinator.base_url} refused this "
              f"miner's credentials ({exc.status} unauthorized: {exc.message}). Check the API "
              f"key (from {key.source if key else 'nowhere'}: {redact(api_key)}) and the miner id "
              f"({coordinator.miner_id or 'none yet'}), and ask the coordinator's operator "
              "whether the key was revoked.", file=sys.stderr)
        return 3
    finally:
        engine.close()
        coordinator.close()
        outbox.close()
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(f"jobs taken {report.jobs_taken}, completed {report.completed}, failed "
              f"{report.failed}, results submitted {report.results_submitted}, journal "
              f"pending {report.pending_left}")
    return 0 if report.pending_left == 0 else 4


def _api_key(args: argparse.Namespace) -> Secret | None:
    env = settings()
    return choose_secret(SecretSources(
        what="API key", argument=args.api_key, argument_flag="--api-key", file=args.api_key_file,
        file_flag="--api-key-file", env_value=env.api_key, env_name="AITBC_API_KEY",
        env_file=env.api_key_file, env_file_name="AITBC_API_KEY_FILE"))
