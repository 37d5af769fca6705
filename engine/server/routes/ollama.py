"""Ollama-compatible routes: ``POST /api/generate``, ``/api/chat``, ``/api/embed`` (and the
older ``/api/embeddings``), ``GET /api/tags``, ``GET /api/ps``, ``POST /api/show``,
``GET /api/version``.

Without ``serve --ollama-compat`` they need the token like every route; with it they
are open to clients on this machine (the server then binds to loopback only), since
Ollama clients send none. Translation is :mod:`engine.server.ollama_shapes`; errors are
Ollama's ``{"error": message}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from engine.inventory import model_views
from engine.registry import ModelSpec
from engine.server.auth import OllamaAccess
from engine.server.compat import (
    ErrorView,
    JobStream,
    JobStreamResponse,
    error_route,
    failure,
    model_name,
    run_job,
)
from engine.server.ollama_shapes import (
    OLLAMA_API_VERSION,
    ChatRequest,
    EmbedRequest,
    GenerateRequest,
    Reply,
    ShowRequest,
    embed_answer,
    error_json,
    stream_lines,
)
from engine.server.service import ApiService, Service


def _render(view: ErrorView) -> Response:
    return JSONResponse(error_json(view), status_code=view.status, headers=view.headers)


router = APIRouter(route_class=error_route(_render), dependencies=OllamaAccess,
                   tags=["ollama"])

_ERROR = {"description": "Ollama's error shape", "content": {"application/json": {}}}
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the answer, or with stream (the default): NDJSON lines",
          "content": {"application/json": {}, "application/x-ndjson": {}}},
    **{code: _ERROR for code in (400, 401, 404, 409, 413, 503)}}
_JSON: dict[int | str, dict[str, Any]] = {
    **_ANSWERS, 200: {"description": "the answer", "content": {"application/json": {}}}}


@router.get("/", response_class=PlainTextResponse, responses={401: _ERROR})
def root() -> str:
    """Ollama's liveness answer."""
    return "Ollama is running"


@router.get("/api/version", responses={401: _ERROR})
def version() -> dict[str, str]:
    """The Ollama API level these routes follow."""
    return {"version": OLLAMA_API_VERSION}


@router.get("/api/tags", responses={401: _ERROR})
def tags(service: Service) -> dict[str, Any]:
    """The runnable models, under their registry names and their aliases."""
    engine = service.engine
    views = {v.name: v for v in model_views(engine.registry, engine.pool,
                                            weights=engine.weights) if v.runnable}
    names = [(name, name) for name in views]
    names += [(alias, name) for alias, name in engine.registry.aliases().items()
              if name in views]
    models = [{"name": shown, "model": shown, "modified_at": "1970-01-01T00:00:00Z",
               "size": views[name].size_bytes or 0, "digest": "",
               "details": _details(engine.registry.get(name))} for shown, name in names]
    return {"models": models}


@router.get("/api/ps", responses={401: _ERROR})
def running(service: Service) -> dict[str, Any]:
    """The models warm in the engine now (Ollama's running models)."""
    engine = service.engine
    models = [{"name": view.name, "model": view.name, "size": view.size_bytes or 0,
               "digest": "", "details": _details(engine.registry.get(view.name)),
               "expires_at": "9999-12-31T23:59:59Z",
               "size_vram": 0 if all(d == "cpu" for d in view.warm_on) else
               view.size_bytes or 0}
              for view in model_views(engine.registry, engine.pool, weights=engine.weights)
              if view.warm]
    return {"models": models}


@router.post("/api/show", responses=_JSON)
def show(body: ShowRequest, service: Service) -> dict[str, Any]:
    """One model's details (a registry name or an alias)."""
    registry = service.engine.registry
    spec = registry.get(model_name(registry, body.model))
    return {"modelfile": "", "parameters": "", "template": "", "details": _details(spec),
            "model_info": {"general.architecture": spec.architecture,
                           "general.parameter_count": spec.parameters,
                           "context_length": spec.context_length},
            "capabilities": ["completion"] if spec.task == "text-generation" else
            ["embedding"]}


def _details(spec: ModelSpec) -> dict[str, Any]:
    return {"parent_model": "", "format": spec.source.kind, "family": spec.architecture,
            "families": [spec.architecture],
            "parameter_size": f"{spec.parameters / 1e6:.1f}M", "quantization_level": ""}


@router.post("/api/generate", responses=_ANSWERS)
async def generate(body: GenerateRequest, service: Service) -> Response:
    """A prompt, through the model's chat template (``raw``: as given)."""
    return await _generate(service, body, Reply("generate", body.model))


@router.post("/api/chat", responses=_ANSWERS)
async def chat(body: ChatRequest, service: Service) -> Response:
    """A chat, through the model's chat template."""
    return await _generate(service, body, Reply("chat", body.model))


@router.post("/api/embed", responses=_JSON)
async def embed(body: EmbedRequest, service: Service) -> Response:
    """Embeddings of ``input`` (a text or a list)."""
    return await _embed(service, body, legacy=False)


@router.post("/api/embeddings", responses=_JSON)
async def embeddings(body: EmbedRequest, service: Service) -> Response:
    """The older route: the embedding of ``prompt``."""
    return await _embed(service, body, legacy=True)


async def _generate(service: ApiService, body: GenerateRequest | ChatRequest,
                    reply: Reply) -> Response:
    job = body.to_job(service.engine.registry)
    if body.stream:
        stream = JobStream(service.queue, job)
        return JobStreamResponse(stream, stream_lines(reply, stream), "application/x-ndjson")
    result = await run_job(service.queue, job)
    if not result.ok:
        return _render(failure(result))
    return JSONResponse(reply.final(result, whole=True),
                        headers={"X-Result-Hash": result.result_hash or ""})


async def _embed(service: ApiService, body: EmbedRequest, *, legacy: bool) -> Response:
    result = await run_job(service.queue, body.to_job(service.engine.registry))
    if not result.ok:
        return _render(failure(result))
    return JSONResponse(embed_answer(result, body.model, legacy=legacy),
                        headers={"X-Result-Hash": result.result_hash or ""})
