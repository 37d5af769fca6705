"""What the routes call: the engine, its job queue, metrics, preloading and the pricing profile.

One :class:`ApiService` per app, kept in ``app.state.service``; routes get it
with the :func:`get_service` dependency (``Service`` in a signature).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, Request

from engine import pricing
from engine.bench.report import RunConfig
from engine.bench.run_config import engine_run_config
from engine.errors import EngineError
from engine.executor import ENGINE_VERSION, Engine
from engine.jobqueue import DEFAULT_HISTORY, DEFAULT_MAX_QUEUE, JobQueue
from engine.server.metrics import ApiMetrics
from engine.server.schemas import Health

log = logging.getLogger(__name__)


class ApiService:
    """The engine behind the API: admission and records (:class:`JobQueue`), metrics, preload."""

    def __init__(self, engine: Engine, *, max_queue: int = DEFAULT_MAX_QUEUE,
                 history: int = DEFAULT_HISTORY, preload: Sequence[str] = (),
                 profile: Path | None = None):
        for name in preload:
            engine.registry.get(name)  # UnknownModelError before the server starts
        self.engine = engine
        self.queue = JobQueue(engine, max_queue=max_queue, history=history)
        self.metrics = ApiMetrics(engine, self.queue)
        self.queue.listeners.append(self.metrics)
        self.profile_path = profile
        self.profile = pricing.load_profile(profile) if profile is not None else None
        self._run_config: RunConfig | None = None
        self.started = time.monotonic()
        self.preload = list(preload)
        self.preload_done = threading.Event()
        self.preload_errors: dict[str, str] = {}
        if not self.preload:
            self.preload_done.set()

    def start_preload(self) -> None:
        """Warm the preload models in a background thread (health says ``loading`` meanwhile)."""
        if not self.preload_done.is_set():
            threading.Thread(target=self._preload, name="api-preload", daemon=True).start()

    def _preload(self) -> None:
        for name in self.preload:
            try:
                self.engine.load(name)
                log.info("preloaded %s", name)
            except EngineError as exc:
                self.preload_errors[name] = f"{exc.code}: {exc.message}"
                log.error("cannot preload %s: %s: %s", name, exc.code, exc.message)
            except Exception as exc:  # the server stays up and says what failed
                self.preload_errors[name] = f"{type(exc).__name__}: {exc}"
                log.exception("cannot preload %s", name)
        self.preload_done.set()

    def profile_run_config(self) -> tuple[RunConfig | None, list[str]]:
        """The configuration this server runs the profile's model in, for the estimate's
        warnings; None and why where it cannot be told (the model is not in the registry)."""
        if self.profile is None:
            return None, []
        if self._run_config is None:
            try:
                spec = self.engine.registry.get(self.profile.model)
            except EngineError as exc:
                return None, [f"cannot tell the configuration {self.profile.model}'s jobs run "
                              f"in here ({exc.message}); the estimate is for the profile's"]
            self._run_config = engine_run_config(self.engine, spec)
        return self._run_config, []

    def health(self) -> Health:
        """The health answer."""
        if self.preload_errors:
            status: Literal["ok", "loading", "error"] = "error"
            message: str | None = "; ".join(f"{k}: {v}" for k, v in self.preload_errors.items())
        elif not self.preload_done.is_set():
            status, message = "loading", f"preloading {', '.join(self.preload)}"
        else:
            status, message = "ok", None
        return Health(status=status, version=ENGINE_VERSION,
                      uptime_seconds=round(time.monotonic() - self.started, 3),
                      jobs_in_flight=self.queue.store.active_count(), message=message)


def get_service(request: Request) -> ApiService:
    """The app's service (a FastAPI dependency)."""
    service: ApiService = request.app.state.service
    return service


Service = Annotated[ApiService, Depends(get_service)]
