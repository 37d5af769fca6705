"""The engine's own job and result types, and parsers from coordinator payloads.

Knows nothing of torch. Every model here is strict: unknown keys and wrong
types are errors, reported as :class:`~engine.errors.InvalidJobError` with the
offending field named.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from engine.base import StrictModel
from engine.errors import InvalidJobError, UnsupportedJobTypeError

Task = Literal["text-generation", "embedding"]

MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_PROMPT_CHARS = 1_000_000
MAX_EMBEDDING_INPUTS = 1024


class _Strict(StrictModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GenerationParams(_Strict):
    """Decoding parameters of a text-generation job. ``temperature == 0`` is greedy."""

    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] = 16
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                    Field(max_length=MAX_STOP_STRINGS)] = Field(default_factory=list)

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax at every step."""
        return self.temperature == 0.0


class Job(_Strict):
    """One unit of work: a model by registry name, a task, its input and parameters."""

    job_id: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        default_factory=lambda: uuid.uuid4().hex)
    model: Annotated[str, Field(min_length=1, max_length=128)]
    task: Task = "text-generation"
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | None = None
    prompt_token_ids: Annotated[list[Annotated[int, Field(ge=0)]],
                                Field(min_length=1)] | None = None
    input: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
                     Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)

    @model_validator(mode="after")
    def _check_input(self) -> Job:
        if self.task == "text-generation":
            if self.input is not None:
                raise ValueError("input: 'input' is for embedding jobs; a text-generation job "
                                 "takes 'prompt' or 'prompt_token_ids'")
            if (self.prompt is None) == (self.prompt_token_ids is None):
                raise ValueError("prompt: a text-generation job needs exactly one of 'prompt' "
                                 "or 'prompt_token_ids'")
            if self.prompt is not None and not self.prompt.strip():
                raise ValueError("prompt: the prompt is empty")
        else:
            if self.input is None:
                raise ValueError("input: an embedding job needs 'input', a list of strings")
            if self.prompt is not None or self.prompt_token_ids is not None:
                raise ValueError("prompt: an embedding job takes 'input', not 'prompt'")
        return self

    def to_json(self) -> str:
        """The stable JSON form of the job."""
        return self.model_dump_json(exclude_none=True)


class GenerationOutput(_Strict):
    """What a text-generation job produced."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "stop", "length"]


class EmbeddingOutput(_Strict):
    """What an embedding job produced: one float32 vector per input."""

    embeddings: list[list[float]]
    dimensions: int


class Metrics(_Strict):
    """The metered facts of one job; see DESIGN.md "Metering". Absent means not measured."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    execution_time_seconds: float
    gpu_time_seconds: float
    load_time_seconds: float
    device: str
    measurement: str
    prompt_tokens: int
    completion_tokens: int
    gpu_count: int = 0
    ttft_seconds: float | None = None
    tpot_seconds: float | None = None
    gpu_busy_seconds: float | None = None
    energy_joules: float | None = None
    peak_memory_bytes: int | None = None
    queue_seconds: float | None = None
    # Bytes of the model's weights resident on its devices (apart from the job's own peak).
    model_memory_bytes: int | None = None
    # Capture of the fast path's decode step for this job's cache length, done before the
    # job's clock started (included in load_time_seconds, absent when nothing was warmed).
    warmup_seconds: float | None = None
    # True when energy_joules is interpolated or extrapolated from NVML's counter, which
    # updates less often than this job's span.
    energy_estimated: bool | None = None


class ExecutionProfile(_Strict):
    """Everything a verifier needs to reproduce a result bit for bit."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    model: str
    weights: Literal["pretrained", "random"]
    weights_digest: str
    dtype: str
    device_class: str
    device_count: int
    torch_version: str
    transformers_version: str
    engine_version: str
    hash_version: str
    decode: str = "dynamic-cache"
    batched: bool = False
    # The most jobs that decoded in one step with this one (rows join and leave between
    # steps, so this is the peak over the job's life); 1 when it ran alone.
    batch_size: int = 1
    # How the linear layers were computed: "blas" (torch's BLAS, the GPU's cuBLAS) or
    # "row-invariant" (the engine's CPU kernel, whose rows never depend on batch mates).
    linear_kernel: str = "blas"
    # Why the job ran on the CPU although NVML sees GPUs (absent when it did not).
    cpu_fallback_reason: str | None = None


class JobErrorInfo(_Strict):
    """Why a job failed: a stable code, a message, the field to blame when known."""

    code: str
    message: str
    field: str | None = None


class JobResult(_Strict):
    """The outcome of a job, completed or failed, with a stable JSON form."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    job_id: str
    model: str
    task: Task
    status: Literal["completed", "failed"]
    output: GenerationOutput | EmbeddingOutput | None = None
    result_hash: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    metrics: Metrics | None = None
    profile: ExecutionProfile | None = None
    error: JobErrorInfo | None = None

    @property
    def ok(self) -> bool:
        """True when the job completed."""
        return self.status == "completed"

    def to_json(self, *, indent: int | None = None) -> str:
        """The stable JSON form; unmeasured metrics are absent, not null."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form."""
        return self.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------- payload parsing

_FLAT_KEYS = {"type", "job_id", "model", "prompt", "max_tokens", "temperature", "top_p", "top_k",
              "seed", "stop", "repetition_penalty"}
_SERVICE_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k",
                 "repetition_penalty", "stop_sequences", "stream", "seed"}
_EMBEDDING_KEYS = {"type", "job_id", "model", "input"}


def _invalid_from(err: ValidationError) -> InvalidJobError:
    first = err.errors()[0]
    field: str | None = ".".join(str(p) for p in first["loc"]) or None
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


def _reject_unknown(payload: Mapping[str, Any], allowed: set[str], shape: str,
                    prefix: str = "") -> None:
    unknown = sorted(str(k) for k in payload if k not in allowed)
    if unknown:
        raise InvalidJobError(
            f"invalid job: unknown key(s) {unknown} in a {shape} payload; "
            f"allowed: {sorted(allowed)}",
            field=f"{prefix}{unknown[0]}",
        )


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


def parse_payload(payload: Any, *, job_id: str | None = None) -> Job:
    """Turn engine JSON or any coordinator payload shape (PROTOCOLS.md) into a :class:`Job`.

    ``payload`` may be a mapping, JSON text or UTF-8 bytes. ``job_id`` (the
    coordinator's id) wins over one inside the payload. Anything that is not a
    valid job raises :class:`InvalidJobError` (or :class:`UnsupportedJobTypeError`).
    """
    payload = _decode(payload)
    if not isinstance(payload, Mapping):
        raise InvalidJobError(f"invalid job: the payload must be a JSON object, got "
                              f"{type(payload).__name__}")
    if not all(isinstance(k, str) for k in payload):
        raise InvalidJobError("invalid job: every key of the payload must be a string")
    ident = job_id if job_id is not None else payload.get("job_id")
    extra: dict[str, Any] = {} if ident is None else {"job_id": ident}

    if "service_type" in payload:
        return _parse_service(payload, extra)
    if "type" in payload:
        kind = payload["type"]
        if kind == "inference":
            _reject_unknown(payload, _FLAT_KEYS, "flat inference")
            params = {k: payload[k] for k in ("max_tokens", "temperature", "top_p", "top_k",
                                              "seed", "stop", "repetition_penalty") if k in payload}
            if isinstance(params.get("stop"), str):
                params["stop"] = [params["stop"]]
            return _build({**extra, "model": payload.get("model"), "task": "text-generation",
                           "prompt": payload.get("prompt"), "params": params},
                          rename={"params": ""})
        if kind == "embedding":
            _reject_unknown(payload, _EMBEDDING_KEYS, "embedding")
            texts = payload.get("input")
            if isinstance(texts, str):
                texts = [texts]
            return _build({**extra, "model": payload.get("model"), "task": "embedding",
                           "input": texts})
        raise UnsupportedJobTypeError(
            f"unsupported job type {kind!r} (field 'type'): this engine runs 'inference' (text "
            "generation) and 'embedding' jobs", field="type")
    if "task" in payload or "params" in payload:
        return _build({**payload, **extra})
    raise InvalidJobError("invalid job: cannot tell the kind of job; expected engine JSON "
                          "(with 'task'), a flat payload (with 'type') or a service request "
                          "(with 'service_type')")


def _parse_service(payload: Mapping[str, Any], extra: dict[str, Any]) -> Job:
    if payload["service_type"] != "llm_inference":
        raise UnsupportedJobTypeError(
            f"unsupported service_type {payload['service_type']!r}: this engine runs "
            "'llm_inference'", field="service_type")
    _reject_unknown(payload, {"service_type", "service_request", "job_id"}, "service request")
    req = payload.get("service_request")
    if not isinstance(req, Mapping):
        raise InvalidJobError("invalid job: field 'service_request': must be an object",
                              field="service_request")
    _reject_unknown(req, _SERVICE_KEYS, "service request", "service_request.")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidJobError("invalid job: field 'service_request.stream': must be a boolean",
                              field="service_request.stream")
    params = {k: req[k] for k in ("max_tokens", "temperature", "top_p", "top_k",
                                  "repetition_penalty", "seed") if k in req}
    if "stop_sequences" in req:
        params["stop"] = req["stop_sequences"]
    data = {**extra, "model": req.get("model"), "task": "text-generation",
            "prompt": req.get("prompt"), "params": params}
    return _build(data, rename={"params.stop": "service_request.stop_sequences",
                                "params": "service_request", "model": "service_request.model",
                                "prompt": "service_request.prompt"})
