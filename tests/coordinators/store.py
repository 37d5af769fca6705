"""A tiny thread-safe SQLite store for the test coordinators, and a sliding-window rate limiter."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any


class Store:
    """One SQLite file; every call runs under one lock."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(schema)
        self.lock = threading.RLock()

    def run(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """Execute one statement."""
        with self.lock:
            return self._db.execute(sql, args)

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        """The first row as a dict, or None."""
        with self.lock:
            row = self._db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def all(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Every row as a dict."""
        with self.lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]


def dumps(value: Any) -> str:
    """JSON text."""
    return json.dumps(value, sort_keys=True)


class SlidingWindow:
    """At most ``limit`` hits per ``window`` seconds per key; ``hit`` returns the wait or 0."""

    def __init__(self) -> None:
        self._hits: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()
        self.rejected = 0

    def hit(self, key: str, name: str, limit: int, window: float) -> float:
        """Record a hit; 0.0 when allowed, else the seconds until a slot frees."""
        now = time.monotonic()
        with self._lock:
            q = self._hits[(key, name)]
            while q and q[0] <= now - window:
                q.popleft()
            if len(q) >= limit:
                self.rejected += 1
                return max(0.001, q[0] + window - now)
            q.append(now)
            return 0.0
