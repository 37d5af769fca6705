"""GPU check: run the CUDA and NVML paths for real and say what was found.

On a machine with an NVIDIA GPU this loads a tiny random GPT-2 and gpt2 (random
weights, the true 124M architecture) in fp16 and, where the GPU has it, bf16;
runs metered jobs; and asserts what must hold on real hardware: the precision
policy, GPU seconds bracketing the decode, CUDA-event busy time, NVML energy
deltas on Volta and newer, peak memory, batched GPU-time shares adding up, and
identical hashes for a repeated greedy job. It prints decode tokens/s and the
fraction of the memory-bandwidth roofline for gpt2 fp16 at batch 1. Exits
non-zero if any assertion fails. Without a GPU it says so and exits 0.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable

failures: list[str] = []


def check(name: str, fn: Callable[[], str]) -> None:
    """Run one check, print its line, remember a failure."""
    started = time.perf_counter()
    try:
        detail = fn()
        print(f"PASS {name}: {detail} ({time.perf_counter() - started:.1f} s)")
    except Exception as exc:  # report every check, then fail at the end
        failures.append(name)
        print(f"FAIL {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc()


def main() -> int:
    import torch

    from engine import Engine
    from engine.hardware import GPU_SPECS, Nvml, discover, memory_bandwidth_gbps

    nvml = Nvml()
    info = discover(nvml)
    if not info.gpus or not torch.cuda.is_available():
        why = info.nvml_error or "torch sees no CUDA device"
        print(f"no GPU here ({why}); nothing to check. devices: "
              f"{', '.join(d.id for d in info.devices)}")
        return 0
    gpu = info.gpus[0]
    print(f"GPU {gpu.id}: {gpu.name} ({gpu.gpu_type}), {gpu.memory_total_bytes / 2**30:.1f} GiB, "
          f"compute {gpu.compute_capability}, energy counter {gpu.energy_supported}, "
          f"driver {info.driver_version}, CUDA {info.cuda_version}, torch {torch.__version__}")

    engine = Engine(devices=[gpu.id], nvml=nvml, weights="random", job_timeout=120)
    dtypes = ["float16"] + (["bfloat16"] if gpu.supports_bf16 else [])

    def policy() -> str:
        spec = engine.registry.get("gpt2")
        from engine.loading import resolve_dtype_name

        chosen = resolve_dtype_name(spec, gpu)
        want = "bfloat16" if gpu.supports_bf16 else "float16"
        assert chosen == want, f"auto chose {chosen}, expected {want}"
        return f"auto -> {chosen}"

    check("precision policy", policy)

    def metered(model: str, dtype: str, tokens: int) -> Callable[[], str]:
        def run() -> str:
            eng = Engine(devices=[gpu.id], nvml=nvml, weights="random", dtype=dtype)
            job = {"task": "text-generation", "model": model,
                   "prompt_token_ids": list(range(1, 33)), "params": {"max_tokens": tokens}}
            eng.run(job)  # warm-up and load
            a, b = eng.run(job), eng.run(job)
            eng.close()
            assert a.ok and b.ok, (a.error, b.error)
            m = a.metrics
            assert m is not None and a.profile is not None
            assert a.profile.dtype == dtype and a.profile.device_class == f"cuda:{gpu.gpu_type}"
            assert m.gpu_count == 1 and m.gpu_time_seconds > 0
            assert math.isclose(m.gpu_time_seconds, m.execution_time_seconds, rel_tol=0.05)
            assert m.gpu_busy_seconds is not None and 0 < m.gpu_busy_seconds <= (
                m.gpu_time_seconds * 1.05)
            assert m.peak_memory_bytes is not None and m.peak_memory_bytes > 0
            if gpu.energy_supported:
                assert m.energy_joules is not None and m.energy_joules > 0, "no energy delta"
            else:
                assert m.energy_joules is None
            assert a.result_hash == b.result_hash, "repeated greedy job changed its hash"
            rate = m.completion_tokens / m.execution_time_seconds
            return (f"{m.completion_tokens} tok in {m.execution_time_seconds * 1000:.1f} ms "
                    f"({rate:.0f} tok/s), busy {m.gpu_busy_seconds * 1000:.1f} ms, energy "
                    f"{m.energy_joules} J, peak {m.peak_memory_bytes / 2**20:.0f} MiB")
        return run

    for dtype in dtypes:
        check(f"metered distilgpt2 random {dtype}", metered("distilgpt2", dtype, 16))
        check(f"metered gpt2 random {dtype}", metered("gpt2", dtype, 64))

    def batch_shares() -> str:
        eng = Engine(devices=[gpu.id], nvml=nvml, weights="random", dtype="float16",
                     batch_size=4, batch_window_seconds=0.5)
        jobs = [{"task": "text-generation", "model": "gpt2",
                 "prompt_token_ids": list(range(1, 9 + i)), "params": {"max_tokens": 8 + 4 * i}}
                for i in range(4)]
        eng.run(jobs[0])
        results = [h.result() for h in [eng.submit(j) for j in jobs]]
        eng.close()
        assert all(r.ok and r.profile and r.profile.batched for r in results)
        total = math.fsum(r.metrics.gpu_time_seconds for r in results if r.metrics)
        longest = max(r.metrics.execution_time_seconds for r in results if r.metrics)
        assert total <= longest * 1.10, f"shares {total:.4f} s exceed the held time {longest:.4f}"
        return (f"4 jobs share {total * 1000:.1f} ms of GPU time "
                f"(longest job {longest * 1000:.1f} ms)")

    check("batched GPU-time shares", batch_shares)

    def roofline() -> str:
        eng = Engine(devices=[gpu.id], nvml=nvml, weights="random", dtype="float16")
        job = {"task": "text-generation", "model": "gpt2", "prompt_token_ids": [1],
               "params": {"max_tokens": 256}}
        eng.run(job)
        result = eng.run(job)
        loaded = eng.load("gpt2")
        eng.close()
        m = result.metrics
        assert m is not None and m.tpot_seconds is not None
        rate = 1.0 / m.tpot_seconds
        bandwidth = memory_bandwidth_gbps(gpu)
        if bandwidth is None:
            return f"{rate:.0f} tok/s decode; no spec-sheet bandwidth for {gpu.gpu_type}"
        bound = bandwidth * 1e9 / loaded.memory_bytes
        assert rate <= bound * 1.05, "decode rate above the bandwidth bound: metering is wrong"
        return (f"gpt2 fp16 batch 1 decode {rate:.0f} tok/s = {rate / bound:.1%} of the "
                f"{bandwidth:.0f} GB/s roofline ({bound:.0f} tok/s); "
                f"on the spec sheet: {gpu.gpu_type in GPU_SPECS}")

    check("decode roofline (gpt2 fp16, batch 1)", roofline)

    def oom_recovers() -> str:
        eng = Engine(devices=[gpu.id], nvml=nvml, weights="random", dtype="float16")
        free, _ = torch.cuda.mem_get_info(gpu.index)
        hog = None
        try:
            hog = torch.empty(int(free * 0.97), dtype=torch.uint8, device=gpu.id)
            bad = eng.run({"task": "text-generation", "model": "gpt2-medium",
                           "prompt_token_ids": list(range(1, 512)),
                           "params": {"max_tokens": 8}})
        finally:
            del hog
            torch.cuda.empty_cache()
        assert not bad.ok and bad.error is not None
        good = eng.run({"task": "text-generation", "model": "distilgpt2",
                        "prompt_token_ids": [1, 2, 3], "params": {"max_tokens": 4}})
        eng.close()
        assert good.ok, good.error
        return f"refused/failed with {bad.error.code}; next job ran"

    check("memory refusal then recovery", oom_recovers)
    engine.close()
    nvml.close()
    print(f"{len(failures)} check(s) failed" if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
