"""The request body limit: bodies over ``max_bytes`` get 413, by header or while streaming."""

from __future__ import annotations

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.errors import error_response

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
