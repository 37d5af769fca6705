"""Fault soak: 200 jobs through an ``aitbc`` coordinator that misbehaves on purpose.

20% of requests on every route get a 5xx, 10% are held past the client's read
timeout (the coordinator still processes them late, as a slow server does),
some connections are cut before or after the coordinator processed the
request, and bursts of 429 come with ``Retry-After``. Jobs whose assignment
reply was lost go back to the queue after the coordinator's assignment timeout.
The coordinator, like the deployed one, stores and pays every copy of a result,
so every job's result must reach it exactly once by the agent's own care (no
blind resend of an uncertain delivery); the agent must never crash, and no
result may be lost. Bounded: 200 tiny-model jobs of 2
tokens, the agent stopped once all are in (or after 150 s, which fails).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app
from coordinators.faults import FaultInjector, RouteFaults
from coordinators.helpers import caps_for, fast_config, make_coordinator
from coordinators.server import ServerThread

from engine import Engine
from engine.coordinator import Agent, Outbox, RetryPolicy

N_JOBS = 200
JOB = {"type": "inference", "model": "gpt2", "max_tokens": 2}


@pytest.mark.slow
def test_fault_soak_200_jobs_none_lost_none_doubled(tmp_path: Path, tiny_model_dir: Path,
                                                    capsys: object) -> None:
    registry = write_registry(tmp_path / "models.yaml", {"gpt2": tiny_entry(tiny_model_dir)})
    route = RouteFaults(error_rate=0.20, timeout_rate=0.10, timeout_seconds=0.6,
                        drop_rate=0.03, drop_after_rate=0.02)
    faults = FaultInjector(default=route, burst_rate=0.004, burst_length=3,
                           burst_retry_after="1", seed=1234)
    # The deployed limits (100 polls a minute) would stretch 200 jobs over minutes; the soak
    # is about faults, so the coordinator's own limits are raised (the limiter has its tests).
    app = aitbc_app.create_app(tmp_path / "coord.db", faults=faults, assignment_timeout=5.0,
                               limits={k: 100_000 for k in aitbc_app.LIMITS})
    st = app.state.coord
    jobs = [st.add_job({**JOB, "prompt": f"Hello GPU {n}"}) for n in range(N_JOBS)]
    retry = RetryPolicy(max_attempts=6, base_delay=0.02, max_delay=0.3,
                        max_rate_limit_waits=10, max_retry_after=2.0)
    report = None
    crashed: list[BaseException] = []
    with Engine(registry, devices=["cpu"]) as engine, ServerThread(app) as url:
        outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
        coordinator = make_coordinator("aitbc", url, outbox, retry=retry, read_timeout=0.3)
        agent = Agent(coordinator, engine, outbox, caps_for(engine, max_concurrent=2),
                      fast_config(max_concurrent=2, heartbeat_interval=0.3,
                                  retry_pending_seconds=0.3))

        def mine() -> None:
            try:
                agent.run()
            except BaseException as exc:  # the agent must never crash
                crashed.append(exc)

        started = time.monotonic()
        thread = threading.Thread(target=mine)
        thread.start()

        def completed() -> int:
            row = st.store.one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'COMPLETED'")
            return int(row["n"]) if row else 0

        def settled() -> bool:
            """Every job completed on the coordinator, and nothing left in the agent's journal:
            a result whose reply was lost counts as completed there at once, but stays in the
            journal until the agent confirms it (retry_pending_seconds later), so stopping
            on the coordinator's count alone raced that confirmation."""
            return completed() >= N_JOBS and not outbox.pending(coordinator.scope())

        deadline = started + 150
        while not settled() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.1)
        agent.stop()
        thread.join(timeout=60)
        elapsed = time.monotonic() - started
        coordinator.close()
        report = agent.report
        client_stats = coordinator.client.stats
        pending = outbox.pending(coordinator.scope())

    assert not crashed, crashed
    assert not thread.is_alive()
    attempts = st.attempts()
    stored_per_job = {j: 0 for j in jobs}
    for a in attempts:
        if a["kind"] == "result" and a["status"] == 200:
            stored_per_job[a["job_id"]] += 1
    lost = sum(1 for n in stored_per_job.values() if n == 0)
    doubled = sum(1 for n in stored_per_job.values() if n > 1)
    print(f"\nsoak: {N_JOBS} jobs in {elapsed:.1f} s; faults injected {faults.total} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(faults.counts.items()) if ':' not in k)}); "
          f"HTTP calls {client_stats.calls}, attempts {client_stats.attempts}, retries "
          f"{client_stats.total_retries} ({dict(client_stats.retries)}); re-assigned after lost "
          f"replies {st.requeued}; earlier deliveries confirmed by the job list "
          f"{report.duplicates_recognised}; agent errors "
          f"{dict(report.errors)}; results lost {lost}, paid twice {doubled}")
    assert lost == 0 and doubled == 0
    assert all(st.job(j)["state"] == "COMPLETED" for j in jobs)
    assert not pending
    assert faults.counts["error"] > 0 and faults.counts["timeout"] > 0
    assert faults.counts["429"] > 0 and faults.counts["drop"] + faults.counts["drop_after"] > 0
    assert client_stats.total_retries > 0
