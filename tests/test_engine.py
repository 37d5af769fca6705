"""Engine: jobs end to end on real models, typed failures, timeouts, cancellation, batching."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import make_tiny_gpt2, tiny_entry, write_registry

from engine import Engine, parse_payload
from engine.jobs import GenerationOutput

METRIC_FIELDS = {"execution_time_seconds", "gpu_time_seconds", "load_time_seconds", "device",
                 "measurement", "prompt_tokens", "completion_tokens", "ttft_seconds",
                 "tpot_seconds", "peak_memory_bytes"}


@pytest.fixture(scope="module")
def engine(registry_path: Path) -> Iterator[Engine]:
    with Engine(registry_path, devices=["cpu"], job_timeout=60) as eng:
        yield eng


def _gen(prompt: str = "Hello GPU", **params: object) -> dict[str, object]:
    return {"task": "text-generation", "model": "tiny-gpt2", "prompt": prompt,
            "params": {"max_tokens": 8, **params}}


def test_tiny_job_completes_with_every_metric(engine: Engine) -> None:
    result = engine.run(_gen())
    assert result.ok, result.error
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", result.result_hash or "")
    m = result.to_dict()["metrics"]
    assert set(m) >= METRIC_FIELDS
    assert m["gpu_time_seconds"] == 0.0 and m["device"] == "cpu"
    assert "energy_joules" not in m  # absent on CPU, never invented
    assert isinstance(result.output, GenerationOutput)
    assert m["completion_tokens"] == len(result.output.token_ids) <= 8
    assert result.profile is not None and result.profile.device_class == "cpu"
    assert result.profile.weights_digest.startswith("sha256:")


def test_same_job_same_hash_and_warm_load_is_zero(engine: Engine) -> None:
    a, b = engine.run(_gen("the same")), engine.run(_gen("the same"))
    assert a.result_hash == b.result_hash
    assert b.metrics is not None and b.metrics.load_time_seconds == 0.0


def test_sampled_jobs_are_reproducible_and_seed_sensitive(engine: Engine) -> None:
    r1 = engine.run(_gen("sample", temperature=1.0, seed=1, max_tokens=16))
    r2 = engine.run(_gen("sample", temperature=1.0, seed=1, max_tokens=16))
    r3 = engine.run(_gen("sample", temperature=1.0, seed=2, max_tokens=16))
    assert r1.output == r2.output and r1.result_hash == r2.result_hash
    assert r3.result_hash != r1.result_hash


def test_top_k_one_is_greedy(engine: Engine) -> None:
    greedy = engine.run(_gen("topk", max_tokens=12))
    sampled = engine.run(_gen("topk", max_tokens=12, temperature=0.7, top_k=1, seed=3))
    assert greedy.output is not None and sampled.output is not None
    assert greedy.output.token_ids == sampled.output.token_ids  # type: ignore[union-attr]


def test_stop_strings_cut_the_text(engine: Engine) -> None:
    free = engine.run(_gen("stop test", max_tokens=24))
    assert isinstance(free.output, GenerationOutput)
    text = free.output.text
    assert len(text) > 2
    stop = text[1:3]
    cut = engine.run(_gen("stop test", max_tokens=24, stop=[stop]))
    assert isinstance(cut.output, GenerationOutput)
    assert cut.output.finish_reason == "stop"
    assert cut.output.text == text[: text.find(stop)]
    assert cut.output.token_ids == free.output.token_ids[: len(cut.output.token_ids)]


@pytest.mark.parametrize(("payload", "code", "field"), [
    ({"type": "inference", "model": "nope", "prompt": "x"}, "unknown_model", "model"),
    ({"type": "inference", "model": "tiny-gpt2", "prompt": "a b c d e f", "max_tokens": 253},
     "context_length_exceeded", "prompt"),
    ({"type": "inference", "model": "tiny-gpt2", "prompt": "x", "max_tokens": 400},
     "context_length_exceeded", "max_tokens"),
    ({"type": "inference", "model": "tiny-gpt2", "prompt": "hello " * 300, "max_tokens": 4},
     "context_length_exceeded", "prompt"),
    ({"type": "embedding", "model": "tiny-gpt2", "input": ["x"]}, "invalid_job", "task"),
    ({"type": "transcribe", "model": "tiny-gpt2"}, "unsupported_job_type", "type"),
    ({"task": "text-generation", "model": "tiny-gpt2", "prompt_token_ids": [10**6]},
     "invalid_job", "prompt_token_ids"),
])
def test_bad_jobs_fail_typed_and_the_engine_keeps_serving(
        engine: Engine, payload: dict[str, object], code: str, field: str) -> None:
    failed = engine.run(payload)
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.field) == (code, field), failed.error.message
    assert engine.run(_gen()).ok


def test_timeout_fails_the_job_and_the_next_runs(registry_path: Path) -> None:
    with Engine(registry_path, devices=["cpu"], job_timeout=0.05) as eng:
        eng.run(_gen(max_tokens=1))  # warm the model so the limit is the job's own time
        slow = eng.run(_gen(max_tokens=240, prompt="a"))
        assert slow.status == "failed" and slow.error is not None
        assert slow.error.code == "timeout"
        assert eng.run(_gen(max_tokens=1)).ok


def test_cancel_a_queued_and_a_running_job(registry_path: Path) -> None:
    with Engine(registry_path, devices=["cpu"], max_concurrent=1) as eng:
        eng.run(_gen(max_tokens=1))
        running = eng.submit(_gen("long", max_tokens=240))
        queued = eng.submit(_gen("waiting"))
        assert queued.cancel()
        assert queued.result(30).error.code == "cancelled"  # type: ignore[union-attr]
        while not running.running() and not running.done():
            threading.Event().wait(0.005)
        running.cancel()
        assert running.result(60).error.code == "cancelled"  # type: ignore[union-attr]
        assert eng.run(_gen()).ok


def test_concurrency_limit_per_device(registry_path: Path) -> None:
    with Engine(registry_path, devices=["cpu"], max_concurrent=2, batch_size=1) as eng:
        handles = [eng.submit(_gen(f"job {i}", max_tokens=16)) for i in range(6)]
        peak = 0
        while not all(h.done() for h in handles):
            peak = max(peak, eng.running_count())
            threading.Event().wait(0.001)
        assert all(h.result().ok for h in handles)
        assert 1 <= peak <= 2


def test_batched_jobs_keep_their_own_semantics(registry_path: Path) -> None:
    jobs = [_gen("alpha", max_tokens=3), _gen("a much longer prompt here", max_tokens=12),
            _gen("stop me", max_tokens=20, stop=["e"]),
            _gen("sampled", temperature=1.0, seed=11, max_tokens=10)]
    with Engine(registry_path, devices=["cpu"]) as alone:
        solo = [alone.run(j) for j in jobs]
    with Engine(registry_path, devices=["cpu"], batch_size=4, batch_window_seconds=0.5) as eng:
        together = [h.result() for h in [eng.submit(j) for j in jobs]]
    for a, b in zip(solo, together, strict=True):
        assert b.ok and b.profile is not None and b.profile.batched and b.profile.batch_size == 4
        assert a.output == b.output and a.result_hash == b.result_hash


def test_embedding_job_on_the_shipped_minilm(engine: Engine) -> None:
    result = engine.run({"type": "embedding", "model": "all-minilm-l6-v2",
                         "input": ["a miner", "a validator"]})
    assert result.ok, result.error
    vecs = result.output.embeddings  # type: ignore[union-attr]
    assert len(vecs) == 2 and len(vecs[0]) == 384
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-4


def _cli_run(*args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "engine", "run", *args, "--json"],
                         capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_smollm2_paris_in_two_processes_same_hash() -> None:
    args = ("smollm2-135m", "--prompt", "The capital of France is", "--max-tokens", "8")
    first, second = _cli_run(*args), _cli_run(*args)
    assert "Paris" in first["output"]["text"]  # type: ignore[index]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", first["result_hash"])  # type: ignore[arg-type]
    assert first["metrics"]["gpu_time_seconds"] == 0.0  # type: ignore[index]
    assert set(first["metrics"]) >= METRIC_FIELDS  # type: ignore[arg-type]
    assert first["result_hash"] == second["result_hash"]


@pytest.mark.slow
def test_sampled_generation_reproducible_across_processes(registry_path: Path,
                                                          tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"type": "inference", "model": "tiny-gpt2", "prompt": "Hello",
                               "max_tokens": 12, "temperature": 0.9, "seed": 42}))
    a = _cli_run("--job", str(job), "--registry", str(registry_path))
    b = _cli_run("--job", str(job), "--registry", str(registry_path))
    assert a["output"] == b["output"] and a["result_hash"] == b["result_hash"]


def test_parse_then_run_matches_direct_job(engine: Engine) -> None:
    payload = {"type": "inference", "model": "tiny-gpt2", "prompt": "Hello GPU", "max_tokens": 8}
    assert engine.run(parse_payload(payload)).result_hash == engine.run(payload).result_hash


def test_static_cache_path_keeps_the_job_semantics(registry_path: Path) -> None:
    """The fast path (static cache; CUDA graphs on GPUs) is exercised uncompiled on the CPU."""
    jobs = [_gen("static one", max_tokens=10), _gen("static two", max_tokens=24, stop=["e"]),
            _gen("static three", max_tokens=6, temperature=0.8, seed=5)]
    with Engine(registry_path, devices=["cpu"]) as dynamic:
        expected = [dynamic.run(j) for j in jobs]
    with Engine(registry_path, devices=["cpu"], decode="static") as static:
        got = [static.run(j) for j in jobs]
    for job, want, have in zip(jobs, expected, got, strict=True):
        assert have.ok and have.profile is not None, have.error
        assert have.profile.decode == "static-cache"
        assert isinstance(have.output, GenerationOutput)
        assert isinstance(want.output, GenerationOutput)
        assert len(have.output.token_ids) <= job["params"]["max_tokens"]  # type: ignore[index]
        assert have.metrics is not None and have.metrics.ttft_seconds is not None
        assert have.metrics.completion_tokens == len(have.output.token_ids)
    assert got[0].output == expected[0].output  # greedy: the same tokens on this model
    assert got[1].output.finish_reason in ("stop", "eos", "length")  # type: ignore[union-attr]
    assert "e" not in got[1].output.text  # type: ignore[union-attr]


def test_seeded_sampling_is_independent_of_batch_mates(registry_path: Path) -> None:
    sampled = _gen("lucky draw", temperature=1.2, seed=99, max_tokens=12)
    others = [_gen("mate one", max_tokens=3), _gen("mate two is longer", max_tokens=16),
              _gen("mate three", temperature=0.9, seed=1, max_tokens=8),
              _gen("mate four", max_tokens=5, stop=["a"])]
    with Engine(registry_path, devices=["cpu"]) as alone:
        want = alone.run(sampled)
    for mates in (others[:1], others[:2], others, others[2:]):
        size = len(mates) + 1
        with Engine(registry_path, devices=["cpu"], batch_size=size,
                    batch_window_seconds=0.5) as eng:
            handles = [eng.submit(j) for j in [*mates[:1], sampled, *mates[1:]]]
            results = [h.result() for h in handles]
        mine = results[1]
        assert mine.profile is not None and mine.profile.batch_size == size
        assert mine.output == want.output and mine.result_hash == want.result_hash


def test_engine_on_fake_gpus_meters_energy_through_its_own_nvml_session(
        registry_path: Path) -> None:
    """With GPUs discovered and no session given, the engine opens NVML for energy and closes it."""
    from fakes import a100, fake_machine

    from engine.hardware import discover, set_nvml_module, set_torch_cuda_probe

    fake, torch_cuda = fake_machine([a100()])
    set_nvml_module(fake)
    set_torch_cuda_probe(torch_cuda)
    hardware = discover(cuda_visible_devices=None)
    assert hardware.gpus
    eng = Engine(registry_path, hardware=hardware, devices=["cpu"])
    assert eng.meter.nvml is not None and eng.meter.nvml.available()
    assert eng.run(_gen(max_tokens=2)).ok  # CPU job: no energy, no GPU time
    eng.close()
    assert not fake.initialized


def _wait_until(predicate: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        threading.Event().wait(0.001)


def test_queued_jobs_take_free_rows_of_a_running_batch(registry_path: Path) -> None:
    """Jobs queued while a batch decodes join it between steps, finish while it goes on,
    and give exactly what they give alone (greedy, stop strings, seeded sampling)."""
    long = _gen("a long story", max_tokens=240)
    joiners = [_gen("joiner one", max_tokens=5), _gen("joiner two", max_tokens=30, stop=["q"]),
               _gen("joiner three", temperature=1.1, seed=5, max_tokens=12)]
    with Engine(registry_path, devices=["cpu"]) as alone:
        want = [alone.run(j) for j in [long, *joiners]]
    assert isinstance(want[0].output, GenerationOutput) and len(want[0].output.token_ids) == 240
    with Engine(registry_path, devices=["cpu"], batch_size=4) as eng:
        eng.run(_gen(max_tokens=1))  # warm: the long job starts decoding at once
        first = eng.submit(long)
        _wait_until(first.running)
        later = [eng.submit(j) for j in joiners]
        got = [h.result(60) for h in later]
        assert not first.done(), "the joiners should end while the long job still runs"
        got.insert(0, first.result(60))
    for w, g in zip(want, got, strict=True):
        assert g.ok and g.output == w.output and g.result_hash == w.result_hash, g.error
        assert g.profile is not None and g.profile.batched and g.profile.batch_size >= 2
        assert g.metrics is not None and "+shared-by-token-work" in g.metrics.measurement
    assert got[1].metrics is not None and got[1].metrics.load_time_seconds == 0.0


def test_a_running_batch_does_not_overtake_a_job_for_another_model(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A job for another model queued first keeps its turn: later jobs for the running
    model do not slip into the batch ahead of it."""
    other_dir = make_tiny_gpt2(tmp_path / "other", seed=3)
    registry = write_registry(tmp_path / "models.yaml", {
        "tiny-gpt2": tiny_entry(tiny_model_dir), "tiny-other": tiny_entry(other_dir)})
    with Engine(registry, devices=["cpu"], batch_size=4) as eng:
        eng.run(_gen(max_tokens=1))
        eng.run({**_gen(max_tokens=1), "model": "tiny-other"})
        first = eng.submit(_gen("a long story", max_tokens=240))
        _wait_until(first.running)
        other = eng.submit({**_gen("other model", max_tokens=4), "model": "tiny-other"})
        late = eng.submit(_gen("late for the batch", max_tokens=4))
        results = [h.result(60) for h in (first, other, late)]
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.profile.batch_size for r in results if r.profile] == [1, 1, 1]
    assert results[2].metrics is not None and results[1].metrics is not None
    assert results[2].metrics.queue_seconds >= results[1].metrics.queue_seconds
