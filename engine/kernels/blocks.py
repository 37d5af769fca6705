"""Weights kept in a GGUF's quantized blocks, multiplied by the block kernel.

A GGUF file stores each weight row as blocks of quantized numbers with their
scales. :func:`pack_blocks` regroups a tensor's raw blocks into the layout
``blockgemm.c`` reads (panels of 32 output rows, see the C file): the same
quantized numbers and the same scales, so the weight takes about as much
memory as in the file, never a float32 copy. :class:`BlockLinear` and
:class:`BlockEmbedding` are the layers that compute on it; an output head
tied to the input embedding shares the embedding's one :class:`BlockWeight`.

Every weight is widened in registers to the float the GGUF's reference
de-quantization (the ``gguf`` package, which transformers uses) gives, and
multiplied exactly as the float32 kernel multiplies its panels, so a model run
on blocks computes the same floats as the float32 model de-quantized from the
same file, and batched rows equal alone rows by construction.

Formats: Q4_0, Q4_1, Q8_0, Q4_K and Q6_K (`SUPPORTED`). Q4_0, Q4_1 and Q8_0
keep their half-float scales (Q4_0's offset ``-8 d`` is exact in half
precision); Q4_K and Q6_K keep single-float group scales, the products of the
super-block scale and the sub-block scale that the reference computes (so a
Q4_K weight takes 6 bits in memory against 4.5 in the file, Q6_K 10 against 6.6).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PANEL = 32
NIB4, INT8, NIB4_CENTERED = 0, 1, 2  # layout kinds of blockgemm.c (Q4_0 is NIB4_CENTERED)
QK_K = 256

# GGML type ids (the GGUF tensor-info field) of the formats the kernel computes on.
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 2, 3, 8, 12, 14
SUPPORTED: dict[int, str] = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K",
                             Q6_K: "Q6_K"}
# (bytes per block, weights per block) as the GGUF stores them.
# Rows packed at a time (whole panels): bounds the temporaries of packing a large table.
PACK_ROWS = 64 * PANEL
_BLOCK = {Q4_0: (18, 32), Q4_1: (20, 32), Q8_0: (34, 32), Q4_K: (144, QK_K), Q6_K: (210, QK_K)}
__all__ = ["SUPPORTED", "BlockEmbedding", "BlockLayoutError", "BlockLinear", "BlockWeight",
           "bind_block_kernel", "block_self_check", "dequantize_reference", "pack_blocks",
           "random_blocks", "raw_row_bytes"]


class BlockLayoutError(ValueError):
    """A tensor's shape or bytes do not fit its block format."""


@dataclass(frozen=True)
class BlockWeight:
    """A ``[rows, columns]`` weight in the kernel's block layout (``data``: uint8 bytes)."""

    format: str        # the GGUF format it came from, e.g. "Q4_1"
    kind: int          # NIB4, NIB4_CENTERED (Q4_0) or INT8
    half: bool         # half-float scales (else single)
    group: int         # inputs per group: 32, or 16
    rows: int          # outputs
    columns: int       # inputs
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return int(self.data.numel())


def raw_row_bytes(ggml_type: int, columns: int) -> int:
    """Bytes one row of ``columns`` weights takes in the GGUF, for a supported format."""
    size, count = _BLOCK[ggml_type]
    if columns % count:
        raise BlockLayoutError(f"{SUPPORTED[ggml_type]} rows need a multiple of {count} "
                               f"weights, not {columns}")
    return columns // count * size


def _halves(raw: np.ndarray) -> np.ndarray:
    """``[..., 2]`` bytes holding half floats -> float32 ``[...]`` (exact)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _to_panels(values: np.ndarray) -> np.ndarray:
    """``[rows, ...]`` -> ``[panels, 32, ...]``, zero rows appended to whole panels."""
    rows = values.shape[0]
    panels = -(-rows // PANEL)
    padded = np.zeros((panels * PANEL, *values.shape[1:]), dtype=values.dtype)
    padded[:rows] = values
    return padded.reshape(panels, PANEL, *values.shape[1:])


def _scale_bytes(scales: np.ndarray, half: bool) -> np.ndarray:
    """``[rows, groups]`` float32 scales -> ``[panels, groups, 32 * size]`` bytes."""
    panels = _to_panels(scales.astype(np.float16 if half else np.float32))  # [P, 32, G]
    laid = np.ascontiguousarray(panels.transpose(0, 2, 1))  # [P, G, 32]
    return laid.view(np.uint8).reshape(laid.shape[0], laid.shape[1], -1)


def _nibble_groups(q: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                   half: bool) -> np.ndarray:
    """4-bit values ``q`` [rows, groups, 32] with their scales and offsets -> NIB4 bytes."""
    panels = _to_panels(q.astype(np.uint8))                  # [P, 32 rows, G, 32 k]
    by_k = panels.transpose(0, 2, 3, 1)                      # [P, G, 32 k, 32 rows]
    packed = by_k[..., :16] | (by_k[..., 16:] << 4)          # [P, G, 32 k, 16]
    packed = packed.reshape(packed.shape[0], packed.shape[1], -1)
    return np.concatenate([_scale_bytes(scales, half), _scale_bytes(offsets, half), packed],
                          axis=-1)


def _byte_groups(q: np.ndarray, scales: np.ndarray, half: bool, group: int) -> np.ndarray:
    """Signed 8-bit values ``q`` [rows, groups, group] with their scales -> INT8 bytes."""
    panels = _to_panels(q.astype(np.int8))                   # [P, 32 rows, G, group]
    by_k = np.ascontiguousarray(panels.transpose(0, 2, 3, 1))  # [P, G, group, 32 rows]
    laid = by_k.view(np.uint8).reshape(by_k.shape[0], by_k.shape[1], -1)
    return np.concatenate([_scale_bytes(scales, half), laid], axis=-1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., 16] holding 32 4-bit values (low nibbles first, as ggml stores them)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes per super-block -> 8 six-bit scales and 8 six-bit mins."""
    blocks = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, m_d = blocks[..., 0, :], blocks[..., 1, :], blocks[..., 2, :]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mins


def _decode(ggml_type: int, raw: np.ndarray, rows: int, columns: int,
            ) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]:
    """A tensor's raw blocks -> (kind, group, q [rows, groups, group], scales, offsets).

    ``scales``/``offsets`` are float32 ``[rows, groups]``, equal to what the
    reference de-quantization multiplies and adds; ``q`` holds small integers.
    """
    size, count = _BLOCK[ggml_type]
    blocks = raw.reshape(rows, columns // count, size)
    if ggml_type == Q4_0:
        d = _halves(blocks[..., 0:2])
        return NIB4, 32, _nibbles(blocks[..., 2:]), d, d * np.float32(-8)
    if ggml_type == Q4_1:
        return NIB4, 32, _nibbles(blocks[..., 4:]), _halves(blocks[..., 0:2]), \
            _halves(blocks[..., 2:4])
    if ggml_type == Q8_0:
        return INT8, 32, blocks[..., 2:].view(np.int8), _halves(blocks[..., 0:2]), None
    supers = columns // QK_K
    if ggml_type == Q4_K:
        d, dmin = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])
        sc, mins = _q4_k_scales(blocks[..., 4:16])
        scale = d[..., None] * sc.astype(np.float32)          # [rows, supers, 8]
        low = dmin[..., None] * mins.astype(np.float32)
        chunks = blocks[..., 16:].reshape(rows, supers, 4, 32)  # 4 chunks of 32 bytes
        q = np.stack([chunks & 0x0F, chunks >> 4], axis=3)     # sub-block 2c, 2c+1
        return (NIB4, 32, q.reshape(rows, supers * 8, 32), scale.reshape(rows, -1),
                (-low).reshape(rows, -1))
    # Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, half d.
    low_shift = np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    high_shift = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    ql = ((blocks[..., 0:128].reshape(rows, supers, 2, 1, 64) >> low_shift) & 0x0F) \
        .reshape(rows, supers, 8, 32)
    qh = ((blocks[..., 128:192].reshape(rows, supers, 2, 1, 32) >> high_shift) & 0x03) \
        .reshape(rows, supers, 8, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    scales = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    d = _halves(blocks[..., 208:210])
    return INT8, 16, q.reshape(rows, supers * 16, 16), (d[..., None] * scales).reshape(rows, -1), \
        None


def _exact_in_half(values: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # past half range: inf, and the answer is no
        narrowed = values.astype(np.float16)
    return bool(np.all(np.isfinite(narrowed)) and np.array_equal(narrowed.astype(np.float32),
                                                                 values))


def pack_blocks(ggml_type: int, raw: np.ndarray, rows: int, columns: int) -> BlockWeight:
    """A tensor's raw GGUF bytes (``rows`` rows of ``columns`` weights) in the kernel's layout."""
    if ggml_type not in SUPPORTED:
        raise BlockLayoutError(f"GGML type {ggml_type} is not one the block kernel computes on")
    expected = rows * raw_row_bytes(ggml_type, columns)
    flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if flat.size != expected:
        raise BlockLayoutError(f"{SUPPORTED[ggml_type]} tensor of {rows}x{columns} needs "
                               f"{expected} bytes, not {flat.size}")
    by_row = flat.reshape(rows, -1)
    half = ggml_type in (Q4_0, Q4_1, Q8_0) and _half_exact(ggml_type, by_row, rows, columns)
    if rows == 0:
        raise BlockLayoutError(f"{SUPPORTED[ggml_type]} tensor has no rows")
    panels = -(-rows // PANEL)
    laid: np.ndarray | None = None
    for start in range(0, rows, PACK_ROWS):  # one slice of panels at a time: few temporaries
        kind, group, part = _pack_rows(ggml_type, by_row[start:start + PACK_ROWS], columns, half)
        per_panel = part.size // -(-min(PACK_ROWS, rows - start) // PANEL)
        if laid is None:
            laid = np.empty(panels * per_panel, dtype=np.uint8)
        first = start // PANEL * per_panel
        laid[first:first + part.size] = part
    assert laid is not None
    if ggml_type == Q4_0:
        kind = NIB4_CENTERED
    return BlockWeight(SUPPORTED[ggml_type], kind, half, group, rows, columns,
                       torch.from_numpy(laid))


def _half_exact(ggml_type: int, by_row: np.ndarray, rows: int, columns: int) -> bool:
    """Whether the format's half-float scales (and Q4_0's offsets ``-8 d``) stay exact as
    half floats: always for Q4_1 and Q8_0; for Q4_0 unless ``-8 d`` passes half range."""
    if ggml_type != Q4_0:
        return True
    size, count = _BLOCK[Q4_0]
    d = _halves(by_row.reshape(rows, columns // count, size)[..., 0:2])
    return _exact_in_half(d * np.float32(-8))  # d itself is a half float


def _pack_rows(ggml_type: int, raw: np.ndarray, columns: int, half: bool,
               ) -> tuple[int, int, np.ndarray]:
    """(kind, group, flat layout bytes) of a slice of whole panels of rows."""
    rows = raw.shape[0]
    kind, group, q, scales, offsets = _decode(ggml_type, raw.reshape(-1), rows, columns)
    if kind == NIB4:
        assert offsets is not None
        laid = _nibble_groups(q, scales, offsets, half)
    else:
        laid = _byte_groups(q, scales, half, group)
    return kind, group, np.ascontiguousarray(laid).reshape(-1)


def dequantize_reference(ggml_type: int, raw: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The float32 weight the ``gguf`` package's reference de-quantization gives."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1)
    return dequantize(data, GGMLQuantizationType(ggml_type)).reshape(rows, columns)


# Where each format keeps its half-float scale fields (byte offsets in a block).
_HALF_FIELDS = {Q4_0: (0,), Q4_1: (0, 2), Q8_0: (0,), Q4_K: (0, 2), Q6_K: (208,)}


def random_blocks(ggml_type: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Random raw GGUF bytes of a ``rows x columns`` tensor: random quantized numbers
    and sub-scales, half-float scales of moderate size (for checks and tests)."""
    size, count = _BLOCK[ggml_type]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, columns // count, size), dtype=np.uint8)
    for offset in _HALF_FIELDS[ggml_type]:
        halves = rng.uniform(-0.05, 0.05, size=raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = halves[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def block_self_check(kernel: Any, float32_product: Any) -> str | None:
    """Check the built block kernel on random tensors of every format: its products must
    equal, bit for bit, the float32 kernel's on the reference de-quantized weight, alone
    and batched, and its row lookups the reference rows. Returns what is wrong, or None."""
    gen = torch.Generator().manual_seed(11)
    for ggml_type, name in SUPPORTED.items():
        columns = QK_K if ggml_type in (Q4_K, Q6_K) else 64
        raw = random_blocks(ggml_type, 45, columns, seed=ggml_type)
        weight = pack_blocks(ggml_type, raw, 45, columns)
        reference = torch.from_numpy(dequantize_reference(ggml_type, raw, 45, columns))
        x = torch.randn(11, columns, generator=gen)
        layer = BlockLinear(weight, None, kernel, lambda: 2)
        got = layer(x)
        if not torch.equal(got, float32_product(x, reference)):
            return f"the block kernel's {name} product differs from the float32 kernel's"
        if not torch.equal(layer(x[3:4]), got[3:4]):
            return f"the block kernel's {name} rows depend on their neighbours"
        rows = BlockEmbedding(weight, kernel)(torch.tensor([0, 44, 17]))
        if not torch.equal(rows, reference[[0, 44, 17]]):
            return f"the block kernel's {name} row lookup differs from the reference"
    return None


# --------------------------------------------------------------------------- layers


class BlockLinear(torch.nn.Module):
    """A float32 CPU linear layer whose weight stays in quantized blocks (no bias in GGUF
    LLaMA layers, but one is supported). ``forward`` takes ``[..., columns]``."""

    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None, kernel: Any,
                 threads: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.columns, weight.rows
        self.blocks: torch.Tensor
        self.register_buffer("blocks", weight.data, persistent=False)
        padded = None
        if bias is not None:
            panels = -(-weight.rows // PANEL)
            padded = torch.zeros(panels * PANEL, dtype=torch.float32)
            padded[:weight.rows] = bias.detach().to(torch.float32)
        self.padded_bias: torch.Tensor | None
        self.register_buffer("padded_bias", padded, persistent=False)
        self._kernel = kernel
        self._threads = threads
        self._product = kernel.blockgemm_bound
        self.use_blocks(weight)

    def use_blocks(self, weight: BlockWeight) -> None:
        """Compute on ``weight`` from now on (the same rows and layout, other storage: a
        view into a fused weight's buffer)."""
        self.weight_blocks = weight
        self.blocks = weight.data
        self._bound = _BoundWeight(weight.kind, int(weight.half), weight.group, weight.rows,
                                   weight.columns, weight.data.data_ptr(),
                                   None if self.padded_bias is None
                                   else self.padded_bias.data_ptr())
        self._bound_address = ctypes.addressof(self._bound)

    @property
    def bound_address(self) -> int:
        """The address of this layer's ``bound_weight`` (blockgemm.c), valid while it lives
        and computes on the same blocks: what C code that runs the product itself takes."""
        return self._bound_address

    @property
    def threads(self) -> Any:
        """The callable giving the thread count each product runs on."""
        return self._threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"BlockLinear takes float32 CPU inputs, not {x.dtype} on {x.device}")
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = x.new_empty(*x.shape[:-1], self.out_features)
        if flat.shape[0] and self._product(self._bound_address, flat.shape[0], flat.data_ptr(),
                                           out.data_ptr(), self._threads()):
            w = self.weight_blocks
            raise BlockLayoutError(f"the block kernel refused a {w.format} weight of "
                                   f"{w.rows}x{w.columns}")
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.weight_blocks.format}, bias={self.padded_bias is not None}")


class BlockEmbedding(torch.nn.Module):
    """An embedding table kept in quantized blocks: a lookup widens just the rows it needs."""

    def __init__(self, weight: BlockWeight, kernel: Any) -> None:
        super().__init__()
        self.weight_blocks = weight
        self.num_embeddings, self.embedding_dim = weight.rows, weight.columns
        self.blocks: torch.Tensor
        self.register_buffer("blocks", weight.data, persistent=False)
        self._kernel = kernel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=torch.float32)
        if flat.numel():
            w = self.weight_blocks
            failed = self._kernel.blockgemm_rows(
                w.kind, int(w.half), w.group, w.rows, w.columns, self.blocks.data_ptr(),
                flat.data_ptr(), flat.numel(), out.data_ptr())
            if failed:
                raise IndexError(f"token id out of range for an embedding of {w.rows} rows")
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.weight_blocks.format}"


def bind_block_kernel(library: ctypes.CDLL) -> Any:
    """Set the argument types of the library's block functions; returns the library."""
    size = ctypes.c_ssize_t
    library.blockgemm_rows.restype = ctypes.c_int
    library.blockgemm_rows.argtypes = [ctypes.c_int, ctypes.c_int, size, size, size,
                                       ctypes.c_void_p, ctypes.c_void_p, size, ctypes.c_void_p]
    library.blockgemm_bytes.restype = size
    library.blockgemm_bytes.argtypes = [ctypes.c_int, ctypes.c_int, size, size, size]
    library.blockgemm_bound.restype = ctypes.c_int
    library.blockgemm_bound.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int]
    return library


class _BoundWeight(ctypes.Structure):
    """``bound_weight`` of blockgemm.c: a weight's layout and buffers, bound once."""

    _fields_ = [("kind", ctypes.c_int32), ("half", ctypes.c_int32), ("group", ctypes.c_ssize_t),
                ("n_len", ctypes.c_ssize_t), ("k_len", ctypes.c_ssize_t),
                ("blocks", ctypes.c_void_p), ("bias", ctypes.c_void_p)]
