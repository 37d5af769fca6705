"""The fused C pass of native models (engine/kernels/decoder.c, engine/native_step.py) and
the engine's own LLaMA model that runs in it (engine/native_model.py).

What it must keep: each row's floats independent of its batch mates (bit for bit, padding
included), a prompt token's floats the same in a prefill as in a step of its own, the
model's forward within rounding, the KV cache the decode batch manages (rows joining and
leaving), results that name the pass in their profile and reproduce under it, the
forward's floats when ``decode="dynamic"`` asks for them, and the same floats whether the
engine's model or transformers' model holds the blocks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import Engine, loading, native_step
from engine.commitment import commit_rows, commit_selected, compute_commitment
from engine.hardware import discover
from engine.kernels.decoder import STEP_VERSION
from engine.kernels.rowgemm import kernel_status
from engine.loading import LoadedModel, load_model
from engine.native_model import NativeLlama
from engine.native_step import CACHE_ROOM, FusedDecodeStep
from engine.registry import Registry, packaged_registry_path
from engine.tasks import generation
from engine.tasks.generation import _pad_left, encode_prompt, select_rows
from engine.verify import Verifier, parse_job

SMOL = "smollm2-135m"
PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 9690, 253], [1, 22, 23, 24, 25, 26, 27, 28, 29]]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    status = kernel_status()
    if not (status.available and status.blocks_available):
        pytest.skip(f"no block kernel here: {status.reason}; {status.blocks_reason}")
    spec = Registry.load(packaged_registry_path()).get(SMOL)
    if not loading.availability(spec).available:
        pytest.skip("the smollm2 package is not installed")
    # transformers' model on the blocks: its forward is what the fused pass is checked against.
    return load_model(spec, [discover().cpu], dtype="native", model_operators=True)


@pytest.fixture(scope="module")
def own(loaded: LoadedModel) -> LoadedModel:
    """The engine's own model of the same GGUF (what decode auto loads)."""
    return load_model(loaded.spec, [discover().cpu], dtype="native")


def _prefill(model: Any, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """A left-padded prefill: (cache, first tokens [rows, 1], mask, last positions [rows, 1])."""
    from transformers import DynamicCache

    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, cache=cache).logits
    return cache, logits[:, -1:].argmax(-1), mask, positions[:, -1:]


def _steps(step: FusedDecodeStep, cache: Any, tokens: list[torch.Tensor], mask: torch.Tensor,
           position: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fused step fed ``tokens`` (each ``[rows, 1]``) in turn: (logits, hidden) each."""
    out = []
    with torch.inference_mode():
        for token in tokens:
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            position = position + 1
            out.append(step.step(token, mask, position, cache))
    return out


def test_native_models_get_the_fused_step(loaded: LoadedModel, own: LoadedModel) -> None:
    assert isinstance(loaded.fused_step, FusedDecodeStep)
    assert loaded.fused_step.name == STEP_VERSION == "fused-step/2"
    assert loaded.decode_step is not None and loaded.decode_step.name == "dynamic-cache"
    assert isinstance(own.model, NativeLlama) and own.decode_step is None
    assert isinstance(own.fused_step, FusedDecodeStep)
    assert own.memory_bytes <= loaded.memory_bytes  # the same blocks, nothing more


def _fused_prefill(model: LoadedModel, prompts: list[list[int]]
                   ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded prefill in the fused pass: (cache, logits, final rows, mask, last
    positions)."""
    from transformers import DynamicCache

    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = getattr(model.model, "new_cache", lambda: DynamicCache(config=model.model.config))()
    with torch.inference_mode():
        logits, final = model.fused_step.prefill(ids, mask, positions, cache)
    return cache, logits, final, mask, positions[:, -1:]


def test_the_engine_model_computes_what_transformers_model_computes_bit_for_bit(
        loaded: LoadedModel, own: LoadedModel) -> None:
    """The same blocks under either model give the fused pass the same floats: prefill
    (a padded batch) and 8 decode steps, logits, final rows and cache."""
    runs = []
    for model in (loaded, own):
        cache, logits, final, mask, position = _fused_prefill(model, PROMPTS)
        token = logits.argmax(-1, keepdim=True)
        runs.append([(logits, final), *_steps(model.fused_step, cache, [token] * 8, mask,
                                              position), cache])
    *theirs, their_cache = runs[0]
    *mine, my_cache = runs[1]
    for (a_logits, a_final), (b_logits, b_final) in zip(theirs, mine, strict=True):
        assert torch.equal(a_logits, b_logits) and torch.equal(a_final, b_final)
    for a, b in zip(their_cache.layers, my_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_prefill_computes_each_token_as_a_step_of_its_own_would(own: LoadedModel,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """Bit for bit: a prompt's prefill, the same prompt prefilled one token and then stepped
    token by token, the pass cut into chunks of 2 tokens, the teacher-forced forward, and
    each row of a padded batch prefill alone."""
    prompt = PROMPTS[2]
    cache, logits, final, _, _ = _fused_prefill(own, [prompt])
    first, _, first_final, first_mask, first_position = _fused_prefill(own, [prompt[:1]])
    stepped = _steps(own.fused_step, first, [torch.tensor([[t]]) for t in prompt[1:]],
                     first_mask, first_position)
    assert torch.equal(stepped[-1][0][:, 0], logits) and torch.equal(stepped[-1][1], final)
    forced = own.model(input_ids=torch.tensor([prompt]), output_hidden_states=True)
    rows = torch.cat([first_final] + [hidden for _, hidden in stepped])
    assert torch.equal(forced.hidden_states[-1][0], rows)
    assert torch.equal(forced.logits[0, -1], logits[0])
    every = own.model(input_ids=torch.tensor([prompt])).logits[0]
    assert torch.equal(every[-1], logits[0])
    monkeypatch.setattr(native_step, "PASS_TOKENS", 2)
    kept = own.model(input_ids=torch.tensor([prompt]), logits_to_keep=3).logits[0]
    assert torch.equal(kept, every[-3:])  # chunks with no kept row among them
    chunked = _fused_prefill(own, [prompt])
    assert torch.equal(chunked[1], logits) and torch.equal(chunked[2], final)
    for a, b in zip(chunked[0].layers, cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys)
    batch = _fused_prefill(own, PROMPTS)
    for row, alone in enumerate(PROMPTS):
        single = _fused_prefill(own, [alone])
        assert torch.equal(batch[1][row], single[1][0]) and torch.equal(batch[2][row],
                                                                       single[2][0])


def test_the_engine_model_loads_without_transformers(own: LoadedModel, tmp_path: Any) -> None:
    """A native job end to end, in a fresh process with an empty engine cache (so the
    model's config and tokenizer are converted too, in a child process of its own), imports
    no transformers module at all: not its LLaMA classes and what they pull in
    (torch._dynamo, torch.distributed.tensor, sympy: about 100 MB of resident memory), nor
    the package itself (its hub client and HTTP stack: 20 MB)."""
    import json
    import os
    import subprocess
    import sys

    del own  # the model must load here at all
    script = (
        "import json, sys\n"
        "from engine import Engine\n"
        "with Engine(devices=['cpu'], dtype='native') as engine:\n"
        f"    result = engine.run({{'model': {SMOL!r}, 'prompt': 'Hi', 'max_tokens': 4}})\n"
        "    chat = engine.run({'model': %r, 'messages': [{'role': 'user', 'content': 'Hi'}],"
        " 'max_tokens': 4})\n"
        "heavy = [m for m in ('transformers', 'torch._dynamo', 'torch.distributed.tensor',"
        " 'sympy') if m in sys.modules]\n"
        "print(json.dumps({'ok': result.ok and chat.ok, 'decode': result.profile.decode,"
        " 'heavy': heavy}))\n" % SMOL)
    environment = {**os.environ, "AITBC_ENGINE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"ok": True, "decode": STEP_VERSION, "heavy": []}


def test_a_row_computes_the_same_floats_alone_and_in_a_padded_batch(loaded: LoadedModel) -> None:
    """Bit for bit, over 12 steps (the cache buffer grows past its first room on the way):
    the batch's cache is the rows' own caches left-padded together, as the decode batch
    merges them, so any difference would be the step's."""
    step = loaded.fused_step
    singles = [_prefill(loaded.model, [p]) for p in PROMPTS]
    batch_cache = singles[0][0]
    width = max(cache.layers[0].keys.shape[-2] for cache, *_ in singles)
    merged = [(torch.cat([_pad_left(c.layers[i].keys, width, -2) for c, *_ in singles]),
               torch.cat([_pad_left(c.layers[i].values, width, -2) for c, *_ in singles]))
              for i in range(len(batch_cache.layers))]
    from transformers import DynamicCache

    batch_cache = DynamicCache(config=loaded.model.config)
    with torch.inference_mode():  # give the cache its layers, then the merged tensors
        loaded.model(input_ids=torch.tensor([[1] * width] * len(PROMPTS)), use_cache=True,
                     cache=batch_cache)
    for layer, (keys, values) in zip(batch_cache.layers, merged, strict=True):
        layer.keys, layer.values = keys, values
    mask = torch.cat([_pad_left(m, width, 1) for _, _, m, _ in singles])
    position = torch.cat([p for *_, p in singles])
    tokens = [torch.cat([t for _, t, _, _ in singles])] + [
        torch.randint(3, 1000, (len(PROMPTS), 1), generator=torch.Generator().manual_seed(i))
        for i in range(11)]
    batched = _steps(step, batch_cache, tokens, mask, position)
    for row, (cache, _, row_mask, row_position) in enumerate(singles):
        alone = _steps(step, cache, [t[row:row + 1] for t in tokens], row_mask, row_position)
        for (logits, hidden), (one_logits, one_hidden) in zip(batched, alone, strict=True):
            assert torch.equal(logits[row], one_logits[0])
            assert torch.equal(hidden[row], one_hidden[0])
        length = cache.layers[0].keys.shape[-2]
        for mine, theirs in zip(batch_cache.layers, cache.layers, strict=True):
            assert torch.equal(mine.keys[row, :, -length:], theirs.keys[0])
            assert torch.equal(mine.values[row, :, -length:], theirs.values[0])


def test_the_fused_step_follows_the_forward_within_rounding(loaded: LoadedModel) -> None:
    """Against the model's forward on a second cache: the same greedy tokens, logits within
    a few parts in a million of their range, the cache within rounding."""
    model, step = loaded.model, loaded.fused_step
    fused_cache, token, mask, position = _prefill(model, PROMPTS)
    forward_cache = _prefill(model, PROMPTS)[0]
    worst = 0.0
    with torch.inference_mode():
        for _ in range(16):
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            position = position + 1
            expected = model(input_ids=token, attention_mask=mask, position_ids=position,
                             use_cache=True, cache=forward_cache, output_hidden_states=True)
            logits, hidden = step.step(token, mask, position, fused_cache)
            spread = expected.logits.abs().max().item()
            worst = max(worst, (logits - expected.logits).abs().max().item() / spread)
            assert torch.equal(logits[:, -1].argmax(-1), expected.logits[:, -1].argmax(-1))
            torch.testing.assert_close(hidden, expected.hidden_states[-1][:, -1],
                                       rtol=1e-4, atol=1e-4)
            token = expected.logits[:, -1:].argmax(-1)
    assert 0 < worst < 2e-5, worst  # its own floats, but close ones
    for a, b in zip(fused_cache.layers, forward_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)


def test_the_cache_buffer_is_reused_and_rebuilt_when_rows_leave(loaded: LoadedModel) -> None:
    step = loaded.fused_step
    cache, token, mask, position = _prefill(loaded.model, PROMPTS)
    tokens = [token] * 3
    _steps(step, cache, tokens, mask, position)
    mask = torch.cat([mask, torch.ones(len(PROMPTS), 3, dtype=torch.long)], dim=-1)
    position = position + 3
    held = cache._fused_buffer
    assert held.capacity % CACHE_ROOM == 0 and held.capacity >= mask.shape[1] + 1
    storage = held.tensor.untyped_storage().data_ptr()
    for layer in cache.layers:  # the layers hold views of the one buffer
        assert layer.keys.untyped_storage().data_ptr() == storage
        assert layer.keys.shape[-2] == mask.shape[1]
    (logits, _), = _steps(step, cache, [token], mask, position)
    assert cache._fused_buffer is held  # no copy while it has room
    mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
    # Row 1 leaves (as the decode batch drops a finished row): the next step rebuilds.
    mask, position = select_rows(cache, mask, position + 1, [0, 2])
    (after, _), = _steps(step, cache, [token[[0, 2]]], mask, position)
    assert cache._fused_buffer is not held and cache._fused_buffer.tensor.shape[2] == 2
    assert torch.isfinite(after).all() and not torch.equal(after, logits[[0, 2]])


def test_a_cache_that_does_not_fit_the_mask_is_refused(loaded: LoadedModel) -> None:
    cache, token, mask, position = _prefill(loaded.model, PROMPTS)
    with pytest.raises(ValueError, match="a cache of"), torch.inference_mode():
        loaded.fused_step.step(token, torch.cat([mask, mask], dim=-1), position + 1, cache)


def _jobs() -> list[dict[str, Any]]:
    return [{"model": SMOL, "prompt": "The capital of France is", "max_tokens": 20,
             "job_id": "greedy"},
            {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.8,
             "seed": 5, "job_id": "sampled"},
            {"model": SMOL, "messages": [{"role": "user", "content": "Name a colour."}],
             "max_tokens": 17, "job_id": "chat"}]


def test_fused_results_reproduce_alone_batched_and_under_verification(
        loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode auto takes the fused step and says so; the same jobs batched (rows leaving at
    different steps) give the same results; exact verification re-runs them and agrees;
    decode dynamic keeps the forward's floats and its teacher-forced commitment pass."""
    del loaded  # the module's model is the one the engines share through the pool
    passes: list[int] = []
    teacher_forced = generation.compute_commitment

    def counted(*args: Any, **kwargs: Any) -> str:
        passes.append(1)
        return teacher_forced(*args, **kwargs)

    monkeypatch.setattr(generation, "compute_commitment", counted)
    with Engine(devices=["cpu"], dtype="native", batch_size=1) as engine:
        alone = [engine.run(job) for job in _jobs()]
    with Engine(devices=["cpu"], dtype="native", batch_size=4,
                batch_window_seconds=0.5) as engine:
        handles = [engine.submit(job) for job in _jobs()]
        batched = [handle.result(timeout=300) for handle in handles]
    assert not passes  # the fused decode's commitments are its own rows
    with Engine(devices=["cpu"], dtype="native", decode="dynamic") as engine:
        dynamic = [engine.run(job) for job in _jobs()]
    assert len(passes) == len(_jobs())
    for one, many, own_floats in zip(alone, batched, dynamic, strict=True):
        assert one.ok and many.ok and own_floats.ok, (one.error, many.error, own_floats.error)
        assert one.profile.decode == many.profile.decode == STEP_VERSION
        assert own_floats.profile.decode == "dynamic-cache"
        assert one.result_hash == many.result_hash
    assert all(r.profile.batched for r in batched)
    with Verifier() as verifier:
        for job, result in [*zip(_jobs(), batched, strict=True), (_jobs()[0], dynamic[0])]:
            verdict = verifier.verify(job, result, mode="exact")
            assert verdict.accepted, verdict.reasons
            verdict = verifier.verify(job, result, mode="tolerant")
            assert verdict.accepted, verdict.reasons


def test_the_decodes_own_rows_commit_like_the_teacher_forced_pass(loaded: LoadedModel) -> None:
    """commit_selected over the rows a decode kept equals commit_rows over all of them; and
    the fused step's rows commit to what the teacher-forced pass gives (bfloat16 hides the
    last bits) on this prompt."""
    rows = torch.randn(21, 64, generator=torch.Generator().manual_seed(0))
    assert commit_selected(rows[::8]).encode() == commit_rows(rows).encode()
    job = {"model": SMOL, "prompt": "Water boils at", "max_tokens": 24}
    with Engine(devices=["cpu"], dtype="native") as engine:
        result = engine.run(job)
    assert result.profile.decode == STEP_VERSION
    prompt = encode_prompt(loaded, parse_job(job))
    assert result.output.commitment == compute_commitment(loaded, prompt,
                                                          result.output.token_ids)


@pytest.mark.parametrize("bias_on", [None, 1])
def test_projections_with_a_bias_are_not_fused_and_keep_it(bias_on: int | None) -> None:
    """A fused product carries no bias: projections of which one has a bias stay separate
    parts (each adding its own), and either way the parts give each projection's output."""
    from engine.kernels.blocks import Q8_0, BlockLinear, pack_blocks, random_blocks
    from engine.kernels.rowgemm import block_kernel, kernel_threads
    from engine.native_step import SharedInput

    kernel = block_kernel()
    if kernel is None:
        pytest.skip("no block kernel here")
    layers = [BlockLinear(pack_blocks(Q8_0, random_blocks(Q8_0, rows, 64, seed=rows), rows, 64),
                          torch.randn(rows) if index == bias_on else None, kernel,
                          kernel_threads)
              for index, rows in enumerate((64, 32, 32))]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    expected = [layer(x) for layer in layers]
    shared = SharedInput(layers)
    assert len(shared.parts) == (1 if bias_on is None else 3)
    for got, want, layer in zip(shared(x), expected, layers, strict=True):
        assert torch.equal(got, want)
        assert torch.equal(layer(x), want)  # the layers still compute alone (views if fused)


def test_decode_paths_other_than_auto_compute_with_transformers_model(own: LoadedModel) -> None:
    """The static path needs transformers' model (its static cache and forward): a native
    model asked for it loads as that model, not the engine's, and gives the same result."""
    job = {"model": SMOL, "prompt": "The capital of France is", "max_tokens": 6}
    with Engine(devices=["cpu"], dtype="native") as engine:
        fused = engine.run(job)
    with Engine(devices=["cpu"], dtype="native", decode="static") as engine:
        static = engine.run(job)
        assert not isinstance(engine.load(SMOL).model, NativeLlama)
    assert isinstance(own.model, NativeLlama)
    assert fused.ok and static.ok, static.error
    assert (fused.profile.decode, static.profile.decode) == (STEP_VERSION, "static-cache")
    assert fused.output.token_ids == static.output.token_ids
