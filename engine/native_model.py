"""A LLaMA model on its GGUF blocks that runs wholly in the engine's fused pass.

The native dtype first ran a GGUF model as a transformers ``LlamaForCausalLM``
whose layers were block layers. Once prefill and decode both run in the fused C
pass (``decoder.c``), transformers' model classes only hold the weights, and
importing them costs more resident memory than the model itself: about 100 MB
(``torch.distributed.tensor`` and sympy through the LLaMA config, ``torch._dynamo``
through the masking code), against 92 MB of SmolLM2-135M blocks.
:class:`NativeLlama` holds the same block layers under the same module names
without those classes, with its config from the saved ``config.json`` and its
rotary tables computed here as transformers' default rotary embedding computes
them (same operators, same order, so the fused pass gets the same floats on
either model, and results equal each other's hash for hash).

It takes what the fused pass computes and nothing else (:func:`engine_model_refusal`
says why a model is not taken: then the engine builds the transformers model, as
before); it has no operator-by-operator forward, so ``--decode dynamic`` loads
the transformers model instead. Its ``forward`` is the teacher-forced pass of
one sequence (the verifier's and the commitment's), in the fused pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import weightfiles
from engine.kv_cache import KVCache
from engine.native import GgufFile, NativeUnavailableError, build_native_model
from engine.native_step import (
    FusedDecodeStep,
    SharedInput,
    StepParts,
    describe_weights,
)

__all__ = ["NativeLlama", "NativeLlamaConfig", "NativeOutput", "engine_model_refusal",
           "load_native_llama"]


@dataclass(frozen=True)
class NativeLlamaConfig:
    """The shape of a LLaMA model, read from a saved ``config.json`` (the attribute names
    are transformers', so code that reads ``model.config.vocab_size`` reads this too)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NativeLlamaConfig:
        """The config of a saved ``config.json``'s fields; ValueError when one is missing
        or of the wrong kind (the caller checks :func:`engine_model_refusal` first)."""
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        return cls(vocab_size=int(raw["vocab_size"]), hidden_size=hidden,
                   intermediate_size=int(raw["intermediate_size"]),
                   num_hidden_layers=int(raw["num_hidden_layers"]),
                   num_attention_heads=heads,
                   num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                   head_dim=int(raw.get("head_dim") or hidden // heads),
                   rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                   rope_theta=float(_rope(raw)["rope_theta"]),
                   max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                   tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                   bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
                   pad_token_id=raw.get("pad_token_id"))


def _rope(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The rotary parameters: ``rope_parameters`` (transformers 5), else the older fields."""
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, Mapping):
        return parameters
    scaling = raw.get("rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, Mapping) \
        else "default"
    return {"rope_theta": raw.get("rope_theta", 10000.0), "rope_type": kind}


def engine_model_refusal(raw: Mapping[str, Any]) -> str | None:
    """Why a saved LLaMA config cannot be a :class:`NativeLlama` (None: it can). What is
    refused runs as the transformers model instead, whose rotary module knows every
    scaling, whose forward knows every activation."""
    if raw.get("model_type") != "llama":
        return f"model type {raw.get('model_type')!r}, not llama"
    if raw.get("hidden_act", "silu") != "silu":
        return f"activation {raw.get('hidden_act')!r}, not silu"
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        return "projections with a bias"
    rope = _rope(raw)
    if rope.get("rope_type", "default") != "default":
        return f"rotary scaling {rope.get('rope_type')!r}"
    if float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))) != 1.0:
        return "rotary embedding on part of each head"
    try:
        config = NativeLlamaConfig.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        return f"an incomplete config ({exc})"
    if config.head_dim % 16 or config.num_attention_heads % config.num_key_value_heads:
        return (f"head size {config.head_dim} or {config.num_attention_heads} heads over "
                f"{config.num_key_value_heads} key/value heads")
    return None


@dataclass(frozen=True)
class NativeOutput:
    """What :meth:`NativeLlama.forward` gives: ``logits`` ``[1, rows, vocab]`` and
    ``hidden_states``, whose last is the final norm's output ``[1, n, hidden]``."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]


class _Slots(torch.nn.Module):
    """A module the loader fills: linear layers, norm weights, the embedding."""


def _skeleton(config: NativeLlamaConfig) -> torch.nn.Module:
    """Empty modules under transformers' names (``model.layers.3.self_attn.q_proj``), which
    the GGUF loader fills with the file's tensors."""
    model = _Slots()
    inner = _Slots()
    layers = torch.nn.ModuleList()
    for _ in range(config.num_hidden_layers):
        layer = _Slots()
        layer.self_attn, layer.mlp = _Slots(), _Slots()
        layer.input_layernorm, layer.post_attention_layernorm = _Slots(), _Slots()
        layers.append(layer)
    inner.layers = layers
    inner.norm = _Slots()
    model.model = inner
    return model


class NativeLlama(torch.nn.Module):
    """A LLaMA model whose weights are a GGUF's blocks, computed by the fused pass only.

    ``fused`` is its :class:`~engine.native_step.FusedDecodeStep` (prefill and decode);
    :meth:`forward` is a teacher-forced pass; :meth:`new_cache` makes the empty KV cache
    a decode batch starts from.
    """

    model: Any  # the filled modules, under transformers' names
    lm_head: Any

    def __init__(self, config: NativeLlamaConfig, filled: torch.nn.Module, library: Any,
                 generation: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.generation_config = _GenerationConfig(generation.get("eos_token_id"))
        self.model = filled.model
        self.lm_head = filled.lm_head
        dim = config.head_dim
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.float) / dim)), persistent=False)
        parts = []
        for layer in self.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention_in = SharedInput([attention.q_proj, attention.k_proj, attention.v_proj])
            mlp_in = SharedInput([mlp.gate_proj, mlp.up_proj])
            parts.append(StepParts(attention_in.parts, mlp_in.parts, attention.o_proj,
                                   mlp.down_proj, layer.input_layernorm.weight,
                                   layer.post_attention_layernorm.weight))
        try:
            weights = describe_weights(
                parts, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                head_dim=dim, intermediate=config.intermediate_size, eps=config.rms_norm_eps,
                scaling=dim ** -0.5, final_norm=self.model.norm.weight, head=self.lm_head,
                embed=self.model.embed_tokens, rotary=self.rotary, keep=parts)
        except ValueError as exc:
            raise NativeUnavailableError(str(exc)) from exc
        self.fused = FusedDecodeStep(weights, library)

    def rotary(self, embedded: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[rows, n, head_dim]`` at ``positions`` ``[rows, n]``: the default
        rotary embedding, operator for operator as transformers computes it."""
        freqs = positions[..., None].float() * self.inv_freq.to(dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(embedded.dtype), angles.sin().to(embedded.dtype)

    def new_cache(self) -> KVCache:
        """An empty KV cache for a prefill, which the fused pass fills."""
        return KVCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, *, use_cache: bool = False,
                output_hidden_states: bool = False, logits_to_keep: int = 0,
                attention_mask: torch.Tensor | None = None) -> NativeOutput:
        """A teacher-forced pass over one sequence ``[1, n]``: the logits of its last
        ``logits_to_keep`` positions (0: all) and the final norm's output at every one.
        Batches, masks and caches go through :attr:`fused` (the decode batch's way)."""
        del output_hidden_states  # always given: the final norm's output is computed anyway
        if use_cache or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("a native LLaMA's forward is a teacher-forced pass over one "
                             "sequence, without a cache")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("a teacher-forced pass takes no padding")
        n = input_ids.shape[1]
        final, logits = self.fused.teacher_forced(input_ids[0], logits_to_keep or n)
        return NativeOutput(logits[None], (final[None],))


class _GenerationConfig:
    """The one field of a saved generation config the engine reads: the end ids."""

    def __init__(self, eos_token_id: Any) -> None:
        self.eos_token_id = eos_token_id


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise weightfiles.WeightFileProblem(path, f"it is not readable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise weightfiles.WeightFileProblem(path, "it does not hold a JSON object")
    return value


def load_native_llama(directory: Path, gguf: GgufFile, library: Any,
                      make_empty: Callable[[NativeLlamaConfig], torch.nn.Module] = _skeleton,
                      ) -> tuple[NativeLlama, dict[str, int]]:
    """A :class:`NativeLlama` from a verified conversion directory (``config.json``,
    ``generation_config.json``) and the GGUF's blocks; and the count of block formats.
    NativeUnavailableError when the fused pass cannot compute the model (the caller
    builds the transformers model instead)."""
    raw = _read_json(directory / "config.json")
    refusal = engine_model_refusal(raw)
    if refusal is not None:
        raise NativeUnavailableError(refusal)
    config = NativeLlamaConfig.from_dict(raw)
    generation_file = directory / "generation_config.json"
    generation = _read_json(generation_file) if generation_file.exists() else {}
    filled, formats = build_native_model(lambda: make_empty(config), config, gguf)
    missing = [name for name in _expected(config) if not _has(filled, name)]
    if missing:
        raise NativeUnavailableError(f"the GGUF leaves {', '.join(missing[:4])} unset")
    return NativeLlama(config, filled, library, generation), formats


def _expected(config: NativeLlamaConfig) -> list[str]:
    names = ["model.embed_tokens", "model.norm.weight", "lm_head"]
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        names += [prefix + part for part in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm.weight",
            "post_attention_layernorm.weight")]
    return names


def _has(root: torch.nn.Module, dotted: str) -> bool:
    node: Any = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return False
    return True
