"""The hyperparameters llama.cpp's generic loader reads from a GGUF, for any architecture.

``model_hparams`` computes layers, width, heads and per-layer KV heads, K/V
head dims, rotary dims, trained context and vocab size from a ``GGUFFile``'s
metadata, with llama.cpp's defaults, and raises ``GGUFError`` for a required
key that is missing or malformed, and for any count or size outside the bounds
below: every consumer sizes something from these numbers (per-layer tuples,
rotary-pair arrays, memory plans), so a corrupt header (``block_count`` 2^31,
``rope.dimension_count`` 2^31) is refused here, before anything is allocated.

What it does not do: open or validate the file (``edgerope.gguf.reader``),
interpret rope keys (``edgerope.rope.ggml``) or lint (``edgerope.gguf.lint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf import Keys

from edgerope.errors import GGUFError
from edgerope.gguf.reader import GGUFFile
from edgerope.rope.ggml import key

# Bounds well past every real model, far below what would exhaust memory when something is sized from them
MAX_LAYERS = 4096
MAX_HEADS = 65536
MAX_DIM = 1 << 20  # embedding width, head sizes, rotary dimension
MAX_CTX = (1 << 32) - 1  # llama.cpp reads context_length as uint32
MAX_VOCAB = 1 << 24
_FIX = "this file cannot be loaded by llama.cpp as a language model; re-convert it"


@dataclass(frozen=True)
class ModelHparams:
    """What llama.cpp's generic loader reads (``llama_model_base::load_hparams``), for any architecture.

    ``n_head`` / ``n_head_kv`` are ints, or per-layer tuples when the file stores arrays.
    ``n_rot`` is the rotary dimension (``rope.dimension_count``, default the K head dim).
    """

    architecture: str
    n_layers: int
    n_embd: int
    n_head: int | tuple[int, ...]
    n_head_kv: int | tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    n_ctx_train: int
    n_vocab: int | None

    def per_layer(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, tuple) else (int(value),) * self.n_layers

    @property
    def n_head_kv_layers(self) -> tuple[int, ...]:
        return self.per_layer(self.n_head_kv)

    @property
    def n_head_layers(self) -> tuple[int, ...]:
        return self.per_layer(self.n_head)


def _bounded(value: Any, name: str, low: int, high: int, where: str) -> int:
    """``value`` as an int in [low, high], else ``GGUFError`` (a float, bool, string or list is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{name} must be an integer, got {value!r}", where=where, fix=_FIX)
    if not low <= value <= high:
        raise GGUFError(f"{name} is {value:,}, outside {low}..{high:,}", where=where, fix=_FIX)
    return value


def _int_or_layers(value: Any, n_layers: int, name: str, where: str) -> int | tuple[int, ...]:
    if isinstance(value, list):
        if len(value) != n_layers:
            raise GGUFError(f"{name} has {len(value)} entries, block_count is {n_layers}", where=where, fix=_FIX)
        return tuple(_bounded(v, name, 0, MAX_HEADS, where) for v in value)
    return _bounded(value, name, 0, MAX_HEADS, where)


def _required_int(f: GGUFFile, template: str, low: int, high: int) -> int:
    name = key(template, f.architecture)
    value = f.get(name)
    if value is None:
        raise GGUFError(f"missing required key {name}", where=str(f.path), fix=_FIX)
    return _bounded(value, name, low, high, str(f.path))


def _optional_int(f: GGUFFile, template: str, default: int, high: int) -> int:
    name = key(template, f.architecture)
    value = f.get(name)
    return default if value is None else _bounded(value, name, 0, high, str(f.path))


def model_hparams(f: GGUFFile) -> ModelHparams:
    """Hyperparameters llama.cpp derives from the metadata (defaults as in its loader), each within bounds."""
    arch = f.architecture
    where = str(f.path)
    n_layers = _required_int(f, Keys.LLM.BLOCK_COUNT, 1, MAX_LAYERS)
    n_embd = _required_int(f, Keys.LLM.EMBEDDING_LENGTH, 1, MAX_DIM)
    n_ctx = _required_int(f, Keys.LLM.CONTEXT_LENGTH, 1, MAX_CTX)
    n_head = _int_or_layers(f.arch_get(Keys.Attention.HEAD_COUNT, 0), n_layers, "attention.head_count", where)
    n_head_kv_raw = f.arch_get(Keys.Attention.HEAD_COUNT_KV)
    n_head_kv = n_head if n_head_kv_raw is None else _int_or_layers(n_head_kv_raw, n_layers, "head_count_kv", where)
    head0 = n_head[0] if isinstance(n_head, tuple) else n_head
    default_dim = n_embd // head0 if head0 else 0
    head_dim_k = _optional_int(f, Keys.Attention.KEY_LENGTH, default_dim, MAX_DIM) if head0 else 0
    head_dim_v = _optional_int(f, Keys.Attention.VALUE_LENGTH, default_dim, MAX_DIM) if head0 else 0
    n_rot = _optional_int(f, Keys.Rope.DIMENSION_COUNT, head_dim_k, MAX_DIM) if head0 else 0
    tokens = f.metadata.get(Keys.Tokenizer.LIST)
    n_vocab: int | None
    if tokens is not None and tokens.length is not None:
        n_vocab = _bounded(tokens.length, "the token list's length", 0, MAX_VOCAB, where)
    elif f.arch_get(Keys.LLM.VOCAB_SIZE) is not None:
        n_vocab = _optional_int(f, Keys.LLM.VOCAB_SIZE, 0, MAX_VOCAB)
    else:
        n_vocab = None
    return ModelHparams(
        architecture=arch,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_rot=n_rot,
        n_ctx_train=n_ctx,
        n_vocab=n_vocab,
    )
