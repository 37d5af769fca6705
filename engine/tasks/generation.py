"""Text generation: run one job, or a batch of jobs, on a loaded causal LM.

The decode loop is the engine's own (prefill, then one token per step with a
dynamic KV cache), so that each row keeps its own parameters, its own seeded
sampler, its own stop rule and its own token timestamps, and so that a row
that finished leaves the batch and stops costing work.

Semantics of the output: ``token_ids`` are the generated ids, including the
EOS id when the model ended with one and the token that completed a stop
string; ``text`` is their decoding without special tokens, cut before the
first stop string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from engine.errors import ContextLengthError, InvalidJobError, JobCancelledError, JobTimeoutError
from engine.hashing import effective_seed
from engine.jobs import GenerationOutput, GenerationParams, Job
from engine.loading import LoadedModel
from engine.metering import MeterWindow

NO_DEADLINE = float("inf")


@dataclass
class GenerationRequest:
    """One job in a decode batch, with its window, deadline and cancel flag."""

    job: Job
    window: MeterWindow | None = None
    deadline: float = NO_DEADLINE  # time.monotonic() value
    cancelled: Callable[[], bool] = lambda: False
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class _Row:
    request: GenerationRequest
    params: GenerationParams
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    finish: Literal["eos", "stop", "length"] | None = None
    text: str = ""
    error: Exception | None = None
    seen: torch.Tensor | None = None  # token ids for the repetition penalty


def encode_prompt(loaded: LoadedModel, job: Job) -> list[int]:
    """The prompt's token ids, checked against the vocabulary and the context length."""
    if job.prompt_token_ids is not None:
        ids = list(job.prompt_token_ids)
        vocab = int(loaded.model.config.vocab_size)
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise InvalidJobError(f"prompt_token_ids holds id {bad[0]}, outside the model's "
                                  f"vocabulary of {vocab}", field="prompt_token_ids")
    else:
        try:
            ids = list(loaded.tokenizer(job.prompt, add_special_tokens=True)["input_ids"])
        except Exception as exc:
            raise InvalidJobError(f"the tokenizer could not encode the prompt: {exc}",
                                  field="prompt") from exc
        if not ids:
            raise InvalidJobError("the prompt encodes to no tokens", field="prompt")
    limit = loaded.spec.context_length
    if job.params.max_tokens >= limit:
        raise ContextLengthError(
            f"max_tokens {job.params.max_tokens} is not below {loaded.spec.name}'s context "
            f"length of {limit} tokens", field="max_tokens")
    if len(ids) + job.params.max_tokens > limit:
        raise ContextLengthError(
            f"prompt ({len(ids)} tokens) plus max_tokens ({job.params.max_tokens}) exceeds "
            f"{loaded.spec.name}'s context length of {limit} tokens; shorten the prompt or "
            f"lower max_tokens to at most {max(0, limit - len(ids))}", field="prompt")
    return ids


def _make_generator(job: Job) -> torch.Generator | None:
    seed = effective_seed(job)
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _pick(row: _Row, logits: torch.Tensor) -> int:
    """Choose the row's next token from its float32 logits (1-D, on any device)."""
    p = row.params
    if p.repetition_penalty != 1.0 and row.seen is not None:
        seen = row.seen.to(logits.device)
        scores = logits.gather(0, seen)
        scores = torch.where(scores < 0, scores * p.repetition_penalty,
                             scores / p.repetition_penalty)
        logits = logits.scatter(0, seen, scores)
    if p.greedy:
        return int(torch.argmax(logits).item())
    logits = logits.to("cpu") / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= (1.0 - p.top_p)
        drop[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=row.generator).item())


def _accepts(model: Any, keyword: str) -> bool:
    import inspect

    return keyword in inspect.signature(model.forward).parameters


def _cache_argument(model: Any) -> str:
    """The forward keyword for the KV cache: ``cache`` in newer transformers, else the old name."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _check_stop(row: _Row, tokenizer: Any, eos: set[int]) -> None:
    last = row.generated[-1]
    if last in eos:
        row.finish = "eos"
    stops = row.params.stop
    if stops:
        text = tokenizer.decode(row.generated, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            row.finish = "stop"
            row.text = text[:cut]
            return
    if row.finish is None and len(row.generated) >= row.params.max_tokens:
        row.finish = "length"


def _check_alive(rows: Sequence[_Row]) -> None:
    now = time.monotonic()
    for row in rows:
        if row.error is not None or row.finish is not None:
            continue
        if row.request.cancelled():
            row.error = JobCancelledError(f"job {row.request.job.job_id} was cancelled")
        elif now > row.request.deadline:
            row.error = JobTimeoutError(f"job {row.request.job.job_id} passed its time limit "
                                        f"after {len(row.generated)} tokens")


def generate(loaded: LoadedModel, requests: Sequence[GenerationRequest]
             ) -> list[GenerationOutput | Exception]:
    """Run generation jobs together as one left-padded batch; one outcome per request.

    Each request's ``prompt_ids`` must be set (see :func:`encode_prompt`) and its
    window started. An outcome is the output, or the exception that ended that
    row (timeout, cancellation); other rows go on.
    """
    model, tokenizer = loaded.model, loaded.tokenizer
    device = loaded.input_device
    eos = loaded.eos_token_ids()
    rows = [_Row(r, r.job.params, _make_generator(r.job)) for r in requests]
    for row in rows:
        if row.params.repetition_penalty != 1.0:
            row.seen = torch.tensor(row.request.prompt_ids, dtype=torch.long)
    _check_alive(rows)
    vocab = int(model.config.vocab_size)
    pad = next((e for e in sorted(eos) if e < vocab), 0)  # any in-vocabulary id; masked out
    width = max(len(r.request.prompt_ids) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.request.prompt_ids)
        ids[i, width - n:] = torch.tensor(row.request.prompt_ids, dtype=torch.long)
        mask[i, width - n:] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    active = [i for i, r in enumerate(rows) if r.error is None]
    if len(active) < len(rows):
        keep = torch.tensor(active, dtype=torch.long, device=device)
        ids, mask, positions = ids[keep], mask[keep], positions[keep]

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache_arg = _cache_argument(model)
    # Only the last position's logits are needed: skip the LM head elsewhere in prefill.
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    step_input, step_positions = ids, positions
    with torch.inference_mode():
        while active:
            # The cache object is filled in place by each forward pass.
            out = model(input_ids=step_input, attention_mask=mask, position_ids=step_positions,
                        use_cache=True, **{cache_arg: cache}, **last_only)
            logits = out.logits[:, -1, :].float()
            chosen = [_pick(rows[i], logits[j]) for j, i in enumerate(active)]
            for i, token in zip(active, chosen, strict=True):
                row = rows[i]
                row.generated.append(token)
                if row.request.window is not None:
                    row.request.window.token()
                if row.seen is not None:
                    row.seen = torch.cat([row.seen, torch.tensor([token])])
                _check_stop(row, tokenizer, eos)
            _check_alive([rows[i] for i in active])
            for i in active:
                row = rows[i]
                if (row.finish or row.error) and row.request.window is not None:
                    row.request.window.stop()
            still = [j for j, i in enumerate(active)
                     if rows[i].finish is None and rows[i].error is None]
            if not still:
                break
            if len(still) < len(active):
                keep = torch.tensor(still, dtype=torch.long, device=device)
                cache.batch_select_indices(keep)
                mask = mask[keep]
                step_positions_prev = (step_positions[keep])[:, -1:]
                chosen = [chosen[j] for j in still]
                active = [active[j] for j in still]
            else:
                step_positions_prev = step_positions[:, -1:]
            step_input = torch.tensor(chosen, dtype=torch.long, device=device).unsqueeze(-1)
            mask = torch.cat([mask, torch.ones_like(step_input)], dim=-1)
            step_positions = step_positions_prev + 1

    outcomes: list[GenerationOutput | Exception] = []
    for row in rows:
        if row.error is not None:
            outcomes.append(row.error)
            continue
        text = row.text if row.finish == "stop" else tokenizer.decode(
            row.generated, skip_special_tokens=True)
        outcomes.append(GenerationOutput(text=text, token_ids=row.generated,
                                         finish_reason=row.finish or "length"))
    return outcomes
