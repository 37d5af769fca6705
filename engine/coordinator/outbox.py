"""The outbox: a SQLite journal (WAL, synchronous=FULL) of every job this miner took.

A job is journalled ``accepted`` (with its payload) as soon as the coordinator
assigns it, then ``result`` or ``failure`` (with the exact wire body) when it
finishes, before anything is submitted. Only the coordinator's acknowledgement
removes it, moving it to ``acked`` (with the receipt, when one came) in the
same transaction; ``acked`` is checked before any submission, so a result is
never sent again after it was acknowledged. Each ``acked`` row also keeps the
receipt's verification (``verified``/``invalid``/``unsigned``/``no_key``, or
NULL when it was not checked), the job's model, its priced terms (units, unit
type, unit price, price: see :func:`engine.coordinator.receipts.priced_terms`)
and the UTC day of the acknowledgement; a journal from before these columns
gains them when it is opened (old rows get their day and the terms their
receipt states). A body the coordinator refused
(400/422) is kept as ``rejected`` for inspection; a job the coordinator no
longer holds for us is kept as ``dropped`` with the reason.

A write that fails because of the storage (a full disk, a read-only or
failing file system, the journal locked by another process) is retried with
a growing pause (0.5 s doubling to 30 s), with an ERROR line when it starts
failing and a WARNING when it works again: the job it records is neither run
twice nor dropped, and the agent simply waits until the disk takes writes
again. :meth:`Outbox.stop_retrying` (the agent's stop) ends such a wait with
:class:`~engine.coordinator.errors.JournalUnavailableError`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

from engine.coordinator.errors import JournalUnavailableError
from engine.coordinator.receipts import priced_terms
from engine.state import StateDirError, problem_text, tighten_private

if TYPE_CHECKING:
    from engine.coordinator.receipts import ReceiptCheck

log = logging.getLogger(__name__)

State = Literal["accepted", "result", "failure", "rejected", "dropped"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    scope TEXT NOT NULL,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    payload TEXT,
    body TEXT,
    result TEXT,
    note TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    accepted_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (scope, job_id)
);
CREATE TABLE IF NOT EXISTS acked (
    scope TEXT NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    acked_at REAL NOT NULL,
    receipt TEXT,
    duplicate INTEGER NOT NULL DEFAULT 0,
    verification TEXT,
    verification_reason TEXT,
    model TEXT,
    units REAL,
    unit_type TEXT,
    unit_price REAL,
    price REAL,
    day TEXT,
    PRIMARY KEY (scope, job_id)
);
CREATE TABLE IF NOT EXISTS identity (
    key TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""

# Columns ``acked`` gained after its first release: added to an older journal when opened.
_ACKED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("verification", "TEXT"), ("verification_reason", "TEXT"), ("model", "TEXT"),
    ("units", "REAL"), ("unit_type", "TEXT"), ("unit_price", "REAL"), ("price", "REAL"),
    ("day", "TEXT"),
)
_ACKED_FIELDS = ("scope, job_id, kind, acked_at, receipt, duplicate, verification, "
                 "verification_reason, model, units, unit_type, unit_price, price, day")


@dataclass(frozen=True)
class Entry:
    """One journalled job."""

    scope: str
    job_id: str
    state: State
    payload: Any
    body: dict[str, Any] | None
    result: dict[str, Any] | None
    note: str | None
    attempts: int
    accepted_at: float | None
    finished_at: float | None


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _day(at: float) -> str:
    """The UTC calendar day of a timestamp, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def _model_of(result: Any, payload: Any, receipt: Any) -> str | None:
    """The job's model: the engine's result, else the coordinator's payload, else the receipt's."""
    if isinstance(result, dict) and isinstance(result.get("model"), str):
        return str(result["model"])
    for source in (payload, (receipt.get("metadata") or {}).get("job_payload")
                   if isinstance(receipt, dict) and isinstance(receipt.get("metadata"), dict)
                   else None):
        if not isinstance(source, dict):
            continue
        if isinstance(source.get("model"), str):
            return str(source["model"])
        request = source.get("service_request")
        if isinstance(request, dict) and isinstance(request.get("model"), str):
            return str(request["model"])
    if isinstance(receipt, dict) and isinstance(receipt.get("model"), str):
        return str(receipt["model"])
    return None


def _acked_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"scope": r[0], "job_id": r[1], "kind": r[2], "acked_at": r[3],
            "receipt": _loads(r[4]), "duplicate": bool(r[5]), "verification": r[6],
            "verification_reason": r[7], "model": r[8], "units": r[9], "unit_type": r[10],
            "unit_price": r[11], "price": r[12], "day": r[13]}


# Failures of the storage, not of the statement, retried until the disk takes writes again:
# SQLite's primary result codes BUSY 5, LOCKED 6, READONLY 8, IOERR 10, FULL 13, CANTOPEN 14
# (numbers, since the module names them only from Python 3.11), and their messages for
# Pythons whose exceptions do not carry the code.
_STORAGE_CODES = frozenset({5, 6, 8, 10, 13, 14})
_STORAGE_MESSAGES = ("disk is full", "disk i/o error", "readonly database", "read-only",
                     "unable to open database", "database is locked")
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
_T = TypeVar("_T")
_P = ParamSpec("_P")


def is_storage_error(exc: BaseException) -> bool:
    """True for an error of the disk under the journal (full, read-only, I/O, locked)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _STORAGE_CODES
        return any(text in str(exc).lower() for text in _STORAGE_MESSAGES)
    return isinstance(exc, OSError)


def _private_folder(folder: Path) -> None:
    """Make ``folder`` with mode 0700; an existing one readable by others is named in a
    warning (left as it is: it may be a folder the operator shares on purpose)."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)
        return
    mode = folder.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("the journal's folder %s is open to other users (mode %o); the journal "
                    "itself is kept 0600, but consider chmod 700 %s", folder, mode, folder)


_Write = Callable[Concatenate["Outbox", _P], _T]


def _durable(method: _Write[_P, _T]) -> _Write[_P, _T]:
    """A write of the journal, retried while the storage fails (see the module's docs)."""

    @functools.wraps(method)
    def write(self: Outbox, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._retrying(lambda: method(self, *args, **kwargs), method.__name__)

    return write


class Outbox:
    """The journal at ``path`` (created, with its folder, when missing). Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stop_retrying = threading.Event()
        try:
            _private_folder(self.path.parent)
        except OSError as exc:
            raise StateDirError(f"the journal's folder {self.path.parent} is unusable: "
                                f"{problem_text(exc)}; or pass --state-dir") from exc
        # Private from the first byte: the file is made 0600 before SQLite opens it, and
        # SQLite gives its -wal and -shm files the database file's mode; the umask covers
        # anything else made meanwhile. Files an older engine left looser are tightened.
        old_umask = os.umask(0o077)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            for extra in ("", "-wal", "-shm"):
                tighten_private(Path(f"{self.path}{extra}"))
            self._lock = threading.Lock()
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            if not is_storage_error(exc):
                raise
            problem = problem_text(exc) if isinstance(exc, OSError) else str(exc)
            raise StateDirError(f"cannot open the journal {self.path}: {problem}; free space "
                                "or make the folder writable, or pass --state-dir") from exc
        finally:
            os.umask(old_umask)
        self._migrate()

    def stop_retrying(self) -> None:
        """End any wait for the disk: a write failing now raises instead of retrying."""
        self._stop_retrying.set()

    def _retrying(self, write: Callable[[], _T], what: str) -> _T:
        """Run ``write`` (one whole transaction) until the storage lets it through."""
        delay, failing_since, attempts = RETRY_FIRST_SECONDS, 0.0, 0
        while True:
            try:
                done = write()
            except (OSError, sqlite3.Error) as exc:
                if not is_storage_error(exc):
                    raise
                attempts += 1
                if attempts == 1:
                    failing_since = time.monotonic()
                    log.error("journal %s: cannot write (%s: %s); the job is kept and the write "
                              "retried every %.1f to %.0f s until the disk takes it (free space "
                              "or make the folder writable)", self.path, what, exc,
                              RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS)
                elif attempts % 10 == 0:
                    log.warning("journal %s: still cannot write (%s: %s) after %.0f s",
                                self.path, what, exc, time.monotonic() - failing_since)
                if self._stop_retrying.wait(delay):
                    raise JournalUnavailableError(
                        f"the journal {self.path} could not be written ({exc}) and the agent "
                        "is stopping; what it had journalled before stays there") from exc
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            if attempts:
                log.warning("journal %s: writable again after %.0f s (%d attempts); work "
                            "goes on", self.path, time.monotonic() - failing_since, attempts)
            return done

    @_durable
    def _migrate(self) -> None:
        """Add the ``acked`` columns a journal written by an older engine lacks, and fill them.

        In one write transaction, so two processes opening the same old journal at
        once add each column once.
        """
        with self._lock:
            have = {row[1] for row in self._db.execute("PRAGMA table_info(acked)")}
        if all(name in have for name, _ in _ACKED_COLUMNS):
            return
        with self._tx() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(acked)")}
            missing = [(name, kind) for name, kind in _ACKED_COLUMNS if name not in have]
            if not missing:
                return
            for name, kind in missing:
                db.execute(f"ALTER TABLE acked ADD COLUMN {name} {kind}")
            rows = db.execute("SELECT scope, job_id, kind, acked_at, receipt FROM acked "
                              "WHERE day IS NULL").fetchall()
            for scope, job_id, kind, acked_at, receipt_text in rows:
                receipt = _loads(receipt_text)
                terms = priced_terms(receipt, None, priced=kind == "result")
                db.execute("UPDATE acked SET model = ?, units = ?, unit_type = ?, "
                           "unit_price = ?, price = ?, day = ? WHERE scope = ? AND job_id = ?",
                           (_model_of(None, None, receipt), terms["units"], terms["unit_type"],
                            terms["unit_price"], terms["price"], _day(acked_at), scope,
                            job_id))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite ends the transaction itself on some failures (a full disk).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ writes
    @_durable
    def accepted(self, scope: str, job_id: str, payload: Any) -> None:
        """Journal a job the coordinator assigned to us, before it runs."""
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO entries (scope, job_id, state, payload, "
                       "accepted_at, updated_at) VALUES (?, ?, 'accepted', ?, ?, ?)",
                       (scope, job_id, _dumps(payload), now, now))

    @_durable
    def finished(self, scope: str, job_id: str, kind: Literal["result", "failure"],
                 body: dict[str, Any], result: dict[str, Any] | None = None) -> None:
        """Journal a finished job's wire body (and the engine's JobResult) before submitting it."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("UPDATE entries SET state = ?, body = ?, result = ?, finished_at = ?, "
                             "updated_at = ? WHERE scope = ? AND job_id = ?",
                             (kind, _dumps(body), _dumps(result), now, now, scope, job_id))
            if cur.rowcount == 0:
                db.execute("INSERT INTO entries (scope, job_id, state, body, result, "
                           "finished_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (scope, job_id, kind, _dumps(body), _dumps(result), now, now))

    @_durable
    def attempted(self, scope: str, job_id: str, note: str | None = None) -> None:
        """Count a submission attempt that did not get an answer (it stays pending)."""
        with self._tx() as db:
            db.execute("UPDATE entries SET attempts = attempts + 1, note = ?, updated_at = ? "
                       "WHERE scope = ? AND job_id = ?", (note, time.time(), scope, job_id))

    @_durable
    def acknowledge(self, scope: str, job_id: str, *, receipt: dict[str, Any] | None = None,
                    duplicate: bool = False, receipt_check: ReceiptCheck | None = None) -> None:
        """The coordinator acknowledged: move the entry to ``acked`` in one transaction.

        ``receipt_check`` is the outcome of checking ``receipt``'s signature (None:
        not checked, or no receipt). The job's model and priced terms are taken from
        the entry being moved (its payload, body metrics and result) and the receipt.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, payload, body, result FROM entries "
                             "WHERE scope = ? AND job_id = ?", (scope, job_id)).fetchone()
            kind = row[0] if row else "result"
            payload, body, result = ((_loads(row[1]), _loads(row[2]), _loads(row[3])) if row
                                     else (None, None, None))
            metrics = body.get("metrics") if isinstance(body, dict) else None
            terms = priced_terms(receipt, metrics, priced=kind != "failure")
            db.execute("DELETE FROM entries WHERE scope = ? AND job_id = ?", (scope, job_id))
            db.execute("INSERT OR REPLACE INTO acked (scope, job_id, kind, acked_at, receipt, "
                       "duplicate, verification, verification_reason, model, units, unit_type, "
                       "unit_price, price, day) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (scope, job_id, kind, now, _dumps(receipt), int(duplicate),
                        receipt_check.status if receipt_check is not None else None,
                        receipt_check.reason if receipt_check is not None else None,
                        _model_of(result, payload, receipt), terms["units"],
                        terms["unit_type"], terms["unit_price"], terms["price"], _day(now)))

    @_durable
    def _set_state(self, scope: str, job_id: str, state: State, note: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE entries SET state = ?, note = ?, updated_at = ? "
                       "WHERE scope = ? AND job_id = ?", (state, note, time.time(), scope, job_id))

    def reject(self, scope: str, job_id: str, note: str) -> None:
        """The coordinator refused the body (400/422): keep it for inspection, never resend."""
        self._set_state(scope, job_id, "rejected", note)

    def drop(self, scope: str, job_id: str, note: str) -> None:
        """The coordinator no longer holds the job for us: keep it as ``dropped`` with why."""
        self._set_state(scope, job_id, "dropped", note)

    # ------------------------------------------------------------ reads
    def _entries(self, where: str, args: tuple[Any, ...]) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT scope, job_id, state, payload, body, result, note, attempts, "
                f"accepted_at, finished_at FROM entries WHERE {where} "
                "ORDER BY COALESCE(finished_at, accepted_at), job_id", args).fetchall()
        return [Entry(r[0], r[1], r[2], _loads(r[3]), _loads(r[4]), _loads(r[5]), r[6], r[7],
                      r[8], r[9]) for r in rows]

    def pending(self, scope: str) -> list[Entry]:
        """Finished jobs not yet acknowledged (results and failures), oldest first."""
        return self._entries("scope = ? AND state IN ('result', 'failure')", (scope,))

    def in_flight(self, scope: str) -> list[Entry]:
        """Jobs accepted but not finished (their process died while running them)."""
        return self._entries("scope = ? AND state = 'accepted'", (scope,))

    def entries(self, scope: str | None = None, state: State | None = None) -> list[Entry]:
        """Every entry still in the journal (for inspection and tests)."""
        clauses, args = ["1 = 1"], []
        if scope is not None:
            clauses.append("scope = ?")
            args.append(scope)
        if state is not None:
            clauses.append("state = ?")
            args.append(state)
        return self._entries(" AND ".join(clauses), tuple(args))

    def get(self, scope: str, job_id: str) -> Entry | None:
        """The journal entry of one job, if it is still there."""
        found = self._entries("scope = ? AND job_id = ?", (scope, job_id))
        return found[0] if found else None

    def was_acked(self, scope: str, job_id: str) -> bool:
        """True when the coordinator already acknowledged this job."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM acked WHERE scope = ? AND job_id = ?",
                                   (scope, job_id)).fetchone()
        return row is not None

    def ack_of(self, scope: str, job_id: str) -> dict[str, Any] | None:
        """The acknowledgement of a job (``duplicate``: taken from a 409), or None."""
        with self._lock:
            row = self._db.execute("SELECT kind, acked_at, receipt, duplicate FROM acked WHERE "
                                   "scope = ? AND job_id = ?", (scope, job_id)).fetchone()
        if row is None:
            return None
        return {"kind": row[0], "acked_at": row[1], "receipt": _loads(row[2]),
                "duplicate": bool(row[3])}

    @_durable
    def forget_ack(self, scope: str, job_id: str) -> None:
        """Forget an acknowledgement that proved wrong (the job was assigned to us again)."""
        with self._tx() as db:
            db.execute("DELETE FROM acked WHERE scope = ? AND job_id = ?", (scope, job_id))

    def acked(self, scope: str | None = None) -> list[dict[str, Any]]:
        """Acknowledged jobs, oldest first, each a dict with these keys.

        ``scope``, ``job_id``, ``kind`` (``result``/``failure``), ``acked_at``,
        ``receipt``, ``duplicate``; ``verification`` (``verified``, ``invalid``,
        ``unsigned``, ``no_key``, or None: not checked) and ``verification_reason``;
        ``model``, ``units``, ``unit_type``, ``unit_price``, ``price`` (None where
        unknown) and ``day`` (UTC, ``YYYY-MM-DD``).
        """
        sql = f"SELECT {_ACKED_FIELDS} FROM acked"
        with self._lock:
            rows = (self._db.execute(sql + " WHERE scope = ? ORDER BY acked_at", (scope,))
                    if scope is not None else self._db.execute(sql + " ORDER BY acked_at")
                    ).fetchall()
        return [_acked_row(r) for r in rows]

    # ------------------------------------------------------------ identity
    @_durable
    def save_identity(self, key: str, data: dict[str, Any]) -> None:
        """Persist the miner's identity at a coordinator (the doc dialect's id and key)."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO identity (key, data) VALUES (?, ?)",
                       (key, _dumps(data)))

    def load_identity(self, key: str) -> dict[str, Any] | None:
        """The identity saved under ``key``, if any."""
        with self._lock:
            row = self._db.execute("SELECT data FROM identity WHERE key = ?", (key,)).fetchone()
        return _loads(row[0]) if row else None
