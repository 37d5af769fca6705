"""Compute kernels the engine builds for the machine it runs on (see `engine.kernels.rowgemm`).

This module imports nothing heavy: the faces can name the kernel without torch.
"""

# The execution profile's ``linear_kernel`` when the CPU kernel computed the linear layers
# on float32 panels, and when it computed them on a GGUF's quantized blocks.
KERNEL_NAME = "row-invariant"
BLOCK_KERNEL_NAME = "row-invariant-blocks"
KERNEL_NAMES = (KERNEL_NAME, BLOCK_KERNEL_NAME)
# The execution profile's ``decode`` when a native model's prefill and decode steps ran in
# the engine's fused C pass (decoder.c). Its floats are its own: a change to that arithmetic
# needs a new version, since results hashed under one cannot be reproduced under another
# (/1 was the same decode step after transformers' prefill).
FUSED_STEP_NAME = "fused-step/2"
