"""The native CPU dtype on every GGUF format: a tiny LLaMA made here (tests/gguf_tiny.py).

SmolLM2 only has Q4_1 and Q8_0. Here tiny GGUFs mix the five block formats (Q4_0, Q4_1,
Q8_0, Q4_K, Q6_K) with formats the block kernel leaves to the float32 kernel (F32, F16,
Q5_0, Q5_K), with a tied and an untied head, a block-format and a float embedding. For
each, the ``native`` model must compute the float32 path's floats exactly (the same
logits bit for bit, so with ``decode="dynamic"`` the same tokens and result hashes, alone
and batched), hold far
less memory, and a GGUF of another family must be refused by name and fall back to
float32 by default. Where every projection and the head are blocks, the fused C decode
step must follow the forward within rounding and keep batched results equal to alone ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_registry
from gguf_tiny import (
    BLOCK_FORMATS,
    DEFAULT_FORMATS,
    F16,
    F32,
    LAYERS,
    LINEAR_ROLES,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_K,
    Q6_K,
    Q8_0,
    TYPE_NAMES,
    gpt2_entry,
    llama_entry,
    make_tiny_gpt2_gguf,
    make_tiny_llama_gguf,
    tensor_format,
)
from transformers import DynamicCache

from engine import Engine, loading
from engine.errors import DeviceError, WeightsUnavailableError
from engine.hardware import discover
from engine.kernels import BLOCK_KERNEL_NAME, KERNEL_NAME
from engine.kernels.blocks import BlockEmbedding, BlockLinear
from engine.kernels.rowgemm import kernel_status
from engine.loading import LoadedModel, load_model, resolve_dtype_name
from engine.native_model import NativeLlama
from engine.native_step import FusedDecodeStep
from engine.options import Decode
from engine.pool import ModelPool
from engine.registry import Registry

# name -> (formats, tied). Together: every block format as a linear layer, as a row lookup
# and as the head (tied and untied); F32, F16, Q5_0 and Q5_K through the float32 kernel,
# including a float embedding whose tied head is a float32 linear layer.
VARIANTS: dict[str, tuple[Mapping[str, int], bool]] = {
    "default-tied": (DEFAULT_FORMATS, True),
    "default-untied": (DEFAULT_FORMATS, False),
    "rotated-float-embedding-tied": ({
        "token_embd": Q5_0, "attn_q": Q6_K, "attn_k": Q4_K, "attn_v": Q4_0,
        "attn_output": Q4_1, "ffn_gate": Q8_0, "ffn_up": Q5_K, "ffn_down": Q4_0,
        "blk.1.attn_q": F16, "blk.1.ffn_gate": F32}, True),
    "q8-embedding-q4_0-head-untied": ({
        "token_embd": Q8_0, "output": Q4_0, "attn_q": Q4_1, "attn_k": Q6_K, "attn_v": Q4_K,
        "attn_output": Q6_K, "ffn_gate": Q4_1, "ffn_up": Q4_0, "ffn_down": Q8_0}, False),
    "q6k-embedding-tied": ({
        "token_embd": Q6_K, "attn_q": Q8_0, "attn_k": Q8_0, "attn_v": Q6_K,
        "attn_output": Q4_K, "ffn_gate": Q4_0, "ffn_up": Q4_1, "ffn_down": Q4_K}, True),
    "q4_1-embedding-q4k-head-untied": ({
        "token_embd": Q4_1, "output": Q4_K, "attn_q": Q4_K, "attn_k": Q4_0, "attn_v": Q4_1,
        "attn_output": Q4_0, "ffn_gate": Q6_K, "ffn_up": Q8_0, "ffn_down": Q4_1}, False),
    "f16-embedding-q5k-head-untied": ({
        "token_embd": F16, "output": Q5_K, "attn_q": Q4_K, "attn_k": Q4_K, "attn_v": Q8_0,
        "attn_output": Q5_0, "ffn_gate": Q4_1, "ffn_up": Q6_K, "ffn_down": Q4_0,
        "blk.0.attn_v": F32}, False),
}
PROMPTS = ("Hello network, the capital of France is", "The quick brown fox",
           "Numbers: 0 1 2 3", "A miner runs jobs on its CPU and hands back a result hash")


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An engine cache of this module's own (the conversions do not pile up in the user's)."""
    path = tmp_path_factory.mktemp("engine-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AITBC_ENGINE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def blocks_here() -> None:
    status = kernel_status()
    if not (status.available and status.blocks_available):
        pytest.skip(f"no block kernel here: {status.reason}; {status.blocks_reason}")


def _name(variant: str) -> str:
    return f"tiny-llama-{variant}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The packaged registry plus one tiny LLaMA GGUF per variant."""
    base = tmp_path_factory.mktemp("native-formats")
    extra: dict[str, dict[str, object]] = {}
    for seed, (variant, (formats, tied)) in enumerate(VARIANTS.items()):
        path = make_tiny_llama_gguf(base / variant / "tiny.gguf", formats=formats, seed=seed,
                                    tied=tied)
        extra[_name(variant)] = llama_entry(path, tied=tied)
    return Registry.load(write_registry(base / "models.yaml", extra))


@pytest.fixture(scope="module")
def gpt2_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The packaged registry plus a GGUF GPT-2, as itself and mislabelled as a LLaMA."""
    base = tmp_path_factory.mktemp("native-gpt2")
    gpt2 = make_tiny_gpt2_gguf(base / "gpt2" / "tiny-gpt2.gguf")
    extra = {"tiny-gpt2-gguf": gpt2_entry(gpt2),  # architecture gpt2, cpu: native by default
             # The registry says llama, the file's general.architecture gpt2.
             "tiny-gpt2-gguf-as-llama": llama_entry(gpt2)}
    return Registry.load(write_registry(base / "models.yaml", extra))


def _jobs(model: str) -> list[dict[str, Any]]:
    """Greedy jobs of 16 to 24 tokens, a seeded sampled job and a chat job."""
    return [
        {"model": model, "prompt": PROMPTS[0], "max_tokens": 24},
        {"model": model, "prompt": PROMPTS[1], "max_tokens": 16},
        {"model": model, "prompt": PROMPTS[2], "max_tokens": 20, "temperature": 0.8, "seed": 3},
        {"model": model, "messages": [{"role": "user", "content": "Name a colour."}],
         "max_tokens": 16},
    ]


def _run_all(registry: Registry, model: str, dtype: str, decode: Decode = "auto") -> list[Any]:
    """The jobs one after another, then the same four submitted together (so they batch);
    the two engines share one pool, so the model loads once."""
    pool = ModelPool()
    with Engine(registry, devices=["cpu"], dtype=dtype, pool=pool, job_timeout=120,
                decode=decode) as engine:
        alone = [engine.run(job) for job in _jobs(model)]
    with Engine(registry, devices=["cpu"], dtype=dtype, pool=pool, batch_size=4,
                batch_window_seconds=0.5, job_timeout=120, decode=decode) as engine:
        handles = [engine.submit(job) for job in _jobs(model)]
        together = [handle.result(timeout=120) for handle in handles]
    pool.evict()
    return alone + together


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_jobs_equal_float32_jobs_hash_for_hash(
        variant: str, registry: Registry, engine_cache: Path, blocks_here: None) -> None:
    model = _name(variant)
    native = _run_all(registry, model, "native", decode="dynamic")  # the forward's floats
    fp32 = _run_all(registry, model, "float32")
    for job, (a, b) in enumerate(zip(native, fp32, strict=True)):
        assert a.ok and b.ok, (a.error, b.error)
        assert a.output.token_ids == b.output.token_ids, f"job {job}: tokens differ"
        assert a.output.commitment == b.output.commitment, f"job {job}: commitments differ"
        assert a.result_hash == b.result_hash, f"job {job}: hashes differ"
        assert (a.profile.dtype, a.profile.linear_kernel) == ("native", BLOCK_KERNEL_NAME)
        assert a.profile.decode == b.profile.decode == "dynamic-cache"
        assert (b.profile.dtype, b.profile.linear_kernel) == ("float32", KERNEL_NAME)
        assert a.profile.weights_digest == b.profile.weights_digest
    # The four submitted together decoded together, on both paths.
    assert all(r.profile.batched and r.profile.batch_size >= 2 for r in native[4:] + fp32[4:])
    # A batched job's result is its result alone.
    for alone, batched in zip(native[:4], native[4:], strict=True):
        assert alone.result_hash == batched.result_hash


def _load_both(registry: Registry, model: str) -> tuple[LoadedModel, LoadedModel]:
    """The native model held by transformers' model (whose forward computes with the model's
    operators between the block products), and the float32 model."""
    cpu = discover().cpu
    spec = registry.get(model)
    return (load_model(spec, [cpu], dtype="native", model_operators=True),
            load_model(spec, [cpu], dtype="float32"))


def _logits(loaded: LoadedModel, texts: tuple[str, ...]) -> list[torch.Tensor]:
    """Each text's logits alone, then the same texts as one left-padded batch."""
    tokenizer, model = loaded.tokenizer, loaded.model
    alone = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            alone.append(model(input_ids=ids).logits[0])
        tokenizer.padding_side = "left"
        batch = tokenizer(list(texts), return_tensors="pt", padding=True)
        together = model(**batch).logits
    return [*alone, together]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_logits_equal_float32_logits_bit_for_bit(
        variant: str, registry: Registry, engine_cache: Path, blocks_here: None) -> None:
    """The floats themselves (the hashes above only see bfloat16-rounded activations)."""
    formats, tied = VARIANTS[variant]
    native, fp32 = _load_both(registry, _name(variant))
    assert (native.dtype_name, native.linear_kernel) == ("native", BLOCK_KERNEL_NAME)
    assert (fp32.dtype_name, fp32.linear_kernel) == ("float32", KERNEL_NAME)
    assert native.weights_digest == fp32.weights_digest
    # Each layer computes on the format the file holds: blocks where the kernel has it.
    layers = native.model.model.layers
    for i, layer in enumerate(layers):
        for role, module in (("attn_q", layer.self_attn.q_proj),
                             ("attn_k", layer.self_attn.k_proj),
                             ("attn_v", layer.self_attn.v_proj),
                             ("attn_output", layer.self_attn.o_proj),
                             ("ffn_gate", layer.mlp.gate_proj), ("ffn_up", layer.mlp.up_proj),
                             ("ffn_down", layer.mlp.down_proj)):
            wanted = tensor_format(f"blk.{i}.{role}.weight", formats)
            if wanted in BLOCK_FORMATS:
                assert isinstance(module, BlockLinear), (i, role)
                assert module.weight_blocks.format == TYPE_NAMES[wanted]
            else:
                assert not isinstance(module, BlockLinear), (i, role)
    embedding_type = tensor_format("token_embd.weight", formats)
    embedding = native.model.model.embed_tokens
    assert isinstance(embedding, BlockEmbedding) == (embedding_type in BLOCK_FORMATS)
    head_type = embedding_type if tied else tensor_format("output.weight", formats)
    head = native.model.lm_head
    assert isinstance(head, BlockLinear) == (head_type in BLOCK_FORMATS)
    if isinstance(head, BlockLinear):
        assert head.weight_blocks.format == TYPE_NAMES[head_type]
    if tied and embedding_type in BLOCK_FORMATS:  # one table for the lookup and the head
        assert native.model.lm_head.blocks.data_ptr() == embedding.blocks.data_ptr()
    for a, b in zip(_logits(native, PROMPTS), _logits(fp32, PROMPTS), strict=True):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b), f"logits differ by up to {(a - b).abs().max().item():.3g}"


def _all_blocks(variant: str) -> bool:
    """Whether every projection and the head of a variant are in a block format."""
    formats, tied = VARIANTS[variant]
    head = "token_embd.weight" if tied else "output.weight"
    return all(tensor_format(f"blk.{i}.{role}.weight", formats) in BLOCK_FORMATS
               for i in range(LAYERS) for role in LINEAR_ROLES) and \
        tensor_format(head, formats) in BLOCK_FORMATS


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_fused_step_computes_on_every_block_format(
        variant: str, registry: Registry, engine_cache: Path, blocks_here: None) -> None:
    """Where every projection and the head are blocks (fused or, in mixed formats, as
    separate parts), decode auto takes the fused step: its logits follow the forward's
    within rounding and a batched job's result is its result alone. Elsewhere the decode
    keeps the forward's operators and says so."""
    model = _name(variant)
    native = load_model(registry.get(model), [discover().cpu], dtype="native")
    results = _run_all(registry, model, "native")
    assert all(r.ok for r in results), [r.error for r in results]
    if not _all_blocks(variant):
        assert native.fused_step is None
        assert {r.profile.decode for r in results} == {"dynamic-cache"}
        return
    assert isinstance(native.fused_step, FusedDecodeStep)
    assert isinstance(native.model, NativeLlama)  # no transformers model behind it
    assert {r.profile.decode for r in results} == {"fused-step/2"}
    for alone, batched in zip(results[:4], results[4:], strict=True):
        assert alone.result_hash == batched.result_hash
    # transformers' model on the same blocks: its fused step follows its forward.
    held = load_model(registry.get(model), [discover().cpu], dtype="native",
                      model_operators=True)
    assert not isinstance(held.model, NativeLlama)
    tokenizer, forward = held.tokenizer, held.model
    tokenizer.padding_side = "left"
    batch = tokenizer(list(PROMPTS), return_tensors="pt", padding=True)
    mask = batch.attention_mask
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache(config=forward.config), DynamicCache(config=forward.config)]
    with torch.inference_mode():
        for cache in caches:
            token = forward(input_ids=batch.input_ids, attention_mask=mask,
                            position_ids=position, use_cache=True,
                            cache=cache).logits[:, -1:].argmax(-1)
        position = position[:, -1:]
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            position = position + 1
            expected = forward(input_ids=token, attention_mask=mask, position_ids=position,
                               use_cache=True, cache=caches[0]).logits
            got = held.fused_step(token, mask, position, caches[1])
            spread = expected.abs().max().item()
            assert (got - expected).abs().max().item() < 1e-4 * spread
            token = expected[:, -1:].argmax(-1)


@pytest.mark.slow
def test_native_memory_is_well_under_float32(registry: Registry, engine_cache: Path,
                                             blocks_here: None) -> None:
    native, fp32 = _load_both(registry, _name("q6k-embedding-tied"))
    # Every matrix in a block format of 4.5 to 8.5 bits (5 to 10 bits as laid out).
    assert native.memory_bytes < 0.35 * fp32.memory_bytes, (native.memory_bytes,
                                                           fp32.memory_bytes)
    gguf = loading.availability(native.spec).files[0]
    assert native.memory_bytes < 1.5 * gguf.stat().st_size  # about the file's own size
    native, fp32 = _load_both(registry, _name("default-tied"))
    # F16, Q5_0 and Q5_K layers widen to float32 (about a third of the weights).
    assert native.memory_bytes < 0.6 * fp32.memory_bytes, (native.memory_bytes,
                                                          fp32.memory_bytes)


@pytest.mark.slow
def test_the_engine_reports_the_native_model_memory(registry: Registry, engine_cache: Path,
                                                    blocks_here: None) -> None:
    model = _name("default-untied")
    sizes = {}
    for dtype in ("native", "float32"):
        with Engine(registry, devices=["cpu"], dtype=dtype) as engine:
            loaded = engine.load(model)
            sizes[dtype] = loaded.memory_bytes
            assert loaded.dtype_name == dtype
            assert engine.pool.used("cpu") >= loaded.memory_bytes
    assert sizes["native"] < 0.6 * sizes["float32"], sizes


def test_a_gguf_of_another_family_refuses_native_by_name(gpt2_registry: Registry,
                                                         engine_cache: Path) -> None:
    spec = gpt2_registry.get("tiny-gpt2-gguf")
    with pytest.raises(DeviceError, match="LLaMA family only, not 'gpt2'"):
        resolve_dtype_name(spec, discover().cpu, "native")
    with pytest.raises(DeviceError, match="LLaMA family only"):
        load_model(spec, [discover().cpu], dtype="native")


@pytest.mark.slow  # waits for an answer that does not come
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_asked_for_native_fails_a_job_of_another_family(
        gpt2_registry: Registry, engine_cache: Path, blocks_here: None) -> None:
    with Engine(gpt2_registry, devices=["cpu"], dtype="native") as engine:
        handle = engine.submit({"model": "tiny-gpt2-gguf", "prompt": "Hello", "max_tokens": 4})
        result = handle.result(timeout=5)
        # The engine still answers: the next job gets its answer too.
        again = engine.submit({"model": "tiny-gpt2-gguf", "prompt": "Hi", "max_tokens": 2})
        assert not again.result(timeout=5).ok
    assert not result.ok
    assert result.error.code == DeviceError.code
    assert "LLaMA family only" in result.error.message and "float32" in result.error.message


@pytest.mark.slow
def test_a_gguf_of_another_family_falls_back_to_float32_by_default(
        gpt2_registry: Registry, engine_cache: Path, blocks_here: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spec = gpt2_registry.get("tiny-gpt2-gguf")
    assert spec.dtype.cpu == "native"
    monkeypatch.setattr(loading, "_native_warned", set())
    caplog.set_level(logging.WARNING, logger="engine.loading")
    assert resolve_dtype_name(spec, discover().cpu) == "float32"
    assert resolve_dtype_name(spec, discover().cpu, "auto") == "float32"
    assert any("LLaMA family only" in r.getMessage() for r in caplog.records)
    with Engine(gpt2_registry, devices=["cpu"]) as engine:
        result = engine.run({"model": "tiny-gpt2-gguf", "prompt": "Hello", "max_tokens": 4})
    assert result.ok, result.error
    assert result.profile.dtype == "float32" and result.profile.linear_kernel == KERNEL_NAME


def test_a_gguf_whose_file_is_not_a_llama_is_refused_on_its_blocks(
        gpt2_registry: Registry, engine_cache: Path, blocks_here: None) -> None:
    """The registry says llama but the file's ``general.architecture`` says gpt2."""
    spec = gpt2_registry.get("tiny-gpt2-gguf-as-llama")
    assert resolve_dtype_name(spec, discover().cpu) == "native"  # the registry's word
    with pytest.raises(WeightsUnavailableError, match="LLaMA family only, not 'gpt2'"):
        load_model(spec, [discover().cpu], dtype="native")
    with Engine(gpt2_registry, devices=["cpu"], dtype="native") as engine:
        result = engine.submit({"model": "tiny-gpt2-gguf-as-llama", "prompt": "Hello",
                                "max_tokens": 4}).result(timeout=60)
    assert not result.ok and result.error.code == WeightsUnavailableError.code
    assert "LLaMA family only, not 'gpt2'" in result.error.message
    assert "float32" in result.error.message
