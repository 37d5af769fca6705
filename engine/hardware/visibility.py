"""Which GPUs CUDA numbers and shows: ``CUDA_DEVICE_ORDER`` and ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

__all__ = ["cuda_visible_nvml_indices", "ensure_pci_bus_order", "visible_selection"]

log = logging.getLogger("engine.hardware")  # the package's one logger, as before the split

_order_warned = False


def ensure_pci_bus_order() -> None:
    """Make CUDA number GPUs in PCI bus order, as NVML does (unless the user chose otherwise).

    Only effective before CUDA initialises in this process.
    """
    global _order_warned
    order = os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if order != "PCI_BUS_ID" and not _order_warned:
        _order_warned = True
        log.warning("CUDA_DEVICE_ORDER=%s: CUDA indices may not match NVML's PCI order", order)


def cuda_visible_nvml_indices(uuids: Sequence[str | None], visible: str | None) -> list[int]:
    """NVML indices of the GPUs ``CUDA_VISIBLE_DEVICES`` selects, in the order it names them.

    ``uuids`` holds one entry per NVML GPU (None when unknown); ``visible`` is the value of
    ``CUDA_VISIBLE_DEVICES`` (None: unset, every GPU visible). Entries are integer NVML
    indices or UUID prefixes; like CUDA, reading stops at the first entry that names no
    GPU (or one already named). Which CUDA index a GPU gets is torch's to say (see
    :mod:`engine.hardware`), not this order's.
    """
    return [gpu for gpu, _ in visible_selection(uuids, [()] * len(uuids), visible)]


def visible_selection(
    uuids: Sequence[str | None],
    mig_uuids: Sequence[Sequence[str | None]],
    visible: str | None,
) -> list[tuple[int, int | None]]:
    """What ``CUDA_VISIBLE_DEVICES`` selects: ``(gpu, None)`` for a whole GPU, ``(gpu, k)``
    for the ``k``-th MIG instance of ``mig_uuids[gpu]`` (named by a ``MIG-`` UUID prefix).
    """
    count = len(uuids)
    if visible is None:
        return [(i, None) for i in range(count)]
    chosen: list[tuple[int, int | None]] = []
    for raw in visible.split(","):
        entry = raw.strip()
        pick: tuple[int, int | None] | None = None
        if re.fullmatch(r"\d+", entry):
            pick = (int(entry), None) if int(entry) < count else None
        elif entry:
            prefix = entry.lower()
            matches: list[tuple[int, int | None]] = [
                (i, None)
                for i, u in enumerate(uuids)
                if u is not None and u.lower().startswith(prefix)
            ]
            matches += [
                (i, k)
                for i, instances in enumerate(mig_uuids)
                for k, u in enumerate(instances)
                if u is not None and u.lower().startswith(prefix)
            ]
            pick = matches[0] if len(matches) == 1 else None
        if pick is None or pick in chosen or (pick[0], None) in chosen:
            break
        chosen.append(pick)
    return chosen
