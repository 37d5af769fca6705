"""Summary statistics of raw benchmark values: mean, p50, p90, p99 (and min, max).

Percentiles are numpy's (``numpy.percentile``, its default ``method="linear"``:
linear interpolation between closest ranks), the definition the report states.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from engine.base import StrictModel


class Summary(StrictModel):
    """The distribution of one metric over the runs of a point (seconds unless named otherwise)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def _check_q(q: float) -> None:
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``: ``numpy.percentile`` (linear)."""
    if not values:
        raise ValueError("percentile of no values")
    _check_q(q)
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(values: Iterable[float | None]) -> Summary | None:
    """Mean, p50, p90, p99, min and max of the values that were measured (None when none were)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return None
    p50, p90, p99 = (float(p) for p in np.percentile(np.asarray(kept), [50, 90, 99]))
    return Summary(count=len(kept), mean=math.fsum(kept) / len(kept), p50=p50, p90=p90,
                   p99=p99, min=min(kept), max=max(kept))
