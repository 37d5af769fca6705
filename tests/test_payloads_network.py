"""Payloads as the network sends them: typeless jobs, system prompts and chats, unknown keys
(ignored, noted) and keys the engine cannot honour (refused, named); their hashes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_NAME, copy_model, tiny_entry, write_registry

from engine import Engine
from engine.errors import InvalidJobError
from engine.hashing import canonical_document, input_document, result_hash
from engine.jobs import GenerationOutput, Job, JobResult
from engine.payloads import REFUSED_KEYS, parse_payload, payload_json_schema
from engine.tasks.generation import plain_chat_text, render_chat
from engine.verify import Verifier

CHAT = "tiny-chat"
# A small template in the usual shape: a header per turn, the assistant's header to open.
TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}")
DIGEST = "sha256:" + "ab" * 32
OUT = GenerationOutput(text=" Paris", token_ids=[5, 6], finish_reason="length")
USER = {"role": "user", "content": "What is the capital of France?"}


def _chat(**fields: Any) -> Job:
    return Job.model_validate({"model": "m", **fields})


def _canon(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny GPT-2 whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    path = copy_model(tiny_model_dir, tmp_path_factory.mktemp("chat") / "tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def chat_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                  chat_model_dir: Path) -> Path:
    return write_registry(tmp_path_factory.mktemp("chat-registry") / "models.yaml",
                          {TINY_NAME: tiny_entry(tiny_model_dir),
                           CHAT: tiny_entry(chat_model_dir)})


@pytest.fixture(scope="module")
def engine(chat_registry: Path) -> Iterator[Engine]:
    with Engine(chat_registry, devices=["cpu"], job_timeout=60) as eng:
        yield eng


# ------------------------------------------------------------------ typeless payloads

def test_a_typeless_payload_with_a_prompt_is_inference() -> None:
    job = parse_payload({"model": "gpt2", "prompt": "Hello GPU", "max_tokens": 4},
                        job_id="job_1")
    assert job.task == "text-generation" and job.prompt == "Hello GPU"
    assert job.params.max_tokens == 4 and job.job_id == "job_1" and job.notes is None
    typed = parse_payload({"type": "inference", "model": "gpt2", "prompt": "Hello GPU",
                           "max_tokens": 4}, job_id="job_1")
    assert job == typed


def test_a_typeless_payload_with_messages_is_inference() -> None:
    job = parse_payload({"model": "gpt2", "messages": [USER]})
    assert job.task == "text-generation" and job.chat and job.conversation() == [USER]


def test_typeless_payloads_still_need_a_model_and_an_input() -> None:
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"prompt": "x"})
    assert err.value.field == "model"
    with pytest.raises(InvalidJobError, match="cannot tell the kind of job"):
        parse_payload({"model": "gpt2"})


# ------------------------------------------------------------------ system and messages

def test_system_with_a_prompt_is_a_chat_of_two_turns() -> None:
    job = parse_payload({"model": "gpt2", "prompt": "Hi", "system": "Be brief."})
    assert job.chat and job.system == "Be brief." and job.prompt == "Hi"
    assert job.conversation() == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"}]
    plain = parse_payload({"model": "gpt2", "prompt": "Hi"})
    assert not plain.chat and plain.conversation() == []


def test_system_and_messages_in_every_text_shape() -> None:
    messages = [USER, {"role": "assistant", "content": "Paris."}, USER]
    flat = parse_payload({"type": "inference", "model": "gpt2", "system": "S",
                          "messages": messages})
    service = parse_payload({"service_type": "llm_inference", "service_request": {
        "model": "gpt2", "system": "S", "messages": messages}})
    engine_json = parse_payload({"task": "text-generation", "model": "gpt2", "system": "S",
                                 "messages": messages})
    jobs = [j.model_dump(exclude={"job_id"}) for j in (flat, service, engine_json)]
    assert jobs[0] == jobs[1] == jobs[2]
    assert flat.conversation()[0] == {"role": "system", "content": "S"}
    assert parse_payload(flat.to_json()) == flat


@pytest.mark.parametrize(("payload", "field"), [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "m", "messages": [{"role": "user", "content": "a", "name": "x"}]},
     "messages.0.name"),
    ({"model": "m", "messages": [USER, {"role": "system", "content": "late"}]}, "messages"),
    ({"model": "m", "messages": [{"role": "system", "content": "only"}]}, "messages"),
    ({"model": "m", "system": "s", "messages": [{"role": "system", "content": "t"}, USER]},
     "system"),
    ({"model": "m", "prompt": "x", "messages": [USER]}, "messages"),
    ({"model": "m", "prompt": "x", "system": 5}, "system"),
    ({"task": "text-generation", "model": "m", "prompt_token_ids": [1], "system": "s"},
     "system"),
    ({"task": "text-generation", "model": "m", "prompt_token_ids": [1], "messages": [USER]},
     "prompt_token_ids"),
    ({"task": "embedding", "model": "m", "input": ["a"], "messages": [USER]}, "messages"),
    ({"service_type": "llm_inference", "service_request": {
        "model": "m", "messages": [{"role": "robot", "content": "a"}]}},
     "service_request.messages.0.role"),
    ({"service_type": "llm_inference", "service_request": {
        "model": "m", "prompt": "x", "messages": [USER]}}, "service_request.messages"),
])
def test_bad_chats_are_invalid_jobs_naming_the_field(payload: dict[str, Any],
                                                     field: str) -> None:
    with pytest.raises(InvalidJobError) as err:
        parse_payload(payload)
    assert err.value.code == "invalid_job"
    assert err.value.field == field, err.value.message
    assert field.split(".")[-1] in err.value.message


# ------------------------------------------------------------------ unknown keys

def test_unknown_keys_are_ignored_and_noted() -> None:
    job = parse_payload({"model": "gpt2", "prompt": "Hi", "max_tokens": 4, "colour": "red",
                         "user": "alice", "metadata": {"a": 1}})
    assert job.prompt == "Hi" and job.params.max_tokens == 4
    assert job.notes == ["ignored unknown key 'colour'", "ignored unknown key 'metadata'",
                         "ignored unknown key 'user'"]
    same = parse_payload({"model": "gpt2", "prompt": "Hi", "max_tokens": 4})
    assert job.model_dump(exclude={"job_id", "notes"}) == same.model_dump(exclude={"job_id",
                                                                                  "notes"})
    assert same.notes is None and "notes" not in json.loads(same.to_json())


def test_unknown_keys_in_every_network_shape() -> None:
    flat = parse_payload({"type": "inference", "model": "m", "prompt": "p", "x": 1})
    service = parse_payload({"service_type": "llm_inference", "trace": "t", "service_request": {
        "model": "m", "prompt": "p", "frequency": 2, "stream": False}})
    embedding = parse_payload({"type": "embedding", "model": "m", "input": "a",
                               "encoding_format": "float"})
    assert flat.notes == ["ignored unknown key 'x'"]
    assert service.notes == ["ignored unknown key 'service_request.frequency'",
                             "ignored unknown key 'trace'"]
    assert embedding.notes == ["ignored unknown key 'encoding_format'"]
    # Engine JSON is the engine's own format: strict.
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"task": "text-generation", "model": "m", "prompt": "p", "x": 1})
    assert err.value.field == "x"


def test_notes_are_bounded_and_round_trip() -> None:
    payload: dict[str, Any] = {"model": "m", "prompt": "p"}
    payload.update({f"k{i:03d}": i for i in range(100)})
    payload["y" * 500] = 1
    job = parse_payload(payload)
    assert job.notes is not None and len(job.notes) == 64
    assert job.notes[-1] == "... and 38 more keys ignored"
    assert all(len(n) < 200 for n in job.notes)
    assert parse_payload(job.to_json()) == job


def test_the_networks_client_shape_with_parameters_runs_as_sent() -> None:
    """The network's example client sends ``task`` and a ``parameters`` object."""
    job = parse_payload({"type": "inference", "task": "text-generation", "model": "m",
                         "prompt": "What is AITBC?", "parameters": {"max_tokens": 100,
                                                                    "prompt": "What is AITBC?"}})
    assert job.params.max_tokens == 100 and job.notes == ["ignored unknown key 'task'"]
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"model": "m", "prompt": "p", "max_tokens": 5,
                       "parameters": {"max_tokens": 6}})
    assert err.value.field == "parameters.max_tokens"
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"model": "m", "prompt": "p", "parameters": [1]})
    assert err.value.field == "parameters"


def test_stop_and_stop_sequences_are_read_in_either_shape() -> None:
    flat = parse_payload({"model": "m", "prompt": "p", "stop_sequences": ["END"]})
    service = parse_payload({"service_type": "llm_inference", "service_request": {
        "model": "m", "prompt": "p", "stop": ["END"]}})
    assert flat.params.stop == service.params.stop == ["END"]
    assert flat.notes is None and service.notes is None
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"model": "m", "prompt": "p", "stop": ["a"], "stop_sequences": ["b"]})
    assert err.value.field == "stop_sequences"


def test_the_schema_of_network_shapes_allows_other_keys() -> None:
    _, defs = payload_json_schema()
    assert defs["FlatInference"]["additionalProperties"] is True
    assert defs["FlatInference"]["required"] == ["model"]
    assert defs["LlmRequest"]["additionalProperties"] is True
    assert defs["Job"]["additionalProperties"] is False


# ------------------------------------------------------------------ refused keys

@pytest.mark.parametrize(("key", "value"), [
    ("stream", True), ("n", 2), ("best_of", 3), ("logprobs", True), ("logprobs", 5),
    ("top_logprobs", 2), ("logit_bias", {"50256": -100}), ("echo", True),
    ("suffix", "end"), ("presence_penalty", 0.5), ("frequency_penalty", 1),
    ("tools", [{"type": "function"}]), ("functions", [{"name": "f"}]),
    ("response_format", {"type": "json_object"}), ("format", "json"), ("images", ["b64"]),
    ("n", True), ("stream", "yes"),
])
def test_keys_that_cannot_be_honoured_are_refused_by_name(key: str, value: Any) -> None:
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"model": "m", "prompt": "p", key: value})
    assert err.value.code == "invalid_job" and err.value.field == key
    assert f"'{key}'" in err.value.message and "cannot be honoured" in err.value.message


def test_a_streamed_service_request_is_refused() -> None:
    with pytest.raises(InvalidJobError) as err:
        parse_payload({"service_type": "llm_inference", "service_request": {
            "model": "m", "prompt": "p", "stream": True}})
    assert err.value.field == "service_request.stream"
    assert "stream" in err.value.message


@pytest.mark.parametrize(("key", "value"), [
    ("stream", False), ("n", 1), ("best_of", 1), ("logprobs", False), ("logprobs", None),
    ("top_logprobs", 0), ("logit_bias", {}), ("echo", False), ("suffix", ""),
    ("presence_penalty", 0.0), ("frequency_penalty", 0), ("tools", []),
    ("response_format", {"type": "text"}), ("format", ""), ("images", []),
])
def test_neutral_values_of_refusable_keys_are_accepted_silently(key: str, value: Any) -> None:
    job = parse_payload({"model": "m", "prompt": "p", key: value})
    assert job.notes is None and job.prompt == "p"


def test_every_refused_key_has_a_neutral_value_and_a_reason() -> None:
    for key, (neutral, why) in REFUSED_KEYS.items():
        assert neutral(None) and why, key


# ------------------------------------------------------------------ results and hashes

def test_job_result_notes_are_absent_unless_set() -> None:
    base = {"job_id": "j", "model": "m", "task": "text-generation", "status": "failed",
            "error": {"code": "invalid_job", "message": "x"}}
    plain = JobResult.model_validate(base)
    assert "notes" not in json.loads(plain.to_json())
    noted = JobResult.model_validate({**base, "notes": ["ignored unknown key 'x'"]})
    assert json.loads(noted.to_json())["notes"] == ["ignored unknown key 'x'"]


def test_plain_jobs_hash_as_before() -> None:
    job = parse_payload({"model": "m", "prompt": "p", "colour": 1})
    assert input_document(job) == {"prompt": "p"}
    bare = parse_payload({"task": "text-generation", "model": "m", "prompt": "p"})
    assert result_hash(job, OUT, DIGEST) == result_hash(bare, OUT, DIGEST)


def test_chat_jobs_hash_their_system_prompt_and_messages_by_hand() -> None:
    job = parse_payload({"model": "m", "system": "Be brief.", "messages": [USER]})
    doc = {"messages": [{"content": USER["content"], "role": "user"}], "system": "Be brief."}
    assert input_document(job) == doc
    canonical = canonical_document(job, OUT, DIGEST)
    assert canonical["encoding"] == "aitbc-result/2"
    assert canonical["input_sha256"] == hashlib.sha256(_canon(doc)).hexdigest()
    assert result_hash(job, OUT, DIGEST) == "sha256:" + hashlib.sha256(
        _canon(canonical)).hexdigest()
    with_prompt = parse_payload({"model": "m", "system": "Be brief.", "prompt": "Hi"})
    assert input_document(with_prompt) == {"prompt": "Hi", "system": "Be brief."}


def test_what_a_chat_uses_changes_its_hash() -> None:
    def h(**fields: Any) -> str:
        return result_hash(parse_payload({"model": "m", **fields}), OUT, DIGEST)

    hashes = {h(prompt="Hi"), h(prompt="Hi", system="A"), h(prompt="Hi", system="B"),
              h(prompt="Hi", system=""),
              h(messages=[{"role": "user", "content": "Hi"}]),
              h(messages=[{"role": "system", "content": "A"}, {"role": "user", "content": "Hi"}]),
              h(messages=[{"role": "user", "content": "Hi"}], system="A"),
              h(messages=[{"role": "assistant", "content": "Hi"}])}
    assert len(hashes) == 8


# ------------------------------------------------------------------ rendering

def test_the_plain_chat_layout() -> None:
    turns = Job(model="m", prompt="What is the capital of France?",
                system="Answer in one word.").conversation()
    assert plain_chat_text(turns) == ("System: Answer in one word.\n\nUser: What is the "
                                      "capital of France?\n\nAssistant:")
    open_turn = [USER, {"role": "assistant", "content": "It is"}]
    assert plain_chat_text(open_turn) == ("User: What is the capital of France?\n\n"
                                          "Assistant: It is")


def test_a_tokenizer_without_template_gets_the_plain_layout(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    job = _chat(messages=[USER], system="S")
    assert render_chat(tokenizer, job) == (plain_chat_text(job.conversation()), True)


def test_a_chat_template_renders_the_chat(chat_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_model_dir))
    assert tokenizer.chat_template == TEMPLATE
    job = _chat(messages=[USER], system="S")
    text, special = render_chat(tokenizer, job)
    assert not special
    assert text == ("<|endoftext|>system: S\n<|endoftext|>user: What is the capital of "
                    "France?\n<|endoftext|>assistant:")
    prefilled = _chat(messages=[USER, {"role": "assistant", "content": "It is"}])
    text, _ = render_chat(tokenizer, prefilled)
    assert text.endswith("<|endoftext|>assistant: It is")


# ------------------------------------------------------------------ end to end

def _prompt_tokens(engine: Engine, model: str, text: str, special: bool) -> int:
    loaded = engine.load(model)
    return len(loaded.tokenizer(text, add_special_tokens=special)["input_ids"])


def test_engine_runs_a_chat_with_the_plain_layout(engine: Engine) -> None:
    chat = {"model": TINY_NAME, "system": "Be brief.", "prompt": "Hello GPU", "max_tokens": 6}
    res = engine.run(chat)
    assert res.ok, res.error
    job = parse_payload(chat)
    text = plain_chat_text(job.conversation())
    assert res.metrics is not None
    assert res.metrics.prompt_tokens == _prompt_tokens(engine, TINY_NAME, text, True)
    plain = engine.run({"model": TINY_NAME, "prompt": "Hello GPU", "max_tokens": 6})
    assert plain.ok and plain.result_hash != res.result_hash
    assert res.output is not None and res.profile is not None
    assert res.result_hash == result_hash(job, res.output, res.profile.weights_digest)
    # The same conversation as the raw text it renders to is the same run, another job.
    raw = engine.run({"model": TINY_NAME, "prompt": text, "max_tokens": 6})
    assert raw.output == res.output and raw.result_hash != res.result_hash


def test_engine_runs_a_chat_through_the_template(engine: Engine) -> None:
    payload = {"model": CHAT, "messages": [USER], "max_tokens": 6}
    res = engine.run(payload)
    assert res.ok, res.error
    loaded = engine.load(CHAT)
    text = loaded.tokenizer.apply_chat_template([USER], tokenize=False,
                                                add_generation_prompt=True)
    assert res.metrics is not None
    assert res.metrics.prompt_tokens == _prompt_tokens(engine, CHAT, text, False)
    assert engine.run(payload).result_hash == res.result_hash


def test_a_template_that_refuses_the_chat_is_an_invalid_job(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = copy_model(tiny_model_dir, tmp_path / "strict-chat")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'user' %}"
                               "{{ raise_exception('the chat must start with a user') }}"
                               "{% endif %}{{ messages[0]['content'] }}")
    job = _chat(messages=[{"role": "assistant", "content": "hi"}, USER])
    with pytest.raises(InvalidJobError) as err:
        render_chat(tokenizer, job)
    assert err.value.field == "messages" and "must start with a user" in err.value.message


def test_refused_and_bad_payloads_fail_typed_through_the_engine(engine: Engine) -> None:
    res = engine.run({"model": TINY_NAME, "prompt": "x", "stream": True})
    assert not res.ok and res.error is not None
    assert res.error.code == "invalid_job" and res.error.field == "stream"
    res = engine.run({"model": TINY_NAME, "messages": [{"role": "robot", "content": "x"}]})
    assert res.error is not None and res.error.field == "messages.0.role"


def test_the_result_lists_the_ignored_keys(engine: Engine) -> None:
    res = engine.run({"model": TINY_NAME, "prompt": "Hello", "max_tokens": 2, "colour": 1})
    assert res.ok and res.notes == ["ignored unknown key 'colour'"]


def test_the_verifier_recomputes_a_chat_result(engine: Engine, chat_registry: Path) -> None:
    job = parse_payload({"model": CHAT, "system": "Be brief.", "messages": [USER],
                         "max_tokens": 6})
    res = engine.run(job)
    assert res.ok, res.error
    with Verifier(chat_registry, engine=engine) as verifier:
        for mode in ("integrity", "tolerant", "exact"):
            verdict = verifier.verify(job, res, mode=mode)
            assert verdict.accepted, (mode, verdict.reasons)
        forged = res.model_copy(update={"result_hash": "sha256:" + "cd" * 32})
        assert not verifier.verify(job, forged, mode="integrity").accepted
        # The hash binds the system prompt: the same result claimed for another one fails.
        other = job.model_copy(update={"system": "Be long."})
        assert not verifier.verify(other, res, mode="integrity").accepted


def test_cli_run_with_a_job_file_gives_the_engines_hash(
        engine: Engine, chat_registry: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    payload = {"model": CHAT, "system": "Be brief.", "messages": [USER], "max_tokens": 6,
               "colour": "red"}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(payload))
    capsys.readouterr()
    assert main(["run", "--job", str(path), "--registry", str(chat_registry), "--device", "cpu",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = engine.run(payload)
    assert direct.ok and printed["result_hash"] == direct.result_hash
    assert printed["output"] == direct.to_dict()["output"]
