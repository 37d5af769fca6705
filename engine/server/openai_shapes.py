"""OpenAI's request and response shapes, and their translation to and from engine jobs.

Requests: ``POST /v1/chat/completions`` (``messages``, rendered by the model's chat
template), ``POST /v1/completions`` (a raw ``prompt``: text, or token ids) and
``POST /v1/embeddings``. Supported: ``max_tokens`` / ``max_completion_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``logprobs`` / ``top_logprobs``,
``stream`` with ``stream_options.include_usage``, and vLLM's ``top_k`` and
``repetition_penalty``. What the engine cannot do (``n`` other than 1, tools,
response formats, penalties, logit bias, ...) is a 400 naming the field; other
unknown fields are ignored and named in the result's ``notes``.

Responses carry the engine's ``result_hash``, profile and metrics in the ``aitbc``
extension field (:func:`~engine.server.compat.extension`).
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.jobs import (
    MAX_EMBEDDING_INPUTS,
    MAX_PROMPT_CHARS,
    MAX_TOKENS_LIMIT,
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

Count = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]

# The job's field names as the request calls them, for errors naming the request's field.
_RENAME = {"params.max_tokens": "max_tokens", "params.temperature": "temperature",
           "params.top_p": "top_p", "params.top_k": "top_k", "params.seed": "seed",
           "params.stop": "stop", "params.logprobs": "top_logprobs",
           "params.repetition_penalty": "repetition_penalty", "prompt_token_ids": "prompt",
           "system": "messages"}

# Fields the engine cannot honour: refused unless they hold their neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
    "suffix": (None, ""), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "dimensions": (None,),
}


class OpenAIRequest(BaseModel):
    """What every OpenAI request shares; unknown fields are allowed (and noted)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]

    def notes(self) -> list[str]:
        """The unknown fields sent (ignored); a refused field without its neutral value is
        a 400 naming it."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            allowed = _NEUTRAL.get(name, ())
            if allowed and value not in allowed:
                raise CompatError(f"'{name}' is not supported by this engine (only "
                                  f"{allowed[-1]!r})", param=name)
        return [f"ignored field {name!r}" for name in sorted(extra) if name not in _NEUTRAL][:64]


class OpenAIStreamOptions(BaseModel):
    """``stream_options``."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class OpenAISampling(OpenAIRequest):
    """Decoding fields of chat and completion requests."""

    max_tokens: Count | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[str, Field(min_length=1, max_length=256)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                  Field(max_length=16)] | None = None
    stream: bool = False
    stream_options: OpenAIStreamOptions | None = None

    def params(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """The engine's ``params``: OpenAI's defaults (temperature 1, top_p 1) where unsent."""
        params: dict[str, Any] = {"max_tokens": max_tokens or DEFAULT_MAX_TOKENS,
                                  "temperature": 1.0 if self.temperature is None
                                  else self.temperature,
                                  "top_p": 1.0 if self.top_p is None else self.top_p,
                                  "stop": [self.stop] if isinstance(self.stop, str)
                                  else list(self.stop or [])}
        if self.top_k is not None and self.top_k > 0:
            params["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            params["repetition_penalty"] = self.repetition_penalty
        if self.seed is not None:
            params["seed"] = self.seed
        if logprobs is not None:
            params["logprobs"] = logprobs
        return params

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class OpenAIContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: Annotated[str, Field(max_length=64)]
    text: Text | None = None


class OpenAIMessage(BaseModel):
    """A chat message; ``developer`` is the ``system`` role by its newer name."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[OpenAIContentPart], Field(max_length=1024)] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None


class ChatCompletionRequest(OpenAISampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[OpenAIMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def to_job(self, registry: Registry) -> Job:
        """The engine job: the messages as a chat, rendered by the model's template."""
        if self.top_logprobs is not None and not self.logprobs:
            raise CompatError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        messages = [{"role": _role(m, i), "content": _content(m, i)}
                    for i, m in enumerate(self.messages)]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        limit = self.max_completion_tokens or self.max_tokens
        return build_job({"model": model_name(registry, self.model), "messages": messages,
                          "params": self.params(limit, logprobs),
                          "notes": self.notes() or None},
                         {**_RENAME, "params.max_tokens": "max_completion_tokens"
                          if self.max_completion_tokens else "max_tokens"})


def _role(message: OpenAIMessage, index: int) -> str:
    if message.role in ("tool", "function"):
        raise CompatError(f"messages[{index}]: tool and function messages are not supported",
                          param=f"messages[{index}].role")
    return "system" if message.role == "developer" else message.role


def _content(message: OpenAIMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise CompatError(f"messages[{index}].content[{j}]: only text parts are supported, "
                              f"not {part.type!r}", param=f"messages[{index}].content[{j}]")
    return "".join(part.text or "" for part in message.content)


class TextCompletionRequest(OpenAISampling):
    """``POST /v1/completions``: one prompt, as text or token ids, run as given."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)] | \
        Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]],
                  Field(min_length=1, max_length=MAX_TOKENS_LIMIT)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def to_job(self, registry: Registry) -> Job:
        """The engine job: the prompt as raw text (or ids), no template."""
        prompt: dict[str, Any]
        if isinstance(self.prompt, str):
            prompt = {"prompt": self.prompt}
        elif all(isinstance(p, str) for p in self.prompt):
            prompt = {"prompt": self.prompt[0]}
        else:
            prompt = {"prompt_token_ids": list(self.prompt)}
        return build_job({"model": model_name(registry, self.model), **prompt,
                          "params": self.params(self.max_tokens, self.logprobs),
                          "notes": self.notes() or None},
                         {**_RENAME, "params.logprobs": "logprobs"})


class EmbeddingsRequest(OpenAIRequest):
    """``POST /v1/embeddings``."""

    input: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | \
        Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
                  Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"

    def to_job(self, registry: Registry) -> Job:
        """The engine's embedding job."""
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        return build_job({"model": model_name(registry, self.model), "task": "embedding",
                          "input": texts, "notes": self.notes() or None}, {})


# ---------------------------------------------------------------- responses

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(result: JobResult) -> dict[str, int]:
    """``usage`` from the job's metrics."""
    m = result.metrics
    prompt, completion = (m.prompt_tokens, m.completion_tokens) if m else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    if entries is None:
        return None
    return {"content": [{**_token_entry(e.token, e.logprob),
                         "top_logprobs": [_token_entry(t.token, t.logprob) for t in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | None,
                        offset: int = 0) -> dict[str, Any] | None:
    """Legacy completions' ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets}


class Shape:
    """One answer's frame: its id, object names and model, for whole answers and chunks."""

    def __init__(self, kind: Literal["chat", "text"], job: Job, model: str):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + job.job_id
        self.model = model
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def _frame(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, result: JobResult) -> dict[str, Any]:
        """The non-streamed answer of a completed job."""
        out = result.output
        assert isinstance(out, GenerationOutput)
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[out.finish_reason]}
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": out.text, "refusal": None}
            choice["logprobs"] = chat_logprobs(out.logprobs)
        else:
            choice["text"] = out.text
            choice["logprobs"] = completion_logprobs(out.logprobs)
        return {**self._frame(self.object, [choice]), "usage": usage(result),
                "aitbc": extension(result)}

    def chunk(self, text: str | None, *, logprob: TokenLogprob | None = None,
              finish: str | None = None, first: bool = False, offset: int = 0,
              extra: dict[str, Any] | None = None) -> str:
        """One server-sent event: a piece of text (or the end), as a chunk."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        entries = None if logprob is None else [logprob]
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(entries)
            obj = "chat.completion.chunk"
        else:
            choice["text"] = text or ""
            choice["logprobs"] = completion_logprobs(entries, offset)
            obj = "text_completion"
        return event({**self._frame(obj, [choice]), **(extra or {})})

    def usage_chunk(self, result: JobResult, ext: dict[str, Any]) -> str:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return event({**self._frame(obj, []), "usage": usage(result), "aitbc": ext})


def event(data: Any) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


def embedding_answer(result: JobResult, request: EmbeddingsRequest, model: str
                     ) -> dict[str, Any]:
    """The embeddings list of a completed embedding job."""
    out = result.output
    assert isinstance(out, EmbeddingOutput)
    data = []
    for i, vector in enumerate(out.embeddings):
        value: Any = vector
        if request.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = result.metrics.prompt_tokens if result.metrics else 0
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "aitbc": extension(result)}



async def stream_events(shape: Shape, stream: JobStream, include_usage: bool
                        ) -> AsyncIterator[str]:
    """The server-sent events of a streamed job: a chunk per token as it is decoded, a last
    chunk with the finish reason and the ``aitbc`` extension (result hash, profile,
    metrics), the usage chunk when asked for, then ``[DONE]``; an error event if the job
    failed while running."""
    first, offset = True, 0
    # With include_usage every chunk but the last carries "usage": null (OpenAI's form).
    no_usage: dict[str, Any] = {"usage": None} if include_usage else {}
    async for token in stream.tokens():
        if token.text or token.logprob is not None:
            yield shape.chunk(token.text, logprob=token.logprob, first=first, offset=offset,
                              extra=no_usage)
            first, offset = False, offset + len(token.text)
    result = await stream.result()
    if not result.ok:
        yield event(error_json(failure(result)))
        yield DONE
        return
    out = result.output
    assert isinstance(out, GenerationOutput)
    ext = extension(result)
    yield shape.chunk(None if shape.kind == "chat" else "", finish=FINISH[out.finish_reason],
                      first=first, extra={**no_usage, "aitbc": ext})
    if include_usage:
        yield shape.usage_chunk(result, ext)
    yield DONE


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "invalid_request_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


def error_json(view: ErrorView) -> dict[str, Any]:
    """OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``."""
    code = {"unknown_model": "model_not_found"}.get(view.code, view.code)
    kind = ERROR_TYPES.get(view.status, "server_error" if view.status >= 500
                           else "invalid_request_error")
    return {"error": {"message": view.message, "type": kind, "param": view.param,
                      "code": code}}
