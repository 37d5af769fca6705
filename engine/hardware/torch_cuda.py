"""The torch-CUDA seam: what the installed torch can drive, and why not.

:func:`torch_cuda_view` returns a :class:`TorchCudaView` from the real probe
(:func:`probe_torch_cuda`, which imports torch lazily and initialises CUDA) or from a fake
injected with :func:`set_torch_cuda_probe`. :func:`uuid_key` puts NVML's and torch's UUID
spellings in one comparable form; :func:`arch_supported` says whether torch's kernels run
on a compute capability (PyTorch's CUDA 12.8+ wheels dropped sm_70, the 12.6 wheels keep it).
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "CU126_INSTALL",
    "TorchCudaDevice",
    "TorchCudaProbe",
    "TorchCudaView",
    "arch_reason",
    "arch_supported",
    "legacy_sm",
    "probe_torch_cuda",
    "set_torch_cuda_probe",
    "torch_cuda_seam",
    "torch_cuda_view",
    "uuid_key",
]

log = logging.getLogger("engine.hardware")  # the package's one logger, as before the split


@dataclass(frozen=True)
class TorchCudaDevice:
    """One CUDA device as torch numbers and describes it."""

    index: int  # torch's CUDA index: cuda:N
    uuid: str | None  # as torch gives it (bare hex, no "GPU-"/"MIG-" prefix)
    name: str
    capability: tuple[int, int]
    total_memory: int  # bytes


@dataclass(frozen=True)
class TorchCudaView:
    """What the installed torch can drive: whether CUDA works, its kernels, its devices."""

    available: bool
    reason: str | None  # why not, when ``available`` is False
    torch_version: str | None  # "2.13.0+cu128"; None when torch is not importable
    cuda_version: str | None  # torch.version.cuda ("12.8"); None for a CPU (or ROCm) build
    arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list(): "sm_80", "compute_90"...
    devices: tuple[TorchCudaDevice, ...] = ()

    @property
    def cpu_build(self) -> bool:
        """True when torch is installed but built without CUDA (a CPU or ROCm wheel)."""
        return self.torch_version is not None and self.cuda_version is None


TorchCudaProbe = Callable[[], TorchCudaView]

_torch_probe_override: TorchCudaProbe | None = None
_torch_view_lock = threading.Lock()
_real_torch_view: TorchCudaView | None = None


_probe_changes = 0  # how often the seam was set: a discovery remembered before is stale


def set_torch_cuda_probe(probe: TorchCudaProbe | None) -> None:
    """Use ``probe`` (e.g. a fake returning a :class:`TorchCudaView`); None restores torch."""
    global _torch_probe_override, _probe_changes
    _torch_probe_override = probe
    _probe_changes += 1


def torch_cuda_seam() -> tuple[TorchCudaProbe | None, int]:
    """(the injected probe or None, how often :func:`set_torch_cuda_probe` ran): what a
    remembered discovery is checked against."""
    return _torch_probe_override, _probe_changes


def torch_cuda_view() -> TorchCudaView:
    """What torch can drive: the injected probe's answer, else the real probe's (kept).

    The real answer is computed once per process: CUDA's devices do not change once it
    has initialised.
    """
    global _real_torch_view
    probe = _torch_probe_override
    if probe is not None:
        return probe()
    with _torch_view_lock:
        if _real_torch_view is None:
            _real_torch_view = probe_torch_cuda()
        return _real_torch_view


def probe_torch_cuda() -> TorchCudaView:
    """Ask the installed torch what it can drive (imports torch, initialises CUDA).

    Never raises: a missing or broken torch, a CPU build or a CUDA that fails to start
    gives ``available=False`` and the reason.
    """
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install failing on import
        return TorchCudaView(False, f"torch cannot be imported ({exc})", None, None)
    version = str(torch.__version__)
    cuda_version = getattr(torch.version, "cuda", None)
    if cuda_version is None:
        if getattr(torch.version, "hip", None):
            reason = f"torch {version} is a ROCm build, not a CUDA one"
        else:
            reason = f"torch {version} is a CPU build (torch.version.cuda is None)"
        return TorchCudaView(False, reason, version, None)
    cuda_version = str(cuda_version)
    try:
        arch_list = tuple(str(a) for a in torch.cuda.get_arch_list())
    except Exception as exc:  # pragma: no cover - depends on the build
        log.debug("torch.cuda.get_arch_list() failed: %s", exc)
        arch_list = ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = bool(torch.cuda.is_available())
            failure = None
        except Exception as exc:
            available, failure = False, str(exc)
    if not available:
        said = failure or "; ".join(str(w.message).strip() for w in caught)
        reason = "torch.cuda.is_available() is False: " + (
            said or f"torch {version} (CUDA {cuda_version}) finds no CUDA device it can use"
        )
        return TorchCudaView(False, reason, version, cuda_version, arch_list)
    devices: list[TorchCudaDevice] = []
    try:
        count = int(torch.cuda.device_count())
    except Exception as exc:
        reason = f"torch.cuda.device_count() failed: {exc}"
        return TorchCudaView(False, reason, version, cuda_version, arch_list)
    for index in range(count):
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception as exc:  # one broken device must not hide the others
            log.debug("torch.cuda.get_device_properties(%d) failed: %s", index, exc)
            continue
        raw_uuid = getattr(props, "uuid", None)
        devices.append(
            TorchCudaDevice(
                index=index,
                uuid=None if raw_uuid is None else str(raw_uuid),
                name=str(props.name),
                capability=(int(props.major), int(props.minor)),
                total_memory=int(props.total_memory),
            )
        )
    return TorchCudaView(True, None, version, cuda_version, arch_list, tuple(devices))


def uuid_key(uuid: object) -> str:
    """A GPU or MIG UUID in comparable form: lower-case hex, no ``GPU-``/``MIG-`` prefix.

    NVML's ``"GPU-8F3C0A1B-..."`` and torch's ``8f3c0a1b-...`` give the same key.
    """
    text = str(uuid).strip().lower()
    text = text.removeprefix("mig-").removeprefix("gpu-")
    return text.replace("-", "")


_ARCH = re.compile(r"(sm|compute)_(\d+)([af]?)")


def arch_supported(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch built for ``arch_list`` has kernels a GPU of ``capability`` runs.

    ``sm_XY`` machine code runs on X.Y and later minors of major X (``sm_XYa``: on X.Y
    only); ``compute_XY`` PTX is compiled by the driver for any capability ≥ X.Y. An
    empty list (torch does not say) counts as supported.
    """
    if not arch_list:
        return True
    major, minor = capability
    for arch in arch_list:
        match = _ARCH.fullmatch(arch.strip().lower())
        if match is None:
            continue
        kind, number, suffix = match.group(1), int(match.group(2)), match.group(3)
        code = (number // 10, number % 10)
        if suffix == "a":
            if code == (major, minor):
                return True
        elif kind == "sm":
            if code[0] == major and code[1] <= minor:
                return True
        elif code <= (major, minor):
            return True
    return False


def legacy_sm(capability: tuple[int, int] | None) -> str | None:
    """The ``sm_XY`` that PyTorch's CUDA 12.6 x86 wheels carry and the 12.8+ ones dropped.

    Maxwell (5.0, 5.2), Pascal (6.0, 6.1) and Volta (7.0); None for any other capability.
    """
    if capability is None:
        return None
    if capability in ((5, 0), (5, 2)):
        return "sm_50"
    if capability in ((6, 0), (6, 1)):
        return "sm_60"
    if capability == (7, 0):
        return "sm_70"
    return None


CU126_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu126"


def arch_reason(view: TorchCudaView, capability: tuple[int, int]) -> str:
    """Why ``view``'s torch cannot drive a GPU of ``capability`` (no kernels for it)."""
    arch = f"sm_{capability[0]}{capability[1]}"
    reason = (
        f"torch {view.torch_version} (CUDA {view.cuda_version}) has no kernels for {arch} "
        f"(compute capability {capability[0]}.{capability[1]}); it was built for "
        f"{', '.join(view.arch_list)}"
    )
    legacy = legacy_sm(capability)
    if legacy is not None:
        return (
            f"{reason}. PyTorch's CUDA 12.8 and newer wheels dropped {legacy}; "
            f"the CUDA 12.6 wheels carry it: {CU126_INSTALL}"
        )
    return f"{reason}. Install a torch build for {arch} (https://pytorch.org/get-started/locally/)"
