"""The family x rope-variant cells: tiny random checkpoints of Llama 3.x, SmolLM2, Qwen3, Gemma 3, Phi-3 and SmolLM3.

Each ``Cell`` is one family with one rope setting, written by ``edgerope.models.tiny_random.make_tiny_checkpoint``
(numpy weights, the project's tiny SentencePiece vocab) as the ``config.json`` transformers 5.x writes.  The
shapes are tiny (hidden 128, 2 layers; SmolLM3 4 so that one layer is NoPE; Gemma 3 6, the released
layout of 5 sliding-window layers and a full one, or 3 with another layout) and the trained context ``L0`` is 64, so parity runs at
``T = 4 x L0`` positions.  ``expect`` says what edgerope must do with the cell in llama.cpp: ``"exact"``, or
the words of its refusal.  ``hf`` is False where transformers itself cannot build the config (it says so).

Used by tests/models (PyTorch vs transformers), tests/convert (llama.cpp parity, refusals), tests/gguf
(set-rope) and bench/bench_families.py (llama.cpp's own converter on the same cells).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

L0 = 64  # original (trained) context of every cell
T = 4 * L0  # positions compared: 4x the original context
THETA = 10000.0


def yarn(**extra: Any) -> dict[str, Any]:
    return {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": L0, **extra}


def linear(factor: float = 4.0, theta: float = THETA) -> dict[str, Any]:
    return {"rope_type": "linear", "rope_theta": theta, "factor": factor}


def default(theta: float = THETA) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": L0,
}


def longrope(n_pairs: int, **extra: Any) -> dict[str, Any]:
    return {
        "rope_type": "longrope",
        "rope_theta": THETA,
        "short_factor": [1.0 + 0.02 * i for i in range(n_pairs)],
        "long_factor": [1.0 + 0.4 * i for i in range(n_pairs)],
        **extra,
    }


def gemma_ropes(full: dict[str, Any], local: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"full_attention": full, "sliding_attention": local or default(10000.0)}


SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 192}


@dataclass(frozen=True)
class Cell:
    """One family x rope variant: how to make it and what edgerope must do with it in llama.cpp."""

    id: str
    family: str  # the row of the README table
    variant: str  # the column
    model_type: str
    config: dict[str, Any]  # make_tiny_checkpoint keyword arguments beyond SHAPE
    expect: str = "exact"  # "exact", or words of edgerope's refusal
    hf: bool = True  # transformers 5.x builds this config
    geglu: bool = False  # GELU through llama.cpp's fp16 table: rel L2 1e-3 instead of 1e-4
    extra_json: dict[str, Any] = field(default_factory=dict)  # raw config.json fields set after writing

    def make(self, out: Path, tokenizer_dir: Path, **over: Any) -> Path:
        from edgerope.models.tiny_random import make_tiny_checkpoint

        # (a name containing "phi3" makes llama.cpp look up Phi-3's special tokens, which the tiny vocab lacks)
        name = f"tiny-{self.id}".replace("phi", "p")
        kwargs = {**SHAPE, "max_position_embeddings": T, "name": name, **self.config, **over}
        path = make_tiny_checkpoint(out, tokenizer_dir=tokenizer_dir, model_type=self.model_type, **kwargs)
        if self.extra_json:
            cfg = json.loads((path / "config.json").read_text())
            cfg.update(self.extra_json)
            (path / "config.json").write_text(json.dumps(cfg, indent=2))
        return path


def _c(id: str, family: str, variant: str, model_type: str, expect: str = "exact", **kw: Any) -> Cell:
    config = kw.pop("config", {})
    return Cell(id, family, variant, model_type, config, expect, **kw)


# the released layout: 5 sliding-window layers, then a full one; query_pre_attn_scalar = head_dim
GEMMA = {"num_hidden_layers": 6, "head_dim": 32, "tie_word_embeddings": True, "sliding_window": 48,
         "query_pre_attn_scalar": 32}  # fmt: skip
GEMMA_LAYOUT = {**GEMMA, "num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention",
                "sliding_attention"]}  # fmt: skip
PHI = {"original_max_position_embeddings": L0, "pad_token_id": 0}  # Phi3Config's default pad id is 32000
SMOL3 = {"num_hidden_layers": 4, "tie_word_embeddings": True, "pad_token_id": 0}

CELLS: list[Cell] = [
    # Llama 3.x: llama3 per-band rope, tied embeddings (3.2 1B/3B)
    _c("llama3-default-tied", "Llama 3.x", "default", "llama", config={"tie_word_embeddings": True}),
    _c("llama3-llama3-tied", "Llama 3.x", "llama3", "llama", config={"rope_parameters": LLAMA3, "tie_word_embeddings": True}),
    _c("llama3-linear", "Llama 3.x", "linear", "llama", config={"rope_parameters": linear()}),
    _c("llama3-yarn", "Llama 3.x", "yarn", "llama", config={"rope_parameters": yarn()}),
    _c("llama3-yarn-attn", "Llama 3.x", "yarn + attention_factor", "llama", config={"rope_parameters": yarn(attention_factor=1.3)}),
    _c("llama3-longrope", "Llama 3.x", "longrope", "llama", config={"rope_parameters": longrope(16, original_max_position_embeddings=L0)}),
    # SmolLM2: the llama arch, tied embeddings
    _c("smollm2-default", "SmolLM2", "default", "llama", config={"tie_word_embeddings": True}),
    # Qwen3: q/k norms, head_dim apart from hidden/heads (key_length), YaRN x4 as documented
    _c("qwen3-default", "Qwen3", "default", "qwen3", config={"head_dim": 48}),
    _c("qwen3-yarn", "Qwen3", "yarn", "qwen3", config={"head_dim": 48, "rope_parameters": yarn()}),
    _c("qwen3-yarn-attn", "Qwen3", "yarn + attention_factor", "qwen3", config={"head_dim": 48, "rope_parameters": yarn(attention_factor=1.3)}),
    _c("qwen3-linear", "Qwen3", "linear", "qwen3", config={"head_dim": 48, "rope_parameters": linear()}),
    _c("qwen3-llama3", "Qwen3", "llama3", "qwen3", "factor tensors", config={"head_dim": 48, "rope_parameters": LLAMA3}),
    _c("qwen3-longrope", "Qwen3", "longrope", "qwen3", "factor tensors", config={"head_dim": 48, "rope_parameters": longrope(24, original_max_position_embeddings=L0)}),
    # Gemma 3: two rope functions, GeGLU, (1+w) norms, custom layout and attention scale
    _c("gemma3-linear", "Gemma 3", "linear (global)", "gemma3_text", config={**GEMMA, "rope_parameters": gemma_ropes(linear(8.0, 1e6))}, geglu=True),
    _c("gemma3-default", "Gemma 3", "default", "gemma3_text", config={**GEMMA, "rope_parameters": gemma_ropes(default(1e6))}, geglu=True),
    _c("gemma3-yarn", "Gemma 3", "yarn (global)", "gemma3_text", config={**GEMMA, "rope_parameters": gemma_ropes(yarn(rope_theta=1e6))}, geglu=True),
    _c("gemma3-layout", "Gemma 3", "linear, layers S-F-S", "gemma3_text", config={**GEMMA_LAYOUT, "rope_parameters": gemma_ropes(linear(8.0, 1e6))}, geglu=True),
    _c("gemma3-softcap", "Gemma 3", "linear, q scalar 24, final softcap", "gemma3_text", config={**GEMMA, "query_pre_attn_scalar": 24, "final_logit_softcapping": 30.0, "rope_parameters": gemma_ropes(linear(8.0, 1e6))}, geglu=True),
    _c("gemma3-yarn-attn", "Gemma 3", "yarn + attention_factor", "gemma3_text", "sliding-window layers", config={**GEMMA, "rope_parameters": gemma_ropes(yarn(rope_theta=1e6, attention_factor=1.3))}, geglu=True),
    _c("gemma3-local-linear", "Gemma 3", "scaled sliding layers", "gemma3_text", "freq_scale_swa", config={**GEMMA, "rope_parameters": gemma_ropes(linear(8.0, 1e6), linear(2.0))}, geglu=True),
    _c("gemma3-attn-softcap", "Gemma 3", "attn_logit_softcapping (unused)", "gemma3_text", config={**GEMMA, "attn_logit_softcapping": 50.0, "rope_parameters": gemma_ropes(linear(8.0, 1e6))}, geglu=True),
    # Phi-3.5-mini / Phi-4-mini: fused qkv and gate_up, LongRoPE, partial rotary (0.75), tied (Phi-4-mini)
    _c("phi3-default", "Phi-3.5/4-mini", "default", "phi3", config={"pad_token_id": 0}),
    _c("phi3-longrope", "Phi-3.5/4-mini", "longrope (Phi-3.5-mini)", "phi3", config={**PHI, "rope_parameters": longrope(16)}),
    _c("phi4-longrope", "Phi-3.5/4-mini", "longrope, partial 0.75, tied (Phi-4-mini)", "phi3", config={**PHI, "tie_word_embeddings": True, "rope_parameters": longrope(12, partial_rotary_factor=0.75)}),
    _c("phi3-longrope-attn", "Phi-3.5/4-mini", "longrope + attention_factor", "phi3", config={**PHI, "rope_parameters": longrope(16, attention_factor=1.1)}),
    _c("phi4-yarn", "Phi-3.5/4-mini", "yarn, partial 0.75", "phi3", config={**PHI, "rope_parameters": {**yarn(), "partial_rotary_factor": 0.75}}, hf=False),
    # SmolLM3: NoPE every 4th layer, YaRN for long context, base 2e6
    _c("smollm3-default", "SmolLM3", "default", "smollm3", config={**SMOL3, "rope_parameters": default(2e6)}),
    _c("smollm3-yarn", "SmolLM3", "yarn", "smollm3", config={**SMOL3, "rope_parameters": yarn(rope_theta=2e6)}),
    _c("smollm3-nope-layout", "SmolLM3", "NoPE on layers 1, 3", "smollm3", "every 4th layer", config={**SMOL3, "no_rope_layers": [1, 0, 1, 0], "rope_parameters": yarn(rope_theta=2e6)}),
]  # fmt: skip
CELL_IDS = [c.id for c in CELLS]
BY_ID = {c.id: c for c in CELLS}


def to_v4(config: dict[str, Any]) -> dict[str, Any]:
    """The same config in transformers 4.x form: ``rope_scaling`` + top-level ``rope_theta`` (Gemma 3: plus
    ``rope_local_base_freq``; Phi-3: a top-level ``partial_rotary_factor``), no ``rope_parameters``."""
    out = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = config.get("rope_parameters") or {}
    if config.get("model_type") == "gemma3_text":
        local = rope.get("sliding_attention", {})
        if local.get("rope_type", "default") != "default":
            raise ValueError("4.x Gemma 3 configs have no scaled sliding-layer rope")
        out["rope_local_base_freq"] = local.get("rope_theta", 10000.0)
        rope = rope.get("full_attention", {})
    rope = dict(rope)
    out["rope_theta"] = rope.pop("rope_theta", THETA)
    if "partial_rotary_factor" in rope:
        out["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type", "default")
    if kind != "default":  # the legacy "type" key where transformers 5.x still honours it (not for Gemma 3)
        legacy = kind in ("linear", "dynamic") and config.get("model_type") != "gemma3_text"
        out["rope_scaling"] = {"type" if legacy else "rope_type": kind, **rope}
    return out
