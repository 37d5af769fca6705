"""Scheduler: queue order, device slots, batching and joins. No torch, no models: milliseconds."""

from __future__ import annotations

import threading
import time

import pytest

from engine.scheduler import Assignment, Scheduler, SchedulerClosed, Ticket

CPU = ("cpu",)
G0, G1 = ("cuda:0",), ("cuda:1",)


def _ticket(model: str = "m", candidates: tuple[tuple[str, ...], ...] = (CPU,), *,
            batchable: bool = True, exclusive: bool = False, name: str = "") -> Ticket:
    return Ticket(model=model, candidates=candidates, batchable=batchable, exclusive=exclusive,
                  payload=name or model)


def _names(assignment: Assignment | None) -> list[str]:
    assert assignment is not None
    return [t.payload for t in assignment.tickets]


def test_arrival_order_and_one_slot_per_device() -> None:
    s = Scheduler(["cpu"], batch_size=1)
    for name in "abc":
        s.push(_ticket(name=name))
    first = s.next(timeout=0)
    assert _names(first) == ["a"]
    assert s.next(timeout=0) is None  # the only slot is held
    assert first is not None
    s.release(first)
    assert _names(s.next(timeout=0)) == ["b"]


def test_queued_jobs_of_one_model_start_as_one_batch() -> None:
    s = Scheduler(["cpu"], batch_size=3)
    for name in ("a1", "a2", "a3", "a4"):
        s.push(_ticket("a", name=name))
    assert _names(s.next(timeout=0)) == ["a1", "a2", "a3"]
    assert s.pending() == 1


def test_batching_off_with_batch_size_one_and_for_embeddings() -> None:
    s = Scheduler(["cpu"], batch_size=8, max_concurrent=4)
    s.push(_ticket("e", batchable=False, name="e1"))
    s.push(_ticket("e", batchable=False, name="e2"))
    assert _names(s.next(timeout=0)) == ["e1"]
    assert _names(s.next(timeout=0)) == ["e2"]


def test_batch_window_waits_for_mates_then_gives_up() -> None:
    now = [0.0]
    s = Scheduler(["cpu"], batch_size=4, batch_window_seconds=0.05,
                  clock=lambda: now[0])
    s.push(_ticket(name="a"))

    def later() -> None:
        time.sleep(0.01)
        s.push(_ticket(name="b"))
        now[0] = 1.0  # the window is over once b is in
        s.push(_ticket("other", name="x"))

    threading.Thread(target=later).start()
    assert _names(s.next(timeout=1)) == ["a", "b"]


def test_warm_device_set_is_preferred_then_the_least_loaded() -> None:
    warm = {("m", G1)}
    s = Scheduler(["cuda:0", "cuda:1"], batch_size=1, max_concurrent=2,
                  prefer=lambda model, devices: (model, devices) in warm)
    s.push(_ticket("m", (G0, G1), name="m1"))
    first = s.next(timeout=0)
    assert first is not None and first.devices == G1
    s.push(_ticket("n", (G0, G1), name="n1"))
    second = s.next(timeout=0)
    assert second is not None and second.devices == G0  # G1 already has one slot in use


def test_exclusive_work_takes_every_slot_of_its_devices() -> None:
    s = Scheduler(["cuda:0", "cuda:1"], batch_size=1, max_concurrent=4)
    s.push(_ticket("big", (("cuda:0", "cuda:1"),), exclusive=True, name="big"))
    s.push(_ticket("small", (G0,), name="small"))
    big = s.next(timeout=0)
    assert big is not None and big.devices == ("cuda:0", "cuda:1")
    assert s.next(timeout=0) is None
    s.release(big)
    assert s.slots_used("cuda:0") == 0
    assert _names(s.next(timeout=0)) == ["small"]


def test_join_takes_free_rows_but_never_overtakes_a_waiting_job() -> None:
    s = Scheduler(["cpu"], batch_size=4)
    s.push(_ticket("a", name="a1"))
    running = s.next(timeout=0)
    assert running is not None
    s.push(_ticket("a", name="a2"))
    assert [t.payload for t in s.join("a", CPU, 3)] == ["a2"]
    s.push(_ticket("b", name="b1"))  # waits: the cpu slot is taken by the running batch
    s.push(_ticket("a", name="a3"))
    assert s.join("a", CPU, 3) == []  # a3 may not pass b1
    assert s.join("b", CPU, 0) == []


def test_join_skips_jobs_for_other_devices() -> None:
    s = Scheduler(["cuda:0", "cuda:1"], batch_size=4, max_concurrent=2)
    s.push(_ticket("a", (G1,), name="on-g1"))
    assert s.join("a", G0, 2) == []
    assert s.pending() == 1


def test_remove_and_close() -> None:
    s = Scheduler(["cpu"], batch_size=1)
    t = _ticket(name="gone")
    s.push(t)
    assert s.remove(t) and not s.remove(t)
    s.push(_ticket(name="left"))
    assert [x.payload for x in s.close()] == ["left"]
    with pytest.raises(SchedulerClosed):
        s.next(timeout=0)
    with pytest.raises(SchedulerClosed):
        s.push(_ticket())


def test_a_waiting_dispatcher_wakes_on_release() -> None:
    s = Scheduler(["cpu"], batch_size=1)
    s.push(_ticket(name="a"))
    s.push(_ticket(name="b"))
    a = s.next(timeout=0)
    assert a is not None
    got: list[Assignment | None] = []
    waiter = threading.Thread(target=lambda: got.append(s.next(timeout=5)))
    waiter.start()
    time.sleep(0.01)
    s.release(a)
    waiter.join(2)
    assert _names(got[0]) == ["b"]


def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        Scheduler(["cpu"], max_concurrent=0)
    with pytest.raises(ValueError):
        Scheduler(["cpu"], batch_size=0)
