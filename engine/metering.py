"""Meter: measurement windows and the per-device step ledger (DESIGN.md "Metering").

A :class:`MeterWindow` brackets one job alone: monotonic wall time, GPU-held seconds
(bracketed by CUDA synchronisation, summed over the GPUs held), CUDA-event time, NVML
energy-counter deltas (absent where the GPU has no counter), peak memory, and a timestamp
per generated token taken inside the decode loop.

A :class:`DeviceLedger` meters a device's runner thread step by step when several jobs
share it: every interval of held time, its device time, its energy and its peak memory
are billed once, shared among the jobs of the step that closed it by their token work.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from engine.hardware import Device, Nvml

log = logging.getLogger(__name__)

RSS_SAMPLE_SECONDS = 0.005
ENERGY_POLL_SECONDS = 0.02


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
    # Seconds from the last token to the window's end, spent finishing the output (the
    # generation's activation commitment pass, the text); None unless marked finalizing.
    finalize_seconds: float | None = None

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

    def allocated(self, index: int) -> int:
        """Bytes allocated by tensors on GPU ``index`` now."""
        import torch

        return int(torch.cuda.memory_allocated(index))

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
        self._finalize_at: float | None = None

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

    def finalizing(self) -> None:
        """Mark that the decode is over and the output is being finished (metered apart)."""
        if self._finalize_at is None:
            self._finalize_at = time.perf_counter() - self._t0

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
            device=device, gpu_count=len(self.gpus), method=method,
            finalize_seconds=None if self._finalize_at is None
            else max(0.0, wall - (self._tokens[-1] if self._tokens else self._finalize_at)))
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
        """A new, not yet started, window over no device: one job's wall time and token stamps,
        while its device time is billed step by step (see :class:`DeviceLedger`)."""
        return MeterWindow([], None, track_memory=False)

    def ledger(self, *, clock: Callable[[], float] = time.perf_counter,
               energy_poll_seconds: float = ENERGY_POLL_SECONDS,
               rss_poll_seconds: float = RSS_SAMPLE_SECONDS) -> DeviceLedger:
        """A new :class:`DeviceLedger` for one runner thread, over this meter's NVML and CUDA."""
        return DeviceLedger(self, clock=clock, energy_poll_seconds=energy_poll_seconds,
                            rss_poll_seconds=rss_poll_seconds)


@dataclass
class JobShare:
    """A job's part of the device time it shared with other jobs (see :class:`DeviceLedger`)."""

    gpu_seconds: float = 0.0
    gpu_busy_seconds: float | None = 0.0
    energy_joules: float | None = 0.0
    peak_memory_bytes: int | None = None
    device: str = "cpu"
    gpu_count: int = 0
    method: str = ""
    peak_batch: int = 0  # the most jobs that shared one window (or step) with this one
    energy_estimated: bool = False  # energy extrapolated, or the job was shorter than the
    #                                 counter's update period (see DeviceLedger)


GPU_METHOD = "cuda-sync-wall+cuda-events-per-step"
GPU_PEAK_METHOD = "+cuda-peak-above-resident"
CPU_METHOD = "cpu-wall+rss-growth"
_KEEP_POINTS = 16  # change points always kept per GPU (for the extrapolation slope)
_CATCH_UP = 0.5  # share of its extrapolated energy an interval gets while catching up
_PERIOD_HISTORY = 32  # counter update periods kept per GPU for the median


@dataclass
class StepRecord:
    """One metered step: set ``work`` inside the ``with`` block; the rest is filled on exit."""

    devices: tuple[Device, ...]
    work: Mapping[Any, float] = field(default_factory=dict)  # job key -> its token work
    interval_seconds: float | None = None  # the held wall interval this step closed and billed
    busy_seconds: float | None = None  # this step's CUDA-event device seconds, summed over GPUs


@dataclass
class LedgerTotals:
    """What a ledger has billed so far, summed over every job (for checks and reports)."""

    held_seconds: float = 0.0  # wall seconds of the billed intervals
    gpu_seconds: float = 0.0  # the same, times each interval's GPU count
    gpu_busy_seconds: float = 0.0
    energy_joules: float = 0.0  # of the intervals whose energy is settled
    steps: int = 0


@dataclass
class _Job:
    key: Hashable
    gpus: tuple[int, ...]  # CUDA indices; empty for a CPU job
    baseline: dict[int, int]  # CUDA index -> bytes allocated when the job opened
    share: JobShare
    above: dict[int, int] = field(default_factory=dict)  # CUDA index -> most bytes above baseline
    rss_base: int = 0
    rss_peak: int = 0
    first: float | None = None  # start of the first interval billed to the job
    last: float | None = None  # end of the last one
    tracks: set[int] = field(default_factory=set)  # NVML indices its energy came from
    pending: int = 0  # intervals whose energy is not settled yet


@dataclass
class _Interval:
    start: float
    end: float
    tracks: tuple[int, ...]  # NVML indices
    members: list[_Job]
    work: list[float]


@dataclass(frozen=True)
class _Boundary:
    """A settled value of one GPU's energy counter at an interval boundary."""

    time: float
    value: float  # millijoules
    rough: bool  # extrapolated far, or with no update period seen
    ahead: bool  # extrapolated past the change points: may lie above the counter's curve


class _EnergyTrack:
    """One GPU's NVML total-energy counter during one hold: the change points of the counter.

    The counter (millijoules) moves in jumps every update period of the driver (~10–100 ms),
    so a reading is the energy up to the last update, not up to now. The energy at time
    ``t`` is taken as the counter interpolated linearly between the change points (the
    moments a new value was first seen) around ``t``; past the last one (or before the
    first) it is extrapolated (:meth:`rate`).
    """

    def __init__(self, periods: deque[float]) -> None:
        self.first: tuple[float, int] | None = None  # the first reading of the hold
        self.points: list[tuple[float, int]] = []  # (time first seen, counter) per change
        self.periods = periods  # observed update periods of this GPU, kept across holds
        self.power_mj_per_s: float | None = None
        self.fixed: _Boundary | None = None  # the last settled boundary

    def observe(self, t: float, value: int) -> None:
        """A reading of ``value`` at ``t``: a change point when the value is new. (The
        counter moved somewhere since the previous reading, at most an update period ago;
        placing every change at the reading that saw it shifts the whole curve by about
        the same lag, which differences of the curve cancel.)"""
        if self.first is None or (self.points and value < self.points[-1][1]) \
                or value < self.first[1]:  # first reading, or the driver restarted the counter
            self.first, self.points, self.fixed = (t, value), [], None
            return
        last = self.points[-1][1] if self.points else self.first[1]
        if value == last:
            return
        if self.points and t <= self.points[-1][0]:  # two moves seen at one instant
            self.points[-1] = (self.points[-1][0], value)
            return
        if self.points:
            self.periods.append(t - self.points[-1][0])
        self.points.append((t, value))

    def forget_before(self, t: float) -> None:
        """Drop the change points not needed for values at ``t`` and later."""
        k = bisect.bisect_right(self.points, t, key=lambda p: p[0]) - 1
        k = min(k, len(self.points) - _KEEP_POINTS)
        if k > 0:
            del self.points[:k]

    def period(self) -> float | None:
        """The counter's observed update period (median of the recent ones)."""
        return statistics.median(self.periods) if self.periods else None

    def horizon(self) -> float:
        """Up to this time the counter is known by interpolation."""
        return self.points[-1][0] if len(self.points) >= 2 else -math.inf

    def value_at(self, t: float) -> tuple[float, bool, bool] | None:
        """The counter at ``t`` (millijoules; None when unknown), whether it is rough
        (extrapolated farther than two update periods, or with no period seen) and whether
        it was extrapolated at all."""
        if self.first is None:
            return None
        t = max(t, self.first[0])
        pts = self.points
        if len(pts) >= 2 and pts[0][0] <= t <= pts[-1][0]:
            k = max(1, bisect.bisect_left(pts, t, key=lambda p: p[0]))
            (t0, c0), (t1, c1) = pts[k - 1], pts[k]
            return c0 + (c1 - c0) * (t - t0) / (t1 - t0), False, False
        if pts and t < pts[0][0]:
            rate, gap = self.rate(backward=True), pts[0][0] - t
            value = None if rate is None else pts[0][1] - rate * gap
        else:
            (ta, ca) = pts[-1] if pts else self.first
            rate, gap = self.rate(backward=False), t - ta
            value = None if rate is None else ca + rate * gap
        period = self.period()
        return None if value is None else (value, period is None or gap > 2 * period, True)

    def rate(self, *, backward: bool) -> float | None:
        """Millijoules per second to extrapolate with, past the last change point (or before
        the first): the slope of the change points there, over at least three update
        periods; short of that, NVML's power reading; short of that, the slope there is."""
        pts = self.points if not backward else self.points[::-1]
        if len(pts) < 2:
            return self.power_mj_per_s
        period = self.period()
        k = len(pts) - 2
        if period is not None:
            while k > 0 and abs(pts[-1][0] - pts[k][0]) < 3 * period:
                k -= 1
        (t0, c0), (t1, c1) = pts[k], pts[-1]
        if (period is None or abs(t1 - t0) < 3 * period) and self.power_mj_per_s is not None:
            return self.power_mj_per_s
        return (c1 - c0) / (t1 - t0) if t1 != t0 else self.power_mj_per_s

    def settle(self, start: float, end: float) -> tuple[float, bool, _Boundary] | None:
        """The energy (millijoules) from ``start`` to ``end``, whether it is rough, and the
        boundary at ``end`` to commit (None when unknown). Boundaries are settled in time
        order and never revised, so consecutive intervals add up to the counter's rise over
        them. A value extrapolated past the change points may prove too high once later
        points come; the intervals after it then get at least half their extrapolated
        energy (never 0 J) until the counter's curve catches up."""
        fixed = self.fixed
        if fixed is not None and fixed.time == start:
            begin = fixed
        else:
            got = self.value_at(start)
            if got is None:
                return None
            begin = _Boundary(start, got[0], got[1], got[2])
            if fixed is not None and fixed.value > begin.value:
                begin = _Boundary(start, fixed.value, begin.rough, True)
        got = self.value_at(end)
        if got is None:
            return None
        value, rough, ahead = got
        if begin.ahead:
            rate = self.rate(backward=False) or 0.0
            floor = begin.value + _CATCH_UP * rate * (end - start)
            if value < floor:
                value, ahead = floor, True
        value = max(value, begin.value)
        return value - begin.value, begin.rough or rough, _Boundary(end, value, rough, ahead)


class _Poller:
    """Calls ``fn`` every ``seconds`` in a daemon thread until stopped."""

    def __init__(self, fn: Callable[[], None], seconds: float, name: str) -> None:
        self._fn = fn
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._seconds):
            try:
                self._fn()
            except Exception:  # a sampler must not die silently mid-hold, nor kill the runner
                log.exception("%s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Step(AbstractContextManager[StepRecord]):
    def __init__(self, ledger: DeviceLedger, devices: Sequence[Device]) -> None:
        self._ledger = ledger
        self._record = StepRecord(devices=tuple(devices))

    def __enter__(self) -> StepRecord:
        self._ledger._begin(self._record)
        return self._record

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self._ledger._end(self._record)
            return
        try:  # the step failed: bill what it held if it can, but keep the step's own error
            self._ledger._end(self._record)
        except Exception as closing:
            log.warning("could not meter a failed step: %s: %s", type(closing).__name__, closing)


class DeviceLedger:
    """Meters one device runner's steps and bills every held second once (DESIGN.md
    "Metering"). Used from the runner thread only; its samplers are its own threads.

    The runner opens a job (:meth:`open`), brackets each forward pass with :meth:`step`
    (a prefill, a decode step or a whole embedding of one or several jobs) and names the
    token work each job did in it, closes the job when it leaves (:meth:`close`) and calls
    :meth:`idle` when it has nothing to run. The ledger is *held* from the start of the
    first step after it was idle to the next :meth:`idle`; the held time is cut into
    intervals at each step's end, and each interval (the host time since the previous step
    ended, plus this step) is shared among the jobs of the step that closed it, in
    proportion to their work (:func:`share_by_work`):

    - ``gpu_seconds``: the interval's wall seconds (after CUDA synchronisation) times the
      step's GPU count. Summed over the jobs: the held time times the GPUs, exactly.
    - ``gpu_busy_seconds``: device time of the step, from CUDA events recorded on each of
      its GPUs' current stream at the step's start and end, summed over the GPUs: the span
      of the forward pass on the device, launch gaps and waits inside the step included,
      host time between steps excluded.
    - ``energy_joules``: NVML's total-energy counter, sampled every ``energy_poll_seconds``
      by a thread while held (and at every step's end), interpolated between its change
      points at the interval's ends (see :class:`_EnergyTrack`). Each GPU's interval
      boundaries are settled in order and never revised, so the shares add up to the
      counter's interpolated rise over the held time. A job gets ``energy_estimated`` when
      its span (first interval's start to last interval's end) was shorter than the
      counter's observed update period, or when some of its energy was extrapolated more
      than two update periods away from the counter's change points (a stalled counter)
      or before any period was seen. ``None`` where a GPU of the step has no readable
      counter; never 0 J for work done on a GPU that has one.
    - ``peak_memory_bytes``: after each step the CUDA peak allocation of each GPU is read
      and reset (safe: the runner is the device's only user); a job's peak is the most any
      of its steps reached above what was allocated when the job opened (resident weights,
      other jobs' caches), never negative, summed over its GPUs. On the CPU: the process's
      resident memory, sampled by a thread while held, its most during the job's life
      above its value when the job opened.

    A step that names no work leaves its interval open: it is billed with the next step.
    The method string of a GPU job is ``GPU_METHOD`` + ``"+nvml-energy"`` (or
    ``"+nvml-energy-interpolated"`` when estimated, or nothing without a counter) +
    ``GPU_PEAK_METHOD``; of a CPU job ``CPU_METHOD``.
    """

    def __init__(self, meter: Meter, *, clock: Callable[[], float] = time.perf_counter,
                 energy_poll_seconds: float = ENERGY_POLL_SECONDS,
                 rss_poll_seconds: float = RSS_SAMPLE_SECONDS) -> None:
        """``clock``: monotonic seconds (tests inject a fake one). ``energy_poll_seconds`` /
        ``rss_poll_seconds``: sampling periods of the threads; 0 means no thread (energy is
        then read at each step's end and by :meth:`sample_now`, memory at each boundary)."""
        self._meter = meter
        self._cuda = meter.cuda or CudaBackend()
        self._nvml = meter.nvml
        self._clock = clock
        self._energy_poll = energy_poll_seconds
        self._rss_poll = rss_poll_seconds
        self._jobs: dict[Hashable, _Job] = {}
        self._boundary: float | None = None  # end of the last closed interval; None when idle
        self._step: StepRecord | None = None
        self._begin_events: list[tuple[int, Any]] = []
        self._carry_busy = 0.0
        self._carry_peaks: dict[int, int] = {}
        self._lock = threading.Lock()  # guards the energy tracks and the RSS maximum
        self._tracks: dict[int, _EnergyTrack] = {}
        self._periods: dict[int, deque[float]] = {}
        self._pending: deque[_Interval] = deque()
        self._energy_poller: _Poller | None = None
        self._rss_poller: _Poller | None = None
        self._process: Any = None
        self._rss_max = 0
        self.totals = LedgerTotals()

    # -- the runner's calls

    @property
    def held(self) -> bool:
        """Whether the ledger is holding its devices (between a step and :meth:`idle`)."""
        return self._boundary is not None

    @property
    def open_jobs(self) -> tuple[Hashable, ...]:
        """Keys of the jobs opened and not closed."""
        return tuple(self._jobs)

    def open(self, key: Hashable, devices: Sequence[Device]) -> None:
        """A job starts on ``devices``: record its memory baseline (bytes allocated on each
        of its GPUs; on the CPU the process's resident memory). Holding starts with a
        step, not here."""
        if key in self._jobs:
            raise KeyError(f"job {key!r} is already open")
        gpus = tuple(_index(d) for d in devices if d.kind == "cuda")
        if gpus:
            energy = all(self._energy_capable(d) for d in devices if d.kind == "cuda")
            share = JobShare(gpu_busy_seconds=0.0, energy_joules=0.0 if energy else None,
                             peak_memory_bytes=0, gpu_count=len(gpus),
                             device=",".join(d.id for d in devices if d.kind == "cuda"))
            job = _Job(key, gpus, {i: self._cuda.allocated(i) for i in gpus}, share)
        else:
            self._fold_rss()
            rss = self._rss_now()
            share = JobShare(gpu_busy_seconds=None, energy_joules=None, peak_memory_bytes=0,
                             device="cpu", gpu_count=0, method=CPU_METHOD)
            job = _Job(key, (), {}, share, rss_base=rss, rss_peak=rss)
        self._jobs[key] = job

    def step(self, devices: Sequence[Device]) -> AbstractContextManager[StepRecord]:
        """Bracket one step of one work on ``devices``; set ``record.work`` inside::

            with ledger.step(loaded.devices) as record:
                logits = model(...)
                record.work = {key: tokens for key, tokens in ...}
        """
        return _Step(self, devices)

    def close(self, key: Hashable) -> JobShare:
        """The job left: settle its energy and return its accumulated share."""
        job = self._jobs[key]
        if not job.gpus:
            self._fold_rss()
        del self._jobs[key]
        if job.pending:
            if self.held:
                self.sample_now()
            self._settle(force=True)
        if job.gpus:
            share = job.share
            share.peak_memory_bytes = sum(max(0, job.above.get(i, 0)) for i in job.gpus)
            if share.energy_joules is not None and job.first is not None:
                periods = [self._period(i) for i in job.tracks]
                if None in periods or (job.last or 0.0) - job.first < max(
                        p for p in periods if p is not None):
                    share.energy_estimated = True
            energy = "" if share.energy_joules is None else (
                "+nvml-energy-interpolated" if share.energy_estimated else "+nvml-energy")
            share.method = GPU_METHOD + energy + GPU_PEAK_METHOD
        else:
            job.share.peak_memory_bytes = max(0, job.rss_peak - job.rss_base)
        return job.share

    def idle(self) -> None:
        """Nothing to run: stop holding (the time until the next step is billed to nobody),
        settle the energy of every interval and stop the samplers."""
        if self._step is not None:
            raise RuntimeError("idle() inside a step")
        if not self.held:
            return
        self.sample_now()
        self._settle(force=True)
        if self._rss_poller is not None:
            self._fold_rss()
        self._stop_pollers()
        self._boundary = None
        self._carry_busy, self._carry_peaks = 0.0, {}

    def shutdown(self) -> dict[Hashable, JobShare]:
        """Stop for good: :meth:`idle`, then close every job still open (their shares)."""
        try:
            self.idle()
        finally:
            self._stop_pollers()
        return {key: self.close(key) for key in list(self._jobs)}

    def sample_now(self) -> None:
        """Read every tracked GPU's energy counter now (the poller does this periodically;
        without one, call it to sample more often than at each step's end). Idle: nothing."""
        if not self.held:
            return
        with self._lock:
            indices = list(self._tracks)
        for i in indices:
            self._observe(i)

    def __enter__(self) -> DeviceLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- steps

    def _begin(self, record: StepRecord) -> None:
        if self._step is not None:
            raise RuntimeError("steps do not nest")
        gpus = [_index(d) for d in record.devices if d.kind == "cuda"]
        if not self.held:
            for i in gpus:  # work queued before the hold (a model load) is not billed
                self._cuda.synchronize(i)
                self._cuda.reset_peak(i)
            with self._lock:
                self._tracks = {}
            self._boundary = self._clock()
        for d in record.devices:
            if d.kind == "cuda" and self._energy_capable(d):
                assert d.nvml_index is not None
                self._track(d.nvml_index)
        if any(d.kind != "cuda" for d in record.devices):
            self._start_rss()
        self._begin_events = [(i, self._cuda.record_event(i)) for i in gpus]
        self._step = record

    def _end(self, record: StepRecord) -> None:
        begins, self._begin_events, self._step = self._begin_events, [], None
        ends = [self._cuda.record_event(i) for i, _ in begins]
        for i, _ in begins:
            self._cuda.synchronize(i)
        now = self._clock()
        device = math.fsum(
            self._cuda.elapsed_seconds(b, e) for (_, b), e in zip(begins, ends, strict=True))
        record.busy_seconds = device if begins else None
        busy = self._carry_busy + device
        peaks = dict(self._carry_peaks)
        for i, _ in begins:
            peaks[i] = max(peaks.get(i, 0), self._cuda.peak_allocated(i))
            self._cuda.reset_peak(i)
        self.sample_now()
        unknown = [k for k in record.work if k not in self._jobs]
        if unknown or not record.work:
            self._carry_busy, self._carry_peaks = busy, peaks
            if unknown:
                raise KeyError(f"step work names jobs that are not open: {unknown!r}")
            return
        self._carry_busy, self._carry_peaks = 0.0, {}
        assert self._boundary is not None
        start, self._boundary = self._boundary, now
        interval = now - start
        gpus = [i for i, _ in begins]
        members = [self._jobs[k] for k in record.work]
        work = [float(record.work[k]) for k in record.work]
        record.interval_seconds = interval
        gpu_shares = share_by_work(interval * len(gpus), work)
        busy_shares = share_by_work(busy, work)
        if len(gpus) < len(record.devices):
            self._fold_rss()
        for job, gpu, dev in zip(members, gpu_shares, busy_shares, strict=True):
            share = job.share
            share.gpu_seconds += gpu
            if share.gpu_busy_seconds is not None:
                share.gpu_busy_seconds += dev
            share.peak_batch = max(share.peak_batch, len(members))
            job.first = start if job.first is None else job.first
            job.last = now
            for i in gpus:
                if i in job.baseline:
                    job.above[i] = max(job.above.get(i, 0), peaks[i] - job.baseline[i])
        self.totals.held_seconds += interval
        self.totals.gpu_seconds += interval * len(gpus)
        self.totals.gpu_busy_seconds += busy if gpus else 0.0
        self.totals.steps += 1
        if gpus:
            cuda_devices = [d for d in record.devices if d.kind == "cuda"]
            if all(self._energy_capable(d) for d in cuda_devices):
                tracks = tuple(d.nvml_index for d in cuda_devices if d.nvml_index is not None)
                for job in members:
                    job.pending += 1
                    job.tracks.update(tracks)
                self._pending.append(_Interval(start, now, tracks, members, work))
                self._settle(force=False)
            else:
                for job in members:
                    job.share.energy_joules = None

    # -- energy

    def _energy_capable(self, gpu: Device) -> bool:
        return self._nvml is not None and gpu.energy_supported and gpu.nvml_index is not None

    def _track(self, index: int) -> None:
        with self._lock:
            if index in self._tracks:
                return
            track = _EnergyTrack(self._periods.setdefault(index, deque(maxlen=_PERIOD_HISTORY)))
            self._tracks[index] = track
        assert self._nvml is not None
        watts = self._nvml.power_watts(index)
        track.power_mj_per_s = None if watts is None else watts * 1000.0
        self._observe(index)
        if self._energy_poll > 0 and self._energy_poller is None:
            self._energy_poller = _Poller(self.sample_now, self._energy_poll, "energy-sampler")

    def _observe(self, index: int) -> None:
        assert self._nvml is not None
        value = self._nvml.energy_millijoules(index)
        if value is None:
            return
        with self._lock:
            track = self._tracks.get(index)
            if track is not None:
                track.observe(self._clock(), value)

    def _period(self, index: int) -> float | None:
        with self._lock:
            periods = self._periods.get(index)
            return statistics.median(periods) if periods else None

    def _settle(self, *, force: bool) -> None:
        """Fix the energy of pending intervals, oldest first: those the counter's change
        points already cover, or (``force``) all of them, extrapolating where needed."""
        while self._pending:
            interval = self._pending[0]
            with self._lock:
                tracks = [self._tracks.get(i) for i in interval.tracks]
                if not force and any(t is None or t.horizon() < interval.end for t in tracks):
                    break
                total, estimated = self._fix(interval, tracks)
            self._pending.popleft()
            self.totals.energy_joules += total or 0.0
            shares = share_by_work(total, interval.work) if total is not None \
                else [None] * len(interval.work)
            for job, joules in zip(interval.members, shares, strict=True):
                job.pending -= 1
                if joules is None or job.share.energy_joules is None:
                    job.share.energy_joules = None
                else:
                    job.share.energy_joules += joules
                    job.share.energy_estimated |= estimated
        self._forget()

    def _forget(self) -> None:
        """Drop change points no pending or future interval can need."""
        with self._lock:
            for index, track in self._tracks.items():
                starts = [i.start for i in self._pending if index in i.tracks]
                if starts:
                    track.forget_before(min(starts))
                elif track.fixed is not None:
                    track.forget_before(track.fixed.time)

    @staticmethod
    def _fix(interval: _Interval,
             tracks: Sequence[_EnergyTrack | None]) -> tuple[float | None, bool]:
        """The interval's energy (joules) over its GPUs, and whether it is a rough estimate;
        commits each GPU's boundary at the interval's end."""
        settled: list[tuple[_EnergyTrack, _Boundary]] = []
        total_mj, estimated = 0.0, False
        for track in tracks:
            got = None if track is None else track.settle(interval.start, interval.end)
            if track is None or got is None:
                return None, False
            settled.append((track, got[2]))
            total_mj += got[0]
            estimated |= got[1]
        for track, boundary in settled:
            track.fixed = boundary
        return total_mj / 1000.0, estimated

    # -- resident memory (CPU jobs)

    def _rss_now(self) -> int:
        if self._process is None:
            import psutil

            self._process = psutil.Process(os.getpid())
        return int(self._process.memory_info().rss)

    def _sample_rss(self) -> None:
        rss = self._rss_now()
        with self._lock:
            self._rss_max = max(self._rss_max, rss)

    def _start_rss(self) -> None:
        if self._rss_poller is None:
            self._fold_rss()
            if self._rss_poll > 0:
                self._rss_poller = _Poller(self._sample_rss, self._rss_poll, "rss-sampler")

    def _fold_rss(self) -> None:
        """Give the most resident memory since the last fold (now included) to every open CPU
        job; the next fold counts from now."""
        rss = self._rss_now()
        with self._lock:
            peak, self._rss_max = max(self._rss_max, rss), rss
        for job in self._jobs.values():
            if not job.gpus:
                job.rss_peak = max(job.rss_peak, peak)

    def _stop_pollers(self) -> None:
        for poller in (self._energy_poller, self._rss_poller):
            if poller is not None:
                poller.stop()
        self._energy_poller = self._rss_poller = None
