"""The app: wires the service, the routers, the body limit, the error handlers and the schema."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from engine.executor import ENGINE_VERSION, Engine
from engine.jobqueue import DEFAULT_HISTORY, DEFAULT_MAX_QUEUE
from engine.payloads import payload_json_schema
from engine.server.errors import install_error_handlers
from engine.server.middleware import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from engine.server.routes import estimate, jobs, meta, metrics, models, ollama, openai
from engine.server.service import ApiService
from engine.state import default_state_dir, load_or_create_token, valid_token

log = logging.getLogger(__name__)

ROUTERS = (meta.router, models.router, jobs.router, estimate.router, metrics.router,
           openai.router, ollama.router)


def create_app(engine: Engine, *, token: str | None = None, state_dir: Path | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_queue: int = DEFAULT_MAX_QUEUE,
               history: int = DEFAULT_HISTORY, preload: Sequence[str] = (),
               profile: Path | None = None, close_engine: bool = False,
               ollama_compat: bool = False) -> FastAPI:
    """The API over ``engine``.

    ``token``: the bearer token every route but ``/health`` requires; None reads
    (or makes, mode 0600) ``state_dir/token`` (``state_dir`` defaults to
    :func:`~engine.state.default_state_dir`). ``max_body_bytes`` bounds request
    bodies (413), ``max_queue`` the jobs waiting beyond what the devices run at
    once (503), ``history`` the finished jobs kept for ``GET /v1/jobs/{id}``.
    ``preload`` models are warmed after start-up. ``profile`` is a benchmark
    report used by ``POST /v1/estimate``. ``close_engine``: on shutdown, close the
    engine (queued jobs cancelled, running ones finished) before the app stops;
    :func:`~engine.server.serve` sets it. ``ollama_compat``: the Ollama routes answer
    clients on this machine without the token (Ollama clients send none).
    """
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be at least 1")
    if token is None:
        token, token_path, created = load_or_create_token(state_dir or default_state_dir())
        log.info("API token %s %s", "written to" if created else "read from", token_path)
    elif not valid_token(token):
        raise ValueError("the API token must be a non-empty string without whitespace")
    service = ApiService(engine, max_queue=max_queue, history=history, preload=preload,
                         profile=profile)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start_preload()
        yield
        if close_engine:
            await asyncio.to_thread(service.queue.drain)

    app = FastAPI(title="aitbc-engine local API", version=ENGINE_VERSION,
                  description="Run AITBC network jobs on this machine over HTTP.",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.token = token
    app.state.ollama_open = ollama_compat
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the job payload shapes that ``POST /v1/jobs`` refers to."""
    if not app.openapi_schema:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            payload_json_schema()[1])
        app.openapi_schema = schema
    return app.openapi_schema
