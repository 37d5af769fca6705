"""Activation commitments: a compact, locality-sensitive fingerprint of a generation's hidden
states, carried in every generation result and checked by ``tolerant`` verification.

What is committed is the model's last hidden state, the output of its final norm that
feeds the LM head (``hidden_states[-1]`` of a forward with ``output_hidden_states=True``;
for GPT-2 that is after ``ln_f``, for Llama/SmolLM2 after ``model.norm``, so
``lm_head(hidden_states[-1])`` are the logits). For generated tokens ``i = 0, s, 2s, ...``
(stride ``s``) the row that produced token ``i`` (sequence position
``len(prompt) - 1 + i``) gives its ``k`` entries largest in magnitude: their indices and
their values rounded to bfloat16.

The encoding (version ``c1``) is ASCII: ``"c1.<s>.<k>." + base64(payload)``, standard
base64 alphabet with padding. The payload holds ``ceil(n / s)`` records for ``n``
generated tokens, in token order; each record is ``k`` little-endian ``uint16`` indices
(in descending order of magnitude) followed by the ``k`` values as little-endian
``uint16`` bfloat16 bit patterns. With the defaults ``s = 8``, ``k = 8`` that is
``4 * 8 * 4 = 128`` bytes (172 base64 characters) per 32 tokens.

The engine computes it after the decode, with one teacher-forced forward over the prompt
and the generated tokens (minus the last) in the model's own dtype and on its device: the
same pass whatever decode path made the tokens (dynamic cache, static cache, CUDA graphs,
alone or batched), so a batched result and the same job alone carry the same commitment.
The one exception is the engine's fused CPU pass (decode ``fused-step/2``), whose floats are
its own, not the model's forward's: there the committed rows are the ones the prefill and
decode themselves computed as they produced each committed token (the prefill's last row
for token 0, the step's final-norm output for the others, :func:`commit_selected`), which
costs no second pass; the pass is row-invariant, so there too a batched result and the same
job alone carry the same commitment.
A verifier recomputes the hidden states in its own precision (the teacher-forced pass
``tolerant`` mode runs anyway) and :func:`compare` measures how far the claim is from
them: the fraction of claimed indices that are among the recomputed top ``k``, and the
relative error of the claimed values at the claimed indices. Honest results of other
precisions, kernels and batch sizes stay within :class:`Thresholds`; a result computed
with other weights (fp8- or int8-rounded, another model, random weights) or fewer layers
does not (``benchmarks/commitment_calibration.py`` measures both).

Why not the ``toploc`` package, which commits to top-k activations too: its prebuilt
wheel (0.1.6) ships C++ extensions built against an older torch, and ``import toploc``
fails under this torch 2.13 (``undefined symbol
_ZNK2at10TensorBase14const_data_ptrIfLi0EEEPKT_v``). The engine's commitment is plain
torch and numpy, with no compiled extension, so any verifier can recompute it.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import EngineError

if TYPE_CHECKING:
    import torch

    from engine.loading import LoadedModel

COMMITMENT_VERSION = "c1"
DEFAULT_STRIDE = 8
DEFAULT_TOP_K = 8
_MAX_FIELD = 4096  # larger strides or k are not commitments anyone means
_FORMAT = re.compile(r"c1\.([1-9][0-9]{0,3})\.([1-9][0-9]{0,3})\.([A-Za-z0-9+/]*={0,2})")


class CommitmentFormatError(EngineError):
    """A commitment string that does not decode (wrong version, fields or length)."""

    code = "invalid_commitment"


@dataclass(frozen=True)
class Commitment:
    """A decoded commitment: per committed position, ``top_k`` indices and bfloat16 values."""

    stride: int
    top_k: int
    indices: np.ndarray  # (positions, top_k) int64
    values: np.ndarray   # (positions, top_k) float32, each exactly a bfloat16

    @property
    def positions(self) -> int:
        """How many token positions are committed."""
        return int(self.indices.shape[0])

    def encode(self) -> str:
        """The ASCII form (``"c1.<stride>.<k>." + base64``)."""
        idx = self.indices.astype("<u2")
        bits = (self.values.astype("<f4").view("<u4") >> 16).astype("<u2")
        payload = np.concatenate([idx, bits], axis=1).tobytes() if self.positions else b""
        return (f"{COMMITMENT_VERSION}.{self.stride}.{self.top_k}."
                + base64.b64encode(payload).decode("ascii"))

    @classmethod
    def decode(cls, text: str) -> Commitment:
        """Parse the ASCII form; raises :class:`CommitmentFormatError` when malformed."""
        match = _FORMAT.fullmatch(text)
        if match is None:
            raise CommitmentFormatError(
                f"not a {COMMITMENT_VERSION} commitment (expected "
                f"'{COMMITMENT_VERSION}.<stride>.<k>.<base64>')", field="commitment")
        stride, top_k = int(match[1]), int(match[2])
        if stride > _MAX_FIELD or top_k > _MAX_FIELD:
            raise CommitmentFormatError("the commitment's stride or k is out of range",
                                        field="commitment")
        try:
            raw = base64.b64decode(match[3], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CommitmentFormatError(f"the commitment's payload is not base64: {exc}",
                                        field="commitment") from exc
        record = 4 * top_k
        if len(raw) % record:
            raise CommitmentFormatError(
                f"the commitment's payload of {len(raw)} bytes is not a whole number of "
                f"{record}-byte records", field="commitment")
        words = np.frombuffer(raw, dtype="<u2").reshape(-1, 2 * top_k)
        indices = words[:, :top_k].astype(np.int64)
        values = (words[:, top_k:].astype("<u4") << 16).view("<f4").astype(np.float32)
        return cls(stride, top_k, indices, values)


def positions_for(tokens: int, stride: int) -> list[int]:
    """The generated-token indices a commitment with ``stride`` covers: 0, s, 2s, ... < n."""
    return list(range(0, tokens, stride))


def commit_rows(hidden: torch.Tensor, *, stride: int = DEFAULT_STRIDE,
                top_k: int = DEFAULT_TOP_K) -> Commitment:
    """The commitment of ``hidden``: ``(n, d)`` last hidden states, row ``i`` producing token ``i``.

    Magnitudes are ranked in float32 (a tie keeps the lower index first); values are
    rounded to bfloat16 (round to nearest even).
    """
    return commit_selected(hidden[::stride], stride=stride, top_k=top_k)


def commit_selected(rows: torch.Tensor, *, stride: int = DEFAULT_STRIDE,
                    top_k: int = DEFAULT_TOP_K) -> Commitment:
    """The commitment of the committed rows alone: ``rows[j]`` produced token ``j * stride``
    (what a decode that kept those rows as it went hands over)."""
    import torch

    if not 1 <= top_k <= min(rows.shape[-1], 65535):
        raise ValueError(f"top_k must be 1..{min(rows.shape[-1], 65535)}, got {top_k}")
    rows = rows.detach().float().cpu()
    if rows.shape[0] == 0:
        return Commitment(stride, top_k, np.zeros((0, top_k), np.int64),
                          np.zeros((0, top_k), np.float32))
    order = torch.argsort(rows.abs(), dim=-1, descending=True, stable=True)[:, :top_k]
    values = rows.gather(1, order).to(torch.bfloat16).float()
    return Commitment(stride, top_k, order.numpy().astype(np.int64),
                      values.numpy().astype(np.float32))


def teacher_forced(loaded: LoadedModel, prompt_ids: Sequence[int], tokens: Sequence[int], *,
                   logits_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over ``prompt + tokens[:-1]``: the last hidden states and logits.

    Returns ``(hidden, logits)``: ``hidden`` is ``(n, d)``, row ``i`` the final-norm
    output that produced token ``i``, in the model's dtype on its device; ``logits`` are
    the last ``logits_rows`` rows of logits (``(logits_rows, vocab)``, where the model
    supports ``logits_to_keep``; all rows otherwise), also as computed.
    """
    import inspect

    import torch

    n = len(tokens)
    if n == 0:
        raise ValueError("no tokens to force")
    ids = torch.tensor([list(prompt_ids) + list(tokens[:-1])], dtype=torch.long,
                       device=loaded.input_device)
    accepts = "logits_to_keep" in inspect.signature(loaded.model.forward).parameters
    keep: dict[str, Any] = {"logits_to_keep": logits_rows} if accepts else {}
    with torch.inference_mode():
        out = loaded.model(input_ids=ids, use_cache=False, output_hidden_states=True, **keep)
    hidden = out.hidden_states[-1][0, -n:, :]
    return hidden, out.logits[0, -min(logits_rows, out.logits.shape[1]):, :]


def compute_commitment(loaded: LoadedModel, prompt_ids: Sequence[int], tokens: Sequence[int], *,
                       stride: int = DEFAULT_STRIDE, top_k: int = DEFAULT_TOP_K) -> str:
    """The encoded commitment of a generation: ``tokens`` generated after ``prompt_ids``.

    One teacher-forced forward in the model's own dtype, on its device, under
    ``torch.inference_mode()``. No tokens give a commitment of no positions.
    """
    if not tokens:
        return Commitment(stride, top_k, np.zeros((0, top_k), np.int64),
                          np.zeros((0, top_k), np.float32)).encode()
    hidden, _ = teacher_forced(loaded, prompt_ids, tokens, logits_rows=1)
    return commit_rows(hidden, stride=stride, top_k=top_k).encode()


# ------------------------------------------------------------------ checking a claim

@dataclass(frozen=True)
class Thresholds:
    """When a claimed commitment matches recomputed hidden states (per committed position).

    ``min_overlap``: least fraction of the claimed indices that must be among the
    recomputed top ``k``; ``max_median_error``: largest median, over the claimed
    indices, of ``|claimed - recomputed| / |recomputed|``; ``max_error``: largest such
    error at any one claimed index. ``max_stride`` and ``min_top_k`` bound what a claim
    may choose to commit to (the engine writes stride 8, k 8).

    The defaults are those for a bfloat16 claim, the loosest (see :data:`BY_DTYPE`).
    """

    min_overlap: float = 0.625
    max_median_error: float = 0.06
    max_error: float = 0.2
    max_mean_error: float = 0.02
    max_stride: int = DEFAULT_STRIDE
    min_top_k: int = DEFAULT_TOP_K

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"min_overlap": self.min_overlap, "max_median_error": self.max_median_error,
                "max_error": self.max_error, "max_mean_error": self.max_mean_error,
                "max_stride": self.max_stride, "min_top_k": self.min_top_k}


BY_DTYPE: dict[str, Thresholds] = {
    "float32": Thresholds(min_overlap=0.75, max_median_error=0.006, max_error=0.012,
                          max_mean_error=0.003),
    "float16": Thresholds(min_overlap=0.625, max_median_error=0.008, max_error=0.045,
                          max_mean_error=0.005),
    "bfloat16": Thresholds(),
}
"""Thresholds by the dtype a result claims to have run in, each about 3x the worst honest
distance measured for that dtype against a float32 verifier
(``benchmarks/commitment_calibration.py``, smollm2-135m and a tiny GPT-2, alone and
batched, the engine's CPU kernel and BLAS): float32 worst median error 0.0020 (the
bfloat16 rounding of the committed values), worst single error 0.0038, overlap 1.0;
float16 0.0029, 0.016, 1.0; bfloat16 0.023, 0.067, 0.875 (a missed index is a missing
fraction of 0.125; 3x that is 0.375). ``max_mean_error`` bounds the mean relative error
over every committed entry of the result, where per-position noise averages out: about
2x the worst honest mean measured over 16 smollm2 texts (float32 0.001, the bfloat16
rounding of the values; float16 0.0021; bfloat16 0.010), against 0.0105 to 0.029 for
int8-rounded weights and 0.023 to 0.043 for fp8-rounded ones. A forger can claim
bfloat16, so the bfloat16 row is the bar a forgery must pass: it refuses fp8 weights,
but int8 per-channel weights move the hidden states about as much as honest bfloat16
arithmetic does, and part of them pass it (README, Verification, Limits)."""


def thresholds_for(dtype: str) -> Thresholds:
    """The thresholds for a claim made in ``dtype`` (bfloat16's, the loosest, if unknown)."""
    return BY_DTYPE.get(dtype, BY_DTYPE["bfloat16"])


@dataclass
class CommitmentCheck:
    """Measured distances of a claimed commitment from recomputed hidden states.

    Per committed position (in order): ``overlaps`` (fraction of claimed indices in the
    recomputed top k), ``median_errors`` and ``max_errors`` (relative value errors at the
    claimed indices). ``first_failing`` is the generated-token index of the first position
    outside the thresholds (``None`` when it passed), and ``reason`` says why.
    """

    passed: bool
    stride: int = 0
    top_k: int = 0
    tokens: list[int] = field(default_factory=list)
    overlaps: list[float] = field(default_factory=list)
    median_errors: list[float] = field(default_factory=list)
    max_errors: list[float] = field(default_factory=list)
    first_failing: int | None = None
    reason: str | None = None
    mean_error: float = 0.0  # over every committed entry of the result

    @property
    def min_overlap(self) -> float:
        """The worst index overlap (1.0 with no positions)."""
        return min(self.overlaps, default=1.0)

    @property
    def worst_median_error(self) -> float:
        """The largest per-position median relative error (0.0 with no positions)."""
        return max(self.median_errors, default=0.0)

    @property
    def worst_max_error(self) -> float:
        """The largest relative error at any claimed index (0.0 with no positions)."""
        return max(self.max_errors, default=0.0)

    def to_details(self) -> dict[str, Any]:
        """``commitment_*`` figures for a verdict's details."""
        return {"commitment_passed": self.passed, "commitment_positions": len(self.tokens),
                "commitment_stride": self.stride, "commitment_top_k": self.top_k,
                "commitment_min_overlap": self.min_overlap,
                "commitment_max_median_error": self.worst_median_error,
                "commitment_max_error": self.worst_max_error,
                "commitment_mean_error": self.mean_error,
                "commitment_first_failing_token": self.first_failing}


def measure(claim: Commitment, hidden: torch.Tensor) -> CommitmentCheck:
    """Distances of ``claim`` from ``hidden`` (``(n, d)``, row ``i`` producing token ``i``),
    without judging them (``passed`` is True when the shapes fit)."""
    import torch

    n, dim = int(hidden.shape[0]), int(hidden.shape[-1])
    at = positions_for(n, claim.stride)
    check = CommitmentCheck(passed=True, stride=claim.stride, top_k=claim.top_k, tokens=at)
    if claim.positions != len(at):
        return _failed(check, f"the commitment covers {claim.positions} positions; "
                              f"{n} tokens at stride {claim.stride} need {len(at)}")
    if claim.top_k > dim:
        return _failed(check, f"the commitment's k {claim.top_k} exceeds the hidden size {dim}")
    if claim.positions and int(claim.indices.max()) >= dim:
        return _failed(check, f"the commitment names index {int(claim.indices.max())}, outside "
                              f"the hidden size {dim}")
    if not np.isfinite(claim.values).all():
        return _failed(check, "the commitment holds a value that is not finite")
    if not at:
        return check
    rows = hidden[::claim.stride].detach().float().cpu()
    mine = torch.topk(rows.abs(), claim.top_k, dim=-1).indices
    idx = torch.from_numpy(claim.indices)
    claimed_values = torch.from_numpy(claim.values)
    ref = rows.gather(1, idx)
    errors = (claimed_values - ref).abs() / ref.abs().clamp(min=1e-6)
    hits = (idx[:, :, None] == mine[:, None, :]).any(-1).float().mean(-1)
    check.overlaps = [float(x) for x in hits]
    check.median_errors = [float(x) for x in errors.median(dim=-1).values]
    check.max_errors = [float(x) for x in errors.max(dim=-1).values]
    check.mean_error = float(errors.mean())
    return check


def compare(claimed: str | None, hidden: torch.Tensor,
            thresholds: Thresholds | None = None) -> CommitmentCheck:
    """Measure a claimed (encoded) commitment against recomputed hidden states and judge it.

    ``hidden`` is ``(n, d)``, row ``i`` the last hidden state that produced generated
    token ``i`` (any dtype; compared in float32). Fails on a missing or malformed claim,
    a claim with a coarser stride or fewer entries than ``thresholds`` allow, and on the
    first position whose overlap or errors fall outside them.
    """
    t = thresholds or Thresholds()
    if claimed is None:
        return CommitmentCheck(passed=False, reason="the result carries no activation "
                                                    "commitment")
    try:
        claim = Commitment.decode(claimed)
    except CommitmentFormatError as exc:
        return CommitmentCheck(passed=False, reason=f"the activation commitment is malformed: "
                                                    f"{exc.message}")
    if claim.stride > t.max_stride or claim.top_k < t.min_top_k:
        return CommitmentCheck(passed=False, stride=claim.stride, top_k=claim.top_k,
                               reason=f"the activation commitment uses stride {claim.stride} "
                                      f"and k {claim.top_k}; this verifier requires stride at "
                                      f"most {t.max_stride} and k at least {t.min_top_k}")
    check = measure(claim, hidden)
    if not check.passed:
        return check
    for j, token in enumerate(check.tokens):
        overlap, median, worst = check.overlaps[j], check.median_errors[j], check.max_errors[j]
        why = None
        if not overlap >= t.min_overlap:
            why = f"index overlap {overlap:.3f} under {t.min_overlap}"
        elif not median <= t.max_median_error:
            why = f"median relative error {median:.4g} over {t.max_median_error}"
        elif not worst <= t.max_error:
            why = f"relative error {worst:.4g} over {t.max_error}"
        if why is not None:
            check.first_failing = token
            return _failed(check, f"the activation commitment does not match the recomputed "
                                  f"hidden state at token {token}: {why}")
    if check.tokens and not check.mean_error <= t.max_mean_error:
        worst = max(range(len(check.tokens)), key=lambda j: check.median_errors[j])
        check.first_failing = check.tokens[worst]
        return _failed(check, f"the activation commitment is off by a mean relative error of "
                              f"{check.mean_error:.4g} over the result, over "
                              f"{t.max_mean_error} (an honest run in the claimed dtype stays "
                              f"under it; other weights or precision do not)")
    return check


def _failed(check: CommitmentCheck, reason: str) -> CommitmentCheck:
    check.passed = False
    check.reason = reason
    return check


def bytes_per_tokens(tokens: int, *, stride: int = DEFAULT_STRIDE,
                     top_k: int = DEFAULT_TOP_K) -> int:
    """Payload bytes of a commitment of ``tokens`` generated tokens."""
    return math.ceil(tokens / stride) * top_k * 4
