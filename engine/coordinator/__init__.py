"""The coordinator adapter: one :class:`Coordinator` interface, two dialects, the mining agent.

Knows nothing of torch: the agent is handed an :class:`~engine.executor.Engine`.

    from engine.coordinator import connect, Agent, AgentConfig, Outbox
    outbox = Outbox(state_dir / "outbox.sqlite3")
    coordinator = connect("aitbc", url, api_key=key, miner_id="miner-1", outbox=outbox)
    Agent(coordinator, engine, outbox, capabilities).run()
"""

from __future__ import annotations

from engine.coordinator.agent import Agent, AgentConfig, AgentReport
from engine.coordinator.aitbc import AITBC_LIMITS, AitbcCoordinator
from engine.coordinator.base import (
    Ack,
    AssignedJob,
    Coordinator,
    Identity,
    MinerUnknownError,
    miner_update_status,
)
from engine.coordinator.capabilities import Capabilities, GpuCapability, detect_capabilities
from engine.coordinator.client import (
    CoordinatorClient,
    RateLimit,
    RateLimiter,
    RetryPolicy,
    TokenBucket,
)
from engine.coordinator.doc import DOC_LIMITS, DocCoordinator
from engine.coordinator.errors import (
    BadRequestError,
    ConflictError,
    CoordinatorError,
    CoordinatorUnavailableError,
    DeliveryUncertainError,
    DialectMismatchError,
    JournalUnavailableError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
    RequestAbortedError,
    ServerError,
    UnauthorizedError,
    ValidationFailedError,
    redact,
)
from engine.coordinator.outbox import Outbox
from engine.coordinator.receipts import (
    ReceiptCheck,
    ReceiptKeyError,
    ReceiptVerifier,
    canonical_receipt_bytes,
    load_public_key,
)

DIALECTS = ("doc", "aitbc")


def detect_dialect(base_url: str, *, connect_timeout: float = 5.0,
                   read_timeout: float = 30.0) -> tuple[str, str]:
    """Which dialect the coordinator at ``base_url`` serves, from one probe: ``PUT
    /v1/miners/{id}`` is a doc route (answered 401/404/422 without a key) and answers 405
    on the deployed aitbc coordinator (the path exists there for DELETE only).

    Returns ``(dialect, evidence)``; raises a :class:`CoordinatorError` when the
    coordinator cannot be reached or answers neither way.
    """
    client = CoordinatorClient(base_url.rstrip("/"), connect_timeout=connect_timeout,
                               read_timeout=read_timeout, headers={"User-Agent": "aitbc-engine"})
    try:
        status = miner_update_status(client)
    finally:
        client.close()
    evidence = f"PUT /v1/miners/{{id}} → {status}"
    if status == 405:
        return "aitbc", evidence
    if status in (401, 403, 404, 422):
        return "doc", evidence
    raise DialectMismatchError(f"{base_url} serves neither dialect's routes ({evidence}); "
                               "check the URL", route="PUT /v1/miners/{id}", coordinator=base_url)


def connect(dialect: str, base_url: str, *, api_key: str | None = None,
            miner_id: str | None = None, outbox: Outbox | None = None,
            limits: dict[str, RateLimit] | None = None, retry: RetryPolicy | None = None,
            connect_timeout: float = 5.0, read_timeout: float = 30.0,
            name: str = "aitbc-engine") -> Coordinator:
    """A :class:`Coordinator` for ``dialect`` at ``base_url``, with its client and limiter.

    ``limits`` default to the dialect's published ones. For ``doc``, an identity
    saved in ``outbox`` by an earlier run is reused unless ``miner_id`` and
    ``api_key`` are given.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; choose one of {', '.join(DIALECTS)}")
    base_url = base_url.rstrip("/")
    chosen = limits if limits is not None else (DOC_LIMITS if dialect == "doc"
                                                else AITBC_LIMITS)
    client = CoordinatorClient(base_url, limiter=RateLimiter(chosen), retry=retry,
                               connect_timeout=connect_timeout, read_timeout=read_timeout,
                               headers={"User-Agent": "aitbc-engine"})
    if dialect == "doc":
        identity = Identity(miner_id=miner_id, api_key=api_key)
        if outbox is not None and not (miner_id and api_key):
            saved = outbox.load_identity(f"doc|{base_url}")
            if saved and saved.get("miner_id") and saved.get("api_key"):
                identity = Identity(saved["miner_id"], saved["api_key"], saved.get("extra") or {})
        return DocCoordinator(client, identity, name=name)
    if not miner_id:
        raise ValueError("the aitbc dialect needs a miner id")
    return AitbcCoordinator(client, Identity(miner_id=miner_id, api_key=api_key))


__all__ = [
    "AITBC_LIMITS", "DIALECTS", "DOC_LIMITS", "Ack", "Agent", "AgentConfig", "AgentReport",
    "AitbcCoordinator", "AssignedJob", "BadRequestError", "Capabilities", "ConflictError",
    "Coordinator", "CoordinatorClient", "CoordinatorError", "CoordinatorUnavailableError",
    "DeliveryUncertainError", "DialectMismatchError", "DocCoordinator", "GpuCapability",
    "Identity", "JournalUnavailableError", "MinerUnknownError", "NotFoundError", "Outbox",
    "ProtocolError", "RateLimit",
    "RateLimitedError", "RateLimiter", "ReceiptCheck", "ReceiptKeyError", "ReceiptVerifier",
    "RequestAbortedError", "RetryPolicy", "ServerError", "TokenBucket", "UnauthorizedError",
    "ValidationFailedError", "canonical_receipt_bytes", "connect", "detect_capabilities",
    "detect_dialect", "load_public_key", "redact",
]
