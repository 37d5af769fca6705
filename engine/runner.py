"""One long-lived runner thread per device: every job and batch on that device runs there.

torch keeps CUDA-graph and compiled state per thread, and a device's memory
and time are one budget, so a device gets exactly one thread that ever runs
models on it. The runner takes works from its inbox (the engine's dispatcher
puts them there), begins each (lease, load, warm-up: billed to no job), then
advances every active work one step at a time, in turn, so several works
share the device step by step and the runner's :class:`DeviceLedger` bills
each step to the jobs that did work in it. A failing step fails its work's
open jobs with a typed error, returns the memory once the exception is gone,
and the runner goes on. A work on several GPUs runs on the runner of its
first GPU (the scheduler gives it every slot of the others).

The runner also owns the fast path's decoders for the models it runs
(:meth:`DeviceRunner.decoder_for`): built and captured on this thread, kept on
the loaded model so that eviction drops them with it.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable

from engine.errors import DeviceOutOfMemoryError, ExecutionError
from engine.hardware import Device
from engine.loading import LoadedModel
from engine.metering import DeviceLedger, Meter
from engine.outcomes import JobFailure
from engine.tasks.static_decode import GraphBackend, StaticDecoder, default_backend
from engine.works import Work

log = logging.getLogger(__name__)


class DeviceRunner:
    """The thread that runs every work on one device (see the module docstring)."""

    def __init__(self, device: Device, *, meter: Meter, on_done: Callable[[Work], None],
                 graphs: GraphBackend | None = None):
        self.device = device
        self.ledger = DeviceLedger(meter)
        self.graphs = graphs or default_backend(device)
        self._on_done = on_done
        self._inbox: deque[Work] = deque()
        self._active: list[Work] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-runner-{device.id}",
                                        daemon=True)
        self._thread.start()

    @property
    def thread_name(self) -> str:
        """The runner thread's name."""
        return self._thread.name

    def submit(self, work: Work) -> None:
        """Hand a work to this device."""
        with self._cond:
            if self._stopping:
                raise RuntimeError(f"the runner of {self.device.id} is stopping")
            self._inbox.append(work)
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the works it has, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.ledger.shutdown()

    def active_count(self) -> int:
        """Works begun and not ended."""
        with self._cond:
            return len(self._active) + len(self._inbox)

    # ------------------------------------------------------------ fast path
    def decoder_for(self, loaded: LoadedModel, bucket: int) -> tuple[StaticDecoder | None, float]:
        """The model's idle fast-path decoder for a cache length, built now if new.

        Returns ``(decoder, warm-up seconds)``: the seconds are non-zero only
        when this call built (and captured) it. None when the model's fast
        path is off (its reason is kept on the model) or the decoder is busy
        with another job; the caller then decodes on the dynamic path.
        """
        if loaded.fast_path_error is not None:
            return None, 0.0
        decoder = loaded.fast_paths.get(bucket)
        if decoder is not None:
            return (None, 0.0) if decoder.busy else (decoder, 0.0)
        decoder = StaticDecoder(loaded, bucket, self.graphs)
        guard = JobFailure(loaded.devices)
        with guard:
            warmup = decoder.build()
        err = guard.settle()
        if err is None:
            loaded.fast_paths[bucket] = decoder
            return decoder, warmup
        decoder.release()
        if isinstance(err, DeviceOutOfMemoryError):
            log.warning("no memory to build the fast path of %s for %d positions now (%s); "
                        "this job decodes on the dynamic path", loaded.key, bucket, err.message)
        else:
            loaded.fast_path_error = err.message
            log.warning("the fast path of %s could not be built (%s); its jobs decode on the "
                        "dynamic path", loaded.key, err.message)
        return None, 0.0

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException as exc:  # a bug must still answer every job
            log.exception("the runner of %s stopped", self.device.id)
            with self._cond:
                left = self._active + list(self._inbox)
                self._active, self._inbox = [], deque()
            for work in left:
                work.fail(ExecutionError(f"internal error: {type(exc).__name__}: {exc}"))
                self._end(work)
            raise

    def _turn(self) -> bool:
        """Begin the works that arrived, then advance each active work by one step."""
        with self._cond:
            if not self._inbox and not self._active:
                self.ledger.idle()
                while not self._inbox and not self._stopping:
                    self._cond.wait()
                if not self._inbox:
                    return False
            arrived = list(self._inbox)
            self._inbox.clear()
        for work in arrived:
            self.ledger.idle()  # loading and warm-up are billed to no job
            if not self._advance(work, functools.partial(work.begin, self)):
                with self._cond:
                    self._active.append(work)
        for work in list(self._active):
            if self._advance(work, work.step):
                with self._cond:
                    self._active.remove(work)
        return True

    def _advance(self, work: Work, action: Callable[[], object]) -> bool:
        """Run one action of a work; True (and the work ended) when it is over or failed."""
        guard = JobFailure(work.devices)
        over = True
        with guard:
            over = bool(action())
        err = guard.settle()
        if err is not None:
            work.fail(err)
            over = True
        if over:
            self._end(work)
        else:
            work.flush()
        return over

    def _end(self, work: Work) -> None:
        """End a work: release its lease and slots first, then deliver its last answers."""
        guard = JobFailure(work.devices)
        with guard:
            work.end()
        if guard.settle() is not None:
            log.warning("ending a work on %s failed: %s", self.device.id, guard.error)
        self._on_done(work)
        work.flush()
