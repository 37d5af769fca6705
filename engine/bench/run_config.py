"""The configuration jobs run in (:class:`~engine.bench.report.RunConfig`), read off an engine.

Two readings of the same fields, from the same sources the engine uses:

* :func:`recorded_run_config`: what a benchmark's jobs ran in (the engine it
  used, the model it loaded, torch's thread count while they ran); stored in
  the report.
* :func:`current_run_config`: what ``aitbc-engine run``, ``serve`` and ``mine``
  would run a model's jobs in on this machine now, with the given options and
  the engine's defaults for the rest; ``aitbc-engine price`` passes it to
  :func:`engine.pricing.estimate`, which warns where it differs from the
  profile's. This is how pricing learns the thread count without importing
  torch: the face reads it here and hands it over.

Imports torch and the engine lazily (when called), so the report stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.bench.report import Decode, RunConfig

if TYPE_CHECKING:
    from engine.executor import Engine
    from engine.hardware import Device, HardwareInfo
    from engine.loading import LoadedModel
    from engine.registry import ModelSpec


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _device_class(device: Device) -> str:
    return "cpu" if device.kind == "cpu" else f"cuda:{device.gpu_type}"


def recorded_run_config(engine: Engine, loaded: LoadedModel) -> RunConfig:
    """The configuration ``engine`` runs ``loaded``'s jobs in, as they run now."""
    return RunConfig(device_class=loaded.device_class, dtype=loaded.dtype_name,
                     torch_threads=_torch_threads(), batch_size=engine.batch_size,
                     decode=engine.decode, linear_kernel=loaded.linear_kernel)


def _linear_kernel(devices: list[Device], dtype: str) -> str:
    """The linear-layer kernel loading would pick (``engine.loading``: one CPU device, fp32
    on packed panels, or the native dtype on GGUF blocks)."""
    if len(devices) != 1 or devices[0].kind != "cpu" or dtype not in ("float32", "native"):
        return "blas"
    from engine.kernels import BLOCK_KERNEL_NAME
    from engine.kernels.rowgemm import KERNEL_NAME, blas_requested, kernel_status

    if dtype == "native":
        return BLOCK_KERNEL_NAME  # resolve_dtype_name gives "native" only where it can run

    return KERNEL_NAME if not blas_requested() and kernel_status().available else "blas"


def current_run_config(spec: ModelSpec, *, device: str | None = None, dtype: str | None = None,
                       decode: Decode = "auto", batch_size: int | None = None,
                       hardware: HardwareInfo | None = None) -> RunConfig:
    """The configuration an engine built with these options (as ``run``, ``serve`` and ``mine``
    build theirs: ``--device``, ``--dtype``, ``--decode``, ``--batch-size``) runs ``spec``'s
    single jobs in, in this process now."""
    from engine.hardware import discover

    hw = hardware or discover()
    engine_devices = [hw.device(device)] if device else (list(hw.gpus) or [hw.cpu])
    return _run_config(spec, engine_devices, dtype=dtype, decode=decode, batch_size=batch_size)


def engine_run_config(engine: Engine, spec: ModelSpec) -> RunConfig:
    """The configuration a built ``engine`` (``serve``'s) runs ``spec``'s single jobs in now."""
    return _run_config(spec, list(engine.devices), dtype=engine.dtype, decode=engine.decode,
                       batch_size=engine.batch_size)


def _run_config(spec: ModelSpec, engine_devices: list[Device], *, dtype: str | None,
                decode: Decode, batch_size: int | None) -> RunConfig:
    from engine.executor import default_batch_size
    from engine.loading import resolve_dtype_name

    gpus = [d for d in engine_devices if d.kind == "cuda"]
    devices = gpus[:spec.gpu_count] if spec.gpu_count > 1 else engine_devices[:1]
    dtype_name = resolve_dtype_name(spec, devices[0], dtype)
    return RunConfig(device_class=_device_class(devices[0]), dtype=dtype_name,
                     torch_threads=_torch_threads(),
                     batch_size=batch_size or default_batch_size(engine_devices),
                     decode=decode, linear_kernel=_linear_kernel(devices, dtype_name))
