"""Activation commitments: the encoding, that every generation result carries one inside its
hash and its metered time, and that ``tolerant`` verification accepts honest profiles and
rejects results of tampered models or with a tampered commitment (the tiny GPT-2)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.commitment import (
    Commitment,
    CommitmentFormatError,
    Thresholds,
    commit_rows,
    compare,
    compute_commitment,
)
from engine.executor import Engine
from engine.hashing import result_hash
from engine.jobs import GenerationOutput, GenerationParams, Job, JobResult
from engine.pool import ModelPool
from engine.tasks.generation import encode_prompt
from engine.verify import Verifier, teacher_forced_pass

TINY = "tiny-gpt2"
PROMPTS = ["Hello GPU", "The quick brown fox", "Paris is the capital of", "A miner runs"]


@pytest.fixture(scope="module")
def verifier(registry_path: Path) -> Iterator[Verifier]:
    with Verifier(registry_path, pool=ModelPool(show_progress=False)) as v:
        yield v


def _job(prompt: str = "Hello GPU", **params: Any) -> Job:
    return Job(model=TINY, prompt=prompt, params=GenerationParams(**{"max_tokens": 24, **params}))


def _run(engine: Engine, job: Job) -> JobResult:
    res = engine.run(job)
    assert res.ok, res.error
    return res


def _relabel(job: Job, res: JobResult, commitment: str | None) -> JobResult:
    """``res`` claiming another commitment, its hash made consistent again."""
    assert isinstance(res.output, GenerationOutput) and res.profile is not None
    out = res.output.model_copy(update={"commitment": commitment})
    return res.model_copy(update={"output": out,
                                  "result_hash": result_hash(job, out, res.profile.weights_digest)})


# ------------------------------------------------------------------ the encoding

def test_round_trip_and_size() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(32, 64)
    made = commit_rows(hidden)
    assert made.positions == 4 and made.stride == 8 and made.top_k == 8
    text = made.encode()
    assert text.startswith("c1.8.8.") and text.isascii()
    assert len(base64.b64decode(text.split(".")[3])) == 128  # 4 positions x 8 x 4 bytes
    back = Commitment.decode(text)
    assert back.encode() == text
    np.testing.assert_array_equal(back.indices, made.indices)
    np.testing.assert_array_equal(back.values, made.values)
    # The indices are each row's 8 largest magnitudes, the values those entries in bfloat16.
    for j, row in enumerate(hidden[::8]):
        assert set(back.indices[j]) == set(row.abs().topk(8).indices.tolist())
        exact = row[torch.from_numpy(back.indices[j])].to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(back.values[j], exact)
    assert compare(text, hidden).passed
    assert Commitment.decode(commit_rows(hidden[:0]).encode()).positions == 0


@pytest.mark.parametrize("text", ["c2.8.8.AAAA", "c1.8.8", "c1.0.8.", "c1.8.8.!!!!",
                                  "c1.8.8." + base64.b64encode(b"\0" * 20).decode(), ""])
def test_malformed_commitments_are_refused(text: str) -> None:
    with pytest.raises(CommitmentFormatError):
        Commitment.decode(text)
    found = compare(text, torch.zeros(8, 64))
    assert not found.passed and "malformed" in (found.reason or "")


# ------------------------------------------------------------------ the engine's results

@pytest.mark.slow
def test_every_result_carries_a_commitment_covered_by_its_hash(engine: Engine) -> None:
    job = _job()
    res = _run(engine, job)
    assert isinstance(res.output, GenerationOutput) and res.profile is not None
    assert res.profile.hash_version == "aitbc-result/2"
    commitment = res.output.commitment
    assert commitment is not None
    assert Commitment.decode(commitment).positions == 3  # 24 tokens at stride 8
    loaded = engine.load(TINY)
    again = compute_commitment(loaded, encode_prompt(loaded, job), res.output.token_ids)
    assert again == commitment
    digest = res.profile.weights_digest
    assert result_hash(job, res.output, digest) == res.result_hash
    changed = commitment[:-4] + ("AAA=" if not commitment.endswith("AAA=") else "AAE=")
    for other in (None, changed):
        out = res.output.model_copy(update={"commitment": other})
        assert result_hash(job, out, digest) != res.result_hash


@pytest.mark.slow
def test_batched_and_alone_give_identical_commitments(registry_path: Path,
                                                      engine: Engine) -> None:
    jobs = [_job(p, **({"temperature": 0.9, "seed": 5} if i % 2 else {}))
            for i, p in enumerate(PROMPTS)]
    with Engine(registry_path, devices=["cpu"], batch_size=4, batch_window_seconds=0.5,
                pool=engine.pool) as batched:
        together = [h.result(60) for h in [batched.submit(j) for j in jobs]]
    assert any(r.profile and r.profile.batched for r in together)
    for job, res in zip(jobs, together, strict=True):
        alone = _run(engine, job)
        assert isinstance(res.output, GenerationOutput)
        assert isinstance(alone.output, GenerationOutput)
        assert res.output.token_ids == alone.output.token_ids
        assert res.output.commitment == alone.output.commitment is not None


def test_the_commitment_pass_is_metered_as_part_of_the_job(engine: Engine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.tasks.generation as generation

    real = generation.compute_commitment

    def slow(*args: Any, **kwargs: Any) -> str:
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "compute_commitment", slow)
    res = _run(engine, _job(max_tokens=4))
    assert res.metrics is not None and res.metrics.execution_time_seconds >= 0.3


def test_a_failing_commitment_pass_fails_the_job(engine: Engine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.tasks.generation as generation

    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("no memory for the commitment")

    monkeypatch.setattr(generation, "compute_commitment", broken)
    res = engine.run(_job(max_tokens=4))
    assert not res.ok and res.error is not None
    assert "no memory for the commitment" in res.error.message
    monkeypatch.undo()
    assert _run(engine, _job(max_tokens=4)).ok  # the engine goes on


# ------------------------------------------------------------------ tolerant verification

@pytest.mark.slow
def test_honest_fp32_and_bf16_results_pass(registry_path: Path, engine: Engine,
                                           verifier: Verifier) -> None:
    jobs = [_job(p) for p in PROMPTS[:2]] + [_job(PROMPTS[2], temperature=0.8, seed=1)]
    with Engine(registry_path, devices=["cpu"], dtype="bfloat16",
                pool=ModelPool(show_progress=False)) as bf16:
        for job in jobs:
            for eng in (engine, bf16):
                res = _run(eng, job)
                verdict = verifier.verify(job, res)
                assert verdict.accepted, (res.profile and res.profile.dtype, verdict.reasons)
                details = verdict.details
                assert details["reference_dtype"] == "float32"
                assert details["commitment_passed"] is True
                assert details["commitment_positions"] == 3
                assert details["commitment_min_overlap"] >= Thresholds().min_overlap
                assert details["commitment_max_error"] <= Thresholds().max_error


@pytest.mark.slow
def test_removed_or_altered_commitments_are_rejected(engine: Engine,
                                                     verifier: Verifier) -> None:
    job = _job("The quick brown fox")
    res = _run(engine, job)
    assert isinstance(res.output, GenerationOutput) and res.output.commitment is not None
    claim = Commitment.decode(res.output.commitment)

    def verdict_for(commitment: str | None) -> tuple[bool, str, int | None]:
        v = verifier.verify(job, _relabel(job, res, commitment))
        return v.accepted, " ".join(v.reasons), v.first_suspicious_token

    accepted, why, _ = verdict_for(None)
    assert not accepted and "carries no activation commitment" in why
    scaled = Commitment(claim.stride, claim.top_k, claim.indices, claim.values.copy())
    scaled.values[1] *= 1.1  # 10 % off at the second position (token 8)
    accepted, why, first = verdict_for(scaled.encode())
    assert not accepted and "at token 8" in why and "relative error" in why and first == 8
    swapped = Commitment(claim.stride, claim.top_k, claim.indices.copy(), claim.values)
    swapped.indices[0] = (swapped.indices[0] + 7) % 64
    accepted, why, first = verdict_for(swapped.encode())
    assert not accepted and "at token 0" in why and first == 0
    short = Commitment(claim.stride, claim.top_k, claim.indices[:2], claim.values[:2])
    accepted, why, _ = verdict_for(short.encode())
    assert not accepted and "covers 2 positions" in why
    coarse = Commitment(16, claim.top_k, claim.indices[::2], claim.values[::2])
    accepted, why, _ = verdict_for(coarse.encode())
    assert not accepted and "stride 16" in why
    accepted, why, _ = verdict_for("c1.8.8.####")
    assert not accepted and "malformed" in why


def test_a_version_1_result_fails_on_its_hash_version(engine: Engine,
                                                      verifier: Verifier) -> None:
    job = _job()
    res = _run(engine, job)
    assert res.profile is not None
    old = res.model_copy(update={"profile": res.profile.model_copy(
        update={"hash_version": "aitbc-result/1"})})
    verdict = verifier.verify(job, old, mode="integrity")
    assert not verdict.accepted and "hash version" in verdict.reasons[0]


# ------------------------------------------------------------------ forged results

def _fp8(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
                w = module.weight
                scale = w.abs().max() / 448.0
                w.copy_((w / scale).to(torch.float8_e4m3fn).float() * scale)


def _early_exit(model: Any) -> None:
    model.transformer.h = torch.nn.ModuleList(list(model.transformer.h)[:1])
    model.config.n_layer = model.config.num_hidden_layers = 1


@pytest.mark.slow
@pytest.mark.parametrize("tamper", [_fp8, _early_exit], ids=["fp8-weights", "early-exit"])
def test_results_of_a_tampered_model_are_rejected(registry_path: Path, verifier: Verifier,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  tamper: Any) -> None:
    """A forger runs the engine on a cheaper model: its results claim the real weight digest
    (the engine digests the files it loaded) and hash consistently, so only the model run
    can tell; the commitment does, for every prompt. The early exit's results are rejected
    even when relabelled bfloat16, the loosest thresholds."""
    monkeypatch.setenv("AITBC_ENGINE_LINEAR", "blas")  # plain Linear/Conv1D weights to tamper
    with Engine(registry_path, devices=["cpu"], pool=ModelPool(show_progress=False)) as forger:
        tamper(forger.load(TINY).model)
        for prompt in PROMPTS:
            job = _job(prompt)
            res = _run(forger, job)
            assert verifier.verify(job, res, mode="integrity").accepted
            verdict = verifier.verify(job, res)
            assert not verdict.accepted
            assert any("activation commitment does not match" in r for r in verdict.reasons), \
                verdict.reasons
            if tamper is _early_exit:
                assert res.profile is not None
                as_bf16 = res.model_copy(update={"profile": res.profile.model_copy(
                    update={"dtype": "bfloat16"})})
                relabelled = verifier.verify(job, as_bf16)
                assert not relabelled.accepted
                assert relabelled.details["commitment_thresholds"]["max_error"] == 0.2


def test_teacher_forced_pass_gives_logits_and_the_committed_hidden_states(
        engine: Engine) -> None:
    loaded = engine.load(TINY)
    ids = encode_prompt(loaded, _job())
    tokens = [5, 6, 7, 8, 9]
    logits, hidden = teacher_forced_pass(loaded, ids, tokens)
    assert logits.shape == (5, loaded.model.config.vocab_size) and hidden.shape == (5, 64)
    head = loaded.model.get_input_embeddings().weight.detach().float()  # tied to the LM head
    torch.testing.assert_close(hidden @ head.T, logits, rtol=1e-4, atol=1e-4)
