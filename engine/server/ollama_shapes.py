"""Ollama's request and response shapes, and their translation to and from engine jobs.

``POST /api/generate`` renders ``prompt`` (and ``system``) through the model's chat
template as one user turn, as Ollama does; ``raw: true`` runs the prompt as given.
``POST /api/chat`` takes ``messages``; ``POST /api/embed`` (and the older
``/api/embeddings``) embed. ``options`` maps ``num_predict``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop`` and ``repeat_penalty`` onto the job, with
Ollama's defaults where unsent (temperature 0.8, top_k 40, top_p 0.9, repeat_penalty
1.1); options that only tune Ollama's runtime (``num_ctx``, ``num_thread``, ...) are
ignored and noted; sampling options the engine cannot honour are a 400 naming the
option. Streaming is newline-delimited JSON, the default, as in Ollama. Durations are
in nanoseconds, from the job's metrics.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from engine.jobs import (
    MAX_EMBEDDING_INPUTS,
    MAX_PROMPT_CHARS,
    MAX_TOP_LOGPROBS,
    EmbeddingOutput,
    GenerationOutput,
    Job,
    JobResult,
    TokenLogprob,
)
from engine.registry import Registry
from engine.server.compat import (
    DEFAULT_MAX_TOKENS,
    CompatError,
    ErrorView,
    JobStream,
    build_job,
    extension,
    failure,
    model_name,
)

OLLAMA_API_VERSION = "0.6.0"
"""The Ollama API level these routes follow (``GET /api/version``)."""

Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]

_RENAME = {"params.max_tokens": "options.num_predict", "params.temperature":
           "options.temperature", "params.top_p": "options.top_p", "params.top_k":
           "options.top_k", "params.seed": "options.seed", "params.stop": "options.stop",
           "params.repetition_penalty": "options.repeat_penalty",
           "params.logprobs": "top_logprobs"}

# Options that change sampling in ways the engine does not do: refused unless neutral.
_REFUSED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "min_p": (0, 0.0), "typical_p": (1, 1.0), "tfs_z": (1, 1.0), "mirostat": (0,),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "penalize_newline": (False,),
}


class Options(BaseModel):
    """``options``: what maps onto the job; the rest is Ollama's runtime, ignored."""

    model_config = ConfigDict(extra="allow")

    num_predict: Annotated[int, Field(ge=-2, le=1_000_000)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    seed: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                    Field(max_length=16)] | None = None

    def params(self) -> dict[str, Any]:
        """The job's ``params`` (Ollama's defaults where unsent)."""
        for name, value in (self.model_extra or {}).items():
            if name in _REFUSED_OPTIONS and value not in _REFUSED_OPTIONS[name]:
                raise CompatError(f"option '{name}' is not supported by this engine",
                                  param=f"options.{name}")
        predict = self.num_predict if self.num_predict and self.num_predict > 0 \
            else DEFAULT_MAX_TOKENS
        params: dict[str, Any] = {
            "max_tokens": predict, "temperature": 0.8 if self.temperature is None
            else self.temperature, "top_k": 40 if self.top_k is None else self.top_k,
            "top_p": 0.9 if self.top_p is None or self.top_p == 0 else self.top_p,
            "repetition_penalty": 1.1 if self.repeat_penalty is None or self.repeat_penalty == 0
            else self.repeat_penalty, "stop": list(self.stop or [])}
        if self.seed is not None and self.seed >= 0:
            params["seed"] = self.seed
        return params

    def notes(self) -> list[str]:
        """The options ignored."""
        return [f"ignored option {name!r}" for name in sorted(self.model_extra or {})]


class OllamaRequest(BaseModel):
    """What Ollama's requests share; unknown fields (``keep_alive``, ...) are ignored."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    options: Options | None = None
    stream: bool = True
    format: Any = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def _job(self, registry: Registry, fields: dict[str, Any]) -> Job:
        if self.format not in (None, ""):
            raise CompatError("'format' (structured output) is not supported", param="format")
        for name in ("tools", "images", "context", "suffix", "template"):
            if (self.model_extra or {}).get(name) not in (None, [], ""):
                raise CompatError(f"'{name}' is not supported by this engine", param=name)
        options = self.options or Options()
        params = options.params()
        if self.logprobs:
            params["logprobs"] = self.top_logprobs or 0
        notes = options.notes()
        return build_job({"model": model_name(registry, self.model), **fields,
                          "params": params, "notes": notes[:64] or None}, _RENAME)


class GenerateRequest(OllamaRequest):
    """``POST /api/generate``."""

    prompt: Text = ""
    system: Text | None = None
    raw: bool = False

    def to_job(self, registry: Registry) -> Job:
        """The job: the prompt as a user turn (the model's template), or raw."""
        if self.raw:
            if self.system is not None:
                raise CompatError("'system' needs the template; not with 'raw'", param="system")
            return self._job(registry, {"prompt": self.prompt})
        fields: dict[str, Any] = {"messages": [{"role": "user", "content": self.prompt}]}
        if self.system is not None:
            fields["system"] = self.system
        return self._job(registry, fields)


class OllamaMessage(BaseModel):
    """A chat message (``images``, ``tool_calls``: not supported)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""


class ChatRequest(OllamaRequest):
    """``POST /api/chat``."""

    messages: Annotated[list[OllamaMessage], Field(min_length=1, max_length=1024)]

    def to_job(self, registry: Registry) -> Job:
        """The job: the chat, through the model's template."""
        for i, m in enumerate(self.messages):
            if m.role == "tool" or (m.model_extra or {}).get("images"):
                raise CompatError("tool messages and images are not supported",
                                  param=f"messages[{i}]")
        return self._job(registry, {"messages": [{"role": m.role, "content": m.content}
                                                 for m in self.messages]})


class ShowRequest(BaseModel):
    """``POST /api/show``: the model (``name`` is the older spelling)."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256,
                                validation_alias=AliasChoices("model", "name"))]


class EmbedRequest(BaseModel):
    """``POST /api/embed`` (``input``) and ``POST /api/embeddings`` (``prompt``)."""

    model_config = ConfigDict(extra="allow")

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
                  Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] | None = None
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None

    def to_job(self, registry: Registry) -> Job:
        """The embedding job."""
        given = self.input if self.input is not None else self.prompt
        if given is None:
            raise CompatError("'input' is required", param="input")
        texts = [given] if isinstance(given, str) else list(given)
        return build_job({"model": model_name(registry, self.model), "task": "embedding",
                          "input": texts}, {})


# ---------------------------------------------------------------- answers

DONE_REASON = {"eos": "stop", "stop": "stop", "length": "length"}


def now() -> str:
    """Ollama's ``created_at``: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def durations(result: JobResult) -> dict[str, int]:
    """Ollama's counts and nanosecond durations, from the job's metrics."""
    m = result.metrics
    if m is None:
        return {}
    ns = 1_000_000_000
    ttft = m.ttft_seconds or 0.0
    total = m.execution_time_seconds + m.load_time_seconds + (m.queue_seconds or 0.0)
    return {"total_duration": int(total * ns), "load_duration": int(m.load_time_seconds * ns),
            "prompt_eval_count": m.prompt_tokens, "prompt_eval_duration": int(ttft * ns),
            "eval_count": m.completion_tokens,
            "eval_duration": int(max(0.0, m.execution_time_seconds - ttft) * ns)}


def logprob_list(entries: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    """Ollama's ``logprobs``: ``[{token, logprob, top_logprobs: [{token, logprob}]}]``."""
    if entries is None:
        return None
    return [{"token": e.token, "logprob": e.logprob,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in e.top]}
            for e in entries]


class Reply:
    """The frame of one answer: ``/api/generate`` (``response``) or ``/api/chat``
    (``message``)."""

    def __init__(self, kind: Literal["generate", "chat"], model: str):
        self.kind = kind
        self.model = model

    def piece(self, text: str, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        """A part of the answer (``done: false``)."""
        doc: dict[str, Any] = {"model": self.model, "created_at": now()}
        if self.kind == "chat":
            doc["message"] = {"role": "assistant", "content": text}
        else:
            doc["response"] = text
        if logprobs is not None:
            doc["logprobs"] = logprob_list(logprobs)
        doc["done"] = False
        return doc

    def final(self, result: JobResult, *, whole: bool) -> dict[str, Any]:
        """The whole answer, or the last part of a streamed one (no text): ``done``, the
        reason, the counts and the ``aitbc`` extension."""
        out = result.output
        assert isinstance(out, GenerationOutput)
        doc = self.piece(out.text if whole else "", out.logprobs if whole else None)
        doc.update(done=True, done_reason=DONE_REASON[out.finish_reason], **durations(result),
                   aitbc=extension(result))
        return doc


def embed_answer(result: JobResult, model: str, *, legacy: bool) -> dict[str, Any]:
    """``/api/embed``'s answer (``/api/embeddings``'s with ``legacy``)."""
    out = result.output
    assert isinstance(out, EmbeddingOutput)
    if legacy:
        return {"embedding": out.embeddings[0]}
    m = result.metrics
    return {"model": model, "embeddings": out.embeddings,
            **({"total_duration": int((m.execution_time_seconds + m.load_time_seconds) * 1e9),
                "load_duration": int(m.load_time_seconds * 1e9),
                "prompt_eval_count": m.prompt_tokens} if m else {}),
            "aitbc": extension(result)}


def line(doc: dict[str, Any]) -> str:
    """One line of newline-delimited JSON."""
    return json.dumps(doc, ensure_ascii=False) + "\n"


def error_json(view: ErrorView) -> dict[str, Any]:
    """Ollama's error shape ``{"error": message}`` (plus the field, when known)."""
    doc: dict[str, Any] = {"error": view.message}
    if view.param:
        doc["param"] = view.param
    return doc


async def stream_lines(reply: Reply, stream: JobStream) -> AsyncIterator[str]:
    """The NDJSON lines of a streamed job: one per token as it is decoded, then the final
    one (``done: true``); an ``error`` line if the job failed while running."""
    async for token in stream.tokens():
        if token.text or token.logprob is not None:
            logprobs = None if token.logprob is None else [token.logprob]
            yield line(reply.piece(token.text, logprobs))
    result = await stream.result()
    yield line(reply.final(result, whole=False) if result.ok else error_json(failure(result)))
