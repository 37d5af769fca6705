"""CPU weight layout: decode step time with Linear weights output-major against input-major.

The engine stores every ``nn.Linear`` weight input-major on the CPU
(`engine.loading.lay_linear_weights_input_major`). This script measures why:
on the same loaded model it times one decode step (KV cache filled by a
prompt of ``--context`` tokens) at several batch sizes with the weights laid
output-major (as checkpoints ship them) and input-major, alternating the two
layouts round by round so that a noisy machine hurts both alike. It prints the
best step time of each, their ratio, and whether the greedy next tokens agree.

    python benchmarks/cpu_layout.py [--model smollm2-135m] [--batches 1,4,8,16]
                                    [--rounds 3] [--steps 10] [--context 24]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch

from engine import Engine
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


def step_seconds(model: Any, batch: int, context: int, steps: int
                 ) -> tuple[float, list[int]]:
    """Best single decode-step time at ``batch`` rows, and the greedy tokens of the last step."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 1000, (batch, context), generator=gen)
    best = float("inf")
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, **{_cache_argument(model): cache}, use_cache=True)
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        for _ in range(steps):
            began = time.perf_counter()
            out = model(input_ids=nxt, **{_cache_argument(model): cache}, use_cache=True)
            best = min(best, time.perf_counter() - began)
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
    return best, nxt.reshape(-1).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--context", type=int, default=24)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with Engine(devices=["cpu"], weights=args.weights) as engine:
        model = engine.load(args.model).model
        best: dict[tuple[bool, int], float] = {}
        tokens: dict[tuple[bool, int], list[int]] = {}

        def measure() -> None:  # a fresh thread: OpenMP there is not slowed by the caller's state
            for _ in range(args.rounds):
                for input_major in (False, True):
                    set_layout(model, input_major)
                    for b in batches:
                        s, toks = step_seconds(model, b, args.context, args.steps)
                        key = (input_major, b)
                        best[key] = min(best.get(key, float("inf")), s)
                        tokens[key] = toks
            set_layout(model, True)

        worker = threading.Thread(target=measure)
        worker.start()
        worker.join()
    print(f"{args.model}, decode step after {args.context} tokens, best of "
          f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads")
    print("| batch | output-major ms | input-major ms | speed-up | tok/s input-major "
          "| step vs batch 1 | same tokens |")
    print("|---|---|---|---|---|---|---|")
    one = best[(True, batches[0])]
    for b in batches:
        out_major, in_major = best[(False, b)], best[(True, b)]
        print(f"| {b} | {out_major * 1e3:.1f} | {in_major * 1e3:.1f} | "
              f"{out_major / in_major:.2f} | {b / in_major:.1f} | {in_major / one:.2f} | "
              f"{'yes' if tokens[(False, b)] == tokens[(True, b)] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
