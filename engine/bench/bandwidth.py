"""Memory bandwidth for the roofline: the spec sheet for GPUs, a measured probe for the CPU.

The CPU figure is measured once (:func:`measure_cpu_memory_bandwidth_gbps`, about a
second) and kept in the engine's cache under the CPU's name and core count.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.cache import engine_cache_dir
from engine.hardware import Device, cpu, gpu_spec_for
from engine.state import StateDirError, private_dir, write_private

__all__ = [
    "cpu_memory_bandwidth_gbps",
    "measure_cpu_memory_bandwidth_gbps",
    "memory_bandwidth_gbps",
]

log = logging.getLogger(__name__)

_BANDWIDTH_FILE = "cpu_bandwidth.json"
# 1 GiB: well past last-level caches (some server CPUs report 260 MiB of L3).
_PROBE_BYTES = 1024 * 2**20
_PROBE_BUDGET_S = 1.5


def _best_time(fn: Callable[[], object], *, reps: int, budget_s: float) -> float:
    """Best wall time of ``fn`` over up to ``reps`` runs (at least two) within ``budget_s``."""
    best = math.inf
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


def measure_cpu_memory_bandwidth_gbps(size_bytes: int = _PROBE_BYTES) -> float:
    """Measure sustained host memory read bandwidth in GB/s (takes about a second).

    Sums a float64 array of ``size_bytes`` (1 GiB, far larger than last-level caches)
    split across one thread per usable core (numpy releases the GIL), best of several runs.
    """
    import numpy as np

    _, available = cpu.cpu_memory()
    if available:
        size_bytes = max(16 * 2**20, min(size_bytes, available // 4))
    data = np.ones(size_bytes // 8, dtype=np.float64)
    threads = min(cpu.usable_cores(), 32)
    chunks = np.array_split(data, threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def read_all() -> None:
            list(pool.map(np.sum, chunks))

        read_all()  # warm up: threads started, pages resident
        seconds = _best_time(read_all, reps=8, budget_s=_PROBE_BUDGET_S)
    return data.nbytes / max(seconds, 1e-9) / 1e9


def _bandwidth_key() -> str:
    return f"{cpu.cpu_name()}|{cpu.cpu_cores()}|{_PROBE_BYTES >> 20}MiB"


def _read_bandwidth_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_memory_bandwidth_gbps(cache_dir: Path | None = None, *, refresh: bool = False) -> float:
    """The host's memory read bandwidth in GB/s, measured once and cached.

    The figure is kept in ``cache_dir/cpu_bandwidth.json`` (default
    :func:`engine_cache_dir`) under the CPU's name and core count; ``refresh=True``
    measures again.
    """
    directory = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
    path = directory / _BANDWIDTH_FILE
    key = _bandwidth_key()
    entries = _read_bandwidth_cache(path)
    if not refresh:
        entry = entries.get(key)
        if isinstance(entry, dict):
            value = entry.get("gbps")
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                return float(value)
    gbps = float(measure_cpu_memory_bandwidth_gbps())
    entries[key] = {
        "gbps": gbps,
        "method": f"numpy threaded sum, {_PROBE_BYTES >> 20} MiB float64, best of runs",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        private_dir(directory, "cache")
        write_private(path, json.dumps(entries, indent=2, sort_keys=True).encode(), sync=False)
    except (OSError, StateDirError) as exc:  # a read-only cache must not stop the engine
        log.warning("could not cache CPU bandwidth in %s: %s", path, exc)
    return gbps


def memory_bandwidth_gbps(device: Device, cache_dir: Path | None = None) -> float | None:
    """Peak memory bandwidth of ``device`` in GB/s.

    GPUs: the spec sheet (None for a family it does not list). CPU: measured once
    (:func:`cpu_memory_bandwidth_gbps`).
    """
    if device.kind == "cpu":
        return cpu_memory_bandwidth_gbps(cache_dir)
    spec = gpu_spec_for(device.gpu_type, device.name, device.memory_total_bytes)
    return spec.memory_bandwidth_gbps if spec is not None else None
