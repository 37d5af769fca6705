"""Load smollm2-135m twice in fresh processes: the first converts its GGUF, the second reuses it.

Prints both load times and their ratio. The first process gets an empty engine
cache (a temporary directory), so it de-quantizes the GGUF file and writes the
safetensors conversion; the second process uses the same cache directory.

    python benchmarks/load_cache.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
from engine.hardware import discover
from engine.loading import load_model
from engine.registry import Registry
spec = Registry.load().get(sys.argv[1])
started = time.perf_counter()
loaded = load_model(spec, [discover().cpu])
print(json.dumps({"load_time_seconds": loaded.load_time_seconds,
                  "wall_seconds": time.perf_counter() - started,
                  "weights_digest": loaded.weights_digest}))
"""


def load_once(model: str, cache: str) -> dict[str, float]:
    """Load ``model`` in a fresh interpreter using ``cache``; returns its timings."""
    env = {**os.environ, "AITBC_ENGINE_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model], env=env, check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aitbc-cache-") as cache:
        cold = load_once(args.model, cache)
        warm = load_once(args.model, cache)
    assert cold["weights_digest"] == warm["weights_digest"]
    ratio = cold["load_time_seconds"] / warm["load_time_seconds"]
    print(f"model {args.model}")
    print(f"first load  (converts GGUF): {cold['load_time_seconds']:8.2f} s "
          f"(process {cold['process_seconds']:.2f} s)")
    print(f"second load (cached):        {warm['load_time_seconds']:8.2f} s "
          f"(process {warm['process_seconds']:.2f} s)")
    print(f"ratio first/second: {ratio:.1f}x  (target >= 10x)")
    return 0 if ratio >= 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
