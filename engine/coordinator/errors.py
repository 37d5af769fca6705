"""Typed errors of the coordinator adapter.

Every HTTP error status a coordinator can send maps to one exception class
carrying the coordinator's own message, read from either error body shape
(``{"detail": ...}`` or ``{"error": {"code", "message", "status", "details"}}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.errors import EngineError
from engine.payloads import JsonInputError, load_json
from engine.state import mask_secret


def redact(secret: str | None) -> str:
    """A key as it may appear in logs: whether it is set and its length, no character of it."""
    return mask_secret(secret)


class CoordinatorError(EngineError):
    """A coordinator call failed; ``status`` is the HTTP status (None for transport failures)."""

    code = "coordinator_error"

    def __init__(self, message: str, *, status: int | None = None, route: str | None = None,
                 coordinator: str | None = None, error_code: str | None = None,
                 details: list[dict[str, Any]] | None = None,
                 field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.status = status
        self.route = route
        self.coordinator = coordinator
        self.error_code = error_code
        self.details = details or []
        self.uncertain = False  # an earlier attempt of the call may have reached the coordinator


class BadRequestError(CoordinatorError):
    """400: the coordinator calls our request invalid; never retry the same body."""

    code = "coordinator_bad_request"


class UnauthorizedError(CoordinatorError):
    """401 (or 403): the key is wrong or revoked; the agent stops, it never loops."""

    code = "coordinator_unauthorized"


class NotFoundError(CoordinatorError):
    """404: the miner (register again) or the job (drop it) is unknown to the coordinator."""

    code = "coordinator_not_found"


class ConflictError(CoordinatorError):
    """409: the job is already assigned (or already completed); skip it."""

    code = "coordinator_conflict"


class ValidationFailedError(CoordinatorError):
    """422: the coordinator rejected a body's fields; never retry the same body."""

    code = "coordinator_validation_error"


class RateLimitedError(CoordinatorError):
    """429: over the coordinator's rate limit; ``retry_after`` seconds is when to try again."""

    code = "coordinator_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(CoordinatorError):
    """5xx: the coordinator failed; retried with backoff."""

    code = "coordinator_server_error"


class UnexpectedStatusError(CoordinatorError):
    """Any other non-success status."""

    code = "coordinator_unexpected_status"


class CoordinatorUnavailableError(CoordinatorError):
    """The coordinator could not be reached, or timed out, through every retry."""

    code = "coordinator_unavailable"


class DeliveryUncertainError(CoordinatorUnavailableError):
    """A non-idempotent call (a result) may have reached the coordinator but no answer came.

    Never resent blind: the agent asks the coordinator whether it holds the body first.
    """

    code = "coordinator_delivery_uncertain"


class RequestAbortedError(CoordinatorError):
    """A wait inside a call (``Retry-After``, backoff) was cut short because the agent stops."""

    code = "coordinator_request_aborted"


class DialectMismatchError(CoordinatorError):
    """The coordinator does not serve the chosen dialect's routes (404/405 on them)."""

    code = "coordinator_dialect_mismatch"


class ProtocolError(CoordinatorError):
    """The coordinator answered with something that is not what its protocol says."""

    code = "coordinator_protocol_error"


class JournalUnavailableError(EngineError):
    """The miner's journal could not be written and the agent is stopping (not an HTTP error).

    Raised only when a stop ends the wait for a full or read-only disk; until then
    journal writes are retried, so no job is dropped.
    """

    code = "journal_unavailable"


_BY_STATUS: dict[int, type[CoordinatorError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: UnauthorizedError,
    404: NotFoundError,
    405: NotFoundError,
    409: ConflictError,
    422: ValidationFailedError,
    429: RateLimitedError,
}


def _detail_text(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI validation errors: [{"loc", "msg", "type"}]
        parts = []
        for item in detail[:5]:
            if isinstance(item, Mapping):
                loc = item.get("loc") or item.get("field")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else loc
                msg = item.get("msg") or item.get("message") or ""
                parts.append(f"{where}: {msg}" if where else str(msg))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return json.dumps(detail)[:500]


def parse_error_body(body: bytes) -> tuple[str, str | None, list[dict[str, Any]]]:
    """(message, error code, details) from an error body of either shape, or its raw text."""
    try:
        doc = load_json(body, what="error reply") if body else None
    except JsonInputError:
        text = body[:300].decode("utf-8", "replace").strip()
        return (text or "(empty body)", None, [])
    if isinstance(doc, Mapping):
        err = doc.get("error")
        if isinstance(err, Mapping):
            message = str(err.get("message") or err.get("code") or "error")
            raw_details = err.get("details")
            details = [dict(d) for d in raw_details if isinstance(d, Mapping)] \
                if isinstance(raw_details, list) else []
            if details:
                message += " (" + _detail_text(details) + ")"
            code = err.get("code")
            return message, str(code) if code is not None else None, details
        if "detail" in doc:
            detail = doc["detail"]
            details = [dict(d) for d in detail if isinstance(d, Mapping)] \
                if isinstance(detail, list) else []
            return _detail_text(detail), None, details
        if "message" in doc:
            return str(doc["message"]), None, []
    return (json.dumps(doc)[:300] if doc is not None else "(empty body)", None, [])


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after") or headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: treat as unknown and fall back to backoff


def error_from_response(status: int, body: bytes, headers: Mapping[str, str], *,
                        route: str, coordinator: str) -> CoordinatorError:
    """The typed exception for a non-success response."""
    message, code, details = parse_error_body(body)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else UnexpectedStatusError
    text = f"{coordinator} {route}: {status} {message}"
    kw: dict[str, Any] = {"status": status, "route": route, "coordinator": coordinator,
                          "error_code": code, "details": details}
    if cls is RateLimitedError:
        return RateLimitedError(text, retry_after=_retry_after(headers), **kw)
    return cls(text, **kw)
