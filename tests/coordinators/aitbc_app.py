"""The ``aitbc`` coordinator as a real FastAPI app (PROTOCOLS.md, "Dialect aitbc").

SQLite-backed, and like the deployed coordinator where it matters (PROTOCOLS.md,
"Observed on the deployed coordinator"): poll assigns a job (QUEUED -> RUNNING)
or answers 204 at once (``max_wait_seconds`` is ignored), and may answer 204
while a job is queued (``prefer_other``: another miner preferred); a 500 in the
third error shape for an unregistered miner; the result route checks neither
the job's state nor its owner, so every copy of a result is stored, receipted
and priced again (``paid(job_id)`` counts them; every arrival is recorded in
``attempts``); the miner's job list by state (``POST
/v1/miners/{miner_id}/jobs?job_status=``, newest first, paged); rate limits
per client address and endpoint over a sliding window (429, ``Retry-After:
60``); errors in all three shapes. Jobs assigned longer than
``assignment_timeout`` ago go back to the queue.
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
                "capabilities": "capabilities", "jobs": "jobs"}.get(parts[3], "other")
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


def internal_error(kind: str, message: str, path: str) -> JSONResponse:
    """The third error shape, the deployed coordinator's answer to an unhandled exception."""
    return JSONResponse(status_code=500, content={"error": {
        "type": kind, "message": message, "status_code": 500, "path": path}})


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
        self.prefer_other = 0  # the next N polls that could assign a job answer 204
        self.list_fails = False  # the job list answers 200 with an "error" key, as deployed
        self.polls = 0
        self.requests: list[str] = []  # "METHOD path" of every authenticated-route request
        # Called at protocol points ("assigned", "result_arrived", "result_stored") with the
        # job id: a kill test stops the miner there.
        self.on_event: Any = None

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

    def paid(self, job_id: str) -> int:
        """How many times the job's result was stored, receipted and priced."""
        return sum(1 for a in self.attempts(job_id) if a["kind"] == "result"
                   and a["status"] == 200)

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
               delay_results: int = 0, store_after_disconnect: bool = True,
               signing_key: bytes | str | None = None) -> FastAPI:
    """The app; its state is ``app.state.coord`` (an :class:`AitbcCoordinatorState`).

    ``signing_key``: a 32-byte Ed25519 seed (raw, or hex as the deployed coordinator's
    ``receipt_signing_key_hex``); with it, receipts are signed as deployed.
    """
    app = FastAPI()
    st = AitbcCoordinatorState(db_path, api_keys=api_keys or {"test-operator-key"},
                               limits=limits or LIMITS, window=window, retry_after=retry_after,
                               assignment_timeout=assignment_timeout, result_delay=result_delay,
                               delay_results=delay_results,
                               store_after_disconnect=store_after_disconnect)
    app.state.coord = st

    def gate(request: Request) -> JSONResponse | None:
        """Auth, then the rate limit of the route (a plain call: keeps disconnects visible)."""
        st.requests.append(f"{request.method} {request.url.path}")
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
        st.polls += 1
        if st.miner(miner_id) is None:
            return internal_error("KeyError", "'miner not registered'", "/v1/miners/poll")
        wait = body.get("max_wait_seconds", 0)
        if not isinstance(wait, int) or wait < 0:
            return validation_error("max_wait_seconds: a non-negative integer",
                                    "max_wait_seconds")
        # As deployed: max_wait_seconds is accepted and ignored; the answer comes at once.
        if st.prefer_other > 0 and st.store.one("SELECT 1 FROM jobs WHERE state = 'QUEUED'"):
            st.prefer_other -= 1
            return Response(status_code=204)
        job = _try_assign(miner_id)
        if job is not None and st.on_event is not None:
            st.on_event("assigned", job["job_id"])
        return job if job is not None else Response(status_code=204)

    def _record(job_id: str, miner_id: str, kind: str, status: int, body: Any) -> None:
        st.store.run("INSERT INTO attempts (job_id, miner_id, kind, status, body, at) VALUES "
                     "(?, ?, ?, ?, ?, ?)", (job_id, miner_id, kind, status,
                                            dumps(body) if body is not ... else "<garbage>",
                                            time.time()))

    def _check_running(job_id: str, miner_id: str) -> JSONResponse | dict[str, Any]:
        # As deployed: only an unknown job is refused; neither the job's state nor its
        # owner is checked, so a result sent twice is stored and priced twice.
        row = st.store.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if row is None:
            return detail(404, "job not found")
        return row

    @app.post("/v1/miners/{job_id}/result")
    async def result(job_id: str, request: Request) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        miner_id = request.headers["x-miner-id"]
        body = await body_of(request)
        st.result_arrivals += 1
        if st.on_event is not None:
            st.on_event("result_arrived", job_id)
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
            if signing_key is not None:
                # As deployed: the deployed receipt's fields, then Ed25519 over canonical
                # JSON (None dropped at every depth, keys sorted, separators "," and ":",
                # ASCII), the signature as {"alg", "key_id", "sig"} in unpadded URL-safe
                # base64; zk_status and tee_status are added after signing.
                import base64
                from datetime import datetime, timezone

                from cryptography.hazmat.primitives.asymmetric.ed25519 import (
                    Ed25519PrivateKey,
                )
                from cryptography.hazmat.primitives.serialization import (
                    Encoding,
                    PublicFormat,
                )

                def _drop_none(v: Any) -> Any:
                    if isinstance(v, dict):
                        return {k: _drop_none(x) for k, x in v.items() if x is not None}
                    if isinstance(v, list):
                        return [_drop_none(x) for x in v if x is not None]
                    return v

                def _b64(raw: bytes) -> str:
                    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

                seed = bytes.fromhex(signing_key) if isinstance(signing_key, str) \
                    else signing_key
                signer = Ed25519PrivateKey.from_private_bytes(seed)
                unit_price = float(metrics.get("unit_price") or UNIT_PRICE)
                now = int(datetime.now(timezone.utc).timestamp())
                receipt = {
                    "version": "1.0", "receipt_id": uuid.uuid4().hex, "job_id": job_id,
                    "provider": miner_id, "miner_id": miner_id, "client": None,
                    "status": "COMPLETED", "units": units, "unit_type": receipt["unit_type"],
                    "unit_price": unit_price,
                    "price": float(metrics["price"]) if metrics.get("price") is not None
                    else round(units * unit_price, 6),
                    "duration_ms": metrics.get("duration_ms"), "completed_at": now,
                    "started_at": now - int(units),
                    "metadata": {"job_payload": json.loads(row["payload"]),
                                 "job_constraints": json.loads(row["constraints"]),
                                 "result": body["result"],
                                 "metrics": {**metrics, "duration_ms": int(units * 1000)}},
                }
                message = json.dumps(_drop_none(receipt), sort_keys=True,
                                     separators=(",", ":")).encode("utf-8")
                receipt["signature"] = {
                    "alg": "Ed25519",
                    "key_id": _b64(signer.public_key().public_bytes(Encoding.Raw,
                                                                    PublicFormat.Raw)),
                    "sig": _b64(signer.sign(message))}
                receipt["zk_status"] = "not_required"
                receipt["tee_status"] = "not_required"
            st.store.run("UPDATE jobs SET state = 'COMPLETED', result = ?, metrics = ?, "
                         "receipt = ? WHERE job_id = ?",
                         (dumps(body["result"]), dumps(metrics), dumps(receipt), job_id))
            st.store.run("UPDATE miners SET inflight = MAX(0, inflight - 1) WHERE miner_id = ?",
                         (miner_id,))
            _record(job_id, miner_id, "result", 200, body)
        if st.on_event is not None:
            st.on_event("result_stored", job_id)
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
            st.store.run("UPDATE jobs SET state = 'FAILED', error = ?, miner_id = ? "
                         "WHERE job_id = ?", (dumps(body), miner_id, job_id))
            _record(job_id, miner_id, "fail", 200, body)
        return {"status": "ok"}

    @app.post("/v1/miners/{miner_id}/jobs")
    async def miner_jobs(miner_id: str, request: Request, limit: int = 20, offset: int = 0,
                         job_status: str | None = None) -> Any:
        if (refused := gate(request)) is not None:
            return refused
        if st.list_fails:
            return {"jobs": [], "total": 0, "limit": limit, "offset": offset,
                    "miner_id": miner_id, "error": "Failed to list jobs"}
        sql, args = "SELECT job_id FROM jobs WHERE miner_id = ?", [miner_id]
        if job_status:
            sql += " AND state = ?"
            args.append(job_status.upper())
        rows = st.store.all(sql + " ORDER BY seq DESC LIMIT ? OFFSET ?",
                            (*args, limit, offset))
        jobs = [st.job(r["job_id"]) for r in rows]
        views = [{"job_id": j["job_id"], "state": j["state"], "assigned_miner_id": j["miner_id"],
                  "payload": j["payload"], "result": j["result"], "error": j["error"]}
                 for j in jobs]
        return {"jobs": views, "total": len(views), "limit": limit, "offset": offset,
                "miner_id": miner_id}

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
