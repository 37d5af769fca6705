"""ModelPool: warm reuse, LRU eviction order, real memory release, leases, one load per key."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InsufficientMemoryError
from engine.hardware import discover
from engine.loading import DTYPE_BYTES, LoadedModel, load_model
from engine.pool import ModelPool
from engine.registry import Registry


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Registry:
    from conftest import tiny_entry, write_registry

    path = tmp_path_factory.mktemp("pool") / "r.yaml"
    return Registry.load(write_registry(path, {n: tiny_entry(tiny_model_dir)
                                               for n in ("a", "b", "c")}))


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, spec: Any, devices: Any, **kw: Any) -> LoadedModel:
        with self.lock:
            self.calls.append(spec.name)
        return load_model(spec, devices, **kw)


def _pool_for_two(three: Registry, loader: CountingLoader) -> ModelPool:
    cpu = discover().cpu
    one = three.get("a").parameters * DTYPE_BYTES["float32"]
    return ModelPool(budgets={cpu.id: 2 * one + one // 2}, loader=loader, show_progress=False)


def test_warm_model_is_reused_with_zero_load_time(three: Registry) -> None:
    loader = CountingLoader()
    pool = _pool_for_two(three, loader)
    cpu = discover().cpu
    first, t1 = pool.get(three.get("a"), [cpu])
    second, t2 = pool.get(three.get("a"), [cpu])
    assert first is second and t1 > 0 and t2 == 0.0 and loader.calls == ["a"]


def test_lru_eviction_order_and_memory_release(three: Registry) -> None:
    loader = CountingLoader()
    pool = _pool_for_two(three, loader)
    cpu = discover().cpu
    a, _ = pool.get(three.get("a"), [cpu])
    a_model = weakref.ref(a.model)
    pool.get(three.get("b"), [cpu])
    pool.get(three.get("a"), [cpu])          # a is now most recently used
    del a
    pool.get(three.get("c"), [cpu])          # evicts b, the least recently used
    assert pool.is_warm("a") and pool.is_warm("c") and not pool.is_warm("b")
    pool.get(three.get("b"), [cpu])          # evicts a
    assert [m.spec.name for m in pool.warm()] == ["c", "b"]
    gc.collect()
    assert a_model() is None, "the evicted model's tensors must be freed"
    assert loader.calls == ["a", "b", "c", "b"]


def test_leased_models_are_not_evicted(three: Registry) -> None:
    pool = _pool_for_two(three, CountingLoader())
    cpu = discover().cpu
    with (pool.use(three.get("a"), [cpu]), pool.use(three.get("b"), [cpu]),
          pytest.raises(InsufficientMemoryError, match="every warm model there is in use")):
        pool.get(three.get("c"), [cpu])
    pool.get(three.get("c"), [cpu])  # once released, there is room again
    assert pool.is_warm("c")


def test_concurrent_requests_for_a_cold_model_load_it_once(three: Registry) -> None:
    loader = CountingLoader()
    pool = _pool_for_two(three, loader)
    cpu = discover().cpu
    got: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: got.append(pool.get(three.get("a"), [cpu])[0]))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == ["a"] and len({id(m) for m in got}) == 1


def test_explicit_evict(three: Registry) -> None:
    pool = _pool_for_two(three, CountingLoader())
    cpu = discover().cpu
    pool.get(three.get("a"), [cpu])
    assert [k.model for k in pool.evict("a")] == ["a"] and not pool.is_warm("a")
    assert pool.used(cpu.id) == 0


def test_models_loading_at_once_in_threads_all_load(three: Registry) -> None:
    """transformers' loading is not thread-safe (concurrent loads leave tensors on the meta
    device); the engine's loads take turns, so every thread gets a working model."""
    cpu = discover().cpu
    errors: list[BaseException] = []
    loaded: list[LoadedModel] = []

    def load(name: str) -> None:
        try:
            loaded.append(load_model(three.get(name), [cpu]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in ("a", "b", "c") * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(loaded) == 6
