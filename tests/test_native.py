"""The native CPU dtype: SmolLM2's GGUF computed on its own quantized blocks.

What it must keep: the float32 path's floats exactly (so its tokens and result
hashes) where it decodes with the model's operators (``decode="dynamic"``; the
fused step of tests/test_fused_step.py has floats of its own), the registry
default with ``--dtype float32`` still choosing today's path, one copy of the
weights, a clear error or a logged fallback where the blocks cannot be used, and
the kernel rules of the integrity issue.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import Engine, loading, weightfiles
from engine.errors import DeviceError
from engine.hardware import Device, discover
from engine.kernels import BLOCK_KERNEL_NAME, KERNEL_NAME
from engine.kernels.blocks import BlockEmbedding, BlockLinear
from engine.kernels.rowgemm import kernel_status
from engine.loading import load_model, resolve_dtype_name
from engine.registry import Registry, packaged_registry_path

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(packaged_registry_path())


@pytest.fixture(scope="module")
def blocks_here() -> None:
    status = kernel_status()
    if not (status.available and status.blocks_available):
        pytest.skip(f"no block kernel here: {status.reason}; {status.blocks_reason}")
    if not loading.availability(Registry.load(packaged_registry_path()).get(SMOL)).available:
        pytest.skip("the smollm2 package is not installed")


def _a100() -> Device:
    return Device(id="cuda:0", kind="cuda", index=0, name="NVIDIA A100-SXM4-80GB",
                  gpu_type="a100", memory_total_bytes=80 * 2**30,
                  memory_free_bytes=80 * 2**30, compute_capability=(8, 0),
                  energy_supported=True)


def test_native_is_the_cpu_default_for_the_gguf_model(registry: Registry,
                                                      blocks_here: None) -> None:
    cpu = discover().cpu
    smol, gpt2 = registry.get(SMOL), registry.get("gpt2")
    assert smol.dtype.cpu == "native"
    assert resolve_dtype_name(smol, cpu) == "native"
    assert resolve_dtype_name(smol, cpu, "auto") == "native"
    assert resolve_dtype_name(smol, cpu, "float32") == "float32"  # today's path, by name
    assert resolve_dtype_name(smol, cpu, weights="random") == "float32"  # no file to keep
    assert resolve_dtype_name(gpt2, cpu) == "float32"
    with pytest.raises(DeviceError, match="not GGUF"):
        resolve_dtype_name(gpt2, cpu, "native")
    with pytest.raises(DeviceError, match="on the CPU"):
        resolve_dtype_name(smol, _a100(), "native")
    assert resolve_dtype_name(smol, _a100()) == "bfloat16"  # GPUs keep their own policy


def test_blas_setting_falls_back_to_float32_with_the_reason_logged(
        registry: Registry, blocks_here: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AITBC_ENGINE_LINEAR", "blas")
    monkeypatch.setattr(loading, "_native_warned", set())
    caplog.set_level(logging.WARNING, logger="engine.loading")
    assert resolve_dtype_name(registry.get(SMOL), discover().cpu) == "float32"
    assert any("AITBC_ENGINE_LINEAR=blas" in r.getMessage() for r in caplog.records)


def _mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5].strip() for line in
            Path("/proc/self/maps").read_text().splitlines() if len(line.split()) >= 6}


@pytest.mark.slow
def test_native_model_holds_the_blocks_once(registry: Registry, blocks_here: None) -> None:
    spec = registry.get(SMOL)
    loaded = load_model(spec, [discover().cpu], dtype="native")
    model = loaded.model
    assert loaded.dtype_name == "native" and loaded.linear_kernel == BLOCK_KERNEL_NAME
    linears = [m for m in model.modules() if isinstance(m, BlockLinear)]
    assert len(linears) == 30 * 7 + 1  # every projection and the output head
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    embedding = model.model.embed_tokens
    assert isinstance(embedding, BlockEmbedding)
    # The tied head computes on the embedding's own blocks: one table in memory.
    assert model.lm_head.blocks.data_ptr() == embedding.blocks.data_ptr()
    assert {lin.weight_blocks.format for lin in linears} == {"Q4_1", "Q8_0"}
    # Blocks and scales only: about the GGUF's size, under a fifth of float32's 538 MB.
    gguf = loading.availability(spec).files[0]
    assert loaded.memory_bytes < 1.05 * gguf.stat().st_size
    assert loaded.memory_bytes < spec.parameters * 4 / 5
    # No mapping of the file is kept behind the blocks.
    assert str(gguf.resolve()) not in _mapped_files()


def _jobs() -> list[dict[str, Any]]:
    return [
        {"model": SMOL, "prompt": "The capital of France is", "max_tokens": 24},
        {"model": SMOL, "prompt": "def fibonacci(n):", "max_tokens": 24},
        {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8,
         "seed": 7},
        {"model": SMOL, "messages": [{"role": "user", "content": "Name a colour."}],
         "max_tokens": 16},
    ]


@pytest.mark.slow
def test_native_results_equal_float32_results_token_for_token(blocks_here: None) -> None:
    """Same floats, so the same tokens and hashes: alone, and in a batch of four (decode
    dynamic: the model's own operators between the products, not the fused step)."""
    results: dict[str, list[Any]] = {}
    for dtype in ("native", "float32"):
        with Engine(devices=["cpu"], dtype=dtype, decode="dynamic") as engine:
            alone = [engine.run(job) for job in _jobs()]
            handles = [engine.submit(job) for job in _jobs()]
            batched = [handle.result(timeout=300) for handle in handles]
        results[dtype] = alone + batched
    for native, fp32 in zip(results["native"], results["float32"], strict=True):
        assert native.ok and fp32.ok, (native.error, fp32.error)
        assert native.output.token_ids == fp32.output.token_ids
        assert native.result_hash == fp32.result_hash
        assert native.profile.dtype == "native" and fp32.profile.dtype == "float32"
        assert native.profile.linear_kernel == BLOCK_KERNEL_NAME
        assert fp32.profile.linear_kernel == KERNEL_NAME
        assert native.profile.kernel_compiler and native.profile.kernel_isa
    assert any(r.profile.batched for r in results["native"][4:])


@pytest.mark.slow
def test_a_gguf_changed_while_loading_is_read_again(
        registry: Registry, blocks_here: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    gguf = loading.availability(registry.get(SMOL)).files[0]
    answers = iter([gguf, None])
    monkeypatch.setattr(weightfiles, "changed_file", lambda identities: next(answers))
    caplog.set_level(logging.WARNING, logger="engine.loading")
    loaded = load_model(registry.get(SMOL), [discover().cpu], dtype="native")
    assert loaded.dtype_name == "native"
    assert any(re.search("changed while model .* was loading", r.getMessage())
               for r in caplog.records)


def _local_copy(registry: Registry, tmp_path: Path, keep_bytes: int) -> Registry:
    """A registry whose one entry is SmolLM2 from a copy of its GGUF cut to ``keep_bytes``."""
    import yaml

    source = loading.availability(registry.get(SMOL)).files[0]
    folder = tmp_path / "weights"
    folder.mkdir()
    with source.open("rb") as whole:
        (folder / "cut.gguf").write_bytes(whole.read(keep_bytes))
    entry = yaml.safe_load(packaged_registry_path().read_text())["models"][SMOL]
    entry.pop("aliases", None)
    entry["source"] = {"local": {"path": str(folder), "format": "gguf", "file": "cut.gguf"}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "models": {"smol-cut": entry}}))
    return Registry.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("keep_bytes", [1000, 90_000_000])
@pytest.mark.parametrize("dtype", ["native", "float32"])
def test_a_truncated_gguf_is_a_clear_error(registry: Registry, blocks_here: None,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           keep_bytes: int, dtype: str) -> None:
    from engine.errors import WeightsUnavailableError

    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "cache"))
    cut = _local_copy(registry, tmp_path, keep_bytes)
    with pytest.raises(WeightsUnavailableError, match="damaged or not a GGUF file"):
        load_model(cut.get("smol-cut"), [discover().cpu], dtype=dtype)


@pytest.mark.slow
def test_the_lean_decode_step_equals_the_forward_bit_for_bit(registry: Registry,
                                                            blocks_here: None) -> None:
    """A padded batch of three rows, eight steps: the same logits and the same cache."""
    from transformers import DynamicCache

    loaded = load_model(registry.get(SMOL), [discover().cpu], dtype="native",
                        model_operators=True)
    model, step = loaded.model, loaded.decode_step
    assert step is not None
    prompts = [[1, 504, 3575, 282, 4649, 314], [1, 9690, 253], [1, 22, 23, 24, 25]]
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    with torch.inference_mode():
        first = None
        for cache in caches:
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, cache=cache).logits[:, -1:].argmax(-1)
        assert first is not None
        token, position = first, positions[:, -1:]
        for _ in range(8):
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            position = position + 1
            expected = model(input_ids=token, attention_mask=mask, position_ids=position,
                             use_cache=True, cache=caches[0]).logits
            got = step(token, mask, position, caches[1])
            assert torch.equal(got, expected)
            token = expected[:, -1:].argmax(-1)
    for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_the_header_walk_finds_what_the_gguf_package_finds(registry: Registry,
                                                         tmp_path: Path) -> None:
    """The loader's own header walk (it skips the metadata values it does not need) gives
    the tensor table the gguf package's reader gives; damaged headers are refused."""
    from gguf import GGUFReader

    from engine.native import read_gguf_header

    source = loading.availability(registry.get(SMOL)).files[0]
    if not source.is_file():
        pytest.skip("the smollm2 package is not installed")
    walked = read_gguf_header(source)
    reference = GGUFReader(str(source))
    assert walked.fields == {"general.architecture": "llama"}
    assert [(name, kind, n_bytes, offset) for name, kind, _r, _c, n_bytes, offset
            in walked.layout] == [(t.name, int(t.tensor_type), int(t.n_bytes),
                                   int(t.data_offset)) for t in reference.tensors]
    head = source.read_bytes()[:4096]
    for name, content in {"magic": b"GGML" + head[4:], "cut": head[:3000],
                          "version": head[:4] + (9).to_bytes(4, "little") + head[8:]}.items():
        broken = tmp_path / f"{name}.gguf"
        broken.write_bytes(content)
        with pytest.raises(weightfiles.WeightFileProblem):
            read_gguf_header(broken)
