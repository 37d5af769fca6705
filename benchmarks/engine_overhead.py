"""Engine overhead: Engine.run against transformers' generate on the same model, side by side.

Same loaded model, prompt and parameters (greedy, N new tokens); the two are
interleaved so that machine noise hits both alike, and each raw call runs on a
fresh thread as each engine batch does (on a busy machine, OpenMP's thread
team behaves differently in the main or a long-lived thread, which would skew
the ratio). Prints the median wall time
of each and the ratio engine / raw (target <= 1.05 at 32 new tokens on
smollm2-135m on the CPU).

    python benchmarks/engine_overhead.py [--model smollm2-135m] [--new-tokens 32] [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from engine import Engine
from engine.jobs import GenerationOutput

PROMPT = "The history of the Roman Empire is"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    args = parser.parse_args()

    with Engine(devices=["cpu"], weights=args.weights) as engine:
        loaded = engine.load(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        job = {"task": "text-generation", "model": args.model, "prompt": PROMPT,
               "params": {"max_tokens": args.new_tokens}}
        inputs = tokenizer(PROMPT, return_tensors="pt")

        def raw() -> list[int]:
            box: list[list[int]] = []
            thread = threading.Thread(target=lambda: box.append(raw_on_thread()))
            thread.start()
            thread.join()
            return box[0]

        def raw_on_thread() -> list[int]:
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False,
                                     min_new_tokens=args.new_tokens,
                                     pad_token_id=next(iter(loaded.eos_token_ids()), 0))
            return out[0, inputs["input_ids"].shape[1]:].tolist()

        def ours() -> list[int]:
            result = engine.run(job)
            assert result.ok and isinstance(result.output, GenerationOutput), result.error
            return result.output.token_ids

        for _ in range(2):  # warm-up, not measured
            raw(), ours()
        raw_times, engine_times = [], []
        for _ in range(args.runs):
            for fn, sink in ((raw, raw_times), (ours, engine_times)):
                started = time.perf_counter()
                tokens = fn()
                sink.append(time.perf_counter() - started)
            assert len(tokens) == args.new_tokens
        same = raw() == ours()

    raw_med, eng_med = statistics.median(raw_times), statistics.median(engine_times)
    ratio = eng_med / raw_med
    print(f"model {args.model} ({args.weights}), {args.new_tokens} new tokens, greedy, CPU, "
          f"{args.runs} interleaved runs each after 2 warm-ups")
    print(f"transformers generate: median {raw_med * 1000:8.1f} ms  "
          f"({args.new_tokens / raw_med:6.1f} tokens/s)")
    print(f"Engine.run:            median {eng_med * 1000:8.1f} ms  "
          f"({args.new_tokens / eng_med:6.1f} tokens/s)")
    print(f"ratio engine/raw: {ratio:.3f}  (target <= 1.05); same tokens: {same}")
    return 0 if ratio <= 1.05 and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
