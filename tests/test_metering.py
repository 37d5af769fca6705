"""Meter: CPU windows, the CUDA + NVML path through fakes, and batch sharing sums."""

from __future__ import annotations

import math
import mmap
import time
from typing import Any

from fakes import FakeNvml, a100, v100
from hypothesis import given
from hypothesis import strategies as st

from engine.hardware import Nvml, discover
from engine.metering import BatchLedger, CudaBackend, Measurement, Meter, MeterWindow, share_by_work


class FakeCuda(CudaBackend):
    """CUDA as seen by the meter, for a machine without it: events on a manual clock."""

    def __init__(self, busy_per_window: float, peak: int) -> None:
        self.synced: list[int] = []
        self.busy = busy_per_window
        self.peak = peak
        self.events = 0

    def synchronize(self, index: int) -> None:
        self.synced.append(index)

    def reset_peak(self, index: int) -> None:
        pass

    def peak_allocated(self, index: int) -> int:
        return self.peak

    def record_event(self, index: int) -> Any:
        self.events += 1
        return self.events

    def elapsed_seconds(self, begin: Any, end: Any) -> float:
        return self.busy


def test_cpu_window_measures_wall_tokens_and_memory() -> None:
    meter = Meter()
    window = meter.window([discover().cpu]).start()
    time.sleep(0.02)
    window.token()
    blob = mmap.mmap(-1, 64 * 2**20)  # fresh pages, so resident memory must grow
    for offset in range(0, len(blob), 4096):
        blob[offset] = 1
    time.sleep(0.03)
    window.token()
    window.token()
    m = window.stop()
    assert m.device == "cpu" and m.gpu_seconds == 0.0 and m.gpu_count == 0
    assert m.gpu_busy_seconds is None and m.energy_joules is None
    assert m.wall_seconds >= 0.05
    assert m.ttft_seconds is not None and 0.02 <= m.ttft_seconds < m.wall_seconds
    assert m.tpot_seconds is not None and m.tpot_seconds > 0
    assert len(m.inter_token_seconds) == 2
    assert m.peak_memory_bytes is not None and m.peak_memory_bytes >= 16 * 2**20
    assert window.stop() is m  # stopping twice changes nothing
    blob.close()


def test_gpu_window_sums_gpus_and_reads_nvml_energy() -> None:
    fake = FakeNvml(gpus=[v100(), a100()])
    nvml = Nvml(fake)
    info = discover(nvml, cuda_visible_devices=None)
    cuda = FakeCuda(busy_per_window=0.5, peak=123)
    window = Meter(nvml=nvml, cuda=cuda).window(info.gpus).start()
    fake.gpus[0].advance_energy(1500)
    fake.gpus[1].advance_energy(2500)
    time.sleep(0.01)
    m = window.stop()
    assert m.gpu_count == 2 and math.isclose(m.gpu_seconds, 2 * m.wall_seconds)
    assert m.energy_joules == 4.0
    assert m.gpu_busy_seconds == 1.0 and m.peak_memory_bytes == 246
    assert sorted(set(cuda.synced)) == [0, 1]
    assert "nvml-energy" in m.method and m.device == "cuda:0,cuda:1"


def test_energy_is_absent_not_zero_where_unsupported() -> None:
    fake = FakeNvml(gpus=[v100(energy_supported=False)])
    nvml = Nvml(fake)
    info = discover(nvml, cuda_visible_devices=None)
    m = Meter(nvml=nvml, cuda=FakeCuda(0.1, 1)).window(info.gpus).start().stop()
    assert m.energy_joules is None and "nvml-energy" not in m.method


@given(st.floats(0, 1e6, allow_nan=False),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=64))
def test_batch_shares_add_up_to_the_time_held(total: float, work: list[int]) -> None:
    shares = share_by_work(total, work)
    assert len(shares) == len(work) and all(s >= 0 for s in shares)
    assert math.isclose(math.fsum(shares), total, rel_tol=1e-9, abs_tol=1e-9)
    if sum(work) > 0:
        for s, w in zip(shares[:-1], work[:-1], strict=False):
            assert math.isclose(s, total * w / sum(work), rel_tol=1e-9, abs_tol=1e-12)


def test_fake_timeline_of_a_shared_batch() -> None:
    """Three jobs held one GPU for 12 s with token work 10, 20 and 30: billed 2, 4 and 6 s."""
    assert share_by_work(12.0, [10, 20, 30]) == [2.0, 4.0, 6.0]
    assert share_by_work(3.0, [0, 0, 0]) == [1.0, 1.0, 1.0]


class _RecordingMeter(Meter):
    """A meter that keeps every window it opens, to check what the ledger billed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.opened: list[MeterWindow] = []

    def window(self, devices: Any) -> MeterWindow:
        w = super().window(devices)
        self.opened.append(w)
        return w


# A step: ("join", prompt tokens), ("tokens", which member, how many) or ("leave", which member).
_STEPS = st.lists(st.one_of(
    st.tuples(st.just("join"), st.integers(0, 40)),
    st.tuples(st.just("tokens"), st.integers(0, 7), st.integers(1, 5)),
    st.tuples(st.just("leave"), st.integers(0, 7))), max_size=30)


@given(_STEPS)
def test_a_rolling_batch_bills_every_window_exactly_once(steps: list[tuple[Any, ...]]) -> None:
    """Jobs join and leave between steps: the shares, summed over jobs, equal what the
    devices were held (GPU seconds, CUDA-busy seconds, energy), and a job's peak batch
    is the most members of any window it was in."""
    fake = FakeNvml(gpus=[a100()])
    fake.gpus[0].energy_step_mj = 7
    nvml = Nvml(fake)
    info = discover(nvml, cuda_visible_devices=None)
    meter = _RecordingMeter(nvml=nvml, cuda=FakeCuda(busy_per_window=0.25, peak=64))
    ledger = BatchLedger(meter, info.gpus)
    clocks: dict[int, MeterWindow] = {}
    live: list[int] = []
    billed: dict[int, Any] = {}
    most = 0
    for step in steps:
        if step[0] == "join":
            key = len(clocks)
            clocks[key] = MeterWindow([], None, track_memory=False).start()
            ledger.join(key, clocks[key], step[1])
            live.append(key)
        elif step[0] == "tokens" and live:
            clocks[live[step[1] % len(live)]].token(step[2])
        elif step[0] == "leave" and live:
            key = live.pop(step[1] % len(live))
            billed.update(ledger.leave([key]))
        most = max(most, len(live))
    billed.update(ledger.close())
    assert sorted(billed) == sorted(clocks)
    held: list[Measurement] = [w.stop() for w in meter.opened]
    assert math.isclose(math.fsum(s.gpu_seconds for s in billed.values()),
                        math.fsum(m.gpu_seconds for m in held), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(math.fsum(s.gpu_busy_seconds or 0.0 for s in billed.values()),
                        0.25 * len(held), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(math.fsum(s.energy_joules or 0.0 for s in billed.values()),
                        math.fsum(m.energy_joules or 0.0 for m in held), abs_tol=1e-9)
    assert all(1 <= s.peak_batch <= max(most, 1) for s in billed.values())


def test_a_rolling_batch_shares_each_window_by_the_work_done_in_it() -> None:
    """A alone prefills 10 tokens; B joins with 30 and both make 5 tokens; A leaves; B makes
    5 more alone. With one busy second per window: A is billed 1 + 5/40, B 35/40 + 1."""
    fake = FakeNvml(gpus=[a100()])
    nvml = Nvml(fake)
    info = discover(nvml, cuda_visible_devices=None)
    ledger = BatchLedger(Meter(nvml=nvml, cuda=FakeCuda(busy_per_window=1.0, peak=1)),
                         info.gpus)
    a = MeterWindow([], None, track_memory=False).start()
    b = MeterWindow([], None, track_memory=False).start()
    ledger.join("a", a, 10)
    ledger.join("b", b, 30)
    a.token(5)
    b.token(5)
    share_a = ledger.leave(["a"])["a"]
    b.token(5)
    share_b = ledger.close()["b"]
    assert share_a.gpu_busy_seconds is not None and share_b.gpu_busy_seconds is not None
    assert math.isclose(share_a.gpu_busy_seconds, 1.0 + 5 / 40)
    assert math.isclose(share_b.gpu_busy_seconds, 35 / 40 + 1.0)
    assert share_a.peak_batch == 2 and share_b.peak_batch == 2
    assert share_a.device == "cuda:0" and share_a.gpu_count == 1
