"""Dialect ``doc``: the published Miner API reference (PROTOCOLS.md, "Dialect doc").

Registration hands out the ``miner_id`` and ``api_key``; both are kept in the
agent's state dir so a restarted miner keeps its identity (a 404 on it means
register again). Jobs are listed, filtered to what this machine can run, and
accepted one at a time; a 409 on accept skips to the next one.

The reference has no fail endpoint: :meth:`DocCoordinator.report_failure`
tries ``POST .../jobs/{id}/fail`` once, and on 404/405 logs that the job is
left to expire and stops trying. It also has no per-job status call; the one
thing it says is ``jobs_assigned`` in the heartbeat reply, which
:meth:`still_assigned` uses: 0 means nothing is assigned to us any more.

A resent completion is answered 409 (the reference's "already assigned"), so
results are never paid twice here (:attr:`dedupes_results`). A coordinator
that answers ``POST /v1/miners`` with 401, 404 or 405 and ``PUT
/v1/miners/{id}`` with 405 does not serve this protocol at all (the deployed
``aitbc`` coordinator does exactly that): :class:`DialectMismatchError` says so
instead of blaming the key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from engine.coordinator.base import (
    Ack,
    ArrivalHook,
    AssignedJob,
    Coordinator,
    Identity,
    MinerUnknownError,
    build_job,
    miner_update_status,
    num,
    public_message,
)
from engine.coordinator.capabilities import Capabilities
from engine.coordinator.client import CoordinatorClient, RateLimit, Reply
from engine.coordinator.errors import (
    ConflictError,
    CoordinatorError,
    DialectMismatchError,
    NotFoundError,
    ProtocolError,
    UnauthorizedError,
    redact,
)
from engine.errors import InvalidJobError
from engine.jobs import JobResult

log = logging.getLogger(__name__)

#: 60 requests per minute in all, 10 job operations (accept, complete) per minute; the
#: client's window is a second longer than the coordinator's to absorb network jitter.
DOC_LIMITS: dict[str, RateLimit] = {
    "all": RateLimit(60, 61.0, burst=10),
    "job": RateLimit(10, 61.0, burst=2),
}

ANY_GPU = {None, "", "any", "*"}


class DocCoordinator(Coordinator):
    """The ``doc`` dialect over a :class:`CoordinatorClient`; ``name`` is the miner's name."""

    dialect = "doc"
    reports_assignment = True
    dedupes_results = True
    issues_keys = True

    def __init__(self, client: CoordinatorClient, identity: Identity | None = None, *,
                 name: str = "aitbc-engine", bearer: bool = False,
                 max_accept_tries: int = 3) -> None:
        super().__init__(client, identity or Identity())
        self.name = name
        self.bearer = bearer
        self.max_accept_tries = max_accept_tries
        self._fail_endpoint = True
        self._last_heartbeat: dict[str, Any] = {}
        self._use_key(self.identity.api_key)

    def _use_key(self, key: str | None) -> None:
        if self.bearer:
            self.client.set_header("Authorization", f"Bearer {key}" if key else None)
        else:
            self.client.set_header("X-Api-Key", key)

    def _miner_path(self, suffix: str = "") -> str:
        if not self.identity.miner_id:
            raise MinerUnknownError("doc: this miner has no miner_id yet; register first")
        return f"/v1/miners/{self.identity.miner_id}{suffix}"

    def _call(self, method: str, path: str, *, job_route: bool = False,
              body: Any = None, send_body: bool = False) -> Reply:
        buckets = ("all", "job") if job_route else ("all",)
        try:
            return self.client.request(method, path, json_body=body, send_body=send_body,
                                       buckets=buckets)
        except MinerUnknownError:
            raise
        except NotFoundError as exc:
            # "404: miner or job not found": on a job route, only a message naming the
            # miner means the miner; anywhere else the miner is what is missing.
            if not job_route or "miner" in exc.message.lower():
                raise MinerUnknownError(exc.message, status=404, route=exc.route,
                                        coordinator=exc.coordinator) from exc
            raise

    def _fields(self, caps: Capabilities) -> dict[str, Any]:
        return {"name": self.name, "gpu_type": caps.gpu_type, "gpu_count": caps.gpu_count,
                "location": caps.location or "unknown", "price_per_hour": caps.price_per_hour,
                "max_concurrent": caps.max_concurrent}

    def register(self, capabilities: Capabilities) -> dict[str, Any]:
        """Update the saved identity's fields, or register a new miner (404 on the old one)."""
        self.capabilities = capabilities
        fields = self._fields(capabilities)
        if self.identity.miner_id and self.identity.api_key:
            try:
                reply = self._call("PUT", self._miner_path(), body=fields)
                log.info("doc: miner %s updated at %s", self.identity.miner_id, self.base_url)
                return reply.body if isinstance(reply.body, dict) else {}
            except MinerUnknownError:
                log.warning("doc: %s no longer knows miner %s; registering again",
                            self.base_url, self.identity.miner_id)
        self._use_key(None)
        try:
            reply = self.client.request("POST", "/v1/miners", json_body=fields)
        except (UnauthorizedError, NotFoundError) as exc:
            self._check_served("POST /v1/miners", exc)
            raise
        body = reply.body
        if not isinstance(body, Mapping) or not isinstance(body.get("miner_id"), str) \
                or not isinstance(body.get("api_key"), str):
            raise ProtocolError(f"{self.base_url} POST /v1/miners: registration reply lacks "
                                f"miner_id/api_key: {str(body)[:200]}", route="POST /v1/miners",
                                coordinator=self.base_url)
        self.identity.miner_id = body["miner_id"]
        self.identity.api_key = body["api_key"]
        self._use_key(self.identity.api_key)
        log.info("doc: registered as %s at %s (key %s, status %s)", self.identity.miner_id,
                 self.base_url, redact(self.identity.api_key), body.get("status"))
        return dict(body)

    def _check_served(self, what: str, exc: CoordinatorError) -> None:
        """After a 401/404/405 on registration: raise :class:`DialectMismatchError` when the
        coordinator does not serve this protocol's miner routes at all (``PUT
        /v1/miners/{id}`` → 404/405, where a doc coordinator checks the key first)."""
        if exc.status not in (401, 404, 405):
            return
        try:
            update = miner_update_status(self.client)
        except CoordinatorError:
            return  # the probe says nothing: the registration's own error stands
        if update in (404, 405):
            raise DialectMismatchError(
                f"this coordinator ({self.base_url}) does not serve the doc protocol ({what} → "
                f"{exc.status}, PUT /v1/miners/{{id}} → {update}); try --dialect aitbc",
                status=exc.status, route=what, coordinator=self.base_url) from exc

    def heartbeat(self, inflight: int) -> dict[str, Any]:
        """``POST /v1/miners/{id}/heartbeat`` with ``jobs_running``."""
        reply = self._call("POST", self._miner_path("/heartbeat"),
                           body={"jobs_running": inflight, "status": "online"})
        self._last_heartbeat = reply.body if isinstance(reply.body, dict) else {}
        return self._last_heartbeat

    def _wanted(self, item: Any) -> bool:
        if not isinstance(item, Mapping) or not isinstance(item.get("job_id"), str):
            log.warning("doc: skipping a listed job that is not an object with a job_id: %.200s",
                        item)
            return False
        caps = self.capabilities
        if caps is None:
            return True
        if not caps.can_run(item.get("model") if isinstance(item.get("model"), str) else None):
            return False
        gpu_type = item.get("gpu_type")
        if gpu_type not in ANY_GPU and gpu_type != caps.gpu_type:
            return False
        count = item.get("gpu_count", 1)
        return isinstance(count, int) and count <= max(1, caps.gpu_count)

    def next_job(self, *, wait_seconds: float = 0.0,
                 on_arrival: ArrivalHook | None = None) -> AssignedJob | None:
        """List available jobs, keep those this machine can run, accept the first one free."""
        reply = self._call("GET", self._miner_path("/jobs/available"))
        body = reply.body
        jobs = body.get("jobs") if isinstance(body, Mapping) else None
        if not isinstance(jobs, list):
            raise ProtocolError(f"{self.base_url} GET jobs/available: expected "
                                f"{{'jobs': [...]}}, got {str(body)[:200]}",
                                route="GET jobs/available", coordinator=self.base_url)
        tries = 0
        for item in jobs:
            if not self._wanted(item):
                continue
            if tries >= self.max_accept_tries:
                break
            tries += 1
            job_id = item["job_id"]
            try:
                accepted = self._call("POST", self._miner_path(f"/jobs/{job_id}/accept"),
                                      job_route=True)
            except ConflictError:
                log.info("doc: job %s already assigned to another miner; next", job_id)
                continue
            except NotFoundError:
                log.info("doc: job %s vanished before accept; next", job_id)
                continue
            if on_arrival is not None:
                body = accepted.body
                on_arrival(job_id, body.get("payload", body.get("input"))
                           if isinstance(body, Mapping) else body)
            return self._assigned(job_id, item, accepted.body)
        return None

    def _assigned(self, job_id: str, listed: Mapping[str, Any], body: Any) -> AssignedJob:
        hint = listed.get("model") if isinstance(listed.get("model"), str) else None
        if not isinstance(body, Mapping):
            return AssignedJob(job_id, body, model=hint, error=InvalidJobError(
                f"the coordinator's accept reply for job {job_id} is not a job object: "
                f"{str(body)[:120]}"))
        payload = body.get("payload", body.get("input"))
        if payload is None:
            return AssignedJob(job_id, body, model=hint, error=InvalidJobError(
                f"job {job_id} has no 'payload' (or 'input') in the accept reply",
                field="payload"))
        return build_job(job_id, payload, model_hint=hint)

    def submit_result(self, job_id: str, body: dict[str, Any]) -> Ack:
        """``POST .../jobs/{id}/complete``; a 409 after a cut-off attempt is our own result."""
        try:
            reply = self._call("POST", self._miner_path(f"/jobs/{job_id}/complete"),
                               job_route=True, body=body)
        except ConflictError as exc:
            if exc.uncertain:
                log.info("doc: job %s was already completed by an earlier, cut-off attempt "
                         "of this submission", job_id)
                return Ack(duplicate=True)
            raise
        return Ack(body=reply.body)

    def report_failure(self, job_id: str, body: dict[str, Any]) -> Ack:
        """The reference has no fail call: try once; on 404/405 let the job expire."""
        if not self._fail_endpoint:
            log.warning("doc: job %s failed (%s); the coordinator has no fail endpoint, so the "
                        "job is left to expire", job_id, body.get("error_code"))
            return Ack(reported=False)
        try:
            reply = self.client.request("POST", self._miner_path(f"/jobs/{job_id}/fail"),
                                        json_body=body, buckets=("all", "job"))
        except NotFoundError as exc:
            self._fail_endpoint = False
            log.warning("doc: job %s failed (%s); %s has no fail endpoint (%s), so the job is "
                        "left to expire", job_id, body.get("error_code"), self.base_url,
                        exc.status)
            return Ack(reported=False)
        return Ack(body=reply.body)

    def stats(self) -> dict[str, Any]:
        """``GET /v1/miners/{id}/stats``."""
        reply = self._call("GET", self._miner_path("/stats"))
        return reply.body if isinstance(reply.body, dict) else {}

    def deregister(self) -> bool:
        """The reference has no deregister call; the miner just stops heartbeating."""
        log.info("doc: %s has no deregister call; miner %s simply goes quiet", self.base_url,
                 self.identity.miner_id)
        return False

    def still_assigned(self, job_ids: list[str]) -> dict[str, bool] | None:
        """From the heartbeat's ``jobs_assigned``: 0 means none is; otherwise it cannot say."""
        beat = self.heartbeat(0)
        assigned = beat.get("jobs_assigned")
        if isinstance(assigned, int) and assigned == 0:
            return {j: False for j in job_ids}
        return None

    def result_body(self, result: JobResult) -> dict[str, Any]:
        """``{"result_hash", "metrics": {"execution_time_seconds", "gpu_time_seconds"}}``."""
        m = result.metrics
        return {"result_hash": result.result_hash,
                "metrics": {"execution_time_seconds": num(m.execution_time_seconds if m else 0),
                            "gpu_time_seconds": num(m.gpu_time_seconds if m else 0)}}

    def failure_body(self, job_id: str, code: str, message: str,
                     result: JobResult | None = None) -> dict[str, Any]:
        """A failure body in the ``aitbc`` shape (the reference defines none)."""
        m = result.metrics if result is not None else None
        return {"error_code": code, "error_message": public_message(message)[:2000],
                "metrics": {"execution_time_seconds": num(m.execution_time_seconds if m else 0),
                            "gpu_time_seconds": num(m.gpu_time_seconds if m else 0)}}
