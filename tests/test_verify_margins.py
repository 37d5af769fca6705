"""The tolerances of ``tolerant`` mode are applied, at the values the README gives.

Greedy: a claimed token whose logit gap to the argmax is just over the margin
``max(margin_floor, margin_sigma * std(row))`` is rejected, one just under it
accepted, and a token a quarter of a standard deviation under the argmax (half the
old 0.5 sigma margin, several times any honest gap ``benchmarks/verify_eval.py``
measured) is rejected. Embeddings: a vector just under ``embedding_min_cosine`` is
rejected, one just over accepted, and one at cosine 0.999 rejected. All on tiny
models made here (a 2-layer GPT-2, a 2-layer BERT), so the test is fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import count_parameters, tiny_entry, write_registry

from engine.commitment import compute_commitment
from engine.executor import Engine
from engine.hashing import result_hash
from engine.jobs import EmbeddingOutput, GenerationOutput, GenerationParams, Job, JobResult
from engine.loading import LoadedModel
from engine.tasks.generation import encode_prompt
from engine.verify import Tolerances, Verifier, apply_repetition_penalty, teacher_forced_logits

TINY, BERT = "tiny-gpt2", "tiny-bert"
PROMPTS = ["Hello GPU", "The quick brown fox", "Paris is the capital of"]


def make_tiny_bert(directory: Path, tokenizer_dir: Path) -> dict[str, object]:
    """A 2-layer BERT (safetensors) with the tiny GPT-2's tokenizer; returns its registry entry."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = "<|endoftext|>"
    bert = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      type_vocab_size=2)
    config = {"model_type": "bert", "vocab_size": len(tokenizer), "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 128, "type_vocab_size": 2}
    torch.manual_seed(0)
    model = BertModel(bert)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return {"description": "tiny 2-layer BERT made by the tests", "task": "embedding",
            "architecture": "bert", "parameters": count_parameters(directory),
            "context_length": 128, "dtype": {"cuda": "float32", "cpu": "float32"},
            "min_gpu_memory_mb": 16, "pooling": "mean", "normalize": True,
            "source": {"local": {"path": str(directory), "format": "safetensors"}},
            "config": config}


@pytest.fixture(scope="module")
def registry_path(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny GPT-2 and a tiny BERT: conftest's engine and verifier use this one here."""
    base = tmp_path_factory.mktemp("margins")
    return write_registry(base / "models.yaml", {
        TINY: tiny_entry(tiny_model_dir), BERT: make_tiny_bert(base / "bert", tiny_model_dir)})


@pytest.fixture(scope="module")
def candidates(engine: Engine, verifier: Verifier
               ) -> list[tuple[float, float, Job, JobResult, int, int]]:
    """Every non-argmax token of the honest greedy rows, as ``(gap / margin, gap / std, job,
    honest result, position, token)``; gaps measured the way the verifier does (fp32
    reference, teacher-forced)."""
    tiny = engine.load(TINY)
    tol = verifier.tolerances
    eos = tiny.eos_token_ids()
    found = []
    for prompt in PROMPTS:
        job = Job(model=TINY, prompt=prompt, params=GenerationParams(max_tokens=12))
        res = engine.run(job)
        assert res.ok and isinstance(res.output, GenerationOutput), res.error
        ids = encode_prompt(tiny, job)
        tokens = res.output.token_ids
        with tiny.lock:
            logits = teacher_forced_logits(tiny, ids, tokens)
        logits = apply_repetition_penalty(logits, ids, tokens, job.params.repetition_penalty)
        std = logits.std(dim=-1)
        margin = torch.clamp(std * tol.margin_sigma, min=tol.margin_floor)
        gaps = logits.max(dim=-1).values[:, None] - logits
        for pos in range(len(tokens)):
            for tok in torch.nonzero(gaps[pos] > 0).flatten().tolist():
                if tok not in eos:
                    g = float(gaps[pos, tok])
                    found.append((g / float(margin[pos]), g / float(std[pos]), job, res, pos,
                                  tok))
    return found


def claim_at(tiny: LoadedModel, job: Job, honest: JobResult, pos: int, tok: int
             ) -> tuple[Job, JobResult]:
    """The honest tokens up to ``pos`` and then ``tok``, as a complete, self-consistent result of
    the same job cut to ``pos + 1`` tokens (text, commitment and hash made to match)."""
    assert isinstance(honest.output, GenerationOutput) and honest.profile and honest.metrics
    short = job.model_copy(update={"params": job.params.model_copy(
        update={"max_tokens": pos + 1})})
    tokens = [*honest.output.token_ids[:pos], tok]
    with tiny.lock:
        commitment = compute_commitment(tiny, encode_prompt(tiny, short), tokens)
    out = GenerationOutput(text=tiny.tokenizer.decode(tokens, skip_special_tokens=True),
                           token_ids=tokens, finish_reason="length", commitment=commitment)
    return short, honest.model_copy(update={
        "output": out, "result_hash": result_hash(short, out, honest.profile.weights_digest),
        "metrics": honest.metrics.model_copy(update={"completion_tokens": len(tokens)})})


def _pick(found: list[tuple[float, float, Job, JobResult, int, int]], lo: float, hi: float,
          *, sigma: bool = False) -> tuple[float, float, Job, JobResult, int, int]:
    inside = [c for c in found if lo < (c[1] if sigma else c[0]) < hi]
    assert inside, f"no non-argmax token with a gap in ({lo}, {hi})"
    return min(inside, key=lambda c: c[1] if sigma else c[0])


def test_greedy_token_just_over_the_margin_is_rejected_just_under_accepted(
        engine: Engine, verifier: Verifier,
        candidates: list[tuple[float, float, Job, JobResult, int, int]]) -> None:
    tiny = engine.load(TINY)
    _, _, job, res, pos, tok = _pick(candidates, 1.02, 1.5)
    over = verifier.verify(*claim_at(tiny, job, res, pos, tok))
    assert not over.accepted
    assert over.first_suspicious_token == pos and "not the argmax" in over.reasons[0]
    _, _, job, res, pos, tok = max((c for c in candidates if 0.5 < c[0] < 0.98),
                                   key=lambda c: c[0])
    # The margin alone: a verifier that lets a float32 claim depart once (bfloat16's cap).
    one_departure = Verifier(verifier.registry, pool=verifier.pool,
                             tolerances=Tolerances(flip_rate={"float32": 0.02}))
    under = one_departure.verify(*claim_at(tiny, job, res, pos, tok))
    assert under.accepted, under.reasons
    assert under.details["near_ties"] >= 1
    # With the default caps a float32 claim may not depart at all.
    assert not verifier.verify(*claim_at(tiny, job, res, pos, tok)).accepted


def test_greedy_token_a_quarter_sigma_under_the_argmax_is_rejected(
        engine: Engine, verifier: Verifier,
        candidates: list[tuple[float, float, Job, JobResult, int, int]]) -> None:
    # The old default (0.5 sigma) accepted this; honest gaps across profiles stay far below it.
    assert Tolerances().margin_sigma < 0.25
    _, gap, job, res, pos, tok = _pick(candidates, 0.25, 0.4, sigma=True)
    verdict = verifier.verify(*claim_at(engine.load(TINY), job, res, pos, tok))
    assert not verdict.accepted and verdict.first_suspicious_token == pos, gap


def _rotated(vector: list[float], cosine: float, seed: int) -> list[float]:
    """A unit vector at exactly ``cosine`` to ``vector`` (a unit vector)."""
    v = torch.tensor(vector, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(v.shape, generator=g, dtype=torch.float64)
    u = u - (u @ v) * v
    u = u / u.norm()
    return (cosine * v + math.sqrt(1 - cosine * cosine) * u).tolist()


def _embedding_claim(job: Job, res: JobResult, cosine: float) -> JobResult:
    assert isinstance(res.output, EmbeddingOutput) and res.profile is not None
    vectors = [list(v) for v in res.output.embeddings]
    vectors[1] = _rotated(vectors[1], cosine, seed=3)
    out = res.output.model_copy(update={"embeddings": vectors})
    return res.model_copy(update={"output": out,
                                  "result_hash": result_hash(job, out, res.profile.weights_digest)})


def test_embedding_under_the_cosine_floor_is_rejected_over_it_accepted(
        engine: Engine, verifier: Verifier) -> None:
    floor = verifier.tolerances.embedding_min_cosine
    assert floor > 0.999  # the old 0.99 allowed 170x the honest bf16 distance
    job = Job(model=BERT, task="embedding", input=["hello network", "the lazy dog jumps"])
    res = engine.run(job)
    assert res.ok, res.error
    assert verifier.verify(job, res).accepted
    slack = (1 - floor) * 0.2
    under = verifier.verify(job, _embedding_claim(job, res, floor - slack))
    assert not under.accepted and "vector 1 has cosine similarity" in under.reasons[0]
    over = verifier.verify(job, _embedding_claim(job, res, floor + slack))
    assert over.accepted, over.reasons
    far = verifier.verify(job, _embedding_claim(job, res, 0.999))
    assert not far.accepted
