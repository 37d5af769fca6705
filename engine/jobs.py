"""The engine's own job and result types.

Knows nothing of torch or HTTP. Every model here is strict: unknown keys and
wrong types are errors. The coordinator's wire shapes, and ``parse_payload``
that turns any of them into a :class:`Job`, are in :mod:`engine.payloads`.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator

from engine.base import StrictModel

Task = Literal["text-generation", "embedding"]

MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_PROMPT_CHARS = 1_000_000
MAX_EMBEDDING_INPUTS = 1024
MAX_MESSAGES = 1024
MAX_NOTES = 64
MAX_TOP_LOGPROBS = 20

# Field types shared by the job and every wire shape (engine.payloads), so each range is
# written once.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
"""A job id: 1 to 128 characters of ``A-Z a-z 0-9 . _ : -``, starting with a letter or
digit (safe in a URL path segment, a file name and a log line)."""
MIN_TEMPERATURE = 1e-3
"""The smallest sampling temperature other than 0 (greedy): smaller ones overflow the logits."""
MIN_REPETITION_PENALTY = 1e-2
"""The smallest repetition penalty: smaller ones overflow the penalised logits."""


def _temperature(value: float) -> float:
    if 0.0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value!r}")
    return value


JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0), AfterValidator(_temperature)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=100.0)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
ModelName = Annotated[str, Field(min_length=1, max_length=128)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
StopText = Annotated[str, Field(min_length=1, max_length=256)]
Stops = Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)]
SystemPrompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Role = Literal["system", "user", "assistant"]
Note = Annotated[str, Field(max_length=1024)]
Notes = Annotated[list[Note], Field(min_length=1, max_length=MAX_NOTES)]


class Strict(StrictModel):
    """A strict job shape: frozen, unknown keys refused, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SamplingParams(Strict):
    """The decoding parameters every text-generation shape carries under the same names."""

    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] = 16
    temperature: Temperature = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    repetition_penalty: RepetitionPenalty = 1.0
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters alone, as keyword arguments of :class:`GenerationParams`."""
        return {name: getattr(self, name) for name in SamplingParams.model_fields}


class ChatMessage(Strict):
    """One turn of a chat: ``{"role": "system" | "user" | "assistant", "content": str}``."""

    role: Role
    content: Prompt


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class GenerationParams(SamplingParams):
    """Decoding parameters of a text-generation job. ``temperature == 0`` is greedy."""

    stop: Stops = Field(default_factory=list)
    # Log-probabilities per generated token with this many alternatives (0 to 20); None: off.
    # Not hashed: they describe the output, they are not part of it.
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax at every step."""
        return self.temperature == 0.0


class Job(Strict):
    """One unit of work: a model by registry name, a task, its input and parameters.

    A text-generation job's input is exactly one of ``prompt`` (raw text, run as
    given), ``messages`` (a chat) or ``prompt_token_ids``; ``system`` (a system
    prompt) may come with ``prompt`` or ``messages``. A job with ``messages`` or
    ``system`` is a chat job (:attr:`chat`): its :meth:`conversation` is rendered
    through the model's chat template (README "Job payloads"). ``notes`` say what
    the payload it came from held that the engine did not use (keys ignored).
    ``weights`` names the weights the job asks for: ``pretrained`` (every
    coordinator job) or ``random`` (a seeded random build, for machines
    without the real weights); a verifier rejects a result made with others.
    It is not part of the result hash: the profile's weight digest is.
    """

    job_id: JobId = Field(default_factory=lambda: uuid.uuid4().hex)
    model: ModelName
    task: Task = "text-generation"
    prompt: Prompt | None = None
    prompt_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    messages: Messages | None = None
    system: SystemPrompt | None = None
    input: Texts | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)
    weights: Literal["pretrained", "random"] = "pretrained"
    notes: Notes | None = None

    @model_validator(mode="after")
    def _check_input(self) -> Job:
        if self.task == "text-generation":
            self._check_text_input()
        else:
            if self.input is None:
                raise ValueError("input: an embedding job needs 'input', a list of strings")
            if self.prompt is not None or self.prompt_token_ids is not None:
                raise ValueError("prompt: an embedding job takes 'input', not 'prompt'")
            if self.messages is not None or self.system is not None:
                raise ValueError("messages: an embedding job takes 'input', not 'messages' "
                                 "or 'system'")
        return self

    def _check_text_input(self) -> None:
        if self.input is not None:
            raise ValueError("input: 'input' is for embedding jobs; a text-generation job "
                             "takes 'prompt', 'messages' or 'prompt_token_ids'")
        given = [name for name in ("prompt", "messages", "prompt_token_ids")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            named = "prompt" if not given else given[-1]
            raise ValueError(f"{named}: a text-generation job needs exactly one of 'prompt', "
                             f"'messages' or 'prompt_token_ids'"
                             + (f" (got {' and '.join(given)})" if given else ""))
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt: the prompt is empty")
        if self.system is not None and self.prompt_token_ids is not None:
            raise ValueError("system: a system prompt needs a text input ('prompt' or "
                             "'messages'), not 'prompt_token_ids'")
        if self.messages is not None:
            roles = [m.role for m in self.messages]
            late = next((i for i, r in enumerate(roles) if r == "system" and i > 0), None)
            if late is not None:
                raise ValueError(f"messages: a system message may only come first (message "
                                 f"{late} has the role 'system')")
            if roles[0] == "system" and self.system is not None:
                raise ValueError("system: give the system prompt once, as 'system' or as a "
                                 "first message with the role 'system', not both")
            if all(r == "system" for r in roles):
                raise ValueError("messages: the chat needs a 'user' or 'assistant' message")

    @property
    def chat(self) -> bool:
        """True for a chat job (``messages`` or ``system`` given): its input is rendered."""
        return self.messages is not None or self.system is not None

    def conversation(self) -> list[dict[str, str]]:
        """A chat job's turns as ``{"role", "content"}`` dicts: the system prompt first.

        ``system`` becomes a first ``system`` turn; a ``prompt`` given with it
        becomes a ``user`` turn. Empty for a job that is not a chat job.
        """
        if not self.chat:
            return []
        turns = [] if self.system is None else [{"role": "system", "content": self.system}]
        if self.messages is not None:
            turns += [{"role": m.role, "content": m.content} for m in self.messages]
        elif self.prompt is not None:
            turns.append({"role": "user", "content": self.prompt})
        return turns

    def to_json(self) -> str:
        """The stable JSON form of the job."""
        return self.model_dump_json(exclude_none=True)

    def to_job(self) -> Job:
        """The job itself (engine JSON is one of the wire shapes of :mod:`engine.payloads`)."""
        return self


class TopLogprob(Strict):
    """A candidate token at one step and its log-probability under the model."""

    token_id: int
    token: str
    logprob: float


class TokenLogprob(TopLogprob):
    """A generated token's log-probability (natural log of the model's softmax over the
    logits row it was chosen from, before penalties and temperature) and the ``top``
    most likely tokens of that row, most likely first."""

    top: list[TopLogprob] = Field(default_factory=list)


class GenerationOutput(Strict):
    """What a text-generation job produced.

    ``commitment`` is the activation commitment of the generation (``engine.commitment``:
    top-k entries of the last hidden state at a stride of tokens), set by the engine on
    every completed job and covered by the result hash.
    """

    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "stop", "length"]
    commitment: str | None = Field(default=None, max_length=1_000_000)
    logprobs: list[TokenLogprob] | None = None  # when params.logprobs asked; not hashed


class EmbeddingOutput(Strict):
    """What an embedding job produced: one float32 vector per input."""

    embeddings: list[list[float]]
    dimensions: int


class Metrics(Strict):
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
    # From the last token to the end of the job: mostly the activation commitment's
    # teacher-forced pass; inside execution_time_seconds (ttft + (n - 1) * tpot + this).
    commitment_seconds: float | None = None
    # True when energy_joules is interpolated or extrapolated from NVML's counter, which
    # updates less often than this job's span.
    energy_estimated: bool | None = None


class ExecutionProfile(Strict):
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
    # How the CPU kernel was built, when linear_kernel is "row-invariant" (absent otherwise,
    # and in results from before these were recorded): the compiler's path and version
    # line, its flags, and the instruction-set features it targeted ("avx2", "fma", ...).
    # They change the floats: a build without FMA rounds most outputs differently.
    kernel_compiler: str | None = None
    kernel_compiler_version: str | None = None
    kernel_flags: tuple[str, ...] | None = None
    kernel_isa: tuple[str, ...] | None = None


class JobErrorInfo(Strict):
    """Why a job failed: a stable code, a message, the field to blame when known."""

    code: str
    message: str
    field: str | None = None


class JobResult(Strict):
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
    # What the payload held that the engine did not use (unknown keys ignored), from
    # Job.notes; absent when there is nothing to say.
    notes: Notes | None = None

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
