"""The agent against real test coordinators: errors, garbage, limits, re-registration, recovery."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app, doc_app
from coordinators.faults import FaultInjector, RouteFaults
from coordinators.helpers import caps_for, fast_config, make_coordinator, run_agent, wait_for
from coordinators.server import ServerThread

from engine import Engine
from engine.coordinator import Agent, Outbox, RateLimit, UnauthorizedError

JOB = {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 3}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Engine]:
    reg = write_registry(tmp_path_factory.mktemp("reg") / "models.yaml",
                         {"gpt2": tiny_entry(tiny_model_dir)})
    with Engine(reg, devices=["cpu"]) as e:
        yield e


def _aitbc(tmp_path: Path, **kw: Any) -> tuple[Any, Any]:
    app = aitbc_app.create_app(tmp_path / "aitbc.db", **kw)
    return app, app.state.coord


def _doc(tmp_path: Path, **kw: Any) -> tuple[Any, Any]:
    app = doc_app.create_app(tmp_path / "doc.db", **kw)
    return app, app.state.coord


# ------------------------------------------------------------------ garbage


@pytest.mark.slow
def test_aitbc_garbage_never_crashes_the_agent(tmp_path: Path, engine: Engine) -> None:
    faults = FaultInjector(routes={"poll": RouteFaults(force_status=200, force_raw=b"<html>",
                                                       force_count=2)})
    app, st = _aitbc(tmp_path, faults=faults)
    with ServerThread(app) as url:
        bad = {
            "unsupported": st.add_job({"type": "transcribe", "model": "gpt2"}),
            "not-an-object": st.add_job("just a string"),
            "wrong-type": st.add_job({"type": "inference", "model": "gpt2", "prompt": 42}),
            "unknown-model": st.add_job({"type": "inference", "model": "nope", "prompt": "x"}),
        }
        good = st.add_job(JOB)
        _, report = run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=5)
    assert faults.counts["force"] == 2  # two non-JSON poll replies were survived
    assert report.errors["ProtocolError"] == 2
    codes = {name: st.job(j)["error"]["error_code"] for name, j in bad.items()}
    assert codes == {"unsupported": "unsupported_job_type", "not-an-object": "invalid_job",
                     "wrong-type": "invalid_job", "unknown-model": "unknown_model"}
    assert all(st.job(j)["state"] == "FAILED" for j in bad.values())
    # /fail does not free the slot; the agent's heartbeat with the true in-flight count does,
    # or the good job (concurrency 1) would never have been assigned.
    assert st.job(good)["state"] == "COMPLETED"
    assert report.failures_reported == 4 and report.results_submitted == 1


def test_aitbc_poll_reply_with_wrong_types_is_survived(tmp_path: Path, engine: Engine) -> None:
    faults = FaultInjector(routes={"poll": RouteFaults(force_status=200,
                                                       force_body={"job_id": 17}, force_count=1)})
    app, st = _aitbc(tmp_path, faults=faults)
    with ServerThread(app) as url:
        good = st.add_job(JOB)
        _, report = run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=1)
    assert report.errors["ProtocolError"] == 1
    assert st.job(good)["state"] == "COMPLETED"


def test_doc_garbage_payload_is_failed_and_left_to_expire(tmp_path: Path,
                                                          engine: Engine) -> None:
    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        bad = st.add_job({"type": "reencode", "model": "gpt2"}, model="gpt2")
        good = st.add_job(JOB)
        agent, _ = run_agent("doc", url, engine, tmp_path / "state", max_jobs=2)
    assert st.job(good)["state"] == "completed"
    assert st.job(bad)["state"] == "assigned"  # no fail endpoint: it expires at the coordinator
    [entry] = agent.outbox.entries(state="dropped")
    assert entry.job_id == bad and "expire" in (entry.note or "")
    assert entry.body is not None and entry.body["error_code"] == "unsupported_job_type"


# ------------------------------------------------------------------ 409, 422, 401, 404


def test_doc_409_on_accept_skips_to_the_next_job(tmp_path: Path, engine: Engine) -> None:
    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        stolen = st.add_job(JOB)
        st.steal_after_list.add(stolen)  # another miner accepts it between list and accept
        mine = st.add_job(JOB)
        _, report = run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
    assert st.job(stolen)["miner_id"] == "miner_other"
    assert st.job(mine)["state"] == "completed"
    assert report.jobs_taken == 1 and report.errors == {}


def test_doc_422_on_a_result_is_reported_and_kept_in_the_journal(tmp_path: Path,
                                                                 engine: Engine) -> None:
    refusal = {"detail": [{"loc": ["body", "metrics", "units"], "msg": "Field required",
                           "type": "missing"}]}
    faults = FaultInjector(routes={"complete": RouteFaults(force_status=422,
                                                           force_body=refusal)})
    app, st = _doc(tmp_path, faults=faults)
    with ServerThread(app) as url:
        job = st.add_job(JOB)
        agent, report = run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
    assert report.rejected == 1 and report.results_submitted == 0
    assert faults.counts["complete:force"] == 1  # sent once, never retried
    [entry] = agent.outbox.entries(state="rejected")
    assert entry.job_id == job and "metrics.units: Field required" in (entry.note or "")
    assert entry.body is not None and entry.body["result_hash"].startswith("sha256:")
    assert entry.result is not None and entry.result["status"] == "completed"
    assert report.pending_left == 0  # rejected is kept, but not resent


def test_doc_revoked_key_stops_the_agent_at_once(tmp_path: Path, engine: Engine) -> None:
    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        st.add_job(JOB)
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
        [miner] = st.miners()
        st.revoke(miner["miner_id"])
        st.add_job(JOB)
        before = len(st.requests)
        with pytest.raises(UnauthorizedError, match="revoked"):
            run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
        assert len(st.requests) == before  # 401s are not even counted as served requests


def test_doc_forgotten_miner_registers_again(tmp_path: Path, engine: Engine) -> None:
    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        first = st.add_job(JOB)
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
        old = st.job(first)["miner_id"]
        st.store.run("DELETE FROM miners")  # the coordinator lost its miners
        second = st.add_job(JOB)
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
        new = st.job(second)["miner_id"]
    assert st.job(second)["state"] == "completed"
    assert new != old and new.startswith("miner_")


def test_doc_saved_identity_is_reused(tmp_path: Path, engine: Engine) -> None:
    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        a = st.add_job(JOB)
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
        b = st.add_job(JOB)
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
    assert len(st.miners()) == 1
    assert st.job(a)["miner_id"] == st.job(b)["miner_id"]


def test_aitbc_unregistered_miner_gets_500_and_registers_again(tmp_path: Path,
                                                               engine: Engine) -> None:
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url:
        outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
        coordinator = make_coordinator("aitbc", url, outbox)
        agent = Agent(coordinator, engine, outbox, caps_for(engine),
                      fast_config(max_jobs=1, idle_seconds=0.05))
        thread = threading.Thread(target=agent.run)
        thread.start()
        assert wait_for(lambda: st.miner("miner-test") is not None)
        st.store.run("DELETE FROM miners")  # poll now answers 500
        assert wait_for(lambda: agent.report.reregistered >= 1)
        job = st.add_job(JOB)
        thread.join(timeout=30)
        coordinator.close()
    assert not thread.is_alive()
    assert st.job(job)["state"] == "COMPLETED"


# ------------------------------------------------------------------ rate limits


@pytest.mark.slow
def test_doc_client_side_limiter_keeps_under_the_coordinators_limits(tmp_path: Path,
                                                                     engine: Engine) -> None:
    # The published limits, scaled from 60 s to 1 s windows so the test is short; the
    # client's buckets use a window 10% longer, as DOC_LIMITS do, against network jitter.
    app, st = _doc(tmp_path, limit_all=12, limit_jobs=4, window=1.0)
    limits = {"all": RateLimit(12, 1.1, burst=2), "job": RateLimit(4, 1.1, burst=1)}
    with ServerThread(app) as url:
        jobs = [st.add_job(JOB) for _ in range(6)]
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=6, limits=limits,
                  heartbeat_interval=0.3)
    assert all(st.job(j)["state"] == "completed" for j in jobs)
    assert st.rate.rejected == 0  # not one 429
    stamps = [t for t, _, route in st.requests if route in ("accept", "complete")]
    assert len(stamps) == 12
    assert all(sum(1 for u in stamps[i:] if u < t + 1.0) <= 4 for i, t in enumerate(stamps))


@pytest.mark.slow
def test_aitbc_429_from_the_coordinator_is_honoured(tmp_path: Path, engine: Engine) -> None:
    app, st = _aitbc(tmp_path, limits={"poll": 2, "heartbeat": 100, "register": 50,
                                       "result": 50, "fail": 50}, window=2.0, retry_after="1")
    with ServerThread(app) as url:
        jobs = [st.add_job(JOB) for _ in range(4)]
        agent, _ = run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=4)
    assert all(st.job(j)["state"] == "COMPLETED" for j in jobs)
    assert st.rate.rejected >= 1  # it was limited, waited Retry-After, and went on
    assert agent.coordinator.client.stats.rate_limited == st.rate.rejected


# ------------------------------------------------------------------ recovery and stopping


def test_accepted_jobs_of_a_dead_process_are_rerun_or_dropped(tmp_path: Path,
                                                              engine: Engine) -> None:
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url:
        ours = st.add_job(JOB)
        theirs = st.add_job(JOB)
        st.store.run("INSERT INTO miners (miner_id, capabilities, concurrency, inflight, status) "
                     "VALUES ('miner-test', '{}', 1, 2, 'ONLINE')")
        st.store.run("UPDATE jobs SET state = 'RUNNING', miner_id = 'miner-test' "
                     "WHERE job_id = ?", (ours,))
        st.store.run("UPDATE jobs SET state = 'RUNNING', miner_id = 'someone-else' "
                     "WHERE job_id = ?", (theirs,))
        outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
        scope = f"aitbc|{url}|miner-test"
        outbox.accepted(scope, ours, JOB)  # as the dead process journalled them
        outbox.accepted(scope, theirs, JOB)
        outbox.close()
        _, report = run_agent("aitbc", url, engine, tmp_path / "state", once=True)
    # The job list shows `theirs` running for another miner: dropped without running it (the
    # deployed coordinator would store and pay a result for it from anyone).
    assert report.rerun == 1 and report.dropped == 1 and report.results_submitted == 1
    assert st.job(ours)["state"] == "COMPLETED"
    assert st.job(theirs)["state"] == "RUNNING" and st.job(theirs)["miner_id"] == "someone-else"


def test_doc_accepted_jobs_are_dropped_when_nothing_is_assigned(tmp_path: Path,
                                                                engine: Engine) -> None:
    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        first = st.add_job(JOB)
        run_agent("doc", url, engine, tmp_path / "state", max_jobs=1)
        outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
        outbox.accepted(f"doc|{url}", "job_gone", JOB)  # a dead process accepted it once
        outbox.close()
        _, report = run_agent("doc", url, engine, tmp_path / "state", once=True)
    assert st.job(first)["state"] == "completed"
    assert report.dropped == 1 and report.rerun == 0


def test_stop_finishes_the_running_job_submits_and_deregisters(tmp_path: Path,
                                                               engine: Engine) -> None:
    app, st = _aitbc(tmp_path)
    long_job = {**JOB, "max_tokens": 120}
    with ServerThread(app) as url:
        first = st.add_job(long_job)
        second = st.add_job(JOB)
        outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")
        coordinator = make_coordinator("aitbc", url, outbox)
        agent = Agent(coordinator, engine, outbox, caps_for(engine), fast_config())
        thread = threading.Thread(target=agent.run)
        thread.start()
        assert wait_for(lambda: st.job(first)["state"] == "RUNNING")
        agent.stop()
        thread.join(timeout=60)
        coordinator.close()
    assert st.job(first)["state"] == "COMPLETED"
    assert st.job(second)["state"] == "QUEUED"  # no job taken after the stop
    assert st.miner("miner-test")["status"] == "DEREGISTERED"  # type: ignore[index]


# ------------------------------------------------------------------ the rest of the interface


def test_stats_update_and_deregister_through_the_interface(tmp_path: Path,
                                                           engine: Engine) -> None:
    aitbc, ast = _aitbc(tmp_path)
    doc, dst = _doc(tmp_path)
    caps = caps_for(engine)
    with ServerThread(aitbc) as aurl, ServerThread(doc) as durl:
        ajob = ast.add_job(JOB)
        djob = dst.add_job(JOB)
        run_agent("aitbc", aurl, engine, tmp_path / "a", max_jobs=1)
        run_agent("doc", durl, engine, tmp_path / "d", max_jobs=1)
        a = make_coordinator("aitbc", aurl, Outbox(tmp_path / "a" / "outbox.sqlite3"))
        a.register(caps)
        earnings = a.stats()
        assert earnings["miner_id"] == "miner-test" and earnings["completed_jobs"] == 1
        assert earnings["total_earnings"] > 0 and earnings["earnings_history"][0]["job_id"] == ajob
        assert a.update_capabilities(caps)["status"] == "updated"  # type: ignore[attr-defined]
        assert a.deregister() is True
        d = make_coordinator("doc", durl, Outbox(tmp_path / "d" / "outbox.sqlite3"))
        d.register(caps)  # the saved identity: an update, not a new miner
        stats = d.stats()
        assert stats["total_jobs"] == 1 and stats["success_rate"] == 1.0
        assert d.deregister() is False  # the reference has no such call
        assert len(dst.miners()) == 1 and dst.job(djob)["miner_id"] == d.miner_id
        a.close()
        d.close()


def test_doc_bearer_auth(tmp_path: Path, engine: Engine) -> None:
    from engine.coordinator import CoordinatorClient, DocCoordinator

    app, st = _doc(tmp_path)
    with ServerThread(app) as url:
        job = st.add_job(JOB)
        coordinator = DocCoordinator(CoordinatorClient(url), bearer=True)
        coordinator.register(caps_for(engine))
        assert "X-Api-Key" not in coordinator.client._http.headers
        assigned = coordinator.next_job()
        assert assigned is not None and assigned.job_id == job and assigned.job is not None
        coordinator.close()
