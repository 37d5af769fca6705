"""Verification: integrity, exact and tolerant modes on the tiny GPT-2 (plus one smollm2 and one
embedding end-to-end check), the stop rule, the sampler replay and the spot-check helper."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.executor import Engine
from engine.hashing import result_hash
from engine.jobs import GenerationOutput, GenerationParams, Job, JobResult
from engine.loading import LoadedModel
from engine.verify import (
    Findings,
    Tolerances,
    VerificationInputError,
    Verifier,
    apply_repetition_penalty,
    check_stop_rule,
    sampling_sets,
    spot_check,
    spot_check_rank,
    verify,
)

TINY = "tiny-gpt2"


def run(engine: Engine, prompt: str = "Hello GPU", **params: Any) -> tuple[Job, JobResult]:
    job = Job(model=TINY, prompt=prompt, params=GenerationParams(**params))
    res = engine.run(job)
    assert res.ok, res.error
    return job, res


def claim(job: Job, res: JobResult, tokens: list[int], tiny: LoadedModel, *,
          finish: str | None = None, text: str | None = None) -> JobResult:
    """``res`` with other tokens, text decoded from them, and a hash that recomputes."""
    assert isinstance(res.output, GenerationOutput) and res.profile and res.metrics
    out = GenerationOutput(
        text=text if text is not None else tiny.tokenizer.decode(tokens, skip_special_tokens=True),
        token_ids=tokens, finish_reason=finish or res.output.finish_reason)  # type: ignore[arg-type]
    return res.model_copy(update={
        "output": out, "result_hash": result_hash(job, out, res.profile.weights_digest),
        "metrics": res.metrics.model_copy(update={"completion_tokens": len(tokens)})})


def other_token(tok: int, vocab: int) -> int:
    return (tok + 17) % vocab


# ------------------------------------------------------------------ honest results

def test_honest_greedy_result_is_accepted_by_every_mode(engine: Engine, verifier: Verifier) -> None:
    job, res = run(engine, max_tokens=10)
    for mode in ("integrity", "exact", "tolerant"):
        verdict = verifier.verify(job, res, mode=mode)  # type: ignore[arg-type]
        assert verdict.accepted, (mode, verdict.reasons)
        assert verdict.mode == mode and verdict.reasons == []
        assert verdict.first_suspicious_token is None and verdict.cost_seconds > 0
    tolerant = verifier.verify(job, res)
    assert tolerant.details["tokens_checked"] == 10
    assert tolerant.details["max_normalized_gap"] == 0.0
    # The one-shot function and JSON text inputs give the same verdict.
    again = verify(job.to_json(), res.to_json(), registry=verifier.registry, engine=engine)
    assert again.accepted and again.mode == "tolerant"


def test_bf16_result_is_accepted_by_tolerant_and_exact(registry_path: Path,
                                                       verifier: Verifier) -> None:
    with Engine(registry_path, devices=["cpu"], dtype="bfloat16", pool=verifier.pool) as eng:
        job, res = run(eng, "The quick brown fox", max_tokens=12, repetition_penalty=1.2)
    assert res.profile is not None and res.profile.dtype == "bfloat16"
    assert verifier.verify(job, res, mode="tolerant").accepted
    assert verifier.verify(job, res, mode="exact").accepted


def test_batched_results_are_accepted_by_tolerant(registry_path: Path,
                                                  verifier: Verifier) -> None:
    jobs = [Job(model=TINY, prompt=p, params=GenerationParams(max_tokens=8, **extra))
            for p, extra in [("Hello GPU", {}), ("Paris is the capital of", {"temperature": 0.9}),
                             ("A miner", {"temperature": 1.0, "top_k": 30, "seed": 3})]]
    with Engine(registry_path, devices=["cpu"], batch_size=3, batch_window_seconds=0.5,
                pool=verifier.pool) as eng:
        results = [h.result(60) for h in [eng.submit(j) for j in jobs]]
    assert any(r.profile and r.profile.batched for r in results)
    for job, res in zip(jobs, results, strict=True):
        verdict = verifier.verify(job, res)
        assert verdict.accepted, verdict.reasons


# ------------------------------------------------------------------ integrity

def test_forged_hash_is_caught_by_integrity(engine: Engine, verifier: Verifier,
                                            tiny: LoadedModel) -> None:
    job, res = run(engine, max_tokens=6)
    assert isinstance(res.output, GenerationOutput)
    made_up = res.model_copy(update={"result_hash": "sha256:" + "ab" * 32})
    verdict = verifier.verify(job, made_up, mode="integrity")
    assert not verdict.accepted and "does not recompute" in verdict.reasons[0]
    # Output changed, hash kept: integrity catches it without a model run.
    toks = list(res.output.token_ids)
    toks[2] = other_token(toks[2], len(tiny.tokenizer))
    changed = claim(job, res, toks, tiny).model_copy(update={"result_hash": res.result_hash})
    assert not verifier.verify(job, changed, mode="integrity").accepted
    assert "load_seconds" not in verifier.verify(job, changed, mode="tolerant").details


def test_wrong_weight_digest_is_rejected(engine: Engine, verifier: Verifier) -> None:
    job, res = run(engine, max_tokens=4)
    assert res.profile is not None and res.output is not None
    fake = "sha256:" + "0" * 64
    forged = res.model_copy(update={"profile": res.profile.model_copy(
        update={"weights_digest": fake}), "result_hash": result_hash(job, res.output, fake)})
    verdict = verifier.verify(job, forged, mode="integrity")
    assert not verdict.accepted
    assert any("weights digest" in r and "does not name" in r for r in verdict.reasons)


def test_structure_checks(engine: Engine, verifier: Verifier, tiny: LoadedModel) -> None:
    job, res = run(engine, max_tokens=6)
    other_job = job.model_copy(update={"job_id": "someone-else"})
    assert any("job_id" in r for r in verifier.verify(other_job, res, mode="integrity").reasons)
    assert isinstance(res.output, GenerationOutput)
    short = claim(job, res, res.output.token_ids[:3], tiny)  # finish 'length' with 3 of 6
    verdict = verifier.verify(job, short, mode="integrity")
    assert not verdict.accepted and "exactly max_tokens" in verdict.reasons[0]
    failed = JobResult(job_id=job.job_id, model=TINY, task="text-generation", status="failed")
    assert "failed job" in verifier.verify(job, failed).reasons[0]
    malformed = {"job_id": job.job_id, "model": TINY, "status": "done"}
    verdict = verifier.verify(job, malformed)
    assert not verdict.accepted and verdict.reasons[0].startswith("the result is malformed")


def test_unusable_inputs_raise(verifier: Verifier, engine: Engine) -> None:
    job, res = run(engine, max_tokens=3)
    with pytest.raises(VerificationInputError):
        verifier.verify("{not json", res)
    with pytest.raises(VerificationInputError):
        verifier.verify(job, b"[1, 2]")
    with pytest.raises(VerificationInputError, match="not in the verifier's registry"):
        unknown = job.model_copy(update={"model": "no-such-model"})
        verifier.verify(unknown, res.model_copy(update={"model": "no-such-model"}),
                        mode="integrity")
    with pytest.raises(VerificationInputError, match="unknown mode"):
        verifier.verify(job, res, mode="bitwise")  # type: ignore[arg-type]


# ------------------------------------------------------------------ tolerant: tokens

def test_replaced_token_is_found_by_tolerant_and_exact(engine: Engine, verifier: Verifier,
                                                       tiny: LoadedModel) -> None:
    job, res = run(engine, "The quick brown fox", max_tokens=10)
    assert isinstance(res.output, GenerationOutput)
    toks = list(res.output.token_ids)
    toks[4] = other_token(toks[4], len(tiny.tokenizer))
    forged = claim(job, res, toks, tiny)
    assert verifier.verify(job, forged, mode="integrity").accepted  # the hash is consistent
    verdict = verifier.verify(job, forged, mode="tolerant")
    assert not verdict.accepted and verdict.first_suspicious_token == 4
    assert "not the argmax" in verdict.reasons[0]
    exact = verifier.verify(job, forged, mode="exact")
    assert not exact.accepted and exact.first_suspicious_token == 4


def test_margin_accepts_near_ties_only(engine: Engine, verifier: Verifier, tiny: LoadedModel,
                                       registry_path: Path) -> None:
    job, res = run(engine, "Berlin is", max_tokens=5)
    assert isinstance(res.output, GenerationOutput)
    from engine.tasks.generation import encode_prompt
    from engine.verify import teacher_forced_logits

    ids = encode_prompt(tiny, job)
    logits = teacher_forced_logits(tiny, ids, res.output.token_ids)
    assert [int(i) for i in logits.argmax(-1)] == res.output.token_ids
    # The runner-up at position 0, in row standard deviations below the best.
    row = logits[0]
    runner = int(torch.topk(row, 2).indices[1])
    gap_sigma = float((row.max() - row[runner]) / row.std())
    toks = [runner, *res.output.token_ids[1:]]
    forged = claim(job, res, toks, tiny)
    wide = Verifier(registry_path, pool=verifier.pool,
                    tolerances=Tolerances(margin_sigma=gap_sigma * 1.01,
                                          flip_rate={"float32": 1.0}))
    narrow = Verifier(registry_path, pool=verifier.pool,
                      tolerances=Tolerances(margin_sigma=gap_sigma * 0.99,
                                            flip_rate={"float32": 1.0}))
    # Position 0 passes under a margin just above its gap and fails just below it (the later
    # tokens followed the true first token, so they may fail either way).
    assert narrow.verify(job, forged).first_suspicious_token == 0
    assert wide.verify(job, forged).first_suspicious_token != 0
    # A float32 claim may not depart from the argmax at all (no float32 profile does), even
    # within the margin: the departure cap refuses it.
    strict = Verifier(registry_path, pool=verifier.pool,
                      tolerances=Tolerances(margin_sigma=gap_sigma * 1.01))
    verdict = strict.verify(job, forged)
    assert not verdict.accepted and verdict.first_suspicious_token == 0
    assert any("not the argmax" in r and "sampled or steered" in r for r in verdict.reasons)


def test_sampled_result_replay_and_sets(engine: Engine, verifier: Verifier, tiny: LoadedModel,
                                        registry_path: Path) -> None:
    job, res = run(engine, "hello network", max_tokens=10, temperature=1.0)
    honest = verifier.verify(job, res)
    assert honest.accepted, honest.reasons
    assert honest.details["seeded_replay"] is True
    assert isinstance(res.output, GenerationOutput)
    toks = list(res.output.token_ids)
    toks[3] = other_token(toks[3], len(tiny.tokenizer))
    forged = claim(job, res, toks, tiny)
    verdict = verifier.verify(job, forged)
    assert not verdict.accepted and verdict.first_suspicious_token == 3
    assert "seeded draw" in verdict.reasons[0]
    # A top-k of 1 leaves only the argmax in the set: rejected before the replay.
    job1, res1 = run(engine, "hello network", max_tokens=6, temperature=0.8, top_k=1)
    assert verifier.verify(job1, res1).accepted
    assert isinstance(res1.output, GenerationOutput)
    toks = list(res1.output.token_ids)
    toks[1] = other_token(toks[1], len(tiny.tokenizer))
    verdict = verifier.verify(job1, claim(job1, res1, toks, tiny))
    assert not verdict.accepted and "outside the job's top-k/top-p set" in verdict.reasons[0]
    assert verdict.first_suspicious_token == 1


def test_sampling_sets_widen_and_narrow_by_the_margin() -> None:
    z = torch.tensor([5.0, 4.0, 3.9, 3.0, 1.0, 0.0])
    sure, possible = sampling_sets(z, GenerationParams(temperature=1.0, top_k=2), 0.2)
    assert possible.tolist() == [True, True, True, False, False, False]   # 3.9 is within 0.2
    assert sure.tolist() == [True, False, False, False, False, False]
    sure, possible = sampling_sets(z, GenerationParams(temperature=1.0, top_p=0.5), 0.0)
    probs = z.softmax(-1)
    assert float(probs[0]) > 0.5 and possible.tolist()[:2] == [True, False]
    wide = sampling_sets(z, GenerationParams(temperature=1.0, top_p=0.5), 1.0)[1]
    assert int(wide.sum()) > 1


def test_repetition_penalty_matches_the_engine() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, prompt_ids=[0], tokens=[1, 3], penalty=2.0)
    # Row 0 has seen the prompt only; row 1 also the first claimed token (id 1).
    assert out[0].tolist() == [1.0, -1.0, 0.5, 3.0]
    assert out[1].tolist() == [1.0, -2.0, 0.5, 3.0]
    assert apply_repetition_penalty(logits, [0], [1], 1.0) is logits


# ------------------------------------------------------------------ tolerant: stop rule, text

def test_stop_rule_and_text(engine: Engine, verifier: Verifier, tiny: LoadedModel) -> None:
    job, res = run(engine, max_tokens=12)
    assert isinstance(res.output, GenerationOutput)
    toks = list(res.output.token_ids)
    text = tiny.tokenizer.decode(toks[:2], skip_special_tokens=True)
    stop_job = Job(model=TINY, prompt=job.prompt, params=GenerationParams(
        max_tokens=12, stop=[text.strip()]))
    stop_res = engine.run(stop_job)
    assert stop_res.ok and isinstance(stop_res.output, GenerationOutput)
    assert stop_res.output.finish_reason == "stop"
    assert verifier.verify(stop_job, stop_res).accepted
    n = len(stop_res.output.token_ids)
    longer = claim(stop_job, stop_res, toks[:n + 1], tiny, text=stop_res.output.text)
    verdict = verifier.verify(stop_job, longer)
    assert not verdict.accepted and verdict.first_suspicious_token == n
    assert "goes on" in verdict.reasons[0]
    retexted = claim(job, res, toks, tiny, text=res.output.text + "!")
    verdict = verifier.verify(job, retexted)
    assert not verdict.accepted and "not the decoding" in verdict.reasons[0]
    # A truncated output that claims to end on EOS without one.
    eos = min(tiny.eos_token_ids())
    fake_eos = claim(job, res, toks[:5], tiny, finish="eos")
    verdict = verifier.verify(job, fake_eos)
    assert not verdict.accepted and "truncated" in verdict.reasons[0]
    early = claim(job, res, [*toks[:3], eos, *toks[3:11]], tiny)
    verdict = verifier.verify(job, early)
    assert not verdict.accepted and verdict.first_suspicious_token == 3


def test_check_stop_rule_directly(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer("Hello GPU hello network", add_special_tokens=False)["input_ids"]
    eos = tiny.eos_token_ids()
    params = GenerationParams(max_tokens=len(ids))
    text = tiny.tokenizer.decode(ids, skip_special_tokens=True)
    found = Findings([])
    check_stop_rule(ids, "length", text, params, tiny.tokenizer, eos, found)
    assert found.ok
    found = Findings([])
    check_stop_rule(ids, "eos", text, params, tiny.tokenizer, eos, found)
    assert not found.ok and "'length'" in found.reasons[0]
    found = Findings([])
    stop = GenerationParams(max_tokens=len(ids), stop=["hello"])
    cut = text[:text.find("hello")]
    check_stop_rule(ids, "length", text, stop, tiny.tokenizer, eos, found)
    assert not found.ok
    ends = next(t for t in range(1, len(ids) + 1)
                if "hello" in tiny.tokenizer.decode(ids[:t], skip_special_tokens=True))
    found = Findings([])
    check_stop_rule(ids[:ends], "stop", cut, stop, tiny.tokenizer, eos, found)
    assert found.ok, found.reasons


# ------------------------------------------------------------------ random weights

def test_random_weight_profiles(registry_path: Path, verifier: Verifier, tiny: LoadedModel
                                ) -> None:
    with Engine(registry_path, devices=["cpu"], weights="random", pool=verifier.pool) as eng:
        job = Job(model=TINY, prompt="Hello GPU", params=GenerationParams(max_tokens=6),
                  weights="random")
        res = eng.run(job)
    assert res.profile is not None and res.profile.weights == "random"
    assert verifier.verify(job, res, mode="integrity").accepted
    assert verifier.verify(job, res).accepted
    strict = Verifier(registry_path, pool=verifier.pool, require_weights="pretrained")
    verdict = strict.verify(job, res, mode="integrity")
    assert not verdict.accepted and "pretrained weights only" in verdict.reasons[0]
    # The random model's tokens passed off as the pretrained model's.
    pretrained = verifier.expected_digest(verifier.registry.get(TINY), "pretrained", "float32")
    assert isinstance(res.output, GenerationOutput) and res.output.finish_reason == "length"
    toks = [t % len(tiny.tokenizer) for t in res.output.token_ids]
    out = GenerationOutput(text=tiny.tokenizer.decode(toks, skip_special_tokens=True),
                           token_ids=toks, finish_reason="length")
    job = job.model_copy(update={"weights": "pretrained"})
    forged = res.model_copy(update={
        "output": out, "result_hash": result_hash(job, out, pretrained),
        "profile": res.profile.model_copy(update={"weights": "pretrained",
                                                   "weights_digest": pretrained})})
    assert verifier.verify(job, forged, mode="integrity").accepted
    assert not verifier.verify(job, forged).accepted


# ------------------------------------------------------------------ spot checks

def test_spot_check_is_deterministic_and_order_free(engine: Engine, verifier: Verifier) -> None:
    items = [{"job_id": f"job-{i}"} for i in range(100)]
    chosen = spot_check(items, 0.1, seed=42)
    assert len(chosen) == 10
    assert chosen == spot_check(items, 0.1, seed=42)
    assert sorted(chosen, key=lambda d: d["job_id"]) == sorted(
        spot_check(list(reversed(items)), 0.1, seed=42), key=lambda d: d["job_id"])
    assert chosen != spot_check(items, 0.1, seed=43)
    ranks = sorted(spot_check_rank(d["job_id"], 42) for d in items)
    assert {spot_check_rank(d["job_id"], 42) for d in chosen} == set(ranks[:10])
    assert spot_check(items, 0.0, 1) == [] and spot_check(items, 1.0, 1) == items
    assert len(spot_check(items, 0.001, 1)) == 1   # any positive fraction checks one
    with pytest.raises(ValueError):
        spot_check(items, 1.5, 1)
    pairs = [run(engine, p, max_tokens=3) for p in ("Hello GPU", "Berlin is", "A miner")]
    report = verifier.spot_check(pairs, 0.5, seed="round-7", mode="integrity")
    assert report.total == 3 and len(report.selected) == 2 and report.rejected == []
    assert set(report.verdicts) == set(report.selected)
    assert report.selected == [j.job_id for j, _ in spot_check(pairs, 0.5, "round-7")]


# ------------------------------------------------------------------ real models

def test_embedding_results(tmp_path: Path) -> None:
    with Engine(devices=["cpu"]) as eng:
        job = Job(model="all-minilm-l6-v2", task="embedding",
                  input=["a miner runs jobs", "the capital of France"])
        res = eng.run(job)
        assert res.ok, res.error
        with Verifier(engine=eng) as v:
            verdict = v.verify(job, res)
            assert verdict.accepted and verdict.details["cosine_min"] > 0.999
            assert res.output is not None and res.profile is not None
            swapped = res.output.model_copy(update={
                "embeddings": list(reversed(res.output.embeddings))})  # type: ignore[union-attr]
            forged = res.model_copy(update={"output": swapped, "result_hash": result_hash(
                job, swapped, res.profile.weights_digest)})
            assert v.verify(job, forged, mode="integrity").accepted
            verdict = v.verify(job, forged)
            assert not verdict.accepted and "cosine similarity" in verdict.reasons[0]


@pytest.mark.slow
def test_smollm2_bf16_result_accepted_and_tamper_rejected() -> None:
    job = Job(model="smollm2-135m", prompt="The capital of France is",
              params=GenerationParams(max_tokens=6))
    with Engine(devices=["cpu"], dtype="bfloat16") as eng:
        res = eng.run(job)
        assert res.ok, res.error
        with Verifier(engine=eng) as v:
            verdict = v.verify(job, res)
            assert verdict.accepted, verdict.reasons
            assert verdict.details["reference_dtype"] == "float32"
            assert isinstance(res.output, GenerationOutput) and res.profile is not None
            toks = list(res.output.token_ids)
            toks[1] = 1000 if toks[1] != 1000 else 1001
            loaded = eng.load("smollm2-135m")
            out = GenerationOutput(text=loaded.tokenizer.decode(toks, skip_special_tokens=True),
                                   token_ids=toks, finish_reason=res.output.finish_reason)
            forged = res.model_copy(update={"output": out, "result_hash": result_hash(
                job, out, res.profile.weights_digest)})
            bad = v.verify(job, forged)
            assert not bad.accepted and bad.first_suspicious_token == 1
            assert math.isfinite(bad.cost_seconds)
