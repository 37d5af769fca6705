"""The bearer token every route but ``/health`` requires (the token is :mod:`engine.state`'s)."""

from __future__ import annotations

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
