"""The cost model of a benchmark profile, fitted where the benchmark runs and stored in the report.

Fitted by least squares over the profile's raw single-stream runs::

    execution seconds = fixed + prefill_per_token * prompt_tokens + decode_per_token * output_tokens

Rows are weighted by 1/seconds, so the fit minimises relative error (short and
long jobs count alike); its error on the fit points (RMSE and worst relative
error) is stored with it. ``report.json`` carries the fitted :class:`CostModel`;
:mod:`engine.pricing` reads it and never fits. Knows nothing of torch, of the
report's other shapes and of pricing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from engine.base import StrictModel
from engine.errors import EngineError

METHOD = "least squares, rows weighted by 1/seconds, over single-stream raw runs"


class CostModelError(EngineError):
    """The runs cannot support a cost model (too few distinct job shapes)."""

    code = "cost_model_error"


class FitError(StrictModel):
    """How well the cost model fits the runs it was fitted on."""

    points: int
    rmse_seconds: float
    max_relative_error: float


class CostModel(StrictModel):
    """Seconds a job takes: fixed overhead plus per prompt token plus per output token."""

    fixed_seconds: float
    prefill_seconds_per_token: float
    decode_seconds_per_token: float
    points: int
    rmse_seconds: float
    max_relative_error: float
    method: str = METHOD

    def seconds(self, prompt_tokens: int, output_tokens: int) -> float:
        """Predicted execution seconds (never below zero)."""
        return max(0.0, self.fixed_seconds + self.prefill_seconds_per_token * prompt_tokens
                   + self.decode_seconds_per_token * output_tokens)

    @property
    def fit_error(self) -> FitError:
        """The fit's error on its own points."""
        return FitError(points=self.points, rmse_seconds=self.rmse_seconds,
                        max_relative_error=self.max_relative_error)


class MeasuredRun(Protocol):
    """What the fit reads of a run (``engine.bench.report.RunRecord`` has it)."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def execution_seconds(self) -> float: ...


def fit_cost_model(runs: Sequence[MeasuredRun]) -> CostModel:
    """Fit the cost model to single-stream runs (needs 2+ prompt and 2+ output lengths).

    Raises :class:`CostModelError` when the runs have too few distinct shapes.
    """
    kept = [r for r in runs if r.execution_seconds > 0]
    shapes = {(r.prompt_tokens, r.completion_tokens) for r in kept}
    prompts = {p for p, _ in shapes}
    outputs = {n for _, n in shapes}
    if len(shapes) < 3 or len(prompts) < 2 or len(outputs) < 2:
        raise CostModelError("the profile has too few single-stream shapes to fit a cost model "
                             f"({len(prompts)} prompt length(s), {len(outputs)} output "
                             "length(s)); benchmark at least 2 prompt lengths and 2 new-token "
                             "counts with the 'single' scenario", field="profile")
    x = np.array([[1.0, r.prompt_tokens, r.completion_tokens] for r in kept])
    y = np.array([r.execution_seconds for r in kept])
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    predicted = x @ coef
    rmse = float(math.sqrt(float(np.mean((predicted - y) ** 2))))
    worst = float(np.max(np.abs(predicted - y) / y))
    return CostModel(fixed_seconds=float(coef[0]), prefill_seconds_per_token=float(coef[1]),
                     decode_seconds_per_token=float(coef[2]), points=len(kept),
                     rmse_seconds=rmse, max_relative_error=worst)
