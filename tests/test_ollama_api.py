"""The Ollama-compatible routes, spoken to by the official ``ollama`` client over a real
uvicorn server on loopback; ``serve --ollama-compat``; and schemathesis over every new
route (OpenAI's and Ollama's) with no 5xx."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from conftest import tiny_entry, write_registry

from engine import Engine
from engine.jobs import Job
from engine.server import ApiService, create_app, running_server

TOKEN = "ollama-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GREEDY = {"num_predict": 6, "temperature": 0}
# The job GREEDY asks for: Ollama's default repeat_penalty (1.1) holds; top_k and top_p do
# nothing to a greedy job.
GREEDY_PARAMS = {"max_tokens": 6, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("ollama")
    entry = {**tiny_entry(tiny_model_dir), "aliases": ["tiny:2l"]}
    return write_registry(base / "models.yaml", {"tiny-gpt2": entry})


@pytest.fixture(scope="module")
def served(registry: Path) -> Iterator[tuple[str, ApiService, Engine]]:
    with Engine(registry, devices=["cpu"], job_timeout=120) as engine:
        app = create_app(engine, token=TOKEN, max_queue=32, ollama_compat=True)
        with running_server(app) as url:
            yield url, app.state.service, engine


@pytest.fixture()
def client(served: tuple[str, ApiService, Engine]) -> ollama.Client:
    return ollama.Client(host=served[0], timeout=120)


def extension(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The ``aitbc`` field of an answer (the ollama client's types drop unknown fields):
    of the whole answer, or of the last line of a streamed one."""
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    last: dict[str, Any] = json.loads(r.text.strip().splitlines()[-1])
    return last["aitbc"]  # type: ignore[no-any-return]


@pytest.mark.slow
def test_generate_is_the_engines_templated_job(client: ollama.Client,
                                               served: tuple[str, ApiService, Engine]) -> None:
    answer = client.generate(model="tiny-gpt2", prompt="Hello GPU", system="Be brief.",
                             options=GREEDY, stream=False)
    assert answer.done and answer.done_reason in ("stop", "length")
    assert answer.eval_count and answer.prompt_eval_count and answer.total_duration
    ext = extension(served[0], "/api/generate", {
        "model": "tiny-gpt2", "prompt": "Hello GPU", "system": "Be brief.", "options": GREEDY,
        "stream": False})
    direct = served[2].run(Job(model="tiny-gpt2", system="Be brief.",
                               messages=[{"role": "user", "content": "Hello GPU"}],  # type: ignore[list-item]
                               params=GREEDY_PARAMS))  # type: ignore[arg-type]
    assert direct.result_hash == ext["result_hash"]
    assert direct.output is not None and direct.output.text == answer.response  # type: ignore[union-attr]
    raw = client.generate(model="tiny:2l", prompt="Hello GPU", raw=True, options=GREEDY,
                          stream=False)
    plain = served[2].run(Job(model="tiny-gpt2", prompt="Hello GPU",
                              params=GREEDY_PARAMS))  # type: ignore[arg-type]
    assert raw.model == "tiny:2l" and plain.output is not None
    assert raw.response == plain.output.text  # type: ignore[union-attr]
    assert extension(served[0], "/api/generate", {
        "model": "tiny:2l", "prompt": "Hello GPU", "raw": True, "options": GREEDY,
        "stream": False})["result_hash"] == plain.result_hash


@pytest.mark.slow
def test_streaming_is_ndjson_by_default_and_adds_up(
        client: ollama.Client, served: tuple[str, ApiService, Engine]) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    parts = list(client.chat(model="tiny-gpt2", messages=messages,
                             options={"num_predict": 8, "seed": 3}, stream=True))
    whole = client.chat(model="tiny-gpt2", messages=messages,
                        options={"num_predict": 8, "seed": 3}, stream=False)
    assert len(parts) >= 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    body = {"model": "tiny-gpt2", "messages": messages, "options": {"num_predict": 8, "seed": 3}}
    default = httpx.post(served[0] + "/api/chat", json=body, timeout=60)  # no "stream"
    assert default.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in default.text.splitlines()]
    assert len(lines) == len(parts) and lines[-1]["done"]
    streamed = extension(served[0], "/api/chat", body)
    assert streamed["result_hash"] == extension(served[0], "/api/chat",
                                                {**body, "stream": False})["result_hash"]


def test_logprobs_tags_version(client: ollama.Client, served: tuple[str, ApiService, Engine]
                               ) -> None:
    answer = client.generate(model="tiny-gpt2", prompt="Hello", raw=True, options=GREEDY,
                             logprobs=True, top_logprobs=2, stream=False)
    direct = served[2].run(Job(model="tiny-gpt2", prompt="Hello",
                               params={**GREEDY_PARAMS, "logprobs": 2}))  # type: ignore[arg-type]
    assert direct.output is not None and answer.logprobs is not None
    assert [lp.logprob for lp in answer.logprobs] == \
        [e.logprob for e in direct.output.logprobs or []]  # type: ignore[union-attr]
    names = {m.model for m in client.list().models}
    assert {"tiny-gpt2", "tiny:2l"} <= names
    assert httpx.get(served[0] + "/api/version").json()["version"]
    assert httpx.get(served[0] + "/").text == "Ollama is running"


def test_show_and_running_models_through_the_client(client: ollama.Client) -> None:
    client.generate(model="tiny:2l", prompt="Hello", raw=True, options=GREEDY, stream=False)
    shown = client.show("tiny:2l")
    assert shown.details is not None and shown.details.family == "gpt2"
    assert shown.capabilities == ["completion"]
    assert "tiny-gpt2" in {m.model for m in client.ps().models}  # warm after the job
    with pytest.raises(ollama.ResponseError) as unknown:
        client.show("no-such-model")
    assert unknown.value.status_code == 404


def test_errors_in_ollamas_shape(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as unknown:
        client.generate(model="no-such-model", prompt="x", stream=False)
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as bad:
        client.generate(model="tiny-gpt2", prompt="x", format="json", stream=False)
    assert bad.value.status_code == 400 and "format" in bad.value.error
    with pytest.raises(ollama.ResponseError) as option:
        client.generate(model="tiny-gpt2", prompt="x", options={"min_p": 0.5}, stream=False)
    assert option.value.status_code == 400 and "min_p" in option.value.error


def test_without_ollama_compat_the_routes_need_the_token(registry: Path) -> None:
    with Engine(registry, devices=["cpu"]) as engine, \
            running_server(create_app(engine, token=TOKEN)) as url:
        body = {"model": "tiny-gpt2", "prompt": "Hi", "stream": False,
                "options": {"num_predict": 2}}
        refused = httpx.post(url + "/api/generate", json=body, timeout=60)
        assert refused.status_code == 401 and "error" in refused.json()
        allowed = httpx.post(url + "/api/generate", json=body, headers=AUTH, timeout=60)
        assert allowed.status_code == 200 and allowed.json()["done"]


@pytest.mark.slow
def test_embed_with_the_shipped_model(client: ollama.Client,
                                      served: tuple[str, ApiService, Engine]) -> None:
    answer = client.embed(model="all-minilm", input=["Paris is in France.", "GPUs mine."])
    assert len(answer.embeddings) == 2 and len(answer.embeddings[0]) == 384
    legacy = client.embeddings(model="all-minilm:l6-v2", prompt="Paris is in France.")
    assert list(legacy.embedding) == list(answer.embeddings[0])
    direct = served[2].run(Job(model="all-minilm-l6-v2", task="embedding",
                               input=["Paris is in France.", "GPUs mine."]))
    assert extension(served[0], "/api/embed", {
        "model": "all-minilm", "input": ["Paris is in France.", "GPUs mine."]})[
            "result_hash"] == direct.result_hash


@pytest.mark.slow
def test_serve_ollama_compat_says_so_and_needs_loopback(registry: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "engine", "serve", "--registry", str(registry), "--device",
            "cpu", "--state-dir", str(tmp_path / "state"), "--ollama-compat"]
    refused = subprocess.run([*base, "--host", "0.0.0.0", "--port", "0"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "loopback" in refused.stderr
    proc = subprocess.Popen([*base, "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("--ollama-compat" in x for x in lines):
            lines.append(proc.stderr.readline())
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+)", lines[-1])
            url = url or (found.group(1) if found else None)
        assert url is not None and any("--ollama-compat" in line for line in lines), lines
        tags = ollama.Client(host=url).list()
        assert "smollm2:135m" in {m.model for m in tags.models}
    finally:
        proc.terminate()
        proc.wait(60)


# ------------------------------------------------------------------ schemathesis

EXAMPLES = 20
NEW_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/generate",
              "/api/chat", "/api/embed", "/api/embeddings", "/api/tags", "/api/version")


def runnable(raw: dict[str, Any]) -> dict[str, Any]:
    """Only the new routes, with bodies aimed at the tiny model and a few tokens."""
    doc = copy.deepcopy(raw)
    doc["paths"] = {p: ops for p, ops in doc["paths"].items() if p in NEW_ROUTES}
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "TextCompletionRequest", "GenerateRequest",
                 "ChatRequest"):
        schemas[name]["properties"]["model"] = {"const": "tiny-gpt2"}
    for name in ("ChatCompletionRequest", "TextCompletionRequest"):
        schemas[name]["properties"]["max_tokens"] = {"type": "integer", "minimum": 1,
                                                     "maximum": 4}
    chat = schemas["ChatCompletionRequest"]
    for key in ("max_completion_tokens", "top_logprobs"):
        chat["properties"].pop(key, None)
    text = {"type": "string", "pattern": "[A-Za-z]", "maxLength": 40}
    schemas["OpenAIMessage"] = {"type": "object", "additionalProperties": False,
                                "required": ["role", "content"],
                                "properties": {"role": {"enum": ["user"]}, "content": text}}
    chat["properties"]["messages"] = {"type": "array", "minItems": 1, "maxItems": 1,
                                      "items": {"$ref": "#/components/schemas/OpenAIMessage"}}
    schemas["TextCompletionRequest"]["properties"]["prompt"] = text
    for name in ("ChatCompletionRequest", "TextCompletionRequest"):
        schemas[name]["additionalProperties"] = False
    schemas["Options"]["properties"]["num_predict"] = {"type": "integer", "minimum": 1,
                                                       "maximum": 4}
    schemas["GenerateRequest"]["required"] = ["model", "options"]
    schemas["ChatRequest"]["required"] = ["model", "messages", "options"]
    return doc


def fuzz(operation: Any, mode: Any, url: str) -> Counter[int]:
    """Up to EXAMPLES generated requests to one operation; the statuses seen."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    seen: Counter[int] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy(generation_mode=mode, headers=AUTH))
    def check(case: Any) -> None:
        response = case.call(base_url=url, headers=AUTH, timeout=60)
        seen[response.status_code] += 1
        if os.environ.get("DEBUG_FUZZ"):
            print(case.path, response.status_code, response.text[:200])
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)

    try:
        check()
    except Unsatisfiable:  # no parameters and no body: nothing negative to send
        assert mode is GenerationMode.NEGATIVE and not seen
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors_on_the_new_routes(served: tuple[str, ApiService, Engine],
                                            mode: str) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    url = served[0]
    raw = httpx.get(url + "/openapi.json", headers=AUTH, timeout=60).json()
    schema = schemathesis.openapi.from_dict(runnable(raw))
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    statuses = {found.ok().label: fuzz(found.ok(), generation, url)
                for found in schema.get_all_operations()}
    print(json.dumps({k: dict(v) for k, v in statuses.items()}))
    assert len(statuses) == len(NEW_ROUTES)
    assert all(code < 500 for counts in statuses.values() for code in counts)
    if generation is GenerationMode.POSITIVE:
        assert statuses["POST /v1/chat/completions"][200] > 0
        assert statuses["POST /api/generate"][200] > 0
