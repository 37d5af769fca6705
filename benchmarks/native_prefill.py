"""Prefill of the native dtype: the fused C pass against transformers' forward and float32.

The native dtype prefills in the engine's fused pass (``decode: fused-step/2``): the
block products as before, with attention and everything between the products in
``decoder.c``. Before, the prefill was transformers' forward with block layers,
which ``--decode dynamic`` still runs. This script times the prefill of the three,
side by side in one process, on ``smollm2-135m``:

- ``fused``: ``Engine(dtype="native")`` (the engine's own model);
- ``forward``: ``Engine(dtype="native", decode="dynamic")`` (transformers' model
  on the same blocks: the prefill of the last version);
- ``fp32``: ``Engine(dtype="float32")``.

Each job is one prompt of N tokens (random ids, the same for all three) with
``max_tokens=1``, so its time to first token is its tokenizing-free prefill plus
one token choice. Rounds interleave the systems, so a noisy machine hurts all
alike; the script prints, per prompt length, the median time to first token of
each system and the ratios fused/forward and fused/fp32 (below 1: the fused
prefill is faster), and whether the three chose the same first token.

    python benchmarks/native_prefill.py [--lengths 16,128,512,1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from typing import Any

MODEL = "smollm2-135m"
SYSTEMS = {"fused": {"dtype": "native"},
           "forward": {"dtype": "native", "decode": "dynamic"},
           "fp32": {"dtype": "float32"}}


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    draw = random.Random(seed)
    return [draw.randrange(17, vocab) for _ in range(length)]  # past the special tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="16,128,512,1024",
                        help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (medians)")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]

    from engine import Engine
    from engine.jobs import GenerationOutput

    engines = {name: Engine(devices=["cpu"], batch_size=1, **options)  # type: ignore[arg-type]
               for name, options in SYSTEMS.items()}
    try:
        for engine in engines.values():
            engine.load(MODEL)
        vocab = int(engines["fused"].load(MODEL).model.config.vocab_size)
        times: dict[tuple[str, int], list[float]] = {}
        first: dict[tuple[str, int], int] = {}
        for round_index in range(args.repeats + 1):  # round 0 warms up
            for length in lengths:
                job: dict[str, Any] = {"task": "text-generation", "model": MODEL,
                                       "prompt_token_ids": _prompt(length, vocab, length),
                                       "params": {"max_tokens": 1}}
                for name, engine in engines.items():
                    result = engine.run(job)
                    if not result.ok:
                        print(f"{name}, {length} tokens: {result.error}", file=sys.stderr)
                        return 1
                    assert isinstance(result.output, GenerationOutput)
                    assert result.metrics is not None and result.metrics.ttft_seconds is not None
                    first[name, length] = result.output.token_ids[0]
                    if round_index:
                        times.setdefault((name, length), []).append(
                            result.metrics.ttft_seconds)
    finally:
        for engine in engines.values():
            engine.close()

    print(f"prefill of {MODEL}, time to first token, medians of {args.repeats} rounds")
    print("| prompt tokens | fused | forward | fp32 | fused/forward | fused/fp32 | same token |")
    print("|---|---|---|---|---|---|---|")
    for length in lengths:
        median = {name: statistics.median(times[name, length]) for name in SYSTEMS}
        same = len({first[name, length] for name in SYSTEMS}) == 1
        print(f"| {length} | {1000 * median['fused']:.1f} ms | {1000 * median['forward']:.1f} ms"
              f" | {1000 * median['fp32']:.1f} ms | {median['fused'] / median['forward']:.2f}"
              f" | {median['fused'] / median['fp32']:.2f} | {'yes' if same else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
