"""Compute kernels the engine builds for the machine it runs on (see `engine.kernels.rowgemm`).

This module imports nothing heavy: the faces can name the kernel without torch.
"""

# The execution profile's ``linear_kernel`` when the CPU kernel computed the linear layers.
KERNEL_NAME = "row-invariant"
