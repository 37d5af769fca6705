"""Meter: one measurement window per job (DESIGN.md "Metering").

A window brackets a job: monotonic wall time, GPU-held seconds (bracketed by
CUDA synchronisation, summed over the GPUs held), CUDA-event time, NVML
energy-counter deltas (absent where the GPU has no counter), peak memory, and
a timestamp per generated token taken inside the decode loop.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.hardware import Device, Nvml

RSS_SAMPLE_SECONDS = 0.005


@dataclass(frozen=True)
class Measurement:
    """What one window measured."""

    wall_seconds: float
    gpu_seconds: float
    gpu_busy_seconds: float | None
    energy_joules: float | None
    peak_memory_bytes: int | None
    token_times: tuple[float, ...]  # seconds since the window began, one per generated token
    device: str
    gpu_count: int
    method: str

    @property
    def ttft_seconds(self) -> float | None:
        """Time from the window's start to the first generated token."""
        return self.token_times[0] if self.token_times else None

    @property
    def inter_token_seconds(self) -> list[float]:
        """Gaps between consecutive generated tokens."""
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def tpot_seconds(self) -> float | None:
        """Mean time per output token after the first (``None`` with fewer than two tokens)."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


def share_by_work(total: float, work: Sequence[float]) -> list[float]:
    """Split ``total`` among jobs in proportion to their token work, adding up to ``total``.

    Jobs with no work get nothing unless every job has none (then equal shares).
    The last share takes the rounding remainder so nothing is billed twice.
    """
    if not work:
        return []
    weights = [max(0.0, float(w)) for w in work]
    mass = math.fsum(weights)
    if mass == 0.0:
        weights, mass = [1.0] * len(work), float(len(work))
    shares = [total * w / mass for w in weights[:-1]]
    shares.append(max(0.0, total - math.fsum(shares)))
    return shares


class _RssSampler:
    """Samples this process's resident memory in a thread; reports the growth over the start."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        return self._peak - self._start


class CudaBackend:
    """The CUDA calls a window makes; tests on machines without CUDA pass a fake."""

    def synchronize(self, index: int) -> None:
        """Wait for every queued kernel on GPU ``index``."""
        import torch

        torch.cuda.synchronize(index)

    def reset_peak(self, index: int) -> None:
        """Restart the peak-allocation counter of GPU ``index``."""
        import torch

        torch.cuda.reset_peak_memory_stats(index)

    def peak_allocated(self, index: int) -> int:
        """Most bytes allocated on GPU ``index`` since the last reset."""
        import torch

        return int(torch.cuda.max_memory_allocated(index))

    def record_event(self, index: int) -> Any:
        """A timing event recorded now on GPU ``index``'s current stream."""
        import torch

        with torch.cuda.device(index):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return event

    def elapsed_seconds(self, begin: Any, end: Any) -> float:
        """GPU time between two recorded (and completed) events."""
        return float(begin.elapsed_time(end)) / 1000.0


class MeterWindow:
    """One job's measurement window; start it, mark tokens, stop it."""

    def __init__(self, devices: Sequence[Device], nvml: Nvml | None,
                 cuda: CudaBackend | None = None, *, track_memory: bool = True):
        self.devices = tuple(devices)
        self._track_memory = track_memory
        self._cuda = cuda or CudaBackend()
        self.gpus = tuple(d for d in self.devices if d.kind == "cuda")
        self._nvml = nvml
        self._tokens: list[float] = []
        self._t0 = 0.0
        self._energy0: list[int | None] = []
        self._begin_events: list[Any] = []
        self._rss: _RssSampler | None = None
        self._result: Measurement | None = None

    @property
    def elapsed(self) -> float:
        """Seconds since the window started."""
        return time.perf_counter() - self._t0

    def start(self) -> MeterWindow:
        """Open the window (synchronising the GPUs first so earlier work is not counted)."""
        if self.gpus:
            for gpu in self.gpus:
                self._cuda.synchronize(_index(gpu))
                self._cuda.reset_peak(_index(gpu))
            self._energy0 = [self._energy(g) for g in self.gpus]
            self._begin_events = [self._cuda.record_event(_index(g)) for g in self.gpus]
        elif self._track_memory:
            self._rss = _RssSampler()
        self._t0 = time.perf_counter()
        return self

    @property
    def token_count(self) -> int:
        """Tokens marked so far."""
        return len(self._tokens)

    def token(self, count: int = 1) -> None:
        """Mark that ``count`` tokens became final now (called from the decode loop)."""
        now = time.perf_counter() - self._t0
        self._tokens.extend([now] * count)

    def stop(self) -> Measurement:
        """Close the window (after CUDA synchronisation) and return the measurement."""
        if self._result is not None:
            return self._result
        busy: float | None = None
        energy: float | None = None
        peak: int | None = None
        if self.gpus:
            ends = [self._cuda.record_event(_index(g)) for g in self.gpus]
            for gpu in self.gpus:
                self._cuda.synchronize(_index(gpu))
            wall = time.perf_counter() - self._t0
            busy = math.fsum(self._cuda.elapsed_seconds(b, e)
                             for b, e in zip(self._begin_events, ends, strict=True))
            energy = self._energy_delta()
            peak = sum(self._cuda.peak_allocated(_index(g)) for g in self.gpus)
            method = "cuda-sync-wall" + "+cuda-events" + (
                "+nvml-energy" if energy is not None else "") + "+cuda-max-allocated"
            device = ",".join(g.id for g in self.gpus)
        else:
            wall = time.perf_counter() - self._t0
            peak = self._rss.stop() if self._rss is not None else None
            method = "cpu-wall+rss-growth" if self._track_memory else "cpu-wall"
            device = "cpu"
        self._result = Measurement(
            wall_seconds=wall, gpu_seconds=wall * len(self.gpus), gpu_busy_seconds=busy,
            energy_joules=energy, peak_memory_bytes=peak, token_times=tuple(self._tokens),
            device=device, gpu_count=len(self.gpus), method=method)
        return self._result

    def _energy(self, gpu: Device) -> int | None:
        if self._nvml is None or not gpu.energy_supported or gpu.nvml_index is None:
            return None
        return self._nvml.energy_millijoules(gpu.nvml_index)

    def _energy_delta(self) -> float | None:
        ends = [self._energy(g) for g in self.gpus]
        total_mj = 0
        for begin, end in zip(self._energy0, ends, strict=True):
            if begin is None or end is None:
                return None
            total_mj += end - begin
        return total_mj / 1000.0 if self._energy0 else None

    def __enter__(self) -> MeterWindow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _index(gpu: Device) -> int:
    assert gpu.index is not None, f"{gpu.id} has no CUDA index"
    return gpu.index


@dataclass
class Meter:
    """Opens measurement windows on devices; holds the NVML session used for energy."""

    nvml: Nvml | None = None
    cuda: CudaBackend | None = None
    windows_opened: int = field(default=0, init=False)

    def window(self, devices: Sequence[Device]) -> MeterWindow:
        """A new, not yet started, window over ``devices``."""
        self.windows_opened += 1
        return MeterWindow(devices, self.nvml, self.cuda)

    def clock(self) -> MeterWindow:
        """A new, not yet started, window over no device: one job's wall time and token stamps
        while the devices' windows are shared with batch mates (see :class:`BatchLedger`)."""
        return MeterWindow([], None, track_memory=False)


@dataclass
class JobShare:
    """A job's part of the device windows it shared with batch mates."""

    gpu_seconds: float = 0.0
    gpu_busy_seconds: float | None = 0.0
    energy_joules: float | None = 0.0
    peak_memory_bytes: int | None = None
    device: str = "cpu"
    gpu_count: int = 0
    method: str = ""
    peak_batch: int = 0  # the most jobs that shared one window with this one

    @classmethod
    def alone(cls, measured: Measurement) -> JobShare:
        """The share of a job that held its window alone: all of it."""
        share = cls()
        share.add(measured, measured.gpu_seconds, measured.gpu_busy_seconds,
                  measured.energy_joules, 1)
        return share

    def add(self, measured: Measurement, gpu: float, busy: float | None,
            energy: float | None, members: int) -> None:
        """Add this job's share of one closed window."""
        self.gpu_seconds += gpu
        self.gpu_busy_seconds = None if busy is None or self.gpu_busy_seconds is None \
            else self.gpu_busy_seconds + busy
        self.energy_joules = None if energy is None or self.energy_joules is None \
            else self.energy_joules + energy
        if measured.peak_memory_bytes is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, measured.peak_memory_bytes)
        self.device, self.gpu_count, self.method = (measured.device, measured.gpu_count,
                                                     measured.method)
        self.peak_batch = max(self.peak_batch, members)


@dataclass
class _Member:
    clock: MeterWindow
    pending: int  # prompt tokens not yet billed to a window
    counted: int  # the clock's generated tokens already billed
    share: JobShare = field(default_factory=JobShare)


class BatchLedger:
    """Device windows over a batch whose members change between decode steps.

    Every join or leave closes the open window and opens the next, so each
    window has a fixed set of members; its GPU seconds, CUDA-busy seconds and
    energy are shared among them by the token work each did inside it (prompt
    tokens in the window that prefilled them, then one per generated token,
    read from the job's own clock window). Summed over all jobs, the shares
    equal the time the devices were held: nothing is billed twice.
    """

    def __init__(self, meter: Meter, devices: Sequence[Device]):
        self._meter = meter
        self._devices = tuple(devices)
        self._window: MeterWindow | None = None
        self._members: dict[Hashable, _Member] = {}

    def join(self, key: Hashable, clock: MeterWindow, prompt_tokens: int) -> None:
        """Add a job (its clock window already started) before its prefill runs."""
        self.join_many([(key, clock, prompt_tokens)])

    def join_many(self, joiners: Iterable[tuple[Hashable, MeterWindow, int]]) -> None:
        """Add several jobs at one step boundary."""
        self._close()
        for key, clock, prompt_tokens in joiners:
            self._members[key] = _Member(clock=clock, pending=prompt_tokens,
                                         counted=clock.token_count)
        self._open()

    def leave(self, keys: Iterable[Hashable]) -> dict[Hashable, JobShare]:
        """Remove jobs that finished at this step boundary; returns their shares."""
        keys = [k for k in keys if k in self._members]
        if not keys:
            return {}
        self._close()
        out = {k: self._members.pop(k).share for k in keys}
        self._open()
        return out

    def close(self) -> dict[Hashable, JobShare]:
        """Close the open window and remove every member; returns their shares."""
        self._close()
        out = {k: m.share for k, m in self._members.items()}
        self._members.clear()
        return out

    def _open(self) -> None:
        if self._members:
            self._window = self._meter.window(self._devices).start()

    def _close(self) -> None:
        window, self._window = self._window, None
        if window is None:
            return
        measured = window.stop()
        members = list(self._members.values())
        work = []
        for m in members:
            now = m.clock.token_count
            work.append(m.pending + now - m.counted)
            m.pending, m.counted = 0, now
        gpu = share_by_work(measured.gpu_seconds, work)
        busy = share_by_work(measured.gpu_busy_seconds, work) \
            if measured.gpu_busy_seconds is not None else [None] * len(work)
        energy = share_by_work(measured.energy_joules, work) \
            if measured.energy_joules is not None else [None] * len(work)
        for k, m in enumerate(members):
            m.share.add(measured, gpu[k], busy[k], energy[k], len(members))
