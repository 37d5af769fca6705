"""engine.bench.roofline: the bound's properties, and real decode rates never exceed it;
engine.bench.bandwidth: the bandwidth figures the bound uses (spec sheet, CPU probe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeNvml, FakeTorchCuda, a100, fake_machine, v100
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bench import bandwidth as probe
from engine.bench.bandwidth import cpu_memory_bandwidth_gbps, memory_bandwidth_gbps
from engine.bench.roofline import (
    Roofline,
    bound_tokens_per_second,
    decode_bytes_per_step,
    device_bandwidth,
    kv_bytes_per_token,
)
from engine.bench.scenarios import RecordingMeter, make_prompt_ids
from engine.executor import Engine
from engine.hardware import Device, Nvml, cpu, discover
from engine.jobs import GenerationParams, Job

GiB = 2**30

positive = st.floats(min_value=1e3, max_value=1e12, allow_nan=False, allow_infinity=False)
bandwidth = st.floats(min_value=0.1, max_value=1e4, allow_nan=False)
context = st.integers(min_value=0, max_value=100_000)
batch = st.integers(min_value=1, max_value=512)


@given(bandwidth, positive, positive, batch)
def test_bound_falls_as_bytes_grow_and_rises_with_bandwidth(bw: float, a: float, b: float,
                                                           n: int) -> None:
    small, large = sorted((a, b))
    assert bound_tokens_per_second(bw, small, n) >= bound_tokens_per_second(bw, large, n)
    assert bound_tokens_per_second(2 * bw, small, n) == pytest.approx(
        2 * bound_tokens_per_second(bw, small, n))


@given(positive, st.integers(min_value=0, max_value=10**6), context, context, batch)
def test_bytes_per_step_grow_with_context_and_batch(weights: float, kv: int, c1: int, c2: int,
                                                    n: int) -> None:
    lo, hi = sorted((c1, c2))
    assert decode_bytes_per_step(weights, kv, lo, n) <= decode_bytes_per_step(weights, kv, hi, n)
    assert decode_bytes_per_step(weights, kv, lo, n) <= decode_bytes_per_step(weights, kv, lo,
                                                                              n + 1)
    assert decode_bytes_per_step(weights, kv, lo, n) >= weights


@given(bandwidth, positive, st.integers(min_value=0, max_value=10**6), context, batch)
def test_batching_helps_at_most_linearly(bw: float, weights: float, kv: int, ctx: int,
                                         n: int) -> None:
    r = Roofline(bandwidth_gbps=bw, bandwidth_source="test", weight_bytes=max(1, int(weights)),
                 kv_bytes_per_token=kv)
    single = r.bound(ctx, 1)
    assert single <= r.bound(ctx, n) <= n * single * (1 + 1e-9)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        bound_tokens_per_second(0.0, 100.0)
    with pytest.raises(ValueError):
        decode_bytes_per_step(0, 1, 1)
    with pytest.raises(ValueError):
        decode_bytes_per_step(1, 1, 1, batch_size=0)


def test_kv_bytes_of_known_architectures() -> None:
    from transformers import GPT2Config, LlamaConfig

    gpt2 = GPT2Config(n_layer=12, n_head=12, n_embd=768)
    assert kv_bytes_per_token(gpt2, "float32") == 2 * 12 * 12 * 64 * 4
    llama = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                        hidden_size=576, head_dim=64)
    assert kv_bytes_per_token(llama, "bfloat16") == 2 * 30 * 3 * 64 * 2


@pytest.fixture(scope="module")
def tiny_engine(registry_path: Path):  # type: ignore[no-untyped-def]
    meter = RecordingMeter()
    engine = Engine(registry_path, devices=["cpu"], meter=meter)
    engine.load("tiny-gpt2")
    yield engine
    engine.close()


@settings(max_examples=8, deadline=None)
@given(prompt=st.integers(min_value=1, max_value=64), new=st.integers(min_value=2, max_value=12),
       seed=st.integers(min_value=0, max_value=1000))
def test_measured_batch1_decode_rate_never_exceeds_the_bound(tiny_engine: Engine, prompt: int,
                                                            new: int, seed: int) -> None:
    loaded = tiny_engine.load("tiny-gpt2")
    bw = device_bandwidth(tiny_engine.devices[0], probe=False)
    assert bw is not None
    roof = Roofline(bandwidth_gbps=bw[0], bandwidth_source=bw[1],
                    weight_bytes=loaded.memory_bytes,
                    kv_bytes_per_token=kv_bytes_per_token(loaded.model.config, loaded.dtype_name))
    ids = make_prompt_ids(prompt, int(loaded.model.config.vocab_size), seed=seed,
                          avoid=loaded.eos_token_ids())
    result = tiny_engine.run(Job(model="tiny-gpt2", prompt_token_ids=ids,
                                 params=GenerationParams(max_tokens=new)))
    assert result.ok and result.metrics is not None
    if result.metrics.tpot_seconds is None:  # ended at EOS after one token
        return
    rate = 1.0 / result.metrics.tpot_seconds
    mean_context = prompt + result.metrics.completion_tokens / 2
    assert rate <= roof.bound(mean_context, 1)
    assert 0 < roof.efficiency(rate, mean_context) <= 1


# ------------------------------------------------------------------ bandwidth
# The probe and its cache live in engine.bench.bandwidth; tests patch the names there
# (and the CPU's name in engine.hardware.cpu, where the cache key reads it).


@pytest.mark.slow
def test_cpu_bandwidth_measured_once_and_cached(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    measured = cpu_memory_bandwidth_gbps(tmp_path)
    assert measured > 0
    cache = tmp_path / "cpu_bandwidth.json"
    entries = json.loads(cache.read_text())
    (entry,) = entries.values()
    assert entry["gbps"] == measured
    (key,) = entries
    assert f"|{cpu.cpu_cores()}|" in key

    def no_second_measurement() -> float:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", no_second_measurement)
    assert cpu_memory_bandwidth_gbps(tmp_path) == measured

    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 12.5)
    assert cpu_memory_bandwidth_gbps(tmp_path, refresh=True) == 12.5
    assert cpu_memory_bandwidth_gbps(tmp_path) == 12.5


def test_cpu_bandwidth_remeasures_a_corrupt_cache(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu_bandwidth.json").write_text("{not json")
    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 7.0)
    assert cpu_memory_bandwidth_gbps(tmp_path) == 7.0
    assert json.loads((tmp_path / "cpu_bandwidth.json").read_text())


def test_cpu_bandwidth_keyed_by_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 7.0)
    assert cpu_memory_bandwidth_gbps(tmp_path) == 7.0
    monkeypatch.setattr(cpu, "cpu_name", lambda: "Another CPU")
    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 9.0)
    assert cpu_memory_bandwidth_gbps(tmp_path) == 9.0
    assert len(json.loads((tmp_path / "cpu_bandwidth.json").read_text())) == 2


def test_cpu_bandwidth_cached_in_the_engine_cache_dir(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(target))
    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 3.0)
    assert cpu_memory_bandwidth_gbps() == 3.0
    assert (target / "cpu_bandwidth.json").is_file()


def test_memory_bandwidth_per_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml, torch_cuda = fake_machine([v100(), a100()])
    info = discover(Nvml(nvml), torch_cuda=torch_cuda)
    assert memory_bandwidth_gbps(info.device("cuda:0")) == 900.0
    assert memory_bandwidth_gbps(info.device("cuda:1")) == 2039.0
    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 21.0)
    assert memory_bandwidth_gbps(info.cpu, tmp_path) == 21.0
    unknown = Device("cuda:0", "cuda", 0, "NVIDIA GeForce GTX 1080 Ti", "gtx1080ti", 11 * GiB,
                     11 * GiB, (6, 1), False)
    assert memory_bandwidth_gbps(unknown) is None
    a100_40gb = a100(name="NVIDIA A100-SXM4-40GB", memory_total=40 * GiB, memory_free=39 * GiB)
    small_a100 = discover(Nvml(FakeNvml(gpus=[a100_40gb])),
                          torch_cuda=FakeTorchCuda.seeing([a100_40gb]))
    assert memory_bandwidth_gbps(small_a100.gpus[0]) == 1555.0
    monkeypatch.setattr(probe, "measure_cpu_memory_bandwidth_gbps", lambda: 5.0)
    assert device_bandwidth(info.device("cuda:1")) == (2039.0, "spec sheet (a100)")
