"""The miner's journal as another local user would see it (issue 15, item 1, first part).

The journal is private from its first byte (0600, SQLite's ``-wal`` and ``-shm``
too, in a 0700 folder it makes), looser files an older engine left are
tightened, and the operator's ``aitbc`` key is never written to it: a grep of
every journal file finds no key.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app
from coordinators.helpers import caps_for, fast_config
from coordinators.server import ServerThread

from engine import Engine
from engine.coordinator import Agent, Outbox
from engine.coordinator.aitbc import AitbcCoordinator
from engine.coordinator.base import Identity
from engine.coordinator.client import CoordinatorClient

KEY = "sk-operator-secret-0123456789abcdef"
JOB = {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 2}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_journal_is_private_with_its_wal_and_shm(tmp_path: Path, loose_umask: None) -> None:
    folder = tmp_path / "state" / "miner"
    outbox = Outbox(folder / "outbox.sqlite3")
    try:
        outbox.accepted("s", "job-1", {"prompt": "x"})
        files = [folder / "outbox.sqlite3", folder / "outbox.sqlite3-wal",
                 folder / "outbox.sqlite3-shm"]
        assert all(f.exists() for f in files)
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        assert _mode(folder) == 0o700
    finally:
        outbox.close()


def test_looser_files_left_by_an_older_engine_are_tightened(tmp_path: Path, loose_umask: None,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path)
    first.accepted("s", "job-1", None)
    first.close()
    for extra in ("", "-wal", "-shm"):
        if Path(f"{path}{extra}").exists():
            os.chmod(f"{path}{extra}", 0o644)
    again = Outbox(path)
    try:
        assert _mode(path) == 0o600
        assert "readable by other users" in caplog.text
    finally:
        again.close()


def test_the_aitbc_key_never_reaches_the_journal(tmp_path: Path, tiny_model_dir: Path) -> None:
    registry = write_registry(tmp_path / "models.yaml", {"gpt2": tiny_entry(tiny_model_dir)})
    app = aitbc_app.create_app(tmp_path / "coord.db", api_keys={KEY})
    st = app.state.coord
    state = tmp_path / "state"
    with ServerThread(app) as url, Engine(registry, devices=["cpu"]) as engine:
        job = st.add_job(JOB)
        outbox = Outbox(state / "outbox.sqlite3")
        coordinator = AitbcCoordinator(CoordinatorClient(url),
                                       Identity(miner_id="private-miner", api_key=KEY))
        agent = Agent(coordinator, engine, outbox, caps_for(engine), fast_config(max_jobs=1))
        try:
            agent.run()
            # Read while the journal is open, as another user would: WAL and SHM included.
            found = {f.name: KEY.encode() in f.read_bytes() for f in state.iterdir()}
        finally:
            coordinator.close()
            outbox.close()
    assert st.job(job)["state"] == "COMPLETED"
    assert found and not any(found.values()), found
