"""The ``aitbc`` coordinator as a real FastAPI app (PROTOCOLS.md, "Dialect aitbc").

SQLite-backed. Poll assigns a job (QUEUED -> RUNNING) or answers 204; 500 for
an unregistered miner; results are stored verbatim, one per job (a second one
is a 409, and every arrival is recorded in ``attempts``); rate limits per
client address and endpoint over a sliding window (429, ``Retry-After: 60``);
errors in both shapes. Jobs assigned longer than ``assignment_timeout`` ago
go back to the queue (as a coordinator expires a silent miner's job).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from coordinators.faults import FaultInjector, FaultMiddleware
from coordinators.store import SlidingWindow, Store, dumps

SCHEMA = """
CREATE TABLE IF NOT EXISTS miners (miner_id TEXT PRIMARY KEY, capabilities TEXT NOT NULL,
    concurrency INTEGER NOT NULL, region TEXT, session_token TEXT, inflight INTEGER NOT NULL,
    status TEXT NOT NULL, last_seen REAL, registrations INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE,
    payload TEXT NOT NULL, constraints TEXT NOT NULL, state TEXT NOT NULL, miner_id TEXT,
    assigned_at REAL, assignments INTEGER NOT NULL DEFAULT 0, result TEXT, metrics TEXT,
    error TEXT, receipt TEXT);
CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT,
    miner_id TEXT, kind TEXT, status INTEGER, body TEXT, at REAL);
"""

LIMITS: dict[str, int] = {"register": 50, "heartbeat": 100, "poll": 100, "result": 50,
                          "fail": 50}
UNIT_PRICE = 0.001


def classify(method: str, path: str) -> str:
    """The route name of a request (for rate limits and faults)."""
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[2] in ("register", "heartbeat", "poll"):
        return parts[2]
    if len(parts) == 4:
        return {"result": "result", "fail": "fail", "earnings": "earnings",
                "capabilities": "capabilities"}.get(parts[3], "other")
    if len(parts) == 3 and method == "DELETE":
        return "deregister"
    return "other"


def validation_error(message: str, field: str, code: str = "invalid") -> JSONResponse:
    """The second error shape."""
    return JSONResponse(status_code=422, content={"error": {
        "code": "VALIDATION_ERROR", "message": message, "status": 422,
        "details": [{"field": field, "message": message, "code": code}]}})


def detail(status: int, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The first error shape."""
    return JSONResponse(status_code=status, content={"detail": text}, headers=headers)


class AitbcCoordinatorState:
    """The coordinator's data and knobs; tests use its helpers to queue jobs and inspect."""

    def __init__(self, db_path: Path, *, api_keys: set[str], limits: dict[str, int],
                 window: float, retry_after: str, assignment_timeout: float,
                 result_delay: float, delay_results: int, store_after_disconnect: bool) -> None:
        self.store = Store(db_path, SCHEMA)
        self.api_keys = api_keys
        self.limits = limits
        self.window = window
        self.retry_after = retry_after
        self.assignment_timeout = assignment_timeout
        self.result_delay = result_delay
        self.delay_results = delay_results
        self.store_after_disconnect = store_after_disconnect
        self.rate = SlidingWindow()
        self.result_arrivals = 0
        self.requeued = 0

    # -------------------------------------------------------------- helpers for tests
    def add_job(self, payload: Any, *, job_id: str | None = None,
                constraints: dict[str, Any] | None = None) -> str:
        """Queue a job; returns its id."""
        job_id = job_id or f"job_{uuid.uuid4().hex[:12]}"
        self.store.run("INSERT INTO jobs (job_id, payload, constraints, state) VALUES "
                       "(?, ?, ?, 'QUEUED')", (job_id, dumps(payload), dumps(constraints or {})))
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """A job row with JSON fields decoded."""
        row = self.store.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        assert row is not None, job_id
        for k in ("payload", "constraints", "result", "metrics", "error", "receipt"):
            if row[k] is not None:
                row[k] = json.loads(row[k])
        return row

    def jobs(self) -> list[dict[str, Any]]:
        """Every job."""
        return [self.job(r["job_id"]) for r in self.store.all("SELECT job_id FROM jobs")]

    def attempts(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Every result/fail arrival (status is what the coordinator answered)."""
        if job_id is None:
            return self.store.all("SELECT * FROM attempts ORDER BY id")
        return self.store.all("SELECT * FROM attempts WHERE job_id = ? ORDER BY id", (job_id,))

    def miner(self, miner_id: str) -> dict[str, Any] | None:
        """A miner row."""
        row = self.store.one("SELECT * FROM miners WHERE miner_id = ?", (miner_id,))
        if row is not None:
            row["capabilities"] = json.loads(row["capabilities"])
        return row

    def _requeue_stale(self) -> None:
        cutoff = time.time() - self.assignment_timeout
        cur = self.store.run("UPDATE jobs SET state = 'QUEUED', miner_id = NULL WHERE "
                             "state = 'RUNNING' AND assigned_at < ?", (cutoff,))
        self.requeued += cur.rowcount


def _matches(caps: dict[str, Any], constraints: dict[str, Any], payload: dict[str, Any]) -> bool:
    gpus = caps.get("gpus") or []
    if constraints.get("gpu") and not any(g.get("name") == constraints["gpu"] for g in gpus):
        return False
    if constraints.get("min_vram_gb") and not any(
            g.get("memory_mb", 0) >= constraints["min_vram_gb"] * 1024 for g in gpus):
        return False
    models = constraints.get("models") or []
    if not set(models) <= set(caps.get("models") or []):
        return False
    return not (constraints.get("max_price") is not None
                and caps.get("price", 0) > constraints["max_price"])


def create_app(db_path: Path, *, api_keys: set[str] | None = None,
               limits: dict[str, int] | None = None, window: float = 60.0,
               retry_after: str = "60", faults: FaultInjector | None = None,
               assignment_timeout: float = 300.0, result_delay: float = 0.0,
               delay_results: int = 0, store_after_disconnect: bool = True) -> FastAPI:
    """The app; its state is ``app.state.coord`` (an :class:`AitbcCoordinatorState`)."""
    app = FastAPI()
    st = AitbcCoordinatorState(db_path, api_keys=api_keys or {"test-operator-key"},
                               limits=limits or LIMITS, window=window, retry_after=retry_after,
                               assignment_timeout=assignment_timeout, result_delay=result_delay,
                               delay_results=delay_results,
                               store_after_disconnect=store_after_disconnect)
    app.state.coord = st

    def gate(request: Request) -> JSONResponse | None:
        """Auth, then the rate limit of the route (a plain call: keeps disconnects visible)."""
        if request.headers.get("x-api-key") not in st.api_keys \
                or not request.headers.get("x-miner-id"):
            return detail(401, "invalid api key or missing miner id")
        name = classify(request.method, request.url.path)
        if name in st.limits:
            host = request.client.host if request.client else "?"
            if st.rate.hit(host, name, st.limits[name], st.window):
                return detail(429, "Rate limit exceeded", {"Retry-After": st.retry_after})
        return None

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return ...

    @app.post("/v1/miners/register")
    async def register(request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        miner_id = request.headers["x-miner-id"]
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("capabilities"), dict):
            return validation_error("capabilities: an object is required", "capabilities")
        conc = body.get("concurrency", 1)
        if not isinstance(conc, int) or conc < 1:
            return validation_error("concurrency: a positive integer", "concurrency")
        token = uuid.uuid4().hex
        with st.store.lock:
            old = st.store.one("SELECT registrations FROM miners WHERE miner_id = ?", (miner_id,))
            st.store.run("INSERT OR REPLACE INTO miners (miner_id, capabilities, concurrency, "
                         "region, session_token, inflight, status, last_seen, registrations) "
                         "VALUES (?, ?, ?, ?, ?, 0, 'REGISTERED', ?, ?)",
                         (miner_id, dumps(body["capabilities"]), conc, body.get("region"), token,
                          time.time(), (old["registrations"] + 1) if old else 1))
        return {"status": "ok", "session_token": token}

    @app.post("/v1/miners/heartbeat")
    async def heartbeat(request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        miner_id = request.headers["x-miner-id"]
        body = await body_of(request)
        if not isinstance(body, dict):
            return validation_error("a JSON object is required", "body")
        inflight = body.get("inflight", 0)
        if not isinstance(inflight, int) or inflight < 0:
            return validation_error("inflight: a non-negative integer", "inflight")
        cur = st.store.run("UPDATE miners SET inflight = ?, status = ?, last_seen = ? "
                           "WHERE miner_id = ?",
                           (inflight, str(body.get("status", "ONLINE")), time.time(), miner_id))
        if cur.rowcount == 0:
            return detail(404, "miner not registered")
        return {"status": "ok"}

    def _try_assign(miner_id: str) -> dict[str, Any] | None:
        with st.store.lock:
            st._requeue_stale()
            miner = st.store.one("SELECT * FROM miners WHERE miner_id = ?", (miner_id,))
            if miner is None or miner["status"] != "ONLINE" \
                    or miner["inflight"] >= miner["concurrency"]:
                return None
            caps = json.loads(miner["capabilities"])
            for row in st.store.all("SELECT * FROM jobs WHERE state = 'QUEUED' ORDER BY seq"):
                constraints = json.loads(row["constraints"])
                payload = json.loads(row["payload"])
                if not _matches(caps, constraints, payload):
                    continue
                st.store.run("UPDATE jobs SET state = 'RUNNING', miner_id = ?, assigned_at = ?, "
                             "assignments = assignments + 1 WHERE job_id = ?",
                             (miner_id, time.time(), row["job_id"]))
                st.store.run("UPDATE miners SET inflight = inflight + 1 WHERE miner_id = ?",
                             (miner_id,))
                return {"job_id": row["job_id"], "payload": payload, "constraints": constraints}
        return None

    @app.post("/v1/miners/poll")
    async def poll(request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        miner_id = request.headers["x-miner-id"]
        body = await body_of(request)
        if not isinstance(body, dict):
            return validation_error("a JSON body is required", "body", "missing")
        if st.miner(miner_id) is None:
            return JSONResponse(status_code=500, content={"detail": "Internal Server Error"})
        wait = body.get("max_wait_seconds", 0)
        if not isinstance(wait, int) or wait < 0:
            return validation_error("max_wait_seconds: a non-negative integer",
                                    "max_wait_seconds")
        deadline = time.monotonic() + min(wait, 10)
        while True:
            if await request.is_disconnected():
                return Response(status_code=204)
            job = _try_assign(miner_id)
            if job is not None:
                return job
            if time.monotonic() >= deadline:
                return Response(status_code=204)
            await asyncio.sleep(0.05)

    def _record(job_id: str, miner_id: str, kind: str, status: int, body: Any) -> None:
        st.store.run("INSERT INTO attempts (job_id, miner_id, kind, status, body, at) VALUES "
                     "(?, ?, ?, ?, ?, ?)", (job_id, miner_id, kind, status,
                                            dumps(body) if body is not ... else "<garbage>",
                                            time.time()))

    def _check_running(job_id: str, miner_id: str) -> JSONResponse | dict[str, Any]:
        row = st.store.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if row is None:
            return detail(404, "job not found")
        if row["state"] in ("COMPLETED", "FAILED") and row["miner_id"] == miner_id:
            return detail(409, f"job already {row['state'].lower()}")
        if row["state"] != "RUNNING" or row["miner_id"] != miner_id:
            return detail(409, "job is not running for this miner")
        return row

    @app.post("/v1/miners/{job_id}/result")
    async def result(job_id: str, request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        miner_id = request.headers["x-miner-id"]
        body = await body_of(request)
        st.result_arrivals += 1
        if st.delay_results > 0:
            st.delay_results -= 1
            await asyncio.sleep(st.result_delay)
            if not st.store_after_disconnect and await request.is_disconnected():
                _record(job_id, miner_id, "result", 499, body)
                return Response(status_code=499)
        if not isinstance(body, dict) or not isinstance(body.get("result"), dict):
            _record(job_id, miner_id, "result", 422, body)
            return validation_error("result: must be an object", "result", "type_error")
        metrics = body.get("metrics", {})
        if not isinstance(metrics, dict):
            _record(job_id, miner_id, "result", 422, body)
            return validation_error("metrics: must be an object", "metrics", "type_error")
        with st.store.lock:
            row = _check_running(job_id, miner_id)
            if isinstance(row, JSONResponse):
                _record(job_id, miner_id, "result", row.status_code, body)
                return row
            units = float(metrics.get("units", 0) or 0)
            receipt = {"job_id": job_id, "miner_id": miner_id, "units": units,
                       "unit_type": metrics.get("unit_type", "gpu_seconds"),
                       "price": units * UNIT_PRICE, "duration_ms": metrics.get("duration_ms"),
                       "signature": None}
            st.store.run("UPDATE jobs SET state = 'COMPLETED', result = ?, metrics = ?, "
                         "receipt = ? WHERE job_id = ?",
                         (dumps(body["result"]), dumps(metrics), dumps(receipt), job_id))
            st.store.run("UPDATE miners SET inflight = MAX(0, inflight - 1) WHERE miner_id = ?",
                         (miner_id,))
            _record(job_id, miner_id, "result", 200, body)
        return {"status": "ok", "receipt": receipt}

    @app.post("/v1/miners/{job_id}/fail")
    async def fail(job_id: str, request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        miner_id = request.headers["x-miner-id"]
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("error_code"), str):
            _record(job_id, miner_id, "fail", 422, body)
            return validation_error("error_code: a string is required", "error_code")
        with st.store.lock:
            row = _check_running(job_id, miner_id)
            if isinstance(row, JSONResponse):
                _record(job_id, miner_id, "fail", row.status_code, body)
                return row
            # As deployed: the miner's slot is NOT freed here.
            st.store.run("UPDATE jobs SET state = 'FAILED', error = ? WHERE job_id = ?",
                         (dumps(body), job_id))
            _record(job_id, miner_id, "fail", 200, body)
        return {"status": "ok"}

    @app.post("/v1/miners/{miner_id}/earnings")
    async def earnings(miner_id: str, request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        rows = st.store.all("SELECT job_id, metrics FROM jobs WHERE state = 'COMPLETED' AND "
                            "miner_id = ?", (miner_id,))
        history = [{"job_id": r["job_id"],
                    "amount": float(json.loads(r["metrics"]).get("units", 0)) * UNIT_PRICE}
                   for r in rows]
        total = sum(h["amount"] for h in history)
        return {"miner_id": miner_id, "total_earnings": total, "pending_earnings": total,
                "paid_earnings": 0.0, "completed_jobs": len(rows), "currency": "AITBC",
                "earnings_history": history}

    @app.put("/v1/miners/{miner_id}/capabilities")
    async def capabilities(miner_id: str, request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        body = await body_of(request)
        if not isinstance(body, dict) or not isinstance(body.get("capabilities"), dict):
            return validation_error("capabilities: an object is required", "capabilities")
        cur = st.store.run("UPDATE miners SET capabilities = ? WHERE miner_id = ?",
                           (dumps(body["capabilities"]), miner_id))
        if cur.rowcount == 0:
            return detail(404, "miner not registered")
        return {"miner_id": miner_id, "status": "updated"}

    @app.delete("/v1/miners/{miner_id}")
    async def deregister(miner_id: str, request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        cur = st.store.run("UPDATE miners SET status = 'DEREGISTERED' WHERE miner_id = ?",
                           (miner_id,))
        if cur.rowcount == 0:
            return detail(404, "miner not registered")
        return {"miner_id": miner_id, "status": "deregistered"}

    if faults is not None:
        app.add_middleware(FaultMiddleware, injector=faults, classify=classify)  # type: ignore[arg-type]
    return app
