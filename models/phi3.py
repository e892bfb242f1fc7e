"""Phi-3 in PyTorch (``Phi3ForCausalLM``: Phi-3.5-mini, Phi-4-mini), weight-compatible with Hugging Face.

What it does: a pre-norm decoder like Llama's with q, k and v in one fused projection
(``self_attn.qkv_proj``: rows q, then k, then v) and gate and up in one (``mlp.gate_up_proj``: rows gate,
then up), no biases, rope on the first ``int(head_dim * partial_rotary_factor)`` channels of each head only
(Phi-4-mini rotates 75%), LongRoPE (short and long factor lists, original context from the top-level
``original_max_position_embeddings``, default 4096) with its attention scaling, and a sliding window on every
layer when ``sliding_window`` is set.  Rope from ``edgerope.rope.scaling``.

What it does not do: Phi-3-small / Phi-3.5-MoE (other architectures), dropout, generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgerope.models.base import CausalLM
from edgerope.models.config import ModelConfig
from edgerope.models.llama import Attention, DecoderLayer


class Phi3Attention(Attention):
    """Grouped-query attention with one fused q/k/v projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = nn.Linear(d, (self.n_head + 2 * self.n_kv_head) * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.scale = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        H, KV, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * hd, KV * hd, KV * hd], dim=-1)  # (B, T, (H + 2 KV) hd) -> 3 parts
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, T, H*hd) -> (B, H, T, hd)
        k = k.view(B, T, KV, hd).transpose(1, 2)  # (B, T, KV*hd) -> (B, KV, T, hd)
        v = v.view(B, T, KV, hd).transpose(1, 2)  # (B, T, KV*hd) -> (B, KV, T, hd)
        return q, k, v


class Phi3MLP(nn.Module):
    """down(silu(gate) * up) with gate and up from one fused projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, 2f) -> 2 x (B, T, f)
        return self.down_proj(F.silu(gate) * up)


class Phi3Model(CausalLM):
    """Phi-3 causal LM; HF parameter names (``model.layers.N.self_attn.qkv_proj.weight``, ...)."""

    model_types = ("phi3",)

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return DecoderLayer(cfg, attention=Phi3Attention(cfg), mlp=Phi3MLP(cfg))


Model = Phi3Model
