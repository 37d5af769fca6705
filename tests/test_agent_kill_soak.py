"""Kill soak: ``aitbc-engine mine`` SIGKILLed at every protocol point, restarted, 200 jobs.

The test coordinator behaves like the deployed one where it matters: it stores,
receipts and prices every copy of a result (no deduplication), and it injects
the usual faults (5xx, replies held past the read timeout, cut connections,
429 bursts). The miner process is killed with SIGKILL at each point of the
protocol and started again with the same state directory:

- ``received``: the coordinator has assigned a job (RUNNING) and is replying to
  the poll: the miner never journals it;
- ``journaled``: the journal holds the job as accepted (before it ran or while
  it runs);
- ``result sent``: the result request reached the coordinator, which has not
  stored it;
- ``reply lost``: the coordinator stored (and priced) the result and is replying.

Pass: every job completed, 0 lost and 0 paid twice, the journal empty at the end.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app
from coordinators.faults import FaultInjector, RouteFaults
from coordinators.helpers import OPERATOR_KEY, engine_cmd
from coordinators.server import ServerThread

N_JOBS = 200
KILL_CHANCE = {"assigned": 0.04, "result_arrived": 0.04, "result_stored": 0.04}
JOB = {"type": "inference", "model": "gpt2", "max_tokens": 2}


def _accepted_in_journal(state: Path) -> bool:
    path = state / "outbox.sqlite3"
    if not path.exists():
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            row = db.execute("SELECT COUNT(*) FROM entries WHERE state = 'accepted'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return bool(row and row[0])


@pytest.mark.slow
def test_kill_soak_200_jobs_none_lost_none_paid_twice(tmp_path: Path,
                                                      tiny_model_dir: Path) -> None:
    registry = write_registry(tmp_path / "models.yaml", {"gpt2": tiny_entry(tiny_model_dir)})
    faults = FaultInjector(default=RouteFaults(error_rate=0.03, timeout_rate=0.02,
                                               timeout_seconds=1.2, drop_rate=0.01,
                                               drop_after_rate=0.01),
                           burst_rate=0.002, burst_length=2, burst_retry_after="1", seed=7)
    app = aitbc_app.create_app(tmp_path / "coord.db", faults=faults,
                               limits={k: 100_000 for k in aitbc_app.LIMITS})
    st = app.state.coord
    jobs = [st.add_job({**JOB, "prompt": f"Hello GPU {n}"}) for n in range(N_JOBS)]
    state = tmp_path / "state"
    rng = random.Random(2026)
    kills: Counter[str] = Counter()
    current: dict[str, subprocess.Popen[str] | None] = {"proc": None}
    lock = threading.Lock()

    def kill(point: str) -> None:
        with lock:
            proc = current["proc"]
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills[point] += 1
                current["proc"] = None

    def on_event(point: str, job_id: str) -> None:
        if rng.random() < KILL_CHANCE[point]:
            kill({"assigned": "received", "result_arrived": "result sent",
                  "result_stored": "reply lost"}[point])

    st.on_event = on_event
    env = {**os.environ, "AITBC_API_KEY": OPERATOR_KEY, "HF_HUB_OFFLINE": "1"}

    def completed() -> int:
        row = st.store.one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'COMPLETED'")
        return int(row["n"]) if row else 0

    def mine(*extra: str) -> list[str]:
        return engine_cmd("mine", "--coordinator", url, "--dialect", "aitbc", "--miner-id",
                          "soak-miner", "--state-dir", str(state), "--registry", str(registry),
                          "--device", "cpu", "--poll-wait", "0", "--idle", "0.05",
                          "--max-idle", "0.2", "--heartbeat-interval", "1",
                          "--delivery-settle", "2", *extra)

    starts = 0
    started = time.monotonic()
    with ServerThread(app) as url:
        deadline = started + 420
        last_journal_kill = time.monotonic()
        while completed() < N_JOBS and time.monotonic() < deadline:
            with lock:
                proc = current["proc"]
                if proc is None or proc.poll() is not None:
                    current["proc"] = subprocess.Popen(
                        mine("--read-timeout", "0.8"), env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, text=True)
                    starts += 1
            if time.monotonic() - last_journal_kill > 10 and _accepted_in_journal(state):
                kill("journaled")
                last_journal_kill = time.monotonic()
            time.sleep(0.05)
        st.on_event = None
        with lock:
            proc = current["proc"]
            current["proc"] = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # finish, submit, stop
            proc.wait(timeout=120)
        # One clean start submits whatever the last kill left in the journal.
        final = subprocess.run(mine("--once", "--read-timeout", "5"), env=env,
                               capture_output=True, text=True, timeout=180)
        starts += 1
        assert final.returncode == 0, final.stderr[-3000:]
    elapsed = time.monotonic() - started
    paid = Counter(a["job_id"] for a in st.attempts()
                   if a["kind"] == "result" and a["status"] == 200)
    lost = sum(1 for j in jobs if paid[j] == 0)
    twice = sum(1 for j in jobs if paid[j] > 1)
    outbox = sqlite3.connect(state / "outbox.sqlite3")
    try:
        left = outbox.execute("SELECT job_id, state FROM entries WHERE state IN "
                              "('accepted', 'result', 'failure')").fetchall()
    finally:
        outbox.close()
    print(f"\nkill soak: {N_JOBS} jobs in {elapsed:.0f} s, {starts} miner starts, kills "
          f"{dict(kills)} ({sum(kills.values())} in all), faults {faults.total}; "
          f"lost {lost}, paid twice {twice}, journal left {len(left)}")
    assert set(kills) >= {"received", "result sent", "reply lost", "journaled"}, kills
    assert lost == 0 and twice == 0
    assert all(st.job(j)["state"] == "COMPLETED" for j in jobs)
    assert left == []
