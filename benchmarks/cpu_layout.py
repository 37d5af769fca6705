"""CPU linear layers: decode step time with BLAS (two weight layouts) against the engine's kernel.

On the CPU the engine computes every linear layer with its row-invariant
kernel (`engine.kernels.rowgemm`), and where that cannot be built it keeps
torch's BLAS with the weights stored input-major
(`engine.loading.lay_linear_weights_input_major`). This script measures both
choices: on one loaded model it times one decode step (KV cache filled by a
prompt of ``--context`` tokens) at several batch sizes with

* ``blas-out``: BLAS, weights output-major, as checkpoints ship them;
* ``blas-in``: BLAS, weights input-major (the fallback);
* ``kernel``: the row-invariant kernel (the default),

taking the three in turn round by round so that a noisy machine hurts all
alike. It prints the best step time of each, the kernel's speed-up over
``blas-in``, each one's step cost against its own batch of 1, and whether
every batch row's greedy tokens equal that prompt's tokens decoded alone.

    python benchmarks/cpu_layout.py [--model smollm2-135m] [--batches 1,4,8,16]
                                    [--rounds 3] [--steps 10] [--context 24]
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
import time
from typing import Any

import torch

from engine import Engine
from engine.kernels.rowgemm import hand_threads_to_kernel, kernel_status, pack_linear_layers
from engine.loading import lay_linear_weights_input_major
from engine.tasks.generation import _cache_argument


def set_layout(model: torch.nn.Module, input_major: bool) -> None:
    """Lay every Linear weight input-major (as the engine does) or output-major (contiguous)."""
    if input_major:
        lay_linear_weights_input_major(model)
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()


def step_seconds(model: Any, ids: torch.Tensor, steps: int) -> tuple[float, list[list[int]]]:
    """Best single decode-step time for the prompts ``ids``, and each row's greedy tokens."""
    from transformers import DynamicCache

    best = float("inf")
    steps_tokens: list[list[int]] = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, **{_cache_argument(model): cache}, use_cache=True)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        for _ in range(steps):
            began = time.perf_counter()
            out = model(input_ids=nxt, **{_cache_argument(model): cache}, use_cache=True)
            best = min(best, time.perf_counter() - began)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            steps_tokens.append(nxt.reshape(-1).tolist())
    return best, [list(row) for row in zip(*steps_tokens, strict=True)]


WAYS = ("blas-out", "blas-in", "kernel")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--context", type=int, default=24)
    args = parser.parse_args()
    batches = sorted({int(b) for b in args.batches.split(",")} | {1})
    status = kernel_status()
    if not status.available:
        print(f"the kernel is not available here: {status.reason}")
        return 1
    os.environ["AITBC_ENGINE_LINEAR"] = "blas"  # the engine loads the BLAS model; we pack a copy
    with Engine(devices=["cpu"], weights=args.weights) as engine:
        blas_model = engine.load(args.model).model
        kernel_model = copy.deepcopy(blas_model)
        pack_linear_layers(kernel_model, respect_setting=False)
        prompts = torch.randint(0, 1000, (max(batches), args.context),
                                generator=torch.Generator().manual_seed(0))
        best: dict[tuple[str, int], float] = {}
        tokens: dict[tuple[str, int], list[list[int]]] = {}
        alone: dict[str, list[list[int]]] = {}

        def model_for(way: str) -> Any:
            if way != "kernel":
                set_layout(blas_model, way == "blas-in")
            return kernel_model if way == "kernel" else blas_model

        def measure(way: str, with_alone: bool) -> None:
            model = model_for(way)
            if way == "kernel":  # as the engine's batch threads do (see hand_threads_to_kernel)
                hand_threads_to_kernel()
            for b in batches:
                s, toks = step_seconds(model, prompts[:b], args.steps)
                best[(way, b)] = min(best.get((way, b), float("inf")), s)
                tokens[(way, b)] = toks
            if with_alone:
                alone[way] = [step_seconds(model, prompts[i:i + 1], args.steps)[1][0]
                              for i in range(max(batches))]

        for round_ in range(args.rounds):
            for way in WAYS:  # each way in a fresh thread, like each engine batch
                worker = threading.Thread(target=measure, args=(way, round_ == args.rounds - 1))
                worker.start()
                worker.join()
    print(f"{args.model}, decode step after {args.context} tokens, best of "
          f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads")
    print("| batch | blas-out ms | blas-in ms | kernel ms | kernel speed-up over blas-in "
          "| step vs batch 1: blas-in / kernel | rows equal alone: blas-out / blas-in / kernel |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        cells = [f"{best[(way, b)] * 1e3:.1f}" for way in WAYS]
        speed_up = best[("blas-in", b)] / best[("kernel", b)]
        cost = " / ".join(f"{best[(way, b)] / best[(way, 1)]:.2f}" for way in ("blas-in", "kernel"))
        equal = " / ".join(
            f"{sum(row == alone[way][i] for i, row in enumerate(tokens[(way, b)]))}/{b}"
            for way in WAYS)
        print(f"| {b} | {' | '.join(cells)} | {speed_up:.2f} | {cost} | {equal} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
