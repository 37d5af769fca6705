"""The KV cache of the engine's own models: per layer, plain key and value tensors.

A decode batch (:mod:`engine.tasks.generation`) merges, cuts and drops rows of
a cache by replacing each layer's ``keys`` and ``values`` (``[rows, kv_heads,
positions, head_dim]``). transformers' ``DynamicCache`` is such a cache, but
importing it imports the transformers package (about 20 MB of resident memory:
its hub client, HTTP stack and image library), which the engine's own native
model otherwise never needs. :class:`KVCache` is the same shape without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVCache", "KVLayer", "plain_layers"]


class KVLayer:
    """One layer's keys and values (None until a prefill fills them)."""

    def __init__(self) -> None:
        self.keys: Any = None
        self.values: Any = None


class KVCache:
    """A cache of ``layers`` :class:`KVLayer` s, filled by the fused pass."""

    def __init__(self, layers: int) -> None:
        self.layers = [KVLayer() for _ in range(layers)]


def plain_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` holds plain key and value tensors that a decode
    batch may merge and cut: the engine's :class:`KVLayer`, or transformers' dynamic layer
    (not a sliding-window or quantized one)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    if all(type(layer) is KVLayer for layer in layers):
        return True
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in layers)
