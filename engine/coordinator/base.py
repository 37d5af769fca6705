"""The one coordinator interface both dialects implement, and the types it passes around."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.coordinator.capabilities import Capabilities
from engine.coordinator.client import CoordinatorClient
from engine.coordinator.errors import NotFoundError, redact
from engine.errors import EngineError, InvalidJobError
from engine.jobs import Job, JobResult
from engine.payloads import parse_payload

log = logging.getLogger(__name__)


class MinerUnknownError(NotFoundError):
    """The coordinator does not know this miner (anymore): register again."""

    code = "coordinator_miner_unknown"


@dataclass(frozen=True)
class AssignedJob:
    """A job the coordinator gave this miner: parsed into ``job``, or ``error`` saying why not."""

    job_id: str
    payload: Any
    job: Job | None = None
    error: EngineError | None = None
    model: str | None = None


@dataclass(frozen=True)
class Ack:
    """The coordinator's acknowledgement of a result or failure."""

    receipt: dict[str, Any] | None = None
    duplicate: bool = False  # the coordinator already held it from an earlier, cut-off attempt
    reported: bool = True  # False when the dialect cannot report it (the job is left to expire)
    body: Any = None


@dataclass
class Identity:
    """Who this miner is to the coordinator; persisted in the state dir between runs."""

    miner_id: str | None = None
    api_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Identity(miner_id={self.miner_id!r}, api_key={redact(self.api_key)!r})"


def build_job(job_id: str, payload: Any, *, model_hint: str | None = None) -> AssignedJob:
    """Parse a coordinator payload into an :class:`AssignedJob`; never raises."""
    try:
        if isinstance(payload, Mapping) and model_hint and "model" not in payload \
                and "service_type" not in payload and payload.get("type") in ("inference",
                                                                               "embedding"):
            payload = {**payload, "model": model_hint}
        job = parse_payload(payload, job_id=job_id)
    except InvalidJobError as exc:
        return AssignedJob(job_id, payload, error=exc, model=model_hint)
    return AssignedJob(job_id, payload, job=job, model=job.model)


def num(value: Any) -> float:
    """A finite float from a metric value (0.0 for None)."""
    return float(value) if value is not None else 0.0


class Coordinator(ABC):
    """A coordinator seen through one dialect. Every call raises a typed ``CoordinatorError``.

    The dialect maps the interface onto its wire protocol, coordinator
    payloads onto engine jobs (:func:`build_job`) and :class:`JobResult`\\ s
    onto result bodies (:meth:`result_body`, :meth:`failure_body`). Bodies are
    built before they are journalled, so the outbox replays the exact bytes.
    """

    dialect: str = ""
    #: whether a failure report leaves the miner's slot taken (send a heartbeat after it)
    heartbeat_after_failure: bool = False
    #: whether the coordinator can be asked if a job is still assigned to us
    reports_assignment: bool = False

    def __init__(self, client: CoordinatorClient, identity: Identity) -> None:
        self.client = client
        self.identity = identity
        self.capabilities: Capabilities | None = None

    @property
    def base_url(self) -> str:
        """The coordinator's base URL."""
        return self.client.base_url

    @property
    def miner_id(self) -> str | None:
        """This miner's id at the coordinator (None before a ``doc`` registration)."""
        return self.identity.miner_id

    def scope(self) -> str:
        """The outbox scope: the dialect and coordinator (and, where chosen, the miner id)."""
        return f"{self.dialect}|{self.base_url}"

    @abstractmethod
    def register(self, capabilities: Capabilities) -> dict[str, Any]:
        """Register (or re-register) this miner with ``capabilities``."""

    @abstractmethod
    def heartbeat(self, inflight: int) -> dict[str, Any]:
        """Tell the coordinator we are alive, with the true in-flight count."""

    @abstractmethod
    def next_job(self, *, wait_seconds: float = 0.0) -> AssignedJob | None:
        """Take the next job this machine can run, or None when there is none."""

    @abstractmethod
    def submit_result(self, job_id: str, body: dict[str, Any]) -> Ack:
        """Submit a journalled result body."""

    @abstractmethod
    def report_failure(self, job_id: str, body: dict[str, Any]) -> Ack:
        """Report a failed job (``Ack.reported`` False where the dialect has no way)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """The coordinator's statistics or earnings for this miner."""

    @abstractmethod
    def deregister(self) -> bool:
        """Leave the network where the dialect allows; False where it has no such call."""

    @abstractmethod
    def result_body(self, result: JobResult) -> dict[str, Any]:
        """The wire body that submits a completed result."""

    @abstractmethod
    def failure_body(self, job_id: str, code: str, message: str,
                     result: JobResult | None = None) -> dict[str, Any]:
        """The wire body that reports a failure."""

    def still_assigned(self, job_ids: list[str]) -> dict[str, bool] | None:
        """Which of ``job_ids`` the coordinator shows still assigned to us; None: cannot say."""
        return None

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()
