"""The tensors a Hugging Face checkpoint of a ``ModelConfig`` holds: names and shapes, per family.

The converter checks a checkpoint against it and the project's tiny random models are made from it.  No torch.
"""

from __future__ import annotations

from edgerope.models.config import ModelConfig


def _attention_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    d, hd = cfg.hidden_size, cfg.head_dim
    q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    if cfg.model_type == "phi3":  # fused q, k, v rows
        return {p + "self_attn.qkv_proj.weight": (q_rows + 2 * kv_rows, d), p + "self_attn.o_proj.weight": (d, q_rows)}
    out: dict[str, tuple[int, ...]] = {
        p + "self_attn.q_proj.weight": (q_rows, d),
        p + "self_attn.k_proj.weight": (kv_rows, d),
        p + "self_attn.v_proj.weight": (kv_rows, d),
    }
    if cfg.qkv_bias:
        out[p + "self_attn.q_proj.bias"] = (q_rows,)
        out[p + "self_attn.k_proj.bias"] = (kv_rows,)
        out[p + "self_attn.v_proj.bias"] = (kv_rows,)
    out[p + "self_attn.o_proj.weight"] = (d, q_rows)
    if cfg.o_bias:
        out[p + "self_attn.o_proj.bias"] = (d,)
    if cfg.model_type in ("qwen3", "gemma3_text"):  # per-head RMSNorm of q and k
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
    return out


def _mlp_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    d, inter = cfg.hidden_size, cfg.intermediate_size
    if cfg.model_type == "phi3":  # fused gate and up rows
        return {p + "mlp.gate_up_proj.weight": (2 * inter, d), p + "mlp.down_proj.weight": (d, inter)}
    out: dict[str, tuple[int, ...]] = {}
    for proj, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
        out[p + f"mlp.{proj}.weight"] = shape
        if cfg.mlp_bias:
            out[p + f"mlp.{proj}.bias"] = (shape[0],)
    return out


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``cfg`` holds, name -> shape (rows, cols), in a fixed order."""
    d = cfg.hidden_size
    gemma = cfg.model_type == "gemma3_text"
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out.update(_attention_shapes(cfg, p))
        out[p + "post_attention_layernorm.weight"] = (d,)
        if gemma:
            out[p + "pre_feedforward_layernorm.weight"] = (d,)
        out.update(_mlp_shapes(cfg, p))
        if gemma:
            out[p + "post_feedforward_layernorm.weight"] = (d,)
    out["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out
