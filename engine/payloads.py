"""The job payloads on the wire: one pydantic model per shape, their union, and ``parse_payload``.

The shapes (PROTOCOLS.md "Job payloads", and the engine's own JSON):

==================  =============================================================
:class:`Job`        engine JSON: ``{"model", "task", "prompt" | "input", "params"}``
:class:`FlatInference`  ``{"type": "inference", "model", "prompt", "max_tokens", ...}``
:class:`EmbeddingPayload`  ``{"type": "embedding", "model", "input"}``
:class:`ServiceRequest`  ``{"service_type": "llm_inference", "service_request": {...}}``
==================  =============================================================

:data:`JobPayload` is their union, told apart by the key that is present
(``service_type``, then ``type``, then ``task`` or ``params``). The same models
validate a payload (strict types, unknown keys refused, the ranges of
:class:`~engine.jobs.Job`), give the local API's OpenAPI schema of
``POST /v1/jobs`` (:func:`payload_json_schema`) and convert to a :class:`Job`
(``to_job()``). Knows nothing of torch or HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

from engine.errors import InvalidJobError, UnsupportedJobTypeError
from engine.jobs import (
    Job,
    JobId,
    ModelName,
    Prompt,
    SamplingParams,
    Stops,
    StopText,
    Strict,
    Text,
    Texts,
)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


OneOrMoreTexts = Annotated[Texts, BeforeValidator(_as_list, json_schema_input_type=Text | Texts)]
OneOrMoreStops = Annotated[Stops, BeforeValidator(_as_list,
                                                  json_schema_input_type=StopText | Stops)]


class FlatInference(SamplingParams):
    """Text generation with its parameters at the top: ``{"type": "inference", ...}``."""

    type: Literal["inference"]
    job_id: JobId | None = None
    model: ModelName
    prompt: Prompt
    stop: OneOrMoreStops = Field(default_factory=list)

    def to_job(self) -> Job:
        """The engine's job."""
        params = {**self.sampling(), "stop": self.stop}
        return _build(_with_id(self.job_id, model=self.model, task="text-generation",
                               prompt=self.prompt, params=params), rename={"params": ""})


class EmbeddingPayload(Strict):
    """An embedding job: ``{"type": "embedding", "model", "input": str | [str, ...]}``."""

    type: Literal["embedding"]
    job_id: JobId | None = None
    model: ModelName
    input: OneOrMoreTexts

    def to_job(self) -> Job:
        """The engine's job."""
        return _build(_with_id(self.job_id, model=self.model, task="embedding",
                               input=self.input))


class LlmRequest(SamplingParams):
    """The ``service_request`` of an ``llm_inference`` service request."""

    model: ModelName
    prompt: Prompt
    stop_sequences: Stops = Field(default_factory=list)
    stream: bool = False


class ServiceRequest(Strict):
    """``{"service_type": "llm_inference", "service_request": {...}}``: text generation."""

    service_type: Literal["llm_inference"]
    job_id: JobId | None = None
    service_request: LlmRequest

    def to_job(self) -> Job:
        """The engine's job."""
        req = self.service_request
        params = {**req.sampling(), "stop": req.stop_sequences}
        return _build(_with_id(self.job_id, model=req.model, task="text-generation",
                               prompt=req.prompt, params=params),
                      rename={"params.stop": "service_request.stop_sequences",
                              "params": "service_request", "model": "service_request.model",
                              "prompt": "service_request.prompt"})


_ENGINE, _SERVICE, _TYPE = "engine", "service_type:", "type:"


def payload_kind(value: Any) -> str | None:
    """Which shape ``value`` claims to be (the union's discriminator); None when it says none.

    ``service_type:<value>`` or ``type:<value>`` by the key present (a value this
    engine does not run gives a tag the union does not hold), else ``engine``
    for engine JSON (``task`` or ``params`` present).
    """
    if isinstance(value, Mapping):
        if "service_type" in value:
            return f"{_SERVICE}{value['service_type']}"
        if "type" in value:
            return f"{_TYPE}{value['type']}"
        if "task" in value or "params" in value:
            return _ENGINE
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


def parse_payload(payload: Any, *, job_id: str | None = None) -> Job:
    """Turn engine JSON or any coordinator payload shape (PROTOCOLS.md) into a :class:`Job`.

    ``payload`` may be a mapping, JSON text or UTF-8 bytes. ``job_id`` (the
    coordinator's id) wins over one inside the payload. Anything that is not a
    valid job raises :class:`InvalidJobError` (or :class:`UnsupportedJobTypeError`)
    naming the field to blame.
    """
    payload = _decode(payload)
    if not isinstance(payload, Mapping):
        raise InvalidJobError(f"invalid job: the payload must be a JSON object, got "
                              f"{type(payload).__name__}")
    if not all(isinstance(k, str) for k in payload):
        raise InvalidJobError("invalid job: every key of the payload must be a string")
    if job_id is not None:
        payload = {**payload, "job_id": job_id}
    try:
        shape = _PAYLOAD.validate_python(payload)
    except ValidationError as exc:
        raise _payload_error(exc, payload) from exc
    return shape.to_job()


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
                               "(with 'task'), a flat payload (with 'type') or a service "
                               "request (with 'service_type')")
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
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            payload = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJobError(f"invalid job: the payload is not UTF-8 text ({exc.reason} at "
                                  f"byte {exc.start})") from exc
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise InvalidJobError(f"invalid job: the payload is not JSON ({exc.msg} at line "
                                  f"{exc.lineno} column {exc.colno})") from exc
    return payload


__all__ = [
    "EmbeddingPayload",
    "FlatInference",
    "JobPayload",
    "LlmRequest",
    "ServiceRequest",
    "parse_payload",
    "payload_json_schema",
    "payload_kind",
]
