"""The fast single-stream decode path: a static KV cache, one decode step replayed as a graph.

A :class:`StaticDecoder` belongs to one loaded model and one cache-length
bucket. It owns a transformers ``StaticCache`` of that length and fixed
input buffers (the token, its position), and turns one decode step into a
function of those buffers only. On CUDA that function is captured once as a
CUDA graph (:class:`CudaGraphs`), so a step costs one graph launch instead of
hundreds of kernel launches; elsewhere it runs eagerly (:class:`EagerSteps`),
which is how the path is tested on machines without a GPU.

Why buckets and an explicit graph, not ``torch.compile``: a graph has fixed
shapes, so each cache length needs its own; rounding a job's prompt plus
``max_tokens`` up to a power of two (at least :data:`MIN_BUCKET`, at most the
model's context) bounds a model to a handful of graphs, each captured once,
before any job's meter starts (:meth:`StaticDecoder.build` is warm-up, billed
to nobody). Capturing by hand needs no dynamo, so there is no recompile limit
shared across models and no per-thread compiled state: the decoder is used by
its device's runner thread only, and a graph is replayed on the thread that
captured it.

Prefill runs eagerly (its length varies); the attention mask is a 4-D
additive mask computed from the position buffer inside the step, so the
captured step never reads a host value. The token chooser is the engine's one
rule (:mod:`engine.sampling`), applied to the step's float32 logits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from engine.hardware import Device
from engine.loading import LoadedModel
from engine.tasks.generation import (
    GenerationRequest,
    Outcome,
    Row,
    accepts,
    cache_argument,
    check_alive,
)

log = logging.getLogger(__name__)

MIN_BUCKET = 256
# Eager runs of the step on a side stream before capture (CUDA needs the
# allocator and cuBLAS workspaces settled first).
CAPTURE_WARMUP_RUNS = 2


def bucket_for(tokens: int, context_length: int) -> int:
    """The cache length for a job needing ``tokens`` positions: a power of two, capped."""
    size = MIN_BUCKET
    while size < tokens:
        size *= 2
    return min(size, context_length)


class GraphBackend(Protocol):
    """How a decode step becomes replayable: captured as a graph, or run as it is."""

    label: str | None  # what the profile's ``decode`` adds ("cuda-graphs"), None when eager

    def capture(self, step: Callable[[], None], device: Device) -> Callable[[], None]:
        """Return a function that replays ``step`` (its buffers fixed)."""
        ...


class EagerSteps:
    """No graph: the step runs as Python each time (the CPU, or a GPU whose capture failed)."""

    label: str | None = None

    def capture(self, step: Callable[[], None], device: Device) -> Callable[[], None]:
        """The step itself."""
        return step


class CudaGraphs:
    """CUDA graphs captured by hand.

    Each graph keeps its own memory pool (a decode step of one row needs
    little), so a graph's memory goes back the moment its model is evicted.
    """

    label: str | None = "cuda-graphs"

    def capture(self, step: Callable[[], None], device: Device) -> Callable[[], None]:
        """Warm ``step`` up on a side stream, capture it, and return the graph's replay."""
        assert device.index is not None, f"{device.id} has no CUDA index"
        target = torch.device("cuda", device.index)
        with torch.cuda.device(target):
            side = torch.cuda.Stream(target)
            side.wait_stream(torch.cuda.current_stream(target))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARMUP_RUNS):
                    step()
            torch.cuda.current_stream(target).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        return graph.replay


def default_backend(device: Device) -> GraphBackend:
    """CUDA graphs on a GPU, eager steps on the CPU."""
    return CudaGraphs() if device.kind == "cuda" else EagerSteps()


@dataclass
class DecoderStats:
    """What one decoder did: for ``info``, the bench and the GPU check."""

    model: str
    dtype: str
    device: str
    bucket: int
    graph: str | None  # the backend's label, None when the step runs eagerly
    warmup_seconds: float = 0.0
    captures: int = 0
    replays: int = 0
    jobs: int = 0
    capture_thread: str | None = None
    fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return dict(self.__dict__)


@dataclass
class StaticDecoder:
    """One model's static cache of one length, and its decode step (captured once)."""

    loaded: LoadedModel
    bucket: int
    backend: GraphBackend
    stats: DecoderStats = field(init=False)
    busy: bool = False
    _cache: Any = None
    _replay: Callable[[], None] | None = None
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    _cache_kw: str = "past_key_values"
    _last_only: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stats = DecoderStats(self.loaded.spec.name, self.loaded.dtype_name,
                                  self.loaded.devices[0].id, self.bucket, self.backend.label)

    @property
    def label(self) -> str:
        """What the profile's ``decode`` says for a job decoded here."""
        return "static-cache" + (f"+{self.stats.graph}" if self.stats.graph else "")

    def build(self) -> float:
        """Allocate the cache, warm the step up and capture it; returns the seconds it took."""
        from transformers import StaticCache

        started = time.perf_counter()
        model = self.loaded.model
        device = self.loaded.input_device
        dtype = next(model.parameters()).dtype
        vocab = int(model.config.vocab_size)
        self._cache = StaticCache(config=model.config, max_cache_len=self.bucket)
        self._cache_kw = cache_argument(model)
        self._last_only = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        self._buffers = {
            "token": torch.zeros((1, 1), dtype=torch.long, device=device),
            "position": torch.zeros((1, 1), dtype=torch.long, device=device),
            "columns": torch.arange(self.bucket, device=device).view(1, 1, 1, self.bucket),
            "blocked": torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device),
            "open": torch.tensor(0.0, dtype=dtype, device=device),
            "logits": torch.zeros((vocab,), dtype=torch.float32, device=device),
        }
        self._prefill([0])  # allocates the cache's layers before the step is captured
        try:
            self._replay = self.backend.capture(self._step, self.loaded.devices[0])
            self.stats.captures += 1
            self.stats.capture_thread = threading.current_thread().name
        except Exception as exc:  # a model whose step cannot be captured still runs eagerly
            log.warning("capturing the decode step of %s (cache %d) failed (%s: %s); it runs "
                        "without a graph", self.loaded.key, self.bucket, type(exc).__name__, exc)
            self.stats.graph = None
            self.stats.fallback_reason = f"{type(exc).__name__}: {exc}"
            self._replay = self._step
        if self.loaded.devices[0].kind == "cuda":
            torch.cuda.synchronize(self.loaded.devices[0].index)
        self.stats.warmup_seconds = time.perf_counter() - started
        return self.stats.warmup_seconds

    def release(self) -> None:
        """Drop the graph, the cache and the buffers (the model is being evicted)."""
        self._replay = None
        self._cache = None
        self._buffers = {}

    # ------------------------------------------------------------ one job
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Reset the cache and run the prompt; returns the last position's float32 logits."""
        with torch.inference_mode():
            self._cache.reset()
        return self._prefill(prompt_ids)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Feed ``token`` at ``position`` (replaying the step); returns the next logits row."""
        assert self._replay is not None, "the decoder was released"
        self._buffers["token"].fill_(token)
        self._buffers["position"].fill_(position)
        self._replay()
        self.stats.replays += 1
        return self._buffers["logits"]

    def _prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        b = self._buffers
        n = len(prompt_ids)
        device = self.loaded.input_device
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        rows = torch.arange(n, device=device).view(1, 1, n, 1)
        mask = torch.where(b["columns"] <= rows, b["open"], b["blocked"])
        with torch.inference_mode():
            out = self.loaded.model(input_ids=ids, position_ids=rows.view(1, n),
                                    attention_mask=mask, use_cache=True,
                                    **{self._cache_kw: self._cache}, **self._last_only)
        return out.logits[0, -1, :].float()

    def _step(self) -> None:
        b = self._buffers
        mask = torch.where(b["columns"] <= b["position"].view(1, 1, 1, 1), b["open"],
                           b["blocked"])
        with torch.inference_mode():
            out = self.loaded.model(input_ids=b["token"], position_ids=b["position"],
                                    attention_mask=mask, use_cache=True,
                                    **{self._cache_kw: self._cache})
            b["logits"].copy_(out.logits[0, -1, :].float())


class StaticRun:
    """One job decoding on a :class:`StaticDecoder`, one token per :meth:`advance`."""

    def __init__(self, decoder: StaticDecoder, request: GenerationRequest):
        self.decoder = decoder
        self.request = request
        self.row = Row.start(decoder.loaded, request)
        self._eos = decoder.loaded.eos_token_ids()
        self._tokenizer = decoder.loaded.tokenizer
        self._position = len(request.prompt_ids)
        self._last: int | None = None

    @property
    def pending_work(self) -> int:
        """The tokens of work the next :meth:`advance` does: the prompt, then one."""
        return len(self.request.prompt_ids) if self._last is None else 1

    @property
    def done(self) -> bool:
        """True once the row finished or failed."""
        return self.row.finish is not None or self.row.error is not None

    def advance(self) -> int:
        """Prefill (first call) or one decode step; returns the tokens of work done."""
        check_alive([self.row])
        if self.done:
            return 0
        if self._last is None:
            logits = self.decoder.prefill(list(self.request.prompt_ids))
            work = len(self.request.prompt_ids)
        else:
            logits = self.decoder.step(self._last, self._position)
            self._position += 1
            work = 1
        self._last = self.row.choose(logits, self._tokenizer)
        self.row.take(self._last, self._tokenizer, self._eos)
        check_alive([self.row])
        return work

    def outcome(self) -> Outcome:
        """The job's output (with its commitment, computed here) or the error that ended it."""
        return self.row.outcome(self.decoder.loaded)
