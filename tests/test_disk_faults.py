"""Full and read-only disks (issue 15, items 1 and 6): nothing dies, nothing is lost.

Where this machine lets the test mount a tiny tmpfs (root with CAP_SYS_ADMIN, as
in the project's CI), the disk really fills and really turns read-only; where it
cannot, those tests skip and the SQLite page limit (a real ``SQLITE_FULL``) stands
in for the journal's full disk.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app
from coordinators.helpers import caps_for, fast_config
from coordinators.server import ServerThread

from engine import Engine
from engine.cache import engine_cache_dir
from engine.cli import main
from engine.coordinator import Agent, JournalUnavailableError, Outbox
from engine.coordinator.aitbc import AitbcCoordinator
from engine.coordinator.base import Identity
from engine.coordinator.client import CoordinatorClient
from engine.state import StateDirError, load_or_create_token, private_dir

KEY = "sk-operator-secret-0123456789abcdef"
JOB = {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 2}


class TinyDisk:
    """A small tmpfs that a test can fill, free, and turn read-only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ballast = root / "ballast"

    def fill(self) -> None:
        """Write until the file system says ENOSPC (whole pages, then single bytes)."""
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 4096, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def read_only(self, on: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.root)],
                       check=True, capture_output=True)


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[TinyDisk]:
    root = tmp_path / "fs"
    root.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs",
                           str(root)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here: {done.stderr.strip()}")
    try:
        yield TinyDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True, check=False)


# ------------------------------------------------------------------ the journal


def test_a_journal_write_on_a_full_database_waits_and_then_lands(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
        outbox._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own SQLITE_FULL
        writer = threading.Thread(target=outbox.accepted,
                                  args=("s", "job-1", {"prompt": "x" * 20_000}))
        with caplog.at_level(logging.WARNING, logger="engine.coordinator.outbox"):
            writer.start()
            deadline = time.monotonic() + 10
            while "cannot write" not in caplog.text:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert writer.is_alive() and outbox.get("s", "job-1") is None
            outbox._db.execute("PRAGMA max_page_count = 1000000")
            writer.join(10)
        assert not writer.is_alive()
        entry = outbox.get("s", "job-1")
        assert entry is not None and entry.state == "accepted"
        assert "disk is full" in caplog.text and "writable again" in caplog.text
    finally:
        outbox.close()


def test_a_stop_ends_the_wait_with_a_typed_error(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    try:
        pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
        outbox._db.execute(f"PRAGMA max_page_count = {pages}")
        threading.Timer(0.3, outbox.stop_retrying).start()
        with pytest.raises(JournalUnavailableError, match="stopping"):
            outbox.accepted("s", "job-1", {"prompt": "x" * 20_000})
    finally:
        outbox.close()


@pytest.mark.slow
def test_the_agent_survives_a_full_disk_and_resumes_when_space_returns(
        tmp_path: Path, tiny_model_dir: Path, tiny_disk: TinyDisk,
        caplog: pytest.LogCaptureFixture) -> None:
    registry = write_registry(tmp_path / "models.yaml", {"gpt2": tiny_entry(tiny_model_dir)})
    app = aitbc_app.create_app(tmp_path / "coord.db", api_keys={KEY})
    st = app.state.coord
    with ServerThread(app) as url, Engine(registry, devices=["cpu"]) as engine:
        outbox = Outbox(tiny_disk.root / "state" / "outbox.sqlite3")
        coordinator = AitbcCoordinator(CoordinatorClient(url),
                                       Identity(miner_id="full-disk-miner", api_key=KEY))
        agent = Agent(coordinator, engine, outbox, caps_for(engine), fast_config(max_jobs=1))
        tiny_disk.fill()
        job = st.add_job(JOB)
        runner = threading.Thread(target=agent.run, daemon=True)
        try:
            with caplog.at_level(logging.INFO):
                runner.start()
                deadline = time.monotonic() + 60
                while "cannot write" not in caplog.text:
                    assert runner.is_alive(), caplog.text
                    assert time.monotonic() < deadline, caplog.text
                    time.sleep(0.05)
                time.sleep(1.0)
                assert runner.is_alive()  # alive, waiting for the disk
                assert st.job(job)["state"] != "COMPLETED"
                tiny_disk.free()
                runner.join(120)
            assert not runner.is_alive()
        finally:
            agent.stop()
            runner.join(30)
            coordinator.close()
            outbox.close()
    assert st.job(job)["state"] == "COMPLETED"
    assert st.paid(job) == 1  # once, not twice
    assert "writable again" in caplog.text


def test_mine_with_an_unusable_journal_folder_exits_2_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], registry_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["mine", "--coordinator", "http://127.0.0.1:9", "--dialect", "aitbc",
                 "--api-key-file", str(_secret(tmp_path, "key")), "--registry",
                 str(registry_path), "--device", "cpu", "--state-dir", str(blocker / "state")])
    err = capsys.readouterr().err
    assert code == 2
    assert "state_dir_unusable" in err and str(blocker) in err


def _secret(folder: Path, value: str) -> Path:
    path = folder / f"{value}.secret"
    path.write_text(value + "-0123456789\n")
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ serve's state folder


def test_serve_on_a_full_disk_exits_2_and_leaves_no_empty_token(
        tiny_disk: TinyDisk, registry_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tiny_disk.root / "state"
    state.mkdir(mode=0o700)
    tiny_disk.fill()
    code = main(["serve", "--state-dir", str(state), "--registry", str(registry_path),
                 "--device", "cpu", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(state) in err and "disk is full" in err
    assert list(state.iterdir()) == []  # no empty token, no temporary file
    tiny_disk.free()
    token, path, created = load_or_create_token(state)  # space back: a start works
    assert created and path.read_text().strip() == token


def test_serve_on_a_read_only_disk_exits_2_naming_the_folder(
        tiny_disk: TinyDisk, registry_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_disk.read_only()
    state = tiny_disk.root / "state"
    code = main(["serve", "--state-dir", str(state), "--registry", str(registry_path),
                 "--device", "cpu", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(state) in err and "read-only" in err


def test_serve_with_a_file_for_a_state_folder_exits_2(
        tmp_path: Path, registry_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["serve", "--state-dir", str(blocker), "--registry", str(registry_path),
                 "--device", "cpu", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "state_dir_unusable" in err and str(blocker) in err


def test_an_empty_token_file_is_repaired_with_a_warning(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    (tmp_path / "token").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="engine.state"):
        token, path, created = load_or_create_token(tmp_path)
    assert created and len(token) >= 32 and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "was empty" in caplog.text and token not in caplog.text


def test_concurrent_first_starts_agree_on_one_token(tmp_path: Path) -> None:
    found: list[str] = []

    def start() -> None:
        found.append(load_or_create_token(tmp_path)[0])

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["token"]


# ------------------------------------------------------------------ private folders


def test_cache_and_state_folders_are_made_0700_and_loose_ones_tightened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    old = os.umask(0o022)
    try:
        monkeypatch.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "cache"))
        made = engine_cache_dir()
        assert stat.S_IMODE(made.stat().st_mode) == 0o700
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        loose.chmod(0o755)
        with caplog.at_level(logging.WARNING, logger="engine.state"):
            private_dir(loose)
        assert stat.S_IMODE(loose.stat().st_mode) == 0o700
        assert "readable by other users" in caplog.text
    finally:
        os.umask(old)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared-cache"
    shared.mkdir(mode=0o700)
    os.chown(shared, 65534, 65534)  # nobody
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(shared))
    with pytest.raises(StateDirError, match="belongs to another user"):
        engine_cache_dir()
    with contextlib.suppress(OSError):
        os.chown(shared, 0, 0)
