"""The ``doc`` coordinator as a real FastAPI app (PROTOCOLS.md, "Dialect doc").

SQLite-backed. Registration issues a miner id and an api key; every later call
needs ``X-Api-Key`` (or ``Authorization: Bearer``). Jobs are listed and
accepted (409 when already assigned), completed once (a second complete is a
409), with 404 for an unknown miner or job, 422 from body validation, and the
published rate limits per miner: 60 requests and 10 job operations (accept,
complete) per window, 429 with ``Retry-After`` over them. There is no fail
endpoint, as in the reference.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinators.faults import FaultInjector, FaultMiddleware
from coordinators.store import SlidingWindow, Store, dumps

SCHEMA = """
CREATE TABLE IF NOT EXISTS miners (miner_id TEXT PRIMARY KEY, api_key TEXT NOT NULL,
    name TEXT, gpu_type TEXT, gpu_count INTEGER, location TEXT, price_per_hour REAL,
    max_concurrent INTEGER, status TEXT NOT NULL, jobs_running INTEGER DEFAULT 0,
    last_seen REAL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE,
    model TEXT, gpu_type TEXT, gpu_count INTEGER, estimated_time REAL, price REAL,
    payload TEXT NOT NULL, state TEXT NOT NULL, miner_id TEXT, result_hash TEXT,
    metrics TEXT, assigned_at REAL, completed_at REAL);
CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT,
    miner_id TEXT, status INTEGER, body TEXT, at REAL);
"""


class MinerFields(BaseModel):
    """The register body."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1)]
    gpu_type: Annotated[str, Field(min_length=1)]
    gpu_count: Annotated[int, Field(ge=0)]
    location: str
    price_per_hour: Annotated[float, Field(ge=0)]
    max_concurrent: Annotated[int, Field(ge=1)]


class MinerUpdate(BaseModel):
    """Any subset of the register fields."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    gpu_type: str | None = None
    gpu_count: int | None = None
    location: str | None = None
    price_per_hour: float | None = None
    max_concurrent: int | None = None


class CompleteMetrics(BaseModel):
    """Metrics of a completed job."""

    execution_time_seconds: Annotated[float, Field(ge=0)]
    gpu_time_seconds: Annotated[float, Field(ge=0)]


class CompleteBody(BaseModel):
    """The complete body."""

    result_hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    metrics: CompleteMetrics


def classify(method: str, path: str) -> str:
    """The route name of a request."""
    parts = path.strip("/").split("/")
    if parts[-1] in ("accept", "complete", "fail", "heartbeat", "stats", "available"):
        return parts[-1]
    if len(parts) == 2 and method == "POST":
        return "register"
    if len(parts) == 3 and method == "PUT":
        return "update"
    return "other"


def detail(status: int, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error shape."""
    return JSONResponse(status_code=status, content={"detail": text}, headers=headers)


class DocCoordinatorState:
    """The coordinator's data and knobs; test helpers queue jobs and inspect."""

    def __init__(self, db_path: Path, *, limit_all: int, limit_jobs: int, window: float,
                 steal_after_list: set[str]) -> None:
        self.store = Store(db_path, SCHEMA)
        self.limit_all = limit_all
        self.limit_jobs = limit_jobs
        self.window = window
        self.rate = SlidingWindow()
        self.steal_after_list = steal_after_list
        self.requests: list[tuple[float, str, str]] = []  # (time, miner, route) accepted

    def add_job(self, payload: Any, *, job_id: str | None = None, model: str | None = None,
                gpu_type: str | None = None, gpu_count: int = 1, estimated_time: float = 10,
                price: float = 0.01) -> str:
        """List a job; returns its id."""
        job_id = job_id or f"job_{uuid.uuid4().hex[:12]}"
        if model is None and isinstance(payload, dict):
            model = payload.get("model") or (payload.get("service_request") or {}).get("model")
        self.store.run("INSERT INTO jobs (job_id, model, gpu_type, gpu_count, estimated_time, "
                       "price, payload, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'available')",
                       (job_id, model, gpu_type, gpu_count, estimated_time, price,
                        dumps(payload)))
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        """A job row."""
        row = self.store.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        assert row is not None, job_id
        for k in ("payload", "metrics"):
            if row[k] is not None:
                row[k] = json.loads(row[k])
        return row

    def attempts(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Every complete arrival."""
        if job_id is None:
            return self.store.all("SELECT * FROM attempts ORDER BY id")
        return self.store.all("SELECT * FROM attempts WHERE job_id = ? ORDER BY id", (job_id,))

    def miners(self) -> list[dict[str, Any]]:
        """Every miner."""
        return self.store.all("SELECT * FROM miners")

    def revoke(self, miner_id: str) -> None:
        """Revoke a miner's key (its calls get 401 from now on)."""
        self.store.run("UPDATE miners SET revoked = 1 WHERE miner_id = ?", (miner_id,))


def create_app(db_path: Path, *, limit_all: int = 60, limit_jobs: int = 10,
               window: float = 60.0, faults: FaultInjector | None = None,
               steal_after_list: set[str] | None = None) -> FastAPI:
    """The app; its state is ``app.state.coord`` (a :class:`DocCoordinatorState`)."""
    app = FastAPI()
    st = DocCoordinatorState(db_path, limit_all=limit_all, limit_jobs=limit_jobs, window=window,
                             steal_after_list=steal_after_list or set())
    app.state.coord = st

    def key_of(request: Request) -> str | None:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:]
        return key

    def limited(who: str, route: str) -> JSONResponse | None:
        wait = st.rate.hit(who, "all", st.limit_all, st.window)
        if not wait and route in ("accept", "complete"):
            wait = st.rate.hit(who, "job", st.limit_jobs, st.window)
        if wait:
            return detail(429, "rate limit exceeded", {"Retry-After": str(math.ceil(wait))})
        st.requests.append((time.monotonic(), who, route))
        return None

    def miner_or_error(miner_id: str, request: Request, route: str
                       ) -> dict[str, Any] | JSONResponse:
        miner = st.store.one("SELECT * FROM miners WHERE miner_id = ?", (miner_id,))
        if miner is None:
            return detail(404, f"miner {miner_id} not found")
        if key_of(request) != miner["api_key"] or miner["revoked"]:
            return detail(401, "invalid or revoked api key")
        over = limited(miner_id, route)
        return over if over is not None else miner

    @app.post("/v1/miners")
    async def register(fields: MinerFields, request: Request) -> Any:
        over = limited(request.client.host if request.client else "?", "register")
        if over is not None:
            return over
        miner_id = f"miner_{uuid.uuid4().hex[:10]}"
        api_key = f"key_{uuid.uuid4().hex}"
        st.store.run("INSERT INTO miners (miner_id, api_key, name, gpu_type, gpu_count, "
                     "location, price_per_hour, max_concurrent, status, last_seen) VALUES "
                     "(?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                     (miner_id, api_key, fields.name, fields.gpu_type, fields.gpu_count,
                      fields.location, fields.price_per_hour, fields.max_concurrent,
                      time.time()))
        return {"miner_id": miner_id, "api_key": api_key, "status": "pending"}

    @app.put("/v1/miners/{miner_id}")
    async def update(miner_id: str, fields: MinerUpdate, request: Request) -> Any:
        miner = miner_or_error(miner_id, request, "update")
        if isinstance(miner, JSONResponse):
            return miner
        changes = fields.model_dump(exclude_none=True)
        for k, v in changes.items():
            st.store.run(f"UPDATE miners SET {k} = ? WHERE miner_id = ?", (v, miner_id))
        row = st.store.one("SELECT * FROM miners WHERE miner_id = ?", (miner_id,)) or {}
        row.pop("api_key", None)
        return row

    @app.post("/v1/miners/{miner_id}/heartbeat")
    async def heartbeat(miner_id: str, request: Request) -> Any:
        miner = miner_or_error(miner_id, request, "heartbeat")
        if isinstance(miner, JSONResponse):
            return miner
        raw = await request.body()
        body = json.loads(raw) if raw.strip() else {}
        running = body.get("jobs_running", 0) if isinstance(body, dict) else 0
        st.store.run("UPDATE miners SET status = 'active', jobs_running = ?, last_seen = ? "
                     "WHERE miner_id = ?", (running, time.time(), miner_id))
        assigned = st.store.one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'assigned' AND "
                                "miner_id = ?", (miner_id,)) or {"n": 0}
        queued = st.store.one("SELECT COUNT(*) AS n FROM jobs WHERE state = 'available'") \
            or {"n": 0}
        return {"status": "ok", "jobs_assigned": assigned["n"], "queue_length": queued["n"]}

    @app.get("/v1/miners/{miner_id}/jobs/available")
    async def available(miner_id: str, request: Request) -> Any:
        miner = miner_or_error(miner_id, request, "available")
        if isinstance(miner, JSONResponse):
            return miner
        rows = st.store.all("SELECT * FROM jobs WHERE state = 'available' ORDER BY seq LIMIT 20")
        listing = [{"job_id": r["job_id"], "model": r["model"], "gpu_type": r["gpu_type"],
                    "gpu_count": r["gpu_count"], "estimated_time": r["estimated_time"],
                    "price": r["price"]} for r in rows]
        for job_id in list(st.steal_after_list):  # another miner is faster
            st.store.run("UPDATE jobs SET state = 'assigned', miner_id = 'miner_other' "
                         "WHERE job_id = ? AND state = 'available'", (job_id,))
            st.steal_after_list.discard(job_id)
        return {"jobs": listing}

    @app.post("/v1/miners/{miner_id}/jobs/{job_id}/accept")
    async def accept(miner_id: str, job_id: str, request: Request) -> Any:
        miner = miner_or_error(miner_id, request, "accept")
        if isinstance(miner, JSONResponse):
            return miner
        with st.store.lock:
            row = st.store.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
            if row is None:
                return detail(404, f"job {job_id} not found")
            if row["state"] != "available":
                return detail(409, "job already assigned")
            st.store.run("UPDATE jobs SET state = 'assigned', miner_id = ?, assigned_at = ? "
                         "WHERE job_id = ?", (miner_id, time.time(), job_id))
        return {"job_id": job_id, "model": row["model"], "gpu_type": row["gpu_type"],
                "gpu_count": row["gpu_count"], "estimated_time": row["estimated_time"],
                "price": row["price"], "status": "assigned",
                "payload": json.loads(row["payload"])}

    @app.post("/v1/miners/{miner_id}/jobs/{job_id}/complete")
    async def complete(miner_id: str, job_id: str, request: Request) -> Any:
        miner = miner_or_error(miner_id, request, "complete")
        if isinstance(miner, JSONResponse):
            return miner
        raw = await request.body()
        try:
            body = CompleteBody.model_validate_json(raw)
        except ValidationError as exc:  # FastAPI's 422 shape
            errors = exc.errors()
            st.store.run("INSERT INTO attempts (job_id, miner_id, status, body, at) VALUES "
                         "(?, ?, 422, ?, ?)", (job_id, miner_id, raw.decode(errors="replace"),
                                               time.time()))
            return JSONResponse(status_code=422, content={"detail": [
                {"loc": ["body", *map(str, e.get("loc", ()))], "msg": e.get("msg"),
                 "type": e.get("type", "value_error")} for e in errors]})
        with st.store.lock:
            row = st.store.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
            status = 200
            if row is None:
                status, reply = 404, detail(404, f"job {job_id} not found")
            elif row["state"] == "completed" and row["miner_id"] == miner_id:
                status, reply = 409, detail(409, "job already completed")
            elif row["state"] != "assigned" or row["miner_id"] != miner_id:
                status, reply = 409, detail(409, "job not assigned to this miner")
            else:
                st.store.run("UPDATE jobs SET state = 'completed', result_hash = ?, metrics = ?, "
                             "completed_at = ? WHERE job_id = ?",
                             (body.result_hash, dumps(body.metrics.model_dump()), time.time(),
                              job_id))
            st.store.run("INSERT INTO attempts (job_id, miner_id, status, body, at) VALUES "
                         "(?, ?, ?, ?, ?)", (job_id, miner_id, status, raw.decode(),
                                             time.time()))
        if status != 200:
            return reply
        return {"status": "ok", "job_id": job_id}

    @app.get("/v1/miners/{miner_id}/stats")
    async def stats(miner_id: str, request: Request) -> Any:
        miner = miner_or_error(miner_id, request, "stats")
        if isinstance(miner, JSONResponse):
            return miner
        rows = st.store.all("SELECT * FROM jobs WHERE miner_id = ?", (miner_id,))
        done = [r for r in rows if r["state"] == "completed"]
        times = [json.loads(r["metrics"])["execution_time_seconds"] for r in done]
        earnings = sum(r["price"] or 0 for r in done)
        return {"total_jobs": len(rows), "success_rate": len(done) / len(rows) if rows else 0.0,
                "average_completion_time": sum(times) / len(times) if times else 0.0,
                "earnings": earnings, "earnings_per_gpu_hour": 0.0}

    if faults is not None:
        app.add_middleware(FaultMiddleware, injector=faults, classify=classify)  # type: ignore[arg-type]
    return app
