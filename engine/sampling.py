"""The one token-choice rule, for every decode path and for the verifier (DESIGN.md "Sampling").

A job's next token is chosen from its logits row in float32:

1. the repetition penalty divides (positive) or multiplies (negative) the
   logits of every id already seen (prompt and generated);
2. greedy jobs (temperature 0) take the argmax;
3. sampled jobs divide by the temperature, keep the top-k logits and the
   smallest top-p nucleus, and take the probabilities ``p`` of what is left
   (float32 softmax on the CPU, 0 outside the set); the token is
   ``argmax(p / q)`` in float64, the lowest id on a tie, where ``q`` holds
   one ``Exp(1)`` draw per vocabulary entry from the job's draw stream below.

Step 3 is the exponential race: it samples exactly from ``p``, and the draw
for step ``k`` depends only on the job's seed, ``k`` and ``p`` -- never on the
device, the decode path, the batch mates, any global RNG or a library's
version.

The draw stream (rule ``philox4x64-10/exp``), exact enough to reimplement
without numpy:

* **Generator**: Philox4x64-10 (Salmon et al., SC11, "Parallel Random
  Numbers: As Easy as 1, 2, 3"): a 256-bit counter ``(c0, c1, c2, c3)``
  enciphered under a 128-bit key ``(k0, k1)`` by ten rounds, each
  ``(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))`` with
  ``M0 = 0xD2E7470EE14C6C93``, ``M1 = 0xCA5A826395121157`` (128-bit products
  split into 64-bit halves), the key bumped by ``(0x9E3779B97F4A7C15,
  0xBB67AE8584CAA73B)`` (mod 2**64) before every round but the first.
* **Key**: ``k0`` = the job's effective seed
  (:func:`engine.hashing.effective_seed`, an integer in ``[0, 2**63)``),
  ``k1 = 0``.
* **Counter**: block ``b = 0, 1, 2, ...`` enciphers the counter ``b + 1``
  (``c0 = b + 1``, the other words 0) and yields its four output words in
  order, so raw word ``n`` of the stream is output word ``n mod 4`` of
  block ``n // 4``. This is numpy's ``np.random.Philox(key=seed)`` (counter
  0, incremented before each block) read with ``random_raw``.
* **Consumption**: step ``k`` (0 for the first generated token) of a job
  with vocabulary size ``V`` takes raw words ``k*V`` to ``k*V + V - 1``;
  word ``k*V + i`` belongs to token id ``i``. Every sampled step takes
  exactly ``V`` words, whatever the set kept.
* **Draw**: each raw 64-bit word ``r`` gives ``u = ((r >> 12) + 0.5) * 2**-52``
  and ``q = -log(u)`` in float64. ``u`` is exact in float64 (``r >> 12`` has
  52 bits, so adding 0.5 needs 53) and lies in ``[2**-53, 1 - 2**-53]``,
  strictly inside (0, 1), so ``q`` is finite and positive. (With ``r >> 11``
  and ``2**-53`` the sum would need 54 bits and round to ``u = 1``, ``q = 0``.)
  ``log`` is float64's natural logarithm; libraries may differ in its last
  bit, which can only change a race whose two best scores tie to ~1e-16.

The rule is these words, not a library: Philox4x64-10 with an explicit key
and counter is a published integer function, so its output cannot drift with
a version (numpy's compatibility policy, NEP 19, lets ``Generator`` methods
change their algorithms, but a bit generator's raw words are its definition).
numpy's ``Philox`` is only a fast implementation of it;
``tests/test_verify_rules.py`` checks it against a direct pure-Python
reimplementation of the words above.

Every chosen row is checked to be finite first: NaN or infinite logits (fp16
overflow) raise :class:`~engine.errors.NumericalOverflowError` instead of
quietly picking a token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.errors import NumericalOverflowError
from engine.jobs import GenerationParams

SAMPLING_RULE = "philox4x64-10/exp"
"""The name of the draw stream described in the module docstring."""

_SHIFT = np.uint64(12)
_SCALE = 2.0 ** -52


def seeded_generator(seed: int) -> np.random.Philox:
    """The draw stream of a sampled job: Philox4x64-10 keyed ``(seed, 0)``, counter 0."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"a sampling seed is a 64-bit unsigned integer, got {seed}")
    return np.random.Philox(key=seed)


def uniforms(raw: np.ndarray) -> np.ndarray:
    """Raw 64-bit words to ``u = ((r >> 12) + 0.5) * 2**-52``, exact, strictly inside (0, 1)."""
    u = (raw >> _SHIFT).astype(np.float64)
    u += 0.5
    u *= _SCALE
    return u


def exponential_draws(generator: np.random.Philox, vocab: int) -> torch.Tensor:
    """One step's ``Exp(1)`` draws ``q = -log(u)``, one per vocabulary entry (float64, CPU).

    Takes exactly ``vocab`` raw words from ``generator``.
    """
    q = uniforms(generator.random_raw(vocab))
    np.log(q, out=q)
    np.negative(q, out=q)
    return torch.from_numpy(q)


def race(probs: torch.Tensor, q: torch.Tensor) -> int:
    """The exponential race: ``argmax(p / q)`` in float64 (lowest id on a tie)."""
    return int(torch.argmax(probs.to(torch.float64) / q).item())


def nucleus_logits(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Tempered logits with everything outside the top-k and top-p set at ``-inf`` (CPU)."""
    z = logits.to("cpu", torch.float32) / params.temperature
    if 0 < params.top_k < z.numel():
        kth = torch.topk(z, params.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=False)
        cumulative = sorted_z.softmax(-1).cumsum(-1)
        drop = cumulative <= (1.0 - params.top_p)
        drop[-1] = False  # the most likely token always stays
        z = z.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return z


class Sampler:
    """Chooses one job's tokens, step after step, by the module's rule.

    ``where`` names the dtype and device for the overflow message
    (``"float16 on cuda:0"``).
    """

    def __init__(self, params: GenerationParams, seed: int | None,
                 prompt_ids: Sequence[int], *, where: str = ""):
        self.params = params
        self.where = where
        self._generator = seeded_generator(seed) if seed is not None and not params.greedy \
            else None
        self._seen: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)
        self.steps = 0

    def choose(self, logits: torch.Tensor) -> int:
        """The next token for a 1-D logits row (any device, any float dtype)."""
        row = logits.float()
        if self._seen is not None and self._seen.numel():
            seen = self._seen.to(row.device)
            scores = row.gather(0, seen)
            penalty = self.params.repetition_penalty
            row = row.scatter(0, seen, torch.where(scores < 0, scores * penalty,
                                                   scores / penalty))
        if self.params.greedy:
            # One transfer for both the choice and the finite check.
            best, finite = torch.stack([torch.argmax(row), torch.isfinite(row).all().long()]
                                       ).tolist()
            token = int(best)
        else:
            cpu_row = row.to("cpu")
            finite = bool(torch.isfinite(cpu_row).all())
            token = self._draw(cpu_row) if finite else 0
        if not finite:
            raise NumericalOverflowError(
                f"the model's logits at step {self.steps} are not finite (NaN or infinite) in "
                f"{self.where or 'this dtype'}: the dtype cannot hold the model's activations. "
                "Run the model in float32 or bfloat16 (--dtype), or fix the registry's "
                "precision policy for it.", field="model")
        self.steps += 1
        if self._seen is not None:
            self._seen = torch.cat([self._seen, torch.tensor([token], dtype=torch.long)])
        return token

    def _draw(self, row: torch.Tensor) -> int:
        probs = nucleus_logits(row, self.params).softmax(-1)
        if self._generator is None:  # sampled without a seed cannot happen: seeds are derived
            raise ValueError("a sampled job needs a seed")
        return race(probs, exponential_draws(self._generator, probs.numel()))
