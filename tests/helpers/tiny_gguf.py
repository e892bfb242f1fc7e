"""A random tiny llama GGUF with a SentencePiece-style vocab, written with ``gguf.GGUFWriter`` (no edgerope code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFValueType, TokenType

WORDS = ["\u2581"] + [chr(c) for c in range(97, 123)] + ["\u2581" + chr(c) for c in range(97, 123)]
BOS, EOS = 1, 2
F32 = 0  # ggml type ids
F16 = 1


def tiny_vocab() -> tuple[list[str], list[int], list[float]]:
    """A SentencePiece-style ('llama') vocab: specials, the 256 byte pieces, '▁', letters, '▁'+letter."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + WORDS
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    types += [TokenType.NORMAL] * len(WORDS)
    scores = [0.0] * 259 + [-float(i) for i in range(len(WORDS))]
    return tokens, [int(t) for t in types], scores


def write_tiny_gguf(
    path: Path,
    *,
    hidden: int = 64,
    n_head: int = 2,
    n_head_kv: int = 1,
    n_layer: int = 2,
    ffn: int = 128,
    context_length: int = 256,
    seed: int = 0,
    extra_kv: dict[str, tuple[Any, GGUFValueType]] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    byte_pieces: bool = True,
) -> Path:
    """A random tiny llama GGUF (F32 weights, Q/K layout irrelevant for these mechanics tests)."""
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    tokens, types, scores = tiny_vocab()
    if not byte_pieces:  # replace the byte pieces by ordinary ones
        types = [t if t != TokenType.BYTE else int(TokenType.NORMAL) for t in types]
        tokens = [t if not t.startswith("<0x") else f"x{i}" for i, t in enumerate(tokens)]
    rng = np.random.default_rng(seed)
    hd = hidden // n_head
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("edgerope-test-tiny")
    w.add_context_length(context_length)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, (value, vtype) in (extra_kv or {}).items():
        w.add_key_value(name, value, vtype)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)

    def mat(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) = ggml ne (cols, rows)
        return (rng.standard_normal((rows, cols)) * 0.15).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def name(t: MODEL_TENSOR, bid: int | None = None) -> str:
        return TENSOR_NAMES[t].format(bid=bid) + ".weight"

    w.add_tensor(name(MODEL_TENSOR.TOKEN_EMBD), mat(len(tokens), hidden))
    for tname, values in (extra_tensors or {}).items():
        w.add_tensor(tname, values)
    for i in range(n_layer):
        w.add_tensor(name(MODEL_TENSOR.ATTN_NORM, i), norm(hidden))
        w.add_tensor(name(MODEL_TENSOR.ATTN_Q, i), mat(n_head * hd, hidden))
        w.add_tensor(name(MODEL_TENSOR.ATTN_K, i), mat(n_head_kv * hd, hidden))
        w.add_tensor(name(MODEL_TENSOR.ATTN_V, i), mat(n_head_kv * hd, hidden))
        w.add_tensor(name(MODEL_TENSOR.ATTN_OUT, i), mat(hidden, n_head * hd))
        w.add_tensor(name(MODEL_TENSOR.FFN_NORM, i), norm(hidden))
        w.add_tensor(name(MODEL_TENSOR.FFN_GATE, i), mat(ffn, hidden))
        w.add_tensor(name(MODEL_TENSOR.FFN_UP, i), mat(ffn, hidden))
        w.add_tensor(name(MODEL_TENSOR.FFN_DOWN, i), mat(hidden, ffn))
    w.add_tensor(name(MODEL_TENSOR.OUTPUT_NORM), norm(hidden))
    w.add_tensor(name(MODEL_TENSOR.OUTPUT), mat(len(tokens), hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
