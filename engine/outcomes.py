"""What a job ends as: a completed :class:`JobResult` with its profile, metrics and hash,
or a failed one with a typed error; and the one place that catches a failure inside a work.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from types import TracebackType

from engine.base import package_version
from engine.errors import DeviceOutOfMemoryError, EngineError, ExecutionError
from engine.hardware import Device
from engine.hashing import HASH_VERSION, result_hash
from engine.jobs import (
    EmbeddingOutput,
    ExecutionProfile,
    GenerationOutput,
    Job,
    JobErrorInfo,
    JobResult,
    Metrics,
)
from engine.loading import LoadedModel
from engine.metering import JobShare, Measurement
from engine.pool import release_memory

log = logging.getLogger(__name__)


def _version(dist: str) -> str:
    return package_version(dist) or "unknown"


ENGINE_VERSION = _version("aitbc-engine")


def classify(exc: BaseException) -> EngineError:
    """Map an exception from inside a job to a typed engine error (a typed one stays itself).

    The new error does not chain the old one, so no traceback (and none of the
    tensors its frames hold) outlives the failure.
    """
    if isinstance(exc, EngineError):
        return exc
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return DeviceOutOfMemoryError(f"the device ran out of memory: {exc}")
    return ExecutionError(f"{type(exc).__name__}: {exc}")


class JobFailure:
    """Catches any failure of the work inside its ``with`` block as a typed error.

    Memory is returned by :meth:`settle`, called after the block: by then the
    exception, its traceback and the tensors its frames held are gone, so
    ``empty_cache`` can really free them.
    """

    def __init__(self, devices: Sequence[Device]):
        self.devices = tuple(devices)
        self.error: EngineError | None = None

    def __enter__(self) -> JobFailure:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        if not isinstance(exc, EngineError):  # a string, so no frame outlives the block
            log.debug("work failed on %s:\n%s", ",".join(d.id for d in self.devices),
                      "".join(traceback.format_exception(kind, exc, tb)))
        self.error = classify(exc)
        return True

    def settle(self) -> EngineError | None:
        """The error (None when the block succeeded), after freeing memory if it failed."""
        if self.error is not None:
            release_memory(self.devices)
        return self.error


def failed_result(job: Job, err: EngineError) -> JobResult:
    """A failed result carrying the error's code, message and field."""
    return JobResult(job_id=job.job_id, model=job.model, task=job.task, status="failed",
                     error=JobErrorInfo(code=err.code, message=err.message, field=err.field),
                     notes=job.notes)


def job_metrics(own: Measurement, share: JobShare, *, load_seconds: float, prompt_tokens: int,
                completion_tokens: int, queue_seconds: float, model_memory_bytes: int | None,
                warmup_seconds: float | None = None) -> Metrics:
    """A job's metrics: its own clock (wall, token times) and its share of the device's steps."""
    shared = share.peak_batch > 1
    estimated = getattr(share, "energy_estimated", None) if share.energy_joules is not None \
        else None
    return Metrics(execution_time_seconds=own.wall_seconds, gpu_time_seconds=share.gpu_seconds,
                   load_time_seconds=load_seconds, device=share.device,
                   gpu_count=share.gpu_count,
                   measurement=share.method + ("+shared-by-token-work" if shared else ""),
                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   ttft_seconds=own.ttft_seconds, tpot_seconds=own.tpot_seconds,
                   gpu_busy_seconds=share.gpu_busy_seconds, energy_joules=share.energy_joules,
                   peak_memory_bytes=share.peak_memory_bytes, queue_seconds=queue_seconds,
                   model_memory_bytes=model_memory_bytes, warmup_seconds=warmup_seconds,
                   energy_estimated=estimated, commitment_seconds=own.finalize_seconds)


def completed_result(job: Job, loaded: LoadedModel, output: GenerationOutput | EmbeddingOutput,
                     metrics: Metrics, *, batch_size: int, decode: str,
                     cpu_fallback_reason: str | None = None) -> JobResult:
    """A completed result: output, hash, metrics and the execution profile.

    When the CPU kernel computed the linear layers, the profile names its build
    (compiler, version, flags, instruction-set features) from the kernel's status.
    """
    from engine.kernels import KERNEL_NAMES

    build = None
    if loaded.linear_kernel in KERNEL_NAMES:
        from engine.kernels.rowgemm import kernel_status  # loaded already: the model uses it

        build = kernel_status().build
    profile = ExecutionProfile(
        model=loaded.spec.name, weights=loaded.weights, weights_digest=loaded.weights_digest,
        dtype=loaded.dtype_name, device_class=loaded.device_class,
        device_count=len(loaded.devices), torch_version=_version("torch"),
        transformers_version=_version("transformers"), engine_version=ENGINE_VERSION,
        hash_version=HASH_VERSION, decode=decode, batched=batch_size > 1,
        batch_size=batch_size, linear_kernel=loaded.linear_kernel,
        cpu_fallback_reason=cpu_fallback_reason if loaded.devices[0].kind == "cpu" else None,
        kernel_compiler=build.compiler if build else None,
        kernel_compiler_version=build.compiler_version if build else None,
        kernel_flags=build.flags if build else None, kernel_isa=build.isa if build else None)
    return JobResult(job_id=job.job_id, model=job.model, task=job.task, status="completed",
                     output=output, result_hash=result_hash(job, output, loaded.weights_digest),
                     metrics=metrics, profile=profile, notes=job.notes)


def log_result(result: JobResult) -> None:
    """One log line per finished job."""
    if result.ok and result.metrics is not None:
        log.info("job %s model=%s hash=%s exec=%.3fs gpu=%.3fs", result.job_id, result.model,
                 result.result_hash, result.metrics.execution_time_seconds,
                 result.metrics.gpu_time_seconds)
    elif result.error is not None:
        log.warning("job %s model=%s failed: %s: %s", result.job_id, result.model,
                    result.error.code, result.error.message)
