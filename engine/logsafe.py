"""Log records that input cannot split or fill with secrets: :class:`SafeFormatter`.

Every log line the engine writes goes through :class:`SafeFormatter` (the CLI's
``-v`` logging, ``mine`` and uvicorn's loggers under ``serve``):

- control characters (CR, LF, tab, NUL, ESC, the C1 range, U+2028/U+2029) in
  the formatted message become visible escapes (``\\n``, ``\\x1b``, ``\\u2028``),
  so a job id or prompt holding ``"\\r\\nFAKE"`` stays on its own line;
- a traceback keeps its lines (frames, chained-exception headers), but the
  exception messages and every frame line are escaped the same way;
- secrets are redacted (:func:`redact`): query-string and ``key=value``
  parameters named like ``token``, ``api_key``, ``apikey``, ``key``,
  ``access_token``, ``secret`` or ``password``, JSON fields so named, and
  ``Authorization:`` / ``Bearer`` values become ``***``.

A leaf module: it imports nothing of the engine.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable
from typing import Any, TextIO

__all__ = [
    "DEFAULT_FORMAT",
    "REDACTED",
    "SafeFormatter",
    "escape_controls",
    "redact",
    "safe_handler",
    "uvicorn_log_config",
]

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "***"

_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})

_SECRET_NAME = r"[\w.-]*?(?:token|api[_-]?key|apikey|key|secret|password|passwd|pwd)"


def _authorization(match: re.Match[str]) -> str:
    scheme = match.group(2)
    return f"{match.group(1)}{scheme + ' ' if scheme else ''}{REDACTED}"


_REDACTIONS: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # Authorization: Bearer abc / Authorization=abc / authorization: Basic abc
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)(?:(bearer|basic|token)\s+)?"
                r"(?!\*\*\*)[^\s\"',;&]+"),
     _authorization),
    # a bare Bearer credential
    (re.compile(r"(?i)\b(bearer)\s+(?!\*\*\*)[A-Za-z0-9\-._~+/]+=*"), r"\1 " + REDACTED),
    # "api_key": "abc" in JSON text
    (re.compile(r"(?i)(\"" + _SECRET_NAME + r"\"\s*:\s*\")(?:[^\"\\]|\\.)*\""),
     r"\1" + REDACTED + '"'),
    # ?token=abc&... , api_key=abc, --api-key=abc
    (re.compile(r"(?i)(?<![\w.-])(" + _SECRET_NAME + r")=(?!\*\*\*(?:[&\s#;\"']|$))"
                r"[^&\s#;\"'<>]*"),
     r"\1=" + REDACTED),
]


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape (one line)."""
    return text.translate(_ESCAPES)


def redact(text: str) -> str:
    """``text`` with credentials (see the module's docstring) replaced by ``***``."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _safe_lines(chunk: str) -> str:
    """A traceback chunk with its line breaks kept and everything within a line escaped."""
    return "\n".join(redact(escape_controls(line)) for line in chunk.split("\n"))


def _format_chain(exc: BaseException, seen: set[int]) -> list[str]:
    """A traceback as :func:`traceback.format_exception` gives it, with each exception's
    message escaped so that it cannot add lines."""
    seen.add(id(exc))
    out: list[str] = []
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        out += _format_chain(cause, seen)
        out.append("\nThe above exception was the direct cause of the following "
                   "exception:\n\n")
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        out += _format_chain(context, seen)
        out.append("\nDuring handling of the above exception, another exception "
                   "occurred:\n\n")
    if exc.__traceback__ is not None:
        out.append("Traceback (most recent call last):\n")
        out += [_safe_lines(frame) for frame in
                traceback.format_list(traceback.extract_tb(exc.__traceback__))]
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not break the log line
        text = "<exception str() failed>"
    out.append(redact(escape_controls(f"{name}: {text}" if text else name)) + "\n")
    for note in getattr(exc, "__notes__", None) or ():
        out.append(redact(escape_controls(str(note))) + "\n")
    for i, sub in enumerate(getattr(exc, "exceptions", None) or (), 1):
        if isinstance(sub, BaseException) and id(sub) not in seen:
            out.append(f"+---------------- sub-exception {i} ----------------\n")
            out += _format_chain(sub, seen)
    return out


class SafeFormatter(logging.Formatter):
    """A :class:`logging.Formatter` whose records stay one line each (bar a traceback's
    structure) and never hold a credential."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted line, control characters escaped and secrets redacted."""
        return redact(escape_controls(super().formatMessage(record)))

    def formatException(self, ei: Any) -> str:
        """The traceback, its lines kept and the text within them escaped and redacted."""
        exc = ei[1] if isinstance(ei, tuple) else ei
        if not isinstance(exc, BaseException):
            return redact(escape_controls(super().formatException(ei)))
        return "".join(_format_chain(exc, set())).rstrip("\n")

    def formatStack(self, stack_info: str) -> str:
        """The stack, its lines kept and the text within them escaped."""
        return _safe_lines(stack_info)


def safe_handler(stream: TextIO | None = None, fmt: str = DEFAULT_FORMAT) -> logging.Handler:
    """A stream handler (stderr by default) that writes with :class:`SafeFormatter`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter(fmt))
    return handler


def uvicorn_log_config(fmt: str = DEFAULT_FORMAT) -> dict[str, Any]:
    """uvicorn's ``log_config``: its loggers (``uvicorn``, ``uvicorn.error``,
    ``uvicorn.access``) as uvicorn sets them up, but written with :class:`SafeFormatter`
    (the access log on stdout, the rest on stderr)."""
    formatter = {"()": f"{__name__}.SafeFormatter", "fmt": fmt}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": dict(formatter), "access": dict(formatter)},
        "handlers": {
            "default": {"formatter": "default", "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr"},
            "access": {"formatter": "access", "class": "logging.StreamHandler",
                       "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }
