"""Dialect ``aitbc``: the coordinator as deployed (PROTOCOLS.md, "Dialect aitbc").

Poll-based: a job is assigned at poll time (``204`` when there is none). Auth
is the operator's key plus the miner's own id on every call. A ``500`` from
poll can mean "not registered": the dialect then probes with a heartbeat,
whose ``404`` says so for certain, and raises :class:`MinerUnknownError` so the
agent registers again. After ``/fail`` the coordinator keeps the slot taken,
so the agent sends a heartbeat with the true in-flight count
(:attr:`heartbeat_after_failure`).

There is no per-job status call either: a job journalled as accepted whose
process died is re-run on restart and its result submitted; a ``404``/``409``
on that submission is the coordinator saying it no longer holds the job for
us, and the job is dropped with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from engine.coordinator.base import (
    Ack,
    AssignedJob,
    Coordinator,
    Identity,
    MinerUnknownError,
    build_job,
)
from engine.coordinator.capabilities import Capabilities
from engine.coordinator.client import CoordinatorClient, RateLimit
from engine.coordinator.errors import ConflictError, NotFoundError, ProtocolError, ServerError
from engine.jobs import JobResult

log = logging.getLogger(__name__)

#: Per endpoint over a sliding 60 s window.
AITBC_LIMITS: dict[str, RateLimit] = {
    "register": RateLimit(50, 60.0),
    "heartbeat": RateLimit(100, 60.0),
    "poll": RateLimit(100, 60.0),
    "result": RateLimit(50, 60.0),
    "fail": RateLimit(50, 60.0),
}


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

    def next_job(self, *, wait_seconds: float = 0.0) -> AssignedJob | None:
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
        return build_job(body["job_id"], body.get("payload"))

    def submit_result(self, job_id: str, body: dict[str, Any]) -> Ack:
        """``POST /v1/miners/{job_id}/result``; keeps the receipt when one comes."""
        try:
            reply = self.client.request("POST", f"/v1/miners/{job_id}/result", json_body=body,
                                        buckets=("result",))
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
                                        buckets=("fail",))
        except ConflictError as exc:
            if exc.uncertain:
                return Ack(duplicate=True)
            raise
        return Ack(body=reply.body)

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
            "output": result.output.model_dump(mode="json") if result.output else None,
            "result_hash": result.result_hash,
            "execution_time": m.execution_time_seconds if m else 0.0,
            "model": result.model, "task": result.task,
        }
        if result.profile is not None:
            res["profile"] = result.profile.model_dump(mode="json")
        return {"result": res, "metrics": result_metrics(result)}

    def failure_body(self, job_id: str, code: str, message: str,
                     result: JobResult | None = None) -> dict[str, Any]:
        """``{"error_code", "error_message", "metrics"}``."""
        metrics = result_metrics(result) if result is not None else {
            "units": 0.0, "unit_type": "cpu_seconds", "duration_ms": 0}
        return {"error_code": code, "error_message": message[:2000],
                "metrics": {k: v for k, v in metrics.items() if k in (
                    "units", "unit_type", "duration_ms", "execution_time_seconds",
                    "gpu_time_seconds")}}
