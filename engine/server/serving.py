"""Running the app with uvicorn: :func:`serve` for ``aitbc-engine serve``, a test server."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from engine.executor import Engine
from engine.jobqueue import DEFAULT_HISTORY, DEFAULT_MAX_QUEUE
from engine.logsafe import uvicorn_log_config
from engine.server.app import create_app
from engine.server.auth import is_loopback
from engine.server.middleware import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


@dataclass
class ServeOptions:
    """How :func:`serve` runs the app."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None
    state_dir: Path | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    history: int = DEFAULT_HISTORY
    preload: list[str] = field(default_factory=list)
    profile: Path | None = None
    log_level: str = "info"
    shutdown_timeout: float | None = None
    ollama_compat: bool = False  # the Ollama routes without a token, loopback only


def build_server(engine: Engine, options: ServeOptions) -> Any:
    """A ``uvicorn.Server`` for the app over ``engine`` (not started)."""
    import uvicorn

    if options.ollama_compat and not is_loopback(options.host):
        raise ValueError(f"--ollama-compat serves the Ollama routes without a token, so it "
                         f"needs a loopback --host, not {options.host!r}")
    if not is_loopback(options.host):
        log.warning("binding to %s: the API is reachable from other machines; anyone with the "
                    "token can run jobs here", options.host)
    app = create_app(engine, token=options.token, state_dir=options.state_dir,
                     max_body_bytes=options.max_body_bytes, max_queue=options.max_queue,
                     history=options.history, preload=options.preload, profile=options.profile,
                     close_engine=True, ollama_compat=options.ollama_compat)
    timeout = None if options.shutdown_timeout is None else math.ceil(options.shutdown_timeout)
    # uvicorn's loggers write through the safe formatter: a request line cannot forge log
    # lines, and a token sent in a query string is redacted from the access log (-v).
    config = uvicorn.Config(app, host=options.host, port=options.port,
                            log_level=options.log_level, timeout_graceful_shutdown=timeout,
                            access_log=options.log_level in ("debug", "trace"),
                            log_config=uvicorn_log_config())
    return uvicorn.Server(config)


def serve(engine: Engine, options: ServeOptions | None = None,
          on_started: Callable[[Any], None] | None = None) -> None:
    """Serve the API until SIGINT/SIGTERM, then finish running jobs and return.

    On shutdown uvicorn stops taking connections and lets requests in progress
    (``wait=true`` jobs) finish (for at most ``shutdown_timeout`` seconds when
    set); then, in the app's shutdown, the engine cancels jobs still queued and
    waits for the running ones. ``on_started`` is called with the server once
    it listens.
    """
    options = options or ServeOptions()
    server = build_server(engine, options)
    if on_started is not None:
        _notify_when_started(server, on_started)
    server.run()


def _notify_when_started(server: Any, callback: Callable[[Any], None]) -> None:
    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            callback(server)

    threading.Thread(target=watch, name="api-started", daemon=True).start()


@contextlib.contextmanager
def running_server(app: FastAPI, *, host: str = DEFAULT_HOST,
                   log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port; yields the base URL.

    For tests and the load benchmark: the socket is bound before the server
    starts, so there is no race for the port.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False,
                                           log_config=uvicorn_log_config()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="api-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
