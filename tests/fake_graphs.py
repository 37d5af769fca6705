"""A fake CUDA-graph backend for machines without CUDA, with the real thread rule.

torch (up to 2.12) keeps captured graphs per thread: replaying one from
another thread trips an internal assertion. This fake enforces the same rule,
counts captures and replays, and can make capture slow (to show that warm-up
is billed to no job) or fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from engine.hardware import Device


class GraphReplayedOnAnotherThread(RuntimeError):
    """What torch raises when a graph is replayed outside the thread that captured it."""


class FakeGraphs:
    """Captures a step as a 'graph' tied to the capturing thread."""

    label: str | None = "fake-graphs"

    def __init__(self, *, capture_seconds: float = 0.0, fail: Exception | None = None):
        self.capture_seconds = capture_seconds
        self.fail = fail
        self.captures: list[str] = []  # thread name of each capture
        self.replays = 0
        self.replay_threads: set[str] = set()

    def capture(self, step: Callable[[], None], device: Device) -> Callable[[], None]:
        if self.fail is not None:
            raise self.fail
        owner = threading.current_thread()
        step()  # warm-up, as a real capture does
        time.sleep(self.capture_seconds)
        self.captures.append(owner.name)

        def replay() -> None:
            here = threading.current_thread()
            if here is not owner:
                raise GraphReplayedOnAnotherThread(
                    f"graph captured on {owner.name} replayed on {here.name}")
            self.replays += 1
            self.replay_threads.add(here.name)
            step()

        return replay
