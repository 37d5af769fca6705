"""A model's tokenizer read from its saved files, without importing transformers.

The native CPU path runs a LLaMA GGUF on the engine's own blocks; importing transformers
just for its tokenizer would add about 100 MB of resident memory (it pulls in torch's
distributed and compiler packages). :func:`load_tokenizer` reads the directory that a
transformers ``save_pretrained`` wrote (``tokenizer.json``, ``tokenizer_config.json``, an
optional ``chat_template.jinja`` or ``additional_chat_templates/``, an optional
``special_tokens_map.json``) with the ``tokenizers`` library alone, and renders chat
templates with ``jinja2``. What it gives (token ids, decoded text, special tokens, chat
text) equals what transformers 5's ``AutoTokenizer.from_pretrained(directory)`` gives for
the same files (tests/test_tokenizer_files.py holds the two side by side). Files that would
make transformers build anything else (another tokenizer class, remote code, versioned
tokenizer files, ...) are refused with :class:`TokenizerFilesError` rather than read
differently.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

from tokenizers import AddedToken, Tokenizer, processors

from engine.errors import EngineError

if TYPE_CHECKING:
    from jinja2 import Template

__all__ = ["FileTokenizer", "TokenizerFilesError", "load_tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATES_DIR = "additional_chat_templates"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
LEGACY_ADDED_TOKENS_FILE = "added_tokens.json"
MODEL_CONFIG_FILE = "config.json"

# The named special tokens, in the order every listing of them follows.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")
# The tokenizer classes whose saved files this module reads (the plain `tokenizers` backend).
_READ_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# Model types for which transformers builds a tokenizer class of its own whatever class the
# files declare (tests/test_tokenizer_files.py checks this list against transformers).
_OWN_CLASS_MODEL_TYPES = frozenset({
    "hyperclovax_vision_v2", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen4_exp", "siglip2"})
# Above this many tokens transformers may rewrite the pre-tokenizer of a Mistral tokenizer.
_LARGE_VOCABULARY = 100_000
_ADDED_TOKEN_FIELDS = frozenset({"content", "single_word", "lstrip", "rstrip", "normalized",
                                 "special"})
# Names a message's reasoning may come under; templates read the first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Appended to the message being continued, so its end can be found in the rendered text.
_CONTINUE_MARK = "CONTINUE_FINAL_MESSAGE_TAG "
_OLDEST_SAFE_JINJA = (3, 1, 6)

Token = str | AddedToken
Conversation = Sequence[Mapping[str, Any]]


class TokenizerFilesError(EngineError):
    """A tokenizer directory is missing a file, holds an unreadable one, or asks for
    something this reader does not do."""

    code = "invalid_tokenizer"


# ------------------------------------------------------------------------ reading files

def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``, which must be a regular file (a link to one is fine)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TokenizerFilesError(
            f"tokenizer file {path} is missing; save the model's tokenizer into "
            f"{path.parent} again") from None
    except OSError as exc:
        raise TokenizerFilesError(f"tokenizer file {path} cannot be opened ({exc.strerror}); "
                                  "check its permissions") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TokenizerFilesError(f"tokenizer file {path} is not a regular file; replace it "
                                      "with the file the tokenizer was saved as")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read()
    except OSError as exc:
        raise TokenizerFilesError(f"tokenizer file {path} cannot be read ({exc}); "
                                  "save the tokenizer again") from exc
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerFilesError(f"tokenizer file {path} is not UTF-8 text ({exc}); "
                                  "save the tokenizer again") from exc


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``."""
    text = _read_text(path)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise TokenizerFilesError(f"tokenizer file {path} is not valid JSON ({exc}); "
                                  "save the tokenizer again") from exc
    if not isinstance(value, dict):
        raise TokenizerFilesError(f"tokenizer file {path} does not hold a JSON object; "
                                  "save the tokenizer again")
    return value


def _present(path: Path) -> bool:
    """Whether an optional file is there (a name that is there but is no regular file is
    refused rather than skipped)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise TokenizerFilesError(f"tokenizer file {path} cannot be inspected ({exc.strerror})"
                                  ) from exc
    if not stat.S_ISREG(info.st_mode):
        raise TokenizerFilesError(f"tokenizer file {path} is not a regular file; remove it or "
                                  "replace it with the file the tokenizer was saved as")
    return True


def _added_token(entry: Any, where: str, *, special: bool | None = None) -> AddedToken:
    """An added token from its saved fields (``content``, ``special``, ``lstrip``, ...);
    ``special``: mark it special or not whatever the fields say (they must not say)."""
    allowed = _ADDED_TOKEN_FIELDS if special is None else _ADDED_TOKEN_FIELDS - {"special"}
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not set(
            entry) <= allowed:
        raise TokenizerFilesError(f"{where}: {entry!r} is not an added token (an object with "
                                  f"'content' and the flags {sorted(allowed - {'content'})})")
    if special is None:
        return AddedToken(**entry)
    return AddedToken(**entry, special=special)


def _typed_tokens(value: Any, where: str) -> Any:
    """``value`` with every ``{"__type": "AddedToken", ...}`` object in it made a token."""
    if isinstance(value, dict):
        if value.get("__type") == "AddedToken":
            return _added_token({k: v for k, v in value.items() if k != "__type"}, where)
        return {key: _typed_tokens(item, where) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_typed_tokens(item, where) for item in value]
    return value


def _version_below(version: str, floor: tuple[int, ...]) -> bool:
    """Whether a dotted version string is older than ``floor`` (unparsable parts count as 0)."""
    parts: list[int] = []
    for piece in version.split(".")[:len(floor)]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits or 0))
    return tuple(parts) < floor


# ------------------------------------------------------------------------ the settings

def _chat_templates(directory: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The chat template(s): ``chat_template.jinja`` and ``additional_chat_templates/*.jinja``
    when any is there (they replace the config's), else the config's ``chat_template``."""
    found: dict[str, str] = {}
    main = directory / CHAT_TEMPLATE_FILE
    if _present(main):
        found["default"] = _read_text(main)
    extra = directory / CHAT_TEMPLATES_DIR
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            found[file.name.removesuffix(".jinja")] = _read_text(file)
    if found:
        return found["default"] if list(found) == ["default"] else found
    saved = config.get("chat_template")
    if saved is None or isinstance(saved, str):
        return saved
    where = directory / CONFIG_FILE
    if isinstance(saved, list) and all(
            isinstance(item, dict) and isinstance(item.get("name"), str)
            and isinstance(item.get("template"), str) for item in saved):
        return {item["name"]: item["template"] for item in saved}
    raise TokenizerFilesError(f"{where}: 'chat_template' is neither a template nor a list of "
                              "named templates; save the tokenizer again")


def _refuse_unread(directory: Path, config: dict[str, Any]) -> None:
    """Refuse files that transformers would turn into something other than what is read here."""
    where = directory / CONFIG_FILE
    declared = config.get("tokenizer_class")
    if declared not in _READ_CLASSES:
        raise TokenizerFilesError(
            f"{where} declares tokenizer class {declared!r}; only the plain tokenizers backend "
            f"({', '.join(sorted(_READ_CLASSES))}) is read without transformers")
    for key, why in (("auto_map", "it names remote tokenizer code"),
                     ("fast_tokenizer_files", "it names versioned tokenizer files"),
                     ("post_processor", "it replaces the post-processor of tokenizer.json")):
        if key in config:
            raise TokenizerFilesError(f"{where} holds {key!r} ({why}), which this reader does "
                                      "not do; load the tokenizer with transformers")
    model_config = directory / MODEL_CONFIG_FILE
    if _present(model_config):
        model_type = _read_json(model_config).get("model_type")
        if model_type in _OWN_CLASS_MODEL_TYPES:
            raise TokenizerFilesError(
                f"{model_config}: transformers gives model type {model_type!r} a tokenizer "
                "class of its own, which this reader does not build")


def _special_token_settings(directory: Path, config: dict[str, Any],
                            backend: Tokenizer) -> dict[str, Any]:
    """The tokenizer's settings from ``tokenizer_config.json`` and the legacy files, with its
    special and added tokens resolved as transformers resolves them when it loads them."""
    where = str(directory / CONFIG_FILE)
    settings = {key: value for key, value in config.items()
                if key not in ("tokenizer_class", "init_inputs", "add_bos_token",
                               "add_eos_token")}
    # The older name of the extra special tokens.
    if "additional_special_tokens" in settings and not settings.get("extra_special_tokens"):
        settings["extra_special_tokens"] = settings.pop("additional_special_tokens")
    # Tokens named by a key of their own (``image_token``) join the named special tokens.
    own_names = {key: settings.pop(key) for key in list(settings)
                 if key not in NAMED_SPECIAL_TOKENS and key.endswith("_token")
                 and isinstance(settings[key], str)}
    if isinstance(settings.get("extra_special_tokens"), dict):
        own_names.update(settings.pop("extra_special_tokens"))
    if own_names:
        settings["model_specific_special_tokens"] = own_names

    decoder: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in settings:
        table = settings["added_tokens_decoder"]
        if not isinstance(table, dict):
            raise TokenizerFilesError(f"{where}: 'added_tokens_decoder' is not an object")
        for index, entry in table.items():
            try:
                number = int(index)
            except ValueError:
                raise TokenizerFilesError(f"{where}: added token id {index!r} is not a "
                                          "number") from None
            decoder[number] = _added_token(entry, where)
    else:
        special_map = directory / SPECIAL_TOKENS_MAP_FILE
        if _present(special_map):
            _merge_special_tokens_map(settings, _read_json(special_map), str(special_map))
        if _present(directory / LEGACY_ADDED_TOKENS_FILE):
            raise TokenizerFilesError(
                f"{directory / LEGACY_ADDED_TOKENS_FILE} (a legacy added-token list) is not "
                "read here; save the tokenizer again with a current transformers")
        for entry in _backend_added_tokens(backend):
            decoder[entry[0]] = entry[1]
    settings["added_tokens_decoder"] = decoder
    return {key: (value if key == "added_tokens_decoder" else _typed_tokens(value, where))
            for key, value in settings.items()}


def _backend_added_tokens(backend: Tokenizer) -> list[tuple[int, AddedToken]]:
    """The added tokens of a ``tokenizers`` tokenizer, fresh copies in id order."""
    return [(index, AddedToken(**token.__getstate__()))
            for index, token in sorted(backend.get_added_tokens_decoder().items())]


def _merge_special_tokens_map(settings: dict[str, Any], saved: dict[str, Any],
                              where: str) -> None:
    """Fold a legacy ``special_tokens_map.json`` into the settings (its values win)."""
    for key, value in saved.items():
        if isinstance(value, dict) and key != "extra_special_tokens":
            value = _added_token({k: v for k, v in value.items() if k != "special"}, where,
                                 special=True)
        elif key == "extra_special_tokens" and isinstance(value, list):
            merged = list(settings.get("extra_special_tokens") or [])
            for item in value:
                token = _added_token(item, where, special=True) if isinstance(item, dict) else item
                if token not in merged:
                    merged.append(token)
            value = merged
        elif isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise TokenizerFilesError(f"{where}: {key!r} lists something other than token "
                                      "strings, which this reader does not do")
        settings[key] = value
    if isinstance(settings.get("extra_special_tokens"), dict):
        settings.setdefault("model_specific_special_tokens", {}).update(
            settings.pop("extra_special_tokens"))


def _check_token(value: Any, key: str, where: str) -> Token:
    if not isinstance(value, str | AddedToken):
        raise TokenizerFilesError(f"{where}: special token {key!r} is {value!r}, neither a "
                                  "string nor an added token")
    return value


# ------------------------------------------------------------------------ the tokenizer

class FileTokenizer:
    """A tokenizer built from saved tokenizer files: encoding, decoding, special tokens and
    chat templates as transformers 5 gives them for the same files. Build it with
    :func:`load_tokenizer`."""

    def __init__(self, backend: Tokenizer, settings: dict[str, Any], *, where: str) -> None:
        """Finish ``backend`` (from ``tokenizer.json``) with resolved ``settings``; ``where``
        names the configuration in error messages."""
        self._backend = backend
        settings = dict(settings)
        added_table: dict[int, AddedToken] = settings.pop("added_tokens_decoder", {})

        # Encoding never truncates nor pads; a padding saved in tokenizer.json names the
        # pad token when the configuration does not.
        saved_padding = backend.padding
        if saved_padding is not None:
            settings.setdefault("pad_token", saved_padding["pad_token"])
        backend.no_truncation()
        backend.no_padding()
        rebuild_post_processor = backend.post_processor is None

        if "additional_special_tokens" in settings and "extra_special_tokens" not in settings:
            settings["extra_special_tokens"] = settings.pop("additional_special_tokens")
        self._special: dict[str, Token | None] = dict.fromkeys(NAMED_SPECIAL_TOKENS)
        self._extra_special: list[Token] = []
        found_names: dict[str, Token] = {}
        for key in list(settings):
            if key in self._special:
                value = settings.pop(key)
                if value is not None:
                    self._special[key] = _check_token(value, key, where)
            elif key == "extra_special_tokens":
                value = settings.pop(key)
                if isinstance(value, dict):
                    self._name_tokens(value, where)
                elif isinstance(value, list | tuple):
                    self._extra_special = [_check_token(v, key, where) for v in value]
                elif value is not None:
                    raise TokenizerFilesError(f"{where}: 'extra_special_tokens' is neither a "
                                              "list nor an object of tokens")
            elif key.endswith("_token") and isinstance(settings[key], str | AddedToken):
                found_names[key] = settings.pop(key)
        given_names = settings.pop("model_specific_special_tokens", None) or {}
        if not isinstance(given_names, dict):
            raise TokenizerFilesError(f"{where}: 'model_specific_special_tokens' is not an "
                                      "object of tokens")
        self._name_tokens({**found_names, **given_names}, where)

        self.clean_up_tokenization_spaces: bool = bool(
            settings.get("clean_up_tokenization_spaces", False))
        self._clean_up_bpe_too = bool(
            settings.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                         False))
        self.split_special_tokens: bool = bool(settings.get("split_special_tokens", False))
        names = settings.get("model_input_names", ["input_ids", "attention_mask"])
        if not isinstance(names, list | tuple):
            raise TokenizerFilesError(f"{where}: 'model_input_names' is not a list of names")
        self.model_input_names: list[str] = list(names)
        template = settings.get("chat_template")
        if isinstance(template, list | tuple):
            template = {item["name"]: item["template"] for item in template}
        self.chat_template: str | dict[str, str] | None = template
        backend.encode_special_tokens = self.split_special_tokens

        self._register_tokens(added_table)
        if (backend.get_vocab_size() > _LARGE_VOCABULARY
                and settings.get("fix_mistral_regex")):
            raise TokenizerFilesError(f"{where} asks for 'fix_mistral_regex' (a rewritten "
                                      "pre-tokenizer), which this reader does not do")
        if rebuild_post_processor:
            # Sequences as they are: no begin or end token added to them.
            backend.post_processor = processors.TemplateProcessing(
                single="$A:0", pair="$A:0 $B:1", special_tokens=[])

    def _name_tokens(self, named: Mapping[str, Any], where: str) -> None:
        """Add tokens that carry a name of their own (``image_token``) to the named ones."""
        for key, value in named.items():
            self._special[key] = _check_token(value, key, where)

    def _register_tokens(self, added_table: dict[int, AddedToken]) -> None:
        """Hand the backend every token of the saved added-token table, then each special
        token it does not know yet, as transformers does when it loads a tokenizer."""
        pending: list[Token] = [token for _index, token in sorted(added_table.items(),
                                                                   key=lambda item: item[0])]
        known = {token.content for _i, token in _backend_added_tokens(self._backend)}
        known.update(str(token) for token in pending)
        for value in [*self._special.values(), *self._extra_special]:
            if value is not None and str(value) not in known and value not in pending:
                pending.append(value)
        named = {str(value) for value in self._special.values() if value}
        tokens: list[AddedToken] = []
        for token in pending:
            if isinstance(token, str):
                token = AddedToken(token, special=True)
            elif not token.special and token.content in named:
                token.special = True
            tokens.append(token)
        if tokens:
            self._backend.add_tokens(tokens)

    # -------------------------------------------------------------- special tokens

    def _token(self, name: str) -> str | None:
        value = self._special.get(name)
        return None if value is None else str(value)

    def _token_id(self, name: str) -> int | None:
        token = self._token(name)
        return None if token is None else self._id_of(token)

    def _id_of(self, token: str) -> int | None:
        found = self._backend.token_to_id(token)
        if found is not None:
            return int(found)
        unknown = self._token("unk_token")
        if unknown is None or unknown == token:
            return None
        return self._id_of(unknown)

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token, if the tokenizer names one."""
        return self._token("bos_token")

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token, if the tokenizer names one."""
        return self._token("eos_token")

    @property
    def unk_token(self) -> str | None:
        """The unknown-text token, if the tokenizer names one."""
        return self._token("unk_token")

    @property
    def pad_token(self) -> str | None:
        """The padding token, if the tokenizer names one."""
        return self._token("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        """The id of :attr:`bos_token`."""
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The id of :attr:`eos_token`."""
        return self._token_id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        """The id of :attr:`unk_token`."""
        return self._token_id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        """The id of :attr:`pad_token`."""
        return self._token_id("pad_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Each named special token that is set (``bos_token``, ..., then model-specific
        names such as ``image_token``), by name; also the chat template's token variables."""
        return {name: str(value) for name, value in self._special.items() if value is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, then the extra ones, each once."""
        seen: dict[str, None] = {}
        for value in [*self._special.values(), *self._extra_special]:
            if value is not None:
                seen.setdefault(str(value), None)
        return list(seen)

    @property
    def all_special_ids(self) -> list[int | None]:
        """The ids of :attr:`all_special_tokens`, in the same order."""
        return [self._id_of(token) for token in self.all_special_tokens]

    # -------------------------------------------------------------- vocabulary

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers`` tokenizer (share it, do not reconfigure it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """The size of the base vocabulary, without added tokens."""
        return int(self._backend.get_vocab_size(with_added_tokens=False))

    def __len__(self) -> int:
        """The size of the whole vocabulary, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def get_vocab(self) -> dict[str, int]:
        """Every token (added ones included) with its id."""
        return dict(self._backend.get_vocab(with_added_tokens=True))

    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...

    @overload
    def convert_tokens_to_ids(self, tokens: list[str] | tuple[str, ...]) -> list[int | None]: ...

    def convert_tokens_to_ids(self, tokens: str | list[str] | tuple[str, ...]
                              ) -> int | list[int | None] | None:
        """The id of a token (the unknown token's id when it has none), or of each token."""
        if isinstance(tokens, str):
            return self._id_of(tokens)
        return [self._id_of(token) for token in tokens]

    @overload
    def convert_ids_to_tokens(self, ids: int, skip_special_tokens: bool = False
                              ) -> str | None: ...

    @overload
    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False
                              ) -> list[str | None]: ...

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False
                              ) -> str | list[str | None] | None:
        """The token of an id, or of each id (``None`` for an id outside the vocabulary);
        ``skip_special_tokens`` leaves out the ids of :attr:`all_special_ids`."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in skipped]

    # -------------------------------------------------------------- encoding

    def _encode_texts(self, texts: Sequence[str], add_special_tokens: bool
                      ) -> list[Any]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"a text to encode must be a str, not {type(text).__name__}")
        return list(self._backend.encode_batch(list(texts),
                                               add_special_tokens=add_special_tokens))

    @overload
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]: ...

    @overload
    def __call__(self, text: list[str] | tuple[str, ...], add_special_tokens: bool = True
                 ) -> dict[str, list[list[int]]]: ...

    def __call__(self, text: str | list[str] | tuple[str, ...], add_special_tokens: bool = True
                 ) -> dict[str, list[int]] | dict[str, list[list[int]]]:
        """Encode a text (``{"input_ids": [...], ...}``) or a list of texts (a list per key).

        Besides ``input_ids``, ``attention_mask`` (and ``token_type_ids``) come back where
        the tokenizer's ``model_input_names`` lists them. ``add_special_tokens``: let the
        post-processor add the tokens it adds around a sequence.
        """
        batch = not isinstance(text, str)
        texts: Sequence[str] = [text] if isinstance(text, str) else text
        encodings = self._encode_texts(texts, add_special_tokens)
        out: dict[str, list[list[int]]] = {"input_ids": [list(e.ids) for e in encodings]}
        if "token_type_ids" in self.model_input_names:
            out["token_type_ids"] = [list(e.type_ids) for e in encodings]
        if "attention_mask" in self.model_input_names:
            out["attention_mask"] = [list(e.attention_mask) for e in encodings]
        if batch:
            return out
        return {key: rows[0] for key, rows in out.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"a text to encode must be a str, not {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    # -------------------------------------------------------------- decoding

    @overload
    def decode(self, token_ids: int | Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str: ...

    @overload
    def decode(self, token_ids: Sequence[Sequence[int]], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> list[str]: ...

    def decode(self, token_ids: int | Sequence[int] | Sequence[Sequence[int]],
               skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """The text of token ids (a single id, a list, or a list of lists: one text each).

        ``skip_special_tokens`` leaves out the tokens the backend marks special. An id piece
        that ends inside a UTF-8 character decodes to U+FFFD for the bytes it holds.
        ``clean_up_tokenization_spaces`` (default: the tokenizer's setting) removes the
        spaces before punctuation and contractions, except on a BPE model unless its
        configuration insists.
        """
        if callable(getattr(token_ids, "tolist", None)):  # numpy arrays, torch tensors
            token_ids = token_ids.tolist()  # type: ignore[union-attr]
        if isinstance(token_ids, Sequence) and token_ids and isinstance(token_ids[0], Sequence):
            rows = cast("Sequence[Sequence[int]]", token_ids)
            return [self._decode_one(row, skip_special_tokens, clean_up_tokenization_spaces)
                    for row in rows]
        return self._decode_one(cast("int | Sequence[int]", token_ids), skip_special_tokens,
                                clean_up_tokenization_spaces)

    def _decode_one(self, token_ids: int | Sequence[int], skip_special_tokens: bool,
                    clean_up: bool | None) -> str:
        ids = [operator.index(token_ids)] if not isinstance(token_ids, Sequence) else [
            operator.index(i) for i in token_ids]
        text = str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))
        if clean_up is None:
            clean_up = self.clean_up_tokenization_spaces
        if clean_up and (type(self._backend.model).__name__ != "BPE" or self._clean_up_bpe_too):
            text = _clean_up_spaces(text)
        return text

    # -------------------------------------------------------------- chat

    def get_chat_template(self, chat_template: str | None = None,
                          tools: Sequence[Any] | None = None) -> str:
        """The template text to render: ``chat_template`` itself, or the template of that
        name, or the tokenizer's own (its ``tool_use`` one when tools are given and it has
        one, else its ``default``)."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in own:
                    return own["tool_use"]
                if "default" in own:
                    return own["default"]
                raise ValueError("this tokenizer has several chat templates and none is the "
                                 "default; name one of " + ", ".join(sorted(own)))
            return chat_template
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError("this tokenizer has no chat template and none was given")
        return own

    @overload
    def apply_chat_template(self, conversation: Conversation, *, tokenize: bool = False,
                            add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None,
                            **template_vars: Any) -> str | list[int]: ...

    @overload
    def apply_chat_template(self, conversation: Sequence[Conversation], *,
                            tokenize: bool = False, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None,
                            **template_vars: Any) -> list[str] | list[list[int]]: ...

    def apply_chat_template(self, conversation: Conversation | Sequence[Conversation], *,
                            tokenize: bool = False, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False,
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None,
                            chat_template: str | None = None,
                            **template_vars: Any) -> str | list[int] | list[str] | list[list[int]]:
        """Render a conversation (a list of messages, or a list of such lists) with the chat
        template.

        The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``,
        the named special tokens (``bos_token``, ``eos_token``, ...) and ``template_vars``.
        ``continue_final_message`` (``True``, or the name of the message field to continue)
        leaves the last message open, cut where its text ends; it cannot go with
        ``add_generation_prompt``. A template that raises (``raise_exception``) raises
        ``jinja2.TemplateError``. ``tokenize``: return the ids of the text (encoded without
        adding special tokens) instead of the text.
        """
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, list | tuple) and not conversation:
            raise ValueError("a chat needs at least one message")
        first = conversation[0] if isinstance(conversation, list | tuple) else None
        batch = isinstance(first, list | tuple) or hasattr(first, "messages")
        chats = list(conversation) if batch else [conversation]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "set: one continues the last message, the other opens a new one")
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise ValueError("tools must be given as JSON schemas (dicts)")
        if documents is not None and not all(isinstance(doc, dict) for doc in documents):
            raise TypeError("documents must be dicts (with 'title' and 'text' keys)")
        variables = _template_data({**self.special_tokens_map, **template_vars})
        compiled = _compiled_template(template)
        schemas = None if tools is None else _template_data(list(tools))
        texts = [_render_chat(compiled, template, chat, tools=schemas,
                              documents=_template_data(documents),
                              add_generation_prompt=add_generation_prompt,
                              continue_field=continue_final_message, variables=variables)
                 for chat in chats]
        if tokenize:
            ids = [self.encode(text, add_special_tokens=False) for text in texts]
            return ids if batch else ids[0]
        return texts if batch else texts[0]


def load_tokenizer(directory: Path | str) -> FileTokenizer:
    """The tokenizer saved in ``directory`` (as transformers' ``save_pretrained`` writes it).

    Raises :class:`TokenizerFilesError` when a file is missing, unreadable or not a regular
    file, or when the files ask for something this reader does not do.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerFilesError(f"tokenizer directory {directory} does not exist (or is not "
                                  "a directory); save the model's tokenizer into it")
    config = _read_json(directory / CONFIG_FILE)
    _refuse_unread(directory, config)
    tokenizer_file = directory / TOKENIZER_FILE
    text = _read_text(tokenizer_file)
    try:
        backend = Tokenizer.from_str(text)
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise TokenizerFilesError(f"tokenizer file {tokenizer_file} cannot be parsed ({exc}); "
                                  "save the tokenizer again") from exc
    settings = _special_token_settings(directory, config, backend)
    settings["chat_template"] = _chat_templates(directory, config)
    return FileTokenizer(backend, settings, where=str(directory / CONFIG_FILE))


def _clean_up_spaces(text: str) -> str:
    """Drop the space a word-piece decoder leaves before punctuation and contractions."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                           (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                           (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


# ------------------------------------------------------------------------ chat templates

def _template_data(value: Any) -> Any:
    """``value`` rebuilt from plain JSON-like types only, so a template cannot reach the
    methods of richer objects: mappings become dicts, lists and tuples stay, subclasses of
    str/int/float become the base type, dataclasses and pydantic models become dicts, numpy
    scalars their Python value, and anything else a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_template_data(key): _template_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_template_data(item) for item in value)
    numpy = sys.modules.get("numpy")  # a numpy scalar exists only once numpy is imported
    if numpy is not None and isinstance(value, numpy.generic):
        return _template_data(value.item())
    if is_dataclass(value) and not isinstance(value, type):
        return {field.name: _template_data(getattr(value, field.name))
                for field in fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _template_data(dump())
    return f"<{type(value).__name__}>"


def _chat_messages(chat: Any) -> list[dict[str, Any]]:
    """The messages of one chat as plain dicts, keys whose value is None dropped, and a
    message's reasoning also given under ``thinking`` and ``reasoning_content``."""
    messages = _template_data(getattr(chat, "messages", chat))
    if not isinstance(messages, list | tuple):
        raise TypeError(f"a chat must be a list of messages, not {type(chat).__name__}")
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, dataclasses or pydantic models, "
                            f"not {message!r}")
        message = {key: item for key, item in message.items() if item is not None}
        reasoning = next((message[key] for key in _REASONING_KEYS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _render_chat(compiled: Template, template: str, chat: Any, *, tools: Any, documents: Any,
                 add_generation_prompt: bool, continue_field: bool | str,
                 variables: dict[str, Any]) -> str:
    """One chat rendered; with ``continue_field``, cut right after the last message's text."""
    messages = _chat_messages(chat)
    continued: str | None = None
    if continue_field:
        continued = _mark_final_message(messages, template, continue_field)
    rendered = str(compiled.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables))
    if continued is None:
        return rendered
    mark = _CONTINUE_MARK.strip()
    if continued.strip() not in rendered or mark not in rendered:
        raise ValueError("continue_final_message is set but the chat template dropped part of "
                         f"the final message, so it cannot be continued: {continued.strip()!r} "
                         f"is not in the rendered chat {rendered!r}")
    cut = rendered.rindex(mark)
    if rendered.startswith(_CONTINUE_MARK, cut):
        return rendered[:cut]
    return rendered[:cut].rstrip()  # the template trimmed the message's trailing space


def _mark_final_message(messages: list[dict[str, Any]], template: str,
                        continue_field: bool | str) -> str:
    """Append the continuation mark to the final message's text; return that text."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = continue_field if isinstance(continue_field, str) else "content"
    last = messages[-1]
    text = last.get(field)
    if text is None:
        raise ValueError(f"continue_final_message is set but the final message has no "
                         f"{field!r} to continue")
    marked = ([key for key in _REASONING_KEYS if last.get(key) == text]
              if field in _REASONING_KEYS else [field])
    if not any(key in template for key in marked):
        raise ValueError(f"continue_final_message is set to {field!r} but the chat template "
                         "does not use that field")
    if isinstance(text, list | tuple):
        for block in reversed(text):
            if "text" in block:
                found = block["text"]
                block["text"] = found + _CONTINUE_MARK
                return str(found)
        raise ValueError("continue_final_message is set but the final message has no text "
                         "block to continue")
    for key in marked:
        last[key] = last[key] + _CONTINUE_MARK
    return str(text)


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str) -> Template:
    """``template`` compiled in the chat sandbox (cached by its text)."""
    return _chat_environment().from_string(template)


@functools.lru_cache(maxsize=1)
def _chat_environment() -> Any:
    """The sandboxed jinja environment chat templates render in: blocks trimmed, loop
    controls, a ``{% generation %}`` block (rendered as its body), ``raise_exception``,
    ``strftime_now``, a ``tojson`` that keeps non-ASCII text, and ``dict``/``namespace``
    that refuse underscore names."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError as exc:
        raise TokenizerFilesError("rendering a chat template needs the jinja2 package; "
                                  "install it (pip install 'jinja2>=3.1.6')") from exc
    if _version_below(jinja2.__version__, _OLDEST_SAFE_JINJA):
        raise TokenizerFilesError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes and chat templates are "
            "untrusted; upgrade it (pip install -U 'jinja2>=3.1.6')")

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}``: marks the assistant's text; renders
        its body unchanged."""

        tags = {"generation"}  # noqa: RUF012 - jinja reads the class attribute

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def refuse_private(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not store the underscore name {name!r} on a namespace")

    class SafeNamespace(Namespace):
        """A jinja namespace that refuses underscore-prefixed attribute names."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            target, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                refuse_private(name)
            Namespace.__init__(target, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            refuse_private(name)
            Namespace.__setitem__(self, name, value)

    class DictMaker:
        """``dict(...)`` and ``dict.fromkeys(...)`` for templates, nothing else."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                               dict=DictMaker(), namespace=SafeNamespace)
    return environment
