"""Capabilities, wire mapping of both dialects, the outbox, and the no-torch rule."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeGpu, FakeNvml, FakeTorchCuda, a100, fake_machine, v100

from engine.coordinator import (
    AitbcCoordinator,
    CoordinatorClient,
    DocCoordinator,
    Identity,
    Outbox,
    connect,
    detect_capabilities,
)
from engine.coordinator.aitbc import result_metrics
from engine.coordinator.base import build_job
from engine.hardware import HardwareInfo, Nvml, discover
from engine.jobs import JobResult
from engine.registry import Registry

GiB = 2**30
HASH = "sha256:" + "ab" * 32


def _result(device: str = "cpu", gpu_seconds: float = 0.0, gpu_count: int = 0) -> JobResult:
    return JobResult.model_validate({
        "job_id": "job_1", "model": "gpt2", "task": "text-generation", "status": "completed",
        "output": {"text": " hi", "token_ids": [1, 2], "finish_reason": "length"},
        "result_hash": HASH,
        "metrics": {"execution_time_seconds": 1.2345, "gpu_time_seconds": gpu_seconds,
                    "load_time_seconds": 0.5, "device": device, "measurement": "wall",
                    "prompt_tokens": 3, "completion_tokens": 2, "gpu_count": gpu_count,
                    "ttft_seconds": 0.1},
        "profile": {"model": "gpt2", "weights": "pretrained", "weights_digest": HASH,
                    "dtype": "float32", "device_class": device, "device_count": 1,
                    "torch_version": "x", "transformers_version": "y", "engine_version": "z",
                    "hash_version": "aitbc-result/1"}})


# ------------------------------------------------------------------ capabilities


def _machine(gpus: list[FakeGpu], **nvml_options: Any) -> HardwareInfo:
    """Discovery over fake GPUs that a CUDA build of torch can drive."""
    nvml, torch_cuda = fake_machine(gpus, **nvml_options)
    return discover(Nvml(nvml), torch_cuda=torch_cuda, cuda_visible_devices=None)


def test_capabilities_come_from_the_hardware_and_the_registry() -> None:
    hardware = _machine([v100(), v100()], driver="550.54.15", cuda=12040)
    registry = Registry.load()
    here = {"smollm2-135m", "all-minilm-l6-v2", "gpt2"}
    caps = detect_capabilities(hardware, registry, is_available=lambda s: s.name in here,
                               max_concurrent=3, price_per_hour=0.7, location="eu-west")
    assert (caps.gpu_type, caps.gpu_count, caps.cuda_version) == ("v100", 2, "12.4")
    assert [(g.name, g.memory_mb) for g in caps.gpus] == [("Tesla V100-SXM2-16GB", 16384)] * 2
    assert set(caps.models) == here  # only what is here, all of which fits a V100
    assert (caps.max_concurrent, caps.price_per_hour, caps.location) == (3, 0.7, "eu-west")


def test_capabilities_leave_out_models_that_do_not_fit() -> None:
    hardware = _machine([v100(memory_total=1 * GiB, memory_free=GiB)])
    registry = Registry.load()
    caps = detect_capabilities(hardware, registry, is_available=lambda s: True)
    big = [s.name for s in registry if s.min_gpu_memory_mb > 1024]
    assert big and not set(big) & set(caps.models)


def test_cpu_only_capabilities() -> None:
    hardware = discover(Nvml(FakeNvml(gpus=[])))
    caps = detect_capabilities(hardware, Registry.load(), devices=[hardware.cpu],
                               is_available=lambda s: s.name == "smollm2-135m")
    assert (caps.gpu_type, caps.gpu_count, caps.gpus, caps.cuda_version) == ("cpu", 0, (), None)
    assert caps.models == ("smollm2-135m",)


def test_gpus_torch_cannot_drive_are_not_announced() -> None:
    nvml, _ = fake_machine([v100(), v100()])
    hardware = discover(Nvml(nvml), torch_cuda=FakeTorchCuda.cpu_build(),
                        cuda_visible_devices=None)
    caps = detect_capabilities(hardware, Registry.load(), is_available=lambda s: True)
    assert (caps.gpu_type, caps.gpu_count, caps.gpus) == ("cpu", 0, ())


def test_mixed_gpus_report_the_most_common_type() -> None:
    hardware = _machine([a100(), a100(), v100()])
    caps = detect_capabilities(hardware, Registry.load(), is_available=lambda s: True)
    assert caps.gpu_type == "a100" and caps.gpu_count == 3


# ------------------------------------------------------------------ wire mapping


def _aitbc() -> AitbcCoordinator:
    return AitbcCoordinator(CoordinatorClient("http://127.0.0.1:9"),
                            Identity(miner_id="m1", api_key="k"))


def test_the_result_body_carries_the_commitment_the_hash_covers() -> None:
    result = _result()
    assert result.output is not None
    output = result.output.model_copy(update={"commitment": "c1.8.8.AAAA"})
    body = _aitbc().result_body(result.model_copy(update={"output": output}))
    assert body["result"]["output"]["commitment"] == "c1.8.8.AAAA"
    assert "logprobs" not in body["result"]["output"]  # unset fields are not sent


def test_aitbc_result_body_on_cpu() -> None:
    body = _aitbc().result_body(_result())
    res, m = body["result"], body["metrics"]
    assert res["output"] == {"text": " hi", "token_ids": [1, 2], "finish_reason": "length"}
    assert res["result_hash"] == HASH and res["execution_time"] == 1.2345
    assert res["profile"]["device_class"] == "cpu"
    assert (m["units"], m["unit_type"], m["duration_ms"]) == (1.2345, "cpu_seconds", 1234)
    assert m["execution_time_seconds"] == 1.2345 and m["gpu_time_seconds"] == 0.0
    assert m["prompt_tokens"] == 3 and m["ttft_seconds"] == 0.1
    assert "energy_joules" not in m  # unmeasured evidence is absent, never invented


def test_aitbc_units_are_gpu_seconds_on_a_gpu() -> None:
    m = result_metrics(_result(device="cuda:0", gpu_seconds=2.5, gpu_count=2))
    assert (m["units"], m["unit_type"]) == (2.5, "gpu_seconds")


def test_aitbc_failure_body() -> None:
    body = _aitbc().failure_body("job_1", "unsupported_job_type", "no transcribe here")
    assert body["error_code"] == "unsupported_job_type"
    assert body["error_message"] == "no transcribe here"
    assert body["metrics"]["units"] == 0.0


def test_doc_result_body_is_the_documented_one() -> None:
    doc = DocCoordinator(CoordinatorClient("http://127.0.0.1:9"))
    assert doc.result_body(_result()) == {
        "result_hash": HASH,
        "metrics": {"execution_time_seconds": 1.2345, "gpu_time_seconds": 0.0}}


@pytest.mark.parametrize(("payload", "code"), [
    ({"type": "transcribe"}, "unsupported_job_type"),
    ({"service_type": "image_generation", "service_request": {}}, "unsupported_job_type"),
    ("not json {", "invalid_job"),
    (["a", "list"], "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": 7}, "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "max_tokens": "9"}, "invalid_job"),
    (None, "invalid_job"),
])
def test_bad_payloads_become_failed_jobs_with_a_code(payload: Any, code: str) -> None:
    assigned = build_job("job_1", payload)
    assert assigned.job is None and assigned.error is not None
    assert assigned.error.code == code and assigned.error.message


def test_payload_shapes_become_engine_jobs() -> None:
    flat = build_job("j1", {"type": "inference", "model": "gpt2", "prompt": "Hi",
                            "max_tokens": 5, "seed": 3, "stop": "END"}).job
    assert flat is not None and flat.job_id == "j1" and flat.params.max_tokens == 5
    assert flat.params.stop == ["END"] and flat.params.seed == 3
    svc = build_job("j2", {"service_type": "llm_inference", "service_request": {
        "model": "gpt2", "prompt": "Hi", "max_tokens": 7, "stop_sequences": ["."],
        "stream": False}}).job
    assert svc is not None and svc.params.stop == ["."]
    emb = build_job("j3", {"type": "embedding", "model": "all-minilm-l6-v2",
                           "input": ["a", "b"]}).job
    assert emb is not None and emb.task == "embedding" and emb.input == ["a", "b"]
    hinted = build_job("j4", {"type": "inference", "prompt": "Hi"}, model_hint="gpt2").job
    assert hinted is not None and hinted.model == "gpt2"


def test_connect_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dialect"):
        connect("soap", "http://x")
    with pytest.raises(ValueError, match="miner id"):
        connect("aitbc", "http://x", api_key="k")
    outbox = Outbox(tmp_path / "o.sqlite3")
    outbox.save_identity("doc|http://x", {"miner_id": "miner_1", "api_key": "key_secret"})
    doc = connect("doc", "http://x/", outbox=outbox)
    assert doc.miner_id == "miner_1" and "key_secret" not in repr(doc.identity)


# ------------------------------------------------------------------ outbox


def test_outbox_journal_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outbox.sqlite3"
    box = Outbox(path)
    box.accepted("s", "j1", {"prompt": "x"})
    box.accepted("s", "j2", {"prompt": "y"})
    box.accepted("other", "j1", {"prompt": "z"})
    assert [e.job_id for e in box.in_flight("s")] == ["j1", "j2"]
    box.finished("s", "j1", "result", {"result_hash": HASH}, {"status": "completed"})
    box.attempted("s", "j1", "sending")
    box.close()

    box = Outbox(path)  # survives a restart
    [pending] = box.pending("s")
    assert (pending.job_id, pending.state, pending.attempts) == ("j1", "result", 1)
    assert pending.body == {"result_hash": HASH} and pending.payload == {"prompt": "x"}
    box.acknowledge("s", "j1", receipt={"sig": None})
    assert box.pending("s") == [] and box.was_acked("s", "j1")
    assert box.acked("s")[0]["receipt"] == {"sig": None}
    box.finished("s", "j2", "failure", {"error_code": "x"})
    box.reject("s", "j2", "422: bad body")
    assert box.pending("s") == [] and box.get("s", "j2").note == "422: bad body"  # type: ignore[union-attr]
    assert [e.job_id for e in box.in_flight("other")] == ["j1"]
    box.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_coordinator_package_does_not_import_torch() -> None:
    code = ("import sys, engine.coordinator, engine.coordinator.agent; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
