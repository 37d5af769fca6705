"""Memory-bandwidth roofline for decoding.

A decode step reads every weight once and the KV cache of every sequence in
the batch, so at best it takes ``bytes_per_step / bandwidth`` seconds:

    bytes_per_step = weight_bytes + batch_size * context_tokens * kv_bytes_per_token
    bound tokens/s = batch_size * bandwidth / bytes_per_step

``kv_bytes_per_token = 2 (K and V) * layers * kv_heads * head_dim * dtype bytes``.
The bound ignores compute and caches; a measured rate above it means the
bandwidth figure is too low (a noisy probe), not that the model is fast.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from engine.bench.bandwidth import (
    cpu_memory_bandwidth_gbps,
    measure_cpu_memory_bandwidth_gbps,
    memory_bandwidth_gbps,
)
from engine.hardware import Device

FORMULA = ("bound_tokens_per_s = batch_size * bandwidth_bytes_per_s / (weight_bytes + "
           "batch_size * context_tokens * kv_bytes_per_token)")

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def decode_bytes_per_step(weight_bytes: float, kv_bytes_per_token: float, context_tokens: float,
                          batch_size: int = 1) -> float:
    """Bytes one decode step reads: the weights once plus each sequence's KV cache."""
    if weight_bytes <= 0:
        raise ValueError("weight_bytes must be positive")
    if kv_bytes_per_token < 0 or context_tokens < 0:
        raise ValueError("kv_bytes_per_token and context_tokens must not be negative")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    return float(weight_bytes) + batch_size * float(context_tokens) * float(kv_bytes_per_token)


def bound_tokens_per_second(bandwidth_gbps: float, bytes_per_step: float,
                            batch_size: int = 1) -> float:
    """The most tokens/s a batch can decode when every step reads ``bytes_per_step`` bytes."""
    if not (bandwidth_gbps > 0 and math.isfinite(bandwidth_gbps)):
        raise ValueError("bandwidth_gbps must be a positive number")
    if bytes_per_step <= 0:
        raise ValueError("bytes_per_step must be positive")
    return batch_size * bandwidth_gbps * 1e9 / bytes_per_step


def kv_bytes_per_token(model_config: Any, dtype_name: str) -> int:
    """KV-cache bytes one token adds, from a transformers config (GPT-2 or Llama style)."""
    layers = int(model_config.num_hidden_layers)
    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = getattr(model_config, "head_dim", None) or int(model_config.hidden_size) // heads
    return 2 * layers * kv_heads * int(head_dim) * DTYPE_BYTES.get(dtype_name, 4)


class Roofline(BaseModel):
    """The figures a roofline needs, as stored in a report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bandwidth_gbps: float
    bandwidth_source: str
    weight_bytes: int
    kv_bytes_per_token: int
    formula: str = FORMULA

    def bound(self, context_tokens: float, batch_size: int = 1) -> float:
        """Upper bound of decode tokens/s at this mean context length and batch size."""
        step = decode_bytes_per_step(self.weight_bytes, self.kv_bytes_per_token, context_tokens,
                                     batch_size)
        return bound_tokens_per_second(self.bandwidth_gbps, step, batch_size)

    def efficiency(self, tokens_per_second: float, context_tokens: float,
                   batch_size: int = 1) -> float:
        """Measured decode tokens/s as a fraction of the bound."""
        return tokens_per_second / self.bound(context_tokens, batch_size)


def device_bandwidth(device: Device, *, probe: bool = True) -> tuple[float, str] | None:
    """Peak memory bandwidth of ``device`` in GB/s and where the figure comes from.

    GPUs: the spec sheet (None for an unlisted family). CPU: the best of the
    engine's cached measurement and (``probe=True``) a fresh probe now, since a
    probe taken while the machine was busy reads low and a bound must not.
    """
    if device.kind != "cpu":
        gbps = memory_bandwidth_gbps(device)
        return (gbps, f"spec sheet ({device.gpu_type})") if gbps else None
    cached = cpu_memory_bandwidth_gbps()
    if not probe:
        return cached, "measured CPU read bandwidth (engine cache)"
    fresh = max(measure_cpu_memory_bandwidth_gbps(), measure_cpu_memory_bandwidth_gbps(1 << 30))
    return (max(cached, fresh), f"measured CPU read bandwidth: best of cached {cached:.1f} GB/s "
                                f"and fresh probes {fresh:.1f} GB/s")
