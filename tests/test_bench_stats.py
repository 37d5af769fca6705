"""engine.bench.stats: percentiles and summaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bench.stats import percentile, summarize

values = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1,
                  max_size=200)


@given(values, st.floats(min_value=0, max_value=100))
def test_percentile_is_numpys_linear(xs: list[float], q: float) -> None:
    assert percentile(xs, q) == float(np.percentile(xs, q))


@given(values)
def test_summary_percentiles_are_numpys(xs: list[float]) -> None:
    s = summarize(xs)
    assert s is not None
    assert (s.p50, s.p90, s.p99) == tuple(float(np.percentile(xs, q)) for q in (50, 90, 99))


@given(values)
def test_summary_is_ordered(xs: list[float]) -> None:
    s = summarize(xs)
    assert s is not None and s.count == len(xs)
    tol = 1e-6 * max(1.0, max(abs(x) for x in xs))
    assert s.min - tol <= s.p50 <= s.p90 + tol <= s.p99 + 2 * tol <= s.max + 3 * tol
    assert s.min - tol <= s.mean <= s.max + tol


def test_summary_of_known_values() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, None])
    assert s is not None
    assert (s.count, s.mean, s.p50, s.min, s.max) == (4, 2.5, 2.5, 1.0, 4.0)
    assert s.p90 == pytest.approx(3.7)
    assert s.p99 == pytest.approx(3.97)


def test_nothing_measured_is_none_and_bad_percentiles_raise() -> None:
    assert summarize([]) is None
    assert summarize([None, float("nan")]) is None
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
