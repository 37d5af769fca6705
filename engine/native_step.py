"""Native LLaMA decode outside transformers' per-module machinery: the lean step and the
engine's fused C pass.

:class:`NativeDecodeStep` (the lean step) runs a decode step of transformers' model with
the same torch operators in the same order, on the same modules and cache, so its
logits equal the model's forward bit for bit (a test checks this on padded batches);
what it drops is the machinery around them (module calls, decorators, output records):

* the query, key and value projections of a layer are one product where their
  blocks share a format, and the gate and up projections another: their
  blocks are laid end to end in one buffer (whole panels, so each projection's
  rows are a slice of the fused product's), and the separate layers keep views
  of that buffer, so nothing is held twice;
* the layers run as one loop of plain calls: the norm, transformers' own
  rotary, cache update and SDPA functions, the residual adds.

:class:`FusedDecodeStep` runs prefill and decode steps in ``decoder.c``, with floats
of its own (``decode: fused-step/2``). It computes with :class:`FusedWeights`, which
either transformers' model on blocks gives (:func:`skeleton_weights`) or the engine's
own model (:mod:`engine.native_model`): the same blocks give the same floats.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Callable
from typing import Any

import torch

from engine.kernels.blocks import BlockLinear
from engine.kernels.decoder import (
    STEP_VERSION,
    ModelDescription,
    StepLayerWeights,
    bind_decoder,
    describe_model,
)

__all__ = ["FusedDecodeStep", "FusedWeights", "NativeDecodeStep", "StepParts",
           "describe_weights", "fuse_projections", "skeleton_weights"]

# Cache positions the fused step's KV buffer holds beyond what a step needs, in steps of
# this many, so that it is copied once per that many steps, not grown every step.
CACHE_ROOM = 32


def fuse_projections(layers: list[BlockLinear]) -> tuple[BlockLinear, list[int]] | None:
    """One layer computing ``layers`` (same input, same block format) as a single product,
    and each one's output width; the layers are re-pointed at views of the fused blocks.
    None when they cannot be fused (formats differ, a part is not whole panels, or has a
    bias)."""
    if any(layer.padded_bias is not None for layer in layers):
        return None  # the fused product has no bias: each keeps its own
    weights = [layer.weight_blocks for layer in layers]
    first = weights[0]
    if any((w.kind, w.half, w.group, w.columns) != (first.kind, first.half, first.group,
                                                    first.columns) or w.rows % 32
           for w in weights):
        return None
    fused_data = torch.cat([w.data for w in weights])
    offset = 0
    for layer, weight in zip(layers, weights, strict=True):
        view = fused_data[offset:offset + weight.data.numel()]
        offset += weight.data.numel()
        layer.use_blocks(dataclasses.replace(weight, data=view))
    fused = dataclasses.replace(first, rows=sum(w.rows for w in weights), data=fused_data)
    widths = [w.rows for w in weights]
    return BlockLinear(fused, None, layers[0]._kernel, layers[0].threads), widths


class SharedInput:
    """Projections of one input: a single fused block product where they can be fused,
    else each its own. Called, gives each projection's output."""

    def __init__(self, layers: list[Any]) -> None:
        fused = (fuse_projections(layers)
                 if all(isinstance(layer, BlockLinear) for layer in layers) else None)
        self.parts: list[Any] = [fused[0]] if fused else list(layers)
        self._widths = fused[1] if fused else None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._widths is not None:
            return list(self.parts[0](x).split(self._widths, dim=-1))
        return [part(x) for part in self.parts]


class _Layer:
    """One decoder layer's modules and fused projections, as the step uses them."""

    def __init__(self, layer: Any) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.attention = attention
        self.attention_in = SharedInput([attention.q_proj, attention.k_proj, attention.v_proj])
        self.mlp_in = SharedInput([mlp.gate_proj, mlp.up_proj])
        self.o_proj, self.down_proj, self.act_fn = attention.o_proj, mlp.down_proj, mlp.act_fn
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling


def _rms_norm(norm: Any, hidden: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm, operator for operator."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * hidden.to(dtype)


class NativeDecodeStep:
    """The decode step of a LLaMA model whose projections are block layers."""

    # The profile's ``decode``: the floats are the forward's, so the same as its loop's.
    name = "dynamic-cache"

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import create_causal_mask
        from transformers.models.llama import modeling_llama

        if model.config._attn_implementation != "sdpa":
            raise ValueError(f"attention {model.config._attn_implementation!r}, not sdpa")
        self._model = model
        self._inner = model.model
        self._config = model.config
        self._layers = [_Layer(layer) for layer in
                        self._inner.layers[:self._config.num_hidden_layers]]
        self._mask = create_causal_mask
        self._rotary = modeling_llama.apply_rotary_pos_emb
        self._attend = sdpa_attention_forward

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits ``[rows, 1, vocab]`` for one new token per row, the cache updated."""
        inner = self._inner
        hidden = inner.embed_tokens(input_ids)
        mask = self._mask(config=self._config, inputs_embeds=hidden,
                          attention_mask=attention_mask, cache=cache,
                          position_ids=position_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=position_ids)
        rows, length = input_ids.shape
        for index, layer in enumerate(self._layers):
            residual = hidden
            normed = _rms_norm(layer.input_norm, hidden)
            shape = (rows, length, -1, layer.head_dim)
            query, key, value = (part.view(shape).transpose(1, 2)
                                 for part in layer.attention_in(normed))
            query, key = self._rotary(query, key, cos, sin)
            key, value = cache.update(key, value, index)
            attended, _ = self._attend(layer.attention, query, key, value, mask, dropout=0.0,
                                       scaling=layer.scaling)
            hidden = residual + layer.o_proj(attended.reshape(rows, length, -1).contiguous())
            residual = hidden
            gate, up = layer.mlp_in(_rms_norm(layer.post_norm, hidden))
            hidden = residual + layer.down_proj(layer.act_fn(gate) * up)
        hidden = _rms_norm(inner.norm, hidden)
        return self._model.lm_head(hidden)


@dataclasses.dataclass
class FusedWeights:
    """What the fused pass computes with: the model's C description, and the two parts that
    stay in torch (the embedding lookup and the rotary tables), with the shapes around them.
    ``keep`` holds whatever the description points into."""

    description: ModelDescription
    embed: Callable[[torch.Tensor], torch.Tensor]  # ids [rows, n] -> [rows, n, hidden]
    # (embedded [rows, n, hidden], positions [rows, n]) -> cos, sin [rows, n, head_dim]
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    hidden: int
    vocab: int
    layers: int
    kv_heads: int
    head_dim: int
    threads: Callable[[], int]
    keep: Any = None


def skeleton_weights(lean: NativeDecodeStep) -> FusedWeights:
    """The fused pass's weights from a transformers model on blocks (through the lean step,
    whose fused products they point at); ValueError when the pass cannot compute it."""
    model, config = lean._model, lean._config
    if getattr(config, "hidden_act", None) != "silu":
        raise ValueError(f"activation {getattr(config, 'hidden_act', None)!r}, not silu")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rotary embedding on part of each head")
    layers = lean._layers
    eps = {layer.input_norm.variance_epsilon for layer in layers} | \
        {layer.post_norm.variance_epsilon for layer in layers} | \
        {lean._inner.norm.variance_epsilon}
    scaling = {layer.scaling for layer in layers}
    if len(eps) != 1 or len(scaling) != 1:
        raise ValueError("layers with different norm epsilons or attention scalings")
    weights = [StepParts(layer.attention_in.parts, layer.mlp_in.parts, layer.o_proj,
                         layer.down_proj, layer.input_norm.weight, layer.post_norm.weight)
               for layer in layers]
    inner = lean._inner
    return describe_weights(
        weights, heads=int(config.num_attention_heads), kv_heads=int(config.num_key_value_heads),
        head_dim=layers[0].head_dim, intermediate=int(config.intermediate_size),
        eps=float(eps.pop()), scaling=float(scaling.pop()), final_norm=inner.norm.weight,
        head=model.lm_head, embed=inner.embed_tokens,
        rotary=lambda embedded, positions: inner.rotary_emb(embedded, position_ids=positions),
        keep=lean)


@dataclasses.dataclass
class StepParts:
    """One layer as the fused pass takes it: the products of the attention's input (one
    fused product or up to three), of the MLP's input (one or two), the output and down
    products, and the two norm weights."""

    attention_in: list[Any]
    mlp_in: list[Any]
    o_proj: Any
    down_proj: Any
    input_norm: torch.Tensor
    post_norm: torch.Tensor


def describe_weights(layers: list[StepParts], *, heads: int, kv_heads: int, head_dim: int,
                     intermediate: int, eps: float, scaling: float, final_norm: torch.Tensor,
                     head: Any, embed: Callable[[torch.Tensor], torch.Tensor],
                     rotary: Callable[[torch.Tensor, torch.Tensor],
                                      tuple[torch.Tensor, torch.Tensor]],
                     keep: Any) -> FusedWeights:
    """The fused pass's weights, after checking that it can compute them (ValueError: why
    not): every product kept as blocks, a head size the step's vectors divide."""
    if head_dim % 16 or heads % kv_heads:
        raise ValueError(f"head size {head_dim} or {heads} heads over {kv_heads} "
                         "key/value heads")
    for layer in layers:
        if not all(isinstance(part, BlockLinear) for part in
                   (*layer.attention_in, *layer.mlp_in, layer.o_proj, layer.down_proj)):
            raise ValueError("a projection is not kept as blocks")
    if not isinstance(head, BlockLinear):
        raise ValueError("the output head is not kept as blocks")
    first = layers[0].o_proj
    hidden = int(first.out_features)
    description = describe_model(
        [StepLayerWeights([part.bound_address for part in layer.attention_in],
                          [part.bound_address for part in layer.mlp_in],
                          layer.o_proj.bound_address, layer.down_proj.bound_address,
                          layer.input_norm, layer.post_norm)
         for layer in layers],
        hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, eps=eps, scaling=scaling, final_norm=final_norm,
        head=head.bound_address)
    return FusedWeights(description, embed, rotary, hidden=hidden, vocab=int(head.out_features),
                        layers=len(layers), kv_heads=kv_heads, head_dim=head_dim,
                        threads=first.threads, keep=(keep, head))


# Tokens a prefill or teacher-forced pass gives the C pass at once: bounds its work space
# (about 30 KB a token for SmolLM2-135M) without changing a float (each token's are its own).
PASS_TOKENS = 256


class FusedDecodeStep:
    """Prefill and decode steps in the engine's C pass (``decoder.c``).

    Only the embedding lookup and the rotary tables run in torch; the rest is the C
    pass, whose floats are its own: results name it in their profile as
    ``decode: fused-step/2``. A prefill is the same pass over every prompt token at its
    own cache position, so a prompt's tokens compute what they would one by one.

    The KV cache is one whose rows the decode batch merges, cuts and drops as always (the
    engine's :class:`~engine.kv_cache.KVCache`, or transformers' ``DynamicCache``). The
    pass keeps every layer's keys and values in one buffer with room for ``CACHE_ROOM``
    more positions, hung on the cache object (it lives and dies with the cache), and
    hands the layers views of it. When the batch has replaced a layer's tensors (rows
    joined or left), the buffer is rebuilt from them.
    """

    name = STEP_VERSION

    def __init__(self, weights: FusedWeights, library: Any) -> None:
        self._library = bind_decoder(library)
        self._weights = weights
        self._address = weights.description.address
        self._hidden, self._vocab = weights.hidden, weights.vocab
        self._kv_heads, self._head_dim = weights.kv_heads, weights.head_dim
        self._layers = weights.layers

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """Logits ``[rows, 1, vocab]`` for one new token per row, the cache updated."""
        return self.step(input_ids, attention_mask, position_ids, cache)[0]

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits ``[rows, 1, vocab]`` and the final norm's output ``[rows, hidden]``
        (the last hidden state, what an activation commitment is made of)."""
        rows = input_ids.shape[0]
        if input_ids.shape[1] != 1:
            raise ValueError("the fused step takes one new token per row")
        mask = attention_mask.to(torch.int64).contiguous()
        length = mask.shape[1]
        buffer = self._cache_buffer(cache, rows, length)
        final, logits = self._run(input_ids, position_ids, None, mask, buffer, None)
        buffer.publish(cache.layers, length)
        return logits.view(rows, 1, self._vocab), final

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's prompt (left-padded, ``[rows, width]``) into ``cache``, which must be
        empty: the logits ``[rows, vocab]`` and final-norm rows ``[rows, hidden]`` at each
        row's last position. Padding positions are not computed."""
        rows, width = input_ids.shape
        mask = attention_mask.to(torch.int64).contiguous()
        if len(cache.layers) != self._layers or any(
                getattr(layer, "keys", None) is not None and layer.keys.numel()
                for layer in cache.layers):
            raise ValueError(f"a prefill takes an empty cache of {self._layers} layers")
        buffer = self._new_buffer(rows, _room_for(width))
        places = mask.nonzero()  # (row, position) of every prompt token, row by row
        if places.shape[0] == 0 or not bool(mask[:, -1].all()):
            raise ValueError("every row needs its last position")
        last = torch.cumsum(mask.sum(1), 0) - 1  # each row's last token among ``places``
        finals, logits = [], []
        for start in range(0, places.shape[0], PASS_TOKENS):
            chunk = places[start:start + PASS_TOKENS]
            ends = last[(last >= start) & (last < start + chunk.shape[0])] - start
            final, chunk_logits = self._run(input_ids[chunk[:, 0], chunk[:, 1]][:, None],
                                            position_ids[chunk[:, 0], chunk[:, 1]][:, None],
                                            chunk.contiguous(), mask, buffer, ends)
            finals.append(final[ends])
            logits.append(chunk_logits)
        for layer in cache.layers:
            if hasattr(layer, "is_initialized"):  # transformers' layer: it holds tensors now
                layer.device, layer.is_initialized = torch.device("cpu"), True
        cache._fused_buffer = buffer
        buffer.publish(cache.layers, width)
        return torch.cat(logits), torch.cat(finals)

    def teacher_forced(self, ids: torch.Tensor, logits_rows: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over ``ids`` (one sequence): the final-norm rows of every position
        ``[n, hidden]`` and the logits of the last ``logits_rows`` ``[logits_rows, vocab]``."""
        n = int(ids.numel())
        if n == 0:
            raise ValueError("a pass over no tokens")
        keep = max(1, min(logits_rows, n))
        mask = torch.ones((1, n), dtype=torch.int64)
        positions = torch.arange(n, dtype=torch.int64)
        buffer = self._new_buffer(1, n)
        finals, logits = [], []
        for start in range(0, n, PASS_TOKENS):
            stop = min(n, start + PASS_TOKENS)
            at = torch.stack([torch.zeros(stop - start, dtype=torch.int64),
                              positions[start:stop]], 1)
            low = max(start, n - keep)  # the chunk's first token whose logits are kept
            wanted = torch.arange(low, max(low, stop), dtype=torch.int64) - start
            final, chunk_logits = self._run(ids.reshape(-1)[start:stop, None],
                                            positions[start:stop, None], at, mask, buffer,
                                            wanted)
            finals.append(final)
            if wanted.numel():
                logits.append(chunk_logits)
        return torch.cat(finals), torch.cat(logits)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, at: torch.Tensor | None,
             mask: torch.Tensor, buffer: _CacheBuffer, head_rows: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of the C pass over ``ids`` ``[tokens, 1]``: final-norm rows of every
        token, and logits of ``head_rows`` (None: every token; empty: none). The cache
        buffer's rows are the mask's."""
        tokens = ids.shape[0]
        weights = self._weights
        embedded = weights.embed(ids)
        cos, sin = weights.rotary(embedded, positions)
        hidden = embedded.reshape(tokens, self._hidden).contiguous()
        cos = cos.reshape(tokens, self._head_dim).contiguous()
        sin = sin.reshape(tokens, self._head_dim).contiguous()
        rows, length = mask.shape
        picked = None if head_rows is None else head_rows.to(torch.int64).contiguous()
        head_count = -1 if picked is None else picked.numel()
        work = torch.empty(self._library.fused_forward_work(
            self._address, tokens, length, max(head_count, 0)), dtype=torch.float32)
        final = torch.empty(tokens, self._hidden, dtype=torch.float32)
        logits = torch.empty(tokens if picked is None else head_count, self._vocab,
                             dtype=torch.float32)
        if self._library.fused_forward(
                self._address, tokens, hidden.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                None if at is None else at.data_ptr(), mask.data_ptr(), rows, length,
                buffer.tensor.data_ptr(), buffer.capacity, work.data_ptr(), final.data_ptr(),
                None if picked is None or not head_count else picked.data_ptr(), head_count,
                logits.data_ptr(),
                weights.threads()):
            raise RuntimeError(f"the fused pass refused {tokens} tokens over {rows} rows of "
                               f"{length} positions")
        return final, logits

    def _new_buffer(self, rows: int, capacity: int) -> _CacheBuffer:
        """A zeroed KV buffer for ``rows`` rows of ``capacity`` positions."""
        return _CacheBuffer(_mapped_floats(
            (self._layers, 2, rows, self._kv_heads, capacity, self._head_dim)))

    def _cache_buffer(self, cache: Any, rows: int, length: int) -> _CacheBuffer:
        """The buffer holding the cache's ``length - 1`` positions, with room for position
        ``length - 1``: the one hung on the cache, or a new one copied from its layers."""
        layers = cache.layers
        held: _CacheBuffer | None = getattr(cache, "_fused_buffer", None)
        if held is not None and held.holds(layers, rows, length):
            return held
        # Let go of the old buffer before making the new one: the layers hold their own
        # tensors now (rows left or joined), so the two need not be alive at once.
        cache._fused_buffer = held = None
        filled = layers[0].keys.shape[-2]
        if len(layers) != self._layers or filled != length - 1:
            raise ValueError(f"a cache of {filled} positions for a mask of {length}")
        held = self._new_buffer(rows, _room_for(length))
        for (keys, values), layer in zip(held.layers, layers, strict=True):
            keys[:, :, :filled].copy_(layer.keys)
            values[:, :, :filled].copy_(layer.values)
        cache._fused_buffer = held
        return held


def _room_for(length: int) -> int:
    """A buffer's positions for ``length``: at least ``CACHE_ROOM`` more, in steps of it."""
    return -(-(length + CACHE_ROOM) // CACHE_ROOM) * CACHE_ROOM


def _mapped_floats(shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed float32 tensor in its own anonymous mapping. The buffer is made and dropped
    as rows come and go; through malloc, buffers of tens of MB end up in the heap (glibc
    raises its mapping threshold after the first is freed) and the process keeps their
    pages. A mapping of its own goes back to the system when the tensor does, and its
    spare room takes no memory until a step writes there."""
    count = math.prod(shape)
    region = mmap.mmap(-1, max(count, 1) * 4)
    return torch.frombuffer(region, dtype=torch.float32, count=count).view(shape)


class _CacheBuffer:
    """Every layer's keys and values in one tensor ``[layers, 2, rows, kv_heads, capacity,
    head_dim]``, and the views of it that the cache's layers were last given."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.capacity = tensor.shape[4]
        self.layers = [(tensor[index, 0], tensor[index, 1]) for index in range(tensor.shape[0])]
        self.given: list[tuple[torch.Tensor, torch.Tensor]] = []

    def holds(self, layers: list[Any], rows: int, length: int) -> bool:
        """Whether ``layers`` still hold this buffer's views and it has room for ``length``."""
        return (self.tensor.shape[2] == rows and self.capacity >= length
                and len(self.given) == len(layers)
                and all(layer.keys is keys and layer.values is values
                        for layer, (keys, values) in zip(layers, self.given, strict=True)))

    def publish(self, layers: list[Any], length: int) -> None:
        """Point every layer at its first ``length`` positions."""
        self.given = []
        for layer, (keys, values) in zip(layers, self.layers, strict=True):
            layer.keys, layer.values = keys.narrow(2, 0, length), values.narrow(2, 0, length)
            self.given.append((layer.keys, layer.values))
