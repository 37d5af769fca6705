"""engine.pricing: the stored cost model, estimates, configuration warnings, quotes for
jobs/available, and the CLI."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.bench import cost_model
from engine.bench.report import (
    SCHEMA_V1,
    BenchConfig,
    Report,
    RunConfig,
    RunRecord,
    SinglePoint,
    read_report,
    with_cost_model,
    write_report,
)
from engine.bench.scenarios import run_bench
from engine.cli import main
from engine.pricing import (
    PricingError,
    Profile,
    estimate,
    fit_cost_model,
    load_profile,
    profile_from_report,
    quote_for_available_job,
)

FIXED, PREFILL, DECODE = 0.05, 0.0004, 0.02


@pytest.fixture(scope="module")
def tiny_report(registry_path: Path) -> Report:
    """Single-stream runs with one torch thread (steady timings on a shared machine)."""
    config = BenchConfig(model="tiny-gpt2", device="cpu", scenarios=["single"],
                         prompt_tokens=[4, 16], new_tokens=[3, 8], min_runs=2, min_seconds=0.0,
                         warmup_runs=1, threads=1)
    return run_bench(config, registry=registry_path, probe_bandwidth=False)


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """This process runs torch with one thread, as the tiny profile's jobs did."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(p: int, n: int, seconds: float, k: int) -> RunRecord:
    return RunRecord(job_id=f"j{k}", prompt_tokens=p, completion_tokens=n, finish_reason="length",
                     latency_seconds=seconds, execution_seconds=seconds, ttft_seconds=None,
                     tpot_seconds=None, inter_token_seconds=[], gpu_seconds=0.0)


def synthetic(report: Report, noise: float = 0.0, seed: int = 0) -> Report:
    """``report`` with its single-stream runs replaced by runs of a known cost model."""
    rng = random.Random(seed)
    template = report.single_stream[0]
    points = []
    k = 0
    for p in (8, 64, 256):
        for n in (4, 32, 128):
            runs = []
            for _ in range(3):
                exact = FIXED + PREFILL * p + DECODE * n
                runs.append(_run(p, n, exact * (1 + rng.uniform(-noise, noise)), k))
                k += 1
            points.append(SinglePoint(prompt_tokens=p, new_tokens=n, warmup_runs=1,
                                      metrics=template.metrics, runs=runs))
    return with_cost_model(report.model_copy(update={"single_stream": points}))


@pytest.fixture()
def exact_profile(tiny_report: Report) -> Profile:
    return profile_from_report(synthetic(tiny_report), "synthetic")


def test_fit_recovers_a_known_cost_model(tiny_report: Report) -> None:
    fit = fit_cost_model(synthetic(tiny_report))
    assert fit.fixed_seconds == pytest.approx(FIXED, rel=1e-6)
    assert fit.prefill_seconds_per_token == pytest.approx(PREFILL, rel=1e-6)
    assert fit.decode_seconds_per_token == pytest.approx(DECODE, rel=1e-6)
    assert fit.points == 27
    assert fit.rmse_seconds < 1e-9 and fit.max_relative_error < 1e-9


def test_fit_error_is_stated_for_noisy_runs(tiny_report: Report) -> None:
    noisy = synthetic(tiny_report, noise=0.05, seed=7)
    fit = fit_cost_model(noisy)
    runs = noisy.single_runs()
    y = np.array([r.execution_seconds for r in runs])
    pred = np.array([fit.seconds(r.prompt_tokens, r.completion_tokens) for r in runs])
    assert fit.rmse_seconds == pytest.approx(math.sqrt(float(np.mean((pred - y) ** 2))))
    assert fit.max_relative_error == pytest.approx(float(np.max(np.abs(pred - y) / y)))
    assert 0 < fit.max_relative_error < 0.15
    assert fit.decode_seconds_per_token == pytest.approx(DECODE, rel=0.1)


def test_fit_on_a_real_tiny_profile(tiny_report: Report) -> None:
    fit = fit_cost_model(tiny_report)
    assert fit.points == len(tiny_report.single_runs()) == 8
    assert fit.decode_seconds_per_token > 0
    assert fit.fit_error.points == 8


def test_the_benchmark_stores_the_fit_and_pricing_reads_it(tiny_report: Report) -> None:
    assert tiny_report.cost_model == fit_cost_model(tiny_report)
    assert tiny_report.cost_model == cost_model.fit_cost_model(tiny_report.single_runs())
    assert profile_from_report(tiny_report).cost_model == tiny_report.cost_model
    # Pricing fits nothing: a stored model is used as it is.
    doctored = tiny_report.cost_model.model_copy(update={"fixed_seconds": 123.0})
    profile = profile_from_report(tiny_report.model_copy(update={"cost_model": doctored}))
    assert estimate(profile, prompt_tokens=1, max_tokens=1, price_per_hour=1.0
                    ).estimated_time == pytest.approx(doctored.seconds(1, 1))


def test_fit_needs_two_prompt_and_two_output_lengths(tiny_report: Report) -> None:
    one = tiny_report.model_copy(update={"single_stream": tiny_report.single_stream[:2]})
    with pytest.raises(PricingError, match="too few"):
        fit_cost_model(one)
    with pytest.raises(cost_model.CostModelError, match="too few"):
        cost_model.fit_cost_model(one.single_runs())
    stored = with_cost_model(one)
    assert stored.cost_model is None and stored.no_cost_model
    assert "too few" in stored.no_cost_model
    with pytest.raises(PricingError, match="no cost model: the profile has too few") as exc:
        profile_from_report(stored, "one.json")
    assert exc.value.field == "profile"


def test_estimate_arithmetic(exact_profile: Profile) -> None:
    est = estimate(exact_profile, prompt_tokens=100, max_tokens=50, price_per_hour=0.05,
                   gpu_count=2)
    seconds = FIXED + PREFILL * 100 + DECODE * 50
    assert est.estimated_time == pytest.approx(seconds, rel=1e-6)
    assert est.gpu_seconds == pytest.approx(2 * seconds, rel=1e-6)
    assert est.price == pytest.approx(2 * seconds / 3600 * 0.05, rel=1e-6)
    assert est.break_even_price_per_1k_tokens == pytest.approx(est.price / 150 * 1000)
    assert est.break_even_price_per_1k_output_tokens == pytest.approx(est.price / 50 * 1000)
    assert est.fit_error.max_relative_error < 1e-9


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt_tokens": 0, "max_tokens": 5, "price_per_hour": 1.0}, "prompt_tokens"),
    ({"prompt_tokens": 5, "max_tokens": 0, "price_per_hour": 1.0}, "max_tokens"),
    ({"prompt_tokens": 5, "max_tokens": 5, "price_per_hour": -1.0}, "price_per_hour"),
    ({"prompt_tokens": 5, "max_tokens": 5, "price_per_hour": 1.0, "gpu_count": 0}, "gpu_count"),
])
def test_estimate_rejects_bad_inputs(exact_profile: Profile, kwargs: dict[str, float],
                                     field: str) -> None:
    with pytest.raises(PricingError) as exc:
        estimate(exact_profile, **kwargs)  # type: ignore[arg-type]
    assert exc.value.field == field


def listing(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"job_id": "job_abc123", "model": "tiny-gpt2", "gpu_type": "v100",
                               "gpu_count": 1, "estimated_time": 600, "price": 0.05}
    base.update(overrides)
    return base


def test_quote_pays_when_the_offer_covers_our_price(exact_profile: Profile) -> None:
    q = quote_for_available_job(exact_profile, listing(), price_per_hour=0.05)
    assert q.quote_price == pytest.approx(600 / 3600 * 0.05)
    assert q.offered_price_per_gpu_hour == pytest.approx(0.05 / (600 / 3600))
    assert q.pays
    assert any("v100" in n for n in q.notes)  # the profile ran on the CPU
    low = quote_for_available_job(exact_profile, listing(price=0.001), price_per_hour=0.05)
    assert not low.pays and low.quote_price > low.offered_price


def test_quote_uses_the_profile_when_the_shape_is_known(exact_profile: Profile) -> None:
    q = quote_for_available_job(exact_profile, listing(gpu_count=2), price_per_hour=0.05,
                                prompt_tokens=100, max_tokens=50)
    ours = FIXED + PREFILL * 100 + DECODE * 50
    assert q.our_estimated_time == pytest.approx(ours, rel=1e-6)
    assert q.quote_price == pytest.approx(ours * 2 / 3600 * 0.05, rel=1e-6)
    assert q.pays and "profile estimate" in q.basis


def test_quote_refuses_other_models_and_bad_listings(exact_profile: Profile) -> None:
    with pytest.raises(PricingError, match="benchmark gpt2") as exc:
        quote_for_available_job(exact_profile, listing(model="gpt2"), price_per_hour=0.05)
    assert exc.value.field == "model"
    bad = listing()
    del bad["price"]
    with pytest.raises(PricingError, match="'price'"):
        quote_for_available_job(exact_profile, bad, price_per_hour=0.05)
    with pytest.raises(PricingError) as exc:
        quote_for_available_job(exact_profile, listing(estimated_time="soon"), 0.05)
    assert exc.value.field == "estimated_time"


def test_load_profile_and_cli_price(tiny_report: Report, tmp_path: Path, registry_path: Path,
                                    one_thread: None,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_report(tiny_report, tmp_path)
    profile = load_profile(tmp_path / "report.json")
    assert profile.model == "tiny-gpt2" and profile.device == "cpu"
    assert profile.run_config == tiny_report.environment.run_config is not None
    status = main(["price", "--profile", str(tmp_path / "report.json"), "--price-per-hour",
                   "0.05", "--prompt-tokens", "10", "--max-tokens", "5", "--gpu-count", "2",
                   "--registry", str(registry_path), "--device", "cpu", "--json"])
    assert status == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    expected = estimate(profile, prompt_tokens=10, max_tokens=5, price_per_hour=0.05,
                        gpu_count=2)
    assert doc["estimate"]["estimated_time"] == pytest.approx(expected.estimated_time)
    assert doc["estimate"]["price"] == pytest.approx(expected.price)
    # The profile ran in the configuration jobs run in here: nothing to warn about.
    assert doc["run_config"] == profile.run_config.model_dump(mode="json")
    assert doc["estimate"]["warnings"] == [] and "warning" not in out.err
    assert main(["price", "--profile", str(tmp_path), "--price-per-hour", "0.05",
                 "--prompt-tokens", "10", "--max-tokens", "5", "--registry",
                 str(registry_path), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "estimated_time" in out.out and "warning" not in out.err


def _config(**changes: object) -> RunConfig:
    base = RunConfig(device_class="cpu", dtype="float32", torch_threads=8, batch_size=8,
                     decode="auto", linear_kernel="row-invariant")
    return base.model_copy(update=changes)


def test_estimates_warn_when_jobs_run_in_another_configuration(exact_profile: Profile) -> None:
    profile = exact_profile.model_copy(update={"run_config": _config(torch_threads=1)})
    same = estimate(profile, prompt_tokens=10, max_tokens=5, price_per_hour=1.0,
                    run_config=_config(torch_threads=1))
    assert same.warnings == []
    assert estimate(profile, prompt_tokens=10, max_tokens=5, price_per_hour=1.0).warnings == []
    other = estimate(profile, prompt_tokens=10, max_tokens=5, price_per_hour=1.0,
                     run_config=_config(batch_size=32))
    assert other.estimated_time == same.estimated_time
    [warning] = other.warnings
    assert "torch_threads 1 (jobs here: 8)" in warning
    assert "batch_size 8 (jobs here: 32)" in warning
    quote = quote_for_available_job(profile, listing(), 0.05, prompt_tokens=10, max_tokens=5,
                                    run_config=_config())
    assert any("torch_threads 1 (jobs here: 8)" in n for n in quote.notes)
    unrecorded = exact_profile.model_copy(update={"run_config": None})
    [warning] = estimate(unrecorded, prompt_tokens=10, max_tokens=5, price_per_hour=1.0,
                         run_config=_config()).warnings
    assert "does not record the configuration" in warning


def test_cli_price_warns_when_the_profile_ran_with_other_threads(
        tiny_report: Report, tmp_path: Path, registry_path: Path, one_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    env = tiny_report.environment
    assert env.run_config is not None and env.run_config.torch_threads == 1
    other = tiny_report.model_copy(update={"environment": env.model_copy(update={
        "run_config": env.run_config.model_copy(update={"torch_threads": 4})})})
    write_report(other, tmp_path)
    assert main(["price", "--profile", str(tmp_path), "--price-per-hour", "0.05",
                 "--prompt-tokens", "10", "--max-tokens", "5", "--registry",
                 str(registry_path), "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr()
    [warning] = json.loads(out.out)["estimate"]["warnings"]
    assert "torch_threads 4 (jobs here: 1)" in warning
    assert f"warning: {warning}" in out.err
    # A model the registry does not know: the estimate stands, with a warning saying so.
    assert main(["price", "--profile", str(tmp_path), "--price-per-hour", "0.05",
                 "--prompt-tokens", "10", "--max-tokens", "5"]) == 0
    assert "cannot tell the configuration tiny-gpt2's jobs run in" in capsys.readouterr().err


def test_reports_of_schema_1_are_read_with_a_fit_on_reading(tiny_report: Report,
                                                            tmp_path: Path) -> None:
    write_report(tiny_report, tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    doc["schema_version"] = SCHEMA_V1
    for key in ("cost_model", "no_cost_model"):
        del doc[key]
    for key in ("decode", "batch_size"):
        del doc["config"][key]
    del doc["environment"]["run_config"]
    (tmp_path / "report.json").write_text(json.dumps(doc))
    old = read_report(tmp_path)
    assert old.cost_model == tiny_report.cost_model
    assert old.environment.run_config is None
    assert any(SCHEMA_V1 in n for n in old.notes)
    profile = load_profile(tmp_path)
    assert profile.cost_model == tiny_report.cost_model and profile.run_config is None


def test_cli_price_explains_a_missing_profile(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["price", "--profile", str(tmp_path / "nope.json"), "--price-per-hour", "1",
                   "--prompt-tokens", "1", "--max-tokens", "1"])
    assert status == 2
    assert "aitbc-engine bench" in capsys.readouterr().err


def test_the_shipped_schema_1_report_still_prices() -> None:
    """docs/bench-smollm2-quick was written with schema /1: no stored fit, no run config."""
    shipped = Path(__file__).resolve().parent.parent / "docs" / "bench-smollm2-quick"
    raw = json.loads((shipped / "report.json").read_text())
    assert raw["schema_version"] == SCHEMA_V1 and "cost_model" not in raw
    profile = load_profile(shipped)
    assert profile.cost_model == cost_model.fit_cost_model(read_report(shipped).single_runs())
    assert profile.run_config is None
    [warning] = estimate(profile, prompt_tokens=10, max_tokens=5, price_per_hour=1.0,
                         run_config=_config()).warnings
    assert "does not record the configuration" in warning
