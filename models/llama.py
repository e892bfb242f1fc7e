"""The Llama family in PyTorch (Llama 2/3.x, SmolLM2, Mistral, Qwen2), weight-compatible with Hugging Face.

What it does:

* builds a decoder from ``edgerope.models.config.ModelConfig``: RMSNorm, grouped-query
  attention (optional q/k/v bias for Qwen2, o bias for Llama ``attention_bias``),
  a SiLU-gated MLP, optionally tied input/output embeddings (Llama 3.2, SmolLM2);
* names every module and parameter exactly as the Hugging Face state dict does
  (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
  ..., ``model.norm.weight``, ``lm_head.weight``), so ``from_pretrained`` loads
  HF safetensors strictly and ``save_pretrained`` writes files HF loads;
* applies RoPE from ``edgerope.rope.scaling`` only (``edgerope.models.base.RotaryEmbedding``), any variant
  transformers has for Llama (llama3 per-band included).  This module has no rope math of its own.

The building blocks other families share (``Attention``, ``MLP``, ``DecoderLayer``) live here; the causal-LM
machinery (forward loop, masks, checkpoints) is ``edgerope.models.base``.  Rotation convention: NEOX /
Hugging Face ``rotate_half`` (``ROTATION``; docs/llama_cpp.md §3.1 for llama.cpp's permuted layout).

What it does not do: KV caching or generation (inference runs in llama.cpp),
the training loss or loop (``edgerope.train.finetune``), tokenization, dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from edgerope.errors import ConfigError
from edgerope.models.base import (
    INDEX_FILE,
    LOADABLE_DTYPES,
    ROTATION,
    SINGLE_FILE,
    CausalLM,
    DecoderStack,
    RMSNorm,
    RotaryEmbedding,
    activation,
    apply_rope,
    attend,
    causal_mask,
    check_tensors,
    read_safetensors,
    rotate_half,
)
from edgerope.models.config import ModelConfig

__all__ = [
    "INDEX_FILE",
    "LOADABLE_DTYPES",
    "ROTATION",
    "SINGLE_FILE",
    "Attention",
    "DecoderLayer",
    "DecoderStack",
    "LlamaModel",
    "MLP",
    "Model",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rope",
    "causal_mask",
    "check_tensors",
    "read_safetensors",
    "rotate_half",
]


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE on q and k (none on a NoPE layer: ``cos`` None).

    ``qkv`` projects (a family with fused or normalised projections overrides it); ``scale`` None is
    head_dim ** -0.5.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=cfg.o_bias)
        self.scale: float | None = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, hd), k and v (B, KV, T, hd) for ``x`` (B, T, d)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, T, H*hd) -> (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # -> (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # -> (B, KV, T, hd)
        return q, k, v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask, scale=self.scale)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, H, T, hd) -> (B, T, H*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU, or GeGLU for ``hidden_act`` gelu_pytorch_tanh."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, *, attention: nn.Module | None = None, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = attention if attention is not None else Attention(cfg)
        self.mlp = mlp if mlp is not None else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(CausalLM):
    """Llama / Mistral / Qwen2 causal LM (``CausalLM.from_pretrained`` semantics: on this class it also loads
    the other families, as callers of the Llama-only days expect)."""

    model_types = ("llama", "mistral", "qwen2")
    auto_family = True

    def check_config(self, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        if cfg.model_type == "qwen2" and cfg.sliding_window is not None:
            raise ConfigError(
                "Qwen2 sliding-window attention is not supported (it applies only from max_window_layers on)",
                where="config.json: use_sliding_window",
                fix="set use_sliding_window to false",
            )

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return DecoderLayer(cfg)


Model = LlamaModel
