"""Dialect ``aitbc``: the coordinator as deployed (PROTOCOLS.md, "Dialect aitbc").

Poll-based: a job is assigned at poll time (``204`` when there is none). Auth
is the operator's key plus the miner's own id on every call. A ``500`` from
poll can mean "not registered": the dialect then probes with a heartbeat,
whose ``404`` says so for certain, and raises :class:`MinerUnknownError` so the
agent registers again. After ``/fail`` the coordinator keeps the slot taken,
so the agent sends a heartbeat with the true in-flight count
(:attr:`heartbeat_after_failure`).

The deployed result route checks neither the job's state nor its owner: a
result sent twice is stored and paid twice. So a result is posted once
(``resend=False``: no blind retry after a timeout or a cut connection), and
before any second attempt :meth:`delivery` reads the miner's own job list
(``POST /v1/miners/{miner_id}/jobs?job_status=...``): COMPLETED (or FAILED, for
a failure) there means delivered, RUNNING means not yet, absent means the job
is no longer ours. The same list of RUNNING jobs gives :meth:`assigned_jobs`
(jobs assigned to us that a killed process never journalled) and
:meth:`still_assigned`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from engine.coordinator.base import (
    Ack,
    ArrivalHook,
    AssignedJob,
    Coordinator,
    Delivery,
    Identity,
    MinerUnknownError,
    build_job,
    public_message,
)
from engine.coordinator.capabilities import Capabilities
from engine.coordinator.client import CoordinatorClient, RateLimit
from engine.coordinator.errors import (
    ConflictError,
    NotFoundError,
    ProtocolError,
    ServerError,
)
from engine.jobs import JobResult

log = logging.getLogger(__name__)

#: Per endpoint over a sliding 60 s window.
AITBC_LIMITS: dict[str, RateLimit] = {
    "register": RateLimit(50, 60.0),
    "heartbeat": RateLimit(100, 60.0),
    "poll": RateLimit(100, 60.0),
    "result": RateLimit(50, 60.0),
    "fail": RateLimit(50, 60.0),
    "jobs": RateLimit(200, 60.0),
}

#: Jobs per page when reading the miner's job list, and the most pages read (newest first).
JOB_PAGE = 100
MAX_JOB_PAGES = 20


def result_metrics(result: JobResult) -> dict[str, Any]:
    """Metrics the coordinator prices from (``units``, ``unit_type``, ``duration_ms``) and evidence.

    ``units`` are the job's GPU seconds; on a CPU-only run they are its
    execution seconds with ``unit_type: "cpu_seconds"``.
    """
    m = result.metrics
    if m is None:
        return {"units": 0.0, "unit_type": "cpu_seconds", "duration_ms": 0,
                "execution_time_seconds": 0.0, "gpu_time_seconds": 0.0}
    on_gpu = m.device.startswith("cuda") or m.gpu_count > 0
    out: dict[str, Any] = {
        "units": m.gpu_time_seconds if on_gpu else m.execution_time_seconds,
        "unit_type": "gpu_seconds" if on_gpu else "cpu_seconds",
        "duration_ms": round(m.execution_time_seconds * 1000),
    }
    out.update(m.model_dump(mode="json", exclude_none=True))
    return out


class AitbcCoordinator(Coordinator):
    """The ``aitbc`` dialect: the miner chooses ``identity.miner_id``, the operator the key."""

    dialect = "aitbc"
    heartbeat_after_failure = True
    reports_assignment = True
    dedupes_results = False

    def __init__(self, client: CoordinatorClient, identity: Identity, *,
                 bearer: str | None = None) -> None:
        if not identity.miner_id:
            raise ValueError("the aitbc dialect needs a miner id (the miner chooses it)")
        super().__init__(client, identity)
        if bearer:
            client.set_header("Authorization", f"Bearer {bearer}")
        if identity.api_key:
            client.set_header("X-Api-Key", identity.api_key)
        client.set_header("X-Miner-ID", identity.miner_id)
        self._inflight = 0

    def scope(self) -> str:
        """The outbox scope: dialect, coordinator and the miner's chosen id."""
        return f"{self.dialect}|{self.base_url}|{self.identity.miner_id}"

    def _body(self, caps: Capabilities) -> dict[str, Any]:
        return {"capabilities": {"gpus": [{"name": g.name, "memory_mb": g.memory_mb}
                                          for g in caps.gpus],
                                 "cuda": caps.cuda_version or "",
                                 "models": list(caps.models), "price": caps.price_per_hour,
                                 "max_concurrent_jobs": caps.max_concurrent},
                "concurrency": caps.max_concurrent, "region": caps.location}

    def register(self, capabilities: Capabilities) -> dict[str, Any]:
        """``POST /v1/miners/register`` (an upsert; it resets the in-flight count)."""
        self.capabilities = capabilities
        reply = self.client.request("POST", "/v1/miners/register",
                                    json_body=self._body(capabilities), buckets=("register",))
        body = reply.body if isinstance(reply.body, dict) else {}
        token = body.get("session_token")
        if isinstance(token, str):
            self.identity.extra["session_token"] = token
        self._inflight = 0
        log.info("aitbc: registered %s at %s with %d model(s)", self.identity.miner_id,
                 self.base_url, len(capabilities.models))
        return body

    def heartbeat(self, inflight: int) -> dict[str, Any]:
        """``POST /v1/miners/heartbeat``; 404 raises :class:`MinerUnknownError`."""
        self._inflight = inflight
        try:
            reply = self.client.request(
                "POST", "/v1/miners/heartbeat", buckets=("heartbeat",),
                json_body={"inflight": inflight, "status": "ONLINE",
                           "metadata": {"engine": "aitbc-engine",
                                        "models": list(self.capabilities.models)
                                        if self.capabilities else []}})
        except NotFoundError as exc:
            raise MinerUnknownError(exc.message, status=404, route=exc.route,
                                    coordinator=exc.coordinator) from exc
        return reply.body if isinstance(reply.body, dict) else {}

    def next_job(self, *, wait_seconds: float = 0.0,
                 on_arrival: ArrivalHook | None = None) -> AssignedJob | None:
        """``POST /v1/miners/poll``: a job, or None on ``204``."""
        wait = max(0, int(wait_seconds))
        try:
            reply = self.client.request("POST", "/v1/miners/poll",
                                        json_body={"max_wait_seconds": wait}, buckets=("poll",),
                                        extra_read_seconds=wait, retry_server_errors=False)
        except ServerError:
            self.heartbeat(self._inflight)  # 404 here raises MinerUnknownError
            raise
        if reply.status == 204 or reply.body is None:
            return None
        body = reply.body
        if not isinstance(body, Mapping) or not isinstance(body.get("job_id"), str) \
                or not body["job_id"]:
            raise ProtocolError(f"{self.base_url} POST /v1/miners/poll: a job without a string "
                                f"job_id: {str(body)[:200]}", route="POST /v1/miners/poll",
                                coordinator=self.base_url)
        if on_arrival is not None:
            on_arrival(body["job_id"], body.get("payload"))
        return build_job(body["job_id"], body.get("payload"))

    def submit_result(self, job_id: str, body: dict[str, Any]) -> Ack:
        """``POST /v1/miners/{job_id}/result``; keeps the receipt when one comes."""
        try:
            reply = self.client.request("POST", f"/v1/miners/{job_id}/result", json_body=body,
                                        buckets=("result",), resend=False)
        except ConflictError as exc:
            if exc.uncertain:
                log.info("aitbc: job %s already holds a result from an earlier, cut-off attempt "
                         "of this submission", job_id)
                return Ack(duplicate=True)
            raise
        reply_body = reply.body if isinstance(reply.body, Mapping) else {}
        receipt = reply_body.get("receipt")
        return Ack(receipt=dict(receipt) if isinstance(receipt, Mapping) else None,
                   body=reply.body)

    def report_failure(self, job_id: str, body: dict[str, Any]) -> Ack:
        """``POST /v1/miners/{job_id}/fail`` (then the agent heartbeats the true in-flight)."""
        try:
            reply = self.client.request("POST", f"/v1/miners/{job_id}/fail", json_body=body,
                                        buckets=("fail",), resend=False)
        except ConflictError as exc:
            if exc.uncertain:
                return Ack(duplicate=True)
            raise
        return Ack(body=reply.body)

    def _jobs(self, status: str) -> list[Mapping[str, Any]]:
        """The miner's jobs in ``status``, newest first (up to ``JOB_PAGE * MAX_JOB_PAGES``).

        The deployed route answers a failed listing with 200 and an ``error`` key; that,
        and any reply without a ``jobs`` list, is a :class:`ProtocolError` (cannot say).
        """
        route = f"POST /v1/miners/{self.identity.miner_id}/jobs"
        found: list[Mapping[str, Any]] = []
        for page in range(MAX_JOB_PAGES):
            reply = self.client.request(
                "POST", f"/v1/miners/{self.identity.miner_id}/jobs?job_status={status}"
                f"&limit={JOB_PAGE}&offset={page * JOB_PAGE}", buckets=("jobs",))
            body = reply.body
            jobs = body.get("jobs") if isinstance(body, Mapping) else None
            if not isinstance(jobs, list) or (isinstance(body, Mapping) and body.get("error")):
                raise ProtocolError(f"{self.base_url} {route}: no job list in the reply "
                                    f"({str(body)[:200]})", route=route,
                                    coordinator=self.base_url)
            found += [j for j in jobs if isinstance(j, Mapping)
                      and isinstance(j.get("job_id"), str)]
            if len(jobs) < JOB_PAGE:
                break
        return found

    def delivery(self, job_id: str, kind: Literal["result", "failure"]) -> Delivery:
        """From the miner's job list: RUNNING → not delivered; COMPLETED (FAILED for a
        failure) → delivered; neither → no longer ours. Raises a CoordinatorError when the
        list cannot be read (the agent then keeps the body and asks again later)."""
        if any(j["job_id"] == job_id for j in self._jobs("RUNNING")):
            return "not_delivered"
        done = "COMPLETED" if kind == "result" else "FAILED"
        if any(j["job_id"] == job_id for j in self._jobs(done)):
            return "delivered"
        return "not_ours"

    def assigned_jobs(self) -> list[AssignedJob]:
        """The jobs RUNNING for this miner, with their payloads (from the job list)."""
        return [build_job(str(j["job_id"]), j.get("payload")) for j in self._jobs("RUNNING")]

    def still_assigned(self, job_ids: list[str]) -> dict[str, bool] | None:
        """Which of ``job_ids`` are RUNNING for this miner."""
        running = {j["job_id"] for j in self._jobs("RUNNING")}
        return {job_id: job_id in running for job_id in job_ids}

    def stats(self) -> dict[str, Any]:
        """``POST /v1/miners/{miner_id}/earnings``."""
        reply = self.client.request("POST", f"/v1/miners/{self.identity.miner_id}/earnings")
        return reply.body if isinstance(reply.body, dict) else {}

    def update_capabilities(self, capabilities: Capabilities) -> dict[str, Any]:
        """``PUT /v1/miners/{miner_id}/capabilities``."""
        self.capabilities = capabilities
        reply = self.client.request("PUT", f"/v1/miners/{self.identity.miner_id}/capabilities",
                                    json_body=self._body(capabilities))
        return reply.body if isinstance(reply.body, dict) else {}

    def deregister(self) -> bool:
        """``DELETE /v1/miners/{miner_id}``."""
        self.client.request("DELETE", f"/v1/miners/{self.identity.miner_id}")
        log.info("aitbc: deregistered %s", self.identity.miner_id)
        return True

    def result_body(self, result: JobResult) -> dict[str, Any]:
        """``{"result": {output, result_hash, execution_time, ...}, "metrics": {units, ...}}``."""
        m = result.metrics
        res: dict[str, Any] = {
            "output": result.output.model_dump(mode="json", exclude_none=True) if result.output
            else None,
            "result_hash": result.result_hash,
            "execution_time": m.execution_time_seconds if m else 0.0,
            "model": result.model, "task": result.task,
        }
        if result.profile is not None:
            res["profile"] = result.profile.model_dump(mode="json")
        if result.notes:
            res["notes"] = list(result.notes)  # payload keys ignored, stored with the result
        return {"result": res, "metrics": result_metrics(result)}

    def failure_body(self, job_id: str, code: str, message: str,
                     result: JobResult | None = None) -> dict[str, Any]:
        """``{"error_code", "error_message", "metrics"}``."""
        metrics = result_metrics(result) if result is not None else {
            "units": 0.0, "unit_type": "cpu_seconds", "duration_ms": 0}
        return {"error_code": code, "error_message": public_message(message)[:2000],
                "metrics": {k: v for k, v in metrics.items() if k in (
                    "units", "unit_type", "duration_ms", "execution_time_seconds",
                    "gpu_time_seconds")}}
