"""Summary statistics of raw benchmark values: mean, p50, p90, p99 (and min, max)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict


class Summary(BaseModel):
    """The distribution of one metric over the runs of a point (seconds unless named otherwise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks.

    The same definition as numpy's default (``method="linear"``).
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(float(v) for v in values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    frac = rank - low
    return ordered[low] + (ordered[high] - ordered[low]) * frac


def summarize(values: Iterable[float | None]) -> Summary | None:
    """Mean, p50, p90, p99, min and max of the values that were measured (None when none were)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return None
    return Summary(count=len(kept), mean=math.fsum(kept) / len(kept),
                   p50=percentile(kept, 50), p90=percentile(kept, 90), p99=percentile(kept, 99),
                   min=min(kept), max=max(kept))
