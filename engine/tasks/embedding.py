"""Sentence embeddings: mean-pooled (or CLS), L2-normalised float32 vectors.

all-MiniLM-L6-v2's card prescribes mean pooling over the attention mask
followed by L2 normalisation; the registry entry says which pooling an
embedding model uses and whether to normalise.
"""

from __future__ import annotations

import torch

from engine.errors import ContextLengthError, InvalidJobError
from engine.jobs import EmbeddingOutput, Job
from engine.loading import LoadedModel


def count_tokens(loaded: LoadedModel, job: Job) -> list[int]:
    """Token count of each input, checked against the model's context length."""
    texts = job.input or []
    try:
        encoded = loaded.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lengths = [len(ids) for ids in encoded]
    except Exception as exc:
        raise InvalidJobError(f"the tokenizer could not encode the input: {exc}",
                              field="input") from exc
    limit = loaded.spec.context_length
    for i, n in enumerate(lengths):
        if n > limit:
            raise ContextLengthError(f"input[{i}] is {n} tokens; {loaded.spec.name} embeds at "
                                     f"most {limit} tokens per text", field=f"input.{i}")
    return lengths


def embed(loaded: LoadedModel, job: Job) -> EmbeddingOutput:
    """Embed every input text of ``job``; one vector per text, in order."""
    texts = job.input or []
    batch = loaded.tokenizer(texts, padding=True, truncation=False, return_tensors="pt")
    batch = {k: v.to(loaded.input_device) for k, v in batch.items()}
    with torch.inference_mode():
        hidden = loaded.model(**batch).last_hidden_state.float()
    if loaded.spec.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if loaded.spec.normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
    vectors = pooled.to("cpu", torch.float32)
    return EmbeddingOutput(embeddings=vectors.tolist(), dimensions=int(vectors.shape[1]))
