"""Does verification accept honest results from every profile and reject tampered ones?

Runs on this machine's CPU, in three parts:

1. Honest results of the same jobs under different execution profiles: fp32
   and bf16 (``Engine(dtype=...)``), alone and batched (``Engine(batch_size=6)``
   with the jobs submitted at once), the engine's dynamic KV cache and
   transformers' own ``model.generate(..., cache_implementation="static")``
   (greedy; the JobResult built with ``engine.hashing``), and an honest
   random-weights profile. Mostly the tiny local GPT-2, a batched subset on
   ``smollm2-135m``. Every one must be accepted by ``tolerant``.
2. Tampered results made from them: one token replaced at a random position,
   the output truncated, another prompt's output, another model's output, a
   random-weights model's output (each with its text, finish reason and hash
   made consistent, so only the model check can catch it), and forged hashes
   (output changed, hash not). ``tolerant`` must reject at least 99 %, and
   ``integrity`` every forged hash.
3. Cost: ``tolerant`` on a 128-new-token greedy ``smollm2-135m`` job against the
   job's own execution time.

It prints the confusion table, the logit gaps that justify the margins, and the
cost ratio. Usage: ``python benchmarks/verify_eval.py [--json FILE] [--no-smollm2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch
from conftest import make_tiny_gpt2, tiny_entry, write_registry

from engine.executor import ENGINE_VERSION, Engine
from engine.hashing import HASH_VERSION, result_hash
from engine.jobs import (
    ExecutionProfile,
    GenerationOutput,
    GenerationParams,
    Job,
    JobResult,
    Metrics,
)
from engine.loading import LoadedModel
from engine.pool import ModelPool
from engine.tasks.generation import encode_prompt
from engine.verify import (
    Verifier,
    apply_repetition_penalty,
    teacher_forced_logits,
)

TINY, TINY_B, SMOL = "tiny-gpt2", "tiny-gpt2-b", "smollm2-135m"
TINY_PROMPTS = ["Hello GPU", "The quick brown fox", "Paris is the capital of", "A miner runs",
                "Numbers: 0 1 2", "The end of the text", "Berlin is", "hello network",
                "Stop here.", "the engine meters each", "anyone can recompute", "the lazy dog"]
SMOL_PROMPTS = ["The capital of France is", "Once upon a time,", "def add(a, b):",
                "The three primary colors are", "Water boils at", "My favourite food is",
                "The largest planet in the solar system is", "To make tea, first"]
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
GREEDY_SETS = [p for p in PARAM_SETS if not p.get("temperature") and not p.get("stop")]
KINDS = ["replace_token", "truncate", "other_prompt", "other_model", "random_weights",
         "forged_hash"]


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
    wall = time.perf_counter() - started
    gen = out[0, len(ids):].tolist()
    finish = "eos" if gen and gen[-1] in eos else "length"
    output = GenerationOutput(text=loaded.tokenizer.decode(gen, skip_special_tokens=True),
                              token_ids=gen, finish_reason=finish)
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
          *, keep_hash: bool = False) -> JobResult:
    """A result claiming ``tokens`` for ``job``, made as consistent as a forger can make it:
    cut at the first EOS / stop string, an EOS appended when it ends early, text decoded the
    engine's way, and (unless ``keep_hash``) the hash recomputed with the honest digest."""
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
    output = GenerationOutput(text=text, token_ids=tokens, finish_reason=finish)
    assert honest.profile is not None and honest.metrics is not None
    digest = honest.profile.weights_digest
    return honest.model_copy(update={
        "output": output,
        "result_hash": honest.result_hash if keep_hash else result_hash(job, output, digest),
        "metrics": honest.metrics.model_copy(update={"completion_tokens": len(tokens)})})


# ------------------------------------------------------------------ the evaluation

class Eval:
    """Holds engines, the verifier and the tallies."""

    def __init__(self, registry: Path, rng: random.Random):
        self.registry = registry
        self.rng = rng
        self.pool = ModelPool(show_progress=False)
        self.verifier = Verifier(registry, pool=self.pool)
        self.engines: dict[tuple[str, str, int], Engine] = {}
        self.rows: list[dict[str, Any]] = []
        self.gaps: dict[str, list[float]] = defaultdict(list)   # honest greedy, in std units
        self.raw_gaps: dict[str, list[float]] = defaultdict(list)
        self.tamper_gaps: list[float] = []
        self.replay_gaps: dict[str, list[float]] = defaultdict(list)
        self.sampled_min_prob: list[float] = []
        self.objects: dict[str, tuple[Job, JobResult]] = {}

    def engine(self, weights: str = "pretrained", dtype: str = "float32",
               batch: int = 1) -> Engine:
        key = (weights, dtype, batch)
        if key not in self.engines:
            self.engines[key] = Engine(self.registry, devices=["cpu"], pool=self.pool,
                                       weights=weights,  # type: ignore[arg-type]
                                       dtype=dtype, batch_size=batch, batch_window_seconds=0.2)
        return self.engines[key]

    def loaded(self, model: str, dtype: str = "float32", weights: str = "pretrained"
               ) -> LoadedModel:
        spec = self.verifier.registry.get(model)
        got, _ = self.pool.get(spec, [self.verifier.device], weights=weights,  # type: ignore
                               dtype=dtype)
        return got

    def honest(self, label: str, job: Job, res: JobResult) -> None:
        tol = self.verifier.verify(job, res, mode="tolerant")
        integ = self.verifier.verify(job, res, mode="integrity")
        self.objects[job.job_id] = (job, res)
        self.rows.append({"group": "honest", "kind": label, "model": job.model,
                          "integrity": integ.accepted, "tolerant": tol.accepted,
                          "reasons": tol.reasons, "job_id": job.job_id,
                          "cost": tol.cost_seconds})
        if not job.params.greedy:
            if "max_replay_gap_in_margins" in tol.details:
                self.replay_gaps[label].append(tol.details["max_replay_gap_in_margins"]
                                               * self.verifier.tolerances.margin_sigma)
            if "min_token_probability" in tol.details:
                self.sampled_min_prob.append(tol.details["min_token_probability"])
            return
        # The gap of every claimed token to the argmax, in logits and in row std units.
        assert isinstance(res.output, GenerationOutput) and res.profile is not None
        ref = self.loaded(job.model, "float32", res.profile.weights)
        ids = encode_prompt(ref, job)
        with ref.lock:
            logits = teacher_forced_logits(ref, ids, res.output.token_ids)
        logits = apply_repetition_penalty(logits, ids, res.output.token_ids,
                                          job.params.repetition_penalty)
        target = torch.tensor(res.output.token_ids)[:, None]
        gap = logits.max(-1).values - logits.gather(1, target)[:, 0]
        self.raw_gaps[label].extend(gap.tolist())
        self.gaps[label].extend((gap / logits.std(-1)).tolist())

    def tampered(self, kind: str, job: Job, res: JobResult, position: int | None = None) -> None:
        integ = self.verifier.verify(job, res, mode="integrity")
        tol = self.verifier.verify(job, res, mode="tolerant")
        self.rows.append({"group": "tampered", "kind": kind, "model": job.model,
                          "integrity": integ.accepted, "tolerant": tol.accepted,
                          "reasons": tol.reasons, "job_id": job.job_id,
                          "first": tol.first_suspicious_token, "position": position,
                          "cost": tol.cost_seconds})

    def replaced_gap(self, job: Job, forged: JobResult, position: int) -> None:
        """The normalized gap at a substituted token (greedy jobs), for the margin table."""
        assert isinstance(forged.output, GenerationOutput)
        ref = self.loaded(job.model)
        ids = encode_prompt(ref, job)
        toks = forged.output.token_ids
        if position >= len(toks):
            return
        with ref.lock:
            logits = teacher_forced_logits(ref, ids, toks)
        logits = apply_repetition_penalty(logits, ids, toks, job.params.repetition_penalty)
        row = logits[position]
        self.tamper_gaps.append(float((row.max() - row[toks[position]]) / row.std()))


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
            if forged.output == res.output:
                continue   # the same output is no tamper
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


def run_model(ev: Eval, model: str, prompts: Sequence[str], per_prompt: int, batch: int,
              static_count: int, random_honest: bool, other: str, start: int) -> None:
    """Honest results under each profile, then one tamper per honest pretrained result."""
    t0 = time.perf_counter()
    jobs = make_jobs(model, prompts, PARAM_SETS, per_prompt, model)
    greedy = [j for j in jobs if j.params.greedy and not j.params.stop]
    tamper_source: list[tuple[Job, JobResult]] = []
    for dtype in ("float32", "bfloat16"):
        for b in (1, batch):
            precision = "fp32" if dtype == "float32" else "bf16"
            label = f"{precision} {'alone' if b == 1 else f'batch{b}'}"
            tagged = [j.model_copy(update={"job_id": f"{j.job_id}-{label}"}) for j in jobs]
            results = run_engine(ev.engine("pretrained", dtype, b), tagged)
            for j, r in zip(tagged, results, strict=True):
                ev.honest(label, j, r)
                tamper_source.append((j, r))
            print(f"  {model} {label}: {len(results)} results "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for dtype in ("float32", "bfloat16"):
        label = f"{'fp32' if dtype == 'float32' else 'bf16'} static-cache"
        loaded = ev.loaded(model, dtype)
        for j in greedy[:static_count]:
            tagged = j.model_copy(update={"job_id": f"{j.job_id}-{label}"})
            ev.honest(label, tagged, static_cache_result(loaded, tagged))
        print(f"  {model} {label}: {min(static_count, len(greedy))} results "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if random_honest:
        label = "random-weights"
        tagged = [j.model_copy(update={"job_id": f"{j.job_id}-{label}"}) for j in jobs]
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


# ------------------------------------------------------------------ printing

def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))] if s else float("nan")


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


def print_tables(ev: Eval, exact_rows: list[dict[str, Any]], cost: dict[str, Any] | None) -> bool:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    table = Table(title="confusion table (accepted / rejected by each mode)")
    for col in ("group", "kind", "model", "n", "integrity accepts", "integrity rejects",
                "tolerant accepts", "tolerant rejects"):
        table.add_column(col, justify="right" if col not in ("group", "kind", "model") else "left")
    keys = sorted({(r["group"], r["kind"], r["model"]) for r in ev.rows},
                  key=lambda k: (k[0], k[1], k[2]))
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
    h_ok = sum(r["tolerant"] for r in honest)
    t_rej = sum(not r["tolerant"] for r in bad)
    f_rej = sum(not r["integrity"] for r in forged)
    console.print(f"honest accepted by tolerant: {h_ok}/{len(honest)}; tampered rejected by "
                  f"tolerant: {t_rej}/{len(bad)} = {100 * t_rej / max(1, len(bad)):.2f} %; "
                  f"forged hashes caught by integrity: {f_rej}/{len(forged)}")
    for r in honest:
        if not r["tolerant"]:
            console.print(f"[red]honest rejected[/red] {r['job_id']}: {r['reasons']}")
    for r in bad:
        if r["tolerant"]:
            console.print(f"[yellow]tamper accepted[/yellow] {r['kind']} {r['job_id']}")

    gaps = Table(title="logit gap of each honest greedy token to the fp32 argmax "
                       "(teacher-forced, fp32 reference)")
    for col in ("profile", "tokens", "not argmax", "max gap (logits)", "max gap (row std)",
                "p99.9 gap (row std)"):
        gaps.add_column(col)
    for label in sorted(ev.gaps):
        g, raw = ev.gaps[label], ev.raw_gaps[label]
        gaps.add_row(label, str(len(g)), str(sum(x > 0 for x in raw)), f"{max(raw):.4f}",
                     f"{max(g):.4f}", f"{pct(g, 0.999):.4f}")
    if ev.tamper_gaps:
        gaps.add_row("substituted tokens", str(len(ev.tamper_gaps)), "-", "-",
                     f"min {min(ev.tamper_gaps):.3f}", f"p1 {pct(ev.tamper_gaps, 0.01):.3f}")
    console.print(gaps)
    if ev.replay_gaps:
        rep = Table(title="seeded replay: worst gap of an honest sampled token to the drawn "
                          "token (row std units)")
        rep.add_column("profile")
        rep.add_column("results")
        rep.add_column("max gap")
        for label in sorted(ev.replay_gaps):
            rep.add_row(label, str(len(ev.replay_gaps[label])), f"{max(ev.replay_gaps[label]):.4f}")
        console.print(rep)
        console.print(f"least probability of an honest sampled token: "
                      f"{min(ev.sampled_min_prob):.3g}")
    if exact_rows:
        ex = Table(title="exact mode on honest tiny results (bitwise, within one profile)")
        for col in ("profile", "n", "accepted"):
            ex.add_column(col)
        for label in sorted({r["kind"] for r in exact_rows}):
            rows = [r for r in exact_rows if r["kind"] == label]
            ex.add_row(label, str(len(rows)), str(sum(r["accepted"] for r in rows)))
        console.print(ex)
    if cost is not None:
        print_cost(cost)
    ok = (h_ok == len(honest) and t_rej >= 0.99 * len(bad) and f_rej == len(forged))
    if cost is not None:
        ok = ok and cost["ratio"] <= 0.1
    console.print("[bold green]PASS[/bold green]" if ok else "[bold red]FAIL[/bold red]")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-smollm2", action="store_true", help="tiny models only")
    parser.add_argument("--no-cost", action="store_true", help="skip the 128-token cost check")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--cost-only", action="store_true", help="only the cost check")
    parser.add_argument("--json", type=Path, default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="verify-eval-"))
    registry = write_registry(work / "models.yaml", {
        TINY: tiny_entry(make_tiny_gpt2(work / "tiny", seed=0)),
        TINY_B: tiny_entry(make_tiny_gpt2(work / "tiny-b", seed=1))})
    ev = Eval(registry, rng)
    if args.cost_only:
        cost = cost_check(ev)
        print_cost(cost)
        return 0 if cost["ratio"] <= 0.1 and cost["accepted"] else 1
    print("tiny models:", flush=True)
    run_model(ev, TINY, TINY_PROMPTS, per_prompt=4, batch=6, static_count=12,
              random_honest=True, other=TINY_B, start=0)
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
        print("smollm2-135m:", flush=True)
        run_model(ev, SMOL, SMOL_PROMPTS, per_prompt=2, batch=8, static_count=6,
                  random_honest=False, other=TINY, start=3)
    cost = None if args.no_smollm2 or args.no_cost else cost_check(ev)
    ok = print_tables(ev, exact_rows, cost)
    print(f"total time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": ev.rows, "cost": cost,
                                         "gaps": {k: max(v) for k, v in ev.gaps.items()}},
                                        indent=1, default=str))
    for eng in ev.engines.values():
        eng.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
