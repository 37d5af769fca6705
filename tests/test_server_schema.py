"""schemathesis against the API's own OpenAPI schema, on the live server: no 5xx, ever."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from engine import Engine
from engine.server import create_app, running_server

TOKEN = "schema-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live(registry_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with Engine(registry_path, devices=["cpu"], job_timeout=60) as engine:
        app = create_app(engine, token=TOKEN, max_body_bytes=256 * 1024, max_queue=64)
        with running_server(app) as url:
            schema = httpx.get(url + "/openapi.json", headers=AUTH, timeout=60).json()
            yield url, schema


def _operations(schema: dict[str, Any]) -> list[str]:
    paths = schema["paths"]
    assert isinstance(paths, dict)
    return [f"{method.upper()} {path}" for path, ops in paths.items() for method in ops]


def test_schema_lists_every_route(live: tuple[str, dict[str, Any]]) -> None:
    _, schema = live
    ops = set(_operations(schema))
    assert {"GET /health", "GET /v1/hardware", "GET /v1/models", "POST /v1/models/{name}/load",
            "DELETE /v1/models/{name}", "POST /v1/jobs", "GET /v1/jobs/{job_id}",
            "DELETE /v1/jobs/{job_id}", "GET /metrics"} <= ops


def runnable(raw: dict[str, Any]) -> dict[str, Any]:
    """The schema with engine-JSON jobs aimed at the tiny model, few tokens: real jobs run."""
    doc = copy.deepcopy(raw)
    components = doc["components"]["schemas"]
    job = components["Job"]
    job["properties"]["model"] = {"const": "tiny-gpt2"}
    job["properties"]["task"] = {"const": "text-generation"}
    job["properties"]["prompt"] = {"type": "string", "pattern": "[A-Za-z]", "maxLength": 40}
    for key in ("prompt_token_ids", "input", "messages", "system", "notes"):
        job["properties"].pop(key, None)  # one input only: the prompt
    job["required"] = ["model", "task", "prompt"]
    components["GenerationParams"]["properties"]["max_tokens"]["maximum"] = 4
    # The network's shapes accept any extra key and any model name, so generated bodies of
    # theirs are refused (404, 422) as they should be; aim positive bodies at engine JSON.
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = {"$ref": "#/components/schemas/Job"}
    return doc


def fuzz(operation: Any, mode: GenerationMode, url: str) -> Counter[int]:
    """Send up to EXAMPLES_PER_OPERATION generated requests; the statuses seen."""
    seen: Counter[int] = Counter()
    strategy = operation.as_strategy(generation_mode=mode, headers=AUTH)

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        seen[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.formatted_path, case.body,
                                            response.text)
        if mode is GenerationMode.POSITIVE:
            case.validate_response(response, checks=CHECKS)

    try:
        check()
    except Unsatisfiable:  # no parameters and no body: nothing negative to send
        assert mode is GenerationMode.NEGATIVE and not seen
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
def test_no_server_errors(live: tuple[str, dict[str, Any]], mode: GenerationMode) -> None:
    url, raw = live
    schema = schemathesis.openapi.from_dict(runnable(raw))
    statuses = {found.ok().label: fuzz(found.ok(), mode, url)
                for found in schema.get_all_operations()}
    print({label: dict(c) for label, c in statuses.items()})
    assert len(statuses) >= 9
    jobs = statuses["POST /v1/jobs"]
    assert sum(jobs.values()) >= EXAMPLES_PER_OPERATION // 2
    if mode is GenerationMode.POSITIVE:
        assert jobs[200] > 0  # some generated jobs really ran
    # and the server is still fine
    health = httpx.get(url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
