"""pytest-benchmark suites for the engine's hot library paths.

    pytest benchmarks/ --benchmark-only

Hashing a result, parsing each coordinator payload shape, opening and closing a
meter window (with per-token marks), and a warm pool lookup. These are not
part of the default test run (``tests/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from engine.hardware import discover
from engine.hashing import canonical_bytes, result_hash
from engine.jobs import EmbeddingOutput, GenerationOutput, Job
from engine.metering import Meter
from engine.payloads import parse_payload
from engine.pool import ModelPool
from engine.registry import Registry

PAYLOADS: dict[str, dict[str, Any]] = {
    "flat": {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 16,
             "temperature": 0.0},
    "service": {"service_type": "llm_inference", "service_request": {
        "model": "gpt2", "prompt": "Hello GPU " * 20, "max_tokens": 256, "temperature": 0.7,
        "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1, "stop_sequences": ["\n\n"],
        "stream": False}},
    "embedding": {"type": "embedding", "model": "all-minilm-l6-v2",
                  "input": ["a sentence to embed"] * 8},
    "engine": {"model": "gpt2", "task": "text-generation", "prompt": "Hello",
               "params": {"max_tokens": 32, "seed": 7}},
}


@pytest.mark.parametrize("shape", sorted(PAYLOADS))
def test_parse_payload(benchmark: Any, shape: str) -> None:
    payload = PAYLOADS[shape]
    job = benchmark(parse_payload, payload, job_id="job_abc123")
    assert job.job_id == "job_abc123"


def test_result_hash_generation(benchmark: Any) -> None:
    job = parse_payload(PAYLOADS["service"])
    output = GenerationOutput(text="x" * 1000, token_ids=list(range(256)), finish_reason="length")
    digest = benchmark(result_hash, job, output, "sha256:" + "0" * 64)
    assert digest.startswith("sha256:")


def test_result_hash_embedding(benchmark: Any) -> None:
    job = Job(model="all-minilm-l6-v2", task="embedding", input=["text"] * 8)
    output = EmbeddingOutput(embeddings=[[0.125] * 384] * 8, dimensions=384)
    data = benchmark(canonical_bytes, job, output, "sha256:" + "0" * 64)
    assert data == canonical_bytes(job, output, "sha256:" + "0" * 64) and data


@pytest.mark.parametrize("tokens", [0, 128])
def test_meter_window_overhead(benchmark: Any, tokens: int) -> None:
    meter = Meter()
    cpu = discover(refresh_free_memory=False).cpu

    def window() -> Any:
        w = meter.window([cpu]).start()
        for _ in range(tokens):
            w.token()
        return w.stop()

    measurement = benchmark(window)
    assert len(measurement.token_times) == tokens


@pytest.fixture(scope="module")
def warm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelPool, Any, Any]]:
    from conftest import TINY_NAME, make_tiny_gpt2, tiny_entry, write_registry

    base = tmp_path_factory.mktemp("hot")
    registry = Registry.load(write_registry(base / "models.yaml", {
        TINY_NAME: tiny_entry(make_tiny_gpt2(base / "tiny"))}))
    spec = registry.get(TINY_NAME)
    cpu = discover(refresh_free_memory=False).cpu
    pool = ModelPool()
    pool.get(spec, [cpu])
    yield pool, spec, cpu
    pool.evict()


def test_pool_lookup_warm(benchmark: Any, warm_pool: tuple[ModelPool, Any, Any]) -> None:
    pool, spec, cpu = warm_pool

    def lease() -> float:
        with pool.use(spec, [cpu]) as (_, load_seconds):
            return load_seconds

    assert benchmark(lease) == 0.0


def test_pool_key_and_peek(benchmark: Any, warm_pool: tuple[ModelPool, Any, Any]) -> None:
    pool, spec, cpu = warm_pool
    found = benchmark(lambda: pool.peek(pool.key_for(spec, [cpu])))
    assert found is not None


def test_registry_lookup(benchmark: Any) -> None:
    registry = Registry.load()
    spec = benchmark(registry.get, "gpt2")
    assert spec.name == "gpt2"
