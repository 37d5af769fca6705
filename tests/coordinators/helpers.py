"""Helpers shared by the coordinator and agent tests."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.coordinator import (
    Agent,
    AgentConfig,
    Capabilities,
    Coordinator,
    Outbox,
    RateLimit,
    RetryPolicy,
    connect,
    detect_capabilities,
)

OPERATOR_KEY = "test-operator-key"

#: Limits so high they never bind (tests of the limiter set their own).
NO_LIMITS: dict[str, RateLimit] = {}

FAST_RETRY = RetryPolicy(max_attempts=6, base_delay=0.02, max_delay=0.2,
                         max_rate_limit_waits=20, max_retry_after=5.0)


def fast_config(**kw: Any) -> AgentConfig:
    """An agent config with short intervals for tests."""
    base: dict[str, Any] = {"heartbeat_interval": 0.5, "poll_wait_seconds": 0,
                            "idle_seconds": 0.05, "error_backoff_seconds": 0.02,
                            "max_error_backoff_seconds": 0.2, "retry_pending_seconds": 0.2,
                            "shutdown_timeout": 30.0, "delivery_settle_seconds": 2.0}
    base.update(kw)
    return AgentConfig(**base)


def caps_for(engine: Any, *, max_concurrent: int = 1, price: float = 0.5) -> Capabilities:
    """Capabilities of a test engine (every registry model whose weights are here)."""
    from engine.loading import availability

    return detect_capabilities(engine.hardware, engine.registry, devices=engine.devices,
                               is_available=lambda s: availability(s).available,
                               max_concurrent=max_concurrent, price_per_hour=price,
                               location="test-lab")


def make_coordinator(dialect: str, url: str, outbox: Outbox, *, api_key: str | None = None,
                     miner_id: str | None = "miner-test",
                     limits: dict[str, RateLimit] | None = None,
                     retry: RetryPolicy | None = FAST_RETRY,
                     read_timeout: float = 5.0) -> Coordinator:
    """A coordinator adapter with fast retries (and, by default, no client-side limits)."""
    if dialect == "aitbc":
        key = api_key if api_key is not None else OPERATOR_KEY
        return connect("aitbc", url, api_key=key, miner_id=miner_id, outbox=outbox,
                       limits=NO_LIMITS if limits is None else limits, retry=retry,
                       read_timeout=read_timeout, connect_timeout=2.0)
    return connect("doc", url, api_key=api_key, miner_id=None if miner_id == "miner-test"
                   else miner_id, outbox=outbox, limits=NO_LIMITS if limits is None else limits,
                   retry=retry, read_timeout=read_timeout, connect_timeout=2.0)


def run_agent(dialect: str, url: str, engine: Any, state_dir: Path, **kw: Any
              ) -> tuple[Agent, Any]:
    """Build and run an agent to completion; returns (agent, report)."""
    coord_kw = {k: kw.pop(k) for k in ("api_key", "miner_id", "limits", "retry",
                                       "read_timeout") if k in kw}
    outbox = Outbox(state_dir / "outbox.sqlite3")
    coordinator = make_coordinator(dialect, url, outbox, **coord_kw)
    agent = Agent(coordinator, engine, outbox, caps_for(engine, max_concurrent=kw.get(
        "max_concurrent", 1)), fast_config(**kw))
    try:
        report = agent.run()
    finally:
        coordinator.close()
    return agent, report


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, step: float = 0.02) -> bool:
    """Poll ``predicate`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def engine_cmd(*args: str) -> list[str]:
    """``python -m engine ARGS`` with this interpreter."""
    return [sys.executable, "-m", "engine", *args]
