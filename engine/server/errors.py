"""Error answers: every one is ``{"error": {"code", "message", "field"?}}`` with its HTTP status.

Engine errors keep their stable code and map to a status by that code
(:func:`status_for`); a refusal that may work later (:class:`~engine.jobqueue.RetryLaterError`)
carries ``Retry-After``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import EngineError
from engine.jobqueue import RetryLaterError

log = logging.getLogger(__name__)

# Error codes found before a job runs (and the API's own), and the HTTP status each maps to.
_STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_model": 404,
    "unknown_job": 404,
    "method_not_allowed": 405,
    "job_exists": 409,
    "job_finished": 409,
    "model_in_use": 409,
    "no_profile": 409,
    "invalid_device": 409,
    "insufficient_memory": 409,
    "weights_unavailable": 409,
    "unsafe_weights": 409,
    "payload_too_large": 413,
    "pricing_error": 422,
    "invalid_job": 422,
    "unsupported_job_type": 422,
    "context_length_exceeded": 422,
    "validation_error": 422,
    "queue_full": 503,
    "shutting_down": 503,
}

_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
               422: "validation_error", 503: "unavailable"}


class ServerError(EngineError):
    """An error the API answers with a given HTTP status (and optional headers)."""

    code = "server_error"

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, field=field, code=code)
        self.status = status
        self.headers = headers or {}


class BodyError(StarletteHTTPException):
    """A request body that cannot be read as JSON (not UTF-8, not JSON, nested too deeply):
    422 naming the field when known. An HTTPException, so FastAPI's body reading passes it
    on instead of answering a bare 400."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(422, message)
        self.field = field


def status_for(code: str) -> int:
    """The HTTP status for an engine error code (500 for unexpected ones)."""
    return _STATUS_BY_CODE.get(code, 500)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error answer."""
    info: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        info["field"] = field
    return JSONResponse({"error": info}, status_code=status, headers=headers)


async def _on_engine_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EngineError)
    if isinstance(exc, ServerError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
    headers = ({"Retry-After": str(exc.retry_after)} if isinstance(exc, RetryLaterError)
               else None)
    return error_response(status_for(exc.code), exc.code, exc.message, exc.field, headers)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    field = exc.field if isinstance(exc, BodyError) else None
    return error_response(exc.status_code, code, message, field,
                          headers=dict(exc.headers) if exc.headers else None)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ())]
    where = loc[0] if loc else ""
    field_name = ".".join(loc[1:]) or where or None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    message = f"invalid {where or 'request'}"
    if field_name:
        message += f" field '{field_name}'"
    return error_response(422, "validation_error", f"{message}: {first.get('msg')}{more}",
                           field_name)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the documented shape."""
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
