"""GPU product names: NVML's ``"Tesla V100-SXM2-16GB"`` → the short family ``"v100"``."""

from __future__ import annotations

import re

__all__ = ["gpu_type_from_name"]

_DROP_WORDS = frozenset({"nvidia", "tesla", "geforce", "quadro", "gpu", "graphics", "generation"})
# Form factors and memory kinds: SXM2, PCIe, HBM3, NVL, FHHL, DGXS...
_FORM_FACTOR = re.compile(
    r"(sxm\d*|pcie\d*|hbm\d*e?|nvl\d*|nvlink|fhhl|fhfl|dgxs|mxm|\d+gb)", re.ASCII
)
_MEMORY_SIZE = re.compile(r"\b\d+(\.\d+)?\s*[gt]i?b\b", re.ASCII)
_TYPE_MAX_LEN = 64


def gpu_type_from_name(name: str) -> str:
    """Short lower-case family of an NVML product name: ``"Tesla V100-SXM2-16GB"`` → ``"v100"``.

    Vendor words (NVIDIA, Tesla, GeForce, Quadro), memory sizes and form factors (SXM2,
    PCIe, HBM3, NVL...) are dropped; the model id and suffixes such as ``ti`` or ``super``
    are kept. Anything after ``MIG`` (a MIG profile) is ignored. The result always matches
    ``^[a-z0-9]+$``: a name with nothing left gives its cleaned self, or ``"unknown"``.
    """
    text = name.lower()
    text = _MEMORY_SIZE.sub(" ", text)
    tokens = [t for t in re.split(r"[^a-z0-9]+", text) if t]
    if "mig" in tokens:
        tokens = tokens[: tokens.index("mig")]
    kept = [t for t in tokens if t not in _DROP_WORDS and not _FORM_FACTOR.fullmatch(t)]
    result = "".join(kept) or re.sub(r"[^a-z0-9]+", "", name.lower()) or "unknown"
    return result[:_TYPE_MAX_LEN]
