"""Verification of a claimed result: ``integrity``, ``exact`` or ``tolerant``.

A coordinator, a validator or a miner checking itself hands over a job and the
:class:`~engine.jobs.JobResult` someone claims for it, and gets a
:class:`Verdict` back. Three modes, cheapest first; every mode runs the
integrity checks first and stops there when they fail:

``integrity`` (no model run)
    The result is well formed (completed, an output of the job's task, counts
    that fit the job), its ``result_hash`` recomputes from the job and its own
    output (:func:`engine.hashing.result_hash` with the profile's weight
    digest), and that digest names the model the registry knows: the digest of
    the weight files the registry entry resolves to here, or, for a profile that
    says ``weights: random``, the digest of a fresh seeded random build of the
    entry's architecture in the profile's dtype (the build the engine itself
    makes). The profile's weights must be the ones the job asks for
    (``Job.weights``, pretrained unless the job says random);
    ``require_weights`` can refuse random-weight results outright.

``exact``
    The job runs again on an :class:`~engine.executor.Engine` configured to the
    recorded profile (weights, dtype) and the hashes are compared. The re-run is
    alone (batch size 1): a batched result's batch mates are not known, and a
    left-padded batch can change the numerics. Bitwise equality only holds
    inside one execution profile (same device class, dtype, decode, batch,
    software versions); a mismatch names the profile differences that can
    explain it, and ``tolerant`` is the mode for results across profiles.

``tolerant``
    One teacher-forced forward pass over the prompt plus the claimed tokens
    (prefill only, no decode loop) in the verifier's reference dtype (float32
    by default), then per claimed token:

    * greedy jobs: the token's logit (after the job's repetition penalty) is
      within a margin of the row's maximum: ``max - logit <= m``, with
      ``m = max(margin_floor, margin_sigma * std(row))``; the margin scales
      with the spread of the row because precision noise does;
    * sampled jobs: with the job's repetition penalty and temperature applied,
      the token is inside the job's top-k / top-p set (widened by the replay
      margin ``max(margin_floor, replay_margin_sigma * std(row)) / T``, so a
      token on the set's edge under another precision passes), and the seeded
      draw is always replayed: every decode path samples by the one rule of
      :mod:`engine.sampling`, ``argmax(p / q)`` with ``q = -log u`` from the
      job's Philox4x64-10 stream keyed by its effective seed -- a rule fixed
      by its specification, not by a library version -- so the verifier redraws
      ``q`` and requires the claimed token to be the race's winner within the
      margin, whatever torch version or device the profile names;
    * the stop rule: the output ends at the first EOS id, the first completed
      stop string or exactly ``max_tokens`` tokens, and not earlier, and
      ``finish_reason`` says which;
    * the claimed text is the decoding of the claimed tokens (without special
      tokens), cut before the first stop string;
    * embedding jobs: every vector's cosine similarity to the recomputed one is
      at least ``embedding_min_cosine``.

:func:`spot_check` chooses, deterministically from a seed, which results of
a batch a coordinator verifies.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import EngineError, InvalidJobError, UnknownModelError
from engine.hashing import HASH_VERSION, result_hash
from engine.jobs import (
    EmbeddingOutput,
    ExecutionProfile,
    GenerationOutput,
    GenerationParams,
    Job,
    JobResult,
)
from engine.payloads import parse_payload
from engine.registry import ModelSpec, Registry

if TYPE_CHECKING:
    import torch

    from engine.commitment import Thresholds as CommitmentThresholds
    from engine.executor import Engine
    from engine.hardware import Device, HardwareInfo
    from engine.loading import LoadedModel
    from engine.options import Decode
    from engine.pool import ModelPool

Mode = Literal["integrity", "exact", "tolerant"]
MODES: tuple[str, ...] = get_args(Mode)

T = TypeVar("T")

SPOT_CHECK_DOMAIN = "aitbc-spot-check/1"
# Job failures on re-run that mean the job itself is bad (so the claim is too),
# as opposed to this machine being unable to run it.
_JOB_FAULT_CODES = {"invalid_job", "context_length_exceeded", "unsupported_job_type"}


class VerificationInputError(EngineError):
    """The job or result cannot be used for verification here (exit status 2)."""

    code = "verification_input_unusable"


# Departures from the float32 argmax an honest greedy run may make, per token, by the
# dtype it ran in: twice the rate measured (benchmarks/verify_eval.py: float32 profiles,
# kernel or BLAS, alone or batched, never departed; bfloat16 about once per 100 tokens on
# smollm2-135m; float16 held as bfloat16 for want of a separate measurement).
FLIP_RATES: dict[str, float] = {"float32": 0.0, "float16": 0.02, "bfloat16": 0.02}


@dataclass(frozen=True)
class Tolerances:
    """The documented margins and floors of ``tolerant`` mode (see the README).

    ``margin_sigma`` and ``margin_floor`` give the near-tie margin in logits:
    ``m = max(margin_floor, margin_sigma * std(logit row))``. Measured by
    ``benchmarks/verify_eval.py`` over fp32 / bf16 / fp16, batched / alone, dynamic /
    static cache and row-invariant kernel / BLAS (tiny GPT-2 and smollm2-135m): the
    largest gap of an honest token to the fp32 argmax was 0.083 sigma (smollm2 bf16),
    and no profile moved two of a row's top 8 logits apart by more than 0.143 sigma, so
    no honest flip can be wider; ``margin_sigma`` 0.2 is 2.4x the first and 1.4x the
    second. ``margin_floor`` (logits) is 2x the largest fp32 change measured (kernel /
    BLAS, 1e-4) and only matters for nearly flat rows.
    ``tie_logits`` and ``flip_rate``: a greedy token within the margin but more than
    ``tie_logits`` under the reference argmax is a departure; a float32 claim may make
    none (no float32 profile ever did), a bfloat16 or float16 claim one plus
    ``flip_rate`` per token (:data:`FLIP_RATES`, twice the honest rate measured). A
    greedy claim sampled at a low temperature departs a few times within the margin,
    and this cap is what refuses it.
    ``replay_margin_sigma``: the margin of the seeded replay of sampled jobs,
    ``max(margin_floor, replay_margin_sigma * std(logit row)) / temperature``
    in the race's scores: the claimed token's ``z - log q`` must be within it
    of the replayed winner's; 0.1 is 2.4x the largest honest replay gap measured
    (0.041 sigma, smollm2 bf16 at T 1.0). The replay always runs for a sampled
    claim; nothing in a claim or in these fields turns it off.
    ``embedding_min_cosine``: least cosine similarity of a claimed vector to the
    recomputed one: ``1 - 3 * (1 - c)`` with ``c`` = 0.99994, the least honest cosine
    measured (all-MiniLM-L6-v2 bf16 against fp32; fp16 and BLAS stay above 0.999998).
    fp8 weights give about 0.9983, and 2 % noise 0.9998.
    """

    margin_sigma: float = 0.2
    margin_floor: float = 2e-4
    embedding_min_cosine: float = 0.99982
    replay_margin_sigma: float = 0.1
    tie_logits: float = 1e-3
    flip_rate: Mapping[str, float] = field(default_factory=lambda: dict(FLIP_RATES))
    commitment: CommitmentThresholds | None = None  # None: by the claimed dtype

    def allowed_flips(self, dtype: str, tokens: int) -> int:
        """How many greedy tokens of a ``dtype`` claim may depart from the reference argmax
        (within the margin, by more than ``tie_logits``): none for float32, else one plus
        ``flip_rate * tokens``."""
        rate = self.flip_rate.get(dtype, max(self.flip_rate.values(), default=0.0))
        return 0 if rate <= 0 else 1 + math.floor(rate * tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"margin_sigma": self.margin_sigma, "margin_floor": self.margin_floor,
                "embedding_min_cosine": self.embedding_min_cosine,
                "replay_margin_sigma": self.replay_margin_sigma,
                "tie_logits": self.tie_logits, "flip_rate": dict(self.flip_rate),
                "commitment": self.commitment.to_dict() if self.commitment else None}


class Verdict(BaseModel):
    """The outcome of verifying one result.

    ``reasons`` lists every check that failed (empty when accepted);
    ``first_suspicious_token`` is the index in ``output.token_ids`` of the first
    token that failed a check, or ``None``; ``cost_seconds`` is the wall time
    of the verification, model load included (``details["load_seconds"]`` says
    how much of it was loading).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: bool
    mode: Mode
    reasons: list[str] = Field(default_factory=list)
    first_suspicious_token: int | None = None
    cost_seconds: float
    details: dict[str, Any] = Field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form."""
        return self.model_dump(mode="json")

    def to_json(self, *, indent: int | None = None) -> str:
        """The verdict as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


class SpotCheckReport(BaseModel):
    """What a spot check chose and found: verdicts by job id, and the rejected ids."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int | str
    fraction: float
    total: int
    selected: list[str]
    verdicts: dict[str, Verdict]
    rejected: list[str]


@dataclass
class Findings:
    """The failed checks of one verification: reasons, and the first suspicious token."""

    reasons: list[str]
    first: int | None = None

    def fail(self, reason: str, index: int | None = None) -> None:
        self.reasons.append(reason)
        if index is not None and (self.first is None or index < self.first):
            self.first = index

    @property
    def ok(self) -> bool:
        return not self.reasons


# ------------------------------------------------------------------ input parsing

def _load_json(value: str | bytes, what: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:  # not JSON, too deep, a huge integer
        raise VerificationInputError(f"the {what} is not JSON: {exc}", field=what) from exc


def parse_job(job: Job | Mapping[str, Any] | str | bytes) -> Job:
    """The job to verify against, from a :class:`Job` or any payload ``parse_payload`` takes."""
    if isinstance(job, Job):
        return job
    try:
        return parse_payload(job)
    except InvalidJobError as exc:
        raise VerificationInputError(f"the job cannot be used: {exc.message}",
                                     field="job") from exc


def parse_result(result: JobResult | Mapping[str, Any] | str | bytes) -> JobResult | str:
    """The claimed result, or the reason it is malformed (a string) when it is an object that
    does not validate as a :class:`JobResult`. Non-JSON input is unusable (raises)."""
    if isinstance(result, JobResult):
        return result
    data = _load_json(result, "result") if isinstance(result, (str, bytes)) else result
    if not isinstance(data, Mapping):
        raise VerificationInputError(f"the result must be a JSON object, got "
                                     f"{type(data).__name__}", field="result")
    try:
        return JobResult.model_validate(dict(data))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "result"
        more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
        return f"the result is malformed: field '{where}': {first['msg']}{more}"


# ------------------------------------------------------------------ spot checks

def _default_key(item: Any) -> str:
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    if isinstance(item, Mapping):
        return str(item["job_id"])
    ident = getattr(item, "job_id", None)
    if ident is None:
        raise TypeError(f"cannot tell the job id of a {type(item).__name__}; pass key=")
    return str(ident)


def spot_check_rank(job_id: str, seed: int | str) -> str:
    """The keyed rank of a job in a spot check: hex SHA-256 of domain, seed and job id."""
    return hashlib.sha256(f"{SPOT_CHECK_DOMAIN}\n{seed}\n{job_id}".encode()).hexdigest()


def spot_check(results: Sequence[T], fraction: float, seed: int | str, *,
               key: Callable[[T], str] | None = None) -> list[T]:
    """Choose which results to verify: ``ceil(fraction * len(results))`` of them, in input order.

    The choice is a pure function of the seed and the job ids (the items with
    the smallest :func:`spot_check_rank`), so anyone with the seed can redo it,
    it does not depend on the order results arrived in, and a miner that does
    not know the seed cannot tell which of its results will be checked. Items
    are :class:`JobResult` / :class:`Job` objects, ``(job, result)`` pairs,
    mappings with ``job_id``, or anything ``key`` maps to a job id.
    """
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    count = min(len(results), math.ceil(fraction * len(results) - 1e-12))
    keyf = key or _default_key
    ranked = sorted(range(len(results)),
                    key=lambda i: (spot_check_rank(keyf(results[i]), seed), i))
    chosen = sorted(ranked[:count])
    return [results[i] for i in chosen]


# ------------------------------------------------------------------ the verifier

class Verifier:
    """Verifies claimed results against a registry, keeping models warm between calls.

    ``device`` is where models run (``cpu`` by default); ``reference_dtype`` the
    precision of ``tolerant``'s forward pass; ``require_weights`` rejects
    results whose profile names other weights (e.g. ``"pretrained"`` to refuse
    random-weight runs). ``engine`` lends its registry, hardware and model pool.
    """

    def __init__(self, registry: Registry | str | Path | None = None, *,
                 pool: ModelPool | None = None, device: str = "cpu",
                 hardware: HardwareInfo | None = None, reference_dtype: str = "float32",
                 require_weights: Literal["pretrained", "random"] | None = None,
                 tolerances: Tolerances | None = None, engine: Engine | None = None):
        if engine is not None:
            registry = registry or engine.registry
            pool = pool or engine.pool
            hardware = hardware or engine.hardware
        self.registry = registry if isinstance(registry, Registry) else Registry.load(registry)
        if pool is None:
            from engine.pool import ModelPool

            pool = ModelPool(show_progress=False)
        self.pool = pool
        self._hardware = hardware
        self.device_id = device
        self.reference_dtype = reference_dtype
        self.require_weights = require_weights
        self.tolerances = tolerances or Tolerances()
        self._lent_engine = engine
        self._engines: dict[tuple[str, str, str], Engine] = {}
        self._digests: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ plumbing
    @property
    def hardware(self) -> HardwareInfo:
        """This machine's devices (discovered on first use)."""
        if self._hardware is None:
            from engine.hardware import discover

            self._hardware = discover()
        return self._hardware

    @property
    def device(self) -> Device:
        """The device models run on."""
        return self.hardware.device(self.device_id)

    def close(self) -> None:
        """Close the engines made for ``exact`` mode."""
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for eng in engines:
            eng.close()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self.registry.get(name)
        except UnknownModelError as exc:
            raise VerificationInputError(
                f"model {name!r} is not in the verifier's registry ({self.registry.path}); "
                "verify with the registry the job was issued under (--registry)",
                field="model") from exc

    def expected_digest(self, spec: ModelSpec, weights: str, dtype: str) -> str:
        """The weight digest a result from ``spec`` must name.

        Pretrained: the digest of the weight files the entry resolves to here.
        Random: the digest of the engine's seeded random build in ``dtype``.
        """
        cache_key = (spec.name, weights, dtype if weights == "random" else "")
        with self._lock:
            known = self._digests.get(cache_key)
        if known is not None:
            return known
        if weights == "random":
            loaded, _ = self.pool.get(spec, [self.device], weights="random", dtype=dtype)
            digest = loaded.weights_digest
        else:
            from engine.loading import availability, weights_digest

            found = availability(spec)
            if not found.available:
                raise VerificationInputError(
                    f"cannot check the weight digest of {spec.name!r}: its weights are not on "
                    f"this machine ({found.reason})", field="model")
            digest = weights_digest(found.files)
        with self._lock:
            self._digests[cache_key] = digest
        return digest

    # ------------------------------------------------------------ entry point
    def verify(self, job: Job | Mapping[str, Any] | str | bytes,
               result: JobResult | Mapping[str, Any] | str | bytes, *,
               mode: Mode = "tolerant") -> Verdict:
        """Verify ``result`` as the outcome of ``job``; see the module docstring for the modes.

        Raises :class:`VerificationInputError` when the inputs cannot be judged
        here (unparseable job, model unknown to the registry, weights absent).
        """
        if mode not in MODES:
            raise VerificationInputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}",
                                         field="mode")
        started = time.perf_counter()
        parsed_job = parse_job(job)
        parsed = parse_result(result)
        details: dict[str, Any] = {}
        check = Findings([])
        if isinstance(parsed, str):
            check.fail(parsed)
        else:
            spec = self._integrity(parsed_job, parsed, check, details)
            if check.ok and spec is not None and mode == "exact":
                self._exact(parsed_job, parsed, check, details)
            elif check.ok and spec is not None and mode == "tolerant":
                self._tolerant(parsed_job, parsed, spec, check, details)
        return Verdict(accepted=check.ok, mode=mode, reasons=check.reasons,
                       first_suspicious_token=check.first,
                       cost_seconds=time.perf_counter() - started, details=details)

    def spot_check(self, pairs: Sequence[tuple[Job, JobResult]], fraction: float,
                   seed: int | str, *, mode: Mode = "tolerant") -> SpotCheckReport:
        """Verify the ``(job, result)`` pairs :func:`spot_check` selects."""
        chosen = spot_check(pairs, fraction, seed)
        verdicts = {job.job_id: self.verify(job, res, mode=mode) for job, res in chosen}
        return SpotCheckReport(seed=seed, fraction=fraction, total=len(pairs),
                               selected=[job.job_id for job, _ in chosen], verdicts=verdicts,
                               rejected=[k for k, v in verdicts.items() if not v.accepted])

    # ------------------------------------------------------------ integrity
    def _integrity(self, job: Job, res: JobResult, check: Findings,
                   details: dict[str, Any]) -> ModelSpec | None:
        """Structure, hash and weight digest; returns the spec when the checks could start."""
        if not res.ok:
            why = f" ({res.error.code}: {res.error.message})" if res.error else ""
            check.fail(f"the result is a failed job{why}, not a completed one")
            return None
        for name in ("job_id", "model", "task"):
            if getattr(res, name) != getattr(job, name):
                check.fail(f"the result's {name} {getattr(res, name)!r} is not the job's "
                           f"{getattr(job, name)!r}")
        want = GenerationOutput if job.task == "text-generation" else EmbeddingOutput
        if not isinstance(res.output, want):
            check.fail(f"a {job.task} result needs a {want.__name__}, got "
                       f"{type(res.output).__name__ if res.output is not None else 'no output'}")
        if res.result_hash is None:
            check.fail("the result has no result_hash")
        profile = res.profile
        if profile is None:
            check.fail("the result has no execution profile, so its weight digest is unknown")
        if not check.ok or profile is None or res.output is None or res.result_hash is None:
            return None
        details["profile"] = profile.model_dump(mode="json")
        if profile.model != job.model:
            check.fail(f"the profile names model {profile.model!r}, not the job's {job.model!r}")
        if profile.hash_version != HASH_VERSION:
            check.fail(f"the profile's hash version {profile.hash_version!r} is not this "
                       f"verifier's {HASH_VERSION!r}")
        recomputed = result_hash(job, res.output, profile.weights_digest)
        details["recomputed_hash"] = recomputed
        if recomputed != res.result_hash:
            check.fail(f"result_hash {res.result_hash} does not recompute from the job and "
                       f"output (expected {recomputed})")
        spec = self._spec(job.model)
        if spec.task != job.task:
            check.fail(f"model {spec.name!r} does the task {spec.task!r}, not {job.task!r}")
            return None
        if profile.weights != job.weights:
            check.fail(f"the job asks for {job.weights} weights; the result was made with "
                       f"{profile.weights} weights")
        elif self.require_weights is not None and profile.weights != self.require_weights:
            check.fail(f"the result was made with {profile.weights} weights; this verifier "
                       f"accepts {self.require_weights} weights only")
        from engine.loading import DTYPE_BYTES

        if profile.dtype not in DTYPE_BYTES:
            check.fail(f"the profile's dtype {profile.dtype!r} is not one of "
                       f"{', '.join(DTYPE_BYTES)}")
        else:
            expected = self.expected_digest(spec, profile.weights, profile.dtype)
            details["expected_weights_digest"] = expected
            if profile.weights_digest != expected:
                what = ("the registry entry's weight files here" if profile.weights == "pretrained"
                        else f"a fresh random build in {profile.dtype}")
                check.fail(f"weights digest {profile.weights_digest} does not name "
                           f"{spec.name!r}: {what} digest to {expected}")
        if isinstance(res.output, GenerationOutput):
            self._generation_shape(job, res, spec, check)
        elif isinstance(res.output, EmbeddingOutput):
            _embedding_shape(job, res.output, spec, check)
        return spec

    def _generation_shape(self, job: Job, res: JobResult, spec: ModelSpec,
                          check: Findings) -> None:
        out = cast(GenerationOutput, res.output)
        n, p = len(out.token_ids), job.params
        if n == 0:
            check.fail("the output holds no tokens; a generation makes at least one")
        if n > p.max_tokens:
            check.fail(f"the output holds {n} tokens, more than max_tokens {p.max_tokens}",
                       p.max_tokens)
        if out.finish_reason == "length" and n != p.max_tokens:
            check.fail(f"finish_reason 'length' needs exactly max_tokens {p.max_tokens} tokens, "
                       f"the output holds {n}", max(n - 1, 0))
        if out.finish_reason == "stop" and not p.stop:
            check.fail("finish_reason 'stop' but the job has no stop strings", max(n - 1, 0))
        # A random build has exactly the registry config's vocabulary; pretrained
        # vocabularies are checked against the loaded model in tolerant mode.
        vocab = (spec.config or {}).get("vocab_size") if res.profile and \
            res.profile.weights == "random" else None
        for i, tok in enumerate(out.token_ids):
            if tok < 0 or (isinstance(vocab, int) and tok >= vocab):
                check.fail(f"token {i} is id {tok}, outside the vocabulary", i)
                break
        if res.metrics is not None and res.metrics.completion_tokens != n:
            check.fail(f"metrics.completion_tokens {res.metrics.completion_tokens} is not the "
                       f"{n} tokens of the output")

    # ------------------------------------------------------------ exact
    def _engine_for(self, profile: ExecutionProfile) -> Engine:
        from engine.executor import Engine
        from engine.loading import NATIVE

        # "auto" takes the path auto took for the result, but for a native result decoded
        # with the model's own operators (decode "dynamic"), which auto takes with the fused step.
        decode: Decode = ("dynamic" if profile.dtype == NATIVE and profile.decode == "dynamic-cache"
                          else "auto")
        key = (profile.weights, profile.dtype, decode)
        lent = self._lent_engine
        if (lent is not None and lent.weights == profile.weights and lent.batch_size == 1
                and lent.dtype == profile.dtype and lent.decode == decode):
            return lent
        with self._lock:
            eng = self._engines.get(key)
            if eng is None:
                # Unbatched: an exact re-run must not share a step with other re-runs.
                eng = Engine(self.registry, hardware=self.hardware, devices=[self.device_id],
                             pool=self.pool, weights=profile.weights, dtype=profile.dtype,
                             batch_size=1, decode=decode)
                self._engines[key] = eng
        return eng

    def _exact(self, job: Job, res: JobResult, check: Findings, details: dict[str, Any]) -> None:
        profile = res.profile
        assert profile is not None and res.output is not None
        engine = self._engine_for(profile)
        rerun = engine.run(job)
        if not rerun.ok:
            assert rerun.error is not None
            if rerun.error.code in _JOB_FAULT_CODES:
                check.fail(f"the job cannot run, so no result of it is valid: "
                           f"{rerun.error.code}: {rerun.error.message}")
                return
            raise VerificationInputError(f"the re-run failed here: {rerun.error.code}: "
                                         f"{rerun.error.message}")
        assert rerun.profile is not None and rerun.metrics is not None
        details["rerun_hash"] = rerun.result_hash
        details["rerun_seconds"] = rerun.metrics.execution_time_seconds
        details["load_seconds"] = rerun.metrics.load_time_seconds
        if rerun.result_hash == res.result_hash:
            return
        first: int | None = None
        if isinstance(res.output, GenerationOutput) and isinstance(rerun.output, GenerationOutput):
            a, b = res.output.token_ids, rerun.output.token_ids
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                         min(len(a), len(b)) if len(a) != len(b) else None)
        differs = [f"{name}: {getattr(profile, name)!r} there, {getattr(rerun.profile, name)!r} "
                   "here"
                   for name in ("device_class", "dtype", "decode", "batched", "torch_version",
                                "transformers_version", "linear_kernel", "kernel_isa",
                                "kernel_flags")
                   if getattr(profile, name) != getattr(rerun.profile, name)]
        note = ("; the profiles differ (" + ", ".join(differs) + "), so bitwise equality is not "
                "expected: use mode tolerant") if differs else ""
        check.fail(f"the re-run under the recorded profile gives {rerun.result_hash}, not "
                   f"{res.result_hash}{note}", first)

    # ------------------------------------------------------------ tolerant
    def _tolerant(self, job: Job, res: JobResult, spec: ModelSpec, check: Findings,
                  details: dict[str, Any]) -> None:
        profile = res.profile
        assert profile is not None
        with self.pool.use(spec, [self.device], weights=profile.weights,
                           dtype=self.reference_dtype) as (loaded, load_seconds):
            details["load_seconds"] = load_seconds
            details["reference_dtype"] = loaded.dtype_name
            with loaded.lock:
                if isinstance(res.output, GenerationOutput):
                    self._tolerant_generation(loaded, job, res, check, details)
                elif isinstance(res.output, EmbeddingOutput):
                    self._tolerant_embedding(loaded, job, res.output, check, details)

    def _tolerant_embedding(self, loaded: LoadedModel, job: Job, out: EmbeddingOutput,
                            check: Findings, details: dict[str, Any]) -> None:
        import torch

        from engine.tasks.embedding import embed

        # float64: the floor sits within ~1e-4 of 1, so the cosine needs more than float32 digits.
        mine = torch.tensor(embed(loaded, job).embeddings, dtype=torch.float64)
        claimed = torch.tensor(out.embeddings, dtype=torch.float64)
        cos = torch.nn.functional.cosine_similarity(mine, claimed, dim=1, eps=1e-30)
        floor = self.tolerances.embedding_min_cosine
        details["cosine_min"] = float(cos.min()) if cos.numel() else 1.0
        details["embedding_min_cosine"] = floor
        for i, c in enumerate(cos.tolist()):
            if not c >= floor:
                check.fail(f"vector {i} has cosine similarity {c:.6f} to the recomputed one "
                           f"(distance 1 - cos = {1 - c:.3g}), under the floor {floor}")
                break

    def _check_commitment(self, claimed: str | None, hidden: torch.Tensor, dtype: str,
                          check: Findings, details: dict[str, Any]) -> None:
        """The claimed activation commitment against the recomputed last hidden states, with
        the thresholds for the claimed dtype (``engine.commitment.BY_DTYPE``) unless the
        tolerances set them."""
        from engine.commitment import compare, thresholds_for

        thresholds = self.tolerances.commitment or thresholds_for(dtype)
        found = compare(claimed, hidden, thresholds)
        details.update(found.to_details())
        details["commitment_thresholds"] = thresholds.to_dict()
        if not found.passed:
            check.fail(found.reason or "the activation commitment does not match",
                       found.first_failing)

    def _tolerant_generation(self, loaded: LoadedModel, job: Job, res: JobResult,
                             check: Findings, details: dict[str, Any]) -> None:
        import torch

        from engine.errors import ContextLengthError
        from engine.tasks.generation import encode_prompt

        out = cast(GenerationOutput, res.output)
        try:
            prompt_ids = encode_prompt(loaded, job)
        except (InvalidJobError, ContextLengthError) as exc:
            check.fail(f"the job cannot run, so no result of it is valid: {exc.message}")
            return
        tokens = list(out.token_ids)
        vocab = int(loaded.model.config.vocab_size)
        bad = next((i for i, t in enumerate(tokens) if t >= vocab), None)
        if bad is not None:
            check.fail(f"token {bad} is id {tokens[bad]}, outside the model's vocabulary of "
                       f"{vocab}", bad)
            return
        details["prompt_tokens"] = len(prompt_ids)
        details["tokens_checked"] = len(tokens)
        check_stop_rule(tokens, out.finish_reason, out.text, job.params, loaded.tokenizer,
                        loaded.eos_token_ids(), check)
        if not tokens:
            size = int(getattr(loaded.model.config, "hidden_size", 1))
            self._check_commitment(out.commitment, torch.zeros((0, size)),
                                   res.profile.dtype if res.profile else "", check, details)
            return
        t0 = time.perf_counter()
        logits, hidden = teacher_forced_pass(loaded, prompt_ids, tokens)
        details["forward_seconds"] = time.perf_counter() - t0
        self._check_tokens(job, prompt_ids, tokens, logits,
                           res.profile.dtype if res.profile else "", check, details)
        self._check_commitment(out.commitment, hidden, res.profile.dtype if res.profile else "",
                               check, details)

    def _check_tokens(self, job: Job, prompt_ids: list[int], tokens: list[int],
                      logits: torch.Tensor, dtype: str, check: Findings,
                      details: dict[str, Any]) -> None:
        """The claimed tokens against the teacher-forced logits (greedy margin, or sampled)."""
        import torch

        logits = apply_repetition_penalty(logits, prompt_ids, tokens,
                                          job.params.repetition_penalty)
        tol = self.tolerances
        std = logits.std(dim=-1)
        margins = torch.clamp(std * tol.margin_sigma, min=tol.margin_floor)
        target = torch.tensor(tokens, dtype=torch.long)
        claimed = logits.gather(1, target[:, None])[:, 0]
        gaps = logits.max(dim=-1).values - claimed
        norm_gaps = gaps / std.clamp(min=1e-12)
        details["max_logit_gap"] = float(gaps.max())
        details["max_normalized_gap"] = float(norm_gaps.max())
        details["margin_sigma"] = tol.margin_sigma
        if job.params.greedy:
            flips = torch.nonzero((gaps > tol.tie_logits) & (gaps <= margins)).flatten().tolist()
            allowed = tol.allowed_flips(dtype, len(tokens))
            details["near_ties"] = len(flips)
            details["near_ties_allowed"] = allowed
            for i in torch.nonzero(gaps > margins).flatten().tolist():
                check.fail(f"token {i} (id {tokens[i]}) is not the argmax: its logit is "
                           f"{float(gaps[i]):.4g} under the best (margin {float(margins[i]):.4g},"
                           f" {float(norm_gaps[i]):.2f} standard deviations)", i)
                return
            if len(flips) > allowed:
                i = flips[allowed]
                check.fail(f"{len(flips)} of the {len(tokens)} tokens are not the argmax (each "
                           f"within the margin); an honest {dtype} run departs from it at most "
                           f"{allowed} time(s) in {len(tokens)} tokens, so the claim looks "
                           f"sampled or steered (token {i} is the first one past that)", i)
            return
        self._check_sampled(job, tokens, logits, check, details)

    def _check_sampled(self, job: Job, tokens: list[int], logits: torch.Tensor,
                       check: Findings, details: dict[str, Any]) -> None:
        """Replay the seeded race of :mod:`engine.sampling` for every claimed token.

        The replay always runs: the draws depend only on the job's effective seed
        and the step, so no profile field (torch version, device) or caller can
        turn it off. A cheap early reject first: the token must lie in the job's
        top-k/top-p set widened by the greedy margin (how far a logit can move).
        """
        import torch

        from engine.hashing import effective_seed
        from engine.sampling import SAMPLING_RULE, exponential_draws, seeded_generator

        p, tol = job.params, self.tolerances
        seed = effective_seed(job)
        details["seeded_replay"] = True
        details["sampling_rule"] = SAMPLING_RULE
        details["replay_margin_sigma"] = tol.replay_margin_sigma
        if seed is None:  # effective_seed derives one for every sampled job
            check.fail("the sampled claim cannot be replayed: the job has no effective seed", 0)
            return
        generator = seeded_generator(seed)
        vocab = logits.shape[-1]
        std = logits.std(dim=-1)
        margins = torch.clamp(std * tol.replay_margin_sigma, min=tol.margin_floor)
        # The set's edge moves with each token's logit, as far as a greedy flip can reach.
        set_margins = torch.clamp(std * tol.margin_sigma, min=tol.margin_floor)
        worst, min_prob = 0.0, 1.0
        for i, tok in enumerate(tokens):
            z = logits[i] / p.temperature
            m = float(margins[i]) / p.temperature
            # Every step draws V words, as the engine does, whatever the set kept.
            q = exponential_draws(generator, vocab)
            sure, possible = sampling_sets(z, p, float(set_margins[i]) / p.temperature)
            if not bool(possible[tok]):
                check.fail(f"token {i} (id {tok}) lies outside the job's top-k/top-p set "
                           f"(top_k {p.top_k}, top_p {p.top_p}, temperature {p.temperature})", i)
                break
            # Reported, never a rule: how likely the claimed token was.
            probs = z.masked_fill(~possible, float("-inf")).softmax(-1)
            min_prob = min(min_prob, float(probs[tok]))
            # argmax(p / q) over the set is argmax(z - log q): the replayed race.
            scores = z.to(torch.float64) - q.log()
            raced = scores.masked_fill(~sure, float("-inf"))
            winner = int(torch.argmax(raced))
            gap = float(raced[winner]) - float(scores[tok])
            worst = max(worst, gap / max(m, 1e-12))
            if gap > m:
                check.fail(f"token {i} (id {tok}) is not the seeded draw: the replayed race "
                           f"({SAMPLING_RULE}, seed {seed}) picks id {winner}, and the claimed "
                           f"token's score is {gap:.4g} under it (margin {m:.4g})", i)
                break
        details["max_replay_gap_in_margins"] = worst
        details["min_token_probability"] = min_prob

    def __repr__(self) -> str:
        return (f"Verifier(registry={self.registry.path}, device={self.device_id!r}, "
                f"reference_dtype={self.reference_dtype!r})")


# ------------------------------------------------------------------ pieces (public for tests)

def _embedding_shape(job: Job, out: EmbeddingOutput, spec: ModelSpec, check: Findings) -> None:
    count = len(job.input or [])
    if len(out.embeddings) != count:
        check.fail(f"the output holds {len(out.embeddings)} vectors for {count} inputs")
    for i, vec in enumerate(out.embeddings):
        if len(vec) != out.dimensions:
            check.fail(f"vector {i} has {len(vec)} values, not the stated {out.dimensions}")
            return
        if not all(math.isfinite(x) for x in vec):
            check.fail(f"vector {i} holds a value that is not finite")
            return
        if spec.normalize:
            norm = math.sqrt(sum(x * x for x in vec))
            if abs(norm - 1.0) > 1e-3:
                check.fail(f"vector {i} has norm {norm:.4f}; {spec.name} vectors are "
                           "L2-normalised")
                return


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def _stop_cut(text: str, stops: Sequence[str]) -> int:
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def check_stop_rule(tokens: Sequence[int], finish_reason: str, text: str,
                    params: GenerationParams, tokenizer: Any, eos: set[int],
                    check: Findings) -> None:
    """The engine's stop rule and text, replayed over the claimed tokens.

    Generation ends after the first token that is an EOS id or completes a stop
    string (the stop string wins: ``finish_reason`` is then ``stop``), or at
    ``max_tokens`` tokens; the text is the decoding of the tokens, cut before the
    first stop string when the reason is ``stop``.
    """
    n = len(tokens)
    ended: tuple[int, str, str | None] | None = None
    for t in range(1, n + 1):
        reason: str | None = "eos" if tokens[t - 1] in eos else None
        cut_text: str | None = None
        if params.stop:
            decoded = _decode(tokenizer, tokens[:t])
            cut = _stop_cut(decoded, params.stop)
            if cut >= 0:
                reason, cut_text = "stop", decoded[:cut]
        if reason is None and t >= params.max_tokens:
            reason = "length"
        if reason is not None:
            ended = (t, reason, cut_text)
            break
    if n == 0:
        return
    if ended is None:
        check.fail(f"the output stops after {n} tokens with no EOS, no stop string and fewer "
                   f"than max_tokens {params.max_tokens} tokens (truncated?)", n - 1)
        return
    t, reason, cut_text = ended
    if t < n:
        check.fail(f"generation ends at token {t - 1} ({reason}) but the output goes on for "
                   f"{n - t} more token(s)", t)
        return
    if reason != finish_reason:
        check.fail(f"finish_reason is {finish_reason!r} but the tokens end by {reason!r}", n - 1)
    expected = cut_text if cut_text is not None else _decode(tokenizer, tokens)
    if text != expected:
        where = next((i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
                     min(len(text), len(expected)))
        check.fail(f"the text is not the decoding of the tokens (they first differ at "
                   f"character {where})")


def teacher_forced_logits(loaded: LoadedModel, prompt_ids: Sequence[int],
                          tokens: Sequence[int]) -> torch.Tensor:
    """Float32 logits predicting each claimed token, from one forward pass (``(n, vocab)``)."""
    return teacher_forced_pass(loaded, prompt_ids, tokens)[0]


def teacher_forced_pass(loaded: LoadedModel, prompt_ids: Sequence[int],
                        tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over the prompt and the claimed tokens: float32 logits predicting
    each token (``(n, vocab)``) and the last hidden states that produced them (``(n, d)``,
    the rows an activation commitment is checked against), both on the CPU."""
    from engine.commitment import teacher_forced

    hidden, logits = teacher_forced(loaded, prompt_ids, tokens, logits_rows=len(tokens))
    return logits.float().to("cpu"), hidden.float().to("cpu")


def apply_repetition_penalty(logits: torch.Tensor, prompt_ids: Sequence[int],
                             tokens: Sequence[int], penalty: float) -> torch.Tensor:
    """The engine's repetition penalty on each row: ids of the prompt and of earlier tokens."""
    import torch

    if penalty == 1.0:
        return logits
    n, vocab = logits.shape
    seen = torch.zeros((n, vocab), dtype=torch.bool)
    seen[:, torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)] = True
    first: dict[int, int] = {}
    for i, tok in enumerate(tokens):
        first.setdefault(tok, i)
    for tok, i in first.items():
        seen[i + 1:, tok] = True
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sampling_sets(z: torch.Tensor, params: GenerationParams, margin: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens surely inside, and possibly inside, the job's top-k/top-p set.

    ``z`` is one row of tempered logits; ``margin`` (in the same units) is how
    far another profile's logits may be from these. "Possibly" widens the set
    by the margin, "surely" narrows it; the most likely token is always in both.
    """
    import torch

    vocab = z.numel()
    sure = torch.ones(vocab, dtype=torch.bool)
    possible = torch.ones(vocab, dtype=torch.bool)
    masked = z
    if 0 < params.top_k < vocab:
        kth = float(torch.topk(z, params.top_k).values[-1])
        sure &= z >= kth + margin
        possible &= z >= kth - margin
        masked = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = masked.softmax(-1)
        order = torch.argsort(probs, descending=True)
        sorted_probs = probs[order]
        above = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass strictly before each
        mass_above = torch.empty_like(above).scatter_(0, order, above)
        # Logits moved by up to ``margin`` scale any mass ratio by up to exp(2 * margin).
        slack = min(1.0, params.top_p * (math.exp(2 * margin) - 1.0)) + 1e-6
        sure &= mass_above < params.top_p - slack
        possible &= mass_above < params.top_p + slack
    top = int(torch.argmax(z))
    sure[top] = True
    possible[top] = True
    return sure, possible


# ------------------------------------------------------------------ one-shot function

def verify(job: Job | Mapping[str, Any] | str | bytes,
           result: JobResult | Mapping[str, Any] | str | bytes, *, mode: Mode = "tolerant",
           registry: Registry | str | Path | None = None, engine: Engine | None = None,
           pool: ModelPool | None = None, device: str = "cpu",
           reference_dtype: str = "float32",
           require_weights: Literal["pretrained", "random"] | None = None,
           tolerances: Tolerances | None = None) -> Verdict:
    """Verify one result (see :class:`Verifier`; keep a Verifier to verify many)."""
    with Verifier(registry, pool=pool, device=device, reference_dtype=reference_dtype,
                  require_weights=require_weights, tolerances=tolerances,
                  engine=engine) as verifier:
        return verifier.verify(job, result, mode=mode)
