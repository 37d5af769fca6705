"""The binding of ``decoder.c``: the engine's own forward pass of a LLaMA model on blocks.

The C side computes a whole pass (a decode step, a prefill or a teacher-forced
pass) in one call (see the C file for what it
computes and in which order); this module describes a model to it once, as
ctypes structures that point at the fused block weights and the norm weights,
and holds the references that keep those buffers alive.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from engine.kernels import FUSED_STEP_NAME

__all__ = ["STEP_VERSION", "ModelDescription", "StepLayerWeights", "bind_decoder",
           "describe_model"]

STEP_VERSION = FUSED_STEP_NAME  # the profile's ``decode`` for this pass


class _StepLayer(ctypes.Structure):
    _fields_ = [("attention_in", ctypes.c_void_p * 3), ("mlp_in", ctypes.c_void_p * 2),
                ("o", ctypes.c_void_p), ("down", ctypes.c_void_p),
                ("attention_parts", ctypes.c_int32), ("mlp_parts", ctypes.c_int32),
                ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)]


class _StepModel(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_int32), ("hidden", ctypes.c_int32),
                ("heads", ctypes.c_int32), ("kv_heads", ctypes.c_int32),
                ("head_dim", ctypes.c_int32), ("intermediate", ctypes.c_int32),
                ("eps", ctypes.c_float), ("scaling", ctypes.c_float),
                ("final_norm", ctypes.c_void_p), ("head", ctypes.c_void_p),
                ("layer", ctypes.c_void_p)]


class StepLayerWeights:
    """What one layer gives the step: the addresses of its bound block weights and its
    two float32 norm weights. ``attention_in`` are the query | key | value products (one
    fused weight, or three), ``mlp_in`` the gate | up products (one, or two)."""

    def __init__(self, attention_in: Sequence[int], mlp_in: Sequence[int], o: int, down: int,
                 input_norm: torch.Tensor, post_norm: torch.Tensor) -> None:
        if not 1 <= len(attention_in) <= 3 or not 1 <= len(mlp_in) <= 2:
            raise ValueError(f"{len(attention_in)} attention and {len(mlp_in)} MLP input parts")
        self.attention_in, self.mlp_in = tuple(attention_in), tuple(mlp_in)
        self.o, self.down = o, down
        self.input_norm = input_norm.detach().to(torch.float32).contiguous()
        self.post_norm = post_norm.detach().to(torch.float32).contiguous()


class ModelDescription:
    """A model as ``fused_forward`` reads it; keeps alive every buffer it points at."""

    def __init__(self, structure: _StepModel, keep: list[Any]) -> None:
        self.structure = structure
        self.address = ctypes.addressof(structure)
        self._keep = keep


def describe_model(layers: Sequence[StepLayerWeights], *, hidden: int, heads: int,
                   kv_heads: int, head_dim: int, intermediate: int, eps: float,
                   scaling: float, final_norm: torch.Tensor, head: int) -> ModelDescription:
    """The C description of a model (``head``: the address of the output head's bound
    weight). The caller keeps the bound weights alive as long as the description."""
    table = (_StepLayer * len(layers))()
    for slot, layer in zip(table, layers, strict=True):
        slot.attention_parts, slot.mlp_parts = len(layer.attention_in), len(layer.mlp_in)
        for index, address in enumerate(layer.attention_in):
            slot.attention_in[index] = address
        for index, address in enumerate(layer.mlp_in):
            slot.mlp_in[index] = address
        slot.o, slot.down = layer.o, layer.down
        slot.input_norm = layer.input_norm.data_ptr()
        slot.post_norm = layer.post_norm.data_ptr()
    final = final_norm.detach().to(torch.float32).contiguous()
    structure = _StepModel(len(layers), hidden, heads, kv_heads, head_dim, intermediate, eps,
                           scaling, final.data_ptr(), head, ctypes.addressof(table))
    return ModelDescription(structure, [table, final, list(layers)])


def bind_decoder(library: ctypes.CDLL) -> Any:
    """Set the argument types of the library's forward-pass functions; returns the library."""
    size, pointer = ctypes.c_ssize_t, ctypes.c_void_p
    library.fused_forward_work.restype = size
    library.fused_forward_work.argtypes = [pointer, size, size, size]
    library.fused_forward.restype = ctypes.c_int
    library.fused_forward.argtypes = [pointer, size, pointer, pointer, pointer, pointer, pointer,
                                      size, size, pointer, size, pointer, pointer, pointer, size,
                                      pointer, ctypes.c_int]
    return library
