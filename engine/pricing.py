"""Estimates from benchmark profiles: how long a job takes here and what to charge for it.

A profile is a benchmark report (``aitbc-engine bench ... --out DIR``). The
benchmark fits its cost model (:mod:`engine.bench.cost_model`) and stores it in
``report.json``::

    execution seconds = fixed + prefill_per_token * prompt_tokens + decode_per_token * output_tokens

Pricing reads that model and the configuration the profile's jobs ran in
(:class:`~engine.bench.report.RunConfig`); it fits nothing. The fit's error on
its points (RMSE and worst relative error) travels with every estimate. An
estimate assumes the job generates all ``max_tokens`` (an upper bound: a job
that stops early costs less), and holds for the profile's configuration: given
the configuration jobs will run in (``run_config``, which the caller reads, e.g.
:func:`engine.bench.run_config.current_run_config`), it warns where the two
differ. Knows nothing of torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from engine.base import StrictModel
from engine.bench.cost_model import CostModel, CostModelError, FitError
from engine.bench.cost_model import fit_cost_model as _fit_runs
from engine.bench.report import Report, RunConfig, read_report
from engine.errors import EngineError

__all__ = ["CostModel", "Estimate", "FitError", "PricingError", "Profile", "Quote", "RunConfig",
           "configuration_warnings", "estimate", "fit_cost_model", "load_profile",
           "profile_from_report", "quote_for_available_job"]

SECONDS_PER_HOUR = 3600.0


class PricingError(EngineError):
    """A profile or a job listing cannot be priced."""

    code = "pricing_error"


class Profile(StrictModel):
    """What an estimate needs from a report: where it ran, in what configuration, and the
    fitted cost model."""

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
    run_config: RunConfig | None = None  # None: not recorded (a schema /1 report)


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
    # Where the configuration the estimate is for differs from the profile's (see estimate).
    warnings: list[str] = Field(default_factory=list)


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
    """The cost model of a report's single-stream runs, fitted again (needs 3+ distinct shapes).

    Kept for callers of the earlier API: the benchmark stores this fit in the
    report (``report.cost_model``), which is what :func:`profile_from_report` reads.
    """
    rep = report if isinstance(report, Report) else Report.model_validate(report)
    try:
        return _fit_runs(rep.single_runs())
    except CostModelError as exc:
        raise PricingError(exc.message, field=exc.field) from exc


def profile_from_report(report: Report, source: str = "") -> Profile:
    """A :class:`Profile` from a report in memory: its stored cost model and configuration."""
    if report.cost_model is None:
        raise PricingError(f"the profile {source or '(in memory)'} has no cost model: "
                           f"{report.no_cost_model or 'none was stored'}", field="profile")
    env = report.environment
    return Profile(source=source, model=env.model, weights=env.weights, dtype=env.dtype,
                   device=str(env.device.get("id", env.device_class)),
                   device_class=env.device_class, gpu_type=env.device.get("gpu_type"),
                   device_count=1, created_at=report.created_at,
                   cost_model=report.cost_model, run_config=env.run_config)


def load_profile(path: str | Path) -> Profile:
    """Read a report (``report.json`` or its directory): its cost model and configuration."""
    return profile_from_report(read_report(path), str(path))


def configuration_warnings(profile: Profile, run_config: RunConfig | None) -> list[str]:
    """What an estimate from ``profile`` cannot vouch for when jobs run in ``run_config``."""
    if run_config is None:
        return []
    if profile.run_config is None:
        return ["the profile does not record the configuration its jobs ran in (a report of "
                "an earlier schema): run `aitbc-engine bench` again to check it against the "
                "configuration jobs run in here"]
    diffs = profile.run_config.differences(run_config)
    if not diffs:
        return []
    said = ", ".join(f"{name} {ours!r} (jobs here: {theirs!r})" for name, ours, theirs in diffs)
    return [f"the profile's jobs ran with {said}: the estimate is for the profile's "
            "configuration and may be far off; benchmark in the configuration jobs run in"]


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
             gpu_count: int = 1, run_config: RunConfig | None = None) -> Estimate:
    """Estimated time, GPU seconds, price and break-even price per 1k tokens of one job.

    ``run_config``: the configuration the job will run in; where it differs from the
    profile's, the estimate's ``warnings`` say so.
    """
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
                    fit_error=profile.cost_model.fit_error, device_class=profile.device_class,
                    warnings=configuration_warnings(profile, run_config))


def quote_for_available_job(profile: Profile, job_listing: Mapping[str, Any],
                            price_per_hour: float, *, prompt_tokens: int | None = None,
                            max_tokens: int | None = None,
                            run_config: RunConfig | None = None) -> Quote:
    """Price an entry of the doc coordinator's ``jobs/available`` list.

    The listing gives ``job_id``, ``model``, ``gpu_type``, ``gpu_count``,
    ``estimated_time`` (seconds) and ``price``. Without the job's shape our time
    is the coordinator's ``estimated_time``; with ``prompt_tokens`` and
    ``max_tokens`` it is the profile's estimate. The quote is our GPU seconds at
    ``price_per_hour``; the job pays when the offered price is at least that. With
    ``run_config``, a configuration that differs from the profile's is among the notes.
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
                       price_per_hour=rate, gpu_count=gpu_count, run_config=run_config)
        notes += est.warnings
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
