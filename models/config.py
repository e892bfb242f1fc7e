"""Model configuration for the Llama family (Llama, Mistral, Qwen2), read from and written to HF ``config.json``.

One frozen dataclass with Hugging Face field names and one source of defaults.
All problems in a config are collected and reported together.  The rope
settings are parsed by ``edgerope.rope.scaling`` into a typed variant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgerope.errors import ConfigError, EdgeropeError
from edgerope.rope.hf import parse_hf_rope, to_hf_rope
from edgerope.rope.scaling import Default, RopeScaling

# HF architecture class -> (model_type, GGUF architecture)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "llama"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
}
MODEL_TYPES = {mt: (arch, gguf_arch) for arch, (mt, gguf_arch) in ARCHITECTURES.items()}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder config. Field names are Hugging Face's."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int
    rope: RopeScaling = field(default_factory=Default)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for Llama) biases; Qwen2 always has q/k/v bias
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # provenance: was this checkpoint fine-tuned at its scaled rope? (edgerope records it)
    rope_finetuned: bool | None = None
    name: str | None = None

    @property
    def architecture(self) -> str:
        return MODEL_TYPES[self.model_type][0]

    @property
    def gguf_arch(self) -> str:
        return MODEL_TYPES[self.model_type][1]

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        if self.o_bias:
            attn += d
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + d

    def replace(self, **changes: Any) -> ModelConfig:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return ModelConfig(**data)

    # ------------------------------------------------------------------ HF I/O

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], *, where: str = "config.json") -> ModelConfig:
        """Build from a parsed HF config dict, reporting every problem at once."""
        model_type = _hf_model_type(raw, where=where)
        problems: list[str] = []
        sizes = _hf_sizes(raw, problems)
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act {act!r} is not supported (only 'silu')")
        try:
            rope = parse_hf_rope(raw, where=where)
        except EdgeropeError as exc:
            problems.append(exc.what)
            rope = Default()
        if problems:
            raise ConfigError(
                "invalid model config:\n    - " + "\n    - ".join(problems),
                where=where,
                fix="correct the listed fields in config.json",
            )
        return cls(
            model_type=model_type,
            **{name: int(value) for name, value in sizes.items()},
            rope=rope,
            hidden_act=act,
            **_hf_options(raw),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError("no config.json found", where=str(model_dir), fix="point at a Hugging Face model folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config.json is not valid JSON: {exc}", where=str(path)) from None
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object", where=str(path))
        return cls.from_hf(raw, where=str(path))

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (5.x ``rope_parameters`` plus the 4.x ``rope_theta``/``rope_scaling``)."""
        rope_params = to_hf_rope(self.rope, head_dim=self.head_dim)
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "rope_parameters": rope_params,
            "dtype": self.torch_dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "qwen2"):
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        er = {k: v for k, v in (("rope_finetuned", self.rope_finetuned), ("name", self.name)) if v is not None}
        if er:
            out["edgerope"] = er
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- reading HF config.json


def _hf_model_type(raw: Mapping[str, Any], *, where: str) -> str:
    """``model_type``, or the one its ``architectures`` name; ``ConfigError`` for an unsupported family."""
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type in MODEL_TYPES:
        return model_type
    arch_mt = next((ARCHITECTURES[a][0] for a in archs if a in ARCHITECTURES), None)
    if arch_mt is None:
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}",
            where=where,
            fix=f"edgerope supports {', '.join(ARCHITECTURES)}; for other GGUF arches use set-rope/inspect",
        )
    return arch_mt


def _positive_int(raw: Mapping[str, Any], name: str, problems: list[str]) -> int:
    """``raw[name]`` if a positive int; otherwise a problem is recorded and 1 stands in, so checking goes on."""
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"'{name}' must be a positive integer, got {value!r}")
        return 1
    return value


def _hf_sizes(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The shape fields by HF name, problems appended to ``problems`` (values are ints once none were found)."""
    vocab = _positive_int(raw, "vocab_size", problems)
    hidden = _positive_int(raw, "hidden_size", problems)
    inter = _positive_int(raw, "intermediate_size", problems)
    layers = _positive_int(raw, "num_hidden_layers", problems)
    heads = _positive_int(raw, "num_attention_heads", problems)
    kv_heads = raw.get("num_key_value_heads") or heads
    max_pos = _positive_int(raw, "max_position_embeddings", problems)
    head_dim = raw.get("head_dim") or (hidden // heads if heads else 0)
    if isinstance(kv_heads, int) and heads and heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        problems.append(f"head_dim must be a positive even integer, got {head_dim!r}")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_pos,
        "head_dim": head_dim,
    }


def _hf_options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The fields with defaults (norm, biases, window, special tokens, dtype) and edgerope's provenance record."""
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    er = raw.get("edgerope") or {}
    return {
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "attention_bias": bool(raw.get("attention_bias", False)),
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "sliding_window": raw.get("sliding_window") if raw.get("use_sliding_window", True) else None,
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "pad_token_id": raw.get("pad_token_id"),
        "torch_dtype": str(dtype),
        "rope_finetuned": er.get("rope_finetuned"),
        "name": er.get("name") or raw.get("_name_or_path") or None,
    }


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of ``cfg`` holds, name -> shape (rows, cols), in a fixed order."""
    d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "self_attn.q_proj.weight"] = (q_rows, d)
        out[p + "self_attn.k_proj.weight"] = (kv_rows, d)
        out[p + "self_attn.v_proj.weight"] = (kv_rows, d)
        if cfg.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q_rows,)
            out[p + "self_attn.k_proj.bias"] = (kv_rows,)
            out[p + "self_attn.v_proj.bias"] = (kv_rows,)
        out[p + "self_attn.o_proj.weight"] = (d, q_rows)
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for proj, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
            out[p + f"mlp.{proj}.weight"] = shape
            if cfg.mlp_bias:
                out[p + f"mlp.{proj}.bias"] = (shape[0],)
    out["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, d)
    return out
