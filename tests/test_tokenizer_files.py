"""engine.tokenizer_files: saved tokenizer files read without transformers, side by side
with transformers' own ``AutoTokenizer`` on the same directory.

Real tokenizers: SmolLM2's (saved from its GGUF the way the native path saves it), the
tiny LLaMA GGUF's of tests/gguf_tiny.py, and the tiny GPT-2's of conftest.py; then copies
of the tiny LLaMA's files edited to use what a configuration can ask for (added tokens,
named and extra special tokens, the legacy special-token map, a padding in tokenizer.json,
several chat templates, clean-up of spaces, split special tokens). Every comparison is
against transformers: encoding, decoding (token by token too), special tokens, sizes,
chat rendering and its errors. Files this reader does not do are refused by name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_tiny_gpt2
from gguf_tiny import make_tiny_llama_gguf

from engine import loading, weightfiles
from engine.registry import Registry, packaged_registry_path
from engine.tokenizer_files import FileTokenizer, TokenizerFilesError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent

TEXTS = [
    "", " ", "Hello world", "hello world, ok . fine ? don't , I'm here !",
    "  leading and trailing spaces  ", "line one\nline two\n\n  indented\r\n\ttab",
    "héllo wörld ñ café", "emoji 😀🎉👍🏽 and CJK 日本語のテキスト 中文 한국어",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|im_end|>more<|endoftext|>",
    "<|im_end|>", "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "1234567890 3.14159 -42", "   ", "\n", "a" * 50,
]
ATTRIBUTES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "eos_token",
              "bos_token", "pad_token", "unk_token", "all_special_ids", "all_special_tokens",
              "special_tokens_map", "chat_template", "vocab_size", "clean_up_tokenization_spaces",
              "split_special_tokens", "model_input_names")
CHAT = [{"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Hi 😀, what is 2 + 2?"}]
OPEN_CHAT = [*CHAT, {"role": "assistant", "content": "It is "}]


def _auto(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


# ------------------------------------------------------------------------ tokenizer dirs

@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer, saved from its GGUF as the native path saves it."""
    found = loading.availability(Registry.load(packaged_registry_path()).get("smollm2-135m"))
    if not found.available or not found.files[0].is_file():
        pytest.skip("the smollm2 package is not installed")
    gguf_file = found.files[0]
    cache = tmp_path_factory.mktemp("engine-cache")
    digest, _identities = weightfiles.weights_digest_and_identities([gguf_file], cache)
    target = tmp_path_factory.mktemp("smol") / "native"
    loading._write_native_meta(gguf_file, target, digest=digest)
    return target


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA GGUF's tokenizer (byte-level BPE, ChatML tokens, a chat template)."""
    base = tmp_path_factory.mktemp("tiny-llama")
    gguf_file = make_tiny_llama_gguf(base / "tiny.gguf", formats={})
    target = base / "native"
    loading._write_native_meta(gguf_file, target, digest="sha256:" + "0" * 64)
    return target


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2's locally trained tokenizer (no chat template)."""
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def pairs(smol_dir: Path, llama_dir: Path, gpt2_dir: Path
          ) -> dict[str, tuple[Any, FileTokenizer]]:
    """Each real tokenizer as transformers loads it and as this module loads it."""
    return {name: (_auto(path), load_tokenizer(path)) for name, path in
            (("smol", smol_dir), ("llama", llama_dir), ("gpt2", gpt2_dir))}


def _copy(source: Path, target: Path, *, config: Callable[[dict[str, Any]], None] | None = None,
          tokenizer: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of a tokenizer directory, its JSON files edited in place by the callbacks."""
    shutil.copytree(source, target)
    for name, edit in (("tokenizer_config.json", config), ("tokenizer.json", tokenizer)):
        if edit is not None:
            data = json.loads((target / name).read_text(encoding="utf-8"))
            edit(data)
            (target / name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return target


# ------------------------------------------------------------------------ comparisons

def _same_attributes(ref: Any, mine: FileTokenizer) -> None:
    for name in ATTRIBUTES:
        assert getattr(mine, name) == getattr(ref, name), name
    assert len(mine) == len(ref)
    assert mine.get_vocab() == ref.get_vocab()


def _same_encoding(ref: Any, mine: FileTokenizer, texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            expected = ref(text, add_special_tokens=special)["input_ids"]
            assert mine(text, add_special_tokens=special)["input_ids"] == expected, text
            assert mine.encode(text, add_special_tokens=special) == expected, text
    assert mine(texts)["input_ids"] == ref(texts)["input_ids"]
    assert mine(texts, add_special_tokens=False) == dict(ref(texts, add_special_tokens=False))
    # The whole backend (added tokens and their flags, post-processor, no truncation nor
    # padding once transformers has encoded) is the one transformers ends with.
    assert json.loads(mine.backend_tokenizer.to_str()) == \
        json.loads(ref.backend_tokenizer.to_str())
    assert mine.backend_tokenizer.encode_special_tokens == \
        ref.backend_tokenizer.encode_special_tokens


def _id_lists(ref: Any, texts: list[str], seed: int) -> list[list[int]]:
    """Random id lists (special ids mixed in), the encodings of the texts, and every
    prefix and single id of the encodings of multi-byte text (pieces of UTF-8 included)."""
    rng = random.Random(seed)
    size = len(ref)
    special = list(ref.all_special_ids)
    lists = [[rng.choice(special) if rng.random() < 0.2 else rng.randrange(size)
              for _ in range(rng.randrange(0, 16))] for _ in range(200)]
    for text in texts:
        ids = ref.encode(text, add_special_tokens=True)
        lists.append(ids)
        if any(ord(ch) > 127 for ch in text):
            lists += [ids[:end] for end in range(len(ids))] + [[i] for i in ids]
            lists += [ids[start:start + 2] for start in range(len(ids))]
    return lists


def _same_decoding(ref: Any, mine: FileTokenizer, id_lists: list[list[int]],
                   single_ids: range) -> None:
    for skip in (True, False):
        for ids in id_lists:
            assert mine.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip), ids
        for index in single_ids:
            assert mine.decode(index, skip_special_tokens=skip) == \
                ref.decode(index, skip_special_tokens=skip), index
            assert mine.decode([index], skip_special_tokens=skip) == \
                ref.decode([index], skip_special_tokens=skip), index
        batch = id_lists[:20]
        assert mine.decode(batch, skip_special_tokens=skip) == \
            ref.decode(batch, skip_special_tokens=skip)


def _same_chat(ref: Any, mine: FileTokenizer, chat: list[dict[str, Any]], **options: Any
               ) -> str:
    expected = ref.apply_chat_template(chat, tokenize=False, **options)
    assert mine.apply_chat_template(chat, tokenize=False, **options) == expected
    assert mine.apply_chat_template(chat, tokenize=True, **options) == \
        ref.apply_chat_template(chat, tokenize=True, return_dict=False, **options)
    return str(expected)


def _both_raise(ref: Any, mine: FileTokenizer, chat: Any, **options: Any) -> Exception:
    # Any exception, as long as both raise (of one type, or a ValueError here).
    with pytest.raises(Exception) as theirs:
        ref.apply_chat_template(chat, tokenize=False, **options)
    with pytest.raises(Exception) as ours:
        mine.apply_chat_template(chat, tokenize=False, **options)
    assert type(ours.value) is type(theirs.value) or isinstance(ours.value, ValueError)
    return ours.value


# ------------------------------------------------------------------------ real tokenizers

@pytest.mark.slow
@pytest.mark.parametrize("name", ["smol", "llama", "gpt2"])
def test_attributes_and_encoding_equal_transformers(
        pairs: dict[str, tuple[Any, FileTokenizer]], name: str) -> None:
    ref, mine = pairs[name]
    _same_attributes(ref, mine)
    _same_encoding(ref, mine, TEXTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smol", "llama", "gpt2"])
def test_decoding_equals_transformers(pairs: dict[str, tuple[Any, FileTokenizer]],
                                      name: str) -> None:
    ref, mine = pairs[name]
    singles = range(len(ref)) if len(ref) < 1000 else range(0, len(ref), 97)
    _same_decoding(ref, mine, _id_lists(ref, TEXTS, seed=len(name)), singles)
    assert mine.decode([]) == ref.decode([]) == ""
    ids = ref.encode(TEXTS[7])
    assert mine.decode(np.array(ids)) == ref.decode(np.array(ids))
    assert mine.decode(np.array([ids, ids])) == ref.decode(np.array([ids, ids]))
    assert mine.decode(np.int64(ids[0])) == ref.decode(np.int64(ids[0]))
    # Ids outside the vocabulary decode as transformers decodes them.
    assert mine.decode([0, len(ref) + 5, 1]) == ref.decode([0, len(ref) + 5, 1])


def test_smollm2_is_the_chatml_tokenizer(pairs: dict[str, tuple[Any, FileTokenizer]]) -> None:
    _ref, mine = pairs["smol"]
    assert (mine.bos_token, mine.eos_token, mine.pad_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert mine.encode("<|im_end|>", add_special_tokens=False) == [mine.eos_token_id]
    assert isinstance(mine.chat_template, str) and "<|im_start|>" in mine.chat_template
    # Streaming: an emoji split over tokens decodes piece by piece as U+FFFD, then whole.
    ids = mine.encode("😀", add_special_tokens=False)
    assert len(ids) > 1 and "\ufffd" in mine.decode(ids[:1]) and mine.decode(ids) == "😀"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smol", "llama"])
def test_chat_rendering_equals_transformers(pairs: dict[str, tuple[Any, FileTokenizer]],
                                            name: str) -> None:
    ref, mine = pairs[name]
    opened = _same_chat(ref, mine, CHAT, add_generation_prompt=True)
    assert opened.endswith("<|im_start|>assistant\n")
    _same_chat(ref, mine, CHAT, add_generation_prompt=False)
    _same_chat(ref, mine, CHAT[1:], add_generation_prompt=True)
    continued = _same_chat(ref, mine, OPEN_CHAT, continue_final_message=True)
    assert continued.endswith("<|im_start|>assistant\nIt is ")
    trimmed = [*CHAT, {"role": "assistant", "content": "Trailing   "}]
    _same_chat(ref, mine, trimmed, continue_final_message=True)
    # A batch of chats, messages with None-valued keys, a text with a special token.
    odd = [{"role": "user", "content": "say <|im_end|> please", "name": None}]
    assert mine.apply_chat_template([CHAT, odd], add_generation_prompt=True) == \
        ref.apply_chat_template([CHAT, odd], tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_chat_errors_are_raised_as_transformers_raises_them(
        pairs: dict[str, tuple[Any, FileTokenizer]], llama_dir: Path, tmp_path: Path) -> None:
    ref, mine = pairs["llama"]
    both = _both_raise(ref, mine, OPEN_CHAT, add_generation_prompt=True,
                       continue_final_message=True)
    assert isinstance(both, ValueError)
    _both_raise(ref, mine, [])
    _both_raise(ref, mine, ["not a message"])
    _both_raise(ref, mine, CHAT, continue_final_message="reasoning_content")

    strict = _copy(llama_dir, tmp_path / "strict")
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Only user and assistant roles are supported! Got ' + m['role']) }}"
        "{% endif %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    ref, mine = _auto(strict), load_tokenizer(strict)
    raised = _both_raise(ref, mine, CHAT, add_generation_prompt=True)
    assert "Only user and assistant roles are supported! Got system" in str(raised)
    _same_chat(ref, mine, CHAT[1:], add_generation_prompt=True)
    # A template that trims the message: the continued text loses its trailing spaces.
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}|{% endfor %}",
        encoding="utf-8")
    ref, mine = _auto(strict), load_tokenizer(strict)
    trailing = [OPEN_CHAT[1], {"role": "assistant", "content": "It is   "}]
    assert _same_chat(ref, mine, trailing, continue_final_message=True).endswith(": It is")
    # A template that drops the text to continue cannot continue it.
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}{% endfor %}content", encoding="utf-8")
    _both_raise(_auto(strict), load_tokenizer(strict), OPEN_CHAT[1:],
                continue_final_message=True)

    bare = _copy(llama_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    ref, mine = _auto(bare), load_tokenizer(bare)
    assert mine.chat_template is None is ref.chat_template
    _both_raise(ref, mine, CHAT)


# ------------------------------------------------------------------------ configurations

TEMPLATE = textwrap.dedent("""\
    {%- set ns = namespace(count=0, last='') -%}
    {{ bos_token }}
    {% for m in messages %}
      {% if m.role == 'skip' %}{% continue %}{% endif %}
      {% set ns.count = ns.count + 1 %}
      <{{ m.role }}{% if m.name is defined %} name={{ m.name }}{% endif %}>
      {% if m.thinking is defined %}[{{ m.thinking }}|{{ m.reasoning_content }}]{% endif %}
      {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}
      {% else %}{{ m.content | tojson }}{% endif %}
      {{ eos_token }}
      {% if ns.count > 40 %}{% break %}{% endif %}
    {% endfor %}
    {{ dict(a=1, b='é', c=[1, 2]) | tojson(indent=2, sort_keys=True) }} {{ ns.count }}
    {{ image_token }} {{ pad_token }} {{ tools | tojson }} {{ documents | tojson }}
    {{ strftime_now('%Y') | length }}{% if add_generation_prompt %}<assistant>{% endif %}""")


def _rich_config(config: dict[str, Any]) -> None:
    """Added tokens (a new plain one, a new special one, tokenizer.json's with other flags,
    the unknown token among them marked not special), a pad token not in the vocabulary,
    a model-specific and extra special tokens, clean-up forced on a BPE model, and the chat
    template in the configuration."""
    config["added_tokens_decoder"] = {
        "0": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
              "rstrip": False, "single_word": False, "special": False},
        "1": {"content": "<|im_start|>", "lstrip": False, "normalized": False,
              "rstrip": True, "single_word": False, "special": True},
        "2": {"content": "<|im_end|>", "lstrip": False, "normalized": False,
              "rstrip": False, "single_word": False, "special": True},
        "400": {"content": "<tool>", "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False, "special": False},
        "401": {"content": "<think>", "lstrip": True, "normalized": False,
                "rstrip": False, "single_word": False, "special": True},
    }
    config["pad_token"] = "<pad>"
    config["image_token"] = "<image>"
    config["extra_special_tokens"] = ["<extra_a>", "<|im_start|>", "<think>"]
    config["clean_up_tokenization_spaces"] = True
    config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"] = True
    config["chat_template"] = TEMPLATE
    config["add_bos_token"] = True  # transformers ignores both next to a tokenizer.json
    config["add_eos_token"] = True


def _legacy_config(config: dict[str, Any]) -> None:
    config.pop("pad_token")
    config["additional_special_tokens"] = ["<legacy_a>"]
    config["split_special_tokens"] = True
    config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]


def _padded_backend(tokenizer: dict[str, Any]) -> None:
    tokenizer["post_processor"] = None
    tokenizer["padding"] = {"strategy": "BatchLongest", "direction": "Left",
                            "pad_to_multiple_of": None, "pad_id": 1, "pad_type_id": 0,
                            "pad_token": "<|im_start|>"}
    tokenizer["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst",
                               "stride": 0}


def _no_pad_config(config: dict[str, Any]) -> None:
    config.pop("pad_token")
    config.pop("unk_token")
    config["mask_token"] = {"__type": "AddedToken", "content": "<mask>", "lstrip": True,
                            "normalized": False, "rstrip": False, "single_word": False,
                            "special": True}


@pytest.fixture()
def variants(llama_dir: Path, tmp_path: Path) -> dict[str, Path]:
    rich = _copy(llama_dir, tmp_path / "rich", config=_rich_config)
    (rich / "chat_template.jinja").unlink()
    legacy = _copy(llama_dir, tmp_path / "legacy", config=_legacy_config)
    (legacy / "special_tokens_map.json").write_text(json.dumps({
        "pad_token": {"content": "<pad2>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False},
        "sep_token": "<|im_end|>",
        "additional_special_tokens": ["<legacy_b>", "<|endoftext|>"]}), encoding="utf-8")
    padded = _copy(llama_dir, tmp_path / "padded", config=_no_pad_config,
                   tokenizer=_padded_backend)
    templates = padded / "additional_chat_templates"
    templates.mkdir()
    (templates / "tool_use.jinja").write_text("TOOLS {{ tools | tojson }} {{ messages | length }}",
                                              encoding="utf-8")
    (templates / "rag.jinja").write_text("RAG {{ documents | tojson }}", encoding="utf-8")
    named = _copy(llama_dir, tmp_path / "named", config=lambda c: c.update(chat_template=[
        {"name": "default", "template": "D {% for m in messages %}{{ m.content }}|{% endfor %}"},
        {"name": "other", "template": "O {{ eos_token }}"}]))
    (named / "chat_template.jinja").unlink()
    return {"rich": rich, "legacy": legacy, "padded": padded, "named": named}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["rich", "legacy", "padded", "named"])
def test_configured_tokenizers_equal_transformers(variants: dict[str, Path],
                                                  variant: str) -> None:
    directory = variants[variant]
    ref, mine = _auto(directory), load_tokenizer(directory)
    _same_attributes(ref, mine)
    texts = [*TEXTS, "use <tool> then <think> now", "  <think>  spaced", "<extra_a><image>",
             "<pad> and <pad2> and <legacy_a><legacy_b>", "done , ok . isn't 's",
             "fill  <mask> here"]
    _same_encoding(ref, mine, texts)
    _same_decoding(ref, mine, _id_lists(ref, texts, seed=7), range(len(ref)))
    for chat in (CHAT, OPEN_CHAT):
        ends_open = chat is OPEN_CHAT
        _same_chat(ref, mine, chat, add_generation_prompt=not ends_open,
                   continue_final_message=ends_open)


@pytest.mark.slow
def test_configured_chat_variables_and_templates(variants: dict[str, Path]) -> None:
    ref, mine = _auto(variants["rich"]), load_tokenizer(variants["rich"])
    chat = [{"role": "skip", "content": "hidden"},
            {"role": "user", "content": "quote \" and <b>é</b>", "name": "ann"},
            {"role": "assistant", "content": "fine", "reasoning": "thought about it"},
            {"role": "user", "content": "again", "name": None}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    documents = [{"title": "T", "text": "über"}]
    rendered = _same_chat(ref, mine, chat, add_generation_prompt=True, tools=tools,
                          documents=documents)
    assert "<image>" in rendered and "[thought about it|thought about it]" in rendered
    assert mine.apply_chat_template(chat, note="x") == \
        ref.apply_chat_template(chat, tokenize=False, note="x")
    reasoning = [*chat[:2], {"role": "assistant", "content": "a", "reasoning": "so far "}]
    _same_chat(ref, mine, reasoning, continue_final_message="reasoning_content")

    ref, mine = _auto(variants["padded"]), load_tokenizer(variants["padded"])
    assert isinstance(mine.chat_template, dict) and set(mine.chat_template) == \
        {"default", "tool_use", "rag"}
    _same_chat(ref, mine, CHAT, tools=tools, add_generation_prompt=True)
    _same_chat(ref, mine, CHAT, chat_template="rag", documents=documents)
    _same_chat(ref, mine, CHAT, chat_template="literal {{ bos_token }}")

    ref, mine = _auto(variants["named"]), load_tokenizer(variants["named"])
    _same_chat(ref, mine, CHAT, chat_template="other")
    (variants["named"] / "tokenizer_config.json").write_text(json.dumps({
        **json.loads((variants["named"] / "tokenizer_config.json").read_text()),
        "chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}))
    ref, mine = _auto(variants["named"]), load_tokenizer(variants["named"])
    _both_raise(ref, mine, CHAT)
    _same_chat(ref, mine, CHAT, chat_template="b")


# ------------------------------------------------------------------------ refusals

def test_a_missing_tokenizer_json_names_the_file(llama_dir: Path, tmp_path: Path) -> None:
    copy = _copy(llama_dir, tmp_path / "copy")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(TokenizerFilesError, match=r"tokenizer\.json is missing") as caught:
        load_tokenizer(copy)
    assert caught.value.code == "invalid_tokenizer"
    assert str(copy / "tokenizer.json") in caught.value.message
    (copy / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerFilesError, match=r"tokenizer_config\.json is missing"):
        load_tokenizer(copy)
    with pytest.raises(TokenizerFilesError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_files_that_are_not_regular_or_not_valid_are_refused(llama_dir: Path,
                                                             tmp_path: Path) -> None:
    fifo = _copy(llama_dir, tmp_path / "fifo")
    (fifo / "tokenizer.json").unlink()
    os.mkfifo(fifo / "tokenizer.json")
    with pytest.raises(TokenizerFilesError, match="not a regular file"):
        load_tokenizer(fifo)
    folder = _copy(llama_dir, tmp_path / "folder")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").mkdir()
    with pytest.raises(TokenizerFilesError, match=r"chat_template\.jinja is not a regular file"):
        load_tokenizer(folder)
    broken = _copy(llama_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="cannot be parsed"):
        load_tokenizer(broken)
    (broken / "tokenizer_config.json").write_text("[]", encoding="utf-8")
    with pytest.raises(TokenizerFilesError, match="not hold a JSON object"):
        load_tokenizer(broken)
    linked = tmp_path / "linked"
    linked.mkdir()
    for file in llama_dir.iterdir():
        (linked / file.name).symlink_to(file)
    assert load_tokenizer(linked).encode("hello") == load_tokenizer(llama_dir).encode("hello")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(tokenizer_class="GPT2Tokenizer"), "tokenizer class 'GPT2Tokenizer'"),
    (lambda c: c.pop("tokenizer_class"), "tokenizer class None"),
    (lambda c: c.update(auto_map={"AutoTokenizer": ["x.Y", None]}), "'auto_map'"),
    (lambda c: c.update(fast_tokenizer_files=["tokenizer.json"]), "'fast_tokenizer_files'"),
])
def test_configurations_this_reader_does_not_do_are_refused(
        llama_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], Any],
        message: str) -> None:
    copy = _copy(llama_dir, tmp_path / "copy", config=edit)
    with pytest.raises(TokenizerFilesError, match=message):
        load_tokenizer(copy)


def test_model_types_given_their_own_tokenizer_class_are_refused(llama_dir: Path,
                                                                 tmp_path: Path) -> None:
    """The list of such model types is transformers' own (checked here), and a
    directory whose model is of one of them is refused."""
    from transformers.models.auto import tokenization_auto as auto

    from engine import tokenizer_files

    plain = {"TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast",
             "MistralCommonBackend"}
    own = {model_type for model_type in auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
           if (auto.TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend")
           .removesuffix("Fast") not in plain}
    assert own <= tokenizer_files._OWN_CLASS_MODEL_TYPES
    copy = _copy(llama_dir, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(TokenizerFilesError, match="model type 'qwen2'"):
        load_tokenizer(copy)


# ------------------------------------------------------------------------ no transformers

@pytest.mark.slow
def test_loading_and_using_it_never_imports_transformers(smol_dir: Path) -> None:
    code = textwrap.dedent(f"""\
        import json, sys
        from engine.tokenizer_files import load_tokenizer
        tok = load_tokenizer({str(smol_dir)!r})
        ids = tok("Hello 😀 world", add_special_tokens=True)["input_ids"]
        text = tok.decode(ids) + tok.decode(ids[1], skip_special_tokens=True)
        chat = tok.apply_chat_template([{{"role": "user", "content": "hi"}}],
                                       add_generation_prompt=True)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "torch"))
        print(json.dumps({{"ids": ids, "text": text, "chat": chat, "heavy": heavy}}))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)
    out = json.loads(done.stdout)
    assert out["heavy"] == []
    assert out["text"].startswith("Hello 😀 world")
    assert out["chat"].endswith("<|im_start|>assistant\n")
