"""DeviceLedger: one runner's steps billed once, through a fake clock, fake CUDA and an NVML
whose energy counter moves in jumps, as the real one does."""

from __future__ import annotations

import math
import mmap
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from fakes import NVML_ERROR_NOT_SUPPORTED, FakeGpu, FakeNvml, NVMLError, a100, v100
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.hardware import Device, Nvml, discover
from engine.metering import (
    CPU_METHOD,
    CudaBackend,
    DeviceLedger,
    JobShare,
    Meter,
    share_by_work,
)

MB = 2**20
GPU_EXACT = "cuda-sync-wall+cuda-events-per-step+nvml-energy+cuda-peak-above-resident"
GPU_ESTIMATED = ("cuda-sync-wall+cuda-events-per-step+nvml-energy-interpolated"
                 "+cuda-peak-above-resident")


class FakeClock:
    """Monotonic seconds that move only when told to, in ticks; hooks run after each tick."""

    def __init__(self, start: float = 1000.0, tick: float = 0.005) -> None:
        self.t = start
        self.tick = tick
        self.hooks: list[Callable[[float, float], None]] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        end = self.t + seconds
        while self.t < end - 1e-12:
            t0, self.t = self.t, min(end, self.t + self.tick)
            for hook in self.hooks:
                hook(t0, self.t)


class SteppedNvml(FakeNvml):
    """NVML whose total-energy counter is latched only every ``period`` seconds of the fake
    clock, while the true energy (``true_mj``) grows continuously at each GPU's power."""

    def __init__(self, gpus: Sequence[FakeGpu], clock: FakeClock, period: float) -> None:
        super().__init__(gpus=gpus)
        self.period = period
        self.true_mj = [0.0] * len(gpus)
        self.counter = [0] * len(gpus)
        self.reads = 0
        self.stalled = False  # the driver stops updating the counter
        clock.hooks.append(self._run)

    def _run(self, t0: float, t1: float) -> None:
        for i, gpu in enumerate(self.gpus):
            rate = gpu.power_watts * 1000.0
            k = math.floor(t0 / self.period) + 1
            while k * self.period <= t1 and not self.stalled:
                self.counter[i] = round(self.true_mj[i] + rate * (k * self.period - t0))
                k += 1
            self.true_mj[i] += rate * (t1 - t0)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: object) -> int:
        gpu = self._gpu(handle)
        if not gpu.energy_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        self.reads += 1
        return self.counter[next(i for i, g in enumerate(self.gpus) if g is gpu)]


class LedgerCuda(CudaBackend):
    """CUDA on the fake clock: kernels queue ``queued`` seconds of device work that
    :meth:`synchronize` waits for; an event completes when the work queued before it has."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.queued = 0.0
        clock.hooks.append(self._run)
        self.alloc: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []

    def launch(self, seconds: float) -> None:
        self.queued += seconds

    def _run(self, t0: float, t1: float) -> None:
        self.queued = max(0.0, self.queued - (t1 - t0))  # the device works while time passes

    def malloc(self, index: int, size: int) -> None:
        self.alloc[index] = self.alloc.get(index, 0) + size
        self.peak[index] = max(self.peak.get(index, 0), self.alloc[index])

    def free(self, index: int, size: int) -> None:
        self.alloc[index] -= size

    def synchronize(self, index: int) -> None:
        self.calls.append(("sync", index))
        self.clock.advance(self.queued)
        self.queued = 0.0

    def reset_peak(self, index: int) -> None:
        self.calls.append(("reset", index))
        self.peak[index] = self.alloc.get(index, 0)

    def peak_allocated(self, index: int) -> int:
        return self.peak.get(index, 0)

    def allocated(self, index: int) -> int:
        return self.alloc.get(index, 0)

    def record_event(self, index: int) -> Any:
        self.calls.append(("event", index))
        return self.clock() + self.queued

    def elapsed_seconds(self, begin: Any, end: Any) -> float:
        return float(end - begin)


@dataclass
class Rig:
    clock: FakeClock
    nvml: SteppedNvml
    cuda: LedgerCuda
    gpus: tuple[Device, ...]
    ledger: DeviceLedger
    steps: list[tuple[float, float, float]] = field(default_factory=list)  # start, end, busy

    def run(self, work: dict[Hashable, float], device: float = 0.02, host: float = 0.0,
            devices: Sequence[Device] | None = None) -> None:
        """One step of ``device`` seconds of queued kernels, then ``host`` seconds outside."""
        with self.ledger.step(self.gpus if devices is None else devices) as record:
            self.cuda.launch(device)
            record.work = work
        assert record.busy_seconds is not None
        interval = 0.0 if record.interval_seconds is None else record.interval_seconds
        self.steps.append((self.clock() - interval, self.clock(), record.busy_seconds))
        self.clock.advance(host)

    def truth_joules(self, start: float, end: float) -> float:
        """Energy the GPUs drew from ``start`` to ``end`` (constant power)."""
        return sum(self.nvml.gpus[g.nvml_index or 0].power_watts for g in self.gpus) \
            * (end - start)


def gpu_devices(fake: FakeNvml) -> tuple[Device, ...]:
    """The CUDA devices over a fake NVML's GPUs, CUDA index = NVML index (no discovery:
    these tests are about metering, not about which GPUs torch can drive)."""
    return tuple(
        Device(id=f"cuda:{i}", kind="cuda", index=i, name=g.name, gpu_type=None,
               memory_total_bytes=g.memory_total, memory_free_bytes=g.memory_total,
               compute_capability=g.compute_capability, energy_supported=g.energy_supported,
               uuid=g.uuid, nvml_index=i)
        for i, g in enumerate(fake.gpus))


def make_rig(gpus: Sequence[FakeGpu] | None = None, *, period: float = 0.1,
             poll: bool = True) -> Rig:
    """A ledger over fake GPUs; ``poll`` samples the counter every clock tick (what the
    sampler thread does in real time); without it, only at each step's end."""
    clock = FakeClock()
    nvml = SteppedNvml(list(gpus or [a100()]), clock, period)
    devices = gpu_devices(nvml)
    cuda = LedgerCuda(clock)
    ledger = DeviceLedger(Meter(nvml=Nvml(nvml), cuda=cuda), clock=clock,
                          energy_poll_seconds=0, rss_poll_seconds=0)
    if poll:
        clock.hooks.append(lambda t0, t1: ledger.sample_now())
    return Rig(clock, nvml, cuda, tuple(devices), ledger)


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name in ("energy-sampler", "rss-sampler")]


def test_interleaved_jobs_bill_the_held_time_once() -> None:
    """Four jobs of different works take turns on one GPU, step by step: their GPU seconds
    add up to the time the GPU was held (not four times it), and each job is billed the
    intervals its own steps closed (host time before a step included, after idle none)."""
    rig = make_rig()
    jobs = ["a", "b", "c", "d"]
    for key in jobs:
        rig.ledger.open(key, rig.gpus)
    held_from = rig.clock()
    own: dict[str, list[int]] = {k: [] for k in jobs}
    for n, (key, prompt) in enumerate(zip(jobs, [5, 50, 500, 17], strict=True)):
        own[key].append(len(rig.steps))
        rig.run({key: prompt}, device=0.01 * (n + 1), host=0.003)  # each job's prefill
    for round_ in range(20):
        for n, key in enumerate(jobs[: 4 - round_ // 6]):  # jobs drop out as they finish
            own[key].append(len(rig.steps))
            rig.run({key: 1}, device=0.004 + 0.002 * n, host=0.001)
    held_to = rig.steps[-1][1]
    rig.ledger.idle()
    shares = {k: rig.ledger.close(k) for k in jobs}

    total = math.fsum(s.gpu_seconds for s in shares.values())
    assert math.isclose(total, held_to - held_from, rel_tol=1e-9)
    assert math.isclose(rig.ledger.totals.gpu_seconds, total, rel_tol=1e-9)
    for key, share in shares.items():
        intervals = [rig.steps[i][1] - rig.steps[i][0] for i in own[key]]
        busy = [rig.steps[i][2] for i in own[key]]
        assert math.isclose(share.gpu_seconds, math.fsum(intervals), rel_tol=1e-9)
        assert share.gpu_busy_seconds is not None
        assert math.isclose(share.gpu_busy_seconds, math.fsum(busy), rel_tol=1e-9)
        assert share.gpu_busy_seconds < share.gpu_seconds  # host gaps left out
        assert share.peak_batch == 1
        assert share.device == "cuda:0" and share.gpu_count == 1
    energy = math.fsum(s.energy_joules or 0.0 for s in shares.values())
    assert math.isclose(energy, rig.ledger.totals.energy_joules, rel_tol=1e-9)
    assert math.isclose(energy, rig.truth_joules(held_from, held_to), rel_tol=0.02)
    for share in shares.values():  # constant power: each drew 300 W in its own intervals
        assert share.energy_joules is not None
        assert math.isclose(share.energy_joules, 300 * share.gpu_seconds, rel_tol=0.05)


def test_separate_windows_on_one_gpu_bill_it_several_times() -> None:
    """Why the ledger exists: four jobs each holding their own window over one GPU are each
    billed the whole GPU for the whole time, four times what was held."""
    fake = FakeNvml(gpus=[a100()])
    nvml, gpus = Nvml(fake), gpu_devices(fake)
    meter = Meter(nvml=nvml, cuda=LedgerCuda(FakeClock()))
    begin = time.perf_counter()
    windows = [meter.window(gpus).start() for _ in range(4)]
    time.sleep(0.02)
    measured = [w.stop() for w in windows]
    held = time.perf_counter() - begin
    assert 3.5 * held < math.fsum(m.gpu_seconds for m in measured) <= 4 * held


def test_two_jobs_in_one_step_share_it_by_work() -> None:
    rig = make_rig(period=0.05)
    rig.ledger.open("a", rig.gpus)
    rig.ledger.open("b", rig.gpus)
    begin = rig.clock()
    rig.run({"a": 30, "b": 10}, device=1.5, host=0.5)
    rig.run({"a": 3, "b": 1}, device=0.5)
    rig.ledger.idle()
    a, b = rig.ledger.close("a"), rig.ledger.close("b")
    # 1.5 s shared 30:10, then 0.5 s of host time and 0.5 s of step shared 3:1
    assert math.isclose(a.gpu_seconds, 1.125 + 0.75) and math.isclose(b.gpu_seconds, 0.375 + 0.25)
    assert a.gpu_busy_seconds is not None and b.gpu_busy_seconds is not None
    assert math.isclose(a.gpu_busy_seconds, 1.5) and math.isclose(b.gpu_busy_seconds, 0.5)
    assert a.energy_joules is not None and b.energy_joules is not None
    assert math.isclose(a.energy_joules, 3 * b.energy_joules, rel_tol=1e-9)
    assert math.isclose(a.energy_joules + b.energy_joules,
                        rig.truth_joules(begin, rig.clock()), rel_tol=0.02)
    assert a.peak_batch == b.peak_batch == 2
    assert a.method == b.method == GPU_EXACT and not a.energy_estimated


def test_queued_kernels_are_waited_for_and_host_time_is_not_device_time() -> None:
    """The step's end records CUDA events, then synchronises, then reads the clock: kernels
    still queued at the end of the block are in both the interval and the busy time."""
    rig = make_rig()
    rig.ledger.open("a", rig.gpus)
    with rig.ledger.step(rig.gpus) as record:
        rig.cuda.launch(0.3)  # asynchronous: the host goes on at once
        rig.clock.advance(0.01)  # host work while the kernels run
        record.work = {"a": 4}
    assert record.interval_seconds is not None and math.isclose(record.interval_seconds, 0.3)
    assert record.busy_seconds is not None and math.isclose(record.busy_seconds, 0.3)
    calls = rig.cuda.calls
    assert calls[-3:] == [("event", 0), ("sync", 0), ("reset", 0)]  # end event, sync, peak
    rig.clock.advance(0.2)  # host time between steps: wall, not device time
    rig.run({"a": 1}, device=0.1)
    share = rig.ledger.close("a")
    assert math.isclose(share.gpu_seconds, 0.6) and share.gpu_busy_seconds is not None
    assert math.isclose(share.gpu_busy_seconds, 0.4)
    rig.ledger.shutdown()


# One runner's life: ("open",), ("step", which jobs, their works, device ms, host ms),
# ("close", which), ("idle", gap ms), ("empty", device ms). Mostly steps, after an open.
_STEP = st.tuples(st.just("step"), st.lists(st.integers(0, 9), min_size=1, max_size=4),
                  st.lists(st.integers(0, 60), min_size=4, max_size=4),
                  st.integers(1, 120), st.integers(0, 30))
_OTHER = [st.tuples(st.just("open")), st.tuples(st.just("close"), st.integers(0, 9)),
          st.tuples(st.just("idle"), st.integers(0, 500)),
          st.tuples(st.just("empty"), st.integers(1, 20))]
_OP: st.SearchStrategy[tuple[Any, ...]] = st.integers(0, 11).flatmap(
    lambda n: _STEP if n < 8 else _OTHER[n - 8])
_OPS = st.lists(_OP, min_size=5, max_size=80).map(lambda ops: [("open",), *ops])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPS, st.integers(1, 2), st.sampled_from([0.01, 0.05, 0.1]), st.booleans())
def test_any_run_bills_gpu_busy_and_energy_exactly_once(
        ops: list[tuple[Any, ...]], n_gpus: int, period: float, poll: bool) -> None:
    """Whatever the order of opens, steps, closes and idles: summed over the jobs, GPU
    seconds are the held time times the GPUs, busy seconds the steps' device time, energy
    the ledger's total (close to what the GPUs drew while held); each job is billed its
    work's part of every step it took part in."""
    rig = make_rig([a100(), v100()][:n_gpus], period=period, poll=poll)
    live: list[int] = []
    expected_gpu: dict[Hashable, float] = {}
    expected_busy: dict[Hashable, float] = {}
    worked: dict[Hashable, bool] = {}
    shares: dict[Hashable, JobShare] = {}
    held = device = truth = 0.0
    boundary: float | None = None
    carried = 0.0
    for op in ops:
        if op[0] == "open":
            key = len(expected_gpu)
            expected_gpu[key] = expected_busy[key] = 0.0
            worked[key] = False
            rig.ledger.open(key, rig.gpus)
            live.append(key)
        elif op[0] in ("step", "empty") and live:
            start = rig.clock() if boundary is None else boundary
            members = [] if op[0] == "empty" else sorted({live[i % len(live)] for i in op[1]})
            work = {k: op[2][n] for n, k in enumerate(members)}
            rig.run(work, device=op[-2 if op[0] == "step" else 1] / 1000)
            end = rig.clock()
            boundary = start if not members else end
            carried += rig.steps[-1][2]
            if members:
                interval = (end - start) * n_gpus
                held += end - start
                truth += rig.truth_joules(start, end)
                device += carried
                total_work = sum(work.values())
                for k in members:
                    part = work[k] / total_work if total_work else 1 / len(members)
                    expected_gpu[k] += interval * part
                    expected_busy[k] += carried * part
                    worked[k] |= part > 0
                carried = 0.0
            if op[0] == "step":
                rig.clock.advance(op[4] / 1000)
        elif op[0] == "close" and live:
            key = live.pop(op[1] % len(live))
            shares[key] = rig.ledger.close(key)
        elif op[0] == "idle":
            rig.ledger.idle()
            boundary, carried = None, 0.0
            rig.clock.advance(op[1] / 1000)
    rig.ledger.idle()
    shares.update(rig.ledger.shutdown())
    assert set(shares) == set(expected_gpu)
    assert not rig.ledger.held and not _sampler_threads()

    gpu = math.fsum(s.gpu_seconds for s in shares.values())
    assert math.isclose(gpu, held * n_gpus, rel_tol=1e-9, abs_tol=1e-9)
    busy = math.fsum(s.gpu_busy_seconds or 0.0 for s in shares.values())
    assert math.isclose(busy, device, rel_tol=1e-9, abs_tol=1e-9)
    energy = math.fsum(s.energy_joules or 0.0 for s in shares.values())
    assert math.isclose(energy, rig.ledger.totals.energy_joules, rel_tol=1e-9, abs_tol=1e-9)
    # Within what the counter's jumps allow: a few update periods' worth per hold.
    holds = 1 + sum(op[0] == "idle" for op in ops)
    watts = sum(g.power_watts for g in rig.nvml.gpus)
    slack = holds * watts * (3 * period + 0.01) + 0.05 * truth
    assert abs(energy - truth) <= slack
    for job, share in shares.items():
        assert math.isclose(share.gpu_seconds, expected_gpu[job], rel_tol=1e-9, abs_tol=1e-12)
        assert share.gpu_busy_seconds is not None
        assert math.isclose(share.gpu_busy_seconds, expected_busy[job],
                            rel_tol=1e-9, abs_tol=1e-12)
        assert share.energy_joules is not None and share.energy_joules >= 0.0
        if worked[job]:  # a job that did work on a GPU with a counter never gets 0 J
            assert share.energy_joules > 0.0 and share.gpu_count == n_gpus
            assert share.method in (GPU_EXACT, GPU_ESTIMATED)
            assert share.energy_estimated == (share.method == GPU_ESTIMATED)


def test_a_job_shorter_than_the_counter_period_gets_estimated_energy_not_zero() -> None:
    """A 30 ms job on a counter that moves every 100 ms: alone, the counter never moves
    while it runs (a window would read 0 J); beside a long job, its energy is
    interpolated, but its span is shorter than the update period. Both are estimated."""
    rig = make_rig(period=0.1)
    rig.clock.advance(0.013)  # off the counter's phase
    rig.ledger.open("short", rig.gpus)
    begin = rig.clock()
    rig.run({"short": 8}, device=0.015)
    rig.run({"short": 1}, device=0.015)
    alone = rig.ledger.close("short")
    rig.ledger.idle()
    assert alone.energy_joules is not None and alone.energy_joules > 0
    assert math.isclose(alone.energy_joules, rig.truth_joules(begin, begin + 0.03),
                        rel_tol=0.05)  # NVML's power over the span, for want of a slope
    assert alone.energy_estimated and alone.method == GPU_ESTIMATED

    rig.ledger.open("long", rig.gpus)
    for _ in range(40):
        rig.run({"long": 1}, device=0.02)
    rig.ledger.open("short", rig.gpus)
    for _ in range(2):
        rig.run({"long": 1, "short": 1}, device=0.015)
    beside = rig.ledger.close("short")
    for _ in range(40):
        rig.run({"long": 1}, device=0.02)
    long = rig.ledger.close("long")
    rig.ledger.idle()
    assert beside.energy_joules is not None and beside.energy_joules > 0
    assert beside.energy_estimated and beside.method == GPU_ESTIMATED
    assert not long.energy_estimated and long.method == GPU_EXACT


def test_a_long_job_has_measured_energy_within_a_few_percent() -> None:
    """Two seconds of 20 ms steps on a counter updated every 100 ms, power changing halfway:
    the interpolated energy is within 3 % of what the GPU drew, and not estimated."""
    rig = make_rig(period=0.1)
    rig.ledger.open("job", rig.gpus)
    begin = rig.clock()
    truth_mj = rig.nvml.true_mj[0]
    for n in range(100):
        if n == 50:
            rig.nvml.gpus[0].power_watts = 120.0
        rig.run({"job": 1}, device=0.018, host=0.002)
    truth = (rig.nvml.true_mj[0] - truth_mj) / 1000
    held = rig.steps[-1][1] - begin
    share = rig.ledger.close("job")
    rig.ledger.idle()
    assert share.energy_joules is not None
    assert abs(share.energy_joules - truth) <= 0.03 * truth
    assert abs(truth - 300.0 * held) > 0.2 * truth  # a constant-power guess would be far off
    assert not share.energy_estimated and share.method == GPU_EXACT


def test_energy_extrapolated_over_a_stalled_counter_is_estimated() -> None:
    """The counter stops moving for half a second at the end of a long job: its last steps'
    energy is extrapolated with the observed slope, and the job's energy is estimated."""
    rig = make_rig(period=0.1)
    rig.ledger.open("job", rig.gpus)
    begin = rig.clock()
    for n in range(75):
        rig.nvml.stalled = n >= 50
        rig.run({"job": 1}, device=0.02)
    share = rig.ledger.close("job")
    rig.ledger.idle()
    assert share.energy_joules is not None
    assert math.isclose(share.energy_joules, rig.truth_joules(begin, rig.clock()), rel_tol=0.05)
    assert share.energy_estimated and share.method == GPU_ESTIMATED


def test_energy_sampled_only_at_step_ends_still_adds_up() -> None:
    """Without a sampler (poll interval 0), the counter is read at each step's end only."""
    rig = make_rig(period=0.1, poll=False)
    rig.ledger.open("a", rig.gpus)
    rig.ledger.open("b", rig.gpus)
    begin = rig.clock()
    for n in range(60):
        rig.run({"a" if n % 3 else "b": 1}, device=0.03)
    a, b = rig.ledger.close("a"), rig.ledger.close("b")
    rig.ledger.idle()
    assert a.energy_joules is not None and b.energy_joules is not None
    assert a.energy_joules > 0 and b.energy_joules > 0
    assert math.isclose(a.energy_joules + b.energy_joules, rig.ledger.totals.energy_joules)
    assert math.isclose(a.energy_joules + b.energy_joules,
                        rig.truth_joules(begin, rig.clock()), rel_tol=0.08)
    assert math.isclose(a.energy_joules, 2 * b.energy_joules, rel_tol=0.2)
    assert rig.nvml.reads <= 60 + 5  # one read per step end (and a few at hold and close)


def test_peak_memory_is_above_the_resident_weights_and_not_wiped_by_others() -> None:
    rig = make_rig([a100(), a100()])
    cuda, gpus = rig.cuda, rig.gpus
    for g in (0, 1):
        cuda.malloc(g, 1000 * MB)  # resident weights, loaded before any job
    rig.ledger.open("a", gpus)
    with rig.ledger.step(gpus) as record:  # a's prefill: 200 MB of cache, 50 MB transient
        cuda.malloc(0, 250 * MB)
        cuda.malloc(1, 100 * MB)
        cuda.free(0, 50 * MB)
        cuda.free(1, 100 * MB)
        record.work = {"a": 10}
    rig.ledger.open("b", gpus)  # b's baseline includes a's cache
    with rig.ledger.step(gpus) as record:
        cuda.malloc(0, 30 * MB)
        cuda.free(0, 30 * MB)
        record.work = {"b": 10}
    rig.run({"a": 1, "b": 1})  # a step of both, nothing new allocated
    rig.ledger.open("c", gpus)  # while a's cache is allocated: in c's baseline
    cuda.free(0, 200 * MB)  # a's cache goes
    a = rig.ledger.close("a")
    with rig.ledger.step(gpus) as record:  # c's steps stay below its baseline
        cuda.malloc(0, 30 * MB)
        cuda.free(0, 30 * MB)
        record.work = {"c": 10, "b": 1}
    b, c = rig.ledger.close("b"), rig.ledger.close("c")
    rig.ledger.idle()
    assert a.peak_memory_bytes == 250 * MB + 100 * MB  # its transient 50 MB in, both GPUs
    assert b.peak_memory_bytes == 30 * MB
    assert c.peak_memory_bytes == 0


def test_idle_time_is_billed_to_nobody() -> None:
    rig = make_rig()
    rig.ledger.open("a", rig.gpus)
    begin = rig.clock()
    rig.run({"a": 1}, device=0.5, host=0.05)  # the host time after the last step...
    rig.ledger.idle()  # ...is not billed: nothing ran after it
    assert not rig.ledger.held
    rig.clock.advance(5.0)
    resumed = rig.clock()
    rig.run({"a": 1}, device=0.5)
    share = rig.ledger.close("a")
    rig.ledger.idle()
    assert math.isclose(share.gpu_seconds, 1.0)
    assert share.energy_joules is not None
    assert math.isclose(share.energy_joules, rig.truth_joules(begin, begin + 0.5)
                        + rig.truth_joules(resumed, resumed + 0.5), rel_tol=0.05)
    assert math.isclose(rig.ledger.totals.held_seconds, 1.0)


def test_a_step_without_work_is_billed_with_the_next_one() -> None:
    rig = make_rig()
    rig.ledger.open("a", rig.gpus)
    rig.run({}, device=0.2)
    rig.run({"a": 1}, device=0.1)
    share = rig.ledger.close("a")
    rig.ledger.idle()
    assert math.isclose(share.gpu_seconds, 0.3) and share.gpu_busy_seconds is not None
    assert math.isclose(share.gpu_busy_seconds, 0.3)


def test_a_failed_step_is_billed_and_its_error_kept() -> None:
    rig = make_rig()
    rig.ledger.open("a", rig.gpus)
    with pytest.raises(MemoryError), rig.ledger.step(rig.gpus) as record:
        rig.cuda.launch(0.2)
        record.work = {"a": 3}
        raise MemoryError("CUDA out of memory")
    with pytest.raises(KeyError), rig.ledger.step(rig.gpus) as record:
        record.work = {"nobody": 1}
    share = rig.ledger.close("a")
    rig.ledger.idle()
    assert math.isclose(share.gpu_seconds, 0.2)
    with pytest.raises(RuntimeError), rig.ledger.step(rig.gpus), rig.ledger.step(rig.gpus):
        pass


def test_energy_is_absent_where_a_gpu_has_no_counter() -> None:
    rig = make_rig([a100(energy_supported=False)])
    rig.ledger.open("a", rig.gpus)
    rig.run({"a": 1}, device=0.3)
    share = rig.ledger.close("a")
    rig.ledger.idle()
    assert share.energy_joules is None and not share.energy_estimated
    assert share.method == "cuda-sync-wall+cuda-events-per-step+cuda-peak-above-resident"
    assert math.isclose(share.gpu_seconds, 0.3)


def test_two_gpus_bill_both() -> None:
    rig = make_rig([v100(), a100()])
    rig.ledger.open("a", rig.gpus)
    begin = rig.clock()
    for _ in range(30):
        rig.run({"a": 1}, device=0.05)
    share = rig.ledger.close("a")
    rig.ledger.idle()
    held = rig.clock() - begin
    assert share.gpu_count == 2 and share.device == "cuda:0,cuda:1"
    assert math.isclose(share.gpu_seconds, 2 * held)
    assert share.gpu_busy_seconds is not None
    assert math.isclose(share.gpu_busy_seconds, 2 * held)
    assert share.energy_joules is not None
    assert math.isclose(share.energy_joules, (250 + 300) * held, rel_tol=0.03)


def test_cpu_jobs_have_wall_and_resident_memory_growth_only() -> None:
    """On the CPU: no GPU seconds, no device time, no energy; the peak is the resident
    memory's growth over the job's life, caught by the sampler thread while held."""
    cpu = discover().cpu
    ledger = Meter().ledger(rss_poll_seconds=0.002)
    ledger.open("a", [cpu])
    with ledger.step([cpu]) as record:
        assert [t.name for t in _sampler_threads()] == ["rss-sampler"]
        blob = mmap.mmap(-1, 64 * MB)  # fresh pages, touched then freed inside the step
        for offset in range(0, len(blob), 4096):
            blob[offset] = 1
        time.sleep(0.05)
        blob.close()
        record.work = {"a": 5}
    ledger.idle()
    assert not _sampler_threads()
    share = ledger.close("a")
    assert share.device == "cpu" and share.gpu_count == 0 and share.gpu_seconds == 0.0
    assert share.gpu_busy_seconds is None and share.energy_joules is None
    assert share.method == CPU_METHOD == "cpu-wall+rss-growth"
    assert share.peak_memory_bytes is not None and share.peak_memory_bytes >= 32 * MB
    assert ledger.totals.held_seconds > 0.05 and ledger.totals.gpu_seconds == 0.0


def test_the_energy_sampler_thread_polls_while_held_and_stops() -> None:
    """In real time: the sampler reads the counter between steps, and stops on idle() and
    on shutdown()."""
    fake = FakeNvml(gpus=[a100()])
    fake.gpus[0].energy_step_mj = 10  # every read moves the counter
    nvml, gpus = Nvml(fake), gpu_devices(fake)
    ledger = Meter(nvml=nvml, cuda=LedgerCuda(FakeClock())).ledger(energy_poll_seconds=0.002)
    for turn in range(2):
        ledger.open(turn, gpus)
        with ledger.step(gpus) as record:
            record.work = {turn: 1}
        before = fake.gpus[0].energy_mj
        time.sleep(0.05)
        assert fake.gpus[0].energy_mj - before >= 50  # at least 5 reads by the sampler
        assert [t.name for t in _sampler_threads()] == ["energy-sampler"]
        with ledger.step(gpus) as record:
            record.work = {turn: 1}
        if turn == 0:
            share = ledger.close(0)
            ledger.idle()
        else:
            share = ledger.shutdown()[1]
        assert not _sampler_threads()
        assert share.energy_joules is not None and share.energy_joules > 0
        idle_reads = fake.gpus[0].energy_mj
        time.sleep(0.01)
        assert fake.gpus[0].energy_mj == idle_reads


def test_shares_of_one_step_add_up_like_share_by_work() -> None:
    """The ledger shares with share_by_work, whose remainder goes to the last job."""
    rig = make_rig()
    for key in "xyz":
        rig.ledger.open(key, rig.gpus)
    rig.run({"x": 1, "y": 1, "z": 1}, device=0.1)
    out = rig.ledger.shutdown()
    start, end, _ = rig.steps[-1]
    assert [out[k].gpu_seconds for k in "xyz"] == share_by_work(end - start, [1, 1, 1])
