"""Bad input gets a 4xx naming the field (never a 500), on a real server, and the CLI exits 2.

Issue 15, item 5: deeply nested JSON, 5,000-digit integers, unsafe job ids,
temperatures too small to divide by, estimates past the model's context, and
binary registry files.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import Engine, parse_payload
from engine.bench.cost_model import CostModel
from engine.cli import main
from engine.coordinator.base import build_job
from engine.errors import InvalidJobError, RegistryError
from engine.payloads import MAX_JSON_DEPTH, JsonInputError, load_json
from engine.pricing import Profile
from engine.registry import Registry
from engine.server import create_app, running_server
from engine.verify import VerificationInputError, parse_result

TOKEN = "bad-inputs-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIGITS = "9" * 5000
DEEP = 100_000  # far past the parser's recursion limit


@pytest.fixture(scope="module")
def engine(registry_path: Path) -> Iterator[Engine]:
    with Engine(registry_path, devices=["cpu"], job_timeout=120) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    app = create_app(engine, token=TOKEN, max_body_bytes=1024 * 1024, max_queue=64)
    # A real profile object for the tiny model (context length 256), so /v1/estimate prices.
    app.state.service.profile = Profile(
        source="test", model="tiny-gpt2", weights="pretrained", dtype="float32", device="cpu",
        device_class="cpu", gpu_type=None, device_count=1, created_at="2025-01-01T00:00:00Z",
        cost_model=CostModel(fixed_seconds=0.01, prefill_seconds_per_token=1e-4,
                             decode_seconds_per_token=1e-3, points=4, rmse_seconds=0.0,
                             max_relative_error=0.0))
    app.state.service.profile_path = Path("profile.json")
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as c:
        yield c


def flat(**extra: Any) -> dict[str, Any]:
    return {"type": "inference", "model": "tiny-gpt2", "prompt": "Hello GPU", "max_tokens": 1,
            **extra}


def estimate_shape(**extra: Any) -> dict[str, Any]:
    return {"prompt_tokens": 8, "max_tokens": 8, "price_per_hour": 0.05, **extra}


def post_raw(client: httpx.Client, path: str, text: str) -> httpx.Response:
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def assert_4xx(response: httpx.Response, status: int = 422,
               field: str | None = None) -> dict[str, Any]:
    """An error in the API's shape with ``status``, naming ``field`` when given."""
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) <= {"code", "message", "field"} and err["message"]
    if field is not None:
        assert err.get("field") == field, err
    return dict(err)


def assert_serving(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", json=flat())
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    r = client.post("/v1/estimate", json=estimate_shape())
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ deep nesting

def test_deeply_nested_json_is_422_naming_the_field(client: httpx.Client) -> None:
    too_deep = "[" * DEEP + "]" * DEEP
    body = json.dumps(flat())[:-1] + ', "params": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"
    err = assert_4xx(post_raw(client, "/v1/jobs", body), field="params")
    assert f"deeper than {MAX_JSON_DEPTH}" in err["message"]
    # parseable but past the limit: named by the same rule
    shallow = json.dumps({**flat(), "extra": json.loads("[" * 70 + "]" * 70)})
    assert_4xx(post_raw(client, "/v1/jobs", shallow), field="extra")
    assert_4xx(post_raw(client, "/v1/jobs", too_deep))
    deep_service = json.dumps({"service_type": "llm_inference"})[:-1] + \
        ', "service_request": ' + "[" * 3000 + "]" * 3000 + "}"
    assert_4xx(post_raw(client, "/v1/jobs", deep_service), field="service_request")
    est = json.dumps(estimate_shape())[:-1] + ', "model": ' + "[" * 5000 + "]" * 5000 + "}"
    err = assert_4xx(post_raw(client, "/v1/estimate", est), field="model")
    assert err["code"] == "validation_error"
    assert_4xx(post_raw(client, "/v1/estimate", too_deep))
    # 64 levels are fine (a job needs 4)
    assert load_json("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert_serving(client)


# ------------------------------------------------------------------ huge numbers

@pytest.mark.parametrize(("body", "field"), [
    ('{"type": "inference", "model": "tiny-gpt2", "prompt": "x", "max_tokens": %s}',
     "max_tokens"),
    ('{"type": "inference", "model": "tiny-gpt2", "prompt": "x", "seed": -%s}', "seed"),
    ('{"task": "text-generation", "model": "tiny-gpt2", "prompt": "x", '
     '"params": {"top_k": %s}}', "params.top_k"),
    ('{"service_type": "llm_inference", "service_request": {"model": "tiny-gpt2", '
     '"prompt": "x", "max_tokens": %s}}', "service_request.max_tokens"),
    ('{"task": "text-generation", "model": "tiny-gpt2", "prompt_token_ids": [1, %s]}',
     "prompt_token_ids.1"),
])
def test_huge_integers_are_422_naming_the_field(client: httpx.Client, body: str,
                                                field: str) -> None:
    assert_4xx(post_raw(client, "/v1/jobs", body % DIGITS), field=field)


def test_huge_integers_in_estimates_and_ignored_keys(client: httpx.Client) -> None:
    for key in ("prompt_tokens", "max_tokens", "gpu_count"):
        text = json.dumps(estimate_shape())[:-1] + f', "{key}": {DIGITS}}}'
        text = text.replace(f'"{key}": 8, ', "").replace(f'"{key}": 1, ', "")
        assert_4xx(post_raw(client, "/v1/estimate", text), field=key)
    # a network payload's unknown key is ignored (and noted), however big its number
    text = json.dumps(flat())[:-1] + f', "budget": {DIGITS}}}'
    r = post_raw(client, "/v1/jobs", text)
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    assert_serving(client)


# ------------------------------------------------------------------ sampling ranges

@pytest.mark.parametrize(("params", "field"), [
    ({"temperature": 5e-324}, "temperature"),
    ({"temperature": 1e-4}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),
    ({"top_p": 0.0}, "top_p"),
])
def test_sampling_parameters_out_of_their_sane_range_are_422(
        client: httpx.Client, params: dict[str, float], field: str) -> None:
    err = assert_4xx(client.post("/v1/jobs", json=flat(**params)), field=field)
    assert err["code"] == "invalid_job"
    engine_json = {"task": "text-generation", "model": "tiny-gpt2", "prompt": "x",
                   "params": params}
    assert_4xx(client.post("/v1/jobs", json=engine_json), field=f"params.{field}")


def test_the_smallest_temperature_and_greedy_still_run(client: httpx.Client) -> None:
    for temperature in (0.0, 1e-3):
        r = client.post("/v1/jobs", json=flat(temperature=temperature, seed=1))
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text


# ------------------------------------------------------------------ job ids

BAD_IDS = ["a\nb", "job\r\n2025-01-01 INFO forged", "a/b", "a\x00b", "", " x", "-x", ".x",
           "x" * 129, "jöb", "a b", "a%2Fb", "..", "a?b"]
GOOD_IDS = ["job_abc123", "3f2a9c0e1b7d4e6f8a9b0c1d2e3f4a5b",
            "123e4567-e89b-12d3-a456-426614174000", "ns:job.1", "J" * 128]


@pytest.mark.parametrize("job_id", BAD_IDS)
def test_unsafe_job_ids_are_422(client: httpx.Client, job_id: str) -> None:
    assert_4xx(client.post("/v1/jobs", json=flat(job_id=job_id)), field="job_id")
    with pytest.raises(InvalidJobError) as err:
        parse_payload(flat(), job_id=job_id)  # a coordinator's id takes the same rule
    assert err.value.field == "job_id"
    assigned = build_job(job_id, flat())  # the agent reports a failure, it does not crash
    assert assigned.job is None and assigned.error is not None
    assert assigned.error.field == "job_id"


def test_safe_job_ids_are_accepted_and_fetched(client: httpx.Client) -> None:
    for job_id in GOOD_IDS:
        r = client.post("/v1/jobs", params={"wait": "false"}, json=flat(job_id=job_id))
        assert r.status_code == 202, r.text
        got = client.get(r.headers["location"])
        assert got.status_code == 200 and got.json()["job_id"] == job_id, got.text
        assert client.get(f"/v1/jobs/{job_id}").json()["job_id"] == job_id


def test_unsafe_ids_in_the_path_are_422(client: httpx.Client) -> None:
    for path in ("/v1/jobs/a%0Ab", "/v1/jobs/a%00b", "/v1/jobs/-x", "/v1/jobs/" + "x" * 129,
                 "/v1/jobs/j%C3%B6b"):
        assert_4xx(client.get(path), field="job_id")
        assert_4xx(client.delete(path), field="job_id")
    assert_4xx(client.get("/v1/jobs/never-seen"), 404, field="job_id")
    assert_serving(client)


# ------------------------------------------------------------------ estimate vs. context

def test_estimate_refuses_a_shape_past_the_context(client: httpx.Client) -> None:
    # tiny-gpt2's context is 256 tokens
    err = assert_4xx(client.post("/v1/estimate", json=estimate_shape(prompt_tokens=300)),
                     field="prompt_tokens")
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    assert_4xx(client.post("/v1/estimate", json=estimate_shape(prompt_tokens=250)),
               field="prompt_tokens")
    assert_4xx(client.post("/v1/estimate", json=estimate_shape(max_tokens=256)),
               field="max_tokens")
    fits = client.post("/v1/estimate", json=estimate_shape(prompt_tokens=248))
    assert fits.status_code == 200 and fits.json()["estimate"]["prompt_tokens"] == 248
    assert_serving(client)


# ------------------------------------------------------------------ registry files

@pytest.mark.parametrize("data", [
    bytes(range(256)) * 8,
    "version: 1\nmodels:\n  caf\xe9: {}\n".encode("latin-1"),
    "version: 1\n".encode("utf-16"),
    b"version: " + DIGITS.encode() + b"\nmodels: {}\n",
    b"models: " + b"[" * 800 + b"]" * 800 + b"\n",
    b"version: 1\nmodels: {a: {context_length: 2024-13-45 99:99}}\n",
    b"version: 1\nmodels: {}\x00\n",
], ids=["binary", "latin-1", "utf-16", "huge-int", "deep", "bad-date", "nul"])
def test_a_bad_registry_file_is_a_typed_error_naming_it(tmp_path: Path, data: bytes,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    path = tmp_path / "models.yaml"
    path.write_bytes(data)
    with pytest.raises(RegistryError) as err:
        Registry.load(path)
    assert str(path) in err.value.message
    assert main(["models", "--registry", str(path)]) == 2
    out = capsys.readouterr()
    assert "invalid_registry" in out.err and str(path) in out.err
    assert "Traceback" not in out.err
    assert main(["serve", "--registry", str(path), "--state-dir", str(tmp_path / "state"),
                 "--port", "0"]) == 2
    out = capsys.readouterr()
    assert "invalid_registry" in out.err and str(path) in out.err


# ------------------------------------------------------------------ the CLI's job files

@pytest.mark.parametrize(("text", "needle"), [
    ('{"type": "inference", "model": "tiny-gpt2", "prompt": "x", "params": '
     + "[" * DEEP + "]" * DEEP + "}", "deeper than 64"),
    (f'{{"type": "inference", "model": "tiny-gpt2", "prompt": "x", "max_tokens": {DIGITS}}}',
     "max_tokens"),
    ('{"type": "inference", "model": "tiny-gpt2", "prompt": "x", "temperature": 5e-324}',
     "temperature"),
    ('{"type": "inference", "model": "tiny-gpt2", "prompt": "x", "job_id": "a/b"}', "job_id"),
], ids=["deep", "huge-int", "temperature", "job-id"])
def test_run_job_file_with_bad_input_exits_2(tmp_path: Path, text: str, needle: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.json"
    path.write_text(text)
    assert main(["run", "--job", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid_job" in err and needle in err and "Traceback" not in err


def test_verify_reads_a_bad_result_as_a_typed_error() -> None:
    for text in ("[" * DEEP + "]" * DEEP, '{"job_id": "j", "n": ' + DIGITS + "}"):
        with pytest.raises(VerificationInputError):
            parse_result(text)
    with pytest.raises(JsonInputError):
        load_json(b"\xff\xfe not utf-8")


# ------------------------------------------------------------------ property: no 5xx

_INT_FIELDS = ["max_tokens", "top_k", "seed"]
_FLOAT_FIELDS = ["temperature", "top_p", "repetition_penalty"]


def _json_values() -> st.SearchStrategy[str]:
    """JSON text of any value: plain ones, huge integers, and nesting past the limit."""
    plain = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(string.ascii_letters, max_size=8), inner, max_size=4),
        max_leaves=12).map(json.dumps)
    huge = st.builds(lambda sign, n: sign + "9" * n, st.sampled_from(["", "-"]),
                     st.integers(20, 6000))
    deep = st.builds(lambda open_, n: open_ * n + "1" + {"[": "]", '{"k":': "}"}[open_] * n,
                     st.sampled_from(["[", '{"k":']), st.integers(60, 4000))
    odd = st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "5e-324", "-0.0",
                           '"a\\nb"', '"\\u0000"', '"x/y"', "1.0e400"])
    return st.one_of(plain, huge, deep, odd)


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[str, str]:
    """A route and a body: a valid job or shape with one field set to generated JSON."""
    route = draw(st.sampled_from(["/v1/jobs", "/v1/estimate"]))
    if route == "/v1/jobs":
        shape = draw(st.sampled_from(["flat", "engine", "service"]))
        fields = [*_INT_FIELDS, *_FLOAT_FIELDS, "job_id", "prompt", "model", "stop", "extra"]
        base: dict[str, Any] = {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 2}
    else:
        shape = "estimate"
        fields = ["prompt_tokens", "max_tokens", "price_per_hour", "gpu_count", "model"]
        base = estimate_shape()
    field = draw(st.sampled_from(fields))
    value = draw(_json_values())
    if shape == "flat":
        doc = {"type": "inference", **base}
    elif shape == "engine":
        doc = {"task": "text-generation", "model": "tiny-gpt2", "prompt": "Hello",
               "params": {"max_tokens": 2}}
    elif shape == "service":
        doc = {"service_type": "llm_inference", "service_request": base}
    else:
        doc = dict(base)
    holder = doc["params"] if shape == "engine" and field in (*_INT_FIELDS, *_FLOAT_FIELDS) \
        else doc["service_request"] if shape == "service" else doc
    holder[field] = "@@VALUE@@"
    return route, json.dumps(doc).replace('"@@VALUE@@"', value)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(case=_bodies())
@example(case=("/v1/jobs", '{"type": "inference", "model": "tiny-gpt2", "prompt": "x", '
                           '"max_tokens": ' + DIGITS + "}"))
@example(case=("/v1/jobs", "[" * DEEP + "]" * DEEP))
@example(case=("/v1/estimate", '{"prompt_tokens": ' + DIGITS + ', "max_tokens": 1, '
                               '"price_per_hour": 1}'))
@example(case=("/v1/estimate", '{"model": ' + '{"k":' * 3000 + "1" + "}" * 3000 + "}"))
def test_generated_bodies_never_get_a_server_error(base_url: str,
                                                   case: tuple[str, str]) -> None:
    route, body = case
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=120) as c:
        r = post_raw(c, route, body)
        assert r.status_code < 500, (route, body[:200], r.text)
        if r.status_code >= 400:
            assert set(r.json()) == {"error"}
