"""Job parsing: every coordinator payload shape, and typed errors for bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from engine.errors import InvalidJobError, UnsupportedJobTypeError
from engine.jobs import Job, JobResult
from engine.payloads import (
    EmbeddingPayload,
    FlatInference,
    JobPayload,
    ServiceRequest,
    parse_payload,
    payload_json_schema,
)


def test_flat_inference_payload() -> None:
    job = parse_payload({"type": "inference", "model": "gpt2", "prompt": "Hello GPU",
                         "max_tokens": 16, "temperature": 0.0, "top_p": 0.9, "top_k": 40,
                         "seed": 7, "stop": ["\n"]}, job_id="job_abc123")
    assert job.job_id == "job_abc123" and job.model == "gpt2" and job.prompt == "Hello GPU"
    assert job.params.max_tokens == 16 and job.params.greedy and job.params.stop == ["\n"]
    assert job.params.top_k == 40 and job.params.seed == 7


def test_service_request_payload() -> None:
    job = parse_payload({"service_type": "llm_inference", "service_request": {
        "model": "gpt2", "prompt": "Hi", "max_tokens": 256, "temperature": 0.7, "top_p": 0.9,
        "top_k": 40, "repetition_penalty": 1.1, "stop_sequences": ["END"], "stream": False}})
    assert job.params.temperature == 0.7 and job.params.repetition_penalty == 1.1
    assert job.params.stop == ["END"] and not job.params.greedy


def test_embedding_payload() -> None:
    job = parse_payload({"type": "embedding", "model": "all-minilm-l6-v2", "input": ["a", "b"]})
    assert job.task == "embedding" and job.input == ["a", "b"]


def test_engine_json_round_trips() -> None:
    job = parse_payload({"job_id": "j1", "model": "gpt2", "task": "text-generation",
                         "prompt_token_ids": [1, 2, 3], "params": {"max_tokens": 4}})
    assert parse_payload(job.to_json()) == job
    assert parse_payload(job.to_json().encode()) == job


def test_each_wire_shape_is_a_model_that_converts_to_the_same_job() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(JobPayload)
    flat = adapter.validate_python({"type": "inference", "model": "gpt2", "prompt": "Hi",
                                    "max_tokens": 4, "stop": "END"})
    service = adapter.validate_python({"service_type": "llm_inference", "service_request": {
        "model": "gpt2", "prompt": "Hi", "max_tokens": 4, "stop_sequences": ["END"]}})
    engine_json = adapter.validate_python({"model": "gpt2", "task": "text-generation",
                                           "prompt": "Hi", "params": {"max_tokens": 4,
                                                                      "stop": ["END"]}})
    embedding = adapter.validate_python({"type": "embedding", "model": "m", "input": "a"})
    assert isinstance(flat, FlatInference) and isinstance(service, ServiceRequest)
    assert isinstance(engine_json, Job) and isinstance(embedding, EmbeddingPayload)
    jobs = [shape.to_job().model_dump(exclude={"job_id"}) for shape in (flat, service,
                                                                         engine_json)]
    assert jobs[0] == jobs[1] == jobs[2]
    assert embedding.to_job().input == ["a"]


def test_the_payload_schema_is_the_union_of_the_shapes() -> None:
    schema, defs = payload_json_schema()
    refs = {ref["$ref"].rsplit("/", 1)[1] for ref in schema["oneOf"]}
    assert refs == {"Job", "FlatInference", "EmbeddingPayload", "ServiceRequest"}
    assert refs <= set(defs) and "GenerationParams" in defs
    flat = defs["FlatInference"]
    # type may be left out and the input is prompt or messages; other keys are ignored.
    assert flat["required"] == ["model"] and flat["additionalProperties"] is True
    assert {"prompt", "messages", "system"} <= set(flat["properties"])
    assert flat["properties"]["max_tokens"]["maximum"] == \
        defs["GenerationParams"]["properties"]["max_tokens"]["maximum"]


@pytest.mark.parametrize(("payload", "field", "code"), [
    ({"type": "inference", "prompt": "x"}, "model", "invalid_job"),
    ({"type": "inference", "model": "gpt2"}, "prompt", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": ""}, "prompt", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "   "}, "prompt", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": 5}, "prompt", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "max_tokens": 0}, "max_tokens",
     "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "max_tokens": "16"}, "max_tokens",
     "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "max_tokens": 10**9}, "max_tokens",
     "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "temperature": -1}, "temperature",
     "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "top_p": 0}, "top_p", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "top_p": 1.5}, "top_p", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "temperature": True}, "temperature",
     "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "stream": True}, "stream",
     "invalid_job"),
    ({"task": "text-generation", "model": "gpt2", "prompt": "x", "extra": 1}, "extra",
     "invalid_job"),
    ({"task": "translation", "model": "gpt2", "prompt": "x"}, "task", "invalid_job"),
    ({"type": "transcribe", "model": "whisper"}, "type", "unsupported_job_type"),
    ({"service_type": "image_generation", "service_request": {}}, "service_type",
     "unsupported_job_type"),
    ({"service_type": "llm_inference", "service_request": {"model": "gpt2", "prompt": "x",
                                                           "top_p": 2}},
     "service_request.top_p", "invalid_job"),
    ({"service_type": "llm_inference", "service_request": "nope"}, "service_request",
     "invalid_job"),
    ({"type": "embedding", "model": "m", "input": []}, "input", "invalid_job"),
    ({"type": "embedding", "model": "m", "input": [3]}, "input.0", "invalid_job"),
    ({"type": "embedding", "model": "m", "input": ""}, "input.0", "invalid_job"),
    ({"type": "inference", "model": "gpt2", "prompt": "x", "stop": ""}, "stop.0",
     "invalid_job"),
    ({"service_type": "llm_inference", "service_request": {"model": "gpt2", "prompt": " "}},
     "service_request.prompt", "invalid_job"),
    ({"service_type": "llm_inference", "service_request": {"model": "gpt2", "prompt": "x",
                                                           "stop": ["a"],
                                                           "stop_sequences": ["b"]}},
     "service_request.stop", "invalid_job"),
    ({"service_type": "llm_inference", "service_request": {"model": "gpt2", "prompt": "x",
                                                           "stream": True}},
     "service_request.stream", "invalid_job"),
    ({"service_type": "llm_inference", "service_request": {"model": "gpt2", "prompt": "x",
                                                           "stream": 1}},
     "service_request.stream", "invalid_job"),
    ({"model": "gpt2", "max_tokens": 4}, None, "invalid_job"),
    ({"prompt": "x"}, "model", "invalid_job"),
])
def test_bad_payloads_name_the_field(payload: dict[str, Any], field: str | None,
                                     code: str) -> None:
    with pytest.raises(InvalidJobError) as err:
        parse_payload(payload)
    assert err.value.field == field, err.value.message
    assert err.value.code == code
    assert field is None or field.split(".")[-1] in err.value.message


@pytest.mark.parametrize("raw", [b"\xff\xfe not utf-8", b"{not json", "[1, 2]", "42", b""])
def test_undecodable_payloads(raw: bytes | str) -> None:
    with pytest.raises(InvalidJobError):
        parse_payload(raw)


def test_unsupported_type_is_its_own_error() -> None:
    with pytest.raises(UnsupportedJobTypeError, match="unsupported job type 'reencode'"):
        parse_payload({"type": "reencode"})
    with pytest.raises(UnsupportedJobTypeError, match="unsupported service_type 'tts'"):
        parse_payload({"service_type": "tts", "service_request": {}})
    with pytest.raises(InvalidJobError, match="cannot tell the kind of job"):
        parse_payload({"model": "gpt2"})
    # A prompt (or messages) with no type is an inference job, as the network's miner runs it.
    assert parse_payload({"model": "gpt2", "prompt": "x"}).task == "text-generation"


def test_the_coordinator_job_id_wins() -> None:
    payload = {"type": "inference", "job_id": 5, "model": "gpt2", "prompt": "x"}
    assert parse_payload(payload, job_id="job_abc123").job_id == "job_abc123"
    with pytest.raises(InvalidJobError) as err:
        parse_payload(payload)
    assert err.value.field == "job_id"


def test_job_result_json_is_stable_and_drops_unmeasured_fields() -> None:
    result = JobResult.model_validate({
        "job_id": "j", "model": "m", "task": "text-generation", "status": "completed",
        "output": {"text": "hi", "token_ids": [1], "finish_reason": "length"},
        "result_hash": "sha256:" + "0" * 64,
        "metrics": {"execution_time_seconds": 1.0, "gpu_time_seconds": 0.0,
                    "load_time_seconds": 0.0, "device": "cpu", "measurement": "cpu-wall",
                    "prompt_tokens": 1, "completion_tokens": 1}})
    doc = json.loads(result.to_json())
    assert "energy_joules" not in doc["metrics"] and "error" not in doc
    assert JobResult.model_validate(doc) == result


_json_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(
    allow_nan=False) | st.text(max_size=20)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=10), inner, max_size=4), max_leaves=12)
_keys = st.sampled_from(["type", "model", "prompt", "max_tokens", "temperature", "top_p",
                         "top_k", "seed", "stop", "input", "task", "params", "service_type",
                         "service_request", "job_id", "repetition_penalty", "prompt_token_ids",
                         "messages", "system", "stream", "n", "parameters", "colour"])
_values = (st.sampled_from(["inference", "embedding", "llm_inference", "text-generation",
                            "gpt2", "Hello GPU", "", "transcribe"]) | _json)
_payloads = st.dictionaries(_keys, _values, max_size=8) | st.fixed_dictionaries(
    {"type": st.just("inference"), "model": st.text(max_size=8), "prompt": st.text(max_size=30)},
    optional={"max_tokens": _json, "temperature": _json, "top_p": _json, "stop": _json,
              "seed": _json}) | st.fixed_dictionaries(
    {"service_type": st.just("llm_inference"),
     "service_request": st.dictionaries(_keys, _values, max_size=6)}) | _json | st.binary(
    max_size=40)


@pytest.mark.slow
@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payloads)
def test_any_payload_parses_or_raises_the_typed_error(payload: Any) -> None:
    try:
        job = parse_payload(payload)
    except InvalidJobError as exc:
        assert exc.code in ("invalid_job", "unsupported_job_type")
        assert exc.message
        return
    assert isinstance(job, Job)
    assert parse_payload(job.to_json()) == job
