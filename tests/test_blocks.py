"""Weights kept in GGUF quantized blocks (engine/kernels/blocks.py, blockgemm.c): products
equal the float32 kernel's on the reference de-quantized weight bit for bit and are close to
float64, rows are independent of their batch mates and of the thread count, row lookups give
the reference rows, bad layouts are refused, and the weight stays about as small as the file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kernels import rowgemm
from engine.kernels.blocks import (
    PANEL,
    Q4_0,
    Q4_1,
    Q4_K,
    Q6_K,
    Q8_0,
    SUPPORTED,
    BlockEmbedding,
    BlockLayoutError,
    BlockLinear,
    BlockWeight,
    dequantize_reference,
    pack_blocks,
    random_blocks,
)
from engine.kernels.rowgemm import pack_weight, pad_bias

FORMATS = sorted(SUPPORTED)
# The GGUF block formats, written out here rather than taken from the module under test:
# (bytes per block, weights per block), and the byte offsets of each block's half floats.
GGUF_BLOCK = {Q4_0: (18, 32), Q4_1: (20, 32), Q8_0: (34, 32), Q4_K: (144, 256),
              Q6_K: (210, 256)}
HALF_FIELDS = {Q4_0: (0,), Q4_1: (0, 2), Q8_0: (0,), Q4_K: (0, 2), Q6_K: (208,)}
FUSED_AND_WIDENED = (*range(1, 9), 9, 17, 64)  # 1..8 rows straight from the blocks, then not
UNIT_ROUNDOFF = 2.0 ** -24
# Packing a Q4_0 scale past 8188 narrows -8 d to half precision to see whether it fits (it
# does not: the packer keeps single floats), and numpy warns about the overflow.
HALF_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@pytest.fixture(scope="module")
def kernels() -> tuple[Any, Any]:
    """(the block kernel library, the float32 kernel function); skips, with the reason, where
    the block kernel cannot be used here."""
    status, function, blocks = rowgemm._kernel()
    if not status.available:
        pytest.skip(f"the CPU kernel is not available here: {status.reason}")
    if blocks is None:
        pytest.skip(f"the block kernel is not available here: {status.blocks_reason}")
    return blocks, function


def _columns(ggml_type: int, blocks: int) -> int:
    return blocks * GGUF_BLOCK[ggml_type][1]


def _case(ggml_type: int, raw: np.ndarray, rows: int, columns: int,
          ) -> tuple[BlockWeight, torch.Tensor]:
    """The packed weight and the reference float32 weight of the same raw bytes."""
    weight = pack_blocks(ggml_type, raw, rows, columns)
    reference = torch.from_numpy(dequantize_reference(ggml_type, raw, rows, columns))
    assert reference.dtype == torch.float32 and reference.shape == (rows, columns)
    return weight, reference


def _threads(count: int) -> Callable[[], int]:
    return lambda: count


def _float32_product(function: Any, x: torch.Tensor, w: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return rowgemm._call(function, x, pack_weight(w), pad_bias(bias), int(w.shape[0]))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal (unlike torch.equal, -0.0 and 0.0 differ here)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32),
                                              b.contiguous().view(torch.int32))


def _assert_close_to_float64(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                             bias: torch.Tensor | None) -> None:
    """Within the error bound of K fused multiply-adds in float32 (K u sum |x w|), plus the
    bias's rounding, of the float64 product of the same float32 numbers."""
    expected = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    if bias is not None:
        expected += bias.double()
        magnitude += bias.double().abs()
    bound = 2 * (x.shape[1] + 1) * UNIT_ROUNDOFF * magnitude + 1e-30
    error = (got.double() - expected).abs()
    assert torch.isfinite(got).all()
    assert bool((error <= bound).all()), f"off by {(error - bound).max().item():.3g} past bound"
    scale = float(magnitude.max()) if magnitude.numel() else 1.0
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4 * scale)


def _check_products(kernels: tuple[Any, Any], ggml_type: int, raw: np.ndarray, rows: int,
                    columns: int, row_counts: tuple[int, ...], seed: int) -> None:
    blocks, function = kernels
    weight, reference = _case(ggml_type, raw, rows, columns)
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(rows, generator=gen)
    for with_bias in (False, True):
        layer = BlockLinear(weight, bias if with_bias else None, blocks, _threads(2))
        for m in row_counts:
            x = torch.randn(m, columns, generator=gen)
            got = layer(x)
            assert got.shape == (m, rows)
            expected = _float32_product(function, x, reference, bias if with_bias else None)
            assert _same_bits(got, expected), (SUPPORTED[ggml_type], rows, columns, m, with_bias)
            _assert_close_to_float64(got, x, reference, bias if with_bias else None)


# ------------------------------------------------------------------ 1. products, 8. ragged shapes

# (rows, blocks per row, seed): ragged final panels (45, 33, 1, 63), whole panels (32, 96).
SHAPES = [(45, 2, 1), (33, 1, 2), (1, 1, 3), (32, 1, 4), (63, 1, 5), (96, 2, 6)]


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
@pytest.mark.parametrize(("rows", "blocks", "seed"), SHAPES,
                         ids=[f"{r}x{b}blocks" for r, b, _ in SHAPES])
def test_random_blocks_multiply_like_the_float32_kernel_on_the_reference_weight(
        kernels: tuple[Any, Any], ggml_type: int, rows: int, blocks: int, seed: int) -> None:
    columns = _columns(ggml_type, blocks)
    raw = random_blocks(ggml_type, rows, columns, seed=seed)
    assert raw.nbytes == rows * blocks * GGUF_BLOCK[ggml_type][0]
    _check_products(kernels, ggml_type, raw, rows, columns, FUSED_AND_WIDENED, seed)


def _finite_halves() -> st.SearchStrategy[float]:
    """Every finite half float by its bits (sign, exponent 0..30, mantissa), and the edges."""
    by_bits = st.tuples(st.integers(0, 1), st.integers(0, 30), st.integers(0, 1023)).map(
        lambda f: float(np.array([f[0] << 15 | f[1] << 10 | f[2]], np.uint16).view(np.float16)[0]))
    return st.one_of(by_bits, st.sampled_from([65504.0, -65504.0, 8188.0, -8192.0, -0.0,
                                               2.0 ** -24, -(2.0 ** -14)]))


@st.composite
def _raw_tensors(draw: st.DrawFn) -> tuple[int, np.ndarray, int, int]:
    """(type, raw bytes, rows, columns): a few rows of arbitrary block bytes with arbitrary
    finite half-float scales (0, -0, subnormals, 65504 included), cycled to `rows` rows so
    that ragged and multi-panel shapes stay cheap to draw."""
    ggml_type = draw(st.sampled_from(FORMATS))
    size, count = GGUF_BLOCK[ggml_type]
    blocks = 1 if count == 256 else draw(st.integers(1, 2))
    distinct = draw(st.integers(1, 3))
    raw = np.frombuffer(draw(st.binary(min_size=distinct * blocks * size,
                                       max_size=distinct * blocks * size)),
                        dtype=np.uint8).reshape(distinct, blocks, size).copy()
    for offset in HALF_FIELDS[ggml_type]:
        halves = draw(st.lists(_finite_halves(), min_size=distinct * blocks,
                               max_size=distinct * blocks))
        as_bytes = np.array(halves, dtype=np.float16).reshape(distinct, blocks, 1).view(np.uint8)
        raw[..., offset:offset + 2] = as_bytes
    rows = draw(st.integers(1, 70))
    tensor = raw[np.arange(rows) % distinct].reshape(rows, blocks * size)
    return ggml_type, tensor, rows, blocks * count


@HALF_OVERFLOW
@settings(max_examples=40, deadline=None)
@given(case=_raw_tensors(), m=st.sampled_from((*FUSED_AND_WIDENED[:10], 17)),
       seed=st.integers(0, 2**16))
def test_arbitrary_blocks_with_finite_scales_multiply_exactly(
        kernels: tuple[Any, Any], case: tuple[int, np.ndarray, int, int], m: int,
        seed: int) -> None:
    ggml_type, raw, rows, columns = case
    _check_products(kernels, ggml_type, raw, rows, columns, (m,), seed)


def test_a_layer_takes_any_leading_shape_and_refuses_other_dtypes(
        kernels: tuple[Any, Any]) -> None:
    blocks, _ = kernels
    raw = random_blocks(Q4_1, 40, 64, seed=9)
    weight = pack_blocks(Q4_1, raw, 40, 64)
    layer = BlockLinear(weight, None, blocks, _threads(2))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(9))
    got = layer(x)
    assert got.shape == (3, 5, 40)
    assert _same_bits(layer(x.transpose(0, 1)), got.transpose(0, 1).contiguous())
    assert layer(x[:0]).shape == (0, 5, 40)
    with pytest.raises(TypeError, match="float32 CPU"):
        layer(x.double())


# ------------------------------------------------------------------ 2. batched rows = alone rows


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
def test_each_row_of_a_batch_equals_that_row_alone(kernels: tuple[Any, Any],
                                                   ggml_type: int) -> None:
    blocks, _ = kernels
    rows, columns = 45, _columns(ggml_type, 1)
    weight, _reference = _case(ggml_type, random_blocks(ggml_type, rows, columns, seed=21),
                               rows, columns)
    gen = torch.Generator().manual_seed(21)
    layer = BlockLinear(weight, torch.randn(rows, generator=gen), blocks, _threads(2))
    x = torch.randn(20, columns, generator=gen)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(20)])
    for m in range(1, 21):
        assert _same_bits(layer(x[:m]), alone[:m]), (SUPPORTED[ggml_type], m)
    # ... and wherever the row sits in the batch, whatever its neighbours are.
    assert _same_bits(layer(x.flip(0)), alone.flip(0))


# ------------------------------------------------------------------ 3. threads change no bit


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
def test_the_thread_count_changes_no_bit(kernels: tuple[Any, Any], ggml_type: int) -> None:
    blocks, function = kernels
    rows, columns = 7 * PANEL + 5, _columns(ggml_type, 1)  # 8 panels, the last ragged
    weight, reference = _case(ggml_type, random_blocks(ggml_type, rows, columns, seed=31),
                              rows, columns)
    gen = torch.Generator().manual_seed(31)
    bias = torch.randn(rows, generator=gen)
    for m in (1, 5, 8, 9, 33):
        x = torch.randn(m, columns, generator=gen)
        one = BlockLinear(weight, bias, blocks, _threads(1))(x)
        assert _same_bits(one, _float32_product(function, x, reference, bias))
        for threads in (2, 3, 4):
            got = BlockLinear(weight, bias, blocks, _threads(threads))(x)
            assert _same_bits(got, one), (SUPPORTED[ggml_type], m, threads)


# ------------------------------------------------------------------ 4. row lookups


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
@pytest.mark.parametrize("rows", [45, 33, 1, 64])
def test_row_lookups_give_the_reference_rows(kernels: tuple[Any, Any], ggml_type: int,
                                             rows: int) -> None:
    blocks, _ = kernels
    columns = _columns(ggml_type, 2)
    weight, reference = _case(ggml_type, random_blocks(ggml_type, rows, columns, seed=rows),
                              rows, columns)
    embedding = BlockEmbedding(weight, blocks)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    ids = torch.cat([order, torch.tensor([rows - 1, 0, rows - 1])])  # last row of the last panel
    got = embedding(ids)
    assert got.shape == (ids.numel(), columns)
    assert torch.equal(got, reference[ids])
    assert _same_bits(got, reference[ids])
    grid = ids[:6].repeat(2, 1).to(torch.int32)  # any shape and integer type of ids
    assert torch.equal(embedding(grid), reference[grid.long()])
    assert embedding(torch.tensor([], dtype=torch.int64)).shape == (0, columns)


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
def test_out_of_range_ids_are_refused(kernels: tuple[Any, Any], ggml_type: int) -> None:
    blocks, _ = kernels
    rows, columns = 45, _columns(ggml_type, 1)
    weight = pack_blocks(ggml_type, random_blocks(ggml_type, rows, columns), rows, columns)
    embedding = BlockEmbedding(weight, blocks)
    for bad in (-1, rows, rows + 19, 64, 2**40, -(2**40)):  # 45..63 are padding rows
        with pytest.raises(IndexError, match="out of range"):
            embedding(torch.tensor([0, bad]))


def test_q4_0_lookups_keep_the_sign_of_zero_weights(kernels: tuple[Any, Any]) -> None:
    blocks, _ = kernels
    raw = np.zeros((1, 18), dtype=np.uint8)
    raw[0, 0:2] = np.array([-0.5], dtype=np.float16).view(np.uint8)
    raw[0, 2:] = 0x88  # every q = 8: every weight is -0.5 * 0 = -0.0
    weight, reference = _case(Q4_0, raw, 1, 32)
    assert bool(torch.signbit(reference).all())
    assert _same_bits(BlockEmbedding(weight, blocks)(torch.tensor([0])), reference)


# ------------------------------------------------------------------ 5. refused layouts


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
def test_pack_blocks_refuses_layouts_that_do_not_fit(ggml_type: int) -> None:
    size, count = GGUF_BLOCK[ggml_type]
    rows, columns = 3, 2 * count
    raw = random_blocks(ggml_type, rows, columns)
    pack_blocks(ggml_type, raw, rows, columns)  # the right bytes are taken
    flat = raw.reshape(-1)
    for wrong in (flat[:-1], np.concatenate([flat, flat[:1]]), flat[:-size], flat[:0]):
        with pytest.raises(BlockLayoutError, match="needs"):
            pack_blocks(ggml_type, wrong, rows, columns)
    with pytest.raises(BlockLayoutError, match="needs"):
        pack_blocks(ggml_type, raw, rows + 1, columns)  # a row's worth short
    for ragged in (count // 2, count + 16, 2 * count - 1):  # not a whole number of blocks
        with pytest.raises(BlockLayoutError, match=f"multiple of {count}"):
            pack_blocks(ggml_type, np.zeros(rows * size * 2, np.uint8), rows, ragged)


@pytest.mark.parametrize("ggml_type", [0, 1, 6, 7, 9, 10, 11, 13, 15, 30, -1])
def test_pack_blocks_refuses_formats_it_does_not_compute_on(ggml_type: int) -> None:
    # 6 and 7 are Q5_0 and Q5_1, 10/11/13 Q2_K/Q3_K/Q5_K, 0 and 1 F32 and F16.
    with pytest.raises(BlockLayoutError, match="not one the block kernel"):
        pack_blocks(ggml_type, np.zeros(18, np.uint8), 1, 32)


# ------------------------------------------------------------------ 6. memory


# Bytes the layout takes per GGUF block of one row: Q4_1 and Q8_0 exactly the file's; Q4_0
# two more (it keeps its offset -8 d as a second half float); Q4_K and Q6_K keep single-float
# group scales (8 groups of 32 with scale and offset, 16 groups of 16 with a scale).
LAYOUT_BYTES = {Q4_0: 20, Q4_1: 20, Q8_0: 34, Q4_K: 8 * (2 * 4 + 16), Q6_K: 16 * (4 + 16)}
BOUND = {Q4_0: 1.12, Q4_1: 1.0, Q8_0: 1.0, Q4_K: 1.4, Q6_K: 1.6}


@pytest.mark.parametrize("ggml_type", FORMATS, ids=[SUPPORTED[t] for t in FORMATS])
@pytest.mark.parametrize("rows", [64, 45, 1])
def test_the_weight_takes_about_the_files_bytes(kernels: tuple[Any, Any], ggml_type: int,
                                                rows: int) -> None:
    blocks, _ = kernels
    size, count = GGUF_BLOCK[ggml_type]
    columns = 2 * count
    raw = random_blocks(ggml_type, rows, columns, seed=rows)
    weight = pack_blocks(ggml_type, raw, rows, columns)
    padded_rows = -(-rows // PANEL) * PANEL
    file_bytes = raw.nbytes
    assert file_bytes == rows * 2 * size
    assert weight.nbytes == padded_rows * 2 * LAYOUT_BYTES[ggml_type]
    assert weight.nbytes <= BOUND[ggml_type] * file_bytes * padded_rows / rows  # + padding
    assert weight.nbytes == blocks.blockgemm_bytes(weight.kind, int(weight.half), weight.group,
                                                   rows, columns)
    assert weight.half == (ggml_type in (Q4_0, Q4_1, Q8_0))
    assert weight.data.dtype == torch.uint8 and weight.data.is_contiguous()


# ------------------------------------------------------------------ 7. Q4_0 scales past half range


def _q4_0_raw(scales: list[float], q: np.ndarray) -> np.ndarray:
    """Q4_0 bytes of one row: block b has half scale scales[b] and 4-bit values q[b] (32)."""
    raw = np.zeros((len(scales), 18), dtype=np.uint8)
    raw[:, 0:2] = np.array(scales, dtype=np.float16).reshape(-1, 1).view(np.uint8)
    raw[:, 2:] = q[:, :16] | (q[:, 16:] << 4)  # value j in byte j's low nibble, j+16 high
    return raw.reshape(1, -1)


@HALF_OVERFLOW
def test_q4_0_with_offsets_past_half_range_falls_back_to_single_floats_and_stays_exact(
        kernels: tuple[Any, Any]) -> None:
    blocks, function = kernels
    values = np.arange(32, dtype=np.uint8) % 16
    q = np.stack([values, values[::-1].copy(), np.roll(values, 5)])
    scales = [8192.0, -65504.0, 0.25]  # -8 d = -65536 and 524032: not half floats
    rows = 37  # a ragged second panel
    raw = np.concatenate([_q4_0_raw(scales, np.roll(q, r, axis=1)) for r in range(rows)])
    weight, reference = _case(Q4_0, raw, rows, 96)
    by_hand = np.array(scales, np.float32)[:, None] * (np.roll(q, 1, axis=1).astype(np.float32) - 8)
    assert np.array_equal(reference[1].numpy(), by_hand.reshape(-1))
    assert not weight.half
    assert weight.nbytes == 2 * 3 * (2 * PANEL * 4 + 32 * 16)  # 2 panels of 3 groups
    assert _same_bits(BlockEmbedding(weight, blocks)(torch.arange(rows)), reference)
    gen = torch.Generator().manual_seed(71)
    bias = torch.randn(rows, generator=gen)
    for m in (1, 4, 8, 9, 20):
        x = torch.randn(m, 96, generator=gen)
        got = BlockLinear(weight, bias, blocks, _threads(3))(x)
        assert _same_bits(got, _float32_product(function, x, reference, bias))
        _assert_close_to_float64(got, x, reference, bias)


@HALF_OVERFLOW
def test_q4_0_keeps_half_scales_up_to_the_last_offset_half_precision_holds(
        kernels: tuple[Any, Any]) -> None:
    blocks, function = kernels
    q = np.tile(np.arange(32, dtype=np.uint8) % 16, (1, 1))
    largest = pack_blocks(Q4_0, _q4_0_raw([-8188.0], q), 1, 32)  # -8 d = 65504, the half max
    assert largest.half
    assert not pack_blocks(Q4_0, _q4_0_raw([8192.0], q), 1, 32).half
    reference = torch.from_numpy(dequantize_reference(Q4_0, _q4_0_raw([-8188.0], q), 1, 32))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(72))
    assert _same_bits(BlockLinear(largest, None, blocks, _threads(1))(x),
                      _float32_product(function, x, reference, None))
