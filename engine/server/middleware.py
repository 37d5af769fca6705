"""Reading request bodies: the size limit (413, by header or while streaming) and the JSON
limits (:class:`SafeJsonRoute`: 422 naming the field, never a 400 or 500)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.payloads import JsonInputError, load_json
from engine.server.errors import BodyError, error_response

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def _too_large_text(limit: int) -> str:
    return f"the request body is over the limit of {limit} bytes"


class _BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the limit (an HTTPException, so FastAPI passes it on)."""

    def __init__(self, limit: int):
        super().__init__(413, _too_large_text(limit))


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > self.max_bytes:
            too_large = error_response(413, "payload_too_large", _too_large_text(self.max_bytes))
            await too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class _SafeJsonRequest(Request):
    """A request whose JSON body is read by :func:`engine.payloads.load_json`: nesting
    past its depth limit or text that is not UTF-8 JSON is a :class:`BodyError` (422), and
    a huge integer is out of its field's range (422 naming the field), not a parse crash."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = load_json(await self.body(), what="request body")
            except JsonInputError as exc:
                raise BodyError(exc.message, field=exc.field) from exc
        return self._json


class SafeJsonRoute(APIRoute):
    """The API's route class: bodies FastAPI parses are read with :class:`_SafeJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def safe_handler(request: Request) -> Response:
            return await handler(_SafeJsonRequest(request.scope, request.receive))

        return safe_handler
