"""End to end, each dialect: a real coordinator server, the agent, the Engine, real models.

A ``gpt2``-shaped job (the name ``gpt2`` mapped to the tiny local GPT-2 in a
test registry) and a ``smollm2-135m`` job go through the agent; the hash the
coordinator stores must equal what ``aitbc-engine run --job FILE --json`` gives.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_entry, write_registry
from coordinators import aitbc_app, doc_app
from coordinators.helpers import engine_cmd, run_agent
from coordinators.server import ServerThread

from engine import Engine

GPT2_JOB = {"type": "inference", "model": "gpt2", "prompt": "Hello GPU", "max_tokens": 6,
            "temperature": 0.0}
SMOL_JOB = {"service_type": "llm_inference",
            "service_request": {"model": "smollm2-135m", "prompt": "The capital of France is",
                                "max_tokens": 4, "temperature": 0.0, "stream": False}}
HEX = "0123456789abcdef"


@pytest.fixture(scope="module")
def gpt2_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("gpt2-registry")
    return write_registry(base / "models.yaml", {"gpt2": tiny_entry(tiny_model_dir)})


@pytest.fixture(scope="module")
def reference_hashes(gpt2_registry: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> dict[str, str]:
    """``aitbc-engine run --job FILE --json --registry R`` for each job, as subprocesses."""
    base = tmp_path_factory.mktemp("jobs")
    procs = {}
    for name, job in (("gpt2", GPT2_JOB), ("smollm2-135m", SMOL_JOB)):
        path = base / f"{name}.json"
        path.write_text(json.dumps(job))
        procs[name] = subprocess.Popen(
            engine_cmd("run", "--job", str(path), "--json", "--registry", str(gpt2_registry),
                       "--device", "cpu"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr
        result = json.loads(stdout)
        assert result["status"] == "completed"
        out[name] = result["result_hash"]
    return out


@pytest.fixture(scope="module")
def engine(gpt2_registry: Path) -> Iterator[Engine]:
    with Engine(gpt2_registry, devices=["cpu"]) as e:
        yield e


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("sha256:") and len(value) == 71 \
        and all(c in HEX for c in value[7:])


@pytest.mark.slow
def test_aitbc_end_to_end(tmp_path: Path, engine: Engine,
                          reference_hashes: dict[str, str]) -> None:
    app = aitbc_app.create_app(tmp_path / "coord.db")
    st = app.state.coord
    with ServerThread(app) as url:
        j_gpt2 = st.add_job(GPT2_JOB, constraints={"models": ["gpt2"]})
        j_smol = st.add_job(SMOL_JOB, constraints={"models": ["smollm2-135m"]})
        agent, report = run_agent("aitbc", url, engine, tmp_path / "state", max_jobs=2)
    assert report.completed == 2 and report.results_submitted == 2 and report.pending_left == 0
    miner = st.miner("miner-test")
    assert miner is not None and {"gpt2", "smollm2-135m"} <= set(miner["capabilities"]["models"])
    assert miner["capabilities"]["max_concurrent_jobs"] == 1
    assert miner["status"] == "DEREGISTERED"
    for job_id, name in ((j_gpt2, "gpt2"), (j_smol, "smollm2-135m")):
        job = st.job(job_id)
        assert job["state"] == "COMPLETED"
        assert _is_hash(job["result"]["result_hash"])
        assert job["result"]["result_hash"] == reference_hashes[name]
        m = job["metrics"]
        assert m["unit_type"] == "cpu_seconds"  # CPU-only: units are the execution seconds
        assert m["units"] == m["execution_time_seconds"] > 0
        assert m["gpu_time_seconds"] == 0.0
        assert m["duration_ms"] == round(m["execution_time_seconds"] * 1000)
        assert job["result"]["execution_time"] == m["execution_time_seconds"]
        assert job["receipt"]["job_id"] == job_id
        assert len(st.attempts(job_id)) == 1
    assert st.job(j_smol)["result"]["output"]["text"].startswith(" Paris")
    acked = agent.outbox.acked()
    assert {a["job_id"] for a in acked} == {j_gpt2, j_smol}
    assert all(a["receipt"] is not None for a in acked)


@pytest.mark.slow
def test_doc_end_to_end(tmp_path: Path, engine: Engine,
                        reference_hashes: dict[str, str]) -> None:
    app = doc_app.create_app(tmp_path / "coord.db")
    st = app.state.coord
    with ServerThread(app) as url:
        j_v100 = st.add_job(GPT2_JOB, gpu_type="v100")  # not this machine: filtered out
        j_gpt2 = st.add_job(GPT2_JOB)
        j_smol = st.add_job(SMOL_JOB, gpu_type="cpu")
        _, report = run_agent("doc", url, engine, tmp_path / "state", max_jobs=2)
    assert report.completed == 2 and report.pending_left == 0
    assert st.job(j_v100)["state"] == "available"
    [miner] = st.miners()
    assert miner["gpu_type"] == "cpu" and miner["location"] == "test-lab"
    for job_id, name in ((j_gpt2, "gpt2"), (j_smol, "smollm2-135m")):
        job = st.job(job_id)
        assert job["state"] == "completed" and job["miner_id"] == miner["miner_id"]
        assert job["result_hash"] == reference_hashes[name]
        assert job["metrics"]["execution_time_seconds"] > 0
        assert job["metrics"]["gpu_time_seconds"] == 0.0
        assert [a["status"] for a in st.attempts(job_id)] == [200]
