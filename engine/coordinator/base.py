"""The one coordinator interface both dialects implement, and the types it passes around."""

from __future__ import annotations

import contextlib
import getpass
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.coordinator.capabilities import Capabilities
from engine.coordinator.client import CoordinatorClient
from engine.coordinator.errors import (
    CoordinatorError,
    CoordinatorUnavailableError,
    NotFoundError,
    ServerError,
    redact,
)
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


#: What a coordinator says of a result we may already have delivered.
#: ``delivered``: it holds our result (or failure) for the job: never send it again;
#: ``not_delivered``: the job is still running for us: sending is safe;
#: ``not_ours``: the job is no longer ours (expired, cancelled, finished elsewhere): drop it;
#: ``unknown``: it cannot be asked or did not answer: keep the body and ask again later.
Delivery = Literal["delivered", "not_delivered", "not_ours", "unknown"]

#: Called by :meth:`Coordinator.next_job` with ``(job_id, payload)`` the moment a job's
#: bytes are decoded, before anything else (the agent journals it there).
ArrivalHook = Callable[[str, Any], None]

_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])(?:~|/)[^\s'\"<>|,;()]*[^\s'\"<>|,;().]")


def public_message(message: str) -> str:
    """``message`` fit to leave this machine: local paths and the user's name taken out.

    Failure messages go to the coordinator and on to the client; a registry path or a
    cache folder says nothing useful there and names the operator's account.
    """
    text = _ABSOLUTE_PATH.sub("<local path>", message)
    names = {Path.home().name}
    with contextlib.suppress(KeyError, OSError):
        names.add(getpass.getuser())
    for name in sorted((n for n in names if len(n) >= 3), key=len, reverse=True):
        text = re.sub(rf"\b{re.escape(name)}\b", "<user>", text)
    return text


def miner_update_status(client: CoordinatorClient) -> int:
    """The status ``PUT /v1/miners/{id}`` answers without a key: the doc protocol's update
    route (401/403/404/422 there), which the deployed aitbc coordinator answers with 405
    (the path exists for DELETE only). A 5xx or an unreachable coordinator raises its
    :class:`CoordinatorError`: it says nothing about the dialect."""
    try:
        client.request("PUT", "/v1/miners/dialect-probe", json_body={})
    except (ServerError, CoordinatorUnavailableError):
        raise
    except CoordinatorError as exc:
        return exc.status if exc.status is not None else 0
    return 200


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
    #: whether a resent result is refused (409) rather than stored and paid again; where
    #: it is not, a result whose first delivery is uncertain is resent only after
    #: :meth:`delivery` says ``not_delivered``
    dedupes_results: bool = False
    #: whether registration hands out the key (``doc``), which must then be kept to resume
    #: the identity; otherwise the key is the operator's and never written to the journal
    issues_keys: bool = False

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
    def next_job(self, *, wait_seconds: float = 0.0,
                 on_arrival: ArrivalHook | None = None) -> AssignedJob | None:
        """Take the next job this machine can run, or None when there is none.

        ``on_arrival(job_id, payload)`` runs as soon as the job's bytes are decoded,
        before the payload is read into a job (the agent journals the job there)."""

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

    def delivery(self, job_id: str, kind: Literal["result", "failure"]) -> Delivery:
        """Whether the coordinator already holds our ``kind`` for ``job_id`` (see
        :data:`Delivery`); ``unknown`` where the dialect cannot ask."""
        return "unknown"

    def assigned_jobs(self) -> list[AssignedJob] | None:
        """The jobs the coordinator shows assigned to us and still running, with their
        payloads; None where the dialect cannot list them."""
        return None

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()
