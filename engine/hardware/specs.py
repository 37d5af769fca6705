"""The spec sheet: vendor peak figures per GPU family, for rooflines and price estimates.

:data:`GPU_SPECS` holds one :class:`GpuSpec` per family and variant (``"a100"``,
``"a100-40gb"``, ``"h100-pcie"``...); :func:`gpu_spec_for` picks the variant from a GPU's
NVML name and memory, :func:`supports_bf16` says whether a compute capability has BF16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["GPU_SPECS", "GpuSpec", "gpu_spec_for", "supports_bf16"]


@dataclass(frozen=True)
class GpuSpec:
    """One spec-sheet entry: peak figures published by the vendor (dense, no sparsity)."""

    gpu_type: str
    memory_bandwidth_gbps: float  # GB/s, 1e9 bytes per second
    fp32_tflops: float  # non-tensor FP32
    fp16_tflops: float  # dense tensor-core FP16 (FP32 accumulate where the two differ)
    bf16_tflops: float | None  # dense tensor-core BF16; None where the GPU has no BF16
    compute_capability: tuple[int, int]

    def peak_tflops(self, dtype: str) -> float | None:
        """Peak dense TFLOP/s for ``"fp32"``, ``"fp16"`` or ``"bf16"`` (None if unsupported).

        Also accepts torch-style names (``"float16"``, ``"bfloat16"``, ``"float32"``).
        """
        key = _DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower())
        return {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "bf16": self.bf16_tflops}.get(
            key
        )


_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}


# Figures from NVIDIA's data sheets (SXM/flagship variant unless the key says otherwise).
# Tensor figures are dense: the sheets' headline numbers with sparsity are twice these.
# GeForce cards run FP16 tensor math with FP32 accumulate (what PyTorch uses) at half the
# FP16-accumulate rate; the FP32-accumulate figure is given.
GPU_SPECS: dict[str, GpuSpec] = {
    spec_key: GpuSpec(gpu_type, bw, fp32, fp16, bf16, cc)
    for spec_key, gpu_type, bw, fp32, fp16, bf16, cc in [
        # key,        family,    GB/s,   FP32,  FP16,   BF16,   compute capability
        ("v100", "v100", 900.0, 15.7, 125.0, None, (7, 0)),  # V100 SXM2
        ("v100-pcie", "v100", 900.0, 14.0, 112.0, None, (7, 0)),
        ("t4", "t4", 320.0, 8.1, 65.0, None, (7, 5)),
        ("a10", "a10", 600.0, 31.2, 125.0, 125.0, (8, 6)),
        # A10G (AWS G5) has no public NVIDIA sheet; AWS-published figures.
        ("a10g", "a10g", 600.0, 35.0, 70.0, 70.0, (8, 6)),
        ("a40", "a40", 696.0, 37.4, 149.7, 149.7, (8, 6)),
        ("a100", "a100", 2039.0, 19.5, 312.0, 312.0, (8, 0)),  # A100 80GB SXM
        ("a100-40gb", "a100", 1555.0, 19.5, 312.0, 312.0, (8, 0)),  # A100 40GB, SXM or PCIe
        ("a100-pcie", "a100", 1935.0, 19.5, 312.0, 312.0, (8, 0)),  # A100 80GB PCIe
        ("l4", "l4", 300.0, 30.3, 121.0, 121.0, (8, 9)),
        ("l40s", "l40s", 864.0, 91.6, 362.05, 362.05, (8, 9)),
        ("h100", "h100", 3350.0, 67.0, 989.4, 989.4, (9, 0)),  # H100 SXM5
        ("h100-pcie", "h100", 2000.0, 51.0, 756.0, 756.0, (9, 0)),
        ("h100-nvl", "h100", 3900.0, 60.0, 835.0, 835.0, (9, 0)),
        ("h200", "h200", 4800.0, 67.0, 989.4, 989.4, (9, 0)),  # H200 SXM
        ("h200-nvl", "h200", 4800.0, 60.0, 835.0, 835.0, (9, 0)),
        ("rtx3090", "rtx3090", 936.0, 35.6, 71.0, 71.0, (8, 6)),
        ("rtx4090", "rtx4090", 1008.0, 82.6, 165.2, 165.2, (8, 9)),
        ("rtxa6000", "rtxa6000", 768.0, 38.7, 154.8, 154.8, (8, 6)),
        # HGX B200 (1000 W). Revised sheets give 7.7 TB/s; the launch figure is 8 TB/s.
        ("b200", "b200", 8000.0, 75.0, 2250.0, 2250.0, (10, 0)),
    ]
}


def supports_bf16(compute_capability: tuple[int, int]) -> bool:
    """True for compute capability 8.0 (Ampere) and newer, which have BF16 tensor cores."""
    return tuple(compute_capability) >= (8, 0)


def gpu_spec_for(
    gpu_type: str | None, name: str = "", memory_total_bytes: int = 0
) -> GpuSpec | None:
    """The spec-sheet entry for a GPU, picking the variant (PCIe, NVL, 40GB) from its name.

    Returns None for a family the sheet does not list.
    """
    if not gpu_type:
        return None
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    candidates: list[str] = []
    if gpu_type == "a100" and 0 < memory_total_bytes <= 48 * 2**30:
        candidates.append("a100-40gb")
    if "nvl" in tokens:
        candidates.append(f"{gpu_type}-nvl")
    if "pcie" in tokens:
        candidates.append(f"{gpu_type}-pcie")
    candidates.append(gpu_type)
    for key in candidates:
        if key in GPU_SPECS:
            return GPU_SPECS[key]
    return None
