"""The bearer token every route but ``/health`` requires (the token is :mod:`engine.state`'s)."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.server.errors import ServerError

_bearer = HTTPBearer(auto_error=False, description="the token from STATE_DIR/token")


def require_token(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """401 unless the request carries ``Authorization: Bearer <the app's token>``."""
    expected: bytes = request.app.state.token.encode("utf-8")
    if credentials is None or credentials.scheme.lower() != "bearer" or \
            not secrets.compare_digest(credentials.credentials.encode("utf-8"), expected):
        raise ServerError(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header "
                          "is required (the token is in the server's state directory, file "
                          "'token')", headers={"WWW-Authenticate": "Bearer"})


Authorized = [Depends(require_token)]
"""The ``dependencies`` of a router whose routes need the token."""


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_token_unless_ollama_open(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """The Ollama routes: open to clients on this machine when the app serves them without
    a token (``serve --ollama-compat``, loopback only); the token otherwise."""
    client = request.client
    if getattr(request.app.state, "ollama_open", False) and client is not None and \
            is_loopback(client.host):
        return
    require_token(request, credentials)


OllamaAccess = [Depends(require_token_unless_ollama_open)]
"""The ``dependencies`` of the Ollama router."""
