"""Small synthetic GGUFs of any architecture, written with ``gguf.GGUFWriter`` (no edgerope code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import Keys

SPM_SPECIAL = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def spm_vocab(n: int) -> list[str]:
    """A SentencePiece-style token list with the 256 byte pieces, padded with word pieces to ``n``."""
    base = SPM_SPECIAL + BYTE_TOKENS
    return base + [f"\u2581w{i}" for i in range(n - len(base))]


def write_gguf(
    path: Path,
    arch: str = "llama",
    *,
    ctx: int = 4096,
    n_embd: int = 128,
    n_layers: int = 2,
    n_head: int | list[int] = 2,
    n_head_kv: int | list[int] | None = 1,
    kv: dict[str, tuple[Any, VT]] | None = None,
    drop: tuple[str, ...] = (),
    tensors: dict[str, np.ndarray | tuple[np.ndarray, QT]] | None = None,
    weights: bool = True,
    vocab: str | None = "spm",
    n_vocab: int = 300,
    endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
    alignment: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny GGUF. ``kv`` keys may contain ``{arch}``; ``drop`` removes default keys (same spelling)."""
    rng = np.random.default_rng(seed)
    U32, F32, STR = VT.UINT32, VT.FLOAT32, VT.STRING
    items: dict[str, tuple[Any, VT]] = {
        Keys.General.NAME: ("tiny test model", STR),
        Keys.LLM.CONTEXT_LENGTH: (ctx, U32),
        Keys.LLM.EMBEDDING_LENGTH: (n_embd, U32),
        Keys.LLM.BLOCK_COUNT: (n_layers, U32),
        Keys.Attention.HEAD_COUNT: (n_head, U32),
        Keys.Rope.FREQ_BASE: (10000.0, F32),
        Keys.Attention.LAYERNORM_RMS_EPS: (1e-5, F32),
    }
    if n_head_kv is not None:
        items[Keys.Attention.HEAD_COUNT_KV] = (n_head_kv, U32)
    tokens: list[str] = []
    if vocab == "spm":
        tokens = spm_vocab(n_vocab)
        items[Keys.Tokenizer.MODEL] = ("llama", STR)
        items[Keys.Tokenizer.PRE] = ("default", STR)
        items[Keys.Tokenizer.LIST] = (tokens, STR)
        items[Keys.Tokenizer.SCORES] = ([float(-i) for i in range(n_vocab)], F32)
        types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
        items[Keys.Tokenizer.TOKEN_TYPE] = (types, VT.INT32)
        items[Keys.Tokenizer.BOS_ID] = (1, U32)
        items[Keys.Tokenizer.EOS_ID] = (2, U32)
    elif vocab == "gpt2":
        tokens = [chr(33 + i) for i in range(94)] + [f"t{i}" for i in range(n_vocab - 94)]
        items[Keys.Tokenizer.MODEL] = ("gpt2", STR)
        items[Keys.Tokenizer.PRE] = ("qwen2", STR)
        items[Keys.Tokenizer.LIST] = (tokens, STR)
        items[Keys.Tokenizer.MERGES] = (["! !", '" "'], STR)
    items.update(kv or {})
    w = gguf.GGUFWriter(path, arch, endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for template, (value, vtype) in items.items():
        if template in drop:
            continue
        name = template.format(arch=arch)
        if isinstance(value, list):
            w.add_key_value(name, value, VT.ARRAY, sub_type=vtype)
        else:
            w.add_key_value(name, value, vtype)
    all_tensors: dict[str, Any] = {}
    if weights:
        head_dim = n_embd // (n_head if isinstance(n_head, int) else n_head[0])
        kv_heads = n_head_kv if isinstance(n_head_kv, int) else 1
        all_tensors["token_embd.weight"] = rng.standard_normal((n_vocab, n_embd), dtype=np.float32)
        for i in range(n_layers):
            all_tensors[f"blk.{i}.attn_norm.weight"] = np.ones(n_embd, np.float32)
            all_tensors[f"blk.{i}.attn_q.weight"] = rng.standard_normal((n_embd, n_embd), dtype=np.float32).astype(
                np.float16
            )
            all_tensors[f"blk.{i}.attn_k.weight"] = rng.standard_normal((kv_heads * head_dim, n_embd), dtype=np.float32)
            q8 = gguf.quants.quantize(rng.standard_normal((kv_heads * head_dim, n_embd), dtype=np.float32), QT.Q8_0)
            all_tensors[f"blk.{i}.attn_v.weight"] = (q8, QT.Q8_0)
            all_tensors[f"blk.{i}.attn_output.weight"] = rng.standard_normal((n_embd, n_embd), dtype=np.float32)
    all_tensors.update(tensors or {})
    for name, t in all_tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- reading
