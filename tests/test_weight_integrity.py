"""Weight integrity at rest: the verified converted-weights cache and the weight-digest cache.

A tiny Llama GGUF (random float32 weights, a byte-level tokenizer) is written
here with the ``gguf`` package, so conversion takes a fraction of a second and
the tests need neither the hub nor the shipped model.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import Engine, weightfiles
from engine import loading as loading_module
from engine.errors import WeightsUnavailableError
from engine.hardware import discover
from engine.loading import convert_gguf, converted_gguf_dir, load_model, weights_digest
from engine.registry import ModelSpec, Registry

NAME = "tiny-gguf"
JOB = {"task": "text-generation", "model": NAME, "prompt": "hello network",
       "params": {"max_tokens": 6}}


def make_tiny_gguf(path: Path, *, seed: int = 0) -> Path:
    """A 2-layer Llama in GGUF (float32 tensors) with a byte-level BPE vocabulary."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    symbols = bytes_to_unicode()
    tokens = [symbols[b] for b in range(256)] + ["\u0120t", "<|endoftext|>"]
    hidden, inter, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(["\u0120 t"])
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.5).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inter)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_registry(directory: Path) -> Registry:
    """A registry holding one entry, :data:`NAME`, for ``directory/tiny.gguf``."""
    return Registry.from_mapping({"version": 1, "models": {NAME: {
        "task": "text-generation", "architecture": "llama", "parameters": 150_000,
        "context_length": 128, "min_gpu_memory_mb": 16,
        "dtype": {"cuda": "float32", "cpu": "float32"},
        "source": {"local": {"path": str(directory), "format": "gguf", "file": "tiny.gguf"}},
    }}})


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``tiny.gguf`` (shared; tests that delete it work on a copy)."""
    directory = tmp_path_factory.mktemp("tiny-gguf")
    make_tiny_gguf(directory / "tiny.gguf")
    return directory


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cold engine cache of this test's own."""
    path = tmp_path / "cache"
    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(path))
    return path


@pytest.fixture
def spec(gguf_dir: Path) -> ModelSpec:
    return gguf_registry(gguf_dir).get(NAME)


def run_job(registry: Registry) -> tuple[str, str]:
    """``(result_hash, weights_digest)`` of :data:`JOB` on a cold engine (so the model loads)."""
    with Engine(registry, devices=["cpu"], job_timeout=60) as engine:
        result = engine.run(JOB)
    assert result.ok, result.error
    assert result.result_hash is not None and result.profile is not None
    return result.result_hash, result.profile.weights_digest


def converted_dir(cache: Path) -> Path:
    (found,) = (cache / "converted").glob(f"{NAME}-*")
    return found


def overwrite_64k(path: Path) -> None:
    """Overwrite 64 KB in the middle of the tensor data, in place."""
    size = path.stat().st_size
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    middle = header + (size - header) // 2 - 32 * 1024
    with path.open("r+b") as fh:
        fh.seek(middle)
        fh.write(os.urandom(64 * 1024))


def truncate(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 4096)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def bad_header(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.write((2**40).to_bytes(8, "little"))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "overwritten": (overwrite_64k, "does not match the manifest"),
    "truncated": (truncate, "truncated"),
    "zero-length": (empty, "truncated"),
    "bad-header": (bad_header, "header length"),
}


# ------------------------------------------------------------------ converted weights

@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_conversion_is_rebuilt_and_the_hash_is_the_clean_one(
        damage: str, gguf_dir: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = gguf_registry(gguf_dir)
    clean_hash, clean_digest = run_job(registry)
    target = converted_dir(cache) / "model.safetensors"
    spoil, problem = DAMAGE[damage]
    spoil(target)
    with caplog.at_level(logging.WARNING, logger="engine.weightfiles"):
        again_hash, again_digest = run_job(registry)
    assert (again_hash, again_digest) == (clean_hash, clean_digest)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(target) in m and problem in m and "rebuilding" in m for m in warnings), \
        warnings
    # The rebuilt conversion verifies again, and its digest is the GGUF's.
    weightfiles.verify_conversion(converted_dir(cache), clean_digest)
    assert clean_digest == weights_digest([gguf_dir / "tiny.gguf"])


@pytest.mark.slow
def test_missing_manifest_or_file_rebuilds(spec: ModelSpec, cache: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    cpu = discover().cpu
    first = load_model(spec, [cpu], check_memory=False)
    folder = converted_dir(cache)
    (folder / weightfiles.MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="engine.weightfiles"):
        second = load_model(spec, [cpu], check_memory=False)
    assert "manifest is missing" in caplog.text
    (folder / "config.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.weightfiles"):
        third = load_model(spec, [cpu], check_memory=False)
    assert "config.json: missing" in caplog.text
    assert first.weights_digest == second.weights_digest == third.weights_digest
    weightfiles.verify_conversion(folder, first.weights_digest)


@pytest.mark.slow
def test_source_gone_and_conversion_damaged_is_a_clear_refusal(
        tmp_path: Path, gguf_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "src"
    own.mkdir()
    gguf = own / "tiny.gguf"
    gguf.write_bytes((gguf_dir / "tiny.gguf").read_bytes())
    spec = gguf_registry(own).get(NAME)
    cpu = discover().cpu
    load_model(spec, [cpu], check_memory=False)
    overwrite_64k(converted_dir(cache) / "model.safetensors")

    # The source vanishes after it was found and digested, before the rebuild.
    real = loading_module.weights_digest

    def digest_then_lose_source(files: list[Path], cache_dir: Path | None = None) -> str:
        digest = real(files, cache_dir)
        gguf.unlink()
        return digest

    monkeypatch.setattr(loading_module, "weights_digest", digest_then_lose_source)
    with pytest.raises(WeightsUnavailableError) as err:
        load_model(spec, [cpu], check_memory=False)
    message = err.value.message
    assert err.value.code == "weights_unavailable"
    assert "model.safetensors" in message and "damaged" in message
    assert str(gguf) in message and "gone" in message


def test_source_gone_and_conversion_damaged_refuses_without_converting(tmp_path: Path) -> None:
    target = tmp_path / "converted" / "m-0123456789abcdef"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"\0" * 3)
    calls: list[Path] = []
    with pytest.raises(WeightsUnavailableError, match=r"manifest is missing.*gone"):
        weightfiles.ensure_conversion(target, source_file=tmp_path / "gone.gguf",
                                      source_digest="sha256:" + "0" * 64, convert=calls.append)
    assert calls == []


@pytest.mark.slow
def test_conversion_is_private_and_a_warm_load_hashes_nothing(
        spec: ModelSpec, cache: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    cpu = discover().cpu
    first = load_model(spec, [cpu], check_memory=False)
    folder = converted_dir(cache)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    manifest = json.loads((folder / weightfiles.MANIFEST_FILE).read_text())
    assert manifest["source"]["digest"] == first.weights_digest
    record = manifest["files"]["model.safetensors"]
    assert record["size"] == (folder / "model.safetensors").stat().st_size
    assert set(record["identity"]) == {"inode", "size", "mtime_ns", "ctime_ns"}

    hashed: list[Path] = []
    real = weightfiles.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(weightfiles, "sha256_file", counting)
    with caplog.at_level(logging.WARNING, logger="engine.weightfiles"):
        second = load_model(spec, [cpu], check_memory=False)
    assert hashed == [] and second.weights_digest == first.weights_digest
    assert caplog.records == []


def test_identity_change_rehashes_once_and_updates_the_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "converted" / "m-0123456789abcdef"
    digest = "sha256:" + "ab" * 32
    with weightfiles.staged_conversion(target, source_file=tmp_path / "m.gguf",
                                       source_digest=digest) as staged:
        write_safetensors(staged / "model.safetensors")
        (staged / "config.json").write_text("{}")
    hashed: list[str] = []
    real = weightfiles.sha256_file

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(weightfiles, "sha256_file", counting)
    weightfiles.verify_conversion(target, digest)
    assert hashed == []
    st = (target / "model.safetensors").stat()
    os.utime(target / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    weightfiles.verify_conversion(target, digest)
    assert hashed == ["model.safetensors"]
    weightfiles.verify_conversion(target, digest)  # the record was updated: no hash again
    assert hashed == ["model.safetensors"]
    with pytest.raises(weightfiles.WeightFileProblem, match="made from"):
        weightfiles.verify_conversion(target, "sha256:" + "cd" * 32)
    (target / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(weightfiles.WeightFileProblem, match="not in the manifest"):
        weightfiles.verify_conversion(target, digest)


@pytest.mark.slow
def test_convert_gguf_writes_a_manifest(gguf_dir: Path, spec: ModelSpec, tmp_path: Path) -> None:
    digest = weights_digest([gguf_dir / "tiny.gguf"], tmp_path)
    target = converted_gguf_dir(spec, digest, tmp_path)
    convert_gguf(spec, gguf_dir / "tiny.gguf", target, source_digest=digest)
    verified = weightfiles.verify_conversion(target, digest)
    assert target / "model.safetensors" in verified
    assert not [p for p in target.parent.iterdir() if p.name.endswith((".tmp", ".old"))]


# ------------------------------------------------------------------ safetensors headers

def write_safetensors(path: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.ones(4, dtype=np.float16)}, str(path))
    return path


@pytest.mark.parametrize(("spoil", "problem"), [
    (empty, "too short"),
    (truncate, "header length"),
    (bad_header, "header length"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "tensors end at byte"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "tensors end at byte"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"[" + p.read_bytes()[9:]), "not valid JSON"),
])
def test_safetensors_header_check(tmp_path: Path, spoil: Callable[[Path], None],
                                  problem: str) -> None:
    path = write_safetensors(tmp_path / "w.safetensors")
    weightfiles.check_safetensors(path)
    if spoil is truncate:  # a small file: cut into the header itself
        path.write_bytes(path.read_bytes()[:40])
    else:
        spoil(path)
    with pytest.raises(weightfiles.WeightFileProblem, match=problem):
        weightfiles.check_safetensors(path)


def test_a_damaged_safetensors_source_is_refused_with_the_file_named(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import copy_model, tiny_entry, write_registry

    monkeypatch.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "cache"))
    model = copy_model(tiny_model_dir, tmp_path / "m")
    weights = model / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    registry = Registry.load(write_registry(tmp_path / "r.yaml",
                                            {"m": tiny_entry(model, parameters=100_000)}))
    with pytest.raises(WeightsUnavailableError) as err:
        load_model(registry.get("m"), [discover().cpu], check_memory=False)
    assert str(weights) in err.value.message and "truncated" in err.value.message


# ------------------------------------------------------------------ digest cache

def test_changed_content_with_mtime_put_back_gets_a_new_digest(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 4096)
    first = weights_digest([f], tmp_path)
    st = f.stat()
    with f.open("r+b") as fh:  # same inode, same size, then the mtime put back
        fh.write(b"b" * 4096)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert weights_digest([f], tmp_path) != first
    cache_file = tmp_path / weightfiles.DIGEST_CACHE_FILE
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600
    assert len(json.loads(cache_file.read_text())) == 1  # the stale entry is dropped


def test_an_unreadable_digest_cache_counts_as_empty(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 100)
    (tmp_path / weightfiles.DIGEST_CACHE_FILE).write_bytes(b"{\"half\": ")
    first = weights_digest([f], tmp_path)
    (tmp_path / weightfiles.DIGEST_CACHE_FILE).write_bytes(b"\xff\xfe[1, 2]")
    assert weights_digest([f], tmp_path) == first


def test_a_failed_cache_write_does_not_fail_the_digest(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 100)
    expected = weights_digest([f], tmp_path / "a")

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weightfiles.tempfile, "mkstemp", full_disk)
    assert weights_digest([f], tmp_path / "b") == expected


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from engine.weightfiles import weights_digest
    files = sorted(Path(sys.argv[1]).glob("*.bin"))
    cache = Path(sys.argv[2])
    failures, digests = [], []
    for f in files:
        try:
            digests.append(weights_digest([f], cache))
        except Exception as exc:
            failures.append(repr(exc))
    try:
        whole = weights_digest(files, cache)
    except Exception as exc:
        failures.append(repr(exc))
        whole = None
    print(json.dumps({"failures": failures, "digests": digests, "whole": whole}))
""")


@pytest.mark.slow
def test_four_processes_with_a_cold_cache_all_succeed_and_agree(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    for i in range(150):
        (weights / f"{i:03d}.bin").write_bytes(os.urandom(256) * (1 + i % 3))
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(weights), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = []
    for proc in procs:
        out, errs = proc.communicate(timeout=120)
        assert proc.returncode == 0, errs
        outs.append(json.loads(out))
    assert [o["failures"] for o in outs] == [[]] * 4
    assert all(o["digests"] == outs[0]["digests"] and o["whole"] == outs[0]["whole"]
               for o in outs)
    files = sorted(weights.glob("*.bin"))
    assert outs[0]["whole"] == weights_digest(files, tmp_path / "fresh")
    cached = json.loads((cache / weightfiles.DIGEST_CACHE_FILE).read_text())
    assert 0 < len(cached) <= len(files)
    assert not list(cache.glob("*.tmp"))

