"""The scheduler: the job queue, device slots and the gather/join policy. No torch.

Jobs wait in arrival order as :class:`Ticket`\\ s. :meth:`Scheduler.next`
hands out :class:`Assignment`\\ s: the head ticket on the best free set of
devices among those that can run it (a set where its model is warm first,
then the least loaded), with queued tickets for the same model gathered into
its batch (up to ``batch_size``, waiting at most ``batch_window_seconds``).
Each device has ``max_concurrent`` slots; an assignment holds one slot on
each of its devices, or every slot when it is ``exclusive`` (a model spread
over several GPUs owns them). While a batch decodes, :meth:`Scheduler.join`
lets queued tickets for its model take rows that came free, but never ahead
of an earlier ticket for another model that is waiting for a device.

The runners call :meth:`Scheduler.release` when a work ends. All methods are
thread-safe; the scheduler never touches a model.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DeviceSet = tuple[str, ...]


@dataclass(eq=False)
class Ticket:
    """A queued job as the scheduler sees it."""

    model: str
    candidates: tuple[DeviceSet, ...]  # the device sets that can run it
    batchable: bool = True  # generation jobs of one model may share a decode batch
    exclusive: bool = False  # takes every slot of its devices
    payload: Any = None  # the engine's own record of the job
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class Assignment:
    """Tickets to start together on ``devices`` (the first is the head of the queue)."""

    devices: DeviceSet
    tickets: list[Ticket]
    exclusive: bool = False


class SchedulerClosed(Exception):
    """The scheduler was closed while a caller waited for an assignment."""


class Scheduler:
    """Arrival-order queue over device slots, with batching (see the module docstring).

    ``prefer(model, devices)`` says whether a model is warm on a device set;
    ``clock`` is injectable for tests.
    """

    def __init__(self, devices: Sequence[str], *, max_concurrent: int = 1, batch_size: int = 1,
                 batch_window_seconds: float = 0.0,
                 prefer: Callable[[str, DeviceSet], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.max_concurrent = max_concurrent
        self.batch_size = batch_size
        self.batch_window_seconds = batch_window_seconds
        self._used = {d: 0 for d in devices}
        self._prefer = prefer or (lambda model, devices: False)
        self._clock = clock
        self._queue: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closed = False

    # ------------------------------------------------------------ queue
    def push(self, ticket: Ticket) -> None:
        """Queue a ticket (raises :class:`SchedulerClosed` after :meth:`close`)."""
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            self._queue.append(ticket)
            self._cond.notify_all()

    def remove(self, ticket: Ticket) -> bool:
        """Take a ticket off the queue; False when it was not queued (started or gone)."""
        with self._cond:
            try:
                self._queue.remove(ticket)
            except ValueError:
                return False
            self._cond.notify_all()
            return True

    def pending(self) -> int:
        """Tickets waiting."""
        with self._cond:
            return len(self._queue)

    def slots_used(self, device: str) -> int:
        """Slots held on ``device`` now."""
        with self._cond:
            return self._used[device]

    def close(self) -> list[Ticket]:
        """Stop handing out work; returns the tickets that were still queued."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return left

    # ------------------------------------------------------------ assignments
    def next(self, timeout: float | None = None) -> Assignment | None:
        """Wait for the head ticket to get devices; None on timeout.

        Raises :class:`SchedulerClosed` once closed and nothing is queued.
        """
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._queue:
                    head = self._queue[0]
                    devices = self._free_set(head)
                    if devices is not None:
                        break
                elif self._closed:
                    raise SchedulerClosed("the scheduler is closed")
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            self._queue.popleft()
            self._hold(devices, head.exclusive)
            tickets = [head, *self._gather(head, devices)]
            return Assignment(devices, tickets, head.exclusive)

    def join(self, model: str, devices: DeviceSet, free_rows: int) -> list[Ticket]:
        """Queued tickets that take ``free_rows`` free rows of a running batch (in order)."""
        if free_rows <= 0:
            return []
        with self._cond:
            return self._take_mates(model, devices, free_rows, in_order=True)

    def release(self, assignment: Assignment) -> None:
        """A work ended: free its slots."""
        with self._cond:
            for d in assignment.devices:
                self._used[d] = 0 if assignment.exclusive else self._used[d] - 1
            self._cond.notify_all()

    # ------------------------------------------------------------ policy
    def _fits(self, devices: DeviceSet, exclusive: bool) -> bool:
        limit = 1 if exclusive else self.max_concurrent
        return all(self._used[d] < limit for d in devices)

    def _free_set(self, ticket: Ticket) -> DeviceSet | None:
        sets = [s for s in ticket.candidates if self._fits(s, ticket.exclusive)]
        if not sets:
            return None
        return min(sets, key=lambda s: (0 if self._prefer(ticket.model, s) else 1,
                                        sum(self._used[d] for d in s)))

    def _hold(self, devices: DeviceSet, exclusive: bool) -> None:
        for d in devices:
            self._used[d] = self.max_concurrent if exclusive else self._used[d] + 1

    def _gather(self, head: Ticket, devices: DeviceSet) -> list[Ticket]:
        """Mates for ``head``'s batch, waiting up to the batch window for more."""
        if self.batch_size <= 1 or not head.batchable:
            return []
        deadline = self._clock() + self.batch_window_seconds
        mates: list[Ticket] = []
        while True:
            mates += self._take_mates(head.model, devices, self.batch_size - 1 - len(mates),
                                      in_order=False)
            left = deadline - self._clock()
            if len(mates) + 1 >= self.batch_size or left <= 0 or self._closed:
                return mates
            self._cond.wait(left)

    def _take_mates(self, model: str, devices: DeviceSet, limit: int, *,
                    in_order: bool) -> list[Ticket]:
        """Up to ``limit`` queued batchable tickets for ``model`` that can run on ``devices``.

        ``in_order`` stops at the first queued ticket that cannot come along and
        is itself waiting for a device. Call with the condition held.
        """
        mates: list[Ticket] = []
        for ticket in list(self._queue):
            if len(mates) >= limit:
                break
            if ticket.batchable and ticket.model == model and devices in ticket.candidates:
                self._queue.remove(ticket)
                mates.append(ticket)
            elif in_order and self._free_set(ticket) is None:
                break
        return mates
