"""What the OpenAI- and Ollama-compatible routes share: the job path and their error answers.

Both translate a request into an engine :class:`~engine.jobs.Job` and admit it
through the same :class:`~engine.jobqueue.JobQueue` as ``POST /v1/jobs``, so the
result and its ``result_hash`` are ``aitbc-engine run``'s for the same job. A
streamed job's tokens arrive as they are decoded (:class:`JobStream`); a client
that goes away cancels its job at the next token (:class:`JobStreamResponse`),
and the cancelled job's result keeps the device time it held.

Errors on these routes are answered in each API's own shape: the route class
made by :func:`error_route` turns every error a route raises (validation, auth,
engine) into an :class:`ErrorView` and renders it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from engine.errors import EngineError
from engine.jobqueue import JobQueue, JobQueueError, RetryLaterError
from engine.jobs import Job, JobResult
from engine.registry import Registry
from engine.server.errors import BodyError, ServerError, status_for
from engine.server.middleware import SafeJsonRoute

if TYPE_CHECKING:  # torch-heavy: the server imports no torch until a job runs
    from engine.tasks.generation import StreamedToken

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""Tokens generated when a request names no limit (the engine needs one)."""


class CompatError(EngineError):
    """A request a compatible route refuses, with its HTTP status and the field to blame."""

    code = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message, field=param, code=code)
        self.status = status


@dataclass
class ErrorView:
    """An error as both APIs answer it: status, message, stable code, the field (param)."""

    status: int
    message: str
    code: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def field_path(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` as ``messages[0].content``."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def error_view(exc: Exception) -> ErrorView | None:
    """The view of an error a compatible route raised; None for an unexpected one."""
    if isinstance(exc, RequestValidationError | ValidationError):
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = field_path(first.get("loc", ()))
        where = f"'{param}': " if param else ""
        return ErrorView(400, f"invalid request: {where}{first.get('msg')}", "invalid_request",
                         param)
    if isinstance(exc, BodyError):
        return ErrorView(400, str(exc.detail), "invalid_request", exc.field)
    if isinstance(exc, StarletteHTTPException):
        return ErrorView(exc.status_code, str(exc.detail), f"http_{exc.status_code}",
                         headers=dict(exc.headers or {}))
    if isinstance(exc, CompatError):
        return ErrorView(exc.status, exc.message, exc.code, exc.field)
    if isinstance(exc, ServerError):
        return ErrorView(exc.status, exc.message, exc.code, exc.field, dict(exc.headers))
    if isinstance(exc, EngineError):
        headers = ({"Retry-After": str(exc.retry_after)} if isinstance(exc, RetryLaterError)
                   else {})
        status = status_for(exc.code)
        return ErrorView(400 if status == 422 else status, exc.message, exc.code, exc.field,
                         headers)
    return None


Render = Callable[[ErrorView], Response]


def error_route(render: Render) -> type[SafeJsonRoute]:
    """A route class whose routes answer every error (validation, auth, the engine's) with
    ``render``; an unexpected one is logged and answered as a 500 in the same shape."""

    class ErrorShapedRoute(SafeJsonRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def shaped(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    view = error_view(exc)
                    if view is None:
                        log.exception("unexpected error on %s %s", request.method,
                                      request.url.path)
                        view = ErrorView(500, f"internal error: {type(exc).__name__}",
                                         "internal_error")
                    return render(view)

            return shaped

    return ErrorShapedRoute


def model_name(registry: Registry, name: str, *, param: str = "model") -> str:
    """The registry name of ``name`` (a name or an alias; ``NAME:latest`` is ``NAME``)."""
    for candidate in (name, name.removesuffix(":latest")):
        if candidate in registry:
            return registry.canonical(candidate)
    registry.get(name)  # UnknownModelError, listing the names
    raise AssertionError("unreachable")


def build_job(fields: dict[str, Any], rename: dict[str, str]) -> Job:
    """A :class:`Job` from ``fields``; a refusal names the request's own field (``rename``
    maps the job's field names, ``params.max_tokens`` and the like, to the request's)."""
    try:
        return Job.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        msg = str(first.get("msg", "invalid"))
        if not loc:  # a check across fields: its message starts with the field's name
            head, _, rest = msg.removeprefix("Value error, ").partition(": ")
            loc, msg = ([head], rest) if rest and head.isidentifier() else ([], msg)
        name = ".".join(loc)
        param = rename.get(name, rename.get(loc[-1], loc[-1]) if loc else None)
        raise CompatError(f"invalid request: '{param}': {msg}" if param else msg,
                          param=param) from None


class JobStream:
    """A job admitted with a token listener: its tokens as they are decoded, then its result.

    Must be made on the event loop that reads it; the device's thread hands each token
    over with ``call_soon_threadsafe``, in order, and the end of the job after the last.
    """

    def __init__(self, queue: JobQueue, job: Job):
        self._loop = asyncio.get_running_loop()
        self._queue = queue
        self._tokens: asyncio.Queue[StreamedToken | None] = asyncio.Queue()
        self.record = queue.submit(job, on_token=self._heard)
        self.record.finished.add_done_callback(lambda _: self._heard(None))

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.record.job.job_id

    def _heard(self, token: StreamedToken | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._tokens.put_nowait, token)

    async def tokens(self) -> AsyncIterator[StreamedToken]:
        """Each token as it is decoded, until the job ends."""
        while (token := await self._tokens.get()) is not None:
            yield token

    async def result(self) -> JobResult:
        """The job's result."""
        return await self.record.outcome()

    def stop(self) -> None:
        """Cancel the job unless it has finished (it stops at its next token)."""
        if self.record.result is None:
            with contextlib.suppress(JobQueueError):
                self._queue.cancel(self.job_id)


class JobStreamResponse(StreamingResponse):
    """A streamed answer that cancels its job when it ends early (the client went away)."""

    def __init__(self, job: JobStream, content: AsyncIterator[str], media_type: str):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Job-Id": job.job_id})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.stop()


async def run_job(queue: JobQueue, job: Job) -> JobResult:
    """Admit ``job`` and await its result (no thread waits)."""
    return await queue.submit(job).outcome()


_RUNTIME_STATUS = {"timeout": 504, "cancelled": 409, "out_of_memory": 503}


def failure(result: JobResult) -> ErrorView:
    """The error view of a job that failed while running."""
    assert result.error is not None
    status = _RUNTIME_STATUS.get(result.error.code) or status_for(result.error.code)
    return ErrorView(400 if status == 422 else status, result.error.message, result.error.code,
                     result.error.field)


def extension(result: JobResult) -> dict[str, Any]:
    """What the engine adds to an answer (the ``aitbc`` field): the job id, the result hash,
    the execution profile and the metrics."""
    doc = result.to_dict()
    return {key: doc[key] for key in ("job_id", "result_hash", "profile", "metrics", "notes")
            if key in doc}
