"""The one token-choice rule, for every decode path and for the verifier (DESIGN.md "Sampling").

A job's next token is chosen from its logits row in float32:

1. the repetition penalty divides (positive) or multiplies (negative) the
   logits of every id already seen (prompt and generated);
2. greedy jobs (temperature 0) take the argmax;
3. sampled jobs divide by the temperature, keep the top-k logits and the
   smallest top-p nucleus, and take the probabilities ``p`` of what is left,
   on the CPU; then ``q`` holds one ``Exp(1)`` draw per vocabulary entry from
   the job's own CPU generator, seeded with the job's effective seed
   (:func:`engine.hashing.effective_seed`) and advanced by exactly one
   vocabulary-sized draw per step, and the token is ``argmax(p / q)``.

Step 3 is the exponential race: it samples exactly from ``p``, and the draw
for step ``k`` depends only on the seed, ``k`` and ``p`` — never on the
device, the decode path, the batch mates or any global RNG. It is also what
``torch.multinomial(p, 1, generator)`` computes on the CPU, so results from
before this module keep their hashes.

Every chosen row is checked to be finite first: NaN or infinite logits (fp16
overflow) raise :class:`~engine.errors.NumericalOverflowError` instead of
quietly picking a token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.errors import NumericalOverflowError
from engine.jobs import GenerationParams


def seeded_generator(seed: int) -> torch.Generator:
    """The CPU generator a sampled job draws from."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator


def exponential_draws(generator: torch.Generator, vocab: int) -> torch.Tensor:
    """One step's ``Exp(1)`` draws, one per vocabulary entry (float32, CPU)."""
    return torch.empty(vocab, dtype=torch.float32).exponential_(1, generator=generator)


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
        q = exponential_draws(self._generator, probs.numel())
        return int(torch.argmax(probs / q).item())
