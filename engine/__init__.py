"""aitbc-engine: run AITBC network jobs on this machine's GPUs (or CPU), metered and hashed.

Typical use by miner software::

    from engine import Engine, parse_payload
    engine = Engine()
    result = engine.run(parse_payload(payload, job_id="job_abc123"))
    result.result_hash, result.metrics.execution_time_seconds
"""

from engine.errors import EngineError
from engine.executor import Engine, JobHandle
from engine.jobs import Job, JobResult, Metrics
from engine.payloads import parse_payload
from engine.registry import ModelSpec, Registry

__all__ = [
    "Engine",
    "EngineError",
    "Job",
    "JobHandle",
    "JobResult",
    "Metrics",
    "ModelSpec",
    "Registry",
    "parse_payload",
]
