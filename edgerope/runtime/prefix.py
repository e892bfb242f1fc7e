"""A token prefix's KV state kept in the document cache: restore it, or evaluate it and save it.

``ask`` keeps a document's state this way and the server a long system message's; both call ``load_prefix``.
``state_fields`` is everything that decides the state after a token prefix (the model's content digest, prompt
format, tokens, context and cache settings, rope, llama.cpp build): the cache key is made from it, so a state is
only ever restored into a runtime that would have computed the same one.

Before a state is restored it is checked against the entry and the runtime (``edgerope.runtime.seqstate``: as
many cells as the entry's tokens, at positions 0.., this model's layers, cache types and row sizes), with its
size bounded by what such a state can take before it is read; an entry that fails, or that llama.cpp refuses,
is removed and the prefix evaluated and saved again.

What it does not do: choose what the prefix is, or manage the cache files (``edgerope.runtime.doccache``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgerope.errors import OutputError, RuntimeConfigError
from edgerope.runtime import native
from edgerope.runtime.doccache import DocCache, entry_key, tokens_digest
from edgerope.runtime.runtime import Runtime
from edgerope.runtime.seqstate import StateMismatch, check_seq_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixLoad:
    """How a prefix came into the cache: restored or evaluated, and the cache file holding its state."""

    cached: bool  # restored from the document cache (not evaluated)
    cache_file: str | None  # the entry's file; None without a cache or when saving failed


def state_fields(rt: Runtime, *, model: Any, prompt_format: str, tokens: list[int]) -> dict[str, Any]:
    """Everything that decides the KV state after ``tokens`` in ``rt`` (the document cache's key fields)."""
    plan = rt.plan
    return {
        "model": model,
        "prompt_format": prompt_format,
        "tokens_sha256": tokens_digest(tokens),
        "n_tokens": len(tokens),
        "n_ctx": plan.n_ctx,
        "n_batch": plan.n_batch,
        "type_k": plan.type_k.name,
        "type_v": plan.type_v.name,
        "flash_attn": rt.info.flash_attn,
        "backend": rt.info.backend,
        "rope": plan.rope_description,
        "rope_overrides": plan.rope.explicit(),
        "llama_cpp": native.bindings_version(),
    }


def _row_sizes(rt: Runtime) -> tuple[list[int], list[int]]:
    """Bytes one cell takes in each layer's K and V cache (``ggml_row_size``)."""
    from gguf import GGML_QUANT_SIZES

    plan = rt.plan
    hp = plan.hparams

    def row(kind: Any, n: int) -> int:
        block, size = GGML_QUANT_SIZES[kind.ggml_type]
        return n // block * size

    heads = hp.n_head_kv_layers
    return [row(plan.type_k, h * hp.head_dim_k) for h in heads], [row(plan.type_v, h * hp.head_dim_v) for h in heads]


def load_prefix(
    rt: Runtime,
    tokens: list[int],
    *,
    cache: DocCache | None,
    model: Any,
    prompt_format: str,
    progress: Callable[[int, int], None] | None = None,
) -> PrefixLoad:
    """Put ``tokens`` in ``rt``'s (emptied) KV cache: restored from ``cache`` when it holds this exact state,
    else evaluated (``progress(done, total)``) and saved.  A cache that fails never fails the request: a bad
    entry is evaluated again, a failed save is logged."""
    if cache is None:
        rt.prefill(tokens, progress=progress)
        return PrefixLoad(cached=False, cache_file=None)
    fields = state_fields(rt, model=model, prompt_format=prompt_format, tokens=tokens)
    key = entry_key(fields)
    rows_k, rows_v = _row_sizes(rt)
    bound = 64 + 12 * len(tokens) + sum(32 + len(tokens) * (k + v) for k, v in zip(rows_k, rows_v, strict=True))
    entry = cache.get(key, fields, max_state_bytes=bound)
    if entry is not None:
        try:
            if entry.n_tokens != len(tokens):
                raise StateMismatch(f"the entry holds {entry.n_tokens} tokens, the prefix has {len(tokens)}")
            plan = rt.plan
            check_seq_state(
                entry.state,
                n_tokens=len(tokens),
                type_k=plan.type_k.id,
                type_v=plan.type_v.id,
                row_sizes_k=rows_k,
                row_sizes_v=rows_v,
            )
            rt.restore_state(entry.state, n_past=entry.n_tokens)
            if progress is not None:
                progress(len(tokens), len(tokens))
            return PrefixLoad(cached=True, cache_file=str(cache.path_for(key)))
        except StateMismatch as exc:
            cache.remove(key, f"the saved state does not match: {exc}")
        except RuntimeConfigError as exc:
            cache.remove(key, f"llama.cpp refused the saved state: {exc.what}")
    rt.prefill(tokens, progress=progress)
    try:
        cache.put(key, fields, rt.state_bytes(), n_tokens=len(tokens))
    except (OSError, OutputError) as exc:  # the answer does not depend on the cache
        logger.warning("document cache: could not save %s: %s", cache.path_for(key), exc)
        return PrefixLoad(cached=False, cache_file=None)
    return PrefixLoad(cached=False, cache_file=str(cache.path_for(key)))
