"""A tiny LLaMA (and a tiny GPT-2) written as GGUF files here, in any mix of tensor formats.

:func:`make_tiny_llama_gguf` writes a 2-layer LLaMA (hidden 256, intermediate 512, 4 heads,
2 KV heads of 64, a few hundred tokens of byte-level BPE vocabulary) with the ``gguf``
package's writer, laid out as llama.cpp writes one: its tensor names, its rotary row order
for ``attn_q``/``attn_k``, its tokenizer fields. Each weight matrix is stored in the
format ``formats`` names for it: float formats and the formats the ``gguf`` package can
quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) quantize seeded normal weights; the K-quants (no
numpy quantizer) get seeded random blocks whose half-float scales keep the weights small
(a standard deviation of about 0.02 to 0.05), so generation stays numerically sane.

:func:`make_tiny_gpt2_gguf` writes a 2-layer GPT-2 GGUF (float32) with the same
tokenizer: a GGUF model that is not a LLaMA, which the ``native`` dtype does not map.

Both load in transformers (``from_pretrained(dir, gguf_file=name)``) in a fraction of a second.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# GGML type ids (the GGUF tensor-info field).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q4_K, Q5_K, Q6_K = 12, 13, 14
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0",
              Q5_1: "Q5_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
# The formats engine/kernels/blocks.py computes on (the rest are de-quantized to float32).
BLOCK_FORMATS = (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)

# The true sizes of the tiny LLaMA (K-quants need rows of a multiple of 256 weights).
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CONTEXT = 256
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = EOS_ID
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A miner runs jobs on its CPU and hands back "
    "a result hash that anyone can recompute. Hello GPU, hello network, hello world. "
    "Paris is the capital of France. Berlin is the capital of Germany. Numbers: 0 1 2 3 4 5 6 7 "
    "8 9 10 100 1000. The engine computes on quantized blocks of the weights, in place. "
)
VOCAB_TARGET = 384

# Every role of a LLaMA tensor the default mix gives a format, with its [rows, columns].
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# The default mix: the five block formats, F16, and two quants the block kernel has no
# format for (Q5_0 through the gguf package's quantizer, Q5_K as random blocks). A key is a
# tensor role (``attn_q``), or a tensor's name without ``.weight`` (``blk.1.ffn_up``), which
# wins over its role.
DEFAULT_FORMATS: dict[str, int] = {
    "token_embd": Q4_K,      # the block row lookup, and the tied head on a K-quant
    "output": Q6_K,          # the untied head
    "attn_q": Q4_0,
    "attn_k": Q4_1,
    "attn_v": Q5_0,          # de-quantized by the reference, computed in float32
    "attn_output": Q8_0,
    "ffn_gate": Q4_K,
    "ffn_up": F16,
    "blk.1.ffn_up": Q5_K,    # de-quantized by the reference, computed in float32
    "ffn_down": Q6_K,
}
# Formats with no numpy quantizer in the gguf package: random blocks with chosen scales.
_RANDOM_BLOCK_FORMATS = (Q4_K, Q5_K, Q6_K)
_BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}
QK_K = 256


def tensor_format(name: str, formats: Mapping[str, int]) -> int:
    """The GGML type ``formats`` gives tensor ``name`` (``blk.0.attn_q.weight``): by its
    name without ``.weight`` first, then by its role (the part after ``blk.N.``); F32 when
    neither is named."""
    stem = name.removesuffix(".weight")
    if stem in formats:
        return int(formats[stem])
    role = stem.split(".", 2)[2] if stem.startswith("blk.") else stem
    return int(formats.get(role, F32))


def bpe_vocabulary() -> tuple[list[str], list[str]]:
    """(tokens in id order, merges): the special tokens, the 256 byte symbols of byte-level
    BPE, and merges learned from a fixed text (deterministic, no download)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    tokens = [*SPECIAL_TOKENS, *(symbols[b] for b in range(256))]
    known = set(tokens)
    # Byte-level pre-tokenisation as GPT-2 does it, near enough: words keep their space.
    words: dict[tuple[str, ...], int] = {}
    for index, word in enumerate(CORPUS.split(" ")):
        text = (" " if index else "") + word
        key = tuple(symbols[b] for b in text.encode())
        words[key] = words.get(key, 0) + 1
    merges: list[str] = []
    while len(tokens) < VOCAB_TARGET:
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties: the larger pair, fixed
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        words = {_merge(word, best, merged): count for word, count in words.items()}
    return tokens, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _add_tokenizer(writer: Any, tokens: list[str], merges: list[str]) -> None:
    """The tokenizer fields llama.cpp writes for a byte-level BPE model (as SmolLM2's)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for q and k (the GGUF loaders undo it)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _random_k_blocks(ggml_type: int, rows: int, columns: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Random raw bytes of a K-quant tensor, its half-float scales chosen so the weights
    have a standard deviation of about 0.02 to 0.03 and sit around zero."""
    if columns % QK_K:
        raise ValueError(f"{TYPE_NAMES[ggml_type]} rows need a multiple of {QK_K} weights, "
                         f"not {columns}")
    supers = columns // QK_K
    raw = rng.integers(0, 256, size=(rows, supers, _BLOCK_BYTES[ggml_type]), dtype=np.uint8)

    def halves(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float16)[..., None].view(np.uint8)

    if ggml_type == Q6_K:  # w = d * scale(int8) * (q - 32), q in 0..63
        raw[..., 208:210] = halves(rng.uniform(1.0e-5, 2.5e-5, size=(rows, supers)))
    else:  # Q4_K, Q5_K: w = d * sc * q - dmin * m, six-bit sc and m; q in 0..15 or 0..31
        top = 15.0 if ggml_type == Q4_K else 31.0
        d = rng.uniform(0.5, 1.0, size=(rows, supers)) * (0.0025 / top)
        raw[..., 0:2] = halves(d)
        raw[..., 2:4] = halves(d * top / 2)  # the mean of d * sc * q is about dmin * m's
    return raw.reshape(rows, -1)


def _matrix(rng: np.random.Generator, ggml_type: int, rows: int, columns: int, *,
            std: float, rotary_heads: int | None = None,
            center: float = 0.0) -> tuple[np.ndarray, int | None]:
    """(the array to write, the raw type to write it as) for one weight of ``ggml_type``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if ggml_type in _RANDOM_BLOCK_FORMATS:
        return _random_k_blocks(ggml_type, rows, columns, rng), ggml_type
    values = (center + rng.standard_normal((rows, columns)) * std).astype(np.float32)
    if rotary_heads is not None:
        values = _rotary_rows(values, rotary_heads)
    if ggml_type == F32:
        return values, None
    if ggml_type == F16:
        return values.astype(np.float16), None
    return quantize(values, GGMLQuantizationType(ggml_type)), ggml_type


def _new_writer(path: Path, architecture: str, context: int, embedding: int) -> Any:
    """A GGUF writer for a tiny model of ``architecture``, its first header fields set."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type("model")
    writer.add_name(f"tiny {architecture}")
    writer.add_context_length(context)
    writer.add_embedding_length(embedding)
    return writer


def make_tiny_llama_gguf(path: Path, *, formats: Mapping[str, int] | None = None, seed: int = 0,
                         tied: bool = True) -> Path:
    """Write a tiny LLaMA GGUF to ``path`` and return it.

    ``formats`` maps a tensor role (``attn_q``, ``ffn_down``, ``token_embd``, ``output``,
    ...) or a tensor's name without ``.weight`` (``blk.1.ffn_up``) to a GGML type id;
    unnamed weights are F32, and the norms are always F32 (as llama.cpp writes them).
    Default: :data:`DEFAULT_FORMATS`. ``tied``: no ``output.weight`` (the head is the
    token embedding), else an ``output.weight`` of its own.
    """
    import gguf

    formats = DEFAULT_FORMATS if formats is None else formats
    rng = np.random.default_rng(seed)
    tokens, merges = bpe_vocabulary()
    vocab = len(tokens)
    writer = _new_writer(path, "llama", CONTEXT, HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HEAD_DIM)
    _add_tokenizer(writer, tokens, merges)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def weight(name: str, rows: int, columns: int, *, std: float = 0.03,
               rotary_heads: int | None = None) -> None:
        array, raw_type = _matrix(rng, tensor_format(name, formats), rows, columns, std=std,
                                  rotary_heads=rotary_heads)
        writer.add_tensor(name, array, raw_dtype=None if raw_type is None
                          else gguf.GGMLQuantizationType(raw_type))

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + rng.standard_normal(HIDDEN) * 0.05).astype(np.float32))

    kv = KV_HEADS * HEAD_DIM
    weight("token_embd.weight", vocab, HIDDEN, std=0.05)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN, rotary_heads=HEADS)
        weight(f"blk.{i}.attn_k.weight", kv, HIDDEN, rotary_heads=KV_HEADS)
        weight(f"blk.{i}.attn_v.weight", kv, HIDDEN)
        weight(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", INTERMEDIATE, HIDDEN)
        weight(f"blk.{i}.ffn_up.weight", INTERMEDIATE, HIDDEN)
        weight(f"blk.{i}.ffn_down.weight", HIDDEN, INTERMEDIATE)
    norm("output_norm.weight")
    if not tied:
        weight("output.weight", vocab, HIDDEN, std=0.05)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_parameters(*, tied: bool = True) -> int:
    """The parameter count of the tiny LLaMA (what a registry entry's ``parameters`` says)."""
    vocab = len(bpe_vocabulary()[0])
    kv = KV_HEADS * HEAD_DIM
    layer = (2 * HIDDEN + HIDDEN * HIDDEN * 2 + 2 * kv * HIDDEN
             + 3 * HIDDEN * INTERMEDIATE)
    return vocab * HIDDEN * (1 if tied else 2) + LAYERS * layer + HIDDEN


def llama_entry(path: Path, *, tied: bool = True, cpu_dtype: str = "native",
                architecture: str = "llama") -> dict[str, object]:
    """A registry entry for a GGUF made by :func:`make_tiny_llama_gguf` (like ``smollm2-135m``'s:
    a local GGUF source, ``dtype: {cuda: auto, cpu: native}``, the true sizes in ``config``)."""
    vocab = len(bpe_vocabulary()[0])
    return {
        "description": "tiny 2-layer LLaMA GGUF made by the tests",
        "task": "text-generation",
        "architecture": architecture,
        "parameters": llama_parameters(tied=tied),
        "context_length": CONTEXT,
        "dtype": {"cuda": "auto", "cpu": cpu_dtype},
        "min_gpu_memory_mb": 16,
        "source": {"local": {"path": str(path.parent), "format": "gguf", "file": path.name}},
        "config": {"model_type": "llama", "hidden_size": HIDDEN,
                   "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
                   "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                   "head_dim": HEAD_DIM, "vocab_size": vocab, "max_position_embeddings": CONTEXT,
                   "rms_norm_eps": RMS_EPS, "tie_word_embeddings": tied,
                   "rope_theta": ROPE_THETA, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                   "pad_token_id": PAD_ID},
    }


# ------------------------------------------------------------------ a GGUF that is not a LLaMA

GPT2_EMBD, GPT2_HEADS = 64, 2
# transformers reads no n_positions from a GPT-2 GGUF: the position table has its default size.
GPT2_POSITIONS = 1024


def make_tiny_gpt2_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny GPT-2 GGUF (2 layers, 64 wide, float32, the same tokenizer) to ``path``:
    llama.cpp's GPT-2 layout, ``[out, in]`` matrices that the loader transposes back."""

    rng = np.random.default_rng(seed)
    tokens, merges = bpe_vocabulary()
    vocab, n = len(tokens), GPT2_EMBD
    writer = _new_writer(path, "gpt2", GPT2_POSITIONS, n)
    writer.add_feed_forward_length(4 * n)
    writer.add_block_count(LAYERS)
    writer.add_head_count(GPT2_HEADS)
    writer.add_layer_norm_eps(1e-5)
    _add_tokenizer(writer, tokens, merges)

    def tensor(name: str, *shape: int, center: float = 0.0, std: float = 0.03) -> None:
        writer.add_tensor(name, (center + rng.standard_normal(shape) * std).astype(np.float32))

    tensor("token_embd.weight", vocab, n, std=0.05)
    tensor("position_embd.weight", GPT2_POSITIONS, n, std=0.01)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", n, center=1.0, std=0.05)
        tensor(f"blk.{i}.attn_norm.bias", n, std=0.01)
        tensor(f"blk.{i}.attn_qkv.weight", 3 * n, n)
        tensor(f"blk.{i}.attn_qkv.bias", 3 * n, std=0.01)
        tensor(f"blk.{i}.attn_output.weight", n, n)
        tensor(f"blk.{i}.attn_output.bias", n, std=0.01)
        tensor(f"blk.{i}.ffn_norm.weight", n, center=1.0, std=0.05)
        tensor(f"blk.{i}.ffn_norm.bias", n, std=0.01)
        tensor(f"blk.{i}.ffn_up.weight", 4 * n, n)
        tensor(f"blk.{i}.ffn_up.bias", 4 * n, std=0.01)
        tensor(f"blk.{i}.ffn_down.weight", n, 4 * n)
        tensor(f"blk.{i}.ffn_down.bias", n, std=0.01)
    tensor("output_norm.weight", n, center=1.0, std=0.05)
    tensor("output_norm.bias", n, std=0.01)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gpt2_entry(path: Path, *, cpu_dtype: str = "native") -> dict[str, object]:
    """A registry entry for a GGUF made by :func:`make_tiny_gpt2_gguf`."""
    vocab, n = len(bpe_vocabulary()[0]), GPT2_EMBD
    layer = 4 * n + (3 * n * n + 3 * n) + (n * n + n) + (4 * n * n + 4 * n) + (4 * n * n + n)
    return {
        "description": "tiny 2-layer GPT-2 GGUF made by the tests",
        "task": "text-generation",
        "architecture": "gpt2",
        "parameters": vocab * n + GPT2_POSITIONS * n + LAYERS * layer + 2 * n,
        "context_length": CONTEXT,
        "dtype": {"cuda": "auto", "cpu": cpu_dtype},
        "min_gpu_memory_mb": 16,
        "source": {"local": {"path": str(path.parent), "format": "gguf", "file": path.name}},
        "config": {"model_type": "gpt2", "n_layer": LAYERS, "n_head": GPT2_HEADS, "n_embd": n,
                   "n_positions": GPT2_POSITIONS, "vocab_size": vocab, "bos_token_id": BOS_ID,
                   "eos_token_id": EOS_ID},
    }
