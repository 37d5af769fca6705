"""engine.pricing: the cost-model fit, estimates, quotes for jobs/available, and the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from engine.bench.report import BenchConfig, Report, RunRecord, SinglePoint, write_report
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
    config = BenchConfig(model="tiny-gpt2", device="cpu", scenarios=["single"],
                         prompt_tokens=[4, 16], new_tokens=[3, 8], min_runs=2, min_seconds=0.0,
                         warmup_runs=1, threads=1)
    return run_bench(config, registry=registry_path, probe_bandwidth=False)


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
    return report.model_copy(update={"single_stream": points})


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


def test_fit_needs_two_prompt_and_two_output_lengths(tiny_report: Report) -> None:
    one = tiny_report.model_copy(update={"single_stream": tiny_report.single_stream[:2]})
    with pytest.raises(PricingError, match="too few"):
        fit_cost_model(one)


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


def test_load_profile_and_cli_price(tiny_report: Report, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    write_report(tiny_report, tmp_path)
    profile = load_profile(tmp_path / "report.json")
    assert profile.model == "tiny-gpt2" and profile.device == "cpu"
    status = main(["price", "--profile", str(tmp_path / "report.json"), "--price-per-hour",
                   "0.05", "--prompt-tokens", "10", "--max-tokens", "5", "--gpu-count", "2",
                   "--json"])
    assert status == 0
    doc = json.loads(capsys.readouterr().out)
    expected = estimate(profile, prompt_tokens=10, max_tokens=5, price_per_hour=0.05,
                        gpu_count=2)
    assert doc["estimate"]["estimated_time"] == pytest.approx(expected.estimated_time)
    assert doc["estimate"]["price"] == pytest.approx(expected.price)
    assert main(["price", "--profile", str(tmp_path), "--price-per-hour", "0.05",
                 "--prompt-tokens", "10", "--max-tokens", "5"]) == 0
    assert "estimated_time" in capsys.readouterr().out


def test_cli_price_explains_a_missing_profile(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["price", "--profile", str(tmp_path / "nope.json"), "--price-per-hour", "1",
                   "--prompt-tokens", "1", "--max-tokens", "1"])
    assert status == 2
    assert "aitbc-engine bench" in capsys.readouterr().err


def test_pricing_and_reports_do_not_import_torch() -> None:
    """DESIGN.md: pricing knows nothing of torch (nor do the report models it reads)."""
    import ast

    import engine

    root = Path(engine.__file__).parent
    allowed = {"engine.base", "engine.errors", "engine.hardware", "engine.pricing",
               "engine.bench.report", "engine.bench.roofline", "engine.bench.stats"}
    for rel in ("pricing.py", "bench/report.py", "bench/roofline.py", "bench/stats.py"):
        tree = ast.parse((root / rel).read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] != "torch", f"{rel} imports {name}"
                if name.startswith("engine"):
                    assert name in allowed, f"{rel} imports {name}"
