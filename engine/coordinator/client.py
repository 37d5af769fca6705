"""The HTTP client under both dialects: one pooled ``httpx.Client``, timeouts, retries, rate limits.

* Retries with exponential backoff and jitter for timeouts, connection errors
  and 5xx, bounded by :class:`RetryPolicy`; ``429`` waits what ``Retry-After`` says.
* A client-side limiter of token buckets keeps a miner under a coordinator's
  published limits by itself. A bucket of capacity ``burst`` refilled at
  ``(limit - burst) / window`` tokens per second never lets more than ``limit``
  requests through in any ``window`` seconds.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from engine.coordinator.errors import (
    CoordinatorUnavailableError,
    DeliveryUncertainError,
    ProtocolError,
    RateLimitedError,
    RequestAbortedError,
    ServerError,
    error_from_response,
)
from engine.payloads import JsonInputError, load_json

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class TokenBucket:
    """A thread-safe token bucket: ``capacity`` tokens, refilled at ``rate`` tokens per second."""

    def __init__(self, capacity: float, rate: float, *, clock: Clock = time.monotonic) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError("a token bucket needs capacity >= 1 and rate > 0")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self._clock = clock
        self._tokens = float(capacity)
        self._stamp = clock()
        self._lock = threading.Lock()

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def try_take(self) -> float:
        """Take a token and return 0.0, or take none and return the seconds until one exists."""
        with self._lock:
            now = self._clock()
            self._refill(now)
            if self._tokens >= 1.0 - 1e-9:  # float dust from the refill arithmetic
                self._tokens = max(0.0, self._tokens - 1.0)
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def acquire(self, sleep: Sleep = time.sleep) -> float:
        """Block until a token is taken; returns the seconds waited."""
        waited = 0.0
        while True:
            wait = self.try_take()
            if wait == 0.0:
                return waited
            sleep(wait)
            waited += wait


@dataclass(frozen=True)
class RateLimit:
    """At most ``limit`` requests in any ``window_seconds``, ``burst`` of them back to back."""

    limit: int
    window_seconds: float = 60.0
    burst: int | None = None

    def bucket(self, clock: Clock = time.monotonic) -> TokenBucket:
        """The token bucket that enforces this limit."""
        burst = self.burst if self.burst is not None else max(1, self.limit // 6)
        if not 1 <= burst < self.limit:
            raise ValueError(f"burst must be in [1, {self.limit}), got {burst}")
        return TokenBucket(burst, (self.limit - burst) / self.window_seconds, clock=clock)


class RateLimiter:
    """Named buckets; a request takes one token from each bucket it names (in order)."""

    def __init__(self, limits: Mapping[str, RateLimit], *, clock: Clock = time.monotonic,
                 sleep: Sleep = time.sleep) -> None:
        self.buckets = {name: lim.bucket(clock) for name, lim in limits.items()}
        self._sleep = sleep
        self.waited_seconds = 0.0

    def acquire(self, names: Iterable[str]) -> float:
        """Take a token from each named bucket that exists; returns the seconds waited."""
        waited = 0.0
        for name in names:
            bucket = self.buckets.get(name)
            if bucket is not None:
                waited += bucket.acquire(self._sleep)
        self.waited_seconds += waited
        return waited


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to retry a call that may succeed later."""

    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_rate_limit_waits: int = 5
    max_retry_after: float = 120.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Delay before retry number ``attempt`` (1-based): exponential, half of it jittered."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass
class ClientStats:
    """What the client did: calls, HTTP attempts, retries by reason, rate-limit waiting."""

    calls: int = 0
    attempts: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    limiter_wait_seconds: float = 0.0

    @property
    def total_retries(self) -> int:
        """Retries of every kind."""
        return sum(self.retries.values())


@dataclass(frozen=True)
class Reply:
    """A successful response: status, decoded JSON body (None when empty) and headers."""

    status: int
    body: Any
    headers: Mapping[str, str]
    attempts: int
    uncertain: bool  # an earlier attempt may have reached the coordinator


class CoordinatorClient:
    """A pooled HTTP client bound to one coordinator ``base_url``.

    ``transport`` replaces httpx's network transport (tests); ``sleep`` and
    ``rng`` make backoff deterministic in tests.
    """

    def __init__(self, base_url: str, *, headers: Mapping[str, str] | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 retry: RetryPolicy | None = None, limiter: RateLimiter | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Sleep = time.sleep,
                 rng: random.Random | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.limiter = limiter
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.stats = ClientStats()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        #: Set by the agent when it stops: every wait inside a call (Retry-After, backoff)
        #: ends at once with :class:`RequestAbortedError`, and no further attempt is made.
        self.abort: threading.Event | None = None
        self._http = httpx.Client(
            base_url=self.base_url, headers=dict(headers or {}), transport=transport,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4))

    def set_header(self, name: str, value: str | None) -> None:
        """Set (or, with None, remove) a header sent on every later call."""
        if value is None:
            self._http.headers.pop(name, None)
        else:
            self._http.headers[name] = value

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _count(self, reason: str) -> None:
        with self._lock:
            self.stats.retries[reason] += 1

    def _wait(self, seconds: float, route: str) -> None:
        """Sleep between attempts; ends at once (raising) when :attr:`abort` is set."""
        if self.abort is None:
            self._sleep(seconds)
        elif self.abort.wait(seconds):
            raise RequestAbortedError(f"{self.base_url} {route}: not retried, the miner is "
                                      "stopping", route=route, coordinator=self.base_url)

    def request(self, method: str, path: str, *, json_body: Any = None, send_body: bool = False,
                buckets: Iterable[str] = ("all",), extra_read_seconds: float = 0.0,
                retry_server_errors: bool = True, resend: bool = True) -> Reply:
        """One coordinator call with retries; raises a typed :class:`CoordinatorError`.

        ``send_body`` sends ``json_body`` even when it is None (as ``null``).
        ``resend=False`` is for calls that must not be repeated blind (a result, which
        the deployed coordinator stores and pays again): once an attempt may have reached
        the coordinator (a timeout or a cut connection after sending, a 5xx), the call
        raises :class:`DeliveryUncertainError` instead of trying again.
        """
        route = f"{method} {path}"
        policy = self.retry
        bucket_names = tuple(buckets)
        timeout = httpx.Timeout(self.read_timeout + extra_read_seconds,
                                connect=self.connect_timeout)
        kwargs: dict[str, Any] = {"timeout": timeout}
        if json_body is not None or send_body:
            kwargs["content"] = json.dumps(json_body).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        with self._lock:
            self.stats.calls += 1
        failures = 0
        rate_waits = 0
        uncertain = False
        attempt = 0
        while True:
            attempt += 1
            if self.limiter is not None:
                waited = self.limiter.acquire(bucket_names)
                with self._lock:
                    self.stats.limiter_wait_seconds += waited
            with self._lock:
                self.stats.attempts += 1
            try:
                resp = self._http.request(method, path, **kwargs)
                body_bytes = resp.content
            except httpx.TransportError as exc:
                sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout,
                                            httpx.PoolTimeout))
                uncertain = uncertain or sent
                reason = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
                failures += 1
                if sent and not resend:
                    raise DeliveryUncertainError(
                        f"{self.base_url} {route}: {type(exc).__name__} after the request was "
                        "sent; it may have been received, so it is not sent again blind",
                        route=route, coordinator=self.base_url) from exc
                if failures >= policy.max_attempts:
                    raise CoordinatorUnavailableError(
                        f"{self.base_url} {route}: {type(exc).__name__}: {exc or 'no detail'} "
                        f"(gave up after {attempt} attempt(s)); check that the coordinator is "
                        "up and reachable", route=route, coordinator=self.base_url) from exc
                self._count(reason)
                delay = policy.backoff(failures, self._rng)
                log.info("%s: %s (%s), retry in %.2fs", route, reason, type(exc).__name__, delay)
                self._wait(delay, route)
                continue
            if resp.status_code < 400:
                return Reply(resp.status_code, self._decode(body_bytes, resp, route),
                             resp.headers, attempt, uncertain)
            err = error_from_response(resp.status_code, body_bytes, resp.headers, route=route,
                                      coordinator=self.base_url)
            err.uncertain = uncertain
            if isinstance(err, RateLimitedError):
                rate_waits += 1
                with self._lock:
                    self.stats.rate_limited += 1
                wait = err.retry_after if err.retry_after is not None \
                    else policy.backoff(rate_waits, self._rng)
                if rate_waits > policy.max_rate_limit_waits or wait > policy.max_retry_after:
                    raise err
                self._count("429")
                log.info("%s: rate limited, waiting %.2fs (Retry-After)", route, wait)
                self._wait(wait, route)
                continue
            if isinstance(err, ServerError) and not resend:
                err.uncertain = True
                raise err
            if isinstance(err, ServerError) and retry_server_errors:
                uncertain = True
                failures += 1
                if failures >= policy.max_attempts:
                    raise err
                self._count("5xx")
                delay = policy.backoff(failures, self._rng)
                log.info("%s: %d from coordinator, retry in %.2fs", route, resp.status_code, delay)
                self._wait(delay, route)
                continue
            raise err

    def _decode(self, body: bytes, resp: httpx.Response, route: str) -> Any:
        if not body.strip():
            return None
        try:
            return load_json(body, what=f"{route} reply")  # bounded depth and integers
        except JsonInputError as exc:
            snippet = body[:120].decode("utf-8", "replace")
            raise ProtocolError(f"{self.base_url} {route}: {resp.status_code} response is not "
                                f"JSON the engine reads ({exc.message}): {snippet!r}",
                                status=resp.status_code, route=route,
                                coordinator=self.base_url) from exc


