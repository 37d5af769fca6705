"""``aitbc-engine serve`` as a real process: start-up, token file, preload, graceful shutdown."""

from __future__ import annotations

import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from conftest import make_tiny_gpt2, tiny_entry, write_registry

SLOW_TOKENS = 150


@pytest.fixture(scope="module")
def slow_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The test registry plus ``slow-gpt2``: wider, with a long context, for long jobs."""
    base = tmp_path_factory.mktemp("slow")
    slow_dir = make_tiny_gpt2(base / "slow-gpt2", n_layer=4, n_embd=256, n_positions=1024)
    entry = tiny_entry(slow_dir, context_length=1024)
    entry["config"] = {"model_type": "gpt2", "n_layer": 4, "n_head": 2, "n_embd": 256,
                       "n_positions": 1024, "vocab_size": 512}
    return write_registry(base / "models.yaml", {"tiny-gpt2": tiny_entry(tiny_model_dir),
                                                  "slow-gpt2": entry})


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str]
    state_dir: Path


def _pump(stream: IO[str], sink: queue.Queue[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        sink.put(line)


@pytest.fixture()
def served(slow_registry: Path, tmp_path: Path) -> Iterator[Served]:
    state = tmp_path / "state"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("AITBC_ENGINE_STATE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--registry", str(slow_registry),
         "--device", "cpu", "--port", "0", "--state-dir", str(state),
         "--preload", "tiny-gpt2", "slow-gpt2"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    sink: queue.Queue[str] = queue.Queue()
    lines: list[str] = []
    threading.Thread(target=_pump, args=(proc.stderr, sink, lines), daemon=True).start()
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        try:
            line = sink.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(lines)
            continue
        found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line)
        url = found.group(1) if found else None
    assert url is not None, "".join(lines)
    try:
        yield Served(proc, url, lines, state)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _token(served: Served) -> dict[str, str]:
    return {"Authorization": f"Bearer {(served.state_dir / 'token').read_text().strip()}"}


def _slow_job(job_id: str) -> dict[str, object]:
    return {"task": "text-generation", "model": "slow-gpt2", "prompt": "Hello GPU",
            "job_id": job_id, "params": {"max_tokens": SLOW_TOKENS}}


def _wait_running(client: httpx.Client, job_id: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code == 200 and r.json()["state"] == "running":
            return
        assert r.status_code in (200, 404) and r.json().get("state") in (None, "queued"), r.text
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.slow
def test_serve_makes_a_private_token_preloads_and_answers_waiting_requests_on_sigterm(
        served: Served) -> None:
    token_file = served.state_dir / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token not in "".join(served.lines)  # never printed
    assert str(token_file) in "".join(served.lines)  # but where it is, is
    deadline = time.monotonic() + 120
    while httpx.get(served.url + "/health", timeout=30).json()["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.get(served.url + "/health", timeout=30).json()["status"] == "ok"
    auth = _token(served)
    client = httpx.Client(base_url=served.url, headers=auth, timeout=300)
    rows = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert rows["tiny-gpt2"]["warm"] and rows["slow-gpt2"]["warm"]
    assert httpx.get(served.url + "/v1/models", timeout=30).status_code == 401

    answers: list[httpx.Response] = []

    def waiting_request() -> None:  # wait=true: the answer comes when the job is done
        with httpx.Client(base_url=served.url, headers=auth, timeout=300) as own:
            answers.append(own.post("/v1/jobs", json=_slow_job("slow-waiting")))

    t = threading.Thread(target=waiting_request)
    t.start()
    _wait_running(client, "slow-waiting")
    running_at_signal = client.get("/v1/jobs/slow-waiting").json()["state"] == "running"
    client.close()
    served.proc.send_signal(signal.SIGTERM)
    t.join(300)
    served.proc.wait(300)
    log = "".join(served.lines)
    assert running_at_signal, "the slow job ended before the signal; make it longer"
    assert answers and answers[0].status_code == 200, log
    body = answers[0].json()
    assert body["status"] == "completed", body
    assert body["metrics"]["completion_tokens"] == SLOW_TOKENS
    assert served.proc.returncode in (0, -signal.SIGTERM), log


@pytest.mark.slow
def test_sigterm_finishes_running_jobs_and_cancels_queued_ones(served: Served) -> None:
    client = httpx.Client(base_url=served.url, headers=_token(served), timeout=300)
    assert client.post("/v1/jobs?wait=false", json=_slow_job("slow-running")).status_code == 202
    _wait_running(client, "slow-running")
    queued = client.post("/v1/jobs?wait=false", json={
        "type": "inference", "model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 2,
        "job_id": "queued-1"})
    assert queued.status_code == 202
    states = [client.get(f"/v1/jobs/{j}").json()["state"] for j in ("slow-running", "queued-1")]
    client.close()
    served.proc.send_signal(signal.SIGTERM)
    served.proc.wait(300)
    log = "".join(served.lines)
    assert states == ["running", "queued"], "the slow job ended before the signal"
    assert "waiting for 1 running job(s), cancelling 1 queued" in log, log
    assert "shutdown: job slow-running completed" in log, log
    assert "shutdown: job queued-1 cancelled" in log, log
    assert served.proc.returncode in (0, -signal.SIGTERM), log
