"""KV-cache types llama.cpp accepts and their exact memory cost.

Names are the ones ``llama-cli -ctk/-ctv`` accepts; ids and block sizes come
from ``gguf`` (GGMLQuantizationType, GGML_QUANT_SIZES).  Formula (docs/llama_cpp.md §7): bytes = n_layers x n_ctx_padded x (n_embd_k_gqa x bpe_k + n_embd_v_gqa x bpe_v),
with n_ctx padded to a multiple of 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgerope.errors import RuntimeConfigError

KV_PAD = 256


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_type: GGMLQuantizationType

    @property
    def id(self) -> int:
        return int(self.ggml_type.value)

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def bytes_per_element(self) -> float:
        block, nbytes = GGML_QUANT_SIZES[self.ggml_type]
        return nbytes / block

    @property
    def quantized(self) -> bool:
        return self.block_size > 1


KV_TYPES: dict[str, KVType] = {
    name: KVType(name, getattr(GGMLQuantizationType, name.upper()))
    for name in ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
}


def kv_type(name: str) -> KVType:
    """Look up a cache type by name (case-insensitive), with a clear error listing the valid ones."""
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise RuntimeConfigError(f"unknown KV cache type {name!r}", fix=f"use one of: {', '.join(KV_TYPES)}") from None


def padded_ctx(n_ctx: int) -> int:
    """llama.cpp pads the allocated context to a multiple of 256."""
    return math.ceil(n_ctx / KV_PAD) * KV_PAD


def kv_bytes_per_token(
    *, n_layers: int, n_kv_heads: int, head_dim_k: int, head_dim_v: int | None = None, type_k: str, type_v: str
) -> float:
    """Bytes of K+V cache one token costs across all layers."""
    head_dim_v = head_dim_k if head_dim_v is None else head_dim_v
    k = n_kv_heads * head_dim_k * kv_type(type_k).bytes_per_element
    v = n_kv_heads * head_dim_v * kv_type(type_v).bytes_per_element
    return n_layers * (k + v)


def kv_bytes(
    n_ctx: int,
    *,
    n_layers: int,
    n_kv_heads: int,
    head_dim_k: int,
    head_dim_v: int | None = None,
    type_k: str,
    type_v: str,
) -> int:
    """Exact KV cache bytes for an allocated context of ``n_ctx`` (padded to 256)."""
    per_tok = kv_bytes_per_token(
        n_layers=n_layers,
        n_kv_heads=n_kv_heads,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        type_k=type_k,
        type_v=type_v,
    )
    return int(round(padded_ctx(n_ctx) * per_tok))


# Sliding-window layers: llama.cpp allocates them full length for edgerope's runtime (swa_full, on in its C API)
SWA_NOTE = (
    "sliding-window attention: the sliding layers' caches are planned full length, as edgerope's runtime allocates "
    "them (llama.cpp's swa_full, on in its C API; llama-cli/llama-server turn it off and allocate less)"
)
ARCHS_DISABLING_SWA = frozenset({"phi3"})  # the loader reads sliding_window, then runs without it
