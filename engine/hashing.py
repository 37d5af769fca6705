"""Canonical encoding of a job and its output, and the ``sha256:`` result hash.

Pure functions, no torch. The encoding (version ``aitbc-result/2``) is
specified in the README so that anyone can recompute a hash with ``hashlib``
and ``json`` alone:

* the canonical bytes are the UTF-8 JSON of one object, keys sorted at every
  level, separators ``,`` and ``:``, non-ASCII characters written as
  themselves, floats as Python's ``json`` writes them (shortest round-trip
  form, ``0.0`` not ``0``);
* the object holds ``encoding``, ``model``, ``weights_digest``, ``task``,
  ``input_sha256`` (hex SHA-256 of the canonical JSON of the job's input, see
  :func:`input_document`), ``params`` (the normalised decoding parameters) and
  ``output``;
* ``output`` of a generation is ``{"commitment", "finish_reason", "text", "token_ids"}``
  (``commitment``: the activation commitment string of :mod:`engine.commitment`, ``null``
  when the output has none); of
  an embedding, ``{"count", "dimensions", "vectors_sha256"}`` where the digest
  is over the float32 little-endian bytes of every vector, in input order;
* ``result_hash = "sha256:" + sha256(canonical bytes).hexdigest()``.

Version 2 added ``commitment`` to a generation's output; a version 1 result does not
recompute under version 2, and verifiers refuse it by its profile's hash version.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from engine.jobs import EmbeddingOutput, GenerationOutput, Job

HASH_VERSION = "aitbc-result/2"
_SEED_DOMAIN = b"aitbc-seed/1\n"


def canonical_json(value: Any) -> bytes:
    """The canonical UTF-8 JSON bytes of ``value`` (sorted keys, no spaces, no NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def input_document(job: Job) -> dict[str, Any]:
    """The job's input as the object whose canonical JSON is hashed into ``input_sha256``.

    ``{"input": [...]}`` for an embedding job; for text generation the one input
    the job has, ``{"prompt": str}``, ``{"prompt_token_ids": [int, ...]}`` or
    ``{"messages": [{"content": str, "role": str}, ...]}``, plus ``"system": str``
    only when the job has a system prompt. A job without ``messages`` or
    ``system`` has no ``messages`` or ``system`` key in its input document.
    """
    if job.task == "embedding":
        return {"input": list(job.input or [])}
    doc: dict[str, Any]
    if job.prompt_token_ids is not None:
        doc = {"prompt_token_ids": list(job.prompt_token_ids)}
    elif job.messages is not None:
        doc = {"messages": [{"content": m.content, "role": m.role} for m in job.messages]}
    else:
        doc = {"prompt": job.prompt}
    if job.system is not None:
        doc["system"] = job.system
    return doc


def input_digest(job: Job) -> str:
    """Hex SHA-256 of the canonical JSON of the job's input."""
    return sha256_hex(canonical_json(input_document(job)))


def effective_seed(job: Job) -> int | None:
    """The seed a sampled job decodes with: its own, or one derived from model and input.

    Greedy jobs have none (``None``): their tokens do not depend on a seed.
    """
    if job.params.greedy:
        return None
    if job.params.seed is not None:
        return job.params.seed
    digest = hashlib.sha256(_SEED_DOMAIN + job.model.encode() + b"\n"
                            + input_digest(job).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def normalized_params(job: Job) -> dict[str, Any]:
    """The decoding parameters as hashed: parameters without effect on greedy jobs are reset."""
    if job.task == "embedding":
        return {}
    p = job.params
    greedy = p.greedy
    return {
        "max_tokens": p.max_tokens,
        "temperature": float(p.temperature),
        "top_p": 1.0 if greedy else float(p.top_p),
        "top_k": 0 if greedy else p.top_k,
        "repetition_penalty": float(p.repetition_penalty),
        "seed": effective_seed(job),
        "stop": list(p.stop),
    }


def float32_le_bytes(vectors: list[list[float]]) -> bytes:
    """All vectors as consecutive float32 little-endian values."""
    flat = [x for vec in vectors for x in vec]
    return struct.pack(f"<{len(flat)}f", *flat)


def output_document(output: GenerationOutput | EmbeddingOutput) -> dict[str, Any]:
    """The output as it enters the canonical document."""
    if isinstance(output, GenerationOutput):
        return {"commitment": output.commitment, "finish_reason": output.finish_reason,
                "text": output.text, "token_ids": list(output.token_ids)}
    return {"count": len(output.embeddings), "dimensions": output.dimensions,
            "vectors_sha256": sha256_hex(float32_le_bytes(output.embeddings))}


def canonical_document(job: Job, output: GenerationOutput | EmbeddingOutput,
                       weights_digest: str) -> dict[str, Any]:
    """The object whose canonical JSON is the result hash's preimage."""
    return {
        "encoding": HASH_VERSION,
        "model": job.model,
        "weights_digest": weights_digest,
        "task": job.task,
        "input_sha256": input_digest(job),
        "params": normalized_params(job),
        "output": output_document(output),
    }


def canonical_bytes(job: Job, output: GenerationOutput | EmbeddingOutput,
                    weights_digest: str) -> bytes:
    """The canonical bytes of a job and its output."""
    return canonical_json(canonical_document(job, output, weights_digest))


def result_hash(job: Job, output: GenerationOutput | EmbeddingOutput, weights_digest: str) -> str:
    """``"sha256:" + sha256(canonical bytes).hexdigest()``."""
    return "sha256:" + sha256_hex(canonical_bytes(job, output, weights_digest))
