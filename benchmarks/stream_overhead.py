"""Streaming overhead: generated tokens/s through server-sent events vs the engine alone.

For each concurrency (1 and 8 by default), the same greedy jobs (one prompt per
stream, ``--max-tokens`` each) run two ways on one warm engine, alternating, for
``--repeats`` rounds:

- **engine**: ``Engine.submit`` for every job at once, in-process, no listener;
- **sse**: as many concurrent clients of ``POST /v1/completions`` with
  ``"stream": true`` on a real uvicorn server on loopback (the same engine),
  each reading every event as it arrives.

tokens/s = completion tokens of all jobs / wall seconds from the first submit to
the last result (the last ``[DONE]``). The ratio is the median SSE round over the
median engine round; each stream's text must equal its engine job's. The model is
the shipped ``smollm2-135m`` when its weights are here (``--model``), else (or with
``--model tiny``) a 4-layer random GPT-2 made here.

    python benchmarks/stream_overhead.py [--model smollm2-135m] [--max-tokens 64]
                                         [--concurrency 1 8] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import make_tiny_gpt2, tiny_entry, write_registry  # noqa: E402

from engine import Engine  # noqa: E402
from engine.jobs import Job  # noqa: E402
from engine.server import create_app, running_server  # noqa: E402

TOKEN = "stream-overhead-token"
PROMPTS = ["The capital of France is", "Write a haiku about GPUs.", "A miner runs jobs and",
           "Tell me about Berlin.", "Numbers: 1 2 3", "Hello network, hello world",
           "The engine meters each job", "Explain a hash in one line."]


def engine_round(engine: Engine, model: str, n: int, max_tokens: int
                 ) -> tuple[float, int, list[str]]:
    """Seconds, completion tokens and texts of ``n`` jobs submitted at once."""
    jobs = [Job(model=model, prompt=PROMPTS[i % len(PROMPTS)],
                params={"max_tokens": max_tokens})  # type: ignore[arg-type]
            for i in range(n)]
    started = time.perf_counter()
    handles = [engine.submit(job) for job in jobs]
    results = [h.result() for h in handles]
    took = time.perf_counter() - started
    assert all(r.ok for r in results), [r.error for r in results]
    tokens = sum(r.metrics.completion_tokens for r in results if r.metrics)
    return took, tokens, [r.output.text for r in results]  # type: ignore[union-attr]


def sse_round(url: str, model: str, n: int, max_tokens: int) -> tuple[float, int, list[str]]:
    """Seconds, completion tokens and texts of ``n`` concurrent SSE streams."""
    texts = [""] * n
    tokens = [0] * n
    ready = threading.Barrier(n + 1)

    def client(i: int) -> None:
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            ready.wait()
            with http.stream("POST", url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    data = json.loads(line[6:])
                    if data["choices"]:
                        texts[i] += data["choices"][0]["text"]
                    if data.get("usage"):
                        tokens[i] = data["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started, sum(tokens), texts


def tiny_registry(base: Path) -> tuple[Path, str]:
    model = make_tiny_gpt2(base / "bench-gpt2", n_layer=4, n_embd=256, n_positions=1024)
    entry = tiny_entry(model, context_length=1024)
    entry["config"] = {"model_type": "gpt2", "n_layer": 4, "n_head": 2, "n_embd": 256,
                       "n_positions": 1024, "vocab_size": 512}
    return write_registry(base / "models.yaml", {"bench-gpt2": entry}), "bench-gpt2"


def measure(engine: Engine, url: str, model: str, n: int, max_tokens: int, repeats: int
            ) -> dict[str, Any]:
    engine_round(engine, model, n, max_tokens)  # warm-up: load, caches, first batch
    sse_round(url, model, n, max_tokens)
    runs: dict[str, list[float]] = {"engine": [], "sse": []}
    for _ in range(repeats):
        took, tokens, want = engine_round(engine, model, n, max_tokens)
        runs["engine"].append(tokens / took)
        took, tokens, got = sse_round(url, model, n, max_tokens)
        assert got == want, "a stream's text differs from its engine job's"
        runs["sse"].append(tokens / took)
    engine_tps, sse_tps = statistics.median(runs["engine"]), statistics.median(runs["sse"])
    return {"concurrency": n, "engine_tokens_per_s": round(engine_tps, 1),
            "sse_tokens_per_s": round(sse_tps, 1), "ratio": round(sse_tps / engine_tps, 3),
            "runs": {k: [round(v, 1) for v in vs] for k, vs in runs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu, cuda:0, ... (default: the engine's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        registry: Path | None = None
        model = args.model
        from engine.loading import availability
        from engine.registry import Registry

        if model == "tiny" or not availability(Registry.load().get(model)).available:
            registry, model = tiny_registry(Path(tmp))
        devices = [args.device] if args.device else None
        with Engine(registry, devices=devices) as engine:
            app = create_app(engine, token=TOKEN, max_queue=64)
            with running_server(app) as url:
                rows = [measure(engine, url, model, n, args.max_tokens, args.repeats)
                        for n in args.concurrency]
            device = engine.devices[0].id
    report = {"model": model, "device": device, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{model} on {device}, {args.max_tokens} tokens per stream, median of "
              f"{args.repeats}")
        for r in rows:
            print(f"  {r['concurrency']} stream(s): engine {r['engine_tokens_per_s']} tok/s, "
                  f"SSE {r['sse_tokens_per_s']} tok/s, ratio {r['ratio']}")
    return 0 if all(r["ratio"] >= 0.95 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
