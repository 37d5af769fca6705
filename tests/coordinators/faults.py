"""A fault injector: ASGI middleware that breaks requests on purpose, per route.

Kinds: ``error`` (a 5xx before the app runs), ``timeout`` (the reply is held
past the client's read timeout; the app still processes the request, as a slow
server would), ``drop`` (the connection is cut mid-reply before the app runs),
``drop_after`` (the app processes the request, then the connection is cut
mid-reply), ``garbage`` (a 200 that is not JSON), ``force`` (a given status and
body), and 429 bursts (the next ``burst_length`` requests, whatever the route).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


@dataclass
class RouteFaults:
    """Fault rates of one route (each a probability per request)."""

    error_rate: float = 0.0
    timeout_rate: float = 0.0
    timeout_seconds: float = 1.0
    drop_rate: float = 0.0
    drop_after_rate: float = 0.0
    garbage_rate: float = 0.0
    latency_seconds: float = 0.0
    force_status: int | None = None
    force_body: Any = None
    force_raw: bytes | None = None  # sent as is (text/plain) instead of force_body's JSON
    force_count: int | None = None  # how many requests get the forced reply (None: all)


@dataclass
class FaultInjector:
    """Per-route faults plus 429 bursts; ``counts`` says what was injected."""

    routes: dict[str, RouteFaults] = field(default_factory=dict)
    default: RouteFaults = field(default_factory=RouteFaults)
    burst_rate: float = 0.0  # chance per request that a burst of 429s starts
    burst_length: int = 3
    burst_retry_after: str = "1"
    seed: int = 0
    enabled: bool = True
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._burst_left = 0

    def faults_for(self, route: str) -> RouteFaults:
        """The faults configured for ``route``."""
        return self.routes.get(route, self.default)

    def decide(self, route: str) -> tuple[str | None, RouteFaults]:
        """Which fault (or None) this request of ``route`` gets."""
        f = self.faults_for(route)
        with self._lock:
            if not self.enabled:
                return None, f
            if f.force_status is not None and (f.force_count is None or f.force_count > 0):
                if f.force_count is not None:
                    f.force_count -= 1
                return self._count("force", route), f
            if self._burst_left > 0:
                self._burst_left -= 1
                return self._count("429", route), f
            r = self._rng.random()
            if self.burst_rate and r < self.burst_rate:
                self._burst_left = self.burst_length - 1
                return self._count("429", route), f
            r = self._rng.random()
            for kind, rate in (("error", f.error_rate), ("timeout", f.timeout_rate),
                               ("drop", f.drop_rate), ("drop_after", f.drop_after_rate),
                               ("garbage", f.garbage_rate)):
                if r < rate:
                    return self._count(kind, route), f
                r -= rate
        return None, f

    def _count(self, kind: str, route: str) -> str:
        self.counts[kind] += 1
        self.counts[f"{route}:{kind}"] += 1
        return kind

    @property
    def total(self) -> int:
        """Faults injected in all (every kind, every route)."""
        return sum(v for k, v in self.counts.items() if ":" not in k)


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
                 ) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _cut(send: Send) -> None:
    """Start a reply that promises 1000 bytes, send 1, and return: uvicorn closes the socket."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"1000"), (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{", "more_body": True})


class FaultMiddleware:
    """Wraps an ASGI app; ``classify(method, path)`` names the route for the injector."""

    def __init__(self, app: Any, injector: FaultInjector,
                 classify: Callable[[str, str], str]) -> None:
        self.app = app
        self.injector = injector
        self.classify = classify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.classify(scope["method"], scope["path"])
        kind, f = self.injector.decide(route)
        if f.latency_seconds:
            await asyncio.sleep(f.latency_seconds)
        json_type = (b"content-type", b"application/json")
        if kind == "force":
            if f.force_raw is not None:
                await _reply(send, f.force_status or 500, f.force_raw,
                             [(b"content-type", b"text/plain")])
                return
            body = json.dumps(f.force_body).encode()
            await _reply(send, f.force_status or 500, body, [json_type])
            return
        if kind == "429":
            body = json.dumps({"detail": "Rate limit exceeded"}).encode()
            retry_after = (b"retry-after", self.injector.burst_retry_after.encode())
            await _reply(send, 429, body, [json_type, retry_after])
            return
        if kind == "error":
            status = random.choice([500, 502, 503])
            await _reply(send, status, json.dumps({"detail": "injected server error"}).encode(),
                         [json_type])
            return
        if kind == "drop":
            await _cut(send)
            return
        if kind == "garbage":
            await _reply(send, 200, b"<html>502 Bad Gateway (garbage)</html>",
                         [(b"content-type", b"text/html")])
            return
        if kind == "timeout":
            await asyncio.sleep(f.timeout_seconds)
        if kind == "drop_after":
            async def swallow(message: Message) -> None:
                return None

            await self.app(scope, receive, swallow)
            await _cut(send)
            return
        await self.app(scope, receive, send)
