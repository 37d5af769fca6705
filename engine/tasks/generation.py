"""Text generation: run one job, or a batch of jobs, on a loaded causal LM.

The decode loop is the engine's own (prefill, then one token per step with a
dynamic KV cache), so that each row keeps its own parameters, its own seeded
sampler, its own stop rule and its own token timestamps, so that a row that
finished leaves the batch and stops costing work, and so that a new job can
take its place between two steps (:class:`DecodeBatch`).

Semantics of the output: ``token_ids`` are the generated ids, including the
EOS id when the model ended with one and the token that completed a stop
string; ``text`` is their decoding without special tokens, cut before the
first stop string.

A chat job (``messages`` or ``system``) is rendered to text first
(:func:`render_chat`): through the tokenizer's chat template when it has one,
else in the plain layout of :func:`plain_chat_text`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from engine.commitment import DEFAULT_STRIDE, commit_selected, compute_commitment
from engine.errors import ContextLengthError, InvalidJobError, JobCancelledError, JobTimeoutError
from engine.hashing import effective_seed
from engine.jobs import GenerationOutput, GenerationParams, Job, TokenLogprob, TopLogprob
from engine.kv_cache import plain_layers
from engine.loading import LoadedModel
from engine.metering import MeterWindow
from engine.sampling import Sampler

NO_DEADLINE = float("inf")
LOGPROB_FLOOR = -9999.0
"""The log-probability reported for a token the model gives no probability at all."""

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamedToken:
    """One generated token as it is decoded: its id, the text it makes final and, when the job
    asked for them, its log-probabilities.

    ``text`` may be empty: an incomplete character waits for the next token, and as many
    characters as a stop string could still claim are held back; the text that finishes a
    row comes with its last token, so the pieces add up to the output's ``text``.
    """

    token_id: int
    text: str
    logprob: TokenLogprob | None = None


TokenCallback = Callable[[StreamedToken], None]
"""Called on the device's decode thread after each token of a job: keep it short."""


class TextStream:
    """A row's text as it becomes final, piece by piece (for :class:`StreamedToken`).

    Each token decodes only the tokens since the last piece, together with the
    ones before them (a tokenizer may drop a word's leading space at the start of
    a sequence), and waits while the text ends in an incomplete character.
    """

    def __init__(self, stops: Sequence[str]):
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._prefix = 0  # first token of the context decoded with the new ones
        self._read = 0  # first token not yet turned into text
        self._text = ""
        self._sent = 0

    def push(self, row: Row, tokenizer: Any) -> str:
        """The text the row's latest token makes final."""
        if row.finish is not None:
            final = row.text if row.finish == "stop" else tokenizer.decode(
                row.generated, skip_special_tokens=True)
            sent = self._text[:self._sent]
            self._text, self._sent = final, len(final)
            return final[len(sent):] if final.startswith(sent) else ""
        ids = row.generated
        before = tokenizer.decode(ids[self._prefix:self._read], skip_special_tokens=True)
        after = tokenizer.decode(ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)
        ready = len(self._text) - self._hold
        if ready <= self._sent:
            return ""
        piece, self._sent = self._text[self._sent:ready], ready
        return piece


def token_logprob(logits: torch.Tensor, token: int, top: int, tokenizer: Any) -> TokenLogprob:
    """``token``'s log-probability under the softmax of ``logits`` (one row, as the model gave
    it) and the ``top`` most likely tokens of that row."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = [token]
    values = [float(lp[token])]
    if top > 0:
        best = torch.topk(lp, min(top, lp.numel()))
        ids += best.indices.tolist()
        values += best.values.tolist()
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    floor = [max(v, LOGPROB_FLOOR) for v in values]
    return TokenLogprob(token_id=token, token=texts[0], logprob=floor[0],
                        top=[TopLogprob(token_id=i, token=t, logprob=v)
                             for i, t, v in zip(ids[1:], texts[1:], floor[1:], strict=True)])


@dataclass(eq=False)
class GenerationRequest:
    """One job in a decode batch, with its window, deadline and cancel flag (hashed by identity)."""

    job: Job
    window: MeterWindow | None = None
    deadline: float = NO_DEADLINE  # time.monotonic() value
    cancelled: Callable[[], bool] = lambda: False
    prompt_ids: list[int] = field(default_factory=list)
    on_token: TokenCallback | None = None  # called on the decode thread after each token
    # True when the decode keeps the committed hidden rows itself (the fused step): the
    # commitment then needs no teacher-forced pass.
    decode_commits: bool = False


@dataclass
class Row:
    """One job's decoding state: its token chooser, the tokens so far, why it ended."""

    request: GenerationRequest
    params: GenerationParams
    sampler: Sampler
    generated: list[int] = field(default_factory=list)
    finish: Literal["eos", "stop", "length"] | None = None
    text: str = ""
    error: Exception | None = None
    logprobs: list[TokenLogprob] | None = None
    stream: TextStream | None = None
    # The last hidden states that produced tokens 0, s, 2s, ... as the decode computed
    # them, when it keeps them (GenerationRequest.decode_commits); else None.
    committed: list[torch.Tensor] | None = None

    @classmethod
    def start(cls, loaded: LoadedModel, request: GenerationRequest) -> Row:
        """A fresh row for ``request`` (its prompt ids set)."""
        job = request.job
        sampler = Sampler(job.params, effective_seed(job), request.prompt_ids,
                          where=where(loaded))
        return cls(request, job.params, sampler,
                   logprobs=[] if job.params.logprobs is not None else None,
                   stream=TextStream(job.params.stop) if request.on_token else None)

    def choose(self, logits: torch.Tensor, tokenizer: Any) -> int:
        """The next token from a 1-D logits row (the one rule, :mod:`engine.sampling`), and
        its log-probabilities from the same row when the job asked for them."""
        token = self.sampler.choose(logits)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.params.logprobs or 0,
                                               tokenizer))
        return token

    def take(self, token: int, tokenizer: Any, eos: set[int]) -> None:
        """Append a chosen token: stamp the job's clock, apply the stop rule and hand the
        token (with the text it makes final) to the job's ``on_token``."""
        self.generated.append(token)
        if self.request.window is not None:
            self.request.window.token()
        check_stop(self, tokenizer, eos)
        if self.stream is not None and self.request.on_token is not None:
            piece = self.stream.push(self, tokenizer)
            logprob = self.logprobs[-1] if self.logprobs else None
            try:
                self.request.on_token(StreamedToken(token, piece, logprob))
            except Exception:  # the listener's failure is not the job's: it hears no more
                log.exception("the token listener of job %s failed", self.request.job.job_id)
                self.stream = None

    def outcome(self, loaded: LoadedModel) -> Outcome:
        """The row's output with its activation commitment (or the error that ended it);
        stops the job's clock after the commitment, so the job is metered for it."""
        output: Outcome
        if self.error is not None:
            output = self.error
        else:
            text = self.text if self.finish == "stop" else loaded.tokenizer.decode(
                self.generated, skip_special_tokens=True)
            if self.request.window is not None:
                self.request.window.finalizing()
            try:
                commitment = self._commitment(loaded)
            except Exception as exc:  # the job fails (typed by the work), its batch mates go on
                output = exc
            else:
                output = GenerationOutput(text=text, token_ids=self.generated,
                                          finish_reason=self.finish or "length",
                                          commitment=commitment, logprobs=self.logprobs)
        if self.request.window is not None:
            self.request.window.stop()
        return output

    def _commitment(self, loaded: LoadedModel) -> str:
        """The activation commitment: of the rows the decode kept, else by a teacher-forced
        pass (engine.commitment)."""
        kept = self.committed
        if kept and len(kept) == -(-len(self.generated) // DEFAULT_STRIDE):
            return commit_selected(torch.stack(kept)).encode()
        return compute_commitment(loaded, self.request.prompt_ids, self.generated)


def commitment_work(request: GenerationRequest, outcome: Outcome) -> float:
    """Tokens of work of an ended job's commitment pass: its prompt and generated tokens
    less one (0 for a job that failed, or whose decode kept its committed rows), for the
    ledger's share of the step it ended in."""
    if (not isinstance(outcome, GenerationOutput) or not outcome.token_ids
            or request.decode_commits):
        return 0.0
    return float(len(request.prompt_ids) + len(outcome.token_ids) - 1)


def where(loaded: LoadedModel) -> str:
    """``"float16 on cuda:0"``: the dtype and devices of a model, for error messages."""
    return f"{loaded.dtype_name} on {'+'.join(d.id for d in loaded.devices)}"


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_chat_text(conversation: Sequence[Mapping[str, str]]) -> str:
    """A chat in the plain layout, for models without a chat template (the gpt2 family).

    Each turn is ``"<Role>: <content>"`` (``System``, ``User``, ``Assistant``),
    turns are joined by a blank line (``"\n\n"``), and unless the last turn is
    the assistant's (which the model then continues) ``"\n\nAssistant:"`` is
    appended. So ``system="Be brief."``, ``prompt="Hi"`` gives
    ``"System: Be brief.\n\nUser: Hi\n\nAssistant:"``.
    """
    text = "\n\n".join(f"{PLAIN_ROLES[t['role']]}: {t['content']}" for t in conversation)
    if conversation[-1]["role"] != "assistant":
        text += "\n\nAssistant:"
    return text


def render_chat(tokenizer: Any, job: Job) -> tuple[str, bool]:
    """A chat job's text, and whether the tokenizer should add its special tokens to it.

    With a chat template (``tokenizer.chat_template``, from the model's tokenizer
    files or its GGUF metadata), the template renders
    :meth:`~engine.jobs.Job.conversation` with the assistant's turn opened
    (``add_generation_prompt``), or, when the last turn is the assistant's, left
    open for the model to continue (``continue_final_message``); the template
    writes its own special tokens. Without one, :func:`plain_chat_text`, encoded
    like a plain prompt.
    """
    conversation = job.conversation()
    field = "messages" if job.messages is not None else "system"
    if not getattr(tokenizer, "chat_template", None):
        return plain_chat_text(conversation), True
    ends_open = conversation[-1]["role"] == "assistant"
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=not ends_open,
                                             continue_final_message=ends_open)
    except Exception as exc:  # the template's own checks (role order, ...) raise anything
        raise InvalidJobError(f"the model's chat template refused the chat: {exc}",
                              field=field) from exc
    if not isinstance(text, str):
        raise InvalidJobError("the model's chat template did not render text", field=field)
    return text, False


def encode_prompt(loaded: LoadedModel, job: Job) -> list[int]:
    """The prompt's token ids, checked against the vocabulary and the context length.

    A chat job's text is :func:`render_chat`'s; a plain ``prompt`` is encoded as given.
    """
    if job.prompt_token_ids is not None:
        ids = list(job.prompt_token_ids)
        vocab = int(loaded.model.config.vocab_size)
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise InvalidJobError(f"prompt_token_ids holds id {bad[0]}, outside the model's "
                                  f"vocabulary of {vocab}", field="prompt_token_ids")
    elif job.chat:
        text, special = render_chat(loaded.tokenizer, job)
        field = "messages" if job.messages is not None else "prompt"
        try:
            ids = list(loaded.tokenizer(text, add_special_tokens=special)["input_ids"])
        except Exception as exc:
            raise InvalidJobError(f"the tokenizer could not encode the chat: {exc}",
                                  field=field) from exc
        if not ids:
            raise InvalidJobError("the chat encodes to no tokens", field=field)
    else:
        try:
            ids = list(loaded.tokenizer(job.prompt, add_special_tokens=True)["input_ids"])
        except Exception as exc:
            raise InvalidJobError(f"the tokenizer could not encode the prompt: {exc}",
                                  field="prompt") from exc
        if not ids:
            raise InvalidJobError("the prompt encodes to no tokens", field="prompt")
    limit = loaded.spec.context_length
    if job.params.max_tokens >= limit:
        raise ContextLengthError(
            f"max_tokens {job.params.max_tokens} is not below {loaded.spec.name}'s context "
            f"length of {limit} tokens", field="max_tokens")
    if len(ids) + job.params.max_tokens > limit:
        raise ContextLengthError(
            f"prompt ({len(ids)} tokens) plus max_tokens ({job.params.max_tokens}) exceeds "
            f"{loaded.spec.name}'s context length of {limit} tokens; shorten the prompt or "
            f"lower max_tokens to at most {max(0, limit - len(ids))}",
            field="messages" if job.messages is not None else "prompt")
    return ids


def accepts(model: Any, keyword: str) -> bool:
    """Whether the model's forward takes ``keyword``."""
    import inspect

    return keyword in inspect.signature(model.forward).parameters


def cache_argument(model: Any) -> str:
    """The forward keyword for the KV cache: ``cache`` in newer transformers, else the old name."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def check_stop(row: Row, tokenizer: Any, eos: set[int]) -> None:
    last = row.generated[-1]
    if last in eos:
        row.finish = "eos"
    stops = row.params.stop
    if stops:
        text = tokenizer.decode(row.generated, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            row.finish = "stop"
            row.text = text[:cut]
            return
    if row.finish is None and len(row.generated) >= row.params.max_tokens:
        row.finish = "length"


def check_alive(rows: Sequence[Row]) -> None:
    """Mark rows whose job was cancelled or passed its deadline."""
    now = time.monotonic()
    for row in rows:
        if row.error is not None or row.finish is not None:
            continue
        if row.request.cancelled():
            row.error = JobCancelledError(f"job {row.request.job.job_id} was cancelled")
        elif now > row.request.deadline:
            row.error = JobTimeoutError(f"job {row.request.job.job_id} passed its time limit "
                                        f"after {len(row.generated)} tokens")


Outcome = GenerationOutput | Exception


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class DecodeBatch:
    """A live, left-padded decode batch over one loaded causal LM.

    Rows join with :meth:`add` (their prompts are prefilled together, then
    their KV cache is merged into the batch's, left-padded to a common length)
    and leave when they finish, so between two :meth:`step` calls a finished
    row's place can go to a new job. Each row keeps its own parameters, seeded
    sampler, stop rule and clock; padding is masked, so a row's tokens do not
    depend on its batch mates beyond floating-point rounding.
    """

    def __init__(self, loaded: LoadedModel, *, fused: bool = True):
        self.loaded = loaded
        # The decode step: the fused C step where the model has one and ``fused`` allows,
        # else the lean step (the forward's floats), else the model's forward.
        self._decode_step = (loaded.fused_step if fused and loaded.fused_step is not None
                             else loaded.decode_step)
        # What results of this batch name as their profile's ``decode``.
        self.decode_name: str = getattr(self._decode_step, "name", "dynamic-cache")
        # The fused step also gives the last hidden states: rows keep their committed ones.
        self._commits = self._decode_step is not None and hasattr(self._decode_step, "step")
        self._model = loaded.model
        self._device = loaded.input_device
        self._eos = loaded.eos_token_ids()
        vocab = int(self._model.config.vocab_size)
        self._pad = next((e for e in sorted(self._eos) if e < vocab), 0)  # masked out anyway
        self._cache_arg = cache_argument(self._model)
        # Only the last position's logits are needed: skip the LM head elsewhere in prefill.
        self._last_only = {"logits_to_keep": 1} if accepts(self._model, "logits_to_keep") \
            else {}
        # A model may make its own empty cache (the engine's native model: no transformers).
        self._new_cache = getattr(self._model, "new_cache", None) or self._dynamic_cache
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mergeable = True  # settled by the first cache: plain per-layer KV tensors
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self._device)
        self._positions = torch.zeros((0, 1), dtype=torch.long, device=self._device)
        self._pending: list[int] = []  # each row's next input token

    def __len__(self) -> int:
        return len(self.rows)

    def _dynamic_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._model.config)

    @property
    def mergeable(self) -> bool:
        """Whether rows can join a batch that is already decoding (plain per-layer KV tensors)."""
        return self._mergeable

    def add(self, requests: Sequence[GenerationRequest]) -> list[tuple[GenerationRequest, Outcome]]:
        """Prefill ``requests`` (prompt ids set, windows started) and take them into the batch.

        Returns the requests that ended already (first token was the last, or
        cancelled, or past the deadline) with their outcomes.
        """
        rows = [Row.start(self.loaded, r) for r in requests]
        check_alive(rows)
        ended = [(row.request, row.outcome(self.loaded)) for row in rows
                 if row.error is not None]
        rows = [row for row in rows if row.error is None]
        if not rows:
            return ended
        if self.rows and not self.mergeable:
            raise RuntimeError("this model's KV cache cannot take rows into a running batch")
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.request.prompt_ids)
            ids[i, width - n:] = torch.tensor(row.request.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        hidden = None
        with torch.inference_mode():
            if self._commits:  # the fused pass prefills too, and gives the committed rows
                logits, hidden = self._decode_step.prefill(ids, mask, positions, cache)
                for row in rows:
                    row.committed, row.request.decode_commits = [], True
            else:
                logits = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     use_cache=True, **{self._cache_arg: cache},
                                     **self._last_only).logits[:, -1, :]
        chosen = self._choose(rows, logits.float(), hidden)
        self._merge(rows, cache, mask, positions[:, -1:], chosen)
        return ended + self._drop_finished()

    def step(self) -> list[tuple[GenerationRequest, Outcome]]:
        """One decode step for every row; returns the requests that ended with it."""
        if not self.rows:
            return []
        step_input = torch.tensor(self._pending, dtype=torch.long,
                                  device=self._device).unsqueeze(-1)
        self._mask = torch.cat([self._mask, torch.ones_like(step_input)], dim=-1)
        self._positions = self._positions + 1
        hidden = None
        with torch.inference_mode():
            if self._commits:
                logits, hidden = self._decode_step.step(step_input, self._mask,
                                                        self._positions, self._cache)
            elif self._decode_step is not None:
                logits = self._decode_step(step_input, self._mask, self._positions,
                                           self._cache)
            else:
                logits = self._model(input_ids=step_input, attention_mask=self._mask,
                                     position_ids=self._positions, use_cache=True,
                                     **{self._cache_arg: self._cache}).logits
        self._pending = self._choose(self.rows, logits[:, -1, :].float(), hidden)
        return self._drop_finished()

    def abort(self) -> list[GenerationRequest]:
        """Empty the batch (after a failed forward pass); returns the requests it held."""
        held = [row.request for row in self.rows]
        for row in self.rows:
            if row.request.window is not None:
                row.request.window.stop()
        self.rows, self._pending, self._cache = [], [], None
        return held

    # ------------------------------------------------------------ internals
    def _choose(self, rows: Sequence[Row], logits: torch.Tensor,
                hidden: torch.Tensor | None = None) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if hidden is not None:  # rows keep the last hidden state of each committed token
            for j, row in enumerate(rows):
                if row.committed is not None and len(row.generated) % DEFAULT_STRIDE == 0:
                    row.committed.append(hidden[j].clone())
        chosen = [row.choose(logits[j], tokenizer) for j, row in enumerate(rows)]
        for row, token in zip(rows, chosen, strict=True):
            row.take(token, tokenizer, self._eos)
        check_alive(rows)
        return chosen

    def _merge(self, rows: list[Row], cache: Any, mask: torch.Tensor,
               positions: torch.Tensor, chosen: list[int]) -> None:
        if not self.rows:
            self.rows, self._cache, self._mask = rows, cache, mask
            self._positions, self._pending = positions, chosen
            self._mergeable = plain_layers(cache)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2),
                                   _pad_left(theirs.keys, width, -2)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width, -2),
                                     _pad_left(theirs.values, width, -2)], dim=0)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._positions = torch.cat([self._positions, positions])
        self.rows = self.rows + rows
        self._pending = self._pending + chosen

    def _drop_finished(self) -> list[tuple[GenerationRequest, Outcome]]:
        done = [j for j, row in enumerate(self.rows) if row.finish or row.error]
        if not done:
            return []
        ended = [(self.rows[j].request, self.rows[j].outcome(self.loaded)) for j in done]
        keep = [j for j in range(len(self.rows)) if j not in set(done)]
        self.rows = [self.rows[j] for j in keep]
        self._pending = [self._pending[j] for j in keep]
        if not keep:
            self._cache = None
            return ended
        self._mask, self._positions = select_rows(self._cache, self._mask, self._positions, keep)
        # Columns that are padding for every remaining row cost attention work: cut them.
        first = int(self._mask.any(0).nonzero()[0].item())
        if first > 0 and self.mergeable:
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
            self._mask = self._mask[:, first:]
        return ended


def select_rows(cache: Any, mask: torch.Tensor, positions: torch.Tensor,
                keep: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only rows ``keep`` of a KV cache and its mask and positions.

    Each layer is indexed with an index on that layer's own device: a model
    placed over several GPUs keeps its later layers' cache on later GPUs.
    Returns the new mask and positions (the cache changes in place).
    """
    index = torch.tensor(list(keep), dtype=torch.long)
    on: dict[torch.device, torch.Tensor] = {}

    def local(device: torch.device) -> torch.Tensor:
        if device not in on:
            on[device] = index.to(device)
        return on[device]

    for layer in cache.layers:
        if getattr(layer, "keys", None) is None:
            continue
        layer.keys = layer.keys.index_select(0, local(layer.keys.device))
        layer.values = layer.values.index_select(0, local(layer.values.device))
    return (mask.index_select(0, local(mask.device)),
            positions.index_select(0, local(positions.device)))


def generate(loaded: LoadedModel, requests: Sequence[GenerationRequest]) -> list[Outcome]:
    """Run generation jobs together as one batch; one outcome per request, in order.

    Each request's ``prompt_ids`` must be set (see :func:`encode_prompt`) and its
    window started. An outcome is the output, or the exception that ended that
    row (timeout, cancellation); other rows go on.
    """
    batch = DecodeBatch(loaded)
    ended = dict((id(req), out) for req, out in batch.add(requests))
    while len(batch):
        ended.update((id(req), out) for req, out in batch.step())
    return [ended[id(r)] for r in requests]
