"""Gemma 3 (text) in PyTorch (``Gemma3ForCausalLM``), weight-compatible with Hugging Face.

What it does:

* two kinds of layers (``layer_types``): sliding-window layers (5 of every 6 in the released models) that
  rope with ``rope_local`` (base 10,000, unscaled), and full-attention layers that rope with ``rope``
  (base 1,000,000, linear x8 in the 4B+ models) -- each from ``edgerope.rope.scaling``;
* RMSNorm with a (1 + w) weight computed in float32 (``GemmaRMSNorm``), before and after attention and
  before and after the MLP, and on each head of q and k before the rope;
* embeddings scaled by sqrt(hidden_size), attention scaled by ``query_pre_attn_scalar ** -0.5``, optional
  tanh soft-capping of the final logits, a GeGLU MLP (tanh GELU), tied embeddings.

``attn_logit_softcapping`` is read and kept but, as in transformers 5.24's Gemma 3 (whose attention call
never passes it on) and in llama.cpp's gemma3, not applied: Gemma 3 dropped Gemma 2's attention soft-capping.

What it does not do: the vision tower of the multimodal Gemma 3 (``Gemma3ForConditionalGeneration``),
bidirectional attention, generation.
"""

from __future__ import annotations

import torch
from torch import nn

from edgerope.models.base import CausalLM
from edgerope.models.config import ModelConfig
from edgerope.models.llama import MLP, Attention


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32, cast back last (weights start at 0)."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Gemma3Attention(Attention):
    """Attention with (1 + w) RMSNorm on each head of q and k, scale query_pre_attn_scalar ** -0.5."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        assert cfg.query_pre_attn_scalar is not None
        self.scale = cfg.query_pre_attn_scalar**-0.5

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().qkv(x)  # (B, H, T, hd), (B, KV, T, hd), (B, KV, T, hd)
        return self.q_norm(q), self.k_norm(k), v


class Gemma3DecoderLayer(nn.Module):
    """x + post_attn_norm(attn(input_norm(x))), then + post_ffw_norm(mlp(pre_ffw_norm(.)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma3Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = GemmaRMSNorm(d, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps=eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(CausalLM):
    """Gemma 3 text causal LM; HF parameter names (``model.layers.N.pre_feedforward_layernorm.weight``, ...)."""

    model_types = ("gemma3_text",)

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return Gemma3DecoderLayer(cfg)

    def make_norm(self, cfg: ModelConfig) -> nn.Module:
        return GemmaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (B, T) -> (B, T, d)
        # transformers multiplies by sqrt(hidden) held in the weights' dtype
        return h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype, device=h.device)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h))  # (B, T, d) -> (B, T, V)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


Model = Gemma3Model
