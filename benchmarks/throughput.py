"""Throughput: the engine batched against the engine one job at a time, side by side.

For each new-token count and each concurrency level c, the same fixed set of
prompts (64 by default, all different) runs twice through `Engine`:

* one at a time (`batch_size=1`): every job alone, run again right before each
  batched run so that both see the same state of a shared, noisy machine
  (``--alone-once`` measures it once per new-token count instead). The latency
  a job would see when c clients share one slot is replayed from the measured
  job times (first-in, first-out), for the same arrival pattern;
* batched (`batch_size=c`), with one of two arrival patterns (``--arrival``):

  - ``closed`` (default): c clients, each submitting its next prompt the moment
    its last result came back, as miners' clients and the coordinator's job
    feed do. A finished row's place in the running batch goes to the next job
    between two decode steps;
  - ``burst``: the prompts arrive in groups of c at once and the next group
    only after the whole group is answered, so rows that end early leave the
    batch smaller until the group's longest job ends.

  Latency is submit to result.

Prints aggregate output tokens/s for both, their ratio, p50/p99 job latency,
and the agreement rate: the fraction of jobs whose batched tokens (and so
result hash) equal the one-at-a-time tokens, naming the prompts that differ.

    python benchmarks/throughput.py [--model smollm2-135m] [--concurrency 1,2,4,8,16]
                                    [--new-tokens 32,128] [--prompts 64]
                                    [--prompt-set completion|questions]
                                    [--arrival closed|burst] [--repeats R] [--alone-once]
                                    [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from typing import Any

from engine import Engine
from engine.jobs import GenerationOutput, JobResult

SUBJECTS = ["the ocean", "a GPU", "Paris", "bread", "the moon", "a violin", "winter", "rivers",
            "chess", "a lighthouse", "bees", "the printing press"]
# Text to continue: a base model writes on to the token limit, so the run measures
# decoding. (With the question set, smollm2-135m ends 19 of 48 jobs with EOS as
# its first token, which measures prefill instead.)
COMPLETION_FRAMES = ["Here is a short story about {}. Once upon a time,",
                     "A few facts about {}: first,", "My favourite memory of {} is when",
                     "If you have never seen {}, imagine", "The history of {} begins",
                     "The most interesting thing about {} is",
                     "Scientists who study {} have found that", "Everyone should know that {}"]
QUESTION_FRAMES = ["Tell me about {}.", "Write one sentence about {}.",
                   "What is special about {}?", "Describe {} to a child.",
                   "List three facts about {}.", "Why do people love {}?"]
PROMPT_SETS = {"completion": COMPLETION_FRAMES, "questions": QUESTION_FRAMES}


def prompts(count: int, prompt_set: str = "completion") -> list[str]:
    """``count`` different prompts from ``prompt_set``, the same on every run."""
    pool = [f.format(s) for f, s in itertools.product(PROMPT_SETS[prompt_set], SUBJECTS)]
    if count > len(pool):
        raise SystemExit(f"at most {len(pool)} prompts in the {prompt_set!r} set")
    return pool[:count]


def _job(model: str, prompt: str, new_tokens: int) -> dict[str, Any]:
    return {"task": "text-generation", "model": model, "prompt": prompt,
            "params": {"max_tokens": new_tokens, "temperature": 0.0}}


def _tokens(result: JobResult) -> list[int]:
    assert result.ok and isinstance(result.output, GenerationOutput), result.error
    return result.output.token_ids


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def one_at_a_time(engine: Engine, model: str, texts: list[str], new_tokens: int
                  ) -> tuple[list[list[int]], list[float]]:
    """Each job alone; returns tokens and execution seconds per job."""
    tokens, seconds = [], []
    for text in texts:
        started = time.perf_counter()
        result = engine.run(_job(model, text, new_tokens))
        seconds.append(time.perf_counter() - started)
        tokens.append(_tokens(result))
    return tokens, seconds


def batched(engine: Engine, model: str, texts: list[str], new_tokens: int, c: int
            ) -> tuple[list[list[int]], list[float], float, list[int]]:
    """Groups of c submitted at once; returns tokens, latencies, wall and batch sizes seen."""
    tokens: list[list[int]] = []
    latencies: list[float] = []
    sizes: list[int] = []
    wall = 0.0
    for start in range(0, len(texts), c):
        group = texts[start:start + c]
        began = time.perf_counter()
        handles = [(engine.submit(_job(model, t, new_tokens)), time.perf_counter())
                   for t in group]
        for handle, submitted in handles:
            result = handle.result()
            latencies.append(time.perf_counter() - submitted)
            tokens.append(_tokens(result))
            assert result.profile is not None
            sizes.append(result.profile.batch_size)
        wall += time.perf_counter() - began
    return tokens, latencies, wall, sizes


def closed_loop(engine: Engine, model: str, texts: list[str], new_tokens: int, c: int
                ) -> tuple[list[list[int]], list[float], float, list[int]]:
    """c clients, each submitting its next prompt when its last result is back."""
    tokens: list[list[int]] = [[] for _ in texts]
    latencies: list[float] = []
    sizes: list[int] = []
    lock = threading.Lock()
    taken = itertools.count()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while (i := next(taken)) < len(texts):
                submitted = time.perf_counter()
                result = engine.submit(_job(model, texts[i], new_tokens)).result()
                latency = time.perf_counter() - submitted
                assert result.profile is not None
                with lock:
                    tokens[i] = _tokens(result)
                    latencies.append(latency)
                    sizes.append(result.profile.batch_size)
        except BaseException as exc:  # surfaced below, not lost in a thread
            errors.append(exc)

    began = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(c)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    if errors:
        raise errors[0]
    return tokens, latencies, time.perf_counter() - began, sizes


def replay_queue(seconds: list[float], c: int, arrival: str) -> list[float]:
    """Latency of each job when c clients share one slot that serves jobs in order.

    ``burst``: groups of c arrive together. ``closed``: the k-th job to finish
    sends job k + c in at that moment.
    """
    out: list[float] = []
    if arrival == "burst":
        for start in range(0, len(seconds), c):
            waited = 0.0
            for s in seconds[start:start + c]:
                waited += s
                out.append(waited)
        return out
    finish: list[float] = []
    for j, s in enumerate(seconds):
        submitted = finish[j - c] if j >= c else 0.0
        finish.append((finish[-1] if finish else 0.0) + s)
        out.append(finish[-1] - submitted)
    return out


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"devices": ["cpu"], "weights": args.weights, "dtype": args.dtype}


def measure(alone: Engine, args: argparse.Namespace, texts: list[str], new_tokens: int, c: int,
            solo_tokens: list[list[int]], solo_seconds: list[float]) -> dict[str, Any]:
    """The batched run at concurrency c, against the one-at-a-time run just measured."""
    # The same pool: both engines run the very same weights in memory.
    with Engine(**_engine_options(args), pool=alone.pool, batch_size=c,
                batch_window_seconds=args.window) as eng:
        eng.run(_job(args.model, texts[0], 4))
        run = closed_loop if args.arrival == "closed" else batched
        b_tokens, b_lat, b_wall, sizes = run(eng, args.model, texts, new_tokens, c)
    solo_rate = sum(map(len, solo_tokens)) / sum(solo_seconds)
    rate = sum(map(len, b_tokens)) / b_wall
    same = [a == b for a, b in zip(solo_tokens, b_tokens, strict=True)]
    q_lat = replay_queue(solo_seconds, c, args.arrival)
    return {
        "new_tokens": new_tokens, "concurrency": c, "jobs": len(texts),
        "arrival": args.arrival, "prompt_set": args.prompt_set,
        "mean_new_tokens": statistics.mean(map(len, b_tokens)),
        "alone_tokens_per_s": solo_rate, "batched_tokens_per_s": rate,
        "ratio": rate / solo_rate,
        "alone_p50_s": statistics.median(q_lat), "alone_p99_s": _pct(q_lat, 99),
        "batched_p50_s": statistics.median(b_lat), "batched_p99_s": _pct(b_lat, 99),
        "agreement": sum(same) / len(same), "mean_batch": statistics.mean(sizes),
        "differing_prompts": [t for t, ok in zip(texts, same, strict=True) if not ok],
    }


def _print_row(r: dict[str, Any]) -> None:
    print(f"new={r['new_tokens']:4d} c={r['concurrency']:3d} #{r['repeat']}"
          f"  alone {r['alone_tokens_per_s']:7.1f} tok/s"
          f"  batched {r['batched_tokens_per_s']:7.1f} tok/s  x{r['ratio']:5.2f}"
          f"  p50/p99 alone {r['alone_p50_s']:6.2f}/{r['alone_p99_s']:6.2f} s"
          f"  batched {r['batched_p50_s']:6.2f}/{r['batched_p99_s']:6.2f} s"
          f"  agree {r['agreement']:6.1%}  mean job batch {r['mean_batch']:.1f}"
          f"  mean new tokens {r['mean_new_tokens']:.1f}", flush=True)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (new tokens, concurrency): the repeat with the median ratio, all ratios
    listed (``ratio a / b / c``), and the lowest agreement over the repeats."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["new_tokens"], r["concurrency"]), []).append(r)
    out = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["ratio"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["ratios"] = " / ".join(f"{r['ratio']:.2f}" for r in group)
        if len(group) > 1:
            median["ratios"] += f" (median {median['ratio']:.2f})"
        median["agreement"] = min(r["agreement"] for r in group)
        out.append(median)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--new-tokens", default="32,128")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-set", default="completion", choices=sorted(PROMPT_SETS),
                        help="text to continue (runs to the token limit) or questions")
    parser.add_argument("--arrival", default="closed", choices=["closed", "burst"],
                        help="how the batched run's jobs arrive (see above)")
    parser.add_argument("--window", type=float, default=0.05, help="batch gathering window (s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each (alone, batched) pair this many times; the table "
                             "shows every ratio and the median")
    parser.add_argument("--alone-once", action="store_true",
                        help="time the one-at-a-time run once per new-token count (faster, "
                             "but the ratio then spans minutes of machine noise)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    lengths = [int(x) for x in args.new_tokens.split(",")]
    texts = prompts(args.prompts, args.prompt_set)
    rows: list[dict[str, Any]] = []
    with Engine(**_engine_options(args)) as alone:
        alone.run(_job(args.model, texts[0], 4))  # load and warm up, not measured
        for new_tokens in lengths:
            solo_tokens, solo_seconds = one_at_a_time(alone, args.model, texts, new_tokens)
            for n, c in enumerate(levels):
                for rep in range(args.repeats):
                    if (n or rep) and not args.alone_once:
                        again, solo_seconds = one_at_a_time(alone, args.model, texts, new_tokens)
                        if again != solo_tokens:
                            raise SystemExit("one-at-a-time tokens changed between runs")
                    rows.append(measure(alone, args, texts, new_tokens, c, solo_tokens,
                                        solo_seconds))
                    rows[-1]["repeat"] = rep
                    _print_row(rows[-1])
    print()
    print(f"{args.model}, {args.weights} weights, arrival {args.arrival}, {len(texts)} "
          f"{args.prompt_set} prompts")
    print("| new tokens | concurrent | alone tok/s | batched tok/s | ratio | alone p50/p99 s "
          "| batched p50/p99 s | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary(rows):
        print(f"| {r['new_tokens']} | {r['concurrency']} | {r['alone_tokens_per_s']:.1f} | "
              f"{r['batched_tokens_per_s']:.1f} | {r['ratios']} | {r['alone_p50_s']:.2f}/"
              f"{r['alone_p99_s']:.2f} | {r['batched_p50_s']:.2f}/{r['batched_p99_s']:.2f} | "
              f"{r['agreement']:.1%} |")
    for r in rows:
        if r["differing_prompts"]:
            print(f"new={r['new_tokens']} c={r['concurrency']}: tokens differ for "
                  f"{r['differing_prompts']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "weights": args.weights, "arrival": args.arrival,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
