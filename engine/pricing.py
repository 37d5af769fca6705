"""Estimates from benchmark profiles: how long a job takes here and what to charge for it.

A profile is a benchmark report (``aitbc-engine bench ... --out DIR``). The cost
model is fitted by least squares over its raw single-stream runs::

    execution seconds = fixed + prefill_per_token * prompt_tokens + decode_per_token * output_tokens

Rows are weighted by 1/seconds, so the fit minimises relative error (short and
long jobs count alike); its error on the fit points (RMSE and worst relative
error) travels with every estimate. An estimate assumes the job generates all
``max_tokens`` (an upper bound: a job that stops early costs less). Knows
nothing of torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.base import StrictModel
from engine.bench.report import Report, read_report
from engine.errors import EngineError

SECONDS_PER_HOUR = 3600.0


class PricingError(EngineError):
    """A profile or a job listing cannot be priced."""

    code = "pricing_error"


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
    method: str = "least squares, rows weighted by 1/seconds, over single-stream raw runs"

    def seconds(self, prompt_tokens: int, output_tokens: int) -> float:
        """Predicted execution seconds (never below zero)."""
        return max(0.0, self.fixed_seconds + self.prefill_seconds_per_token * prompt_tokens
                   + self.decode_seconds_per_token * output_tokens)

    @property
    def fit_error(self) -> FitError:
        """The fit's error on its own points."""
        return FitError(points=self.points, rmse_seconds=self.rmse_seconds,
                        max_relative_error=self.max_relative_error)


class Profile(StrictModel):
    """What an estimate needs from a report: where it ran and the fitted cost model."""

    source: str
    model: str
    weights: str
    dtype: str
    device: str
    device_class: str
    gpu_type: str | None
    device_count: int
    created_at: str
    cost_model: CostModel


class Estimate(StrictModel):
    """A job's estimated time and price on the profiled machine."""

    model: str
    prompt_tokens: int
    max_tokens: int
    estimated_time: float  # seconds of execution (the protocol's ``estimated_time``)
    gpu_count: int
    gpu_seconds: float  # estimated_time x gpu_count: what the job holds
    price_per_hour: float  # per GPU hour
    price: float  # gpu_seconds / 3600 x price_per_hour
    break_even_price_per_1k_tokens: float  # price / (prompt + max_tokens) x 1000
    break_even_price_per_1k_output_tokens: float
    fit_error: FitError
    device_class: str
    assumption: str = "the job generates all max_tokens (an upper bound)"


class Quote(StrictModel):
    """Whether a job from ``jobs/available`` pays at our price, and what to quote."""

    job_id: str
    model: str
    pays: bool
    offered_price: float
    quote_price: float  # our price for the job: our GPU seconds at price_per_hour
    offered_price_per_gpu_hour: float | None  # the offer over the coordinator's estimate
    our_estimated_time: float
    coordinator_estimated_time: float
    gpu_count: int
    basis: str
    notes: list[str]


def fit_cost_model(report: Report | Mapping[str, Any]) -> CostModel:
    """Fit the cost model to a report's single-stream raw runs (needs 3+ distinct shapes)."""
    import numpy as np

    rep = report if isinstance(report, Report) else Report.model_validate(report)
    runs = [r for r in rep.single_runs() if r.execution_seconds > 0]
    shapes = {(r.prompt_tokens, r.completion_tokens) for r in runs}
    prompts = {p for p, _ in shapes}
    outputs = {n for _, n in shapes}
    if len(shapes) < 3 or len(prompts) < 2 or len(outputs) < 2:
        raise PricingError("the profile has too few single-stream shapes to fit a cost model "
                           f"({len(prompts)} prompt length(s), {len(outputs)} output length(s)); "
                           "benchmark at least 2 prompt lengths and 2 new-token counts with the "
                           "'single' scenario", field="profile")
    x = np.array([[1.0, r.prompt_tokens, r.completion_tokens] for r in runs])
    y = np.array([r.execution_seconds for r in runs])
    w = 1.0 / y
    coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    predicted = x @ coef
    rmse = float(math.sqrt(float(np.mean((predicted - y) ** 2))))
    worst = float(np.max(np.abs(predicted - y) / y))
    return CostModel(fixed_seconds=float(coef[0]), prefill_seconds_per_token=float(coef[1]),
                     decode_seconds_per_token=float(coef[2]), points=len(runs),
                     rmse_seconds=rmse, max_relative_error=worst)


def profile_from_report(report: Report, source: str = "") -> Profile:
    """A :class:`Profile` from a report in memory."""
    env = report.environment
    return Profile(source=source, model=env.model, weights=env.weights, dtype=env.dtype,
                   device=str(env.device.get("id", env.device_class)),
                   device_class=env.device_class, gpu_type=env.device.get("gpu_type"),
                   device_count=1, created_at=report.created_at,
                   cost_model=fit_cost_model(report))


def load_profile(path: str | Path) -> Profile:
    """Read a report (``report.json`` or its directory) and fit its cost model."""
    return profile_from_report(read_report(path), str(path))


def _check_number(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PricingError(f"{name} must be a number, got {value!r}", field=name)
    if value < 0 or (positive and value == 0):
        raise PricingError(f"{name} must be {'positive' if positive else 'at least 0'}, "
                           f"got {value}", field=name)
    return float(value)


def _check_count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PricingError(f"{name} must be an integer of at least {minimum}, got {value!r}",
                           field=name)
    return value


def estimate(profile: Profile, *, prompt_tokens: int, max_tokens: int, price_per_hour: float,
             gpu_count: int = 1) -> Estimate:
    """Estimated time, GPU seconds, price and break-even price per 1k tokens of one job."""
    prompt_tokens = _check_count(prompt_tokens, "prompt_tokens", 1)
    max_tokens = _check_count(max_tokens, "max_tokens", 1)
    gpu_count = _check_count(gpu_count, "gpu_count", 1)
    rate = _check_number(price_per_hour, "price_per_hour")
    seconds = profile.cost_model.seconds(prompt_tokens, max_tokens)
    gpu_seconds = seconds * gpu_count
    price = gpu_seconds / SECONDS_PER_HOUR * rate
    return Estimate(model=profile.model, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                    estimated_time=seconds, gpu_count=gpu_count, gpu_seconds=gpu_seconds,
                    price_per_hour=rate, price=price,
                    break_even_price_per_1k_tokens=1000 * price / (prompt_tokens + max_tokens),
                    break_even_price_per_1k_output_tokens=1000 * price / max_tokens,
                    fit_error=profile.cost_model.fit_error, device_class=profile.device_class)


def quote_for_available_job(profile: Profile, job_listing: Mapping[str, Any],
                            price_per_hour: float, *, prompt_tokens: int | None = None,
                            max_tokens: int | None = None) -> Quote:
    """Price an entry of the doc coordinator's ``jobs/available`` list.

    The listing gives ``job_id``, ``model``, ``gpu_type``, ``gpu_count``,
    ``estimated_time`` (seconds) and ``price``. Without the job's shape our time
    is the coordinator's ``estimated_time``; with ``prompt_tokens`` and
    ``max_tokens`` it is the profile's estimate. The quote is our GPU seconds at
    ``price_per_hour``; the job pays when the offered price is at least that.
    """
    if not isinstance(job_listing, Mapping):
        raise PricingError("a job listing must be an object", field="job")
    for key in ("job_id", "model", "estimated_time", "price"):
        if key not in job_listing:
            raise PricingError(f"the job listing has no {key!r} (PROTOCOLS.md: job_id, model, "
                               "gpu_type, gpu_count, estimated_time, price)", field=key)
    job_id = str(job_listing["job_id"])
    model = str(job_listing["model"])
    if model != profile.model:
        raise PricingError(f"job {job_id} is for model {model!r} but the profile measured "
                           f"{profile.model!r}; benchmark {model} to price it", field="model")
    offered = _check_number(job_listing["price"], "price")
    their_time = _check_number(job_listing["estimated_time"], "estimated_time")
    gpu_count = _check_count(job_listing.get("gpu_count", 1), "gpu_count", 1)
    rate = _check_number(price_per_hour, "price_per_hour")
    notes: list[str] = []
    listed_type = job_listing.get("gpu_type")
    if listed_type and profile.gpu_type != listed_type:
        notes.append(f"the job asks for gpu_type {listed_type!r}; the profile ran on "
                     f"{profile.gpu_type or profile.device_class!r}")
    if prompt_tokens is not None and max_tokens is not None:
        est = estimate(profile, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                       price_per_hour=rate, gpu_count=gpu_count)
        ours, basis = est.estimated_time, (f"profile estimate for {prompt_tokens} prompt + "
                                           f"{max_tokens} output tokens")
    else:
        ours, basis = their_time, "the coordinator's estimated_time (job shape unknown)"
    quote = ours * gpu_count / SECONDS_PER_HOUR * rate
    offered_rate = offered / (their_time * gpu_count / SECONDS_PER_HOUR) if their_time else None
    return Quote(job_id=job_id, model=model, pays=offered >= quote, offered_price=offered,
                 quote_price=quote, offered_price_per_gpu_hour=offered_rate,
                 our_estimated_time=ours, coordinator_estimated_time=their_time,
                 gpu_count=gpu_count, basis=basis, notes=notes)
