"""One runner per device: the fast path captured once and replayed on its thread, warm-up
billed to no job, one sampling rule on every path, typed overflow, OOM and eviction."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fake_graphs import FakeGraphs

from engine import Engine
from engine.jobs import GenerationOutput


def _gen(prompt: str = "Hello GPU", **params: object) -> dict[str, object]:
    return {"task": "text-generation", "model": "tiny-gpt2", "prompt": prompt,
            "params": {"max_tokens": 8, **params}}


def test_fast_path_is_captured_once_and_replayed_on_the_runner_thread(
        registry_path: Path) -> None:
    """Jobs from several submitting threads all replay the graph the runner captured."""
    graphs = FakeGraphs()
    jobs = [_gen(f"prompt {i}", max_tokens=6 + i) for i in range(6)]
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=graphs,
                batch_size=1) as eng:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(eng.run, jobs))
        stats = eng.fast_paths()
    assert all(r.ok for r in results), [r.error for r in results]
    assert {r.profile.decode for r in results if r.profile} == {"static-cache+fake-graphs"}
    assert len(graphs.captures) == 1  # one cache-length bucket, one capture for every job
    assert graphs.replay_threads == {graphs.captures[0]}
    assert graphs.captures[0].startswith("engine-runner-")
    assert [(s.bucket, s.captures, s.jobs) for s in stats] == [(256, 1, 6)]
    assert stats[0].replays == graphs.replays > 0


def test_capture_is_warm_up_billed_to_no_job(registry_path: Path) -> None:
    graphs = FakeGraphs(capture_seconds=0.4)
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=graphs,
                job_timeout=0.3) as eng:
        eng.load("tiny-gpt2")
        first, second = eng.run(_gen(max_tokens=4)), eng.run(_gen(max_tokens=4))
    assert first.ok and second.ok, (first.error, second.error)  # a 0.3 s limit still holds
    m1, m2 = first.metrics, second.metrics
    assert m1 is not None and m2 is not None
    assert m1.warmup_seconds is not None and m1.warmup_seconds >= 0.4
    assert m1.load_time_seconds >= m1.warmup_seconds
    assert m1.execution_time_seconds < 0.3
    assert m2.warmup_seconds is None and m2.load_time_seconds == 0.0


def test_seeded_sampling_is_the_same_alone_batched_and_on_the_fast_path(
        registry_path: Path) -> None:
    sampled = _gen("lucky draw", temperature=1.1, seed=7, max_tokens=14)
    mates = [_gen("mate one", max_tokens=3), _gen("mate two", temperature=0.8, seed=2,
                                                  max_tokens=9)]
    with Engine(registry_path, devices=["cpu"], batch_size=1) as alone:
        want = alone.run(sampled)
    with Engine(registry_path, devices=["cpu"], batch_size=3, batch_window_seconds=0.5) as eng:
        batched = [h.result() for h in [eng.submit(j) for j in [mates[0], sampled, mates[1]]]][1]
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=FakeGraphs()) as eng:
        fast = eng.run(sampled)
    assert batched.profile is not None and batched.profile.batch_size == 3
    assert fast.profile is not None and fast.profile.decode == "static-cache+fake-graphs"
    for other in (batched, fast):
        assert other.output == want.output and other.result_hash == want.result_hash


def test_sampling_touches_no_global_rng(registry_path: Path) -> None:
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=FakeGraphs()) as eng:
        eng.run(_gen(max_tokens=2))
        torch.manual_seed(1234)
        before = torch.random.get_rng_state()
        assert eng.run(_gen("sample", temperature=0.9, seed=3, max_tokens=6)).ok
        assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_non_finite_logits_fail_the_job_as_numerical_overflow(
        registry_path: Path, decode: str) -> None:
    with Engine(registry_path, devices=["cpu"], decode=decode,  # type: ignore[arg-type]
                graphs=FakeGraphs()) as eng:
        loaded = eng.load("tiny-gpt2")
        hook = loaded.model.lm_head.register_forward_hook(
            lambda module, args, out: out * float("nan"))
        try:
            bad = eng.run(_gen())
        finally:
            hook.remove()
        good = eng.run(_gen())
    assert bad.status == "failed" and bad.error is not None
    assert bad.error.code == "numerical_overflow"
    assert "float32 on cpu" in bad.error.message
    assert good.ok


def test_out_of_memory_fails_one_job_and_the_fast_path_stays_on(
        registry_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.tasks.static_decode import StaticDecoder

    real_step = StaticDecoder.step
    calls = {"n": 0}

    def once_out_of_memory(self: StaticDecoder, token: int, position: int) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, token, position)

    monkeypatch.setattr(StaticDecoder, "step", once_out_of_memory)
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=FakeGraphs()) as eng:
        failed = eng.run(_gen(max_tokens=6))
        after = eng.run(_gen(max_tokens=6))
        loaded = eng.load("tiny-gpt2")
    assert failed.error is not None and failed.error.code == "out_of_memory"
    assert after.ok and after.profile is not None
    assert after.profile.decode == "static-cache+fake-graphs"
    assert loaded.fast_path_error is None


def test_a_fast_path_that_cannot_be_built_leaves_jobs_on_the_dynamic_path(
        registry_path: Path) -> None:
    graphs = FakeGraphs(fail=RuntimeError("operation not permitted when stream is capturing"))
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=graphs) as eng:
        first, second = eng.run(_gen("fallback")), eng.run(_gen("fallback"))
        stats = eng.fast_paths()
    for result in (first, second):
        assert result.ok and result.profile is not None, result.error
        assert result.profile.decode == "static-cache"  # captured nothing: said so
    assert first.result_hash == second.result_hash
    assert stats[0].graph is None and "capturing" in (stats[0].fallback_reason or "")


def test_a_broken_fast_path_falls_back_to_the_dynamic_loop(
        registry_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.tasks.static_decode import StaticDecoder

    def broken(self: StaticDecoder) -> float:
        raise RuntimeError("no static cache for this architecture")

    monkeypatch.setattr(StaticDecoder, "build", broken)
    with Engine(registry_path, devices=["cpu"], decode="static") as eng:
        first, second = eng.run(_gen("fallback")), eng.run(_gen("fallback"))
        loaded = eng.load("tiny-gpt2")
    for result in (first, second):
        assert result.ok and result.profile is not None, result.error
        assert result.profile.decode == "dynamic-cache"
    assert first.result_hash == second.result_hash
    assert "no static cache" in (loaded.fast_path_error or "")


def test_eviction_drops_the_fast_path_with_the_model(registry_path: Path) -> None:
    graphs = FakeGraphs()
    with Engine(registry_path, devices=["cpu"], decode="static", graphs=graphs) as eng:
        assert eng.run(_gen()).ok
        loaded = eng.load("tiny-gpt2")
        decoders = list(loaded.fast_paths.values())
        assert decoders and eng.fast_paths()
        assert eng.evict("tiny-gpt2")
        assert loaded.model is None and not loaded.fast_paths and not eng.fast_paths()
        assert all(d._replay is None and d._cache is None for d in decoders)
        again = eng.run(_gen())
    assert again.ok and len(graphs.captures) == 2  # a new load captures anew


def test_every_job_runs_on_the_device_runner_thread(registry_path: Path) -> None:
    import engine.tasks.generation as generation

    seen: set[str] = set()
    real = generation.DecodeBatch.step

    def spy(self: generation.DecodeBatch) -> list[object]:
        seen.add(threading.current_thread().name)
        return real(self)  # type: ignore[return-value]

    with Engine(registry_path, devices=["cpu"]) as eng:
        generation.DecodeBatch.step = spy  # type: ignore[method-assign]
        try:
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(eng.run, [_gen(f"job {i}") for i in range(8)]))
        finally:
            generation.DecodeBatch.step = real  # type: ignore[method-assign]
    assert all(r.ok for r in results)
    assert seen == {"engine-runner-cpu"}
    assert all(isinstance(r.output, GenerationOutput) for r in results)


def test_gpus_torch_cannot_drive_leave_jobs_on_the_cpu_with_the_reason(
        registry_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NVML sees a V100 but torch is a CPU build: the engine runs on the CPU and says why."""
    from fakes import FakeNvml, FakeTorchCuda, v100

    from engine.hardware import set_nvml_module, set_torch_cuda_probe

    set_nvml_module(FakeNvml(gpus=[v100()]))
    set_torch_cuda_probe(FakeTorchCuda.cpu_build("2.13.0+cpu"))
    with caplog.at_level("WARNING"), Engine(registry_path) as eng:
        assert [d.id for d in eng.devices] == ["cpu"]
        result = eng.run(_gen())
    assert result.ok, result.error
    assert result.profile is not None and result.profile.device_class == "cpu"
    reason = result.profile.cpu_fallback_reason or ""
    assert "V100" in reason and "CPU build" in reason
    assert any("CPU build" in r.getMessage() for r in caplog.records)


def test_a_row_leaving_a_batch_spread_over_two_gpus_indexes_each_layer_on_its_gpu() -> None:
    """A model placed over two GPUs keeps its later layers' KV cache on the second GPU; a
    row leaving the batch must index each layer there. Fake tensors carry real CUDA device
    rules on a machine without CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import DynamicCache, GPT2Config

    from engine.tasks.generation import select_rows

    config = GPT2Config(n_layer=2, n_head=2, n_embd=8)
    with FakeTensorMode():
        cache = DynamicCache(config=config)
        for layer, device in enumerate(["cuda:0", "cuda:1"]):
            cache.update(torch.empty(3, 2, 5, 4, device=device),
                         torch.empty(3, 2, 5, 4, device=device), layer)
        mask = torch.ones(3, 5, dtype=torch.long, device="cuda:0")
        positions = torch.zeros(3, 1, dtype=torch.long, device="cuda:0")
        on_first_gpu = torch.tensor([0, 2], device="cuda:0")
        with pytest.raises(RuntimeError, match="same device"):  # one index for every layer
            cache.layers[1].keys.index_select(0, on_first_gpu)
        mask, positions = select_rows(cache, mask, positions, [0, 2])
        assert [tuple(layer.keys.shape) for layer in cache.layers] == [(2, 2, 5, 4)] * 2
        assert [str(layer.values.device) for layer in cache.layers] == ["cuda:0", "cuda:1"]
        assert tuple(mask.shape) == (2, 5) and str(positions.device) == "cuda:0"


class _FakeCuda:
    """The CUDA calls the ledger makes, for a machine without CUDA."""

    def synchronize(self, index: int) -> None: ...
    def reset_peak(self, index: int) -> None: ...
    def peak_allocated(self, index: int) -> int:
        return 0

    def allocated(self, index: int) -> int:
        return 0

    def record_event(self, index: int) -> float:
        import time

        return time.perf_counter()

    def elapsed_seconds(self, begin: float, end: float) -> float:
        return end - begin


class _SleepWork:
    """A work of one job on a (fake) GPU whose steps each take ``seconds`` of device time."""

    def __init__(self, name: str, device: object, steps: int, seconds: float):
        from engine.scheduler import Assignment

        self.name, self.steps, self.seconds = name, steps, seconds
        self.devices = (device,)
        self.assignment = Assignment(("cuda:0",), [])
        self.share: object = None
        self.begun = self.ended = 0.0

    def begin(self, runner: object) -> None:
        import time

        self.runner = runner
        self.runner.ledger.open(self.name, self.devices)  # type: ignore[attr-defined]
        self.begun = time.perf_counter()

    def step(self) -> bool:
        import time

        with self.runner.ledger.step(self.devices) as record:  # type: ignore[attr-defined]
            record.work = {self.name: 1.0}
            time.sleep(self.seconds)
        self.steps -= 1
        if self.steps == 0:
            self.share = self.runner.ledger.close(self.name)  # type: ignore[attr-defined]
            self.ended = time.perf_counter()
        return self.steps == 0

    def fail(self, err: object) -> None: ...
    def end(self) -> None: ...
    def flush(self) -> None: ...


def test_four_jobs_sharing_one_gpu_are_billed_the_time_it_was_held_once() -> None:
    """Four works interleaved step by step on one (fake) GPU: their GPU seconds add up to
    the time the GPU was held, not four times it, and each is billed its own steps."""
    import math
    import time

    from engine.hardware import Device
    from engine.metering import Meter
    from engine.runner import DeviceRunner

    gpu = Device(id="cuda:0", kind="cuda", index=0, name="fake", gpu_type="a100",
                 memory_total_bytes=2**34, memory_free_bytes=2**34, compute_capability=(8, 0),
                 energy_supported=False)
    done: list[object] = []
    runner = DeviceRunner(gpu, meter=Meter(cuda=_FakeCuda()),  # type: ignore[arg-type]
                          on_done=done.append)
    works = [_SleepWork(f"job{i}", gpu, steps=10 + 5 * i, seconds=0.004) for i in range(4)]
    started = time.perf_counter()
    for work in works:
        runner.submit(work)  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while len(done) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    wall = time.perf_counter() - started
    runner.stop(5)
    shares = [w.share for w in works]
    billed = math.fsum(s.gpu_seconds for s in shares)  # type: ignore[attr-defined]
    assert len(done) == 4
    assert math.isclose(billed, runner.ledger.totals.gpu_seconds, rel_tol=1e-9)
    assert billed <= wall  # held at most the wall time, never 4x it
    assert billed >= 0.8 * sum(w.seconds * (10 + 5 * i) for i, w in enumerate(works))
    own = [s.gpu_seconds for s in shares]  # type: ignore[attr-defined]
    assert own == sorted(own)  # more steps, more seconds
    assert all(s.gpu_busy_seconds and s.gpu_busy_seconds <= s.gpu_seconds  # type: ignore[attr-defined]
               for s in shares)


@pytest.mark.slow
def test_a_finished_job_has_released_its_model(registry_path: Path) -> None:
    """The result arrives after the work's lease ends: the model can be evicted at once."""
    with Engine(registry_path, devices=["cpu"]) as eng:
        for _ in range(5):
            assert eng.run(_gen(max_tokens=2)).ok
            assert eng.evict("tiny-gpt2"), "the model was still leased after its result"


def test_a_job_whose_metering_cannot_open_still_gets_an_answer(
        registry_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.metering import DeviceLedger

    def broken(self: DeviceLedger, key: object, devices: object) -> None:
        raise RuntimeError("ledger unavailable")

    monkeypatch.setattr(DeviceLedger, "open", broken)
    with Engine(registry_path, devices=["cpu"]) as eng:
        result = eng.run(_gen(), timeout=60)
    assert result.status == "failed" and result.error is not None
    assert "ledger unavailable" in result.error.message
