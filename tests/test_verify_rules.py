"""Issue 16: the seeded replay no claim can switch off, the documented draw stream, the job's
weights rule, and ``run`` → ``verify`` agreeing on a job file without an id."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.executor import Engine
from engine.hashing import effective_seed, result_hash
from engine.jobs import GenerationOutput, GenerationParams, Job, JobResult
from engine.loading import LoadedModel
from engine.payloads import content_job_id, parse_job_file
from engine.sampling import Sampler, exponential_draws, seeded_generator, uniforms
from engine.verify import Tolerances, Verifier

TINY = "tiny-gpt2"


# ------------------------------------------------------------------ the documented stream

_MASK = 2**64 - 1


def _philox_block(counter: int, key: int) -> list[int]:
    """Philox4x64-10 of one 256-bit counter under a 128-bit key, as the module documents it."""
    c = [counter & _MASK, (counter >> 64) & _MASK, (counter >> 128) & _MASK, counter >> 192]
    k0, k1 = key & _MASK, key >> 64
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B97F4A7C15) & _MASK, (k1 + 0xBB67AE8584CAA73B) & _MASK
        p0, p1 = 0xD2E7470EE14C6C93 * c[0], 0xCA5A826395121157 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k0, p1 & _MASK, (p0 >> 64) ^ c[3] ^ k1, p0 & _MASK]
    return c


def _reference_q(seed: int, vocab: int, steps: int) -> list[list[float]]:
    """Each step's draws by the written rule alone: words k*V .. k*V+V-1, block b at counter
    b + 1, u = ((r >> 12) + 0.5) * 2**-52, q = -log(u)."""
    words: list[int] = []
    block = 0
    while len(words) < vocab * steps:
        block += 1
        words += _philox_block(block, seed)
    return [[-math.log(((r >> 12) + 0.5) * 2.0**-52) for r in words[k * vocab:(k + 1) * vocab]]
            for k in range(steps)]


@pytest.mark.parametrize("seed", [0, 7, 12345, 2**63 - 1])
def test_draws_equal_a_direct_reimplementation_of_the_documented_rule(seed: int) -> None:
    vocab, steps = 7, 4  # 7 words a step: steps straddle Philox's 4-word blocks
    want = _reference_q(seed, vocab, steps)
    generator = seeded_generator(seed)
    for k in range(steps):
        got = exponential_draws(generator, vocab)
        assert got.dtype == torch.float64
        # u is exact; the logarithm may differ in its last bit between libraries.
        assert got.tolist() == pytest.approx(want[k], rel=1e-15, abs=0.0)


def test_uniforms_stay_strictly_inside_the_unit_interval() -> None:
    raw = np.array([0, 1 << 12, 2**64 - 1, 2**63], dtype=np.uint64)
    u = uniforms(raw)
    assert u.tolist() == [2.0**-53, 1.5 * 2.0**-52, 1.0 - 2.0**-53, 0.5 + 2.0**-53]
    q = -np.log(u)
    assert bool((q > 0).all()) and bool(np.isfinite(q).all())


def test_sampler_takes_the_race_winner_of_the_documented_draws() -> None:
    vocab, seed = 50, 99
    params = GenerationParams(temperature=0.7, top_k=20, seed=seed)
    sampler = Sampler(params, seed, prompt_ids=[1, 2, 3])
    rows = torch.randn(5, vocab, generator=torch.Generator().manual_seed(3)) * 3
    draws = _reference_q(seed, vocab, len(rows))
    for k, row in enumerate(rows):
        z = (row / 0.7).tolist()
        kth = sorted(z, reverse=True)[19]
        weights = [math.exp(v - max(z)) if v >= kth else 0.0 for v in z]
        total = sum(weights)
        # argmax(p / q) by hand (float32 p, float64 ratio): the lowest id wins a tie.
        p = np.asarray([w / total for w in weights], dtype=np.float32).astype(np.float64)
        ratios = [float(p[i]) / draws[k][i] for i in range(vocab)]
        want = ratios.index(max(ratios))
        assert sampler.choose(row) == want, k


# ------------------------------------------------------------------ tolerant replay

def _run(engine: Engine, prompt: str, **params: Any) -> tuple[Job, JobResult]:
    job = Job(model=TINY, prompt=prompt, params=GenerationParams(**params))
    res = engine.run(job)
    assert res.ok, res.error
    return job, res


def _claim(job: Job, res: JobResult, tokens: list[int], tiny: LoadedModel,
           **profile: Any) -> JobResult:
    """``res`` with other tokens (and their text; the rest of the output kept), a profile
    changed by ``profile`` and a hash that recomputes."""
    assert isinstance(res.output, GenerationOutput) and res.profile and res.metrics
    out = res.output.model_copy(update={
        "text": tiny.tokenizer.decode(tokens, skip_special_tokens=True), "token_ids": tokens})
    return res.model_copy(update={
        "output": out, "result_hash": result_hash(job, out, res.profile.weights_digest),
        "profile": res.profile.model_copy(update=profile),
        "metrics": res.metrics.model_copy(update={"completion_tokens": len(tokens)})})


def test_a_claimed_torch_version_does_not_change_the_verdict(
        engine: Engine, verifier: Verifier, tiny: LoadedModel) -> None:
    job, res = _run(engine, "hello network", max_tokens=10, temperature=1.0)
    assert isinstance(res.output, GenerationOutput)
    toks = list(res.output.token_ids)
    honest = _claim(job, res, toks, tiny, torch_version="0.0.1")
    verdict = verifier.verify(job, honest)
    assert verdict.accepted, verdict.reasons
    assert verdict.details["seeded_replay"] is True
    toks[2] = (toks[2] + 17) % len(tiny.tokenizer)
    forged = _claim(job, res, toks, tiny, torch_version="0.0.1")
    verdict = verifier.verify(job, forged)
    assert not verdict.accepted and verdict.first_suspicious_token == 2
    assert any("token 2 (id" in r and "is not the seeded draw" in r for r in verdict.reasons)


def test_a_fair_sample_that_is_not_the_seeded_draw_is_rejected(
        engine: Engine, verifier: Verifier, tiny: LoadedModel) -> None:
    """No compute spent on this job's draw: a genuine sample of the same distribution under
    another seed, claimed for this job with another torch version."""
    job, res = _run(engine, "hello network", max_tokens=10, temperature=1.0, seed=1)
    _, other = _run(engine, "hello network", max_tokens=10, temperature=1.0, seed=2)
    assert isinstance(res.output, GenerationOutput) and isinstance(other.output, GenerationOutput)
    assert other.output.token_ids != res.output.token_ids
    forged = _claim(job, res, list(other.output.token_ids), tiny, torch_version="9.9.9+cu999")
    verdict = verifier.verify(job, forged, mode="integrity")
    assert verdict.accepted, verdict.reasons  # well formed, hash recomputes
    verdict = verifier.verify(job, forged)
    assert not verdict.accepted
    assert any("is not the seeded draw" in r for r in verdict.reasons), verdict.reasons


def test_replay_is_not_a_tolerance_a_caller_can_turn_off() -> None:
    fields = Tolerances().to_dict()
    assert "seeded_replay" not in fields and "probability_floor_alpha" not in fields
    assert fields["replay_margin_sigma"] == Tolerances().replay_margin_sigma
    with pytest.raises(TypeError):
        Tolerances(seeded_replay=False)  # type: ignore[call-arg]


# ------------------------------------------------------------------ the job's weights

def test_random_weights_refused_for_a_pretrained_job_accepted_for_a_random_one(
        registry_path: Path, verifier: Verifier) -> None:
    with Engine(registry_path, devices=["cpu"], weights="random", pool=verifier.pool) as eng:
        job = Job(model=TINY, prompt="Hello GPU", params=GenerationParams(max_tokens=6))
        res = eng.run(job)
        random_job = job.model_copy(update={"weights": "random"})
    assert res.ok and res.profile is not None and res.profile.weights == "random"
    for mode in ("integrity", "tolerant"):
        verdict = verifier.verify(job, res, mode=mode)  # type: ignore[arg-type]
        assert not verdict.accepted
        assert ("the job asks for pretrained weights; the result was made with random weights"
                in verdict.reasons)
        verdict = verifier.verify(random_job, res, mode=mode)  # type: ignore[arg-type]
        assert verdict.accepted, verdict.reasons
    # A job says random only in engine JSON; its weights are not in the result hash.
    assert parse_job_file(random_job.to_json()).weights == "random"
    assert result_hash(job, res.output, res.profile.weights_digest) == res.result_hash  # type: ignore[arg-type]


# ------------------------------------------------------------------ run → verify

def test_job_file_without_id_gets_its_content_id() -> None:
    payload = {"model": TINY, "prompt": "Hello GPU", "params": {"max_tokens": 4}}
    text = json.dumps(payload)
    job = parse_job_file(text.encode())
    assert job.job_id == content_job_id(text) == parse_job_file(json.dumps(
        payload, indent=2, sort_keys=True)).job_id
    assert job.job_id.startswith("job-") and len(job.job_id) == 4 + 24
    assert parse_job_file({**payload, "job_id": "mine"}).job_id == "mine"
    other = parse_job_file({**payload, "prompt": "Hello world"})
    assert other.job_id != job.job_id
    assert parse_job_file(text, weights="random").weights == "random"
    assert parse_job_file({**payload, "weights": "pretrained"}, weights="random").weights \
        == "pretrained"


@pytest.mark.slow  # ~0.9 s here: two runs and five verifications through the CLI
def test_run_then_verify_a_job_file_without_an_id(
        registry_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"model": TINY, "prompt": "Hello GPU",
                                    "params": {"max_tokens": 5, "temperature": 0.8}}))
    common = ["--registry", str(registry_path)]
    for weights in ("pretrained", "random"):
        assert main(["run", "--job", str(job_file), *common, "--device", "cpu",
                     "--weights", weights, "--json"]) == 0
        result_file = tmp_path / f"result-{weights}.json"
        result_file.write_text(capsys.readouterr().out)
        assert json.loads(result_file.read_text())["profile"]["weights"] == weights
        verify = ["verify", "--job", str(job_file), "--result", str(result_file), *common]
        assert main([*verify, "--weights", weights, "--json"]) == 0, capsys.readouterr().out
        capsys.readouterr()
    # The random result is not an answer to the file's job when nobody says random.
    assert main([*verify, "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert "the job asks for pretrained weights" in verdict["reasons"][0]
    # A job file that names its weights wins; a contradicting flag is a usage error.
    named = tmp_path / "named.json"
    named.write_text(json.dumps({**json.loads(job_file.read_text()), "weights": "random"}))
    assert main(["run", "--job", str(named), *common, "--weights", "pretrained"]) == 2
    assert "asks for random weights" in capsys.readouterr().err
    assert effective_seed(parse_job_file(named.read_text())) == effective_seed(
        parse_job_file(job_file.read_text()))
