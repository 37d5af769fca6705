"""What this miner offers a coordinator, found from the hardware and the registry, not flags.

Only the price (and the location) come from configuration. Knows nothing of
torch: whether a model's weights are here is asked through an ``is_available``
callable (the CLI passes :func:`engine.loading.availability`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from engine.hardware import Device, HardwareInfo
from engine.registry import ModelSpec

IsAvailable = Callable[[ModelSpec], bool]


@dataclass(frozen=True)
class GpuCapability:
    """One GPU as a coordinator sees it."""

    name: str
    memory_mb: int


@dataclass(frozen=True)
class Capabilities:
    """The facts both dialects announce; ``gpu_type`` is ``"cpu"`` on a CPU-only miner."""

    gpu_type: str
    gpu_count: int
    gpus: tuple[GpuCapability, ...]
    cuda_version: str | None
    models: tuple[str, ...]
    max_concurrent: int
    price_per_hour: float
    location: str | None = None

    def can_run(self, model: str | None) -> bool:
        """True when ``model`` is one this machine can run."""
        return model is not None and model in self.models

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for logs and ``--json`` output)."""
        return {"gpu_type": self.gpu_type, "gpu_count": self.gpu_count,
                "gpus": [{"name": g.name, "memory_mb": g.memory_mb} for g in self.gpus],
                "cuda_version": self.cuda_version, "models": list(self.models),
                "max_concurrent": self.max_concurrent, "price_per_hour": self.price_per_hour,
                "location": self.location}


def _fits(spec: ModelSpec, gpus: tuple[Device, ...]) -> bool:
    if not gpus:  # CPU-only: single-device models run on the CPU
        return spec.gpu_count == 1
    if spec.gpu_count > len(gpus):
        return False
    need = spec.min_gpu_memory_mb * 2**20
    per_gpu = sorted((d.memory_total_bytes for d in gpus), reverse=True)[:spec.gpu_count]
    return all(mem >= need / spec.gpu_count for mem in per_gpu) if spec.gpu_count > 1 \
        else per_gpu[0] >= need


def runnable_models(specs: Iterable[ModelSpec], devices: Iterable[Device],
                    is_available: IsAvailable) -> tuple[str, ...]:
    """Names of the registry models whose weights are here and that fit these devices."""
    gpus = tuple(d for d in devices if d.kind == "cuda" and d.usable)
    return tuple(sorted(s.name for s in specs if _fits(s, gpus) and is_available(s)))


def detect_capabilities(hardware: HardwareInfo, specs: Iterable[ModelSpec], *,
                        devices: Iterable[Device] | None = None, is_available: IsAvailable,
                        max_concurrent: int = 1, price_per_hour: float = 0.0,
                        location: str | None = None) -> Capabilities:
    """Capabilities of the ``devices`` the engine uses (default: every usable device).

    A GPU that torch cannot drive is never announced: the engine would not run on it.
    """
    chosen = tuple(devices) if devices is not None else (*hardware.gpus, hardware.cpu)
    gpus = tuple(d for d in chosen if d.kind == "cuda" and d.usable)
    types = [d.gpu_type for d in gpus if d.gpu_type]
    gpu_type = max(set(types), key=types.count) if types else "cpu"
    return Capabilities(
        gpu_type=gpu_type, gpu_count=len(gpus),
        gpus=tuple(GpuCapability(d.name, d.memory_total_bytes // 2**20) for d in gpus),
        cuda_version=hardware.cuda_version if gpus else None,
        models=runnable_models(specs, chosen, is_available),
        max_concurrent=max_concurrent, price_per_hour=price_per_hour, location=location)
