"""The coordinator HTTP client: error mapping, retries, Retry-After, token buckets."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from coordinators.server import ServerThread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.coordinator import (
    BadRequestError,
    ConflictError,
    CoordinatorClient,
    CoordinatorUnavailableError,
    NotFoundError,
    ProtocolError,
    RateLimit,
    RateLimitedError,
    RateLimiter,
    RetryPolicy,
    ServerError,
    TokenBucket,
    UnauthorizedError,
    ValidationFailedError,
    redact,
)
from engine.coordinator.errors import error_from_response, parse_error_body

# ------------------------------------------------------------------ a scripted real server


class Script:
    """Per-path queues of (status, body, headers, delay) replies; the last one repeats."""

    def __init__(self) -> None:
        self.replies: dict[str, list[tuple[int, Any, dict[str, str], float]]] = {}
        self.hits: dict[str, int] = {}

    def set(self, path: str, *replies: tuple[int, Any, dict[str, str], float]) -> None:
        self.replies[path] = list(replies)
        self.hits[path] = 0


def scripted_app(script: Script) -> FastAPI:
    import asyncio

    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def any_route(path: str, request: Request) -> Any:
        key = "/" + path
        script.hits[key] = script.hits.get(key, 0) + 1
        queue = script.replies[key]
        status, body, headers, delay = queue.pop(0) if len(queue) > 1 else queue[0]
        if delay:
            await asyncio.sleep(delay)
        if body is None:
            return Response(status_code=status, headers=headers)
        if isinstance(body, bytes):
            return Response(body, status_code=status, headers=headers, media_type="text/plain")
        return JSONResponse(body, status_code=status, headers=headers)

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    with ServerThread(scripted_app(script)) as url:
        yield url, script


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client(url: str, sleeps: Sleeps, **kw: Any) -> CoordinatorClient:
    retry = kw.pop("retry", RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05))
    return CoordinatorClient(url, sleep=sleeps, rng=random.Random(1), retry=retry,
                             read_timeout=kw.pop("read_timeout", 2.0), **kw)


OK = (200, {"status": "ok"}, {}, 0.0)


# ------------------------------------------------------------------ error bodies

def test_both_error_shapes_give_the_coordinators_message() -> None:
    msg, code, details = parse_error_body(b'{"detail": "miner not registered"}')
    assert (msg, code, details) == ("miner not registered", None, [])
    body = {"error": {"code": "VALIDATION_ERROR", "message": "bad result", "status": 422,
                      "details": [{"field": "result", "message": "must be an object",
                                   "code": "type_error"}]}}
    msg, code, details = parse_error_body(json.dumps(body).encode())
    assert code == "VALIDATION_ERROR"
    assert "bad result" in msg and "result: must be an object" in msg
    assert details[0]["field"] == "result"
    fastapi_422 = {"detail": [{"loc": ["body", "metrics"], "msg": "Field required",
                               "type": "missing"}]}
    msg, _, details = parse_error_body(json.dumps(fastapi_422).encode())
    assert msg == "body.metrics: Field required" and details
    assert parse_error_body(b"<html>oops</html>")[0] == "<html>oops</html>"
    assert parse_error_body(b"")[0] == "(empty body)"


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequestError), (401, UnauthorizedError), (404, NotFoundError),
    (409, ConflictError), (422, ValidationFailedError), (429, RateLimitedError),
    (500, ServerError), (503, ServerError)])
def test_each_status_maps_to_its_exception(status: int, cls: type) -> None:
    err = error_from_response(status, b'{"detail": "why"}', {"retry-after": "7"},
                              route="POST /x", coordinator="http://c")
    assert type(err) is cls
    assert err.status == status and "why" in err.message and "http://c" in err.message
    if cls is RateLimitedError:
        assert err.retry_after == 7.0


def test_redact_never_shows_a_key_in_full() -> None:
    assert "key_" not in redact("key_abc123456") and "13" in redact("key_abc123456")
    assert redact(None) == "<none>"


# ------------------------------------------------------------------ retries

def test_5xx_is_retried_with_backoff_then_succeeds(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/flaky", (500, {"detail": "boom"}, {}, 0.0), (503, None, {}, 0.0), OK)
    sleeps = Sleeps()
    c = client(url, sleeps)
    reply = c.request("POST", "/flaky", json_body={})
    assert reply.body == {"status": "ok"} and reply.attempts == 3 and reply.uncertain
    assert script.hits["/flaky"] == 3
    assert c.stats.retries["5xx"] == 2
    assert len(sleeps.calls) == 2 and 0 < sleeps.calls[0] <= 0.01 and sleeps.calls[1] <= 0.02


def test_5xx_gives_up_after_max_attempts(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/down", (502, {"detail": "bad gateway"}, {}, 0.0))
    c = client(url, Sleeps())
    with pytest.raises(ServerError, match="bad gateway"):
        c.request("GET", "/down")
    assert script.hits["/down"] == 4


def test_429_waits_what_retry_after_says(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/limited", (429, {"detail": "Rate limit exceeded"}, {"Retry-After": "3"}, 0.0),
               OK)
    sleeps = Sleeps()
    c = client(url, sleeps)
    assert c.request("POST", "/limited", json_body={}).status == 200
    assert sleeps.calls == [3.0]
    assert c.stats.rate_limited == 1


def test_429_with_a_retry_after_too_long_is_raised(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/limited-long", (429, {"detail": "Rate limit exceeded"},
                                 {"Retry-After": "600"}, 0.0))
    c = client(url, Sleeps(), retry=RetryPolicy(max_retry_after=60))
    with pytest.raises(RateLimitedError) as info:
        c.request("POST", "/limited-long", json_body={})
    assert info.value.retry_after == 600


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422])
def test_client_errors_are_never_retried(server: tuple[str, Script], status: int) -> None:
    url, script = server
    path = f"/client-error-{status}"
    script.set(path, (status, {"detail": f"nope {status}"}, {}, 0.0), OK)
    c = client(url, Sleeps())
    with pytest.raises(Exception, match=f"nope {status}"):
        c.request("POST", path, json_body={"a": 1})
    assert script.hits[path] == 1


def test_read_timeouts_are_retried_and_marked_uncertain(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/slow", (200, {"late": True}, {}, 1.0), OK)
    c = client(url, Sleeps(), read_timeout=0.2)
    reply = c.request("POST", "/slow", json_body={})
    assert reply.body == {"status": "ok"} and reply.uncertain
    assert c.stats.retries["timeout"] == 1


def test_unreachable_coordinator_raises_unavailable(server: tuple[str, Script]) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    c = client(f"http://127.0.0.1:{port}", Sleeps())
    with pytest.raises(CoordinatorUnavailableError, match="reachable") as info:
        c.request("GET", "/x")
    assert not info.value.uncertain  # nothing was ever sent


def test_non_json_success_is_a_protocol_error(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/garbage", (200, b"<html>not json</html>", {}, 0.0))
    with pytest.raises(ProtocolError, match="not JSON"):
        client(url, Sleeps()).request("GET", "/garbage")


@pytest.mark.parametrize(("body", "expect"), [
    (b"[" * 5000 + b"]" * 5000, "nested"),
    (b'{"deep": ' + b"[" * 200 + b"]" * 200 + b"}", "nested"),
    (b'{"n": ' + b"9" * 5000 + b"}", None),  # read as a bounded number, refused downstream
])
def test_a_crafted_reply_is_a_protocol_error_not_a_crash(server: tuple[str, Script],
                                                         body: bytes, expect: str | None) -> None:
    url, script = server
    script.set("/crafted", (200, body, {}, 0.0))
    script.set("/crafted-error", (400, body, {}, 0.0))
    c = client(url, Sleeps())
    if expect is None:
        assert c.request("GET", "/crafted").body == {"n": 10 ** 64}
    else:
        with pytest.raises(ProtocolError, match=expect):
            c.request("GET", "/crafted")
    with pytest.raises(BadRequestError):
        c.request("GET", "/crafted-error")


def test_empty_204_is_none(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/empty", (204, None, {}, 0.0))
    reply = client(url, Sleeps()).request("POST", "/empty", json_body={})
    assert reply.status == 204 and reply.body is None


def test_connections_are_reused(server: tuple[str, Script]) -> None:
    url, script = server
    script.set("/reuse", OK)
    c = client(url, Sleeps())
    seen = set()
    for _ in range(5):
        c.request("GET", "/reuse")
        pool = c._http._transport._pool  # type: ignore[attr-defined]
        seen.update(id(conn) for conn in pool.connections)
    assert len(seen) == 1


# ------------------------------------------------------------------ token buckets

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=150, deadline=None)
@given(limit=st.integers(min_value=2, max_value=120),
       burst=st.integers(min_value=1, max_value=119),
       window=st.sampled_from([1.0, 10.0, 60.0]),
       gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=300))
def test_a_bucket_never_lets_more_than_limit_through_in_any_window(
        limit: int, burst: int, window: float, gaps: list[float]) -> None:
    burst = min(burst, limit - 1)
    clock = FakeClock()
    bucket = RateLimit(limit, window, burst=burst).bucket(clock)
    granted: list[float] = []
    for gap in gaps:  # a greedy client: asks, and when told to wait, waits exactly that
        clock.now += gap
        wait = bucket.try_take()
        if wait > 0:
            clock.now += wait
            assert bucket.try_take() == 0.0
        granted.append(clock.now)
    j = 0
    for i, t in enumerate(granted):  # every window [t, t + window) holds at most `limit`
        while j < len(granted) and granted[j] < t + window:
            j += 1
        assert j - i <= limit


@settings(max_examples=50, deadline=None)
@given(capacity=st.integers(min_value=1, max_value=20),
       rate=st.floats(min_value=0.1, max_value=50.0))
def test_a_bucket_grants_its_capacity_at_once_then_at_its_rate(capacity: int,
                                                              rate: float) -> None:
    clock = FakeClock()
    bucket = TokenBucket(capacity, rate, clock=clock)
    assert all(bucket.try_take() == 0.0 for _ in range(capacity))
    wait = bucket.try_take()
    assert wait == pytest.approx(1.0 / rate)
    clock.now += wait
    assert bucket.try_take() == 0.0


def test_the_doc_limits_hold_60_requests_and_10_job_operations_per_minute() -> None:
    from engine.coordinator import DOC_LIMITS

    clock = FakeClock()

    def sleep(s: float) -> None:
        clock.now += s

    limiter = RateLimiter(DOC_LIMITS, clock=clock, sleep=sleep)
    stamps_all, stamps_job = [], []
    for n in range(200):  # every 4th request is a job operation, sent as fast as allowed
        names = ("all", "job") if n % 4 == 0 else ("all",)
        limiter.acquire(names)
        stamps_all.append(clock.now)
        if n % 4 == 0:
            stamps_job.append(clock.now)
    for stamps, limit in ((stamps_all, 60), (stamps_job, 10)):
        for i, t in enumerate(stamps):
            assert sum(1 for u in stamps[i:] if u < t + 60.0) <= limit
    assert clock.now > 60  # it really had to wait
