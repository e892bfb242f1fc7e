"""Qwen3 in PyTorch (``Qwen3ForCausalLM``), weight-compatible with Hugging Face.

What it does: the Llama decoder (``edgerope.models.llama``) with a per-head RMSNorm on q and on k before the
rope (``self_attn.q_norm`` / ``k_norm``, head_dim weights), a ``head_dim`` set independently of
hidden_size / heads (``attention.key_length`` in GGUF), biases on q, k, v and o when ``attention_bias``, and
sliding-window attention on the layers ``layer_types`` marks (``use_sliding_window``).  Rope from
``edgerope.rope.scaling`` (YaRN x4 over 32,768 is the family's documented long-context setting).

What it does not do: the MoE variant (``Qwen3MoeForCausalLM``), generation.
"""

from __future__ import annotations

import torch
from torch import nn

from edgerope.models.base import CausalLM, RMSNorm
from edgerope.models.config import ModelConfig
from edgerope.models.llama import Attention, DecoderLayer


class Qwen3Attention(Attention):
    """Llama attention with RMSNorm over each head of q and of k (before the rope)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().qkv(x)  # (B, H, T, hd), (B, KV, T, hd), (B, KV, T, hd)
        return self.q_norm(q), self.k_norm(k), v


class Qwen3Model(CausalLM):
    """Qwen3 causal LM; HF parameter names (``model.layers.N.self_attn.q_norm.weight``, ...)."""

    model_types = ("qwen3",)

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return DecoderLayer(cfg, attention=Qwen3Attention(cfg))


Model = Qwen3Model
