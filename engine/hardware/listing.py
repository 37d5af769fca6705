"""What NVML lists: the GPUs, or a MIG-mode GPU's instances, that ``CUDA_VISIBLE_DEVICES``
shows, each with what NVML can read of it and, for what it cannot, NVML's reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.hardware.nvml import Nvml
from engine.hardware.visibility import visible_selection

__all__ = ["Listed", "list_nvml", "nvml_reason"]

log = logging.getLogger("engine.hardware")  # the package's one logger, as before the split


def nvml_reason(nvml: Nvml) -> str:
    """Why ``nvml``'s last reading on this thread failed, for people: ``"NVML: Not Supported"``."""
    error = nvml.last_error
    return f"NVML: {error}" if error is not None else "NVML gave no reading"


_MIG_ENERGY = "MIG mode: NVML's energy counter is board-wide, not per MIG instance"


@dataclass(frozen=True)
class Listed:
    """A GPU or MIG instance NVML lists, before it is matched to torch."""

    nvml_index: int
    name: str
    gpu_name: str  # the physical GPU's name (the same as `name` for a whole GPU)
    uuid: str | None
    memory_total: int
    memory_free: int
    capability: tuple[int, int] | None
    energy_supported: bool
    energy_unsupported_reason: str | None = None  # NVML's reason, when not supported
    uuid_error: str | None = None  # why NVML gives no UUID, when it gives none
    mig_index: int | None = None  # set for a MIG instance
    parent_uuid: str | None = None  # set for a MIG instance
    mig_without_instances: bool = False  # a MIG-mode GPU with no instance configured


def list_nvml(nvml: Nvml, visible: str | None) -> tuple[int, list[Listed]]:
    """(GPUs NVML sees, the GPUs and MIG instances ``visible`` selects, NVML order)."""
    count = nvml.device_count()
    gpu_uuids = [_uuid_of(nvml, nvml.handle(i)) for i in range(count)]  # (UUID, why not)
    uuids = [uuid for uuid, _ in gpu_uuids]
    # GPU -> (MIG index, handle, (UUID, why not)) of each of its MIG instances
    migs: dict[int, list[tuple[int, Any, tuple[str | None, str | None]]]] = {}
    for i in range(count):
        if nvml.mig_enabled(i):
            migs[i] = [(k, h, _uuid_of(nvml, h)) for k, h in nvml.mig_handles(i)]
    mig_uuids = [[uuid for _, _, (uuid, _) in migs.get(i, [])] for i in range(count)]
    whole: set[int] = set()  # GPUs selected whole
    parts: dict[int, set[int]] = {}  # GPU -> positions in migs[gpu] selected one by one
    for gpu, position in visible_selection(uuids, mig_uuids, visible):
        if position is None:
            whole.add(gpu)
        else:
            parts.setdefault(gpu, set()).add(position)
    listed: list[Listed] = []
    for gpu in sorted(whole | set(parts)):
        name = nvml.name(gpu) or f"GPU {gpu}"
        total, free = _memory(nvml, nvml.memory_info(gpu), f"nvml:{gpu}", name)
        capability = nvml.compute_capability(gpu)
        if gpu not in migs or not migs[gpu]:
            energy_reason = _MIG_ENERGY if gpu in migs else _energy_unsupported(nvml, gpu)
            listed.append(
                Listed(
                    gpu,
                    name,
                    name,
                    uuids[gpu],
                    total,
                    free,
                    capability,
                    energy_supported=energy_reason is None,
                    energy_unsupported_reason=energy_reason,
                    uuid_error=gpu_uuids[gpu][1],
                    mig_without_instances=gpu in migs,
                )
            )
            continue
        for position, (mig_index, handle, (mig_uuid, uuid_error)) in enumerate(migs[gpu]):
            if gpu not in whole and position not in parts[gpu]:
                continue
            mig_name = nvml.name_of(handle) or ""
            if "mig" not in mig_name.lower().split():
                mig_name = f"{name} MIG"
            mig_total, mig_free = _memory(
                nvml, nvml.memory_info_of(handle), f"nvml:{gpu}:mig:{mig_index}", mig_name
            )
            listed.append(
                Listed(
                    gpu,
                    mig_name,
                    name,
                    mig_uuid,
                    mig_total,
                    mig_free,
                    nvml.compute_capability_of(handle) or capability,
                    energy_supported=False,
                    energy_unsupported_reason=_MIG_ENERGY,
                    uuid_error=uuid_error,
                    mig_index=mig_index,
                    parent_uuid=uuids[gpu],
                )
            )
    return count, listed


def _uuid_of(nvml: Nvml, handle: Any | None) -> tuple[str | None, str | None]:
    """(the UUID of ``handle``, None) or, when NVML gives none, (None, NVML's reason)."""
    uuid = nvml.uuid_of(handle)
    return (uuid, None) if uuid is not None else (None, nvml_reason(nvml))


def _energy_unsupported(nvml: Nvml, gpu: int) -> str | None:
    """Why GPU ``gpu``'s total-energy counter cannot be read (None when it can)."""
    if nvml.energy_millijoules(gpu) is not None:
        return None
    return nvml_reason(nvml)


def _memory(
    nvml: Nvml, reading: tuple[int, int] | None, where: str, name: str
) -> tuple[int, int]:
    """(total, free) from an NVML memory reading; (0, 0), logged with NVML's reason, without
    (discovery then takes torch's total, if torch sees the device)."""
    if reading is not None:
        return reading
    log.info("NVML cannot read the memory of %s (%s): %s", where, name, nvml_reason(nvml))
    return 0, 0
