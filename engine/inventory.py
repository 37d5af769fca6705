"""What this machine offers: the registry's models and the hardware, for every face.

``aitbc-engine models`` and ``info`` and the local API's ``GET /v1/models`` and
``GET /v1/hardware`` all build their answers here, so they cannot drift.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.base import StrictModel
from engine.hardware import discover
from engine.loading import availability
from engine.registry import Registry

if TYPE_CHECKING:
    from engine.executor import Engine
    from engine.pool import ModelPool


class ModelRow(StrictModel):
    """One registry entry: its shape, and whether its weights are here (and why not)."""

    name: str
    task: str
    architecture: str
    parameters: int
    context_length: int
    gpu_count: int
    min_gpu_memory_mb: int
    source: str
    available: bool
    reason: str
    location: str | None = None
    size_bytes: int | None = None


class ModelView(ModelRow):
    """A registry entry as a running engine sees it: can it run, and is it warm (where)."""

    runnable: bool
    warm: bool
    warm_on: list[str]


def model_rows(registry: Registry) -> list[ModelRow]:
    """One row per registry entry (``aitbc-engine models``)."""
    return [ModelRow(name=spec.name, task=spec.task, architecture=spec.architecture,
                     parameters=spec.parameters, context_length=spec.context_length,
                     gpu_count=spec.gpu_count, min_gpu_memory_mb=spec.min_gpu_memory_mb,
                     source=spec.source.describe(), **availability(spec).to_dict())
            for spec in registry]


def model_views(registry: Registry, pool: ModelPool, *,
                weights: str = "pretrained") -> list[ModelView]:
    """The rows with the warm state of an engine's ``pool`` (``GET /v1/models``).

    ``runnable``: the weights are here, or the engine runs random ``weights``.
    """
    warm: dict[str, list[str]] = {}
    for loaded in pool.warm():
        warm.setdefault(loaded.spec.name, []).append("+".join(d.id for d in loaded.devices))
    return [ModelView(**row.model_dump(), runnable=row.available or weights == "random",
                      warm=row.name in warm, warm_on=warm.get(row.name, []))
            for row in model_rows(registry)]


def cpu_linear_kernel() -> dict[str, Any]:
    """The CPU linear-layer kernel: ``available``, ``in_use`` (not turned off), ``reason``;
    ``blocks``: whether the block kernel for GGUF weights (the ``native`` dtype) passed its
    check, why not, the formats it computes on, and the fused pass native LLaMA models
    prefill and decode in (``decode_step``, their profiles' ``decode``); and ``build``: the
    checked library's compiler, compiler version, flags, instruction-set features (``isa``),
    sha256 and size, or None when no library passed the checks."""
    from engine.kernels import FUSED_STEP_NAME
    from engine.kernels.blocks import SUPPORTED
    from engine.kernels.rowgemm import blas_requested, kernel_status  # imports torch

    kernel = kernel_status()
    return {"available": kernel.available, "in_use": kernel.available and not blas_requested(),
            "reason": kernel.reason,
            "blocks": {"available": kernel.blocks_available, "reason": kernel.blocks_reason,
                       "formats": sorted(SUPPORTED.values()),
                       "decode_step": FUSED_STEP_NAME},
            "build": kernel.build.to_dict() if kernel.build is not None else None}


def hardware_document(engine: Engine | None = None) -> dict[str, Any]:
    """The devices, drivers and versions (found now) and the CPU kernel's state.

    With an ``engine``, also its fast path's captured decode steps (``fast_paths``).
    """
    doc = discover().to_dict()
    doc["cpu_linear_kernel"] = cpu_linear_kernel()
    if engine is not None:
        doc["fast_paths"] = [stats.to_dict() for stats in engine.fast_paths()]
    return doc


__all__ = ["ModelRow", "ModelView", "cpu_linear_kernel", "hardware_document", "model_rows",
           "model_views"]
