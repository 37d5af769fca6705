"""Does ``tolerant`` verification accept every honest profile and reject every forger?

Runs on this machine's CPU, in five parts (``--json FILE`` writes every figure):

1. Honest results of the same jobs under every execution profile that can be
   produced here: fp32, bf16 and fp16 (``Engine(dtype=...)``), alone and batched
   (``Engine(batch_size=...)`` with the jobs submitted at once), the engine's
   row-invariant CPU linear kernel and torch's BLAS (a pool that loads with
   ``AITBC_ENGINE_LINEAR=blas``), the engine's dynamic KV cache and transformers'
   ``generate(..., cache_implementation="static")``, and (tiny model) random
   weights for jobs that ask for them; on the tiny local GPT-2 and on
   ``smollm2-135m``. Every one must be accepted.
2. The margins, from measurement: the gap of every honest greedy token to the fp32
   reference's argmax (in standard deviations of the logit row), the bound on any such
   gap (the spread of the logit differences between a profile and the reference over
   each row's top 8 tokens, teacher-forced), and the worst honest replay gap of the
   seeded sampler; ``Tolerances`` should sit at a small multiple of the worst of them.
   For ``all-minilm-l6-v2`` the same for the embedding cosine (fp32 / BLAS / bf16 /
   fp16 against the fp32 reference).
3. Simple tampers on the tiny models (one token replaced, truncation, another
   prompt's / model's / random weights' output, forged hashes): at least 99 %
   rejected, every forged hash caught by ``integrity``.
4. Forgers, N each (default 20), on ``smollm2-135m`` and ``all-minilm-l6-v2``. A
   forger runs the engine itself on a tampered model (weights rounded to fp8 e4m3
   with one scale per tensor or to int8 with one scale per output row, or the model
   cut to its first 2/3 of layers), so tokens, text, finish reason and activation
   commitment all come from the forger's model; then it re-labels the result with
   the honest profile (weight digest, dtype, versions; "another torch version" where
   said) and recomputes ``result_hash`` with the honest digest. Hand-made outputs
   (a token replaced, no compute) get the commitment the honest model gives their
   tokens, the strongest thing such a forger can do. Every row should read 0/N; the
   single-token steer at the nearest tie is reported apart (it may pass by design:
   it is indistinguishable from a precision flip).
5. Cost: ``tolerant`` seconds over job execution seconds, warm (best of 3 on a
   128-token greedy job), cold (a fresh verifier: model load included) and for a
   batch of results verified one after another against the batch's wall time.

Usage: ``python benchmarks/verify_eval.py [--json FILE] [--n 20] [--no-smollm2]
[--no-tiny] [--no-forgers | --only-forgers] [--no-cost]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from conftest import make_tiny_gpt2, tiny_entry, write_registry

from engine.commitment import compute_commitment
from engine.executor import ENGINE_VERSION, Engine
from engine.hashing import HASH_VERSION, result_hash
from engine.jobs import (
    EmbeddingOutput,
    ExecutionProfile,
    GenerationOutput,
    GenerationParams,
    Job,
    JobResult,
    Metrics,
)
from engine.loading import LoadedModel, load_model
from engine.pool import ModelPool
from engine.registry import ModelSpec
from engine.tasks.generation import encode_prompt
from engine.verify import (
    Tolerances,
    Verifier,
    apply_repetition_penalty,
    teacher_forced_logits,
)

TINY, TINY_B, SMOL, MINI = "tiny-gpt2", "tiny-gpt2-b", "smollm2-135m", "all-minilm-l6-v2"
TINY_PROMPTS = ["Hello GPU", "The quick brown fox", "Paris is the capital of", "A miner runs",
                "Numbers: 0 1 2", "The end of the text", "Berlin is", "hello network",
                "Stop here.", "the engine meters each", "anyone can recompute", "the lazy dog"]
SMOL_PROMPTS = ["The capital of France is", "Once upon a time,", "def add(a, b):",
                "The three primary colors are", "Water boils at", "My favourite food is",
                "The largest planet in the solar system is", "To make tea, first"]
FORGER_PROMPTS = [
    "The capital of France is", "Once upon a time,", "def add(a, b):",
    "The three primary colors are", "Water boils at", "My favourite food is",
    "The largest planet in the solar system is", "To make tea, first",
    "The best way to learn a language is", "In 1969, astronauts", "A healthy breakfast includes",
    "The main causes of the French Revolution were", "Photosynthesis is the process",
    "Here is a short poem about the sea:", "The difference between a virus and a bacterium is",
    "To sort a list in Python,", "The theory of relativity states", "My dog likes to",
    "The stock market fell today because", "Three tips for better sleep:",
    "The history of the bicycle", "Rain forms when", "A good password should",
    "The speed of light is",
]
SENTENCES = [
    "a miner runs jobs on its GPU", "the capital of France is Paris", "how do I bake bread",
    "verification must reject forged results", "the quick brown fox jumps over the lazy dog",
    "embeddings map text to vectors", "the weather is nice today", "GPUs are fast at matrices",
    "a result hash anyone can recompute", "the coordinator pays for honest work",
    "cats sleep most of the day", "the river flows to the sea", "a cheap check of costly work",
    "quantized weights change the numbers", "sentence similarity with cosine",
    "the museum opens at nine", "bread needs flour, water, salt and yeast",
    "the network hands out jobs", "mountains are tall", "a forger copies another answer",
    "the meter counts seconds and joules", "honest results pass", "noise hides in floats",
    "the last line of the list",
]
PARAM_SETS: list[dict[str, Any]] = [
    {"max_tokens": 16},
    {"max_tokens": 12, "repetition_penalty": 1.3},
    {"max_tokens": 20, "stop": [" the", "."]},
    {"max_tokens": 10, "temperature": 0.8, "top_k": 40},
    {"max_tokens": 14, "temperature": 1.0, "top_p": 0.9},
    {"max_tokens": 12, "temperature": 0.7, "top_k": 20, "top_p": 0.95,
     "repetition_penalty": 1.1, "seed": 7},
    {"max_tokens": 24, "temperature": 1.2, "seed": 11},
    {"max_tokens": 8},
]
KINDS = ["replace_token", "truncate", "other_prompt", "other_model", "random_weights",
         "forged_hash"]
OTHER_TORCH = "2.4.1"   # the version a forger claims where the row says "another torch version"
TOP = 8                 # top tokens of a row whose logit differences bound an honest flip
STEER = "single-token steer at the nearest tie (re-generated after it)"
DTYPE_LABEL = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


# ------------------------------------------------------------------ jobs and results

def make_jobs(model: str, prompts: Sequence[str], sets: Sequence[dict[str, Any]], per_prompt: int,
              tag: str) -> list[Job]:
    """``per_prompt`` parameter sets for each prompt, rotating through ``sets``."""
    jobs = []
    for i, prompt in enumerate(prompts):
        for k in range(per_prompt):
            params = sets[(i + k * 3) % len(sets)]
            jobs.append(Job(job_id=f"{tag}-{i}-{k}", model=model, prompt=prompt,
                            params=GenerationParams(**params)))
    return jobs


def run_engine(engine: Engine, jobs: Sequence[Job]) -> list[JobResult]:
    """Submit every job at once (so a batching engine batches them) and collect results."""
    handles = [engine.submit(j) for j in jobs]
    results = [h.result(timeout=1800) for h in handles]
    for r in results:
        if not r.ok:
            raise SystemExit(f"job {r.job_id} failed: {r.error}")
    return results


@contextlib.contextmanager
def linear_kernel_off() -> Iterator[None]:
    """``AITBC_ENGINE_LINEAR=blas`` for the duration: models load with torch's BLAS."""
    old = os.environ.get("AITBC_ENGINE_LINEAR")
    os.environ["AITBC_ENGINE_LINEAR"] = "blas"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AITBC_ENGINE_LINEAR", None)
        else:
            os.environ["AITBC_ENGINE_LINEAR"] = old


def blas_loader(spec: ModelSpec, devices: Sequence[Any], **options: Any) -> LoadedModel:
    """The engine's loader with the CPU kernel off (weights stay plain tensors)."""
    with linear_kernel_off():
        return load_model(spec, devices, **options)


def static_cache_result(loaded: LoadedModel, job: Job) -> JobResult:
    """A greedy job run by transformers' ``generate`` with a static KV cache, hashed by the engine's
    rules (the honest output of another decode implementation)."""
    ids = encode_prompt(loaded, job)
    eos = sorted(loaded.eos_token_ids())
    started = time.perf_counter()
    with loaded.lock, torch.inference_mode():
        out = loaded.model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=job.params.max_tokens, do_sample=False, cache_implementation="static",
            eos_token_id=eos, pad_token_id=eos[0],
            repetition_penalty=job.params.repetition_penalty, top_k=None, top_p=None,
            temperature=None)
        gen = out[0, len(ids):].tolist()
        commitment = compute_commitment(loaded, ids, gen)
    wall = time.perf_counter() - started
    output = GenerationOutput(text=loaded.tokenizer.decode(gen, skip_special_tokens=True),
                              token_ids=gen, commitment=commitment,
                              finish_reason="eos" if gen and gen[-1] in eos else "length")
    profile = ExecutionProfile(
        model=job.model, weights=loaded.weights, weights_digest=loaded.weights_digest,
        dtype=loaded.dtype_name, device_class=loaded.device_class, device_count=1,
        torch_version=_v("torch"),
        transformers_version=_v("transformers"), engine_version=ENGINE_VERSION,
        hash_version=HASH_VERSION, decode="static-cache/transformers-generate")
    metrics = Metrics(execution_time_seconds=wall, gpu_time_seconds=0.0, load_time_seconds=0.0,
                      device="cpu", measurement="wall-clock", prompt_tokens=len(ids),
                      completion_tokens=len(gen))
    return JobResult(job_id=job.job_id, model=job.model, task=job.task, status="completed",
                     output=output, result_hash=result_hash(job, output, loaded.weights_digest),
                     metrics=metrics, profile=profile)


def _v(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


# ------------------------------------------------------------------ forging

def forge(job: Job, honest: JobResult, tokens: list[int], loaded: LoadedModel,
          *, keep_hash: bool = False, torch_version: str | None = None) -> JobResult:
    """A result claiming ``tokens`` for ``job``, made as consistent as a forger can make it:
    cut at the first EOS / stop string, an EOS appended when it ends early, text decoded the
    engine's way, the activation commitment ``loaded`` (the honest model) gives these tokens,
    and (unless ``keep_hash``) the hash recomputed with the honest digest."""
    eos = loaded.eos_token_ids()
    p = job.params
    tokens = list(tokens)[:p.max_tokens]
    finish, text = None, None
    for t in range(1, len(tokens) + 1):
        decoded = loaded.tokenizer.decode(tokens[:t], skip_special_tokens=True)
        cut = min((i for i in (decoded.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            tokens, finish, text = tokens[:t], "stop", decoded[:cut]
            break
        if tokens[t - 1] in eos:
            tokens, finish = tokens[:t], "eos"
            break
    if finish is None:
        if len(tokens) < p.max_tokens:
            tokens.append(min(eos))
            finish = "eos"
        else:
            finish = "length"
    if text is None:
        text = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    assert isinstance(honest.output, GenerationOutput)
    commitment = honest.output.commitment   # tokens the model cannot even read keep the honest one
    if all(0 <= t < int(loaded.model.config.vocab_size) for t in tokens):
        with loaded.lock:
            commitment = compute_commitment(loaded, encode_prompt(loaded, job), tokens)
    output = honest.output.model_copy(update={"text": text, "token_ids": tokens,
                                              "finish_reason": finish, "commitment": commitment})
    assert honest.profile is not None and honest.metrics is not None
    digest = honest.profile.weights_digest
    profile = honest.profile if torch_version is None else \
        honest.profile.model_copy(update={"torch_version": torch_version})
    return honest.model_copy(update={
        "output": output, "profile": profile,
        "result_hash": honest.result_hash if keep_hash else result_hash(job, output, digest),
        "metrics": honest.metrics.model_copy(update={"completion_tokens": len(tokens)})})


def relabel(job: Job, made: JobResult, honest: JobResult,
            torch_version: str | None = None) -> JobResult:
    """``made`` (the forger's engine's own result, any job) as a result of ``job`` under the honest
    profile: the honest weight digest, dtype and versions (the torch version replaced when
    given), and the hash recomputed with the honest digest."""
    assert honest.profile is not None and made.output is not None
    profile = honest.profile if torch_version is None else \
        honest.profile.model_copy(update={"torch_version": torch_version})
    return made.model_copy(update={
        "job_id": job.job_id, "profile": profile,
        "result_hash": result_hash(job, made.output, honest.profile.weights_digest)})


def fp8_e4m3(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to float8 e4m3 with one scale for the whole tensor (absmax to 448)."""
    scale = w.abs().max().clamp(min=1e-12) / 448.0
    return (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to symmetric int8 with one scale per output row (absmax to 127)."""
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return (w / scale).round().clamp(-127, 127) * scale


def quantize(model: torch.nn.Module, rounding: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Round every matrix weight (linear layers, embeddings, a tied head once) in place."""
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or id(weight) in seen:
            continue
        seen.add(id(weight))
        with torch.no_grad():
            weight.copy_(rounding(weight.detach().float()).to(weight.dtype))
    return len(seen)


def early_exit(model: torch.nn.Module, keep: float = 2 / 3) -> int:
    """Cut the model to its first ``keep`` of its layers (the head reads that layer's output)."""
    for module in model.modules():
        for attr in ("layers", "h", "layer"):
            blocks = getattr(module, attr, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 1:
                n = max(1, round(len(blocks) * keep))
                setattr(module, attr, torch.nn.ModuleList(list(blocks)[:n]))
                config = getattr(model, "config", None)
                for key in ("num_hidden_layers", "n_layer"):
                    if config is not None and hasattr(config, key):
                        setattr(config, key, n)
                if config is not None and isinstance(getattr(config, "layer_types", None), list):
                    config.layer_types = config.layer_types[:n]
                return n
    raise ValueError("no stack of layers found to cut")


TAMPERS: dict[str, Callable[[torch.nn.Module], object]] = {
    "fp8": lambda m: quantize(m, fp8_e4m3),
    "int8": lambda m: quantize(m, int8_rows),
    "early-exit": early_exit,
}


# ------------------------------------------------------------------ the evaluation

def _replay_sigma(tol: Tolerances) -> float:
    """The replay margin in row standard deviations (its own field where the verifier has one)."""
    return float(getattr(tol, "replay_margin_sigma", tol.margin_sigma))


class Eval:
    """Holds pools, engines, the verifier and the tallies."""

    def __init__(self, registry: Path, rng: random.Random):
        self.registry = registry
        self.rng = rng
        self.pools = {"kernel": ModelPool(show_progress=False),
                      "blas": ModelPool(show_progress=False, loader=blas_loader)}
        self.pool = self.pools["kernel"]
        self.verifier = Verifier(registry, pool=self.pool)
        self.engines: dict[tuple[str, str, int, str], Engine] = {}
        self.forgers: dict[str, Engine] = {}
        self.tampered_models: set[tuple[str, str]] = set()
        self.rows: list[dict[str, Any]] = []
        # Honest greedy tokens: gap to the fp32 reference's argmax, in row std units and logits.
        self.gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.raw_gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
        # Bound on any honest flip: spread of (profile - reference) over each row's top tokens.
        self.spread: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.raw_spread: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.tamper_gaps: list[float] = []
        self.replay_gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.cosines: dict[str, list[float]] = defaultdict(list)
        self.objects: dict[str, tuple[Job, JobResult]] = {}

    def engine(self, weights: str = "pretrained", dtype: str = "float32", batch: int = 1,
               linear: str = "kernel") -> Engine:
        key = (weights, dtype, batch, linear)
        if key not in self.engines:
            self.engines[key] = Engine(self.registry, devices=["cpu"], pool=self.pools[linear],
                                       weights=weights,  # type: ignore[arg-type]
                                       dtype=dtype, batch_size=batch, batch_window_seconds=0.2)
        return self.engines[key]

    def forger(self, tamper: str, model: str) -> Engine:
        """An engine whose ``model`` has been tampered with (``TAMPERS``) before any job ran."""
        if tamper not in self.forgers:
            pool = ModelPool(show_progress=False, loader=blas_loader)
            self.forgers[tamper] = Engine(self.registry, devices=["cpu"], pool=pool,
                                          dtype="float32", batch_size=8, batch_window_seconds=0.2)
        eng = self.forgers[tamper]
        if (tamper, model) not in self.tampered_models:
            TAMPERS[tamper](eng.load(model).model)
            self.tampered_models.add((tamper, model))
        return eng

    def loaded(self, model: str, dtype: str = "float32", weights: str = "pretrained",
               linear: str = "kernel") -> LoadedModel:
        spec = self.verifier.registry.get(model)
        got, _ = self.pools[linear].get(spec, [self.verifier.device],
                                        weights=weights,  # type: ignore[arg-type]
                                        dtype=dtype)
        return got

    def _logits(self, loaded: LoadedModel, job: Job, tokens: list[int]) -> torch.Tensor:
        ids = encode_prompt(loaded, job)
        with loaded.lock:
            logits = teacher_forced_logits(loaded, ids, tokens)
        return apply_repetition_penalty(logits, ids, tokens, job.params.repetition_penalty)

    def honest(self, label: str, job: Job, res: JobResult,
               profile_model: LoadedModel | None = None) -> None:
        """Verify an honest result; record its gaps (and, given the model of its profile, the
        teacher-forced spread of that profile's logits against the reference's)."""
        tol = self.verifier.verify(job, res, mode="tolerant")
        # tolerant runs the integrity checks first: only a rejection leaves integrity open.
        integ = tol.accepted or self.verifier.verify(job, res, mode="integrity").accepted
        self.objects[job.job_id] = (job, res)
        self.rows.append({"group": "honest", "kind": label, "model": job.model,
                          "integrity": integ, "tolerant": tol.accepted,
                          "reasons": tol.reasons, "job_id": job.job_id,
                          "cost": tol.cost_seconds})
        key = (job.model, label)
        if isinstance(res.output, EmbeddingOutput):
            if "cosine_min" in tol.details:
                self.cosines[label].append(float(tol.details["cosine_min"]))
            return
        assert isinstance(res.output, GenerationOutput) and res.profile is not None
        if not job.params.greedy:
            if "max_replay_gap_in_margins" in tol.details:
                self.replay_gaps[key].append(tol.details["max_replay_gap_in_margins"]
                                             * _replay_sigma(self.verifier.tolerances))
        else:
            ref = self.loaded(job.model, "float32", res.profile.weights)
            logits = self._logits(ref, job, res.output.token_ids)
            target = torch.tensor(res.output.token_ids)[:, None]
            gap = logits.max(-1).values - logits.gather(1, target)[:, 0]
            self.raw_gaps[key].extend(gap.tolist())
            self.gaps[key].extend((gap / logits.std(-1)).tolist())
        if profile_model is not None:
            self.perturbation(key, job, res.output.token_ids, profile_model)

    def perturbation(self, key: tuple[str, str], job: Job, tokens: list[int],
                     profile_model: LoadedModel) -> None:
        """How far a profile's logits move from the reference's, as far as a flip can tell:
        ``max - min`` of ``(profile - reference)`` over the reference row's top ``TOP`` tokens,
        so any two of them can swap order only when their reference gap is under it."""
        ref = self.loaded(job.model, "float32", profile_model.weights)
        a = self._logits(ref, job, tokens)
        b = self._logits(profile_model, job, tokens)
        top = a.topk(TOP, dim=-1).indices
        d = (b - a).gather(1, top)
        spread = d.max(-1).values - d.min(-1).values
        self.raw_spread[key].extend(spread.tolist())
        self.spread[key].extend((spread / a.std(-1)).tolist())

    def record(self, group: str, kind: str, job: Job, res: JobResult,
               **extra: Any) -> dict[str, Any]:
        """Verify a tampered or forged result (both modes) and record the row."""
        tol = self.verifier.verify(job, res, mode="tolerant")
        integ = tol.accepted or self.verifier.verify(job, res, mode="integrity").accepted
        row = {"group": group, "kind": kind, "model": job.model, "integrity": integ,
               "tolerant": tol.accepted, "reasons": tol.reasons, "job_id": job.job_id,
               "first": tol.first_suspicious_token, "cost": tol.cost_seconds,
               "cosine_min": tol.details.get("cosine_min"),
               "near_ties": tol.details.get("near_ties"),
               "max_gap_sigma": tol.details.get("max_normalized_gap"), **extra}
        self.rows.append(row)
        return row

    def tampered(self, kind: str, job: Job, res: JobResult, position: int | None = None) -> None:
        self.record("tampered", kind, job, res, position=position)

    def replaced_gap(self, job: Job, forged: JobResult, position: int) -> None:
        """The normalized gap at a substituted token (greedy jobs), for the margin table."""
        assert isinstance(forged.output, GenerationOutput)
        toks = forged.output.token_ids
        if position >= len(toks):
            return
        row = self._logits(self.loaded(job.model), job, toks)[position]
        self.tamper_gaps.append(float((row.max() - row[toks[position]]) / row.std()))

    def close(self) -> None:
        for eng in [*self.engines.values(), *self.forgers.values()]:
            eng.close()
        self.verifier.close()


def tamper_all(ev: Eval, model: str, pairs: list[tuple[Job, JobResult]],
               others: dict[str, JobResult], other_model: dict[str, JobResult],
               random_out: dict[str, JobResult], start: int) -> None:
    """One tampered result per honest pair, the kind rotating; ``others`` maps a job id to the
    honest result of the same parameters on another prompt."""
    rng = ev.rng
    loaded = ev.loaded(model)
    vocab = int(loaded.model.config.vocab_size)
    for n, (job, res) in enumerate(pairs):
        kind = KINDS[(n + start) % len(KINDS)]
        assert isinstance(res.output, GenerationOutput)
        toks = list(res.output.token_ids)
        if kind == "replace_token":
            pos = rng.randrange(len(toks))
            new = rng.randrange(vocab - 1)
            toks[pos] = new if new < toks[pos] else new + 1
            forged = forge(job, res, toks, loaded)
            if job.params.greedy:
                ev.replaced_gap(job, forged, pos)
            ev.tampered(kind, job, forged, pos)
        elif kind == "truncate":
            if len(toks) < 2:
                kind = "forged_hash"
            else:
                cut = rng.randrange(1, len(toks))
                if rng.random() < 0.5:   # the forger re-ends it (EOS appended where needed)
                    forged = forge(job, res, toks[:cut], loaded)
                else:                    # or only cuts tokens and text, keeping the rest
                    out = res.output.model_copy(update={
                        "token_ids": toks[:cut],
                        "text": loaded.tokenizer.decode(toks[:cut], skip_special_tokens=True)})
                    assert res.profile is not None
                    forged = res.model_copy(update={
                        "output": out,
                        "result_hash": result_hash(job, out, res.profile.weights_digest)})
                ev.tampered(kind, job, forged, cut)
                continue
        if kind in ("other_prompt", "other_model", "random_weights"):
            source = {"other_prompt": others, "other_model": other_model,
                      "random_weights": random_out}[kind].get(job.job_id)
            assert source is not None and isinstance(source.output, GenerationOutput)
            forged = forge(job, res, list(source.output.token_ids), loaded)
            assert isinstance(forged.output, GenerationOutput)
            if forged.output.token_ids == res.output.token_ids:
                continue   # the same tokens are no tamper
            ev.tampered(kind, job, forged)
        elif kind == "forged_hash":
            how = n % 3
            if how == 0:   # output changed, hash kept
                pos = rng.randrange(len(toks))
                toks[pos] = (toks[pos] + 1 + rng.randrange(vocab - 1)) % vocab
                forged = forge(job, res, toks, loaded, keep_hash=True)
                if forged.result_hash == result_hash(job, forged.output,  # type: ignore[arg-type]
                                                     res.profile.weights_digest):  # type: ignore
                    continue
            elif how == 1:  # a made-up hash
                made_up = f"sha256:{rng.getrandbits(256):064x}"
                forged = res.model_copy(update={"result_hash": made_up})
            else:           # hashed under another weight digest
                out = res.output
                forged = res.model_copy(update={"result_hash": result_hash(
                    job, out, f"sha256:{rng.getrandbits(256):064x}")})
            ev.tampered(kind, job, forged)


def other_prompt_map(pairs: list[tuple[Job, JobResult]]) -> dict[str, JobResult]:
    """For each job, an honest result for a different prompt (of the same parameters when there
    is one; the forger re-ends it to fit the job's own)."""
    by_params: dict[str, list[tuple[Job, JobResult]]] = defaultdict(list)
    for job, res in pairs:
        by_params[job.params.model_dump_json()].append((job, res))
    mapping = {}
    for n, (job, _) in enumerate(pairs):
        group = by_params[job.params.model_dump_json()] + pairs[n + 1:] + pairs[:n]
        found = next((res for cand, res in group if cand.prompt != job.prompt), None)
        if found is not None:
            mapping[job.job_id] = found
    return mapping



def profile_label(dtype: str, linear: str, batch: int) -> str:
    """``fp32 kernel alone``, ``fp32 BLAS batch8``, ``bf16 alone`` ... (the kernel is fp32 only)."""
    name = DTYPE_LABEL[dtype]
    if dtype == "float32":
        name += " kernel" if linear == "kernel" else " BLAS"
    return f"{name} {'alone' if batch == 1 else f'batch{batch}'}"


def run_model(ev: Eval, model: str, prompts: Sequence[str], per_prompt: int, batch: int,
              static_count: int, fp16_count: int, random_honest: bool, other: str,
              start: int) -> None:
    """Honest results under each profile, then one tamper per honest fp32/bf16 result."""
    t0 = time.perf_counter()
    jobs = make_jobs(model, prompts, PARAM_SETS, per_prompt, model)
    greedy_jobs = [j for j in jobs if j.params.greedy and not j.params.stop]
    tamper_source: list[tuple[Job, JobResult]] = []
    spread_done: set[tuple[str, str]] = set()
    for dtype, linear, b in [("float32", "kernel", 1), ("float32", "kernel", batch),
                             ("float32", "blas", 1), ("float32", "blas", batch),
                             ("bfloat16", "kernel", 1), ("bfloat16", "kernel", batch),
                             ("float16", "kernel", batch)]:
        label = profile_label(dtype, linear, b)
        chosen = jobs[:fp16_count] if dtype == "float16" else jobs
        tagged = [j.model_copy(update={"job_id": f"{j.job_id}-{label}"}) for j in chosen]
        results = run_engine(ev.engine("pretrained", dtype, b, linear), tagged)
        # The teacher-forced spread once per model of a profile (batching does not change it).
        spread = (dtype, linear) != ("float32", "kernel") and (dtype, linear) not in spread_done
        spread_done.add((dtype, linear))
        profile_model = ev.loaded(model, dtype, "pretrained", linear) if spread else None
        for j, r in zip(tagged, results, strict=True):
            ev.honest(label, j, r, profile_model)
            if linear == "kernel" and dtype != "float16":
                tamper_source.append((j, r))
        print(f"  {model} {label}: {len(results)} results "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for dtype in ("float32", "bfloat16"):
        label = f"{DTYPE_LABEL[dtype]} static-cache"
        loaded = ev.loaded(model, dtype)
        for job in greedy_jobs[:static_count]:
            one = job.model_copy(update={"job_id": f"{job.job_id}-{label}"})
            ev.honest(label, one, static_cache_result(loaded, one))
        print(f"  {model} {label}: {min(static_count, len(greedy_jobs))} results "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if random_honest:
        label = "random weights (job asks random)"
        tagged = [j.model_copy(update={"job_id": f"{j.job_id}-random", "weights": "random"})
                  for j in jobs]
        for j, r in zip(tagged, run_engine(ev.engine("random", "float32", 1), tagged),
                        strict=True):
            ev.honest(label, j, r)
    # Sources for the tampers: another prompt, another model, a random-weights model.
    others = other_prompt_map(tamper_source)
    other_jobs = [j.model_copy(update={"model": other}) for j, _ in tamper_source]
    other_res = run_engine(ev.engine("pretrained", "float32", batch), other_jobs)
    other_model = {j.job_id: r for j, r in zip(other_jobs, other_res, strict=True)}
    if other == TINY and model == SMOL:
        # Another tokenizer: carry the other model's text over in this model's tokens.
        smol = ev.loaded(SMOL)
        for jid, r in list(other_model.items()):
            assert isinstance(r.output, GenerationOutput)
            ids = smol.tokenizer(r.output.text, add_special_tokens=False)["input_ids"] or [0]
            other_model[jid] = r.model_copy(update={"output": r.output.model_copy(
                update={"token_ids": ids})})
    rnd_jobs = [j for j, _ in tamper_source]
    # Alone for the tiny model: its random build's EOS id (GPT-2's 50256, the registry
    # entry names none) lies outside its 512-token vocabulary, so it cannot pad a batch.
    rnd_res = run_engine(ev.engine("random", "float32", batch if model == SMOL else 1), rnd_jobs)
    random_out = {j.job_id: r for j, r in zip(rnd_jobs, rnd_res, strict=True)}
    tamper_all(ev, model, tamper_source, others, other_model, random_out, start)
    print(f"  {model}: tampers done ({time.perf_counter() - t0:.0f} s)", flush=True)


# ------------------------------------------------------------------ forgers

def forger_jobs(n: int) -> tuple[list[Job], list[Job]]:
    """``n`` greedy and ``n`` sampled (T=0.7, seed given) smollm2 jobs of 16-32 new tokens."""
    greedy, sampled = [], []
    for i in range(n):
        prompt = FORGER_PROMPTS[i % len(FORGER_PROMPTS)]
        tokens = 16 + 8 * (i % 3)
        greedy.append(Job(job_id=f"forge-g{i}", model=SMOL, prompt=prompt,
                          params=GenerationParams(max_tokens=tokens)))
        sampled.append(Job(job_id=f"forge-s{i}", model=SMOL, prompt=prompt,
                           params=GenerationParams(max_tokens=tokens, temperature=0.7,
                                                   seed=1000 + i)))
    return greedy, sampled


def _tokens(res: JobResult) -> list[int]:
    assert isinstance(res.output, GenerationOutput)
    return list(res.output.token_ids)


def forge_row(ev: Eval, kind: str, job: Job, honest: JobResult, forged: JobResult,
              **extra: Any) -> None:
    """Verify one forgery; ``identical`` says its output is the honest one (no forgery at all)."""
    if isinstance(forged.output, GenerationOutput) and isinstance(honest.output, GenerationOutput):
        same = forged.output.token_ids == honest.output.token_ids
    else:
        same = forged.output == honest.output
    ev.record("forger", kind, job, forged, identical=same, **extra)


def runner_up(logits: torch.Tensor, pos: int) -> tuple[int, float]:
    """The second-best id of row ``pos`` and its gap to the best, in row standard deviations."""
    row = logits[pos]
    top = row.topk(2)
    return int(top.indices[1]), float((top.values[0] - top.values[1]) / row.std())


def greedy_continue(loaded: LoadedModel, job: Job, tokens: list[int]) -> list[int]:
    """Continue ``tokens`` greedily with ``loaded`` up to the job's end (EOS or max_tokens)."""
    ids = encode_prompt(loaded, job)
    eos = loaded.eos_token_ids()
    out = list(tokens)
    with loaded.lock, torch.inference_mode():
        while len(out) < job.params.max_tokens and not (out and out[-1] in eos):
            logits = loaded.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
            out.append(int(torch.argmax(logits)))
    return out


def run_forgers(ev: Eval, n: int) -> None:
    """Every kind of forger, ``n`` forgeries each, on smollm2-135m (see the module docstring)."""
    t0 = time.perf_counter()
    rng = ev.rng
    greedy, sampled = forger_jobs(n)
    honest_eng = ev.engine("pretrained", "float32", 8)
    honest_g = run_engine(honest_eng, greedy)
    honest_s = run_engine(honest_eng, sampled)
    for j, r in [*zip(greedy, honest_g, strict=True), *zip(sampled, honest_s, strict=True)]:
        ev.honest("fp32 kernel batch8 (forger jobs)", j, r)
    ref = ev.loaded(SMOL)

    def say(what: str) -> None:
        print(f"  forgers: {what} ({time.perf_counter() - t0:.0f} s)", flush=True)

    say("honest results")
    # Tampered weights, greedy, re-labelled as the honest fp32 result.
    made = run_engine(ev.forger("fp8", SMOL), greedy)
    for job, hon, m in zip(greedy, honest_g, made, strict=True):
        forge_row(ev, "fp8 e4m3 weights, greedy", job, hon, relabel(job, m, hon))
    say("fp8 greedy")
    # A greedy claim that was sampled: at T, the first seed whose output is not the greedy one.
    for temp in (0.3, 0.5):
        pending = list(range(n))
        found: dict[int, JobResult] = {}
        for seed in range(1, 9):
            if not pending:
                break
            tries = [greedy[i].model_copy(update={
                "job_id": f"{greedy[i].job_id}-T{temp}-s{seed}",
                "params": greedy[i].params.model_copy(update={"temperature": temp,
                                                              "seed": seed})})
                for i in pending]
            for i, r in zip(pending, run_engine(honest_eng, tries), strict=True):
                if _tokens(r) != _tokens(honest_g[i]) or seed == 8:
                    found[i] = r
            pending = [i for i in pending if i not in found]
        for i in range(n):
            forge_row(ev, f"greedy claim sampled at T={temp}", greedy[i], honest_g[i],
                      relabel(greedy[i], found[i], honest_g[i]))
    say("sampled as greedy")
    # One token replaced by the reference's runner-up, at a random position / at the nearest tie.
    for job, hon in zip(greedy, honest_g, strict=True):
        toks = _tokens(hon)
        logits = ev._logits(ref, job, toks)
        pos = rng.randrange(len(toks))
        alt, gap = runner_up(logits, pos)
        changed = [*toks[:pos], alt, *toks[pos + 1:]]
        forge_row(ev, "one token replaced by the runner-up", job, hon,
                  forge(job, hon, changed, ref), position=pos, gap_sigma=gap)
        gaps = [runner_up(logits, p)[1] for p in range(len(toks))]
        pos = min(range(len(toks)), key=gaps.__getitem__)
        alt, gap = runner_up(logits, pos)
        steered = greedy_continue(ref, job, [*toks[:pos], alt])
        forge_row(ev, STEER, job, hon, forge(job, hon, steered, ref), position=pos,
                  gap_sigma=gap)
    say("token replaced")
    # Random weights: as the engine labels it (random), and re-labelled as pretrained.
    made = run_engine(ev.engine("random", "float32", 8), greedy)
    for job, hon, m in zip(greedy, honest_g, made, strict=True):
        forge_row(ev, "--weights random result, labelled random", job, hon, m)
        forge_row(ev, "--weights random result, relabelled pretrained", job, hon,
                  relabel(job, m, hon))
    say("random weights")
    # Sampled jobs on tampered models, claiming another torch version.
    for tamper, name in (("int8", "int8 weights"), ("fp8", "fp8 e4m3 weights"),
                         ("early-exit", "early exit after 2/3 of the layers")):
        made = run_engine(ev.forger(tamper, SMOL), sampled)
        for job, hon, m in zip(sampled, honest_s, made, strict=True):
            forge_row(ev, f"sampled T=0.7, {name}, another torch version", job, hon,
                      relabel(job, m, hon, OTHER_TORCH))
        say(f"sampled {tamper}")
    # No compute: another prompt's sample; the prompt repeated.
    for i, (job, hon) in enumerate(zip(sampled, honest_s, strict=True)):
        other = next(honest_s[k % n] for k in range(i + 1, i + n)
                     if sampled[k % n].prompt != job.prompt)
        forge_row(ev, "no compute: another prompt's sample, another torch version", job, hon,
                  forge(job, hon, _tokens(other), ref, torch_version=OTHER_TORCH))
        ids = encode_prompt(ref, job)
        repeated = (ids * (job.params.max_tokens // max(1, len(ids)) + 1))[:job.params.max_tokens]
        forge_row(ev, "no compute: the prompt repeated, another torch version", job, hon,
                  forge(job, hon, repeated, ref, torch_version=OTHER_TORCH))
    say("no compute")


def embedding_jobs(n: int) -> list[Job]:
    """``n`` embedding jobs of two sentences each."""
    return [Job(job_id=f"embed-{i}", model=MINI, task="embedding",
                input=[SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 7) % len(SENTENCES)]])
            for i in range(n)]


def run_embeddings(ev: Eval, n: int, forgers: bool) -> None:
    """Honest all-minilm-l6-v2 results per profile (their cosine to the fp32 reference), then
    fp8-weight and noisy forgeries."""
    t0 = time.perf_counter()
    jobs = embedding_jobs(n)
    honest: list[JobResult] = []
    honest_jobs: list[Job] = []
    for dtype, linear in (("float32", "kernel"), ("float32", "blas"), ("bfloat16", "kernel"),
                          ("float16", "kernel")):
        label = profile_label(dtype, linear, 1)
        tagged = [j.model_copy(update={"job_id": f"{j.job_id}-{label}"}) for j in jobs]
        results = run_engine(ev.engine("pretrained", dtype, 1, linear), tagged)
        for j, r in zip(tagged, results, strict=True):
            ev.honest(label, j, r)
        if (dtype, linear) == ("float32", "kernel"):
            honest, honest_jobs = results, tagged
    print(f"  {MINI}: honest profiles ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not forgers:
        return
    made = run_engine(ev.forger("fp8", MINI), jobs)
    for job, hon, m in zip(jobs, honest, made, strict=True):
        forge_row(ev, "embeddings from fp8 e4m3 weights", job, hon, relabel(job, m, hon))
    gen = torch.Generator().manual_seed(ev.rng.randrange(2**31))
    for i, (job, hon) in enumerate(zip(honest_jobs, honest, strict=True)):
        assert isinstance(hon.output, EmbeddingOutput) and hon.profile is not None
        level = 0.02 + 0.11 * i / max(1, n - 1)
        vecs = torch.tensor(hon.output.embeddings, dtype=torch.float32)
        noise = torch.randn(vecs.shape, generator=gen)
        noise = noise / noise.norm(dim=1, keepdim=True) * vecs.norm(dim=1, keepdim=True) * level
        noisy = torch.nn.functional.normalize(vecs + noise, dim=1)
        out = hon.output.model_copy(update={"embeddings": noisy.tolist()})
        forged = hon.model_copy(update={
            "output": out, "result_hash": result_hash(job, out, hon.profile.weights_digest)})
        forge_row(ev, "honest vector + 2-13% noise, renormalised", job, hon, forged,
                  noise=level)
    print(f"  {MINI}: forgers ({time.perf_counter() - t0:.0f} s)", flush=True)


# ------------------------------------------------------------------ cost

def cost_check(ev: Eval, repeats: int = 3) -> dict[str, Any]:
    """tolerant on a 128-new-token greedy smollm2 job vs the job's own execution time.

    The machine is shared (other tenants make single timings swing by 5x or more), so
    the job runs ``repeats`` times, each run followed at once by three verifications of
    its result. Reported: the ratio of the best times (the usual way to take load noise
    out of a benchmark; the pass criterion), and the ratio within each run/verify pair.
    """
    engine = ev.engine("pretrained", "float32", 1)
    job = Job(job_id="cost-128", model=SMOL, prompt="Once upon a time, in a small village,",
              params=GenerationParams(max_tokens=128))
    engine.load(SMOL)
    runs: list[float] = []
    checks: list[tuple[float, float]] = []
    pairs: list[float] = []
    accepted = True
    res = None
    for _ in range(repeats):
        res = engine.run(job)
        assert res.ok and res.metrics is not None and isinstance(res.output, GenerationOutput)
        runs.append(res.metrics.execution_time_seconds)
        ev.verifier.verify(job, res, mode="integrity")   # the digest is cached after one call
        mine = []
        for _ in range(3):
            verdict = ev.verifier.verify(job, res, mode="tolerant")
            accepted = accepted and verdict.accepted
            mine.append((verdict.cost_seconds, verdict.details.get("forward_seconds", 0.0)))
        checks.extend(mine)
        pairs.append(min(mine)[0] / runs[-1])
    assert res is not None and isinstance(res.output, GenerationOutput)
    best_check = min(checks)
    return {"completion_tokens": len(res.output.token_ids),
            "finish_reason": res.output.finish_reason,
            "job_execution_seconds": min(runs), "job_runs": runs,
            "tolerant_seconds": best_check[0], "tolerant_forward_seconds": best_check[1],
            "tolerant_runs": [c for c, _ in checks], "pair_ratios": pairs,
            "ratio": best_check[0] / min(runs), "accepted": accepted}




def cold_cost(ev: Eval) -> dict[str, Any]:
    """A one-shot verification on a fresh verifier (its own pool: load and weight digest
    included) of a 32-token greedy smollm2 job, against the job's execution time."""
    job = Job(job_id="cost-cold", model=SMOL, prompt="The history of the bicycle",
              params=GenerationParams(max_tokens=32))
    res = ev.engine("pretrained", "float32", 1).run(job)
    assert res.ok and res.metrics is not None
    with Verifier(ev.registry, pool=ModelPool(show_progress=False)) as fresh:
        verdict = fresh.verify(job, res, mode="tolerant")
    run = res.metrics.execution_time_seconds
    return {"job_execution_seconds": run, "tolerant_seconds": verdict.cost_seconds,
            "load_seconds": verdict.details.get("load_seconds", 0.0),
            "ratio": verdict.cost_seconds / run, "accepted": verdict.accepted}


def batch_cost(ev: Eval, size: int = 8) -> dict[str, Any]:
    """``size`` 32-token greedy smollm2 jobs run as one batch, then verified one after another on
    the warm verifier: total verification seconds against the batch's wall time."""
    jobs = [Job(job_id=f"cost-batch-{i}", model=SMOL, prompt=FORGER_PROMPTS[-1 - i],
                params=GenerationParams(max_tokens=32)) for i in range(size)]
    eng = ev.engine("pretrained", "float32", size)
    eng.load(SMOL)
    started = time.perf_counter()
    results = run_engine(eng, jobs)
    wall = time.perf_counter() - started
    started = time.perf_counter()
    verdicts = [ev.verifier.verify(j, r, mode="tolerant") for j, r in zip(jobs, results,
                                                                           strict=True)]
    verify_wall = time.perf_counter() - started
    return {"jobs": size, "batch_wall_seconds": wall,
            "job_execution_seconds_sum": sum(r.metrics.execution_time_seconds
                                             for r in results if r.metrics is not None),
            "tolerant_seconds": verify_wall, "ratio": verify_wall / wall,
            "accepted": all(v.accepted for v in verdicts)}


def print_cost(cost: dict[str, Any]) -> None:
    """The cost line: best job time, best tolerant time, their ratio."""
    print(f"cost: smollm2-135m greedy job of {cost['completion_tokens']} new tokens "
          f"({cost['finish_reason']}) ran in {cost['job_execution_seconds']:.2f} s "
          f"(best of {[round(x, 2) for x in cost['job_runs']]}); tolerant took "
          f"{cost['tolerant_seconds']:.3f} s (forward pass "
          f"{cost['tolerant_forward_seconds']:.3f} s; best of "
          f"{[round(x, 3) for x in cost['tolerant_runs']]}): ratio "
          f"{cost['ratio']:.4f} (target <= 0.1), accepted={cost['accepted']}; ratio within "
          f"each run/verify pair: {[round(x, 4) for x in cost['pair_ratios']]}")


# ------------------------------------------------------------------ figures and printing

def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else float("nan")


def _worst(table: dict[tuple[str, str], list[float]], model: str | None = None
           ) -> tuple[float, str]:
    found = [(max(v), label) for (m, label), v in table.items() if v and model in (None, m)]
    return max(found) if found else (0.0, "-")


def margin_figures(ev: Eval) -> dict[str, Any]:
    """The worst honest figures behind each tolerance, and the tolerances in force."""
    tol = ev.verifier.tolerances
    models = sorted({m for m, _ in [*ev.gaps, *ev.spread, *ev.replay_gaps]})
    per_model: dict[str, dict[str, Any]] = {}
    for model in models:
        flip, flip_at = _worst(ev.gaps, model)
        bound, bound_at = _worst(ev.spread, model)
        replay, replay_at = _worst(ev.replay_gaps, model)
        per_model[model] = {"flip_gap_sigma": flip, "flip_profile": flip_at,
                            "spread_bound_sigma": bound, "spread_profile": bound_at,
                            "replay_gap_sigma": replay, "replay_profile": replay_at}
    flip = max([0.0] + [float(v["flip_gap_sigma"]) for v in per_model.values()])
    bound = max([0.0] + [float(v["spread_bound_sigma"]) for v in per_model.values()])
    replay = max([0.0] + [float(v["replay_gap_sigma"]) for v in per_model.values()])
    worst = max(flip, bound, replay)
    raw = max([0.0] + [max(v) for v in [*ev.raw_gaps.values(), *ev.raw_spread.values()] if v])
    cos = {label: min(v) for label, v in ev.cosines.items() if v}
    worst_cos = min(cos.values()) if cos else float("nan")
    forged_cos = defaultdict(list)
    for r in ev.rows:
        if r["group"] == "forger" and r.get("cosine_min") is not None:
            forged_cos[r["kind"]].append(r["cosine_min"])
    return {"per_model": per_model, "worst_honest_sigma": worst,
            "worst_honest_logits": raw, "worst_flip_sigma": flip, "worst_spread_sigma": bound,
            "worst_replay_sigma": replay,
            # At least 2x every honest gap seen, and over the bound on any flip of these profiles.
            "suggested_margin_sigma": max(2 * flip, 2 * replay, bound),
            "substituted_token_gaps_sigma": sorted(ev.tamper_gaps),
            "honest_cosine_min": cos, "worst_honest_cosine": worst_cos,
            "suggested_embedding_min_cosine": 1 - 3 * (1 - worst_cos),
            "forged_cosine_range": {k: [min(v), max(v)] for k, v in forged_cos.items()},
            "tolerances": {"margin_sigma": tol.margin_sigma, "margin_floor": tol.margin_floor,
                           "replay_margin_sigma": _replay_sigma(tol),
                           "embedding_min_cosine": tol.embedding_min_cosine}}


def code_state() -> dict[str, bool]:
    """Which of the verifier's defences the code this ran against has."""
    import engine.sampling
    import engine.verify

    source = Path(engine.verify.__file__).read_text()
    return {"activation_commitment": "commitment" in source,
            "version_independent_replay": hasattr(engine.sampling, "SAMPLING_RULE"),
            "job_weights_checked": "job.weights" in source}


def markdown(ev: Eval, figures: dict[str, Any], costs: dict[str, Any]) -> str:
    """The Markdown tables: honest per profile, forgeries, margins, cost."""
    out = ["### Honest results, accepted / N (tolerant)", "",
           "| model | profile | accepted / N |", "|---|---|---|"]
    honest = defaultdict(list)
    for r in ev.rows:
        if r["group"] == "honest":
            honest[(r["model"], r["kind"])].append(r["tolerant"])
    for (model, label), oks in sorted(honest.items()):
        out.append(f"| {model} | {label} | {sum(oks)}/{len(oks)} |")
    out += ["", "### Forgeries, accepted / N (tolerant)", "",
            "| attack | model | accepted / N | notes |", "|---|---|---|---|"]
    forged = defaultdict(list)
    for r in ev.rows:
        if r["group"] == "forger":
            forged[(r["kind"], r["model"])].append(r)
    for (kind, model), rows in forged.items():
        notes = []
        same = sum(bool(r.get("identical")) for r in rows)
        if same:
            notes.append(f"{same} output(s) identical to the honest one")
        gaps = [r["gap_sigma"] for r in rows if r.get("gap_sigma") is not None]
        if gaps:
            passed = [r["gap_sigma"] for r in rows if r.get("gap_sigma") is not None
                      and r["tolerant"]]
            notes.append(f"gap {min(gaps):.3f}-{max(gaps):.3f} σ" +
                         (f", accepted ones {min(passed):.3f}-{max(passed):.3f} σ"
                          if passed else ""))
        cos = [r["cosine_min"] for r in rows if r.get("cosine_min") is not None]
        if cos:
            notes.append(f"cosine {min(cos):.6f}-{max(cos):.6f}")
        out.append(f"| {kind} | {model} | {sum(r['tolerant'] for r in rows)}/{len(rows)} | "
                   f"{'; '.join(notes)} |")
    tol = figures["tolerances"]
    out += ["", "### Margins (worst honest figure, in standard deviations of the logit row)", "",
            "| model | flip gap (profile) | spread bound (profile) | replay gap (profile) |",
            "|---|---|---|---|"]
    for model, f in figures["per_model"].items():
        out.append(f"| {model} | {f['flip_gap_sigma']:.4f} ({f['flip_profile']}) | "
                   f"{f['spread_bound_sigma']:.4f} ({f['spread_profile']}) | "
                   f"{f['replay_gap_sigma']:.4f} ({f['replay_profile']}) |")
    out += ["", f"worst honest flip {figures['worst_flip_sigma']:.4f} σ, replay gap "
            f"{figures['worst_replay_sigma']:.4f} σ, flip bound {figures['worst_spread_sigma']:.4f}"
            f" σ ({figures['worst_honest_logits']:.4f} logits at most); margin needed "
            f"max(2 x flip, 2 x replay, bound) = {figures['suggested_margin_sigma']:.4f} σ; "
            "in force: margin_sigma "
            f"{tol['margin_sigma']}, replay_margin_sigma {tol['replay_margin_sigma']}, "
            f"margin_floor {tol['margin_floor']}"]
    if figures["substituted_token_gaps_sigma"]:
        g = figures["substituted_token_gaps_sigma"]
        out.append(f"random substituted tokens (tiny): least gap {g[0]:.3f} σ")
    if figures["honest_cosine_min"]:
        out += ["", "| embedding profile | least cosine to the fp32 reference |", "|---|---|"]
        for label, c in sorted(figures["honest_cosine_min"].items()):
            out.append(f"| {label} | {c:.7f} |")
        out.append(f"\nworst honest cosine {figures['worst_honest_cosine']:.7f}; "
                   f"1 - 3 x (1 - worst) = {figures['suggested_embedding_min_cosine']:.6f}; "
                   f"in force: embedding_min_cosine {tol['embedding_min_cosine']}")
    if costs:
        out += ["", "### Cost of tolerant verification (smollm2-135m, CPU)", "",
                "| case | job seconds | tolerant seconds | ratio |", "|---|---|---|---|"]
        if "warm" in costs:
            c = costs["warm"]
            out.append(f"| warm, {c['completion_tokens']}-token greedy job (best of 3) | "
                       f"{c['job_execution_seconds']:.2f} | {c['tolerant_seconds']:.3f} | "
                       f"{c['ratio']:.3f} |")
        if "cold" in costs:
            c = costs["cold"]
            out.append(f"| cold, one-shot (load {c['load_seconds']:.2f} s included), 32 tokens | "
                       f"{c['job_execution_seconds']:.2f} | {c['tolerant_seconds']:.3f} | "
                       f"{c['ratio']:.3f} |")
        if "batch" in costs:
            c = costs["batch"]
            out.append(f"| batch of {c['jobs']} x 32 tokens (batch wall time) | "
                       f"{c['batch_wall_seconds']:.2f} | {c['tolerant_seconds']:.3f} | "
                       f"{c['ratio']:.3f} |")
    return "\n".join(out)


def print_tables(ev: Eval, exact_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The confusion table of honest and tampered results, the gap tables; returns the tallies."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    table = Table(title="confusion table (accepted / rejected by each mode)")
    for col in ("group", "kind", "model", "n", "integrity accepts", "integrity rejects",
                "tolerant accepts", "tolerant rejects"):
        table.add_column(col, justify="right" if col not in ("group", "kind", "model") else "left")
    keys = sorted({(r["group"], r["kind"], r["model"]) for r in ev.rows
                   if r["group"] != "forger"}, key=lambda k: (k[0], k[2], k[1]))
    for g, k, m in keys:
        rows = [r for r in ev.rows if (r["group"], r["kind"], r["model"]) == (g, k, m)]
        ia = sum(r["integrity"] for r in rows)
        ta = sum(r["tolerant"] for r in rows)
        table.add_row(g, k, m, str(len(rows)), str(ia), str(len(rows) - ia), str(ta),
                      str(len(rows) - ta))
    console.print(table)
    honest = [r for r in ev.rows if r["group"] == "honest"]
    bad = [r for r in ev.rows if r["group"] == "tampered"]
    forged = [r for r in bad if r["kind"] == "forged_hash"]
    tally = {"honest": len(honest), "honest_ok": sum(r["tolerant"] for r in honest),
             "tampered": len(bad), "tampered_rejected": sum(not r["tolerant"] for r in bad),
             "forged_hash": len(forged),
             "forged_hash_caught": sum(not r["integrity"] for r in forged)}
    console.print(f"honest accepted by tolerant: {tally['honest_ok']}/{len(honest)}; tampered "
                  f"rejected by tolerant: {tally['tampered_rejected']}/{len(bad)}; forged hashes "
                  f"caught by integrity: {tally['forged_hash_caught']}/{len(forged)}")
    for r in honest:
        if not r["tolerant"]:
            console.print(f"[red]honest rejected[/red] {r['job_id']}: {r['reasons']}")
    for r in bad:
        if r["tolerant"]:
            console.print(f"[yellow]tamper accepted[/yellow] {r['kind']} {r['job_id']}")

    gaps = Table(title="honest greedy tokens: gap to the fp32 reference's argmax, and the "
                       f"bound on any flip (spread of the logit change over the top {TOP})")
    for col in ("model", "profile", "tokens", "not argmax", "max gap (logits)",
                "max gap (row std)", "max spread (logits)", "max spread (row std)",
                "p99.9 spread (row std)"):
        gaps.add_column(col)
    for key in sorted(set(ev.gaps) | set(ev.spread)):
        g, raw = ev.gaps.get(key, []), ev.raw_gaps.get(key, [])
        s, rs = ev.spread.get(key, []), ev.raw_spread.get(key, [])
        gaps.add_row(key[0], key[1], str(len(g) or len(s)), str(sum(x > 0 for x in raw)),
                     f"{max(raw):.4f}" if raw else "-", f"{max(g):.4f}" if g else "-",
                     f"{max(rs):.4f}" if rs else "-", f"{max(s):.4f}" if s else "-",
                     f"{pct(s, 0.999):.4f}" if s else "-")
    console.print(gaps)
    if ev.replay_gaps:
        rep = Table(title="seeded replay: worst gap of an honest sampled token to the replayed "
                          "winner (row std units)")
        for col in ("model", "profile", "results", "max gap"):
            rep.add_column(col)
        for key in sorted(ev.replay_gaps):
            rep.add_row(key[0], key[1], str(len(ev.replay_gaps[key])),
                        f"{max(ev.replay_gaps[key]):.4f}")
        console.print(rep)
    if exact_rows:
        ex = Table(title="exact mode on honest tiny results (bitwise, within one profile)")
        for col in ("profile", "n", "accepted"):
            ex.add_column(col)
        for label in sorted({r["kind"] for r in exact_rows}):
            rows = [r for r in exact_rows if r["kind"] == label]
            ex.add_row(label, str(len(rows)), str(sum(r["accepted"] for r in rows)))
        console.print(ex)
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-smollm2", action="store_true",
                        help="tiny models only (no smollm2, no embeddings, no forgers)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny models")
    parser.add_argument("--no-forgers", action="store_true", help="skip the forgers")
    parser.add_argument("--only-forgers", action="store_true",
                        help="the forgers and the embeddings only (another process can run the "
                             "rest at the same time with --no-forgers)")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost checks")
    parser.add_argument("--n", type=int, default=20, help="forgeries per attack (default 20)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cost-only", action="store_true", help="only the cost checks")
    parser.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="verify-eval-"))
    registry = write_registry(work / "models.yaml", {
        TINY: tiny_entry(make_tiny_gpt2(work / "tiny", seed=0)),
        TINY_B: tiny_entry(make_tiny_gpt2(work / "tiny-b", seed=1))})
    ev = Eval(registry, rng)
    state = code_state()
    print(f"code under test: {state}; tolerances: {ev.verifier.tolerances}", flush=True)
    costs: dict[str, Any] = {}
    if args.cost_only:
        costs = {"warm": cost_check(ev), "cold": cold_cost(ev), "batch": batch_cost(ev)}
        print_cost(costs["warm"])
        print(markdown(ev, margin_figures(ev), costs))
        ev.close()
        return 0 if costs["warm"]["ratio"] <= 0.1 and costs["warm"]["accepted"] else 1
    if args.only_forgers:
        args.no_tiny = args.no_cost = True
    if not args.no_tiny:
        print("tiny models:", flush=True)
        run_model(ev, TINY, TINY_PROMPTS, per_prompt=4, batch=6, static_count=12,
                  fp16_count=48, random_honest=True, other=TINY_B, start=0)
    exact_rows: list[dict[str, Any]] = []
    print("exact mode on a tiny subset:", flush=True)
    jobs_seen: dict[str, int] = defaultdict(int)
    for row in [r for r in ev.rows if r["group"] == "honest" and r["model"] == TINY]:
        if jobs_seen[row["kind"]] >= 6:
            continue
        jobs_seen[row["kind"]] += 1
        exact_rows.append({"kind": row["kind"], "job_id": row["job_id"]})
    for r in exact_rows:
        job, res = ev.objects[r["job_id"]]
        r["accepted"] = ev.verifier.verify(job, res, mode="exact").accepted
    if not args.no_smollm2:
        if not args.only_forgers:
            print("smollm2-135m:", flush=True)
            run_model(ev, SMOL, SMOL_PROMPTS, per_prompt=2, batch=8, static_count=6,
                      fp16_count=4,
                      random_honest=False, other=TINY, start=3)
        print(f"{MINI}:", flush=True)
        run_embeddings(ev, args.n, forgers=not args.no_forgers)
        if not args.no_forgers:
            print(f"forgers ({args.n} per attack):", flush=True)
            run_forgers(ev, args.n)
        if not args.no_cost:
            costs = {"warm": cost_check(ev), "cold": cold_cost(ev), "batch": batch_cost(ev)}
    tally = print_tables(ev, exact_rows)
    figures = margin_figures(ev)
    if "warm" in costs:
        print_cost(costs["warm"])
    print()
    print(markdown(ev, figures, costs))
    forger_rows = [r for r in ev.rows if r["group"] == "forger" and r["kind"] != STEER]
    passed = [r for r in forger_rows if r["tolerant"] and not r.get("identical")]
    ok = (tally["honest_ok"] == tally["honest"]
          and tally["tampered_rejected"] >= 0.99 * tally["tampered"]
          and tally["forged_hash_caught"] == tally["forged_hash"] and not passed
          and ("warm" not in costs or costs["warm"]["ratio"] <= 0.1))
    print(f"\ncode under test: {state}")
    print(f"forgeries accepted (steer excluded, identical outputs excluded): {len(passed)}/"
          f"{len(forger_rows)}")
    print("PASS" if ok else "FAIL")
    print(f"total time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"code": state, "tally": tally, "figures": figures,
                                         "cost": costs, "rows": ev.rows, "pass": ok},
                                        indent=1, default=str))
    ev.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
