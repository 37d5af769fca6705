"""The local API: a real uvicorn server on a loopback port, spoken to with httpx."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import tiny_entry, write_registry
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine, parse_payload
from engine.errors import UnknownModelError
from engine.hardware import discover
from engine.jobqueue import JobQueue, JobRecord
from engine.server import (
    JobStore,
    TokenFileError,
    create_app,
    is_loopback,
    load_or_create_token,
    mask_secret,
    running_server,
)

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 64 * 1024


def gen_job(prompt: str = "Hello GPU", **params: Any) -> dict[str, Any]:
    """An engine-JSON generation job for the tiny model."""
    return {"task": "text-generation", "model": "tiny-gpt2", "prompt": prompt,
            "params": {"max_tokens": 4, **params}}


@pytest.fixture(scope="module")
def engine(registry_path: Path) -> Iterator[Engine]:
    with Engine(registry_path, devices=["cpu"], job_timeout=120) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    app = create_app(engine, token=TOKEN, max_body_bytes=BODY_LIMIT, max_queue=16)
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str | None = None,
                 field: str | None = None) -> dict[str, Any]:
    """The response is an error of the documented shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) <= {"code", "message", "field"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if field is not None:
        assert err.get("field") == field, err
    return err


def assert_serving(client: httpx.Client) -> None:
    """The server still answers, health and a real job."""
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/jobs", json=gen_job("Hello world", max_tokens=2))
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed with prometheus-client's parser."""
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------------ same result everywhere

@pytest.mark.slow
def test_job_over_http_matches_engine_run_and_cli(client: httpx.Client, registry_path: Path,
                                                  engine: Engine) -> None:
    job = gen_job("The quick brown fox", max_tokens=6)
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 200, r.text
    served = r.json()
    assert served["status"] == "completed" and served["model"] == "tiny-gpt2"

    with Engine(registry_path, devices=["cpu"]) as fresh:
        direct = fresh.run(parse_payload(job))
    assert direct.ok and direct.result_hash == served["result_hash"]
    assert direct.output is not None
    assert direct.output.model_dump(mode="json", exclude_none=True) == served["output"]

    cli = subprocess.run(
        [sys.executable, "-m", "engine", "run", "tiny-gpt2", "--registry", str(registry_path),
         "--device", "cpu", "--prompt", "The quick brown fox", "--max-tokens", "6", "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["result_hash"] == served["result_hash"]


def test_coordinator_payload_shapes_give_the_same_hash(client: httpx.Client) -> None:
    engine_json = client.post("/v1/jobs", json=gen_job("Hello GPU", max_tokens=3)).json()
    flat = client.post("/v1/jobs", json={"type": "inference", "model": "tiny-gpt2",
                                         "prompt": "Hello GPU", "max_tokens": 3,
                                         "temperature": 0.0}).json()
    service = client.post("/v1/jobs", json={"service_type": "llm_inference", "service_request": {
        "model": "tiny-gpt2", "prompt": "Hello GPU", "max_tokens": 3, "temperature": 0.0,
        "stream": False}}).json()
    assert engine_json["status"] == flat["status"] == service["status"] == "completed"
    assert engine_json["result_hash"] == flat["result_hash"] == service["result_hash"]
    # a coordinator job id is kept
    kept = client.post("/v1/jobs", json={"type": "inference", "job_id": "job_abc123-srv",
                                         "model": "tiny-gpt2", "prompt": "Hi",
                                         "max_tokens": 1}).json()
    assert kept["job_id"] == "job_abc123-srv"


def test_embedding_job(client: httpx.Client, engine: Engine) -> None:
    rows = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    if not rows["all-minilm-l6-v2"]["available"]:
        pytest.skip(rows["all-minilm-l6-v2"]["reason"])
    payload = {"type": "embedding", "model": "all-minilm-l6-v2", "input": ["hello", "GPU"]}
    r = client.post("/v1/jobs", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed" and body["output"]["dimensions"] == 384
    assert len(body["output"]["embeddings"]) == 2
    assert engine.run(payload).result_hash == body["result_hash"]


@pytest.mark.slow
def test_smollm2_over_http(client: httpx.Client, registry_path: Path) -> None:
    rows = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    if not rows["smollm2-135m"]["available"]:
        pytest.skip(rows["smollm2-135m"]["reason"])
    job = {"type": "inference", "model": "smollm2-135m", "prompt": "The capital of France is",
           "max_tokens": 3, "temperature": 0.0}
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "completed", body
    assert body["output"]["text"].startswith(" Paris")
    assert client.delete("/v1/models/smollm2-135m").json()["evicted"]
    with Engine(registry_path, devices=["cpu"]) as fresh:
        assert fresh.run(job).result_hash == body["result_hash"]


# ------------------------------------------------------------------ async jobs

def wait_state(client: httpx.Client, job_id: str, states: set[str],
               timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code == 404 and time.monotonic() < deadline:  # posted by another thread
            time.sleep(0.02)
            continue
        assert r.status_code == 200, r.text
        view = r.json()
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"job stuck in {view['state']}"
        time.sleep(0.02)


def test_wait_false_returns_202_then_the_result(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", params={"wait": "false"}, json=gen_job("Hello network"))
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["state"] in ("queued", "running")
    assert r.headers["location"] == accepted["url"] == f"/v1/jobs/{accepted['job_id']}"
    view = wait_state(client, accepted["job_id"], {"completed", "failed"})
    assert view["state"] == "completed" and view["finished_at"]
    same = client.post("/v1/jobs", json=gen_job("Hello network")).json()
    assert view["result"]["result_hash"] == same["result_hash"]
    # cancelling a finished job is a conflict
    assert_error(client.delete(f"/v1/jobs/{accepted['job_id']}"), 409, "job_finished", "job_id")


def test_a_job_id_beyond_latin_1_is_refused_and_safe_ids_get_their_location(
        client: httpx.Client) -> None:
    """Found by the schema fuzzer: the Location header of a 202 was a 500 for such an id;
    ids are now limited to a safe ASCII set (README), so it is a 422 naming job_id."""
    r = client.post("/v1/jobs", params={"wait": "false"},
                    json={**gen_job(max_tokens=1), "job_id": "jöb-✓-\U0004c116"})
    assert_error(r, 422, "invalid_job", "job_id")
    job_id = "Job:1.a_b-C"
    r = client.post("/v1/jobs", params={"wait": "false"},
                    json={**gen_job(max_tokens=1), "job_id": job_id})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == r.json()["url"] == "/v1/jobs/Job%3A1.a_b-C"
    assert wait_state(client, job_id, {"completed", "failed"})["state"] == "completed"


def test_duplicate_job_id_is_409(client: httpx.Client) -> None:
    job = {**gen_job(max_tokens=1), "job_id": "dup-job-1"}
    assert client.post("/v1/jobs", json=job).status_code == 200
    assert_error(client.post("/v1/jobs", json=job), 409, "job_exists", "job_id")
    assert_serving(client)


# ------------------------------------------------------------------ errors

def test_health_needs_no_token_and_everything_else_does(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as anon:
        health = anon.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        for method, path in (("GET", "/v1/hardware"), ("GET", "/v1/models"),
                             ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"),
                             ("DELETE", "/v1/jobs/x"), ("POST", "/v1/models/tiny-gpt2/load"),
                             ("DELETE", "/v1/models/tiny-gpt2"), ("GET", "/metrics"),
                             ("GET", "/openapi.json")):
            r = anon.request(method, path, json=gen_job() if method == "POST" else None)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        wrong = anon.get("/v1/models", headers={"Authorization": "Bearer not-the-token"})
        assert_error(wrong, 401, "unauthorized")
        basic = anon.get("/v1/models", headers={"Authorization": "Basic " + TOKEN})
        assert_error(basic, 401, "unauthorized")
        assert TOKEN not in wrong.text
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as ok:
        assert_serving(ok)


def test_oversized_body_is_413(client: httpx.Client) -> None:
    huge = {"model": "tiny-gpt2", "task": "text-generation", "prompt": "x" * (BODY_LIMIT + 1)}
    assert_error(client.post("/v1/jobs", json=huge), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    assert_error(client.post("/v1/jobs", content=chunks()), 413, "payload_too_large")
    assert_serving(client)


@pytest.mark.parametrize(("payload", "field"), [
    ({"task": "text-generation", "model": "tiny-gpt2", "prompt": "x",
      "params": {"max_tokens": 0}}, "params.max_tokens"),
    ({"task": "text-generation", "model": "tiny-gpt2", "prompt": "x", "colour": "red"},
     "colour"),
    ({"type": "inference", "model": "tiny-gpt2", "prompt": "x", "temperature": "hot"},
     "temperature"),
    ({"service_type": "llm_inference", "service_request": {"model": "tiny-gpt2", "prompt": "x",
                                                           "max_tokens": -3}},
     "service_request.max_tokens"),
    ({"type": "transcribe", "model": "tiny-gpt2"}, "type"),
    ({"task": "text-generation", "model": "tiny-gpt2"}, "prompt"),
    ({"task": "embedding", "model": "tiny-gpt2", "input": ["a"]}, "task"),
    ({"task": "text-generation", "model": "tiny-gpt2", "prompt": "x",
      "params": {"max_tokens": 256}}, "max_tokens"),
])
def test_malformed_job_is_422_naming_the_field(client: httpx.Client, payload: dict[str, Any],
                                               field: str) -> None:
    assert_error(client.post("/v1/jobs", json=payload), 422, field=field)


def test_not_json_and_bad_query_are_422(client: httpx.Client) -> None:
    err = assert_error(client.post("/v1/jobs", content=b"{not json"), 422, "invalid_job")
    assert "not JSON" in err["message"]
    assert_error(client.post("/v1/jobs", content=b"[1, 2]"), 422, "invalid_job")
    assert_error(client.post("/v1/jobs", params={"wait": "perhaps"}, json=gen_job()), 422,
                 "validation_error", "wait")
    assert_serving(client)


def test_unknown_model_job_route_are_404(client: httpx.Client) -> None:
    err = assert_error(client.post("/v1/jobs", json={**gen_job(), "model": "no-such-model"}),
                       404, "unknown_model", "model")
    assert "tiny-gpt2" in err["message"]  # says what the registry holds
    assert_error(client.post("/v1/jobs", json={"service_type": "llm_inference",
                                               "service_request": {"model": "nope",
                                                                   "prompt": "x"}}),
                 404, "unknown_model")
    assert_error(client.get("/v1/jobs/never-seen"), 404, "unknown_job", "job_id")
    assert_error(client.delete("/v1/jobs/never-seen"), 404, "unknown_job", "job_id")
    assert_error(client.post("/v1/models/no-such-model/load"), 404, "unknown_model")
    assert_error(client.delete("/v1/models/no-such-model"), 404, "unknown_model")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.put("/v1/jobs"), 405, "method_not_allowed")
    assert_serving(client)


@pytest.fixture(scope="module")
def missing_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model plus ``missing-gpt2``, whose weights directory does not exist."""
    base = tmp_path_factory.mktemp("missing")
    return write_registry(base / "models.yaml", {
        "tiny-gpt2": tiny_entry(tiny_model_dir),
        "missing-gpt2": tiny_entry(base / "no-such-dir", parameters=150_000)})


def test_unloadable_model_is_409(missing_registry: Path) -> None:
    with Engine(missing_registry, devices=["cpu"]) as eng:
        app = create_app(eng, token=TOKEN)
        with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH,
                                                      timeout=120) as client:
            rows = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
            assert not rows["missing-gpt2"]["available"] and rows["missing-gpt2"]["reason"]
            assert not rows["missing-gpt2"]["runnable"]
            assert_error(client.post("/v1/models/missing-gpt2/load"), 409, "weights_unavailable")
            job = client.post("/v1/jobs", json={"type": "inference", "model": "missing-gpt2",
                                                "prompt": "Hi", "max_tokens": 2})
            assert job.status_code == 200 and job.json()["status"] == "failed"
            assert job.json()["error"]["code"] == "weights_unavailable"
            assert_serving(client)


# ------------------------------------------------------------------ queue, cancellation

@pytest.fixture()
def small_queue(registry_path: Path) -> Iterator[tuple[Engine, httpx.Client]]:
    """A server whose engine runs one job at a time and queues at most one more."""
    with Engine(registry_path, devices=["cpu"], batch_size=1) as eng:
        app = create_app(eng, token=TOKEN, max_queue=1)
        with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH,
                                                      timeout=120) as c:
            yield eng, c


def test_full_queue_is_503_with_retry_after(small_queue: tuple[Engine, httpx.Client]) -> None:
    engine, client = small_queue
    loaded = engine.load("tiny-gpt2")
    with loaded.lock:  # the model is busy: the first job runs and stays on the device
        first = client.post("/v1/jobs?wait=false", json=gen_job(max_tokens=2)).json()
        wait_state(client, first["job_id"], {"running"})
        second = client.post("/v1/jobs?wait=false", json=gen_job(max_tokens=2))
        assert second.status_code == 202 and second.json()["state"] == "queued"
        full = client.post("/v1/jobs", json=gen_job(max_tokens=2))
        assert_error(full, 503, "queue_full")
        assert int(full.headers["retry-after"]) >= 1
        assert client.get("/health").json()["jobs_in_flight"] == 2
        samples = metric_samples(client)
        assert samples[("aitbc_engine_jobs", (("state", "running"),))] == 1
        assert samples[("aitbc_engine_jobs", (("state", "queued"),))] == 1
        assert samples[("aitbc_engine_jobs_rejected_total", (("code", "queue_full"),))] == 1
        # cancelling the queued job frees its place at once
        cancelled = client.delete(f"/v1/jobs/{second.json()['job_id']}")
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
        view = wait_state(client, second.json()["job_id"], {"cancelled"})
        assert view["result"]["error"]["code"] == "cancelled"
        third = client.post("/v1/jobs?wait=false", json=gen_job(max_tokens=2))
        assert third.status_code == 202
    for job_id in (first["job_id"], third.json()["job_id"]):
        assert wait_state(client, job_id, {"completed", "failed"})["state"] == "completed"
    assert_serving(client)


def test_cancel_running_job(small_queue: tuple[Engine, httpx.Client]) -> None:
    engine, client = small_queue
    loaded = engine.load("tiny-gpt2")
    with loaded.lock:
        job = client.post("/v1/jobs?wait=false", json=gen_job(max_tokens=50)).json()
        wait_state(client, job["job_id"], {"running"})
        r = client.delete(f"/v1/jobs/{job['job_id']}")
        assert r.status_code == 202 and r.json()["state"] == "cancelling"
    view = wait_state(client, job["job_id"], {"cancelled", "completed", "failed"})
    assert view["state"] == "cancelled", view
    samples = metric_samples(client)
    key = ("aitbc_engine_jobs_finished_total", (("model", "tiny-gpt2"), ("status", "cancelled")))
    assert samples[key] == 1
    assert_serving(client)


def test_wait_true_request_answers_when_the_job_finishes(
        small_queue: tuple[Engine, httpx.Client]) -> None:
    engine, client = small_queue
    loaded = engine.load("tiny-gpt2")
    answers: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=client.base_url, headers=AUTH, timeout=120) as own:
            answers.append(own.post("/v1/jobs", json={**gen_job(max_tokens=2),
                                                      "job_id": "blocked-1"}))

    with loaded.lock:
        t = threading.Thread(target=post)
        t.start()
        wait_state(client, "blocked-1", {"running"})
        assert not answers  # still waiting on the busy device
        assert client.get("/health").status_code == 200  # the event loop is free meanwhile
    t.join(60)
    assert answers and answers[0].status_code == 200
    assert answers[0].json()["status"] == "completed"


# ------------------------------------------------------------------ models, hardware, metrics

def test_models_load_and_evict(client: httpx.Client) -> None:
    client.delete("/v1/models/tiny-gpt2")
    listing = client.get("/v1/models").json()
    rows = {m["name"]: m for m in listing["models"]}
    assert rows["tiny-gpt2"]["available"] and rows["tiny-gpt2"]["runnable"]
    assert not rows["tiny-gpt2"]["warm"] and listing["weights"] == "pretrained"
    loaded = client.post("/v1/models/tiny-gpt2/load")
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert body["devices"] == ["cpu"] and body["dtype"] == "float32" and not body["was_warm"]
    assert body["weights_digest"].startswith("sha256:")
    assert client.post("/v1/models/tiny-gpt2/load").json()["was_warm"]
    rows = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert rows["tiny-gpt2"]["warm"] and rows["tiny-gpt2"]["warm_on"] == ["cpu"]
    samples = metric_samples(client)
    assert samples[("aitbc_engine_models_loaded", (("model", "tiny-gpt2"),))] == 1
    evicted = client.delete("/v1/models/tiny-gpt2").json()
    assert evicted["model"] == "tiny-gpt2" and len(evicted["evicted"]) == 1
    rows = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert not rows["tiny-gpt2"]["warm"]
    assert_serving(client)


def test_models_rows_are_the_cli_rows(client: httpx.Client, registry_path: Path) -> None:
    cli = subprocess.run([sys.executable, "-m", "engine", "models", "--json", "--registry",
                          str(registry_path)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    served = client.get("/v1/models").json()["models"]
    extra = {"runnable", "warm", "warm_on"}
    assert [{k: v for k, v in row.items() if k not in extra} for row in served] == \
        json.loads(cli.stdout)["models"]


@pytest.mark.slow
def test_hardware_is_info_json(client: httpx.Client) -> None:
    served = client.get("/v1/hardware").json()
    local = discover().to_dict()
    assert set(served) == set(local) | {"cpu_linear_kernel", "fast_paths"}
    assert isinstance(served["fast_paths"], list)
    cli = subprocess.run([sys.executable, "-m", "engine", "info", "--json"], capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    info = json.loads(cli.stdout)
    assert set(info) | {"fast_paths"} == set(served)
    assert served["cpu_linear_kernel"] == info["cpu_linear_kernel"]
    assert set(served["cpu_linear_kernel"]) == {"available", "in_use", "reason", "blocks", "build"}
    assert [d["id"] for d in served["devices"]] == [d["id"] for d in local["devices"]]
    assert served["torch_version"] == local["torch_version"]


def test_metrics_parse_and_move_after_a_job(client: httpx.Client) -> None:
    before = metric_samples(client)
    done = ("aitbc_engine_jobs_finished_total", (("model", "tiny-gpt2"), ("status", "completed")))
    count = ("aitbc_engine_job_duration_seconds_count", (("model", "tiny-gpt2"),))
    completion = ("aitbc_engine_tokens_total", (("kind", "completion"), ("model", "tiny-gpt2")))
    gpu = ("aitbc_engine_gpu_seconds_total", (("model", "tiny-gpt2"),))
    r = client.post("/v1/jobs", json=gen_job("Numbers: 1 2 3", max_tokens=5))
    assert r.json()["status"] == "completed"
    after = metric_samples(client)
    assert after[done] == before.get(done, 0) + 1
    assert after[count] == before.get(count, 0) + 1
    assert after[completion] == before.get(completion, 0) + r.json()["metrics"][
        "completion_tokens"]
    assert after[gpu] == before.get(gpu, 0)  # CPU run: no GPU seconds
    for name in ("aitbc_engine_queue_length", "aitbc_engine_jobs_in_flight"):
        assert after[(name, ())] == 0
    # a refused job is counted too
    client.post("/v1/jobs", json={**gen_job(), "model": "no-such-model"})
    refused = ("aitbc_engine_jobs_rejected_total", (("code", "unknown_model"),))
    assert metric_samples(client)[refused] == before.get(refused, 0) + 1


def test_estimate_route_needs_a_profile(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/estimate" in schema["paths"]
    r = client.post("/v1/estimate", json={"prompt_tokens": 8, "max_tokens": 8,
                                          "price_per_hour": 0.05})
    assert_error(r, 409, "no_profile")


def test_estimate_from_a_real_profile(tmp_path: Path, registry_path: Path,
                                      engine: Engine) -> None:
    from engine import pricing
    from engine.bench.report import BenchConfig
    from engine.bench.scenarios import run_bench

    config = BenchConfig(model="tiny-gpt2", device="cpu", scenarios=["single"],
                         prompt_tokens=[4, 16], new_tokens=[2, 6], min_runs=1, min_seconds=0.0,
                         warmup_runs=0, load_repeats=1)
    report = run_bench(config, registry=registry_path, probe_bandwidth=False)
    path = tmp_path / "report.json"
    path.write_text(report.model_dump_json())
    app = create_app(engine, token=TOKEN, profile=path)
    shape = {"prompt_tokens": 10, "max_tokens": 5, "price_per_hour": 0.05, "gpu_count": 2}
    with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH,
                                                  timeout=60) as c:
        r = c.post("/v1/estimate", json=shape)
        assert r.status_code == 200, r.text
        body = r.json()
        expected = pricing.estimate(pricing.load_profile(path), prompt_tokens=10, max_tokens=5,
                                    price_per_hour=0.05, gpu_count=2)
        assert body == {"profile": str(path), "estimate": expected.model_dump(mode="json")}
        assert body["estimate"]["gpu_seconds"] == pytest.approx(
            2 * body["estimate"]["estimated_time"])
        assert_error(c.post("/v1/estimate", json={**shape, "model": "smollm2-135m"}), 422,
                     field="model")
        assert_error(c.post("/v1/estimate", json={**shape, "max_tokens": 0}), 422,
                     "validation_error", "max_tokens")
        assert_error(c.post("/v1/estimate", json={**shape, "extra": 1}), 422, field="extra")
        assert c.post("/v1/estimate", json={**shape, "model": "tiny-gpt2"}).status_code == 200
        assert body["estimate"]["warnings"] == []  # the server runs jobs as the bench did
    # A server whose jobs run otherwise than the profile's says so, as `price` does.
    with Engine(registry_path, devices=["cpu"], batch_size=3) as other, \
            running_server(create_app(other, token=TOKEN, profile=path)) as url, \
            httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        r = c.post("/v1/estimate", json=shape)
        assert r.status_code == 200, r.text
        warnings = r.json()["estimate"]["warnings"]
        assert len(warnings) == 1 and "batch_size" in warnings[0] and "3" in warnings[0]


# ------------------------------------------------------------------ token, store, helpers

def test_token_is_made_once_with_mode_0600(tmp_path: Path, engine: Engine) -> None:
    state = tmp_path / "state"
    app = create_app(engine, state_dir=state)
    token_file = state / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and app.state.token == token
    again = create_app(engine, state_dir=state)
    assert again.state.token == token
    with running_server(app) as url:
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {token}"},
                         timeout=60).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=60).status_code == 401


def test_token_file_mode_is_tightened_and_bad_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("abcdefghijklmnop\n")
    path.chmod(0o644)
    token, where, created = load_or_create_token(tmp_path)
    assert (token, where, created) == ("abcdefghijklmnop", path, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("abc def\n")
    with pytest.raises(TokenFileError, match="delete it"):
        load_or_create_token(tmp_path)


def test_create_app_checks_its_arguments(engine: Engine) -> None:
    with pytest.raises(UnknownModelError):
        create_app(engine, token=TOKEN, preload=["no-such-model"])
    with pytest.raises(ValueError, match="token"):
        create_app(engine, token="has space")
    with pytest.raises(ValueError, match="max_queue"):
        create_app(engine, token=TOKEN, max_queue=-1)


def test_preload_warms_the_model_and_health_says_so(missing_registry: Path) -> None:
    with Engine(missing_registry, devices=["cpu"]) as eng:
        app = create_app(eng, token=TOKEN, preload=["tiny-gpt2", "missing-gpt2"])
        with running_server(app) as url:
            deadline = time.monotonic() + 60
            while (health := httpx.get(url + "/health", timeout=30).json())["status"] == \
                    "loading":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert health["status"] == "error"
            assert "missing-gpt2: weights_unavailable" in health["message"]
            assert eng.pool.is_warm("tiny-gpt2")


def test_job_queue_waits_for_jobs_without_a_thread_each(registry_path: Path) -> None:
    with Engine(registry_path, devices=["cpu"], batch_size=1) as eng:
        queue = JobQueue(eng, max_queue=16)
        loaded = eng.load("tiny-gpt2")
        with loaded.lock:  # the model is busy: every job waits
            first = queue.submit(gen_job(max_tokens=1))
            deadline = time.monotonic() + 60
            while first.state != "running":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            threads = threading.active_count()
            records = [queue.submit(gen_job(max_tokens=1)) for _ in range(8)]
            assert threading.active_count() < threads + len(records)  # not one per job
            assert queue.in_flight == 9 and queue.store.active_count() == 9
            assert not any(r.finished.done() for r in records)
        results = [r.finished.result(60) for r in (first, *records)]
        assert all(r.ok for r in results)
        assert asyncio.run(records[-1].outcome()) == results[-1]
        assert queue.in_flight == 0 and queue.store.active_count() == 0
        assert all(r.state == "completed" and r.finished_at for r in records)


def test_job_store_keeps_a_bounded_history(engine: Engine) -> None:
    store = JobStore(history=2)
    records = []
    for n in range(4):
        job = parse_payload(gen_job(max_tokens=1), job_id=f"hist-{n}")
        records.append(JobRecord(job=job, handle=engine.submit(job), accepted_at=time.time()))
        store.add(records[-1])
    assert store.active_count() == 4
    for record in records:
        record.result = record.handle.result(60)
        store.finish(record)
    assert store.active_count() == 0
    assert [store.get(f"hist-{n}") is not None for n in range(4)] == [False, False, True, True]


def test_helpers() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    masked = mask_secret(TOKEN)
    assert TOKEN[:4] not in masked and str(len(TOKEN)) in masked
