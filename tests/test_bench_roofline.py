"""engine.bench.roofline: the bound's properties, and real decode rates never exceed it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.bench.roofline import (
    Roofline,
    bound_tokens_per_second,
    decode_bytes_per_step,
    device_bandwidth,
    kv_bytes_per_token,
)
from engine.bench.scenarios import RecordingMeter, make_prompt_ids
from engine.executor import Engine
from engine.jobs import GenerationParams, Job

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
