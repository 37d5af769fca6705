"""Loading a GGUF model onto its own quantized blocks (the ``native`` CPU dtype).

The float32 path de-quantizes a GGUF once into a safetensors conversion and
loads that: 538 MB of float32 for SmolLM2-135M, held as packed panels, for a
file of 98 MB. This path keeps the file's blocks instead: each linear weight
and the token embedding go to the block kernel (:mod:`engine.kernels.blocks`)
in the GGUF's own formats, so the model takes about what the file takes, and a
decode step reads about a sixth of the bytes. The floats computed are the
float32 path's exactly (the kernel widens every weight to the reference
de-quantization's value and sums in the float32 kernel's order), so results
and hashes equal the float32 path's; the profile's ``dtype`` says ``native``.

* The model's skeleton is built on the ``meta`` device (no float32 weights are
  ever allocated); its config and tokenizer come from a small verified
  conversion in the cache (``<name>-<digest>-native``: config and tokenizer
  files only, with a manifest, like the float32 conversion).
* The GGUF's tensors are read with ordinary reads, not a memory map kept
  alive, so the blocks in the kernel's layout are the only copy in memory.
  The file's identity (inode, size, times) is checked after reading against
  the identity its digest was computed for; a file that changed is read again.
* Tensors the kernel has no format for (F16, Q5_K, ...) are de-quantized by
  the reference and computed by the float32 kernel, so the floats still match.

Only the LLaMA family (``general.architecture: llama``) is mapped; for other
GGUF models, :class:`NativeUnavailableError` says why, and the engine loads
the float32 path instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import weightfiles
from engine.errors import EngineError
from engine.kernels import BLOCK_KERNEL_NAME
from engine.kernels import blocks as block_formats
from engine.kernels.blocks import BlockEmbedding, BlockLinear, BlockWeight, pack_blocks
from engine.kernels.rowgemm import PackedLinear, block_kernel, float32_kernel, kernel_threads

log = logging.getLogger(__name__)

F32, F16, BF16 = 0, 1, 30
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# GGUF tensor -> the LLaMA module (under model.layers.N) it fills.
_LLAMA_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                  "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
_LLAMA_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
__all__ = ["BLOCK_KERNEL_NAME", "GgufFile", "GgufTensor",
           "NativeUnavailableError", "build_native_model", "native_unavailable_reason",
           "read_gguf_header", "return_free_memory"]


class NativeUnavailableError(EngineError):
    """The model cannot run on its GGUF blocks here; the message says why."""

    code = "native_unavailable"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file: its name, GGML type, ``[rows, columns]`` and raw bytes."""

    name: str
    ggml_type: int
    rows: int
    columns: int
    raw: np.ndarray  # uint8, rows x row bytes


def native_unavailable_reason(architecture: str, source_format: str) -> str | None:
    """Why a model of ``architecture`` from ``source_format`` weights cannot run natively
    here (None when it can): the source must be GGUF, the family mapped, the kernel built."""
    if source_format != "gguf":
        return "the native dtype computes on GGUF blocks, and this model's weights are not GGUF"
    if architecture != "llama":
        return f"the native dtype maps the LLaMA family only, not {architecture!r}"
    from engine.kernels.rowgemm import blas_requested, kernel_status

    if blas_requested():
        return "AITBC_ENGINE_LINEAR=blas turns the CPU kernels off"
    status = kernel_status()
    if not status.available:
        return status.reason
    if not status.blocks_available:
        return status.blocks_reason
    return None


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file's header: the metadata fields the loader needs and where each tensor is."""

    path: Path
    fields: dict[str, Any]
    # (name, GGML type, rows, columns, bytes, offset in the file) per tensor, in file order
    layout: list[tuple[str, int, int, int, int, int]]

    @property
    def names(self) -> set[str]:
        """The names of the file's tensors."""
        return {entry[0] for entry in self.layout}

    def tensors(self) -> Iterator[GgufTensor]:
        """Each tensor's raw bytes, read with ``pread`` into a private buffer, one at a time
        (so a loader packs one while the others are not yet in memory)."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for name, ggml_type, rows, columns, n_bytes, offset in self.layout:
                raw = np.empty(n_bytes, dtype=np.uint8)
                view = memoryview(raw.data)
                done = 0
                while done < n_bytes:
                    got = os.preadv(fd, [view[done:]], offset + done)
                    if got <= 0:
                        raise weightfiles.WeightFileProblem(self.path,
                                                            f"it ends inside tensor {name}")
                    done += got
                yield GgufTensor(name, ggml_type, rows, columns, raw.reshape(rows, -1))
        finally:
            os.close(fd)


# GGUF metadata value types: fixed sizes in bytes; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_LIMIT = 1 << 40  # no count or length in a header is near this


class _HeaderReader:
    """Reads a GGUF header's little-endian fields from a buffered file."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.stream = stream
        self.path = path

    def take(self, size: int) -> bytes:
        data: bytes = self.stream.read(size)
        if len(data) != size:
            raise weightfiles.WeightFileProblem(self.path, "it ends inside its GGUF header")
        return data

    def number(self, fmt: str) -> int:
        value = struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]
        if not 0 <= value < _GGUF_LIMIT:
            raise weightfiles.WeightFileProblem(self.path, f"its GGUF header holds {value}")
        return int(value)

    def string(self) -> str:
        return self.take(self.number("Q")).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind == _GGUF_STRING:
            self.stream.seek(self.number("Q"), os.SEEK_CUR)
        elif kind == _GGUF_ARRAY:
            item, count = self.number("I"), self.number("Q")
            if item in _GGUF_SIZES:
                self.stream.seek(_GGUF_SIZES[item] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip_value(item)
        elif kind in _GGUF_SIZES:
            self.stream.seek(_GGUF_SIZES[kind], os.SEEK_CUR)
        else:
            raise weightfiles.WeightFileProblem(self.path, f"unknown GGUF value type {kind}")


def read_gguf_header(path: Path) -> GgufFile:
    """A GGUF (version 2 or 3) file's tensor table and the few metadata fields the loader
    needs; no tensor data is read.

    The ``gguf`` package's reader would do this too, but it builds an object for every
    metadata value: SmolLM2's 49,152-token vocabulary left about 25 MB of Python heap
    resident after loading. This walk skips values it does not need.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    fields: dict[str, Any] = {}
    alignment = 32
    with path.open("rb") as stream:
        header = _HeaderReader(stream, path)
        if header.take(4) != b"GGUF":
            raise weightfiles.WeightFileProblem(path, "it does not start with GGUF's magic")
        version = header.number("I")
        if version not in (2, 3):
            raise weightfiles.WeightFileProblem(path, f"GGUF version {version} is not read")
        tensor_count, field_count = header.number("Q"), header.number("Q")
        for _ in range(field_count):
            key, kind = header.string(), header.number("I")
            if key == "general.architecture" and kind == _GGUF_STRING:
                fields[key] = header.string()
            elif key == "general.alignment" and kind == 4:
                alignment = header.number("I") or 32
            else:
                header.skip_value(kind)
        infos = []
        for _ in range(tensor_count):
            name, dims = header.string(), header.number("I")
            shape = [header.number("Q") for _ in range(dims)]
            infos.append((name, header.number("I"), shape, header.number("Q")))
        data_start = -(-stream.tell() // alignment) * alignment
        size = os.fstat(stream.fileno()).st_size
    layout = []
    for name, ggml_type, shape, offset in infos:
        try:
            per_block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError) as exc:
            raise weightfiles.WeightFileProblem(path, f"tensor {name} has unknown GGML type "
                                                f"{ggml_type}") from exc
        columns = shape[0] if shape else 1
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if columns % per_block:
            raise weightfiles.WeightFileProblem(path, f"tensor {name}'s rows are not whole "
                                                "blocks")
        n_bytes = rows * (columns // per_block) * block_bytes
        if data_start + offset + n_bytes > size:
            raise weightfiles.WeightFileProblem(path, f"it ends inside tensor {name}")
        layout.append((name, ggml_type, rows, columns, n_bytes, data_start + offset))
    return GgufFile(path, fields, layout)


def _float_rows(tensor: GgufTensor) -> torch.Tensor:
    """A tensor's float32 values (F32 as stored; anything else by the reference)."""
    if tensor.ggml_type == F32:
        values = tensor.raw.reshape(-1).view(np.float32)
    else:
        values = block_formats.dequantize_reference(tensor.ggml_type, tensor.raw, tensor.rows,
                                                    tensor.columns)
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(tensor.rows,
                                                                       tensor.columns))


def _unpermute_rows(tensor: GgufTensor, heads: int) -> GgufTensor:
    """Undo the row order the GGUF converter gives LLaMA's q and k weights for its rotary
    layout (the same reordering transformers applies), on whole rows of blocks."""
    half = tensor.rows // heads // 2
    order = np.arange(tensor.rows).reshape(heads, half, 2).swapaxes(2, 1).reshape(-1)
    return GgufTensor(tensor.name, tensor.ggml_type, tensor.rows, tensor.columns,
                      np.ascontiguousarray(tensor.raw[order]))


def _module(root: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    parent = root
    *path, leaf = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    return parent, leaf


def _parameter(values: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(values.contiguous(), requires_grad=False)


class _Builder:
    """Puts the GGUF's tensors into a LLaMA skeleton built on the meta device."""

    def __init__(self, model: torch.nn.Module, kernel: Any,
                 threads: Callable[[], int]) -> None:
        self.model = model
        self.kernel = kernel
        self.threads = threads
        self.formats: dict[str, int] = {}

    def linear(self, dotted: str, tensor: GgufTensor) -> BlockWeight | None:
        parent, leaf = _module(self.model, dotted)
        if tensor.ggml_type in block_formats.SUPPORTED:
            weight = pack_blocks(tensor.ggml_type, tensor.raw, tensor.rows, tensor.columns)
            setattr(parent, leaf, BlockLinear(weight, None, self.kernel, self.threads))
            self._count(weight.format)
            return weight
        setattr(parent, leaf, PackedLinear(_float_rows(tensor), None, float32_kernel()))
        self._count("F32" if tensor.ggml_type == F32 else f"type {tensor.ggml_type} as F32")
        return None

    def tied_head(self, dotted: str, weight: BlockWeight) -> None:
        parent, leaf = _module(self.model, dotted)
        setattr(parent, leaf, BlockLinear(weight, None, self.kernel, self.threads))

    def embedding(self, dotted: str, tensor: GgufTensor) -> BlockWeight | None:
        parent, leaf = _module(self.model, dotted)
        if tensor.ggml_type in block_formats.SUPPORTED:
            weight = pack_blocks(tensor.ggml_type, tensor.raw, tensor.rows, tensor.columns)
            setattr(parent, leaf, BlockEmbedding(weight, self.kernel))
            self._count(weight.format)
            return weight
        table = _float_rows(tensor)
        setattr(parent, leaf, torch.nn.Embedding.from_pretrained(table, freeze=True))
        return None

    def vector(self, dotted: str, tensor: GgufTensor) -> None:
        parent, leaf = _module(self.model, dotted)
        values = _float_rows(tensor).reshape(-1)
        setattr(parent, leaf, _parameter(values))

    def _count(self, name: str) -> None:
        self.formats[name] = self.formats.get(name, 0) + 1


def _place_tensor(builder: _Builder, tensor: GgufTensor, *, heads: int, kv_heads: int,
                  tied: bool) -> None:
    """Put one GGUF tensor where it belongs in the LLaMA model."""
    name = tensor.name
    if name == "token_embd.weight":
        table = builder.embedding("model.embed_tokens", tensor)
        if tied:  # the output head is the embedding table itself: one copy of it
            if table is not None:
                builder.tied_head("lm_head", table)
            else:
                builder.linear("lm_head", tensor)
        return
    if name == "output.weight":
        builder.linear("lm_head", tensor)
        return
    if name == "output_norm.weight":
        builder.vector("model.norm.weight", tensor)
        return
    found = _LAYER.fullmatch(name)
    if found is None:
        if name.startswith("rope_freqs"):
            return  # LLaMA 3 frequency factors: transformers computes them from the config
        raise NativeUnavailableError(f"the GGUF tensor {name!r} has no place in the model")
    layer, part = found.groups()
    prefix = f"model.layers.{layer}."
    if part in _LLAMA_LINEARS:
        if part == "attn_q":
            tensor = _unpermute_rows(tensor, heads)
        elif part == "attn_k":
            tensor = _unpermute_rows(tensor, kv_heads)
        builder.linear(prefix + _LLAMA_LINEARS[part], tensor)
    elif part in _LLAMA_NORMS:
        builder.vector(prefix + _LLAMA_NORMS[part] + ".weight", tensor)
    else:
        raise NativeUnavailableError(f"the GGUF tensor {name!r} has no place in the model")


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Loading packs tensor after tensor through large temporaries, and glibc
    keeps what they leave in its heap: about 70 MB of resident memory for SmolLM2-135M."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _materialize_buffers(model: torch.nn.Module, config: Any) -> None:
    """Rebuild, on the CPU, the modules whose buffers (rotary frequencies) are still on meta."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            meta = [b for b in child.buffers(recurse=False) if b.is_meta]
            if meta and not any(True for _ in child.parameters(recurse=False)):
                with torch.device("cpu"):
                    setattr(parent, name, type(child)(config=config))


def build_native_model(make_model: Callable[[], torch.nn.Module], config: Any,
                       gguf: GgufFile) -> tuple[torch.nn.Module, dict[str, int]]:
    """A LLaMA model whose weights are the GGUF's blocks; returns it and a count of the
    formats its layers compute on (``{"Q4_1": 210, "Q8_0": 1}``). ``make_model`` builds
    the architecture from ``config``; it is called under the meta device."""
    kernel = block_kernel()
    if kernel is None:
        raise NativeUnavailableError("the block kernel is not available here")
    architecture = str(gguf.fields.get("general.architecture", ""))
    if architecture != "llama":
        raise NativeUnavailableError(f"the native dtype maps the LLaMA family only, not "
                                     f"{architecture or 'an unnamed architecture'!r}")
    names = gguf.names
    for needed in ("token_embd.weight", "output_norm.weight"):
        if needed not in names:
            raise NativeUnavailableError(f"the GGUF has no {needed}")
    tied = "output.weight" not in names
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    with torch.device("meta"):
        model = make_model()
    builder = _Builder(model, kernel, kernel_threads)
    for tensor in gguf.tensors():
        _place_tensor(builder, tensor, heads=heads, kv_heads=kv_heads, tied=tied)
        del tensor  # its raw bytes go before the next tensor is read
    _materialize_buffers(model, config)
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise NativeUnavailableError(f"the GGUF leaves {', '.join(left[:4])} unset")
    model.eval()
    return model, builder.formats
