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
from collections.abc import Sequence
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
