"""The OpenAI-compatible routes, spoken to by the official ``openai`` client over a real
uvicorn server on loopback: chat, completions, embeddings, streaming, cancellation on
disconnect, logprobs, the hash equal to ``aitbc-engine run``'s, errors in OpenAI's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import make_tiny_gpt2, tiny_entry, write_registry

from engine import Engine
from engine.jobs import Job
from engine.server import ApiService, create_app, running_server

TOKEN = "openai-token-0123456789abcdef"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello GPU"}]


def compat_registry_for(base: Path, tiny_model_dir: Path) -> Path:
    """The test registry with an alias for the tiny model, plus ``slow-gpt2`` (wider, long
    context: jobs long enough to watch), whose files :func:`make_slow_model` writes."""
    slow = tiny_entry(tiny_model_dir, context_length=1024, parameters=1)
    slow["source"] = {"local": {"path": str(base / "slow-gpt2"), "format": "safetensors"}}
    slow["config"] = {"model_type": "gpt2", "n_layer": 4, "n_head": 2, "n_embd": 256,
                      "n_positions": 1024, "vocab_size": 512}
    tiny = {**tiny_entry(tiny_model_dir), "aliases": ["tiny:latest-2l"]}
    return write_registry(base / "models.yaml", {"tiny-gpt2": tiny, "slow-gpt2": slow})


def make_slow_model(registry: Path) -> None:
    """Write ``slow-gpt2``'s files (once), for the slow tests only."""
    if not (registry.parent / "slow-gpt2" / "config.json").is_file():
        make_tiny_gpt2(registry.parent / "slow-gpt2", n_layer=4, n_embd=256, n_positions=1024)


@pytest.fixture(scope="module")
def compat_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return compat_registry_for(tmp_path_factory.mktemp("compat"), tiny_model_dir)


@pytest.fixture()
def slow_model(compat_registry: Path) -> None:
    make_slow_model(compat_registry)


@pytest.fixture(scope="module")
def served(compat_registry: Path) -> Iterator[tuple[str, ApiService, Engine]]:
    with Engine(compat_registry, devices=["cpu"], job_timeout=120) as engine:
        app = create_app(engine, token=TOKEN, max_queue=32)
        with running_server(app) as url:
            yield url, app.state.service, engine


@pytest.fixture()
def client(served: tuple[str, ApiService, Engine]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def engine_job(**fields: Any) -> Job:
    return Job.model_validate({"model": "tiny-gpt2", **fields})


def test_chat_completion_is_the_engines_chat_job(client: openai.OpenAI,
                                                 served: tuple[str, ApiService, Engine]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-gpt2", messages=CHAT, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    answer = raw.parse()
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and answer.usage is not None
    ext = answer.model_extra["aitbc"]  # type: ignore[index]
    assert raw.headers["x-result-hash"] == ext["result_hash"]
    assert answer.id == "chatcmpl-" + ext["job_id"]
    direct = served[2].run(engine_job(messages=CHAT, params={"max_tokens": 6}))
    assert direct.ok and direct.result_hash == ext["result_hash"]
    assert direct.output is not None and direct.output.text == choice.message.content  # type: ignore[union-attr]
    assert answer.usage.completion_tokens == len(direct.output.token_ids)  # type: ignore[union-attr]
    assert ext["profile"]["model"] == "tiny-gpt2" and "gpu_time_seconds" in ext["metrics"]


@pytest.mark.slow
def test_completion_logprobs_equal_the_engines_and_the_models(
        client: openai.OpenAI, served: tuple[str, ApiService, Engine]) -> None:
    import torch

    answer = client.completions.create(model="tiny-gpt2", prompt="The quick brown fox",
                                       max_tokens=5, temperature=0, logprobs=3)
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    direct = served[2].run(engine_job(prompt="The quick brown fox",
                                      params={"max_tokens": 5, "logprobs": 3}))
    assert direct.ok and direct.output is not None
    engine_lps = direct.output.logprobs  # type: ignore[union-attr]
    assert engine_lps is not None
    assert choice.logprobs.token_logprobs == [e.logprob for e in engine_lps]
    assert choice.logprobs.tokens == [e.token for e in engine_lps]
    assert choice.logprobs.top_logprobs == [{t.token: t.logprob for t in e.top}
                                            for e in engine_lps]
    assert answer.model_extra["aitbc"]["result_hash"] == direct.result_hash  # type: ignore[index]
    # the first token's log-probability is the model's own log-softmax at the prompt's end
    loaded = served[2].load("tiny-gpt2")
    ids = loaded.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        row = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -1].float(), -1)
    first = direct.output.token_ids[0]  # type: ignore[union-attr]
    assert abs(float(row[first]) - engine_lps[0].logprob) < 1e-4
    assert engine_lps[0].top[0].logprob == pytest.approx(float(row.max()), abs=1e-4)


def test_chat_logprobs_and_token_ids_prompt(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="tiny-gpt2", messages=CHAT,  # type: ignore[arg-type]
                                            max_completion_tokens=3, temperature=0,
                                            logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == answer.usage.completion_tokens  # type: ignore[union-attr]
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    ids = client.completions.create(model="tiny-gpt2", prompt=[5, 6, 7], max_tokens=2,
                                    temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3


@pytest.mark.slow
def test_streamed_chat_adds_up_to_the_whole_answer(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": "tiny-gpt2", "messages": CHAT, "max_tokens": 12,
                              "temperature": 0.7, "seed": 5, "stop": ["GPU"]}
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(**params, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == \
        whole.choices[0].finish_reason
    ext = finals[0].model_extra["aitbc"]  # type: ignore[index]
    assert ext["result_hash"] == whole.model_extra["aitbc"]["result_hash"]  # type: ignore[index]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # Every earlier chunk says "usage": null, as OpenAI's stream does with include_usage.
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])


def test_a_model_is_retrieved_by_name_or_alias_and_an_unknown_one_is_404(
        client: openai.OpenAI) -> None:
    assert client.models.retrieve("tiny-gpt2").id == "tiny-gpt2"
    assert client.models.retrieve("tiny:latest-2l").owned_by == "aitbc-engine"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.status_code == 404 and "no-such-model" in str(info.value)


def test_aliases_and_openai_model_list(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"tiny-gpt2", "tiny:latest-2l"} <= ids
    by_alias = client.completions.create(model="tiny:latest-2l", prompt="Hello", max_tokens=3,
                                         temperature=0)
    by_name = client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=3,
                                        temperature=0)
    assert by_alias.model == "tiny:latest-2l"
    assert by_alias.model_extra["aitbc"]["result_hash"] == \
        by_name.model_extra["aitbc"]["result_hash"]  # type: ignore[index]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"n": 2}, 400, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"temperature": 3}, 400, "temperature"),
    ({"max_tokens": 5000}, 400, "max_tokens"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ({"model": "no-such-model"}, 404, "model"),
])
def test_bad_requests_are_4xx_in_openais_shape(served: tuple[str, ApiService, Engine],
                                               body: dict[str, Any], status: int,
                                               param: str) -> None:
    request = {"model": "tiny-gpt2", "messages": CHAT, **body}
    r = httpx.post(served[0] + "/v1/chat/completions", json=request, timeout=60,
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err


def test_the_token_is_required(served: tuple[str, ApiService, Engine]) -> None:
    bad = openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model="tiny-gpt2", messages=CHAT)  # type: ignore[arg-type]
    assert caught.value.body["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        openai.OpenAI(base_url=served[0] + "/v1", api_key=TOKEN, max_retries=0
                      ).completions.create(model="nope", prompt="x")
    assert missing.value.code == "model_not_found"


@pytest.mark.slow
def test_embeddings_float_and_base64(client: openai.OpenAI,
                                     served: tuple[str, ApiService, Engine]) -> None:
    texts = ["The capital of France is Paris.", "A miner runs jobs."]
    floats = client.embeddings.create(model="all-minilm", input=texts, encoding_format="float")
    packed = client.embeddings.create(model="all-minilm-l6-v2", input=texts,
                                      encoding_format="base64")
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 384
    import base64

    import numpy as np

    decoded = np.frombuffer(base64.b64decode(packed.data[1].embedding), dtype="<f4")  # type: ignore[arg-type]
    assert decoded.tolist() == pytest.approx(floats.data[1].embedding, abs=0.0)
    direct = served[2].run(Job(model="all-minilm-l6-v2", task="embedding", input=texts))
    assert direct.result_hash == floats.model_extra["aitbc"]["result_hash"]  # type: ignore[index]
    assert floats.usage.prompt_tokens > 0


@pytest.mark.slow
@pytest.mark.usefixtures("slow_model")
def test_first_chunk_arrives_long_before_the_job_ends(client: openai.OpenAI) -> None:
    started = time.perf_counter()
    first = None
    pieces = 0
    stream = client.completions.create(model="slow-gpt2", prompt="Hello GPU", max_tokens=150,
                                       temperature=0, stream=True)
    for chunk in stream:
        if first is None and chunk.choices[0].text:
            first = time.perf_counter() - started
        pieces += 1
    total = time.perf_counter() - started
    print(f"first chunk after {first:.3f} s, the whole stream {total:.3f} s, "
          f"{pieces} chunks")
    assert first is not None and first < total / 4


@pytest.mark.slow
@pytest.mark.usefixtures("slow_model")
def test_a_client_that_disconnects_cancels_its_job(client: openai.OpenAI,
                                                   served: tuple[str, ApiService, Engine]
                                                   ) -> None:
    service = served[1]
    stream = client.chat.completions.create(model="slow-gpt2", messages=CHAT,  # type: ignore[arg-type]
                                            max_tokens=900, temperature=0, stream=True)
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen >= 3:
            break
    job_id = chunk.id.removeprefix("chatcmpl-")
    stream.close()
    record = service.queue.record(job_id)
    deadline = time.monotonic() + 60
    while record.result is None and time.monotonic() < deadline:
        time.sleep(0.02)
    result = record.result
    assert result is not None and record.state == "cancelled", result
    m = result.metrics
    assert m is not None and m.execution_time_seconds > 0 and m.device == "cpu"
    assert 3 <= m.completion_tokens < 900
    print(f"cancelled after {m.completion_tokens} of 900 tokens; "
          f"metered {m.execution_time_seconds:.3f} s, gpu {m.gpu_time_seconds} s")


@pytest.mark.slow
def test_hashes_equal_aitbc_engine_run(client: openai.OpenAI, compat_registry: Path,
                                       tmp_path: Path) -> None:
    chat = client.chat.completions.create(model="tiny-gpt2", messages=CHAT, max_tokens=6,  # type: ignore[arg-type]
                                          temperature=0.8, seed=11, top_p=0.9)
    text = client.completions.create(model="tiny-gpt2", prompt="The quick brown fox",
                                     max_tokens=6, temperature=0)
    jobs = {"chat": {"model": "tiny-gpt2", "messages": CHAT,
                     "params": {"max_tokens": 6, "temperature": 0.8, "seed": 11, "top_p": 0.9}},
            "text": {"model": "tiny-gpt2", "prompt": "The quick brown fox",
                     "params": {"max_tokens": 6}}}
    served_hashes = {"chat": chat.model_extra["aitbc"]["result_hash"],  # type: ignore[index]
                     "text": text.model_extra["aitbc"]["result_hash"]}  # type: ignore[index]
    for name, job in jobs.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(job))
        out = subprocess.run(
            [sys.executable, "-m", "engine", "run", "--job", str(path), "--registry",
             str(compat_registry), "--device", "cpu", "--json"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["result_hash"] == served_hashes[name]


README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_openai_and_ollama_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import re

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    openai_block = next(b for b in blocks if "from openai import OpenAI" in b)
    ollama_block = next(b for b in blocks if "import ollama" in b)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("AITBC_ENGINE_STATE", str(state))
    with Engine(devices=["cpu"]) as engine, running_server(
            create_app(engine, token=TOKEN, ollama_compat=True)) as url:
        exec(compile(openai_block.replace("http://127.0.0.1:8765", url), "README.md", "exec"),
             {})
        out = capsys.readouterr().out
        assert "Paris" in out and re.search(r"sha256:[0-9a-f]{64}", out), out
        exec(compile(ollama_block.replace("http://127.0.0.1:11434", url), "README.md", "exec"),
             {})
        out = capsys.readouterr().out
        assert "Paris" in out, out


@pytest.mark.slow
def test_run_stream_prints_the_tokens_as_they_come(compat_registry: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine", "run", "tiny-gpt2", "--prompt", "Hello GPU",
         "--max-tokens", "8", "--registry", str(compat_registry), "--device", "cpu",
         "--stream", "--json"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    text = json.loads(out.stdout)["output"]["text"]
    assert text and text + "\n" in out.stderr
