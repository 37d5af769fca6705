"""Loopback load test of ``aitbc-engine serve``: concurrency 8 on the tiny model for 30 s.

Starts the real server (``python -m engine serve`` in a subprocess, on a free
loopback port, with a fresh token) over a tiny 2-layer GPT-2 made here, sends
``POST /v1/jobs`` (wait=true) from 8 concurrent clients until the duration or
the request bound is reached, and prints requests/s, latency p50/p90/p99 and
the errors (any answer but 200 with a completed result). Beside it, the same
job run in-process with ``Engine.run`` one at a time, so the HTTP cost shows
as a ratio. Warm-up requests are sent first and not measured.

    python benchmarks/server_load.py [--duration 30] [--concurrency 8] [--max-requests 5000]
                                     [--max-tokens 8] [--batch-size N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import subprocess
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

PROMPTS = ["Hello GPU", "The quick brown fox", "A miner runs jobs", "Paris is the capital of",
           "Numbers: 1 2 3", "Hello network, hello world", "The engine meters each job",
           "Stop here."]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def job(n: int, max_tokens: int) -> dict[str, Any]:
    return {"type": "inference", "model": "tiny-gpt2", "prompt": PROMPTS[n % len(PROMPTS)],
            "max_tokens": max_tokens, "temperature": 0.0}


def start_server(registry: Path, token: str, state: Path, batch_size: int | None,
                 max_queue: int) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--registry", str(registry), "--device", "cpu",
         "--port", "0", "--token", token, "--state-dir", str(state), "--preload", "tiny-gpt2",
         *(["--batch-size", str(batch_size)] if batch_size else []),
         "--max-queue", str(max_queue)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    lines: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            hit = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
            if hit:
                found.append(hit.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(180) or not found:
        proc.kill()
        raise SystemExit("the server did not start:\n" + "".join(lines))
    return proc, found[0], lines


async def load(url: str, token: str, *, duration: float, concurrency: int, max_requests: int,
               max_tokens: int, warmup: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120,
                                 limits=limits) as client:
        while (await client.get("/health")).json()["status"] == "loading":
            await asyncio.sleep(0.1)
        for n in range(warmup):
            r = await client.post("/v1/jobs", json=job(n, max_tokens))
            r.raise_for_status()
        latencies: list[float] = []
        errors: dict[str, int] = {}
        sent = 0
        started = time.perf_counter()
        deadline = started + duration

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < max_requests:
                n = sent
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/jobs", json=job(n, max_tokens))
                    ok = r.status_code == 200 and r.json().get("status") == "completed"
                    reason = "" if ok else f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                latencies.append(time.perf_counter() - t0)
                if reason:
                    errors[reason] = errors.get(reason, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    return {"requests": len(latencies), "elapsed_seconds": elapsed, "latencies": latencies,
            "errors": errors, "metrics": metrics}


def direct_baseline(registry: Path, max_tokens: int, seconds: float) -> list[float]:
    """The same jobs through ``Engine.run`` in this process, one at a time."""
    from engine import Engine

    times: list[float] = []
    with Engine(registry, devices=["cpu"]) as engine:
        for n in range(3):
            engine.run(job(n, max_tokens))
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            result = engine.run(job(n, max_tokens))
            times.append(time.perf_counter() - t0)
            assert result.ok, result.error
            n += 1
    return times


def server_side(metrics: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name in ("aitbc_engine_job_duration_seconds_sum",
                          "aitbc_engine_job_duration_seconds_count",
                          "aitbc_engine_job_queue_seconds_sum"):
                out[s.name] = out.get(s.name, 0.0) + s.value
            if s.name == "aitbc_engine_jobs_finished_total":
                key = f"jobs_{s.labels['status']}"
                out[key] = out.get(key, 0.0) + s.value
            if s.name == "aitbc_engine_jobs_rejected_total":
                out["rejected"] = out.get("rejected", 0.0) + s.value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-requests", type=int, default=5000, help="request bound")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the server's --batch-size (default: the server's own, 8 on the "
                             "CPU; 1: one job at a time)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print a JSON summary too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="server-load-") as tmp:
        base = Path(tmp)
        model_dir = make_tiny_gpt2(base / "tiny-gpt2")
        registry = write_registry(base / "models.yaml", {"tiny-gpt2": tiny_entry(model_dir)})
        token = secrets.token_urlsafe(24)
        proc, url, _log = start_server(registry, token, base / "state", args.batch_size,
                                        max_queue=max(64, 2 * args.concurrency))
        try:
            run = asyncio.run(load(url, token, duration=args.duration,
                                   concurrency=args.concurrency,
                                   max_requests=args.max_requests, max_tokens=args.max_tokens,
                                   warmup=args.warmup))
        finally:
            proc.terminate()
            proc.wait(60)
        direct = direct_baseline(registry, args.max_tokens, args.baseline_seconds)

    lat = run["latencies"]
    rps = run["requests"] / run["elapsed_seconds"]
    direct_rps = len(direct) / sum(direct)
    side = server_side(run["metrics"])
    errors = sum(run["errors"].values())
    summary = {
        "scenario": f"loopback, concurrency {args.concurrency}, POST /v1/jobs wait=true, "
                    f"tiny-gpt2 (2 layers) greedy {args.max_tokens} tokens, server batch size "
                    f"{args.batch_size or 'default'}, CPU",
        "requests": run["requests"], "elapsed_seconds": round(run["elapsed_seconds"], 2),
        "requests_per_second": round(rps, 2),
        "latency_ms": {"p50": percentile(lat, 50) * 1000, "p90": percentile(lat, 90) * 1000,
                       "p99": percentile(lat, 99) * 1000, "mean": statistics.fmean(lat) * 1000},
        "errors": errors, "error_kinds": run["errors"],
        "server": side,
        "direct_engine_run": {"runs": len(direct), "requests_per_second": round(direct_rps, 2),
                              "p50_ms": percentile(direct, 50) * 1000},
        "http_over_direct_throughput": round(rps / direct_rps, 3),
    }
    print(f"scenario: {summary['scenario']}")
    print(f"requests: {run['requests']} in {run['elapsed_seconds']:.1f} s "
          f"(bound {args.max_requests}), warm-up {args.warmup} not counted")
    print(f"throughput: {rps:.2f} requests/s over HTTP vs {direct_rps:.2f} jobs/s direct "
          f"Engine.run (ratio {rps / direct_rps:.3f})")
    ms = summary["latency_ms"]
    print(f"latency: p50 {ms['p50']:.1f} ms, p90 {ms['p90']:.1f} ms, p99 {ms['p99']:.1f} ms, "
          f"mean {ms['mean']:.1f} ms (direct p50 {summary['direct_engine_run']['p50_ms']:.1f} ms,"
          f" one at a time)")
    count = side.get("aitbc_engine_job_duration_seconds_count", 0.0)
    if count:
        print(f"server side: {int(count)} jobs, mean execution "
              f"{1000 * side['aitbc_engine_job_duration_seconds_sum'] / count:.1f} ms, mean queue "
              f"wait {1000 * side.get('aitbc_engine_job_queue_seconds_sum', 0) / count:.1f} ms, "
              f"rejected {int(side.get('rejected', 0))}")
    print(f"errors: {errors}" + (f" {run['errors']}" if errors else ""))
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
