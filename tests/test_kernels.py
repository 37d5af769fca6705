"""The CPU row-invariant linear kernel: right products, rows independent of their batch mates,
a clean fallback to BLAS when it cannot be built, and whole models computed through it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_NAME
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine
from engine.kernels import rowgemm
from engine.kernels.rowgemm import (
    KERNEL_NAME,
    PackedLinear,
    kernel_status,
    pack_linear_layers,
    pack_weight,
    pad_bias,
)
from engine.registry import Registry


@pytest.fixture(scope="module")
def kernel() -> object:
    """The built kernel function; the tests that need it skip, with the reason, where it can't."""
    status, function, _blocks = rowgemm._kernel()
    if not status.available:
        pytest.skip(f"the CPU kernel is not available here: {status.reason}")
    return function


def _product(function: object, x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    return rowgemm._call(function, x, pack_weight(weight), pad_bias(bias), weight.shape[0])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 21), out_features=st.integers(1, 99), in_features=st.integers(1, 80),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_product_matches_float64_and_rows_do_not_depend_on_batch_mates(
        kernel: object, rows: int, out_features: int, in_features: int, with_bias: bool,
        seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen) if with_bias else None
    x = torch.randn(rows, in_features, generator=gen)
    got = _product(kernel, x, weight, bias)
    expected = x.double() @ weight.double().t()
    if bias is not None:
        expected += bias.double()
    assert got.shape == (rows, out_features)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4 * in_features ** 0.5)
    for row in {0, rows // 2, rows - 1}:  # bit for bit the same floats as the row alone
        alone = _product(kernel, x[row:row + 1].contiguous(), weight, bias)
        assert torch.equal(alone[0], got[row])


def test_packed_linear_is_a_drop_in_for_linear_on_any_leading_shape(kernel: object) -> None:
    torch.manual_seed(0)
    reference = torch.nn.Linear(70, 45)
    packed = PackedLinear(reference.weight, reference.bias, kernel)
    x = torch.randn(3, 5, 70)
    with torch.inference_mode():
        assert torch.allclose(packed(x), reference(x), atol=1e-5)
        assert torch.allclose(packed(x.transpose(0, 1)), reference(x.transpose(0, 1)),
                              atol=1e-5)  # a non-contiguous input is copied, not misread
        assert packed(x[:0]).shape == (0, 5, 45)
    with pytest.raises(TypeError, match="float32 CPU"):
        packed(x.double())


def test_concurrent_callers_each_get_their_own_right_product(kernel: object) -> None:
    """One caller holds the worker pool; the others compute alone; nobody's rows mix."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 64, generator=gen)
    inputs = [torch.randn(5, 64, generator=gen) for _ in range(4)]
    expected = [_product(kernel, x, weight, None) for x in inputs]
    failures: list[int] = []

    def work(index: int) -> None:
        for _ in range(200):
            if not torch.equal(_product(kernel, inputs[index], weight, None), expected[index]):
                failures.append(index)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers(kernel: object) -> None:
    gen = torch.Generator().manual_seed(4)
    weight, x = torch.randn(200, 32, generator=gen), torch.randn(3, 32, generator=gen)
    expected = _product(kernel, x, weight, None)  # the parent's pool is running now
    pid = os.fork()
    if pid == 0:  # the child: its product must come back (not hang) and be right
        ok = torch.equal(_product(kernel, x, weight, None), expected)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_gpt2_model_through_the_kernel_matches_blas_and_keeps_tied_embedding(
        kernel: object, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    blas = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    embedding = model.get_input_embeddings().weight
    replaced = pack_linear_layers(model, respect_setting=False)
    assert replaced == 2 * 4 + 1  # per block c_attn, c_proj, c_fc, mlp c_proj; then lm_head
    assert model.get_input_embeddings().weight is embedding  # the table stays where it was
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, blas(ids).logits, atol=1e-4)
        batch = torch.cat([ids, ids.flip(1)])
        assert torch.equal(model(batch).logits[0], model(ids).logits[0])


def test_engine_jobs_on_cpu_record_the_kernel_and_blas_when_asked(
        kernel: object, registry_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = {"task": "text-generation", "model": TINY_NAME, "prompt": "Hello GPU",
           "params": {"max_tokens": 6}}
    with Engine(devices=["cpu"], registry=Registry.load(registry_path)) as engine:
        fast = engine.run(job)
    monkeypatch.setenv("AITBC_ENGINE_LINEAR", "blas")
    with Engine(devices=["cpu"], registry=Registry.load(registry_path)) as engine:
        slow = engine.run(job)
    assert fast.status == slow.status == "completed"
    assert fast.profile is not None and slow.profile is not None
    assert (fast.profile.linear_kernel, slow.profile.linear_kernel) == (KERNEL_NAME, "blas")
    assert fast.output is not None and slow.output is not None
    assert fast.output.token_ids == slow.output.token_ids  # the same greedy tokens either way


def test_without_a_compiler_the_engine_keeps_blas_and_says_why(
        registry_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    try:
        with monkeypatch.context() as patched:
            patched.setenv("CC", str(tmp_path / "no-such-compiler"))
            patched.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "cache"))
            rowgemm.reset_for_tests()
            status = kernel_status()
            with Engine(devices=["cpu"], registry=Registry.load(registry_path)) as engine:
                result = engine.run({"task": "text-generation", "model": TINY_NAME,
                                     "prompt": "Hello", "params": {"max_tokens": 4}})
    finally:
        rowgemm.reset_for_tests()
    assert not status.available and "no C compiler" in status.reason
    assert result.status == "completed"
    assert result.profile is not None and result.profile.linear_kernel == "blas"


def test_a_compiler_that_fails_leaves_the_kernel_off_with_its_message(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal: out of licences' >&2\nexit 3\n")
    broken.chmod(0o755)
    try:
        with monkeypatch.context() as patched:
            patched.setenv("CC", str(broken))
            patched.setenv("AITBC_ENGINE_CACHE", str(tmp_path / "cache"))
            rowgemm.reset_for_tests()
            status = kernel_status()
    finally:
        rowgemm.reset_for_tests()
    assert not status.available
    assert "failed" in status.reason and "out of licences" in status.reason
    assert not list((tmp_path / "cache").rglob("*.so*"))  # no half-written library is kept


def test_info_says_whether_the_cpu_kernel_computes_linear_layers(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from engine.cli import main

    assert main(["info", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["cpu_linear_kernel"]
    status = kernel_status()
    assert shown == {"available": status.available, "in_use": status.available,
                     "reason": status.reason,
                     "blocks": {"available": status.blocks_available,
                                "reason": status.blocks_reason,
                                "formats": ["Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0"],
                                "decode_step": "fused-step/2"},
                     "build": status.build.to_dict() if status.build else None}
    if status.available and status.blocks_available:
        assert main(["info"]) == 0
        assert "fused pass (decode fused-step/2" in " ".join(capsys.readouterr().out.split())
    monkeypatch.setenv("AITBC_ENGINE_LINEAR", "blas")
    assert main(["info"]) == 0
    assert "torch's BLAS" in capsys.readouterr().out
