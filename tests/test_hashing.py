"""Result hash: the README's test vector, purity, and what changes the hash."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.hashing import canonical_bytes, effective_seed, result_hash
from engine.jobs import EmbeddingOutput, GenerationOutput, Job
from engine.payloads import parse_payload

DIGEST = "sha256:b9cb325a32144cc4ab662c5fe959ae7e6ea1fdfb53fa6dee938f1ac2df790af8"
VECTOR_HASH = "sha256:ae9d88147caee4648b90da88c207691cd62828371046ad77586e42019bf45429"
COMMITMENT = "c1.8.8.EQAZAMcArQCDAUIBZABzAZjBYkFTQTpBwEC1QJnAmEA="
PARIS = GenerationOutput(text=" Paris.\n\nThe answer is:",
                         token_ids=[7042, 30, 198, 198, 504, 2988, 314, 42],
                         finish_reason="length", commitment=COMMITMENT)


def _canon(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def test_readme_vector_recomputes_with_hashlib_and_json_alone() -> None:
    """The README's recipe, written out without the engine."""
    doc = {
        "encoding": "aitbc-result/2",
        "model": "smollm2-135m",
        "weights_digest": DIGEST,
        "task": "text-generation",
        "input_sha256": hashlib.sha256(_canon({"prompt": "The capital of France is"})).hexdigest(),
        "params": {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                   "repetition_penalty": 1.0, "seed": None, "stop": []},
        "output": {"commitment": COMMITMENT, "finish_reason": PARIS.finish_reason,
                   "text": PARIS.text, "token_ids": PARIS.token_ids},
    }
    by_hand = "sha256:" + hashlib.sha256(_canon(doc)).hexdigest()
    assert by_hand == VECTOR_HASH
    job = parse_payload({"type": "inference", "model": "smollm2-135m",
                         "prompt": "The capital of France is", "max_tokens": 8})
    assert result_hash(job, PARIS, DIGEST) == VECTOR_HASH
    assert canonical_bytes(job, PARIS, DIGEST) == _canon(doc)


def test_embedding_hash_covers_float32_little_endian_bytes() -> None:
    import struct

    job = parse_payload({"type": "embedding", "model": "m", "input": ["a"]})
    vec = [[0.5, -0.25, 1.0 / 3.0]]
    out = EmbeddingOutput(embeddings=vec, dimensions=3)
    raw = struct.pack("<3f", *vec[0])
    doc = {"encoding": "aitbc-result/2", "model": "m", "weights_digest": DIGEST,
           "task": "embedding",
           "input_sha256": hashlib.sha256(_canon({"input": ["a"]})).hexdigest(),
           "params": {}, "output": {"count": 1, "dimensions": 3,
                                    "vectors_sha256": hashlib.sha256(raw).hexdigest()}}
    assert result_hash(job, out, DIGEST) == "sha256:" + hashlib.sha256(_canon(doc)).hexdigest()


def _job(prompt: str, seed: int | None = None, temperature: float = 0.0,
         max_tokens: int = 8, model: str = "m") -> Job:
    params: dict[str, object] = {"max_tokens": max_tokens, "temperature": temperature}
    if seed is not None:
        params["seed"] = seed
    return parse_payload({"task": "text-generation", "model": model, "prompt": prompt,
                          "params": params})


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(str.strip), st.lists(st.integers(0, 60000), max_size=20))
def test_hash_is_deterministic(prompt: str, tokens: list[int]) -> None:
    out = GenerationOutput(text="t", token_ids=tokens, finish_reason="length")
    assert result_hash(_job(prompt), out, DIGEST) == result_hash(_job(prompt), out, DIGEST)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(str.strip), st.text(min_size=1).filter(str.strip))
def test_a_different_prompt_changes_the_hash(a: str, b: str) -> None:
    out = PARIS
    assert (result_hash(_job(a), out, DIGEST) == result_hash(_job(b), out, DIGEST)) == (a == b)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))
def test_a_different_seed_changes_a_sampled_jobs_hash(s1: int, s2: int) -> None:
    h1 = result_hash(_job("p", s1, 0.8), PARIS, DIGEST)
    h2 = result_hash(_job("p", s2, 0.8), PARIS, DIGEST)
    assert (h1 == h2) == (s1 == s2)


def test_seed_does_not_matter_for_greedy_jobs_but_other_things_do() -> None:
    base = result_hash(_job("p"), PARIS, DIGEST)
    assert result_hash(_job("p", seed=5), PARIS, DIGEST) == base
    assert result_hash(_job("p", max_tokens=9), PARIS, DIGEST) != base
    assert result_hash(_job("p", model="other"), PARIS, DIGEST) != base
    assert result_hash(_job("p"), PARIS, "sha256:" + "1" * 64) != base


def test_sampled_jobs_without_seed_get_a_derived_one() -> None:
    a, b = _job("p", temperature=0.9), _job("p", temperature=0.9)
    assert effective_seed(a) == effective_seed(b) is not None
    assert effective_seed(_job("q", temperature=0.9)) != effective_seed(a)
    assert effective_seed(_job("p")) is None


def test_the_commitment_is_covered_by_the_hash() -> None:
    """Changing, dropping or adding an activation commitment changes the result hash."""
    job = _job("p")
    base = result_hash(job, PARIS, DIGEST)
    altered = COMMITMENT.replace("EQAZ", "EQAa")
    assert result_hash(job, PARIS.model_copy(update={"commitment": altered}), DIGEST) != base
    assert result_hash(job, PARIS.model_copy(update={"commitment": None}), DIGEST) != base
    bare = GenerationOutput(text="t", token_ids=[1], finish_reason="length")
    assert result_hash(job, bare, DIGEST) != result_hash(
        job, bare.model_copy(update={"commitment": "c1.8.8."}), DIGEST)
