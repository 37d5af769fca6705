"""The fast single-stream decode path: a static KV cache, compiled with CUDA graphs on GPUs.

transformers' own ``generate`` with ``cache_implementation="static"`` keeps
the KV cache at a fixed size, so the per-token forward pass has fixed shapes;
on CUDA it then compiles that forward pass with ``torch.compile`` in
``reduce-overhead`` mode, which replays it as a CUDA graph and removes most of
the per-kernel launch cost that dominates small-batch decode. On the CPU the
same call runs the static cache uncompiled (no graphs to gain there), which
is how this path is tested on machines without a GPU.

The job's semantics are the engine's own: a logits processor takes each
token's timestamp (its first call marks the end of prefill), a stopping
criterion honours stop strings, cancellation and the deadline, and the output
is cut by the same rule as the dynamic path (``generation._check_stop``).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from engine.errors import JobCancelledError, JobTimeoutError
from engine.hashing import effective_seed
from engine.jobs import GenerationOutput
from engine.loading import LoadedModel
from engine.tasks.generation import GenerationRequest, _check_stop, _Row


def decode_label(loaded: LoadedModel) -> str:
    """What the profile records for this path on the model's device."""
    return "static-cache+cuda-graphs" if loaded.devices[0].kind == "cuda" else "static-cache"


def generate_static(loaded: LoadedModel, request: GenerationRequest) -> GenerationOutput:
    """Run one generation job on the static-cache path (compiled on CUDA)."""
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )

    job, params = request.job, request.job.params
    eos = loaded.eos_token_ids()
    tokenizer = loaded.tokenizer
    prompt_len = len(request.prompt_ids)
    row = _Row(request, params, None)
    problem: list[Exception] = []

    class _Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if request.window is not None:
                request.window.token()
            return scores

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor,
                     **kwargs: Any) -> torch.Tensor:
            row.generated = input_ids[0, prompt_len:].tolist()
            _check_stop(row, tokenizer, eos)
            if request.cancelled():
                problem.append(JobCancelledError(f"job {job.job_id} was cancelled"))
            elif time.monotonic() > request.deadline:
                problem.append(JobTimeoutError(f"job {job.job_id} passed its time limit after "
                                               f"{len(row.generated)} tokens"))
            done = row.finish is not None or bool(problem)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=loaded.input_device)
    sampling: dict[str, Any] = {"do_sample": False}
    if not params.greedy:
        sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                    "top_k": params.top_k or None}
    seed = effective_seed(job)
    devices = [d.index for d in loaded.devices if d.kind == "cuda" and d.index is not None]
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        if seed is not None:
            torch.manual_seed(seed)
        loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
            repetition_penalty=params.repetition_penalty, cache_implementation="static",
            eos_token_id=sorted(eos) or None, pad_token_id=next(iter(sorted(eos)), 0),
            logits_processor=LogitsProcessorList([_Clock()]),
            stopping_criteria=StoppingCriteriaList([_Stop()]), **sampling)
    if problem:
        raise problem[0]
    text = row.text if row.finish == "stop" else tokenizer.decode(row.generated,
                                                                  skip_special_tokens=True)
    return GenerationOutput(text=text, token_ids=row.generated,
                            finish_reason=row.finish or "length")
