"""``aitbc-engine serve``: the local HTTP API (see :mod:`engine.server`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.options import FLAGS, ServeLimits


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    from engine.cli import add_engine_options
    from engine.server import (
        DEFAULT_HISTORY,
        DEFAULT_HOST,
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_QUEUE,
        DEFAULT_PORT,
    )

    p = subparsers.add_parser(
        "serve", help="serve the engine over a local HTTP API (token-protected)",
        description="Serve the engine over HTTP. Every route but /health needs "
                    "'Authorization: Bearer <token>'; the token is read from --token-file, "
                    "AITBC_ENGINE_TOKEN or AITBC_ENGINE_TOKEN_FILE, else made on first start in "
                    "STATE_DIR/token (mode 0600). STATE_DIR defaults to "
                    "$AITBC_ENGINE_STATE or the user state directory "
                    "(~/.local/state/aitbc-engine on Linux).")
    p.add_argument("--registry", type=Path, default=None,
                   help="model registry file (default: $AITBC_ENGINE_REGISTRY or the "
                        "packaged models.yaml)")
    add_engine_options(p)
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the bearer token to require, mode 600 (default: "
                        "$AITBC_ENGINE_TOKEN, $AITBC_ENGINE_TOKEN_FILE, else STATE_DIR/token)")
    p.add_argument("--token", default=None,
                   help="the token itself (warned: other local users see it in ps; use "
                        "--token-file)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the token file lives (default: $AITBC_ENGINE_STATE or the user "
                        "state directory)")
    p.add_argument("--preload", nargs="+", default=[], metavar="MODEL",
                   help="models to warm after start-up (/health says 'loading' meanwhile)")
    p.add_argument("--profile", type=Path, default=None,
                   help="benchmark report.json for POST /v1/estimate")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="jobs that may wait for a device; more get 503 with Retry-After "
                        f"(default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"request body limit, 413 above (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--history", type=int, default=DEFAULT_HISTORY,
                   help=f"finished jobs kept for GET /v1/jobs/ID (default {DEFAULT_HISTORY})")
    p.add_argument("--max-concurrent", type=int, default=1,
                   help="jobs at once per device (default 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="generation jobs of one model decoded as one batch (default: 8 on the "
                        "CPU, 32 on GPUs; 1 turns batching off)")
    p.add_argument("--batch-window", type=float, default=0.0,
                   help="seconds to wait to fill a batch (default 0)")
    p.add_argument("--job-timeout", type=float, default=None, help="job time limit in seconds")
    p.add_argument("--ollama-compat", action="store_true",
                   help="serve the Ollama routes (/api/generate, /api/chat, /api/embed, "
                        "/api/tags, /api/version) without a token to clients on this machine, "
                        "as Ollama clients send none; needs a loopback --host (use --port "
                        "11434 to stand in for Ollama)")
    p.add_argument("--shutdown-timeout", type=float, default=None,
                   help="on SIGINT/SIGTERM, seconds to let waiting requests finish "
                        "(default: as long as they take); running jobs always finish")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from engine.cli import build_engine, run_options
    from engine.server import (
        ServeOptions,
        default_state_dir,
        is_loopback,
        serve,
    )

    limits = ServeLimits.check(FLAGS, port=args.port, max_queue=args.max_queue,
                               max_body_bytes=args.max_body_bytes, history=args.history,
                               shutdown_timeout=args.shutdown_timeout)
    run = run_options(args, max_concurrent=args.max_concurrent, batch_size=args.batch_size,
                      batch_window_seconds=args.batch_window, job_timeout=args.job_timeout)
    if args.ollama_compat and not is_loopback(args.host):
        raise EngineError(f"--ollama-compat serves the Ollama routes without a token, so it "
                          f"needs a loopback --host, not {args.host!r}", code="usage",
                          field="host")
    state_dir = args.state_dir or default_state_dir()
    token, where = _token(args, state_dir)  # before the engine: a bad state dir fails fast
    options = ServeOptions(host=args.host, port=limits.port, token=token,
                           state_dir=state_dir, max_body_bytes=limits.max_body_bytes,
                           max_queue=limits.max_queue, history=limits.history,
                           preload=list(args.preload), profile=args.profile,
                           shutdown_timeout=limits.shutdown_timeout,
                           ollama_compat=args.ollama_compat,
                           log_level="info" if args.verbose == 0 else "debug")
    with build_engine(args, run) as engine:
        def started(server: Any) -> None:
            port = args.port
            with contextlib.suppress(AttributeError, IndexError, OSError):
                port = server.servers[0].sockets[0].getsockname()[1]
            scope = "" if is_loopback(args.host) else " (reachable from other machines)"
            print(f"aitbc-engine serving on http://{args.host}:{port}{scope} with "
                  f"{', '.join(d.id for d in engine.devices)}; token {where}", file=sys.stderr,
                  flush=True)
            if args.ollama_compat:
                print("aitbc-engine: Ollama routes (/api/*) open without a token to clients "
                      "on this machine (--ollama-compat); OpenAI routes (/v1/chat/completions, "
                      "/v1/completions, /v1/embeddings) need the token", file=sys.stderr,
                      flush=True)

        serve(engine, options, on_started=started)
    return 0


def _token(args: argparse.Namespace, state_dir: Path) -> tuple[str, str]:
    """The token to require and where it came from (said at start, never the token itself)."""
    from engine.credentials import SecretSources, choose_secret
    from engine.settings import settings
    from engine.state import load_or_create_token

    env = settings()
    chosen = choose_secret(SecretSources(
        what="API token", argument=args.token, argument_flag="--token", file=args.token_file,
        file_flag="--token-file", env_value=env.token, env_name="AITBC_ENGINE_TOKEN",
        env_file=env.token_file, env_file_name="AITBC_ENGINE_TOKEN_FILE"))
    if chosen is not None:
        return chosen.value, f"from {chosen.source}"
    token, path, created = load_or_create_token(state_dir)
    return token, f"{'written to' if created else 'in'} {path}"
