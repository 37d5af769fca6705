"""The agent against a coordinator that, like the deployed one, stores and pays every copy.

Exactly once on our side (issue 14): a result whose delivery is uncertain is
never resent blind; a job assigned to us but never journalled is run on start;
a stop ends every wait at once and sends no poll; a 401 ends all traffic;
idle polling backs off; a dialect that is not served says so; receipts are
verified; nothing local leaves in a failure message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app, doc_app
from coordinators.helpers import (
    caps_for,
    fast_config,
    make_coordinator,
    run_agent,
    wait_for,
)
from coordinators.server import ServerThread

from engine import Engine
from engine.coordinator import (
    Agent,
    DialectMismatchError,
    Outbox,
    ReceiptVerifier,
    RetryPolicy,
    UnauthorizedError,
    detect_dialect,
)

JOB = {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 3}
SEED = bytes(range(32))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Engine]:
    reg = write_registry(tmp_path_factory.mktemp("reg") / "models.yaml",
                         {"gpt2": tiny_entry(tiny_model_dir)})
    with Engine(reg, devices=["cpu"]) as e:
        yield e


def _aitbc(tmp_path: Path, **kw: Any) -> tuple[Any, Any]:
    app = aitbc_app.create_app(tmp_path / "aitbc.db", **kw)
    return app, app.state.coord


def _journal(state: Path) -> Outbox:
    return Outbox(state / "outbox.sqlite3")


# ------------------------------------------------------------------ paid once


@pytest.mark.slow
@pytest.mark.parametrize("stored", [True, False], ids=["stored-late", "not-stored"])
def test_a_result_reply_held_past_the_read_timeout_is_paid_once(tmp_path: Path, engine: Engine,
                                                                stored: bool) -> None:
    """The coordinator holds the first /result reply past the client's read timeout. Before,
    the client retried the POST and the coordinator stored and priced it twice."""
    app, st = _aitbc(tmp_path, result_delay=1.5, delay_results=1,
                     store_after_disconnect=stored)
    with ServerThread(app) as url:
        job = st.add_job(JOB)
        _, report = run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=1,
                              read_timeout=0.5)
        assert wait_for(lambda: len(st.attempts(job)) >= (1 if stored else 2), timeout=10)
        time.sleep(0.3)
    assert st.paid(job) == 1  # exactly one stored, receipted and priced copy
    assert st.job(job)["state"] == "COMPLETED"
    assert [a["status"] for a in st.attempts(job)] == ([200] if stored else [499, 200])
    assert report.pending_left == 0
    if stored:
        assert report.duplicates_recognised == 1  # the job list showed it COMPLETED
    outbox = _journal(tmp_path / "state")
    try:
        assert outbox.entries() == [] and len(outbox.acked()) == 1
    finally:
        outbox.close()


@pytest.mark.slow
def test_a_delivery_that_cannot_be_checked_is_kept_not_resent(tmp_path: Path,
                                                              engine: Engine) -> None:
    app, st = _aitbc(tmp_path, result_delay=1.5, delay_results=1, store_after_disconnect=False)
    st.list_fails = True  # the job list answers 200 {"jobs": [], "error": ...}, as deployed
    with ServerThread(app) as url:
        job = st.add_job(JOB)
        _, report = run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=1,
                              read_timeout=0.5)
    assert st.paid(job) == 0 and report.pending_left == 1
    assert report.delivery_unconfirmed >= 1
    outbox = _journal(tmp_path / "state")
    try:
        [entry] = outbox.pending(f"aitbc|{url}|miner-test")
        assert entry.job_id == job and "delivery unconfirmed" in (entry.note or "")
    finally:
        outbox.close()


@pytest.mark.slow
def test_kept_result_is_sent_once_the_list_answers(tmp_path: Path, engine: Engine) -> None:
    app, st = _aitbc(tmp_path, result_delay=1.5, delay_results=1, store_after_disconnect=False)
    st.list_fails = True
    with ServerThread(app) as url:
        job = st.add_job(JOB)
        outbox = _journal(tmp_path / "state")
        coordinator = make_coordinator("aitbc", url, outbox, read_timeout=0.5)
        agent = Agent(coordinator, engine, outbox, caps_for(engine),
                      fast_config(retry_pending_seconds=0.1))
        thread = threading.Thread(target=agent.run)
        thread.start()
        try:
            assert wait_for(lambda: agent.report.delivery_unconfirmed >= 1, timeout=60)
            assert st.paid(job) == 0
            st.list_fails = False  # now it can be asked: RUNNING, so it is sent, once
            assert wait_for(lambda: st.paid(job) == 1, timeout=30)
        finally:
            agent.stop()
            thread.join(timeout=30)
            coordinator.close()
            outbox.close()
    time.sleep(0.3)
    assert st.paid(job) == 1 and agent.report.pending_left == 0


# ------------------------------------------------------------------ no job lost


def test_a_job_assigned_but_never_journalled_is_run_on_start(tmp_path: Path,
                                                             engine: Engine) -> None:
    """A kill between the poll's reply and the journal left the job RUNNING at the
    coordinator and absent from the journal; before, it was lost."""
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url:
        job = st.add_job(JOB)
        st.store.run("INSERT INTO miners (miner_id, capabilities, concurrency, inflight, status) "
                     "VALUES ('miner-test', '{}', 1, 1, 'ONLINE')")
        st.store.run("UPDATE jobs SET state = 'RUNNING', miner_id = 'miner-test' "
                     "WHERE job_id = ?", (job,))
        _, report = run_agent("aitbc", url, engine, tmp_path / "state", once=True)
    assert report.recovered_assigned == 1
    assert st.job(job)["state"] == "COMPLETED" and st.paid(job) == 1


def test_the_job_is_journalled_before_the_payload_is_read(tmp_path: Path, engine: Engine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.coordinator.aitbc as aitbc_module

    app, st = _aitbc(tmp_path)
    seen: list[bool] = []
    outbox_path = tmp_path / "state" / "outbox.sqlite3"
    real_build = aitbc_module.build_job

    def build_after_journal(job_id: str, payload: Any, **kw: Any) -> Any:
        probe = Outbox(outbox_path)
        try:
            seen.append(probe.get(f"aitbc|{url}|miner-test", job_id) is not None)
        finally:
            probe.close()
        return real_build(job_id, payload, **kw)

    monkeypatch.setattr(aitbc_module, "build_job", build_after_journal)
    with ServerThread(app) as url:
        st.add_job(JOB)
        run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=1)
    assert seen and all(seen)


# ------------------------------------------------------------------ stopping


def test_a_stop_ends_a_retry_after_wait_at_once_and_sends_no_poll(tmp_path: Path,
                                                                  engine: Engine) -> None:
    app, st = _aitbc(tmp_path, limits={"poll": 1, "heartbeat": 100, "register": 50,
                                       "result": 50, "fail": 50}, retry_after="60")
    with ServerThread(app) as url:
        outbox = _journal(tmp_path / "state")
        coordinator = make_coordinator("aitbc", url, outbox, retry=RetryPolicy(
            max_attempts=3, base_delay=0.02, max_delay=0.2, max_retry_after=120.0))
        agent = Agent(coordinator, engine, outbox, caps_for(engine), fast_config())
        thread = threading.Thread(target=agent.run)
        thread.start()
        try:
            assert wait_for(lambda: st.rate.rejected >= 1, timeout=30)  # waiting out 60 s
            time.sleep(0.3)
            polls = st.polls
            started = time.monotonic()
            agent.stop()
            thread.join(timeout=10)
            latency = time.monotonic() - started
        finally:
            agent.stop()
            thread.join(timeout=30)
            coordinator.close()
            outbox.close()
    print(f"\nstop while waiting out Retry-After: 60 took {latency:.3f} s")
    assert latency <= 1.0, f"stop took {latency:.2f}s"
    assert st.polls == polls  # no poll after the stop


def test_a_job_running_past_the_shutdown_timeout_is_left_for_the_next_start(
        tmp_path: Path, engine: Engine) -> None:
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url:
        job = st.add_job({**JOB, "max_tokens": 200})
        outbox = _journal(tmp_path / "state")
        coordinator = make_coordinator("aitbc", url, outbox)
        agent = Agent(coordinator, engine, outbox, caps_for(engine),
                      fast_config(shutdown_timeout=0.05))
        thread = threading.Thread(target=agent.run)
        thread.start()
        try:
            assert wait_for(lambda: agent.inflight == 1, timeout=30)
            agent.stop()
            thread.join(timeout=30)
        finally:
            agent.stop()
            thread.join(timeout=30)
            coordinator.close()
        entry = outbox.get(f"aitbc|{url}|miner-test", job)
        outbox.close()
    assert agent.report.left_for_next_start == 1 and agent.report.failed == 0
    assert entry is not None and entry.state == "accepted"  # run again on the next start
    assert st.job(job)["state"] == "RUNNING" and not st.attempts(job)  # nothing reported


def test_after_a_401_nothing_more_is_sent(tmp_path: Path, engine: Engine) -> None:
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url, pytest.raises(UnauthorizedError):
        run_agent("aitbc", url, engine, tmp_path / "state", api_key="revoked-key")
    assert st.requests == ["POST /v1/miners/register"]  # no heartbeat, no goodbye


# ------------------------------------------------------------------ idle polling


@pytest.mark.slow
def test_idle_polls_back_off(tmp_path: Path, engine: Engine,
                             caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="engine.coordinator")
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url:
        outbox = _journal(tmp_path / "state")
        coordinator = make_coordinator("aitbc", url, outbox)
        agent = Agent(coordinator, engine, outbox, caps_for(engine),
                      fast_config(idle_seconds=0.05, max_idle_seconds=0.4))
        thread = threading.Thread(target=agent.run)
        thread.start()
        try:
            time.sleep(2.5)
            idle_polls = st.polls
            job = st.add_job(JOB)
            assert wait_for(lambda: st.job(job)["state"] == "COMPLETED", timeout=30)
            assert agent.idle_pause() < 0.07  # one job brings the pause back to the start
        finally:
            agent.stop()
            thread.join(timeout=30)
            coordinator.close()
            outbox.close()
    # Without back-off: 2.5 s / 0.05 s = 50 polls; with it (0.05 → 0.4 s): about 10.
    assert idle_polls <= 16
    settled = [r for r in caplog.records if r.levelno == logging.INFO
               and "polls a minute" in r.getMessage()]
    assert settled  # the settled rate is logged without -v -v


def test_the_idle_pause_doubles_to_its_cap_with_jitter(tmp_path: Path, engine: Engine) -> None:
    outbox = _journal(tmp_path / "state")
    try:
        agent = Agent(make_coordinator("aitbc", "http://127.0.0.1:9", outbox), engine, outbox,
                      caps_for(engine), fast_config(idle_seconds=2.0, max_idle_seconds=30.0))
        pauses = []
        for streak in range(1, 12):
            agent._idle_streak = streak
            pauses.append(agent.idle_pause())
    finally:
        outbox.close()
    assert 1.6 <= pauses[0] <= 2.4 and 3.2 <= pauses[1] <= 4.8
    assert all(24.0 <= p <= 36.0 for p in pauses[5:])  # capped at 30 s ± 20 %
    assert 60 / 36 <= 60 / (sum(pauses[5:]) / len(pauses[5:])) <= 60 / 24  # ~2 polls a minute


# ------------------------------------------------------------------ dialects


def test_doc_against_the_deployed_routes_names_the_dialect_not_the_key(tmp_path: Path,
                                                                       engine: Engine) -> None:
    app, _ = _aitbc(tmp_path)
    with ServerThread(app) as url, pytest.raises(DialectMismatchError) as err:
        run_agent("doc", url, engine, tmp_path / "state")
    assert "does not serve the doc protocol" in err.value.message
    assert "405" in err.value.message and "--dialect aitbc" in err.value.message


def test_auto_picks_the_dialect_served(tmp_path: Path) -> None:
    aitbc, _ = _aitbc(tmp_path)
    doc = doc_app.create_app(tmp_path / "doc.db")
    with ServerThread(aitbc) as a_url, ServerThread(doc) as d_url:
        assert detect_dialect(a_url)[0] == "aitbc"
        assert detect_dialect(d_url)[0] == "doc"


# ------------------------------------------------------------------ receipts, messages


@pytest.mark.slow
def test_receipts_are_verified_and_kept_apart(tmp_path: Path, engine: Engine) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    public = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw).hex()
    other = Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw).hex()
    results = {}
    for name, key in (("right", public), ("wrong", other)):
        (tmp_path / name).mkdir()
        app, st = _aitbc(tmp_path / name, signing_key=SEED)
        with ServerThread(app) as url:
            st.add_job(JOB)
            outbox = _journal(tmp_path / name / "state")
            coordinator = make_coordinator("aitbc", url, outbox)
            agent = Agent(coordinator, engine, outbox, caps_for(engine),
                          fast_config(max_jobs=1), receipts=ReceiptVerifier(key))
            try:
                report = agent.run()
            finally:
                coordinator.close()
            [row] = outbox.acked()
            outbox.close()
        results[name] = (row["verification"], report.receipts_verified, report.receipts_invalid)
    assert results == {"right": ("verified", 1, 0), "wrong": ("invalid", 0, 1)}


def test_failure_messages_carry_no_local_path(tmp_path: Path, engine: Engine) -> None:
    app, st = _aitbc(tmp_path)
    with ServerThread(app) as url:
        job = st.add_job({"type": "inference", "model": "no-such-model", "prompt": "x"})
        run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=1)
    message = st.job(job)["error"]["error_message"]
    assert "no-such-model" in message
    assert str(engine.registry.path) not in message and "/" + "tmp" not in message
