"""OpenAI-compatible routes: chat and text completions, embeddings, and one model.

(``GET /v1/models`` answers in OpenAI's shape too: :mod:`engine.server.routes.models`;
``GET /v1/models/{model}`` is here.)
Translation is :mod:`engine.server.openai_shapes`; the job path is the one every face
shares (:mod:`engine.server.compat`). Errors are OpenAI's ``{"error": {"message", "type",
"param", "code"}}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response

from engine.inventory import model_views
from engine.server.auth import Authorized
from engine.server.compat import (
    CompatError,
    ErrorView,
    JobStream,
    JobStreamResponse,
    error_route,
    failure,
    model_name,
    run_job,
)
from engine.server.openai_shapes import (
    ChatCompletionRequest,
    EmbeddingsRequest,
    Shape,
    TextCompletionRequest,
    embedding_answer,
    error_json,
    stream_events,
)
from engine.server.schemas import OpenAIModel
from engine.server.service import ApiService, Service


def _render(view: ErrorView) -> Response:
    return JSONResponse(error_json(view), status_code=view.status, headers=view.headers)


router = APIRouter(route_class=error_route(_render), dependencies=Authorized, tags=["openai"])

_ERROR = {"description": "OpenAI's error shape", "content": {"application/json": {}}}
_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "the answer, or with stream: server-sent events",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **{code: _ERROR for code in (400, 401, 404, 409, 413, 503)}}


@router.get("/v1/models/{model}", response_model=OpenAIModel,
            responses={code: _ERROR for code in (401, 404)})
def retrieve_model(model: Annotated[str, Path(min_length=1, max_length=128)],
                   service: Service) -> OpenAIModel:
    """One runnable model, by its registry name or an alias (OpenAI's retrieve)."""
    engine = service.engine
    name = model_name(engine.registry, model)
    runnable = {v.name for v in model_views(engine.registry, engine.pool,
                                            weights=engine.weights) if v.runnable}
    if name not in runnable:
        raise CompatError(f"model {model!r} cannot run here: its weights are not on this "
                          "machine (see GET /v1/models)", param="model", status=404,
                          code="model_not_found")
    return OpenAIModel(id=model)


@router.post("/v1/chat/completions", responses=_ANSWERS)
async def chat_completions(body: ChatCompletionRequest, service: Service) -> Response:
    """A chat, rendered by the model's chat template (OpenAI's Chat Completions)."""
    return await _generate(service, body, "chat")


@router.post("/v1/completions", responses=_ANSWERS)
async def completions(body: TextCompletionRequest, service: Service) -> Response:
    """A raw prompt, run as given (OpenAI's legacy Completions)."""
    return await _generate(service, body, "text")


@router.post("/v1/embeddings", responses={**_ANSWERS, 200: {
    "description": "the embeddings", "content": {"application/json": {}}}})
async def embeddings(body: EmbeddingsRequest, service: Service) -> Response:
    """Embeddings of one text or a list of texts."""
    result = await run_job(service.queue, body.to_job(service.engine.registry))
    if not result.ok:
        return _render(failure(result))
    return JSONResponse(embedding_answer(result, body, body.model),
                        headers={"X-Result-Hash": result.result_hash or ""})


async def _generate(service: ApiService, body: ChatCompletionRequest | TextCompletionRequest,
                    kind: Any) -> Response:
    job = body.to_job(service.engine.registry)
    shape = Shape(kind, job, body.model)
    if body.stream:
        stream = JobStream(service.queue, job)
        return JobStreamResponse(stream, stream_events(shape, stream, body.include_usage),
                                 "text/event-stream")
    result = await run_job(service.queue, job)
    if not result.ok:
        return _render(failure(result))
    return JSONResponse(shape.whole(result), headers={"X-Result-Hash": result.result_hash or ""})
