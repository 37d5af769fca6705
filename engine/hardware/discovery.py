"""Discovery: GPUs through NVML, matched to torch by UUID, then the CPU.

:func:`discover` lists what NVML sees (GPUs, or a MIG-mode GPU's instances) as far as
``CUDA_VISIBLE_DEVICES`` shows them, asks torch which of them it can drive, and returns a
:class:`~engine.hardware.devices.HardwareInfo`: usable GPUs, the GPUs torch cannot drive
with the reason, and the CPU. What NVML cannot read is said too: the NVML reason a GPU's
energy counter is unsupported (``Device.energy_unsupported_reason``), why a GPU has no
UUID, why its memory is unknown.
"""

from __future__ import annotations

import enum
import logging
import platform
import threading
from collections.abc import Sequence
from typing import Any, Literal

from engine.base import package_version
from engine.hardware import cpu
from engine.hardware.devices import Device, HardwareInfo
from engine.hardware.listing import Listed, list_nvml
from engine.hardware.names import gpu_type_from_name
from engine.hardware.nvml import Nvml, nvml_seam
from engine.hardware.torch_cuda import (
    CU126_INSTALL,
    TorchCudaDevice,
    TorchCudaProbe,
    TorchCudaView,
    arch_reason,
    arch_supported,
    legacy_sm,
    torch_cuda_seam,
    torch_cuda_view,
    uuid_key,
)
from engine.hardware.visibility import ensure_pci_bus_order
from engine.settings import settings

__all__ = ["discover"]

log = logging.getLogger("engine.hardware")  # the package's one logger, as before the split

_Seams = tuple[Any, int, Any, int]  # NVML module, its changes, torch probe, its changes

_cache_lock = threading.Lock()
_cached_info: tuple[_Seams, HardwareInfo] | None = None  # the seams it came from, the info


class _Env(enum.Enum):
    FROM_ENVIRONMENT = "environment"


def discover(
    nvml: Nvml | None = None,
    *,
    refresh_free_memory: bool = True,
    cuda_visible_devices: str | Literal[_Env.FROM_ENVIRONMENT] | None = _Env.FROM_ENVIRONMENT,
    torch_cuda: TorchCudaView | TorchCudaProbe | None = None,
) -> HardwareInfo:
    """Find this machine's devices: GPUs through NVML matched to torch by UUID, then the CPU.

    With ``nvml`` given, that session is queried (and left open). Without it a session is
    opened on :func:`~engine.hardware.nvml.nvml_module` and closed again, and the result
    is remembered: ``refresh_free_memory=False`` returns the remembered snapshot (free
    memory as it was) instead of asking NVML again; setting either seam forgets it. Never
    raises because NVML or torch is missing: ``nvml_error`` says why there are no GPUs,
    each unusable GPU and ``cpu_fallback_reason`` why it is not used.
    ``cuda_visible_devices`` overrides the environment's ``CUDA_VISIBLE_DEVICES`` (None:
    all GPUs visible). ``torch_cuda`` (a view or a probe) replaces
    :func:`~engine.hardware.torch_cuda.torch_cuda_view`; torch is asked only when NVML
    lists a GPU.
    """
    global _cached_info
    remembered = nvml is None and torch_cuda is None
    if remembered and not refresh_free_memory:
        with _cache_lock:
            cached = _cached_info
        if cached is not None and _same_seams(cached[0], _current_seams()):
            return cached[1]
    ensure_pci_bus_order()
    visible = (
        settings().cuda_visible_devices
        if cuda_visible_devices is _Env.FROM_ENVIRONMENT
        else cuda_visible_devices
    )
    if isinstance(torch_cuda, TorchCudaView):
        probe = _constant_probe(torch_cuda)
    else:
        probe = torch_cuda if torch_cuda is not None else torch_cuda_view
    if nvml is not None:
        return _discover_with(nvml, visible, probe)
    session = Nvml()
    try:
        info = _discover_with(session, visible, probe)
    finally:
        session.close()
    if remembered:
        with _cache_lock:
            _cached_info = (_current_seams(), info)
    return info


def _current_seams() -> _Seams:
    """The NVML module and the injected torch probe a remembered discovery came from, each
    with how often it was set (so that setting a seam back does not revive a snapshot)."""
    return (*nvml_seam(), *torch_cuda_seam())


def _same_seams(a: _Seams, b: _Seams) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]


def _constant_probe(view: TorchCudaView) -> TorchCudaProbe:
    def probe() -> TorchCudaView:
        return view

    return probe


def _unmatched_reason(item: Listed, view: TorchCudaView) -> str:
    """Why ``item`` (which torch can see in principle) has no torch device."""
    if item.mig_without_instances:
        return (
            "MIG mode is enabled but no MIG instance is configured "
            "(create one with nvidia-smi mig -cgi <profile> -C, or disable MIG)"
        )
    if item.uuid is None:
        why = f" ({item.uuid_error})" if item.uuid_error else ""
        return f"NVML gives no UUID for it{why}, so it cannot be matched to a CUDA device"
    seen = len(view.devices)
    reason = (
        f"torch does not see it: none of the {seen} CUDA device(s) torch sees has UUID {item.uuid}"
    )
    if item.mig_index is not None:
        reason += (
            " (a CUDA process may enumerate only one MIG instance: choose it with "
            f"CUDA_VISIBLE_DEVICES={item.uuid})"
        )
    elif (mask := settings().cuda_visible_devices) is not None:
        reason += f" (CUDA_VISIBLE_DEVICES={mask!r})"
    return reason


def _why_unusable(item: Listed, view: TorchCudaView, seen: TorchCudaDevice | None) -> str | None:
    """Why torch cannot drive ``item`` (``seen``: the torch device with its UUID), or None."""
    if not view.available:
        return view.reason or "torch cannot use CUDA"
    if seen is None:
        return _unmatched_reason(item, view)
    if arch_supported(seen.capability, view.arch_list):
        return None
    return arch_reason(view, seen.capability)


def _gpu_device(item: Listed, seen: TorchCudaDevice | None, reason: str | None) -> Device:
    """The :class:`Device` for a listed GPU: ``cuda:N`` when usable, ``nvml:N`` otherwise."""
    usable = reason is None and seen is not None
    if usable and seen is not None:
        device_id, index = f"cuda:{seen.index}", seen.index
    else:
        mig_part = f":mig:{item.mig_index}" if item.mig_index is not None else ""
        device_id, index = f"nvml:{item.nvml_index}{mig_part}", None
    total, free = item.memory_total, item.memory_free
    if not total and seen is not None:  # NVML could not say: torch's total, nothing in use
        total = free = seen.total_memory
    return Device(
        id=device_id,
        kind="cuda",
        index=index,
        name=item.name,
        gpu_type=gpu_type_from_name(item.name),
        memory_total_bytes=total,
        memory_free_bytes=free,
        compute_capability=item.capability or (seen.capability if seen else None),
        energy_supported=item.energy_supported,
        uuid=item.uuid,
        nvml_index=item.nvml_index,
        usable=usable,
        unusable_reason=None if usable else reason,
        mig=item.mig_index is not None,
        parent_uuid=item.parent_uuid,
        mig_index=item.mig_index,
        energy_unsupported_reason=item.energy_unsupported_reason,
    )


def _match(listed: Sequence[Listed], view: TorchCudaView) -> tuple[list[Device], list[Device]]:
    """(usable GPUs in CUDA index order, unusable GPUs in NVML order), matched by UUID."""
    torch_devices = view.devices if view.available else ()
    by_uuid = {uuid_key(d.uuid): d for d in torch_devices if d.uuid is not None}
    usable: list[Device] = []
    unusable: list[Device] = []
    for item in listed:
        seen = None
        if item.uuid is not None and not item.mig_without_instances:
            seen = by_uuid.pop(uuid_key(item.uuid), None)
        device = _gpu_device(item, seen, _why_unusable(item, view, seen))
        (usable if device.usable else unusable).append(device)
    for extra in [*by_uuid.values(), *(d for d in torch_devices if d.uuid is None)]:
        log.debug(
            "torch sees cuda:%d (%s, UUID %s) but NVML does not list it; ignored",
            extra.index,
            extra.name,
            extra.uuid,
        )
    usable.sort(key=lambda d: d.index or 0)
    return usable, unusable


def _gpu_names(listed: Sequence[Listed]) -> tuple[int, str]:
    """(number of physical GPUs, "Tesla V100-SXM2-16GB, 2× NVIDIA A100-SXM4-80GB")."""
    names: dict[int, str] = {}
    for item in listed:
        names.setdefault(item.nvml_index, item.gpu_name)
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    text = ", ".join(name if n == 1 else f"{n}× {name}" for name, n in counts.items())
    return len(names), text


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _fallback_reason(
    count: int,
    listed: Sequence[Listed],
    unusable: Sequence[Device],
    view: TorchCudaView | None,
    visible: str | None,
) -> str | None:
    """Why the CPU is used although NVML sees ``count`` GPUs (None when it sees none)."""
    if count == 0:
        return None
    if not listed:
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides the {_plural(count, 'GPU')} NVML sees"
    physical, names = _gpu_names(listed)
    head = f"NVML sees {_plural(physical, 'GPU')} ({names})"
    if view is not None and not view.available:
        text = f"{head} but {view.reason}"
        if view.cpu_build or view.torch_version is None:
            legacy = sorted(
                {
                    d.gpu_type.upper()
                    for d in unusable
                    if d.gpu_type and legacy_sm(d.compute_capability) is not None
                }
            )
            hint = (
                f"for {', '.join(legacy)}: the CUDA 12.6 wheels, {CU126_INSTALL}"
                if legacy
                else "see https://pytorch.org/get-started/locally/"
            )
            text += f": install a CUDA build of torch ({hint})"
        return text
    details = "; ".join(f"{d.id} ({d.name}): {d.unusable_reason}" for d in unusable)
    return f"{head} but torch can drive none of them: {details}"


def _discover_with(nvml: Nvml, visible: str | None, probe: TorchCudaProbe) -> HardwareInfo:
    count, listed = list_nvml(nvml, visible) if nvml.available() else (0, [])
    view = probe() if listed else None
    usable, unusable = _match(listed, view) if view is not None else ([], [])
    fallback = None if usable else _fallback_reason(count, listed, unusable, view, visible)
    if fallback is not None and unusable:
        log.warning("no usable GPU, running on the CPU: %s", fallback)
    elif fallback is not None:
        log.info("running on the CPU: %s", fallback)
    elif unusable:
        log.warning(
            "skipping %s torch cannot drive: %s",
            _plural(len(unusable), "GPU"),
            "; ".join(f"{d.id} ({d.name}): {d.unusable_reason}" for d in unusable),
        )
    cpu_name = cpu.cpu_name()
    cores = cpu.cpu_cores()
    mem_total, mem_free = cpu.cpu_memory()
    host = Device(
        id="cpu",
        kind="cpu",
        index=None,
        name=cpu_name,
        gpu_type=None,
        memory_total_bytes=mem_total,
        memory_free_bytes=mem_free,
        compute_capability=None,
        energy_supported=False,
        cores=cores,
    )
    return HardwareInfo(
        devices=(*usable, *unusable, host),
        driver_version=nvml.driver_version(),
        cuda_version=nvml.cuda_driver_version(),
        nvml_available=nvml.available(),
        nvml_error=nvml.error(),
        cpu_name=cpu_name,
        cpu_cores=cores,
        cpu_memory_total_bytes=mem_total,
        python_version=platform.python_version(),
        torch_version=package_version("torch"),
        transformers_version=package_version("transformers"),
        cpu_fallback_reason=fallback,
    )
