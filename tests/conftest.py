"""Shared fixtures: a tiny real GPT-2 made locally, and a registry that names it.

The tiny model is a 2-layer GPT-2 with a byte-level BPE tokenizer trained here
on a fixed text, saved as safetensors: real weights files, real tokenizer,
loads in well under a second, and needs no hub.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from engine.executor import Engine
from engine.hardware import set_nvml_module, set_torch_cuda_probe
from engine.loading import LoadedModel
from engine.registry import packaged_registry_path
from engine.verify import Verifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_NAME = "tiny-gpt2"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A miner runs jobs on its GPU and hands back "
    "a result hash that anyone can recompute. Hello GPU, hello network, hello world. "
    "Paris is the capital of France. Berlin is the capital of Germany. Numbers: 0 1 2 3 4 5 6 7 "
    "8 9 10 100 1000. Stop here. END. The end of the text is near; the engine meters each job. "
)


def make_tiny_gpt2(directory: Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64,
                   vocab_size: int = 512, n_positions: int = 256) -> Path:
    """Write a tiny random GPT-2 (safetensors) with a locally trained byte-level BPE tokenizer."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS] * 20, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer,
                                        eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(n_layer=n_layer, n_head=2, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def count_parameters(path: Path) -> int:
    """Parameters stored in a model directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += _numel(fh.get_slice(name).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tiny_entry(path: Path, *, context_length: int = 256,
               parameters: int | None = None) -> dict[str, object]:
    """A registry entry for a tiny model directory made by :func:`make_tiny_gpt2`."""
    return {
        "description": "tiny 2-layer GPT-2 made by the tests",
        "task": "text-generation",
        "architecture": "gpt2",
        "parameters": parameters or count_parameters(path),
        "context_length": context_length,
        "dtype": {"cuda": "auto", "cpu": "float32"},
        "min_gpu_memory_mb": 16,
        "source": {"local": {"path": str(path), "format": "safetensors"}},
        "config": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64,
                   "n_positions": 256, "vocab_size": 512, "bos_token_id": 0,
                   "eos_token_id": 0},
    }


def write_registry(path: Path, extra: dict[str, dict[str, object]]) -> Path:
    """The packaged registry plus ``extra`` entries, written to ``path``."""
    doc = yaml.safe_load(packaged_registry_path().read_text())
    doc["models"].update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 directory shared by the whole test session."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def registry_path(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A registry file with every packaged entry plus ``tiny-gpt2`` (and a ``gpt2``-shaped one)."""
    base = tmp_path_factory.mktemp("registry")
    return write_registry(base / "models.yaml", {TINY_NAME: tiny_entry(tiny_model_dir)})


@pytest.fixture(scope="module")
def engine(registry_path: Path) -> Iterator[Engine]:
    """An engine on the CPU over ``registry_path``, one per test module (a module that
    needs another configuration defines its own ``engine``)."""
    with Engine(registry_path, devices=["cpu"]) as eng:
        yield eng


@pytest.fixture(scope="module")
def verifier(registry_path: Path, engine: Engine) -> Iterator[Verifier]:
    """A verifier over ``registry_path`` that borrows the module's engine for exact re-runs."""
    with Verifier(registry_path, engine=engine) as v:
        yield v


@pytest.fixture(scope="module")
def tiny(engine: Engine) -> LoadedModel:
    """The tiny GPT-2, loaded by the module's engine."""
    return engine.load(TINY_NAME)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch,
                          tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test sees a real GPU mask; NVML and torch's CUDA view are real unless injected."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    set_nvml_module(None)
    set_torch_cuda_probe(None)


def copy_model(src: Path, dst: Path) -> Path:
    """Copy a model directory (for tests that tamper with files)."""
    shutil.copytree(src, dst)
    return dst
