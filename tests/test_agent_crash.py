"""The agent as a separate process (``python -m engine mine``): SIGKILL, SIGTERM, 401.

The crash: the coordinator holds the agent's first result request for a few
seconds (its result route is slow), so the SIGKILL lands after the result was
journalled and while its submission is in flight. Either the slow coordinator
still stores it or it notices the dropped client and stores nothing. The test
coordinator, like the deployed one, stores and pays every copy of a result, so
the restarted agent must not resend blind: it reads the miner's job list and
resends only when the job is still RUNNING. Either way the coordinator holds
exactly one paid result, and it is the journalled one.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app
from coordinators.helpers import OPERATOR_KEY, engine_cmd, wait_for
from coordinators.server import ServerThread

JOB = {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 4}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return write_registry(tmp_path_factory.mktemp("reg") / "models.yaml",
                          {"gpt2": tiny_entry(tiny_model_dir)})


def mine(url: str, registry: Path, state: Path, *extra: str, key: str = OPERATOR_KEY
         ) -> subprocess.Popen[str]:
    env = {**os.environ, "AITBC_API_KEY": key, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        engine_cmd("mine", "--coordinator", url, "--dialect", "aitbc", "--miner-id",
                   "crash-miner", "--state-dir", str(state), "--registry", str(registry),
                   "--device", "cpu", "--poll-wait", "0", "--idle", "0.1",
                   "--heartbeat-interval", "1", "--read-timeout", "30", *extra),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal(state: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(state / "outbox.sqlite3")
    try:
        rows = db.execute("SELECT job_id, state, attempts, body FROM entries").fetchall()
    finally:
        db.close()
    return [{"job_id": r[0], "state": r[1], "attempts": r[2], "body": r[3]} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("stores_anyway", [True, False],
                         ids=["coordinator-stores-late", "coordinator-drops-it"])
def test_sigkill_between_journal_and_acknowledgement(tmp_path: Path, registry: Path,
                                                     stores_anyway: bool) -> None:
    app = aitbc_app.create_app(tmp_path / "coord.db", result_delay=2.5, delay_results=1,
                               store_after_disconnect=stores_anyway)
    st = app.state.coord
    state = tmp_path / "state"
    with ServerThread(app) as url:
        first = st.add_job(JOB)
        proc = mine(url, registry, state, "--max-jobs", "1")
        try:
            assert wait_for(lambda: st.result_arrivals >= 1, timeout=120), proc.stderr
            [entry] = journal(state)  # journalled before it was sent, marked as being sent
            assert entry["job_id"] == first and entry["state"] == "result"
            assert entry["attempts"] >= 1
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert wait_for(lambda: len(st.attempts(first)) == 1, timeout=10)  # late handler ran
        assert (st.job(first)["state"] == "COMPLETED") is stores_anyway
        second = st.add_job(JOB)
        restarted = mine(url, registry, state, "--once")
        _, err = restarted.communicate(timeout=120)
        assert restarted.returncode == 0, err
    statuses = [a["status"] for a in st.attempts(first)]
    assert statuses == ([200] if stores_anyway else [499, 200])
    assert st.paid(first) == 1  # stored and paid exactly once: nothing lost, nothing doubled
    stored = st.job(first)
    assert stored["state"] == "COMPLETED"
    import json

    journalled = json.loads(entry["body"])
    assert stored["result"]["result_hash"] == journalled["result"]["result_hash"]
    assert st.job(second)["state"] == "COMPLETED"  # and it went on mining
    assert journal(state) == []  # everything acknowledged
    assert "journalled result(s) to submit first" in err


@pytest.mark.slow
def test_sigterm_finishes_the_running_job_then_exits(tmp_path: Path, registry: Path) -> None:
    app = aitbc_app.create_app(tmp_path / "coord.db")
    st = app.state.coord
    with ServerThread(app) as url:
        job = st.add_job({**JOB, "max_tokens": 150})
        queued = st.add_job(JOB)
        proc = mine(url, registry, tmp_path / "state")
        try:
            assert wait_for(lambda: st.job(job)["state"] == "RUNNING", timeout=120)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err
    assert st.job(job)["state"] == "COMPLETED"
    assert st.job(queued)["state"] == "QUEUED"
    assert st.miner("crash-miner")["status"] == "DEREGISTERED"  # type: ignore[index]
    assert f"job {job} model=gpt2 hash=sha256:" in err  # the per-job log line


@pytest.mark.slow
def test_401_exits_non_zero_with_a_clear_message(tmp_path: Path, registry: Path) -> None:
    app = aitbc_app.create_app(tmp_path / "coord.db")
    key = "wrong-key-0123456789"
    with ServerThread(app) as url:
        proc = mine(url, registry, tmp_path / "state", "--once", key=key)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3
    assert url in err and "API key" in err and "AITBC_API_KEY" in err
    assert "<secret, 20 chars>" in err and key[:4] not in err + out
