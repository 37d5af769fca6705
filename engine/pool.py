"""ModelPool: keeps loaded models warm within a memory budget per device.

Keyed by (model, devices, dtype, weights). When a new model would pass a
device's budget, the least recently used models on that device that no job is
using are evicted and their memory is freed for real. Thread-safe: two jobs
asking for the same cold model wait for one load.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import InsufficientMemoryError
from engine.hardware import Device
from engine.loading import (
    DTYPE_BYTES,
    NATIVE,
    LoadedModel,
    PoolKey,
    Weights,
    load_model,
    resolve_dtype_name,
)
from engine.registry import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.90

Loader = Callable[..., LoadedModel]


@dataclass
class _Entry:
    loaded: LoadedModel
    in_use: int = 0
    last_used: float = 0.0


def release_memory(devices: Sequence[Device]) -> None:
    """Return freed memory to the system: garbage-collect and empty CUDA caches."""
    gc.collect()
    if any(d.kind == "cuda" for d in devices):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class ModelPool:
    """Warm models, a memory budget per device, LRU eviction."""

    def __init__(self, *, budgets: dict[str, int] | None = None,
                 budget_fraction: float = DEFAULT_BUDGET_FRACTION,
                 loader: Loader = load_model, show_progress: bool | None = None):
        self._budgets = dict(budgets or {})
        self._fraction = budget_fraction
        self._loader = loader
        self._entries: OrderedDict[PoolKey, _Entry] = OrderedDict()
        self._loading: dict[PoolKey, threading.Event] = {}
        self._lock = threading.RLock()
        self._show_progress = sys.stderr.isatty() if show_progress is None else show_progress

    # -- budgets
    def budget(self, device: Device) -> int:
        """The bytes of models this pool keeps on ``device``."""
        if device.id in self._budgets:
            return self._budgets[device.id]
        return int(device.memory_total_bytes * self._fraction)

    def used(self, device_id: str) -> int:
        """Bytes held by warm models on a device (a model over n devices counts 1/n each)."""
        with self._lock:
            return sum(e.loaded.memory_bytes // len(k.devices)
                       for k, e in self._entries.items() if device_id in k.devices)

    # -- lookup
    def key_for(self, spec: ModelSpec, devices: Sequence[Device], weights: Weights = "pretrained",
                dtype: str | None = None, *, model_operators: bool = False) -> PoolKey:
        """The key a model would have on ``devices`` (``model_operators``: a native model
        loaded as transformers' model, for ``--decode dynamic`` or ``static``)."""
        name = resolve_dtype_name(spec, devices[0], dtype, weights)
        return PoolKey(spec.name, tuple(d.id for d in devices), name, weights,
                       model_operators and name == NATIVE)

    def peek(self, key: PoolKey) -> LoadedModel | None:
        """The warm model under ``key``, without touching its recency."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.loaded if entry else None

    def is_warm(self, name: str, device_id: str | None = None) -> bool:
        """True when ``name`` is loaded (on ``device_id`` when given)."""
        with self._lock:
            return any(k.model == name and (device_id is None or device_id in k.devices)
                       for k in self._entries)

    def warm(self) -> list[LoadedModel]:
        """Every warm model, least recently used first."""
        with self._lock:
            return [e.loaded for e in self._entries.values()]

    # -- use
    @contextlib.contextmanager
    def use(self, spec: ModelSpec, devices: Sequence[Device], *, weights: Weights = "pretrained",
            dtype: str | None = None, **load_options: Any) -> Iterator[tuple[LoadedModel, float]]:
        """Lease a model for one job: ``(model, load_seconds)``, 0.0 when it was warm.

        A leased model is never evicted until the lease ends. ``model_operators=True``
        (a load option) asks for a native model as transformers' model, which the decode
        paths other than ``auto`` compute with; it is warm under a key of its own.
        """
        key = self.key_for(spec, devices, weights, dtype,
                           model_operators=bool(load_options.pop("model_operators", False)))
        if key.model_operators:  # only native models have the choice: others never hear of it
            load_options["model_operators"] = True
        loaded, load_seconds = self._acquire(key, spec, devices, weights, dtype, load_options)
        try:
            yield loaded, load_seconds
        finally:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.in_use -= 1
                    entry.last_used = time.monotonic()

    def get(self, spec: ModelSpec, devices: Sequence[Device], *, weights: Weights = "pretrained",
            dtype: str | None = None, **load_options: Any) -> tuple[LoadedModel, float]:
        """Load (or find warm) and return ``(model, load_seconds)`` without holding a lease."""
        with self.use(spec, devices, weights=weights, dtype=dtype, **load_options) as got:
            return got

    def _acquire(self, key: PoolKey, spec: ModelSpec, devices: Sequence[Device], weights: Weights,
                 dtype: str | None, load_options: dict[str, Any]) -> tuple[LoadedModel, float]:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.in_use += 1
                    entry.last_used = time.monotonic()
                    self._entries.move_to_end(key)
                    return entry.loaded, 0.0
                waiting = self._loading.get(key)
                if waiting is None:
                    self._loading[key] = threading.Event()
                    break
            waiting.wait()
        try:
            self._make_room(spec, devices, key.dtype)
            with self._progress(f"loading {spec.name} on {'+'.join(key.devices)} ({key.dtype})"):
                loaded = self._loader(spec, devices, weights=weights, dtype=dtype, **load_options)
            with self._lock:
                self._entries[key] = _Entry(loaded, in_use=1, last_used=time.monotonic())
            log.info("loaded %s in %.2f s (%d MB)", key, loaded.load_time_seconds,
                     loaded.memory_bytes // 2**20)
            return loaded, loaded.load_time_seconds
        finally:
            with self._lock:
                self._loading.pop(key).set()

    def _make_room(self, spec: ModelSpec, devices: Sequence[Device], dtype_name: str) -> None:
        # Budgets count resident weights (what stays while a model is warm);
        # the working headroom of a job is checked against free memory at load.
        need_each = spec.parameters * DTYPE_BYTES[dtype_name] // len(devices)
        for device in devices:
            budget = self.budget(device)
            if need_each > budget:
                raise InsufficientMemoryError(
                    f"model {spec.name!r} needs about {need_each / 2**30:.2f} GiB on {device.id} "
                    f"but the pool's budget there is {budget / 2**30:.2f} GiB", field="model")
            while self.used(device.id) + need_each > budget:
                victim = self._lru_idle_on(device.id)
                if victim is None:
                    raise InsufficientMemoryError(
                        f"model {spec.name!r} does not fit in {device.id}'s budget of "
                        f"{budget / 2**30:.2f} GiB and every warm model there is in use",
                        field="model")
                self._evict_key(victim)

    def _lru_idle_on(self, device_id: str) -> PoolKey | None:
        with self._lock:
            for key, entry in self._entries.items():  # oldest first
                if device_id in key.devices and entry.in_use == 0:
                    return key
        return None

    # -- eviction
    def evict(self, name: str | None = None, device_id: str | None = None) -> list[PoolKey]:
        """Evict idle warm models (all, or those named / on a device); returns what went."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.in_use == 0
                    and (name is None or k.model == name)
                    and (device_id is None or device_id in k.devices)]
        for key in keys:
            self._evict_key(key)
        return keys

    def _evict_key(self, key: PoolKey) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return
        devices = entry.loaded.devices
        entry.loaded.release()
        del entry
        release_memory(devices)
        log.info("evicted %s", key)

    # -- display
    @contextlib.contextmanager
    def _progress(self, text: str) -> Iterator[None]:
        if not self._show_progress:
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(text):
            yield
