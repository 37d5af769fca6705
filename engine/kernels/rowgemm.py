"""The CPU row-invariant linear kernel: its binding, its self-check, and the packed layers.

``rowgemm.c`` multiplies activation rows by a packed weight so that every
output element is summed in the same order whatever the number of rows (see
the C file). On the CPU this gives two things at once:

* a decode step of 8 rows costs little more than a step of 1 (the weight is
  streamed once for all rows, with prefetch), where the BLAS product of a few
  rows costs 1.5 to 2x a single row, so batched jobs pay off;
* a job's floats do not depend on its batch mates, so batched and one-at-a-time
  runs agree token for token by construction, not by luck.

The C source ships with the package and is compiled on first use with the
system C compiler (``$CC``, else ``cc``/``gcc``) for this CPU (``-march=native``)
into the engine cache; the library is keyed by source, flags, compiler and CPU,
so a changed machine builds its own. A missing compiler, a failed build or a
failed self-check leaves the kernel unavailable with a reason, and the engine
keeps torch's BLAS. ``AITBC_ENGINE_LINEAR=blas`` turns the kernel off.

The library is built and checked by :mod:`engine.kernels.library` (owner, mode
and digest before ``dlopen``); this module binds it, checks what it computes,
and packs the weights it multiplies.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.hardware.cpu import usable_cores
from engine.kernels import KERNEL_NAME
from engine.kernels.library import KernelBuild, KernelUnavailableError, load_library
from engine.settings import settings

PANEL = 32
BLAS_NAME = "blas"
__all__ = ["KERNEL_NAME", "KernelBuild", "KernelStatus", "PackedLinear", "block_kernel",
           "float32_kernel", "hand_threads_to_kernel", "kernel_status", "kernel_threads",
           "pack_linear_layers"]


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernel can be used here, and if not, why (a sentence a person can act on)."""

    available: bool
    reason: str
    library: Path | None = None
    build: KernelBuild | None = None  # set when the library passed its integrity checks
    # Whether the block kernel (weights kept in GGUF blocks, engine.kernels.blocks) passed
    # its own check too, and if not, why.
    blocks_available: bool = False
    blocks_reason: str = ""


_lock = threading.Lock()
_loaded: tuple[KernelStatus, Any, Any] | None = None


def _bind(library: ctypes.CDLL, path: Path) -> Any:
    function = library.rowgemm
    function.restype = None
    size = ctypes.c_ssize_t
    function.argtypes = [size, size, size, ctypes.c_void_p, size, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, size, ctypes.c_int]
    if library.rowgemm_panel_width() != PANEL:
        raise OSError(f"{path} packs panels of {library.rowgemm_panel_width()} columns, "
                      f"not {PANEL}")
    return function


def _self_check(function: Any) -> str | None:
    """Multiply known matrices; returns what went wrong, or None when the kernel is right."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(45, 70, generator=gen)  # 45 columns: one full panel and a ragged one
    bias = torch.randn(45, generator=gen)
    x = torch.randn(11, 70, generator=gen)
    packed, padded_bias = pack_weight(weight), pad_bias(bias)
    got = _call(function, x, packed, padded_bias, 45)
    expected = (x.double() @ weight.double().t() + bias.double()).float()
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return f"the built kernel's product is off by {(got - expected).abs().max().item():.3g}"
    alone = _call(function, x[3:4].contiguous(), packed, padded_bias, 45)
    if not torch.equal(alone[0], got[3]):
        return "the built kernel's rows depend on their neighbours"
    return None


def kernel_status(cache_dir: Path | None = None) -> KernelStatus:
    """Build (once per process, cached on disk) and check the kernel; says whether it is usable."""
    return _kernel(cache_dir)[0]


def _kernel(cache_dir: Path | None = None) -> tuple[KernelStatus, Any, Any]:
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        _loaded = _load(cache_dir)
        return _loaded


def _load(cache_dir: Path | None) -> tuple[KernelStatus, Any, Any]:
    try:
        library, path, build, compiler = load_library(cache_dir)
    except KernelUnavailableError as exc:
        return KernelStatus(False, exc.message, exc.path), None, None
    try:
        function = _bind(library, path)
    except (OSError, AttributeError) as exc:
        return KernelStatus(False, f"loading the CPU linear kernel {path} failed: {exc}"), \
            None, None
    problem = _self_check(function)
    if problem is not None:
        return KernelStatus(False, f"{problem}; using torch's BLAS", path, build), None, None
    blocks, blocks_problem = _block_kernel(library, path, function)
    return (KernelStatus(True, f"built with {compiler} for this CPU", path, build,
                         blocks_available=blocks is not None,
                         blocks_reason=blocks_problem or f"built with {compiler} for this CPU"),
            function, blocks)


def _block_kernel(library: ctypes.CDLL, path: Path, function: Any) -> tuple[Any, str | None]:
    """Bind and check the block kernel: (the bound library, None) or (None, what went wrong)."""
    from engine.kernels.blocks import bind_block_kernel, block_self_check

    try:
        bound = bind_block_kernel(library)
    except (OSError, AttributeError) as exc:
        return None, f"loading the block kernel from {path} failed: {exc}"
    problem = block_self_check(bound, lambda x, w: _call(function, x, pack_weight(w), None,
                                                         int(w.shape[0])))
    if problem is not None:
        return None, f"{problem}; GGUF weights are de-quantized to float32 instead"
    return bound, None


def float32_kernel() -> Any:
    """The bound float32 panel kernel (`PackedLinear`'s), or None where it is unusable."""
    status, function, _blocks = _kernel()
    return function if status.available else None


def block_kernel() -> Any:
    """The bound block kernel library (`engine.kernels.blocks`), or None where it is unusable."""
    status, _function, blocks = _kernel()
    return blocks if status.available else None


def reset_for_tests() -> None:
    """Forget the loaded kernel, so the next use builds and checks it again."""
    global _loaded
    with _lock:
        _loaded = None


# --------------------------------------------------------------------------- packing


def _pad_to_panels(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``tensor`` with its first dimension zero-padded to whole panels."""
    panels = -(-tensor.shape[0] // PANEL)
    padded = torch.zeros(panels * PANEL, *tensor.shape[1:], dtype=torch.float32)
    padded[:tensor.shape[0]] = tensor.detach().to(torch.float32)
    return padded


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` weight -> ``[ceil(out/32), in, 32]`` panels, zero-padded (float32)."""
    in_features = weight.shape[1]
    return _pad_to_panels(weight).reshape(-1, PANEL, in_features).transpose(1, 2).contiguous()


def pad_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias zero-padded to whole panels, or None."""
    return None if bias is None else _pad_to_panels(bias)


_thread_state = threading.local()


def _loaded_library(names: tuple[str, ...], exporting: str) -> Any:
    """The first of ``names`` already loaded in this process (found by its soname, never
    loaded anew) that exports ``exporting``, or None."""
    no_load = getattr(os, "RTLD_NOLOAD", None)
    if no_load is None:
        return None
    for name in names:
        try:
            library = ctypes.CDLL(name, mode=no_load | os.RTLD_LAZY)
        except OSError:
            continue
        if hasattr(library, exporting):
            return library
    return None


def _openmp() -> Any:
    """The OpenMP runtime torch runs on, or None."""
    return _loaded_library(("libgomp.so.1", "libiomp5.so", "libomp.so"), "omp_set_num_threads")


def _mkl() -> Any:
    """The MKL inside torch's CPU library, where it exports its service functions, or None."""
    return _loaded_library(("libtorch_cpu.so", "libmkl_rt.so.2", "libmkl_rt.so"),
                           "mkl_set_num_threads_local_")


def hand_threads_to_kernel() -> None:
    """Let the kernel's workers have this thread's cores while it runs a packed model.

    The kernel splits each product among its own worker threads, which spin
    between the products of a decode step. torch's OpenMP workers spin between
    operators too, and on a machine with few cores the two sets starve each
    other (a decode step gets several times slower). So a thread that runs a
    packed model calls this once: torch's operators in *this thread only* then
    run on one thread (they are small beside the linear layers while decoding),
    and the kernel keeps the thread count torch had. Other threads are untouched.
    """
    if getattr(_thread_state, "threads", None) is not None:
        return
    _thread_state.threads = torch.get_num_threads()
    _thread_state.chosen = None
    runtime = _openmp()
    if runtime is not None and _thread_state.threads > 1:
        runtime.omp_set_num_threads(1)
        # MKL keeps its own thread count, process-wide: without a count local to this thread,
        # each of attention's many small products opens a parallel region (GOMP_parallel)
        # whose sleeping workers take tens of microseconds to wake.
        mkl = _mkl()
        if mkl is not None:  # torch's MKL exports the Fortran-style entry: it takes a pointer
            mkl.mkl_set_num_threads_local_(ctypes.byref(ctypes.c_int(1)))


def kernel_threads() -> int:
    """Threads a product may use: the count torch had for this thread, capped by the cores
    this process may run on (its affinity mask and CPU quota, read once per thread)."""
    chosen: int | None = getattr(_thread_state, "chosen", None)
    if chosen is None:
        wanted = getattr(_thread_state, "threads", None) or torch.get_num_threads()
        chosen = _thread_state.chosen = max(1, min(wanted, usable_cores()))
    return chosen



def _call(function: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
          out_features: int) -> torch.Tensor:
    rows, in_features = x.shape
    out = torch.empty(rows, out_features, dtype=torch.float32)
    if rows:
        function(rows, out_features, in_features, x.data_ptr(), in_features, packed.data_ptr(),
                 None if bias is None else bias.data_ptr(), out.data_ptr(), out_features,
                 kernel_threads())
    return out


class PackedLinear(torch.nn.Module):
    """A float32 CPU linear layer computed by the row-invariant kernel.

    Holds the weight as panels (``packed``, a buffer) and the bias padded to
    whole panels; ``forward`` takes ``[..., in_features]`` like ``nn.Linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, function: Any) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.packed: torch.Tensor
        self.padded_bias: torch.Tensor | None
        self.register_buffer("packed", pack_weight(weight))
        self.register_buffer("padded_bias", pad_bias(bias))
        self._function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"PackedLinear takes float32 CPU inputs, not {x.dtype} on {x.device}")
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = _call(self._function, flat, self.packed, self.padded_bias, self.out_features)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.padded_bias is not None}")


def _as_linear(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight [out, in], bias)`` of a Linear or a GPT-2 style Conv1D, else None."""
    if isinstance(module, torch.nn.Linear):
        return module.weight, module.bias
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and \
            isinstance(weight, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor)):
        return weight.t(), bias  # Conv1D keeps its weight as [in, out]
    return None


def blas_requested() -> bool:
    """True when ``AITBC_ENGINE_LINEAR=blas`` asks the engine to keep torch's BLAS on the CPU."""
    return settings().linear == BLAS_NAME


def pack_linear_layers(model: torch.nn.Module, *, respect_setting: bool = True) -> int:
    """Replace every float32 Linear (and Conv1D) of a CPU model by a `PackedLinear`.

    Returns how many were replaced: 0 when the kernel is unavailable (see
    `kernel_status`) or, with ``respect_setting``, when `blas_requested`. The
    original weights are released, except where they are tied to another module
    (an output head tied to the input embedding keeps the embedding's table and
    gets its own packed copy).
    """
    if respect_setting and blas_requested():
        return 0
    status, function, _blocks = _kernel()
    if not status.available:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            found = _as_linear(child)
            if found is None or found[0].dtype != torch.float32 or found[0].device.type != "cpu":
                continue
            weight, bias = found
            setattr(parent, name, PackedLinear(weight, bias, function))
            replaced += 1
    return replaced
