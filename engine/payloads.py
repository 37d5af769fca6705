"""The job payloads on the wire: one pydantic model per shape, their union, and ``parse_payload``.

The shapes (PROTOCOLS.md "Job payloads", and the engine's own JSON):

==================  =============================================================
:class:`Job`        engine JSON: ``{"model", "task", "prompt" | "messages" | "input", "params"}``
:class:`FlatInference`  ``{"type": "inference", "model", "prompt" | "messages", "max_tokens", ...}``
                    (``type`` may be left out when ``prompt`` or ``messages`` is there)
:class:`EmbeddingPayload`  ``{"type": "embedding", "model", "input"}``
:class:`ServiceRequest`  ``{"service_type": "llm_inference", "service_request": {...}}``
==================  =============================================================

:data:`JobPayload` is their union, told apart by the key that is present
(``service_type``, then ``type``, then ``task`` or ``params``, then ``prompt`` or
``messages``). The same models validate a payload (strict types, the ranges of
:class:`~engine.jobs.Job`), give the local API's OpenAPI schema of
``POST /v1/jobs`` (:func:`payload_json_schema`) and convert to a :class:`Job`
(``to_job()``).

The network's shapes are read as the network sends them (:func:`parse_payload`):
a key the engine does not know is ignored and named in the job's ``notes``
(never a failure), a key that would change the job's meaning but that the
engine cannot honour (:data:`REFUSED_KEYS`, e.g. ``stream: true``, ``n: 2``) is
refused with an ``invalid_job`` error naming it. Engine JSON stays strict (an
unknown key there is refused). Knows nothing of torch or HTTP.

JSON text is read by :func:`load_json` (the local API reads every body with it):
nesting deeper than :data:`MAX_JSON_DEPTH` is refused naming the field where it
happens, and an integer of more than :data:`MAX_JSON_INT_DIGITS` digits is read
as a number out of every range (so the field's range check names it) rather than
converted digit by digit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

from engine.errors import InvalidJobError, UnsupportedJobTypeError
from engine.jobs import (
    MAX_NOTES,
    Job,
    JobId,
    Messages,
    ModelName,
    Prompt,
    SamplingParams,
    Stops,
    StopText,
    Strict,
    SystemPrompt,
    Text,
    Texts,
)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


OneOrMoreTexts = Annotated[Texts, BeforeValidator(_as_list, json_schema_input_type=Text | Texts)]
OneOrMoreStops = Annotated[Stops, BeforeValidator(_as_list,
                                                  json_schema_input_type=StopText | Stops)]


# The network's shapes take keys the engine does not read (parse_payload ignores and notes
# them), so their schema does not forbid other properties.
_OPEN = ConfigDict(json_schema_extra={"additionalProperties": True})


class FlatInference(SamplingParams):
    """Text generation with its parameters at the top: ``{"type": "inference", ...}``.

    ``type`` may be left out (the network's miner runs a payload with a
    ``prompt`` and no ``type`` as inference). The input is ``prompt`` or
    ``messages`` (a chat), with an optional ``system`` prompt.
    """

    model_config = _OPEN

    type: Literal["inference"] = "inference"
    job_id: JobId | None = None
    model: ModelName
    prompt: Prompt | None = None
    messages: Messages | None = None
    system: SystemPrompt | None = None
    stop: OneOrMoreStops = Field(default_factory=list)

    def to_job(self) -> Job:
        """The engine's job."""
        params = {**self.sampling(), "stop": self.stop}
        return _build(_with_id(self.job_id, model=self.model, task="text-generation",
                               **_text_input(self.prompt, self.messages, self.system),
                               params=params), rename={"params": ""})


class EmbeddingPayload(Strict):
    """An embedding job: ``{"type": "embedding", "model", "input": str | [str, ...]}``."""

    model_config = _OPEN

    type: Literal["embedding"]
    job_id: JobId | None = None
    model: ModelName
    input: OneOrMoreTexts

    def to_job(self) -> Job:
        """The engine's job."""
        return _build(_with_id(self.job_id, model=self.model, task="embedding",
                               input=self.input))


class LlmRequest(SamplingParams):
    """The ``service_request`` of an ``llm_inference`` service request.

    ``stream`` must be false (a coordinator job returns one result); ``stop``
    is read as ``stop_sequences``.
    """

    model_config = _OPEN

    model: ModelName
    prompt: Prompt | None = None
    messages: Messages | None = None
    system: SystemPrompt | None = None
    stop_sequences: Stops = Field(default_factory=list)
    stream: bool = False


class ServiceRequest(Strict):
    """``{"service_type": "llm_inference", "service_request": {...}}``: text generation."""

    model_config = _OPEN

    service_type: Literal["llm_inference"]
    job_id: JobId | None = None
    service_request: LlmRequest

    def to_job(self) -> Job:
        """The engine's job."""
        req = self.service_request
        params = {**req.sampling(), "stop": req.stop_sequences}
        return _build(_with_id(self.job_id, model=req.model, task="text-generation",
                               **_text_input(req.prompt, req.messages, req.system),
                               params=params),
                      rename={"params.stop": "service_request.stop_sequences",
                              "params": "service_request", "model": "service_request.model",
                              "prompt": "service_request.prompt",
                              "messages": "service_request.messages",
                              "system": "service_request.system"})


def _text_input(prompt: str | None, messages: Any, system: str | None) -> dict[str, Any]:
    """The text input fields of a Job, only those given (so a plain job's JSON is unchanged)."""
    given = {"prompt": prompt, "messages": messages, "system": system}
    return {k: v for k, v in given.items() if v is not None}


_ENGINE, _SERVICE, _TYPE = "engine", "service_type:", "type:"


def payload_kind(value: Any) -> str | None:
    """Which shape ``value`` claims to be (the union's discriminator); None when it says none.

    ``service_type:<value>`` or ``type:<value>`` by the key present (a value this
    engine does not run gives a tag the union does not hold), else ``engine``
    for engine JSON (``task`` or ``params`` present), else ``type:inference``
    when ``prompt`` or ``messages`` is present (a typeless inference payload).
    """
    if isinstance(value, Mapping):
        if "service_type" in value:
            return f"{_SERVICE}{value['service_type']}"
        if "type" in value:
            return f"{_TYPE}{value['type']}"
        if "task" in value or "params" in value:
            return _ENGINE
        if "prompt" in value or "messages" in value:
            return f"{_TYPE}inference"
        return None
    if isinstance(value, ServiceRequest):
        return f"{_SERVICE}{value.service_type}"
    if isinstance(value, (FlatInference, EmbeddingPayload)):
        return f"{_TYPE}{value.type}"
    return _ENGINE if isinstance(value, Job) else None


JobPayload = Annotated[
    Annotated[Job, Tag(_ENGINE)]
    | Annotated[FlatInference, Tag(f"{_TYPE}inference")]
    | Annotated[EmbeddingPayload, Tag(f"{_TYPE}embedding")]
    | Annotated[ServiceRequest, Tag(f"{_SERVICE}llm_inference")],
    Discriminator(payload_kind),
]
"""Any payload the engine runs; validating one gives the shape's model, ``.to_job()`` the job."""

_PAYLOAD: TypeAdapter[Job | FlatInference | EmbeddingPayload | ServiceRequest] = \
    TypeAdapter(JobPayload)


def payload_json_schema(
        ref_template: str = "#/components/schemas/{model}") -> tuple[dict[str, Any],
                                                                      dict[str, Any]]:
    """The JSON schema of :data:`JobPayload` (refs to each shape) and the shapes' definitions."""
    schema = _PAYLOAD.json_schema(ref_template=ref_template)
    return schema, schema.pop("$defs", {})


MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects a JSON input may have (a job needs 4)."""
MAX_JSON_INT_DIGITS = 64
"""Integers with more digits than this are read as ``±10**MAX_JSON_INT_DIGITS``: out of the
range of every integer field, so they are refused by the field's own check."""
_HUGE_INT = 10**MAX_JSON_INT_DIGITS


class JsonInputError(InvalidJobError):
    """JSON text that is not UTF-8, not JSON or nested too deeply. ``field``: the top-level
    key under which the nesting goes too deep, when there is one."""


def _bounded_int(digits: str) -> int:
    """``int(digits)``, or ``±10**MAX_JSON_INT_DIGITS`` for a longer run of digits."""
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        return -_HUGE_INT if digits.startswith("-") else _HUGE_INT
    return int(digits)


def load_json(text: str | bytes | bytearray | memoryview, *, what: str = "payload",
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text (UTF-8 bytes or str) with the limits above.

    Raises :class:`JsonInputError` (never ``RecursionError`` or ``ValueError``) saying
    what is wrong with ``what``; its ``field`` names the place nested too deeply.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonInputError(f"the {what} is not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start})") from exc
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"the {what} is not JSON ({exc.msg} at line {exc.lineno} "
                             f"column {exc.colno})") from exc
    except RecursionError:
        raise _too_deep(what, _deep_path_in_text(text, max_depth), max_depth) from None
    except ValueError as exc:  # a number json cannot represent
        raise JsonInputError(f"the {what} is not JSON ({exc})") from exc
    if text.count("[") + text.count("{") > max_depth:
        check_depth(value, what=what, max_depth=max_depth)
    return value


def check_depth(value: Any, *, what: str = "payload", max_depth: int = MAX_JSON_DEPTH) -> None:
    """:class:`JsonInputError` naming the place where ``value`` (parsed JSON: dicts and
    lists) nests deeper than ``max_depth``. Iterative: any depth is safe to check."""
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if not isinstance(node, (Mapping, list)):
            continue
        if depth > max_depth:
            raise _too_deep(what, list(path), max_depth)
        children = node.items() if isinstance(node, Mapping) else enumerate(node)
        stack.extend((child, depth + 1, (*path, key)) for key, child in children
                     if isinstance(child, (Mapping, list)))


_PATH_PARTS = 4
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"(?:\s*:)?|[\[\]{},]')


def _deep_path_in_text(text: str, max_depth: int) -> list[Any]:
    """The path to the first container nested deeper than ``max_depth`` in JSON text too
    deep to parse (scanned only up to that place)."""
    stack: list[list[Any]] = []  # [bracket, key or index]
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        head = token[0]
        if head == '"':
            if token.endswith(":") and stack and stack[-1][0] == "{":
                try:
                    stack[-1][1] = str(json.loads(token[:-1].rstrip()))
                except ValueError:
                    stack[-1][1] = "?"
        elif head in "[{":
            if len(stack) >= max_depth:
                break
            stack.append([head, 0 if head == "[" else None])
        elif head in "]}":
            if stack:
                stack.pop()
        elif stack and stack[-1][0] == "[":
            stack[-1][1] += 1
    return [part for _, part in stack if part is not None]


def _too_deep(what: str, path: list[Any], max_depth: int) -> JsonInputError:
    """The error for nesting too deep at ``path``; its field is the top-level key there."""
    shown = ".".join(str(p) for p in path[:_PATH_PARTS]) + ("..." if len(path) > _PATH_PARTS
                                                            else "")
    where = f"field '{path[0]}' of the {what} (at {shown})" if path else f"the {what}"
    return JsonInputError(f"{where} is nested deeper than {max_depth} levels of arrays and "
                          "objects", field=str(path[0]) if path else None)


def parse_payload(payload: Any, *, job_id: str | None = None) -> Job:
    """Turn engine JSON or any coordinator payload shape (PROTOCOLS.md) into a :class:`Job`.

    ``payload`` may be a mapping, JSON text or UTF-8 bytes. ``job_id`` (the
    coordinator's id) wins over one inside the payload. In the network's shapes
    (not engine JSON) unknown keys are ignored and listed in the job's ``notes``,
    and a key of :data:`REFUSED_KEYS` with other than its neutral value is
    refused. Anything that is not a valid job raises :class:`InvalidJobError`
    (or :class:`UnsupportedJobTypeError`) naming the field to blame.
    """
    payload = _decode(payload)
    if not isinstance(payload, Mapping):
        raise InvalidJobError(f"invalid job: the payload must be a JSON object, got "
                              f"{type(payload).__name__}")
    if not all(isinstance(k, str) for k in payload):
        raise InvalidJobError("invalid job: every key of the payload must be a string")
    if job_id is not None:
        payload = {**payload, "job_id": job_id}
    payload, notes = _sift_payload(payload)
    try:
        shape = _PAYLOAD.validate_python(payload)
    except ValidationError as exc:
        raise _payload_error(exc, payload) from exc
    job = shape.to_job()
    return job.model_copy(update={"notes": _bounded(notes)}) if notes else job


def content_job_id(payload: Any) -> str:
    """An id derived from a payload's content: ``job-`` + the first 24 hex digits of the
    SHA-256 of its canonical JSON (keys sorted, no spaces, ASCII escapes)."""
    canonical = json.dumps(_decode(payload), sort_keys=True, separators=(",", ":"))
    return "job-" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def parse_job_file(payload: Any, *, weights: Literal["pretrained", "random"] | None = None
                   ) -> Job:
    """A job read from a file (``aitbc-engine run --job`` and ``verify --job``).

    :func:`parse_payload`, and when the payload names no id, :func:`content_job_id`
    (so two commands reading the same file agree on the job); ``weights`` is the
    job's when the payload does not name them.
    """
    job = parse_payload(payload)
    update: dict[str, Any] = {}
    if "job_id" not in job.model_fields_set:
        update["job_id"] = content_job_id(payload)
    if weights is not None and "weights" not in job.model_fields_set:
        update["weights"] = weights
    return job.model_copy(update=update) if update else job


# ---------------------------------------------------------------- the network's keys

def _is_none_or(*neutral: Any) -> Callable[[Any], bool]:
    """A test that a value is None or one of ``neutral`` (of the same type: True is not 1)."""
    return lambda v: v is None or any(type(v) is type(n) and v == n for n in neutral)


REFUSED_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stream": (_is_none_or(False), "streaming is not offered: a coordinator job returns one "
               "result; send false or leave it out"),
    "n": (_is_none_or(1), "one completion per job; submit one job per completion"),
    "best_of": (_is_none_or(1), "best-of-n sampling is not offered"),
    "logprobs": (_is_none_or(False, 0), "log-probabilities are not returned"),
    "top_logprobs": (_is_none_or(0), "log-probabilities are not returned"),
    "logit_bias": (_is_none_or({}), "logit biases are not applied"),
    "echo": (_is_none_or(False), "the output never repeats the prompt"),
    "suffix": (_is_none_or(""), "insertion (a suffix after the output) is not offered"),
    "presence_penalty": (_is_none_or(0, 0.0), "presence penalties are not applied; "
                         "'repetition_penalty' is"),
    "frequency_penalty": (_is_none_or(0, 0.0), "frequency penalties are not applied; "
                          "'repetition_penalty' is"),
    "tools": (_is_none_or([]), "tool calling is not offered"),
    "functions": (_is_none_or([]), "function calling is not offered"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "constrained output formats are not offered"),
    "format": (_is_none_or(""), "constrained output formats are not offered"),
    "images": (_is_none_or([]), "the engine's models read text only"),
}
"""Keys that would change a job's meaning but that the engine cannot honour: the test of
the value that leaves the meaning as the engine runs it (None, false, 1, empty) and why.
Any other value is refused with an ``invalid_job`` error naming the key."""

# Other names the network's shapes use for a key the shape reads.
_FLAT_ALIASES = {"stop_sequences": "stop"}
_SERVICE_ALIASES = {"stop": "stop_sequences"}


def _sift_payload(payload: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
    """A network shape's payload as its model reads it, and notes on the keys ignored."""
    kind = payload_kind(payload)
    if kind == f"{_TYPE}inference":
        flat = _merge_parameters(payload)
        return _sift(flat, FlatInference.model_fields, "", _FLAT_ALIASES)
    if kind == f"{_TYPE}embedding":
        return _sift(payload, EmbeddingPayload.model_fields, "", {})
    if kind == f"{_SERVICE}llm_inference":
        top, notes = _sift(payload, ServiceRequest.model_fields, "", {})
        inner = top.get("service_request")
        if isinstance(inner, Mapping) and all(isinstance(k, str) for k in inner):
            req, more = _sift(inner, LlmRequest.model_fields, "service_request.",
                              _SERVICE_ALIASES)
            top, notes = {**top, "service_request": req}, notes + more
        return top, notes
    return payload, []


def _merge_parameters(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """A flat payload with its ``parameters`` object (the network's client sends one) read
    as if its keys were at the top; a key given in both places must agree."""
    params = payload.get("parameters")
    if params is None:
        return payload
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise InvalidJobError("invalid job: field 'parameters': must be an object of "
                              "generation parameters", field="parameters")
    merged = {k: v for k, v in payload.items() if k != "parameters"}
    for key, value in params.items():
        if key in merged and merged[key] != value:
            raise InvalidJobError(f"invalid job: field 'parameters.{key}': differs from the "
                                  f"top-level '{key}'; give it once", field=f"parameters.{key}")
        merged[key] = value
    return merged


def _sift(body: Mapping[str, Any], known: Collection[str], where: str,
          aliases: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The keys of ``body`` that ``known`` holds (aliases renamed), and a note per other key.

    A key of :data:`REFUSED_KEYS` with a value other than its neutral one raises
    :class:`InvalidJobError` naming it (``where`` + key).
    """
    kept: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in body.items():
        if key in REFUSED_KEYS:
            neutral, why = REFUSED_KEYS[key]
            if not neutral(value):
                raise InvalidJobError(f"invalid job: field '{where}{key}': {_short(value)} "
                                      f"cannot be honoured: {why}", field=f"{where}{key}")
            if key in known and value is not None:
                kept[key] = value
        elif key in aliases and aliases[key] in known:
            target = aliases[key]
            if target in body and body[target] != value:
                raise InvalidJobError(f"invalid job: field '{where}{key}': differs from "
                                      f"'{where}{target}', which it is another name for; "
                                      f"give one", field=f"{where}{key}")
            kept[target] = value
        elif key in known:
            kept[key] = value
        else:
            notes.append(f"ignored unknown key '{where}{_short(key, 64)}'")
    return kept, notes


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a cycle
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bounded(notes: list[str]) -> list[str]:
    """At most MAX_NOTES notes, in a stable order (the last one says how many were cut)."""
    notes = sorted(notes)
    if len(notes) <= MAX_NOTES:
        return notes
    return [*notes[:MAX_NOTES - 1], f"... and {len(notes) - MAX_NOTES + 1} more keys ignored"]


# ---------------------------------------------------------------- errors

def _payload_error(err: ValidationError, payload: Mapping[str, Any]) -> InvalidJobError:
    kind = err.errors()[0]["type"]
    if kind == "union_tag_invalid" and "service_type" in payload:
        return UnsupportedJobTypeError(
            f"unsupported service_type {payload['service_type']!r}: this engine runs "
            "'llm_inference'", field="service_type")
    if kind == "union_tag_invalid":
        return UnsupportedJobTypeError(
            f"unsupported job type {payload['type']!r} (field 'type'): this engine runs "
            "'inference' (text generation) and 'embedding' jobs", field="type")
    if kind == "union_tag_not_found":
        return InvalidJobError("invalid job: cannot tell the kind of job; expected engine JSON "
                               "(with 'task'), a flat payload (with 'type', or with 'prompt' "
                               "or 'messages') or a service request (with 'service_type')")
    return _invalid_from(err, skip=1)  # the first place of each error is the shape's tag


def _invalid_from(err: ValidationError, *, skip: int = 0) -> InvalidJobError:
    # An unknown key is named first: it is the likeliest cause of the other problems.
    first = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    field: str | None = ".".join(str(p) for p in first["loc"][skip:]) or None
    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    if first["type"] == "value_error":
        # Cross-field checks say "<field>: <why>" (see Job._check_input).
        named, _, why = str(first["ctx"]["error"]).partition(": ")
        if why and named.isidentifier():
            field = f"{field}.{named}" if field else named
            msg = why
        else:
            msg = str(first["ctx"]["error"])
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    where = f"field '{field}': " if field else ""
    return InvalidJobError(f"invalid job: {where}{msg}{more}", field=field)


def _with_id(job_id: str | None, **fields: Any) -> dict[str, Any]:
    return fields if job_id is None else {"job_id": job_id, **fields}


def _build(data: dict[str, Any], rename: Mapping[str, str] | None = None) -> Job:
    """Validate ``data`` as a Job; ``rename`` maps Job field paths back to the payload's names."""
    try:
        return Job.model_validate(data)
    except ValidationError as exc:
        err = _invalid_from(exc)
        if not rename or err.field is None:
            raise err from exc
        field = err.field
        for ours, theirs in sorted(rename.items(), key=lambda kv: -len(kv[0])):
            if field == ours or field.startswith(ours + "."):
                rest = field[len(ours):]
                field = theirs + rest if theirs else rest.lstrip(".")
                break
        raise InvalidJobError(err.message.replace(f"'{err.field}'", f"'{field}'"),
                              field=field) from exc


def _decode(payload: Any) -> Any:
    """The payload parsed from JSON text, or as given (its nesting checked)."""
    try:
        if isinstance(payload, (str, bytes, bytearray, memoryview)):
            return load_json(payload)
        check_depth(payload)
    except JsonInputError as exc:
        raise JsonInputError(f"invalid job: {exc.message}", field=exc.field) from exc
    return payload


__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT_DIGITS",
    "REFUSED_KEYS",
    "EmbeddingPayload",
    "FlatInference",
    "JobPayload",
    "JsonInputError",
    "LlmRequest",
    "ServiceRequest",
    "check_depth",
    "content_job_id",
    "load_json",
    "parse_job_file",
    "parse_payload",
    "payload_json_schema",
    "payload_kind",
]
