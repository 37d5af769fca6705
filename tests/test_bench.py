"""engine.bench end to end on the tiny GPT-2: scenarios, report files, consistency, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.bench.report import BenchConfig, Report, ReportError, read_report, write_report
from engine.bench.scenarios import (
    BenchError,
    make_prompt_ids,
    merge_reports,
    quick_config,
    run_bench,
)
from engine.cli import main

TINY = "tiny-gpt2"


def tiny_config(**overrides: object) -> BenchConfig:
    base: dict[str, object] = {
        "model": TINY, "device": "cpu", "prompt_tokens": [4, 12], "new_tokens": [3, 6],
        "batch_sizes": [1, 2], "offline_prompt_tokens": 5, "offline_new_tokens": 4,
        "min_runs": 2, "min_seconds": 0.0, "warmup_runs": 1, "load_repeats": 1, "threads": 1}
    base.update(overrides)
    return BenchConfig.model_validate(base)


@pytest.fixture(scope="module")
def tiny_report(registry_path: Path) -> Report:
    return run_bench(tiny_config(), registry=registry_path, probe_bandwidth=False)


def test_every_scenario_runs_and_points_cover_the_grid(tiny_report: Report) -> None:
    shapes = [(p.prompt_tokens, p.new_tokens) for p in tiny_report.single_stream]
    assert shapes == [(4, 3), (4, 6), (12, 3), (12, 6)]
    assert [p.batch_size for p in tiny_report.offline] == [1, 2]
    assert tiny_report.load is not None
    assert tiny_report.load.cold_load_seconds > 0
    assert len(tiny_report.load.reload_seconds) == 1
    assert tiny_report.load.pool_hit_seconds < tiny_report.load.cold_load_seconds
    assert tiny_report.load.weight_bytes > 0


def test_prompts_have_exact_lengths_and_raw_runs_are_kept(tiny_report: Report) -> None:
    for point in tiny_report.single_stream:
        assert point.warmup_runs == 1
        assert point.metrics.runs == len(point.runs) == 2  # warm-up runs are not among them
        for run in point.runs:
            assert run.prompt_tokens == point.prompt_tokens
            assert 1 <= run.completion_tokens <= point.new_tokens
            assert len(run.inter_token_seconds) == run.completion_tokens - 1
            assert run.latency_seconds >= run.execution_seconds > 0
        assert len({r.job_id for r in point.runs}) == len(point.runs)


def test_throughput_matches_tokens_over_latency(tiny_report: Report) -> None:
    for point in tiny_report.single_stream:
        tokens = sum(r.completion_tokens for r in point.runs)
        latency = math.fsum(r.latency_seconds for r in point.runs)
        assert point.metrics.output_tokens_per_s == pytest.approx(tokens / latency, rel=0.05)
        assert point.metrics.requests_per_s == pytest.approx(len(point.runs) / latency, rel=0.05)
    for op in tiny_report.offline:
        tokens = sum(j.completion_tokens for b in op.batches for j in b.jobs)
        wall = math.fsum(b.wall_seconds for b in op.batches)
        assert op.metrics.output_tokens_per_s == pytest.approx(tokens / wall, rel=0.05)
    assert tiny_report.checks.max_throughput_deviation < 0.05


def test_ttft_and_tpot_add_up_to_the_execution_time(tiny_report: Report) -> None:
    runs = tiny_report.single_runs() + [j for op in tiny_report.offline for b in op.batches
                                        for j in b.jobs]
    deviations = []
    for r in runs:
        if r.completion_tokens > 1:
            assert r.ttft_seconds is not None and r.tpot_seconds is not None
            assert r.commitment_seconds is not None  # every generation carries a commitment
            line = (r.ttft_seconds + (r.completion_tokens - 1) * r.tpot_seconds
                    + r.commitment_seconds)
            assert line <= r.execution_seconds + 1e-9
            # Tiny jobs take milliseconds: allow a scheduler hiccup after the last token.
            assert line == pytest.approx(r.execution_seconds, rel=0.05, abs=0.005)
            deviations.append(abs(line / r.execution_seconds - 1))
    assert deviations
    assert tiny_report.checks.max_timeline_deviation == pytest.approx(max(deviations))


def test_offline_jobs_ran_in_engine_batches(tiny_report: Report) -> None:
    one, two = tiny_report.offline
    assert one.observed_batch_sizes == [1]
    assert two.observed_batch_sizes == [2]
    assert two.batching == "engine decode batch"
    for batch in two.batches:
        assert len(batch.jobs) == 2
        assert all(j.batched and j.batch_size == 2 for j in batch.jobs)
        assert batch.wall_seconds >= max(j.execution_seconds for j in batch.jobs)


def test_environment_and_policy_are_recorded(tiny_report: Report) -> None:
    env = tiny_report.environment
    assert env.model == TINY and env.device["id"] == "cpu"
    assert env.weights_digest.startswith("sha256:")
    assert env.torch_version and env.transformers_version
    assert "warm-up" in tiny_report.policy and "repeats" in tiny_report.policy
    assert tiny_report.roofline is not None and tiny_report.roofline.bandwidth_gbps > 0


def test_report_files_round_trip(tiny_report: Report, tmp_path: Path) -> None:
    paths = write_report(tiny_report, tmp_path / "out")
    names = {p.name for p in paths}
    assert {"report.json", "report.md"} <= names
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) >= 2
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_report(tmp_path / "out") == tiny_report
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Single stream" in md and "## Offline (batched)" in md and "## Cost model" in md
    for png in pngs:
        assert f"]({png.name})" in md


def test_each_point_repeats_until_the_minimum_duration(registry_path: Path) -> None:
    config = tiny_config(scenarios=["single"], prompt_tokens=[4], new_tokens=[2], min_runs=1,
                         min_seconds=0.2, warmup_runs=0)
    report = run_bench(config, registry=registry_path, probe_bandwidth=False)
    point = report.single_stream[0]
    assert math.fsum(r.latency_seconds for r in point.runs) >= 0.2
    assert point.metrics.runs == len(point.runs) > 1
    assert report.load is None and report.offline == []


def test_grid_beyond_the_context_length_is_refused(registry_path: Path) -> None:
    with pytest.raises(BenchError, match="context length"):
        run_bench(tiny_config(prompt_tokens=[260]), registry=registry_path)


def test_embedding_models_are_refused(registry_path: Path) -> None:
    with pytest.raises(BenchError, match="text-generation"):
        run_bench(tiny_config(model="all-minilm-l6-v2"), registry=registry_path)


def test_prompt_ids_are_seeded_exact_and_avoid_special_tokens() -> None:
    ids = make_prompt_ids(300, 50, seed=3, avoid={0, 1, 2})
    assert len(ids) == 300 and not {0, 1, 2} & set(ids) and max(ids) < 50
    assert ids == make_prompt_ids(300, 50, seed=3, avoid={0, 1, 2})
    assert ids != make_prompt_ids(300, 50, seed=4, avoid={0, 1, 2})


def test_quick_config_is_small_and_runs_jobs_as_run_does() -> None:
    cfg = quick_config("smollm2-135m")
    assert cfg.quick and cfg.min_runs == 2
    assert len(cfg.prompt_tokens) >= 2 and len(cfg.new_tokens) >= 2
    # No pinned thread count, batch size or decode path: the engine's defaults, as `run` uses.
    assert (cfg.threads, cfg.batch_size, cfg.decode) == (None, None, "auto")


def test_the_report_records_the_configuration_jobs_ran_in(tiny_report: Report) -> None:
    rc = tiny_report.environment.run_config
    assert rc is not None
    assert (rc.device_class, rc.torch_threads, rc.decode) == ("cpu", 1, "auto")
    assert rc.batch_size == 8  # engine.executor.default_batch_size on the CPU
    assert rc.dtype == tiny_report.environment.dtype
    assert rc.linear_kernel in ("blas", "row-invariant")
    assert tiny_report.environment.torch_threads == 1
    assert tiny_report.cost_model is not None and tiny_report.no_cost_model is None
    if torch.get_num_threads() != 1:
        assert any("ran with 1 torch thread(s)" in n for n in tiny_report.notes)


def test_a_default_benchmark_runs_in_the_configuration_run_would_use(
        registry_path: Path) -> None:
    """What the bench records with no overrides is what `run` would use here now."""
    from engine.bench.run_config import current_run_config
    from engine.registry import Registry

    config = tiny_config(scenarios=["single"], prompt_tokens=[4], new_tokens=[2], threads=None)
    report = run_bench(config, registry=registry_path, probe_bandwidth=False)
    spec = Registry.load(registry_path).get(TINY)
    assert report.environment.run_config == current_run_config(spec, device="cpu")
    assert report.environment.run_config is not None
    assert report.environment.run_config.torch_threads == torch.get_num_threads()
    assert report.cost_model is None and "too few" in (report.no_cost_model or "")
    assert not any("torch thread" in n for n in report.notes)
    asked = current_run_config(spec, device="cpu", decode="dynamic", batch_size=2)
    other = run_bench(config.model_copy(update={"decode": "dynamic", "batch_size": 2}),
                      registry=registry_path, probe_bandwidth=False)
    assert other.environment.run_config == asked


def test_read_report_rejects_other_schemas(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps({"schema_version": "other/9"}))
    with pytest.raises(ReportError, match="schema"):
        read_report(tmp_path)
    with pytest.raises(ReportError, match="cannot read"):
        read_report(tmp_path / "missing.json")


def test_cli_bench_writes_a_report(registry_path: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    status = main(["bench", TINY, "--registry", str(registry_path), "--device", "cpu",
                   "--scenario", "single,offline", "--prompt-tokens", "3,6",
                   "--new-tokens", "2,3", "--batch-sizes", "1,2", "--min-runs", "1",
                   "--min-seconds", "0", "--out", str(out), "--no-progress",
                   "--no-bandwidth-probe", "--threads", "1"])
    assert status == 0
    report = read_report(out / "report.json")
    assert [p.prompt_tokens for p in report.single_stream] == [3, 3, 6, 6]
    assert report.config.scenarios == ["single", "offline"]
    assert len(list(out.glob("*.png"))) >= 2
    assert "wrote" in capsys.readouterr().out


def test_cli_bench_rejects_unknown_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", TINY, "--scenario", "server"])
    assert exc.value.code == 2
    assert "load, single, offline" in capsys.readouterr().err


def test_merging_rounds_concatenates_runs_and_recomputes_metrics(tiny_report: Report) -> None:
    merged = merge_reports([tiny_report, tiny_report])
    for before, after in zip(tiny_report.single_stream, merged.single_stream, strict=True):
        assert after.runs == before.runs + before.runs
        assert after.metrics.runs == 2 * before.metrics.runs
        assert after.metrics.output_tokens_per_s == pytest.approx(
            before.metrics.output_tokens_per_s)
    assert merged.offline == []
    other = tiny_report.model_copy(update={"single_stream": tiny_report.single_stream[:1]})
    with pytest.raises(BenchError, match="same model and grid"):
        merge_reports([tiny_report, other])
