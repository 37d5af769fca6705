"""Meter: CPU windows, the CUDA + NVML path through fakes, and batch sharing sums."""

from __future__ import annotations

import math
import mmap
import time
from typing import Any

from fakes import FakeNvml, a100, v100
from hypothesis import given
from hypothesis import strategies as st
from test_ledger import gpu_devices

from engine.hardware import Nvml, discover
from engine.metering import CudaBackend, Meter, share_by_work


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
    gpus = gpu_devices(fake)
    cuda = FakeCuda(busy_per_window=0.5, peak=123)
    window = Meter(nvml=nvml, cuda=cuda).window(gpus).start()
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
    gpus = gpu_devices(fake)
    m = Meter(nvml=nvml, cuda=FakeCuda(0.1, 1)).window(gpus).start().stop()
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
