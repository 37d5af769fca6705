"""One decode step of a native LLaMA model, without transformers' per-module machinery.

A decode step of SmolLM2-135M on its blocks spends about as long in
transformers' Python around the operators (module calls, decorators, output
records, three projections where one would do) as in the block kernel itself.
:class:`NativeDecodeStep` runs the same step with the same torch operators in
the same order, on the same modules and cache, so its logits equal the
model's forward bit for bit (a test checks this on padded batches); what it
drops is the machinery:

* the query, key and value projections of a layer are one product, and the
  gate and up projections another: their blocks are laid end to end in one
  buffer (whole panels, so each projection's rows are a slice of the fused
  product's), and the separate layers keep views of that buffer, so nothing
  is held twice;
* the layers run as one loop of plain calls: the norm, transformers' own
  rotary, cache update and SDPA functions, the residual adds.

The causal mask and the rotary tables are built once per step by the model's
own functions, as its forward does. The step is used for decode steps only
(one new token per row); prefill and the verifier's teacher-forced pass run
the model's forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from engine.kernels.blocks import BlockLinear

__all__ = ["NativeDecodeStep", "fuse_projections"]


def fuse_projections(layers: list[BlockLinear]) -> tuple[BlockLinear, list[int]] | None:
    """One layer computing ``layers`` (same input, same block format) as a single product,
    and each one's output width; the layers are re-pointed at views of the fused blocks.
    None when they cannot be fused (formats differ, or a part is not whole panels)."""
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
    return BlockLinear(fused, None, layers[0]._kernel, layers[0]._threads), widths


class _Layer:
    """One decoder layer's modules and fused projections, as the step uses them."""

    def __init__(self, layer: Any) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        qkv = fuse_projections([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = fuse_projections([mlp.gate_proj, mlp.up_proj])
        if qkv is None or gate_up is None:
            raise ValueError("projections in different block formats")
        self.attention = attention
        self.qkv, self.qkv_widths = qkv
        self.gate_up, self.gate_up_widths = gate_up
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
            query, key, value = (part.view(shape).transpose(1, 2) for part in
                                 layer.qkv(normed).split(layer.qkv_widths, dim=-1))
            query, key = self._rotary(query, key, cos, sin)
            key, value = cache.update(key, value, index)
            attended, _ = self._attend(layer.attention, query, key, value, mask, dropout=0.0,
                                       scaling=layer.scaling)
            hidden = residual + layer.o_proj(attended.reshape(rows, length, -1).contiguous())
            residual = hidden
            gate, up = layer.gate_up(_rms_norm(layer.post_norm, hidden)).split(
                layer.gate_up_widths, dim=-1)
            hidden = residual + layer.down_proj(layer.act_fn(gate) * up)
        hidden = _rms_norm(inner.norm, hidden)
        return self._model.lm_head(hidden)
