"""What this machine has: GPUs (through NVML), the CPU, and their spec sheets.

This package knows nothing of models or jobs. It answers three questions:

* which devices are here (:func:`discover` → :class:`HardwareInfo`),
* what short family name a GPU has (:func:`gpu_type_from_name`: ``"v100"``, ``"a100"``...),
* how fast a GPU's memory and arithmetic are (:data:`GPU_SPECS`, :func:`gpu_spec_for`),
  for rooflines and price estimates (the CPU's bandwidth is measured by
  :mod:`engine.bench.bandwidth`).

One module a room:

=================  =========================================================================
``specs``          the spec sheet: :class:`GpuSpec`, :data:`GPU_SPECS`, :func:`supports_bf16`
``names``          NVML product names → GPU families (:func:`gpu_type_from_name`)
``errors``         typed NVML errors (:class:`NvmlError` and its subclasses)
``nvml``           the NVML seam and the failure-safe :class:`Nvml` session
``torch_cuda``     the torch seam: what the installed torch can drive, and why not
``cpu``            the host CPU's name, identity, cores and memory
``visibility``     ``CUDA_DEVICE_ORDER`` and ``CUDA_VISIBLE_DEVICES``
``devices``        :class:`Device` and :class:`HardwareInfo`
``listing``        what NVML lists, with NVML's reason for what it cannot read
``discovery``      :func:`discover`: NVML's list matched to torch by UUID, then the CPU
=================  =========================================================================

No module of the package imports torch, transformers or pynvml at import time.

NVML is reached through one seam: :func:`nvml_module` returns the real ``pynvml`` or a
fake injected with :func:`set_nvml_module`, and :class:`Nvml` wraps it so that every
NVML failure becomes ``None`` instead of an exception, the reason kept as a typed
:class:`NvmlError` (:attr:`Nvml.last_error`; :meth:`Nvml.call` raises it). Without
NVML (no driver, no library) discovery reports the CPU alone and says why.

Device numbering. NVML and CUDA may number the same GPUs differently (NVML in PCI bus
order, CUDA "fastest first" unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, which only counts
before CUDA initialises), so no index is trusted across the two: each GPU NVML lists is
matched to the CUDA device torch reports with the same UUID (compared as lower-case hex,
without the ``GPU-``/``MIG-`` prefix). :attr:`Device.index` is torch's index (``cuda:N``),
:attr:`Device.nvml_index` the NVML index to pass to :class:`Nvml`. ``CUDA_VISIBLE_DEVICES``
still decides which NVML GPUs are listed, read the way CUDA reads it: NVML indices, or
UUID prefixes of GPUs (``"GPU-8f3c..."``) or MIG instances (``"MIG-..."``), up to the
first entry that names nothing; an empty value hides every GPU.

What torch can drive. torch is reached through a second seam: :func:`torch_cuda_view`
returns a :class:`TorchCudaView` from the real probe (:func:`probe_torch_cuda`, which
imports torch lazily and initialises CUDA) or from a fake injected with
:func:`set_torch_cuda_probe`. A GPU that NVML lists but torch cannot drive (a CPU build of
torch, no device with its UUID, or no kernels for its architecture: PyTorch's CUDA 12.8+
wheels dropped sm_70, the CUDA 12.6 wheels keep it) stays in :attr:`HardwareInfo.devices`
with ``usable=False`` and the reason, and is left out of :attr:`HardwareInfo.gpus`; with
no usable GPU, :attr:`HardwareInfo.cpu_fallback_reason` says why the CPU is used.

MIG. A GPU in MIG mode is replaced by its MIG instances, each a device of its own (its
own UUID and memory, ``mig=True``, no energy counter: NVML's is board-wide), matched to
torch by UUID like any GPU. The GPU itself is listed (unusable) only when it has no MIG
instance configured.
"""

from __future__ import annotations

from engine.cache import engine_cache_dir
from engine.hardware.cpu import cpu_cores, cpu_identity, cpu_memory, cpu_name
from engine.hardware.devices import Device, HardwareInfo
from engine.hardware.discovery import discover
from engine.hardware.errors import (
    NvmlDriverNotLoaded,
    NvmlError,
    NvmlGpuLost,
    NvmlInvalidArgument,
    NvmlLibraryNotFound,
    NvmlNoPermission,
    NvmlNotFound,
    NvmlNotInitialized,
    NvmlNotSupported,
    NvmlTimeout,
    NvmlUnavailable,
)
from engine.hardware.names import gpu_type_from_name
from engine.hardware.nvml import Nvml, nvml_module, set_nvml_module
from engine.hardware.specs import GPU_SPECS, GpuSpec, gpu_spec_for, supports_bf16
from engine.hardware.torch_cuda import (
    TorchCudaDevice,
    TorchCudaProbe,
    TorchCudaView,
    arch_supported,
    probe_torch_cuda,
    set_torch_cuda_probe,
    torch_cuda_view,
    uuid_key,
)
from engine.hardware.visibility import cuda_visible_nvml_indices, ensure_pci_bus_order

__all__ = [
    "GPU_SPECS",
    "Device",
    "GpuSpec",
    "HardwareInfo",
    "Nvml",
    "NvmlDriverNotLoaded",
    "NvmlError",
    "NvmlGpuLost",
    "NvmlInvalidArgument",
    "NvmlLibraryNotFound",
    "NvmlNoPermission",
    "NvmlNotFound",
    "NvmlNotInitialized",
    "NvmlNotSupported",
    "NvmlTimeout",
    "NvmlUnavailable",
    "TorchCudaDevice",
    "TorchCudaProbe",
    "TorchCudaView",
    "arch_supported",
    "cpu_cores",
    "cpu_identity",
    "cpu_memory",
    "cpu_name",
    "cuda_visible_nvml_indices",
    "discover",
    "engine_cache_dir",
    "ensure_pci_bus_order",
    "gpu_spec_for",
    "gpu_type_from_name",
    "nvml_module",
    "probe_torch_cuda",
    "set_nvml_module",
    "set_torch_cuda_probe",
    "supports_bf16",
    "torch_cuda_view",
    "uuid_key",
]
