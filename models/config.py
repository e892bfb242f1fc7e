"""Model configuration of every family edgerope reads, from and to Hugging Face ``config.json``.

One frozen dataclass with Hugging Face field names and one source of defaults: ``FAMILIES`` holds, per
``model_type``, the transformers class, the llama.cpp architecture, the PyTorch module and the defaults
transformers' config class applies when ``config.json`` leaves a field out (they differ: Gemma 3 and SmolLM3
tie their embeddings by default, Qwen3's ``head_dim`` defaults to 128, Phi-3's epsilon to 1e-5).  Every field
is read with its JSON type checked (``edgerope.models.hf_fields``); all problems in a config are collected and
reported together as one ``ConfigError`` naming the fields.  The rope settings are parsed by
``edgerope.rope.hf`` into typed variants: one for all layers, or (Gemma 3) one for the full-attention and
one for the sliding-window layers.

Families: Llama (Llama 2/3.x, SmolLM2), Mistral, Qwen2, Qwen3, Gemma 3 (text), Phi-3 (Phi-3.5-mini,
Phi-4-mini), SmolLM3.  What this module does not do: decide what llama.cpp can carry (``edgerope.convert``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgerope.errors import ConfigError, EdgeropeError
from edgerope.models.hf_fields import MAX_CONTEXT, MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, Fields
from edgerope.rope.hf import hf_partial_rotary_factor, parse_hf_layer_ropes, parse_hf_rope, to_hf_rope
from edgerope.rope.scaling import DEFAULT_THETA, Default, LongRope, RopeScaling, original_context

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """One model family: names, where its PyTorch model lives, and transformers' defaults for it."""

    model_type: str
    architecture: str  # the transformers class in config.json's "architectures"
    gguf_arch: str  # llama.cpp's general.architecture
    module: str  # edgerope.models.<module> holds its PyTorch model
    default_theta: float = DEFAULT_THETA
    tie_default: bool = False
    eps_default: float = 1e-6
    head_dim_default: int | None = None  # None: hidden_size // num_attention_heads
    act_field: str = "hidden_act"
    act_default: str = "silu"
    acts: tuple[str, ...] = ("silu",)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "llama", "llama"),
        Family("mistral", "MistralForCausalLM", "llama", "llama"),
        Family("qwen2", "Qwen2ForCausalLM", "qwen2", "llama"),
        Family("qwen3", "Qwen3ForCausalLM", "qwen3", "qwen3", head_dim_default=128),
        Family(
            "gemma3_text",
            "Gemma3ForCausalLM",
            "gemma3",
            "gemma3",
            default_theta=1_000_000.0,
            tie_default=True,
            head_dim_default=256,
            act_field="hidden_activation",
            act_default="gelu_pytorch_tanh",
            acts=("gelu_pytorch_tanh",),
        ),
        Family("phi3", "Phi3ForCausalLM", "phi3", "phi3", eps_default=1e-5),
        Family("smollm3", "SmolLM3ForCausalLM", "smollm3", "smollm3", default_theta=2_000_000.0, tie_default=True),
    )
}
# HF architecture class -> (model_type, GGUF architecture); model_type -> (HF class, GGUF architecture)
ARCHITECTURES: dict[str, tuple[str, str]] = {f.architecture: (f.model_type, f.gguf_arch) for f in FAMILIES.values()}
MODEL_TYPES = {f.model_type: (f.architecture, f.gguf_arch) for f in FAMILIES.values()}
GEMMA3_LOCAL_THETA = 10_000.0  # Gemma3TextConfig.default_theta["local"]
GEMMA3_WINDOW, GEMMA3_PATTERN, GEMMA3_QUERY_SCALAR = 4096, 6, 256  # Gemma3TextConfig defaults
PHI3_ORIGINAL_CONTEXT = 4096  # Phi3Config.original_max_position_embeddings default
QWEN3_WINDOW, QWEN3_MAX_WINDOW_LAYERS = 4096, 28  # Qwen3Config defaults
SMOLLM3_NOPE_INTERVAL = 4  # SmolLM3Config.no_rope_layer_interval default
WITH_ATTENTION_BIAS = ("llama", "qwen3", "gemma3_text", "smollm3")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder config of one of ``FAMILIES``. Field names are Hugging Face's."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int
    rope: RopeScaling = field(default_factory=Default)  # the full-attention layers' rope (every layer's, mostly)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o, except Qwen2) biases; Qwen2 always has q/k/v bias
    mlp_bias: bool = False
    hidden_act: str = "silu"  # Gemma 3's hidden_activation
    sliding_window: int | None = None  # in effect: None when the config disables it
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # provenance: was this checkpoint fine-tuned at its scaled rope? (edgerope records it)
    rope_finetuned: bool | None = None
    name: str | None = None
    # family fields (None where a family has none)
    layer_types: tuple[str, ...] | None = None  # per layer FULL / SLIDING (Qwen3, Gemma 3, SmolLM3)
    rope_local: RopeScaling | None = None  # Gemma 3: the sliding-window layers' rope
    partial_rotary_factor: float = 1.0  # Phi-4-mini: 0.75 of each head rotates
    no_rope_layers: tuple[int, ...] | None = None  # SmolLM3: 1 = rope, 0 = no position encoding (NoPE)
    query_pre_attn_scalar: int | None = None  # Gemma 3: attention scale query_pre_attn_scalar ** -0.5
    final_logit_softcapping: float | None = None  # Gemma 3
    attn_logit_softcapping: float | None = None  # Gemma 3

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def architecture(self) -> str:
        return self.family.architecture

    @property
    def gguf_arch(self) -> str:
        return self.family.gguf_arch

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotate (``int(head_dim * partial_rotary_factor)``, as transformers)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        """Whether ``layer`` attends within ``sliding_window`` only (transformers' Llama has no window)."""
        if self.sliding_window is None or self.model_type == "llama":
            return False
        return self.layer_types is None or self.layer_types[layer] == SLIDING

    def uses_rope(self, layer: int) -> bool:
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    def rope_kind(self, layer: int) -> str | None:
        """Which rope ``layer`` applies: ``"global"`` (``rope``), ``"local"`` (``rope_local``) or None (NoPE)."""
        if not self.uses_rope(layer):
            return None
        if self.rope_local is not None and self.layer_types is not None and self.layer_types[layer] == SLIDING:
            return "local"
        return "global"

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        from edgerope.models.layout import hf_tensor_shapes  # the layout module builds on this one

        return sum(math.prod(shape) for shape in hf_tensor_shapes(self).values())

    def replace(self, **changes: Any) -> ModelConfig:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return ModelConfig(**data)

    # ------------------------------------------------------------------ HF I/O

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], *, where: str = "config.json") -> ModelConfig:
        """Build from a parsed HF config dict, reporting every problem at once."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}", where=where)
        model_type = _hf_model_type(raw, where=where)
        fam = FAMILIES[model_type]
        problems: list[str] = []
        f = Fields(raw, problems)
        sizes = _hf_sizes(f, fam)
        rope, rope_local, partial = _hf_rope(raw, fam, problems, where=where)
        values = dict(
            model_type=model_type,
            **sizes,
            rope=rope,
            rope_local=rope_local,
            partial_rotary_factor=partial,
            hidden_act=f.string(fam.act_field, fam.act_default, choices=fam.acts),
            **_hf_options(f, fam),
            **_hf_layers(f, fam, sizes["num_hidden_layers"]),
        )
        _check_relations(values, problems)
        if problems:
            raise ConfigError(
                "invalid model config:\n    - " + "\n    - ".join(problems),
                where=where,
                fix="correct the listed fields in config.json",
            )
        return cls(**values)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError("no config.json found", where=str(model_dir), fix="point at a Hugging Face model folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config.json is not valid JSON: {exc}", where=str(path)) from None
        except RecursionError:
            raise ConfigError("config.json is nested too deeply to be a model config", where=str(path)) from None
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object", where=str(path))
        return cls.from_hf(raw, where=str(path))

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict in the 5.x form (``rope_parameters``) that transformers reads as this config."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            self.family.act_field: self.hidden_act,
            "rope_parameters": to_hf_rope(self.rope, head_dim=self.head_dim),
            "dtype": self.torch_dtype,
        }
        if self.model_type not in ("phi3", "smollm3") or self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        out.update(_hf_family_fields(self))
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
    if isinstance(model_type, str) and model_type in MODEL_TYPES:
        return model_type
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"'architectures' must be a list of class names, got {archs!r}", where=where)
    arch_mt = next((ARCHITECTURES[a][0] for a in archs if a in ARCHITECTURES), None)
    if arch_mt is None:
        fix = f"edgerope supports {', '.join(ARCHITECTURES)}; for other GGUF arches use set-rope/inspect"
        if model_type == "gemma3" or "Gemma3ForConditionalGeneration" in archs:
            fix = (
                "this is the multimodal Gemma 3 (vision tower + language model); edgerope reads the text model "
                "Gemma3ForCausalLM (model_type gemma3_text), as Gemma 3 1B ships it"
            )
        raise ConfigError(
            f"unsupported architecture: model_type={model_type!r}, architectures={archs}", where=where, fix=fix
        )
    return arch_mt


def _hf_sizes(f: Fields, fam: Family) -> dict[str, int]:
    """The shape fields by HF name (1 stands in for a bad one; the problem is recorded)."""
    hidden = f.positive_int("hidden_size", at_most=MAX_DIM)
    heads = f.positive_int("num_attention_heads", at_most=MAX_HEADS)
    return {
        "vocab_size": f.positive_int("vocab_size", at_most=MAX_VOCAB),
        "hidden_size": hidden,
        "intermediate_size": f.positive_int("intermediate_size", at_most=MAX_DIM),
        "num_hidden_layers": f.positive_int("num_hidden_layers", at_most=MAX_LAYERS),
        "num_attention_heads": heads,
        "num_key_value_heads": f.positive_int("num_key_value_heads", heads, at_most=MAX_HEADS),
        "max_position_embeddings": f.positive_int("max_position_embeddings", at_most=MAX_CONTEXT),
        "head_dim": f.positive_int("head_dim", fam.head_dim_default or max(1, hidden // heads), at_most=MAX_DIM),
    }


def _hf_rope(
    raw: Mapping[str, Any], fam: Family, problems: list[str], *, where: str
) -> tuple[RopeScaling, RopeScaling | None, float]:
    """(the rope, the sliding layers' rope for Gemma 3, the partial rotary factor); problems recorded."""
    try:
        if fam.model_type == "gemma3_text":
            ropes = parse_hf_layer_ropes(
                raw, where=where, full_theta=fam.default_theta, sliding_theta=GEMMA3_LOCAL_THETA
            )
            return ropes[FULL], ropes[SLIDING], 1.0
        if fam.model_type == "phi3":  # Phi3Config always has a top-level original length, and it wins
            raw = {**raw, "original_max_position_embeddings": raw.get("original_max_position_embeddings")}
            raw["original_max_position_embeddings"] = raw["original_max_position_embeddings"] or PHI3_ORIGINAL_CONTEXT
            rope = parse_hf_rope(raw, where=where, default_theta=fam.default_theta, partial_rotary=True)
            return rope, None, hf_partial_rotary_factor(raw, where=where)
        return parse_hf_rope(raw, where=where, default_theta=fam.default_theta), None, 1.0
    except EdgeropeError as exc:
        problems.append(exc.what)
        return Default(), None, 1.0


def _hf_options(f: Fields, fam: Family) -> dict[str, Any]:
    """The fields with defaults (norm, biases, special tokens, dtype) and edgerope's provenance record."""
    er = Fields(f.mapping("edgerope"), f.problems, prefix="edgerope.")
    name = er.string("name", None)
    if name is None:
        name = f.string("_name_or_path", None) or None
    dtype = f.string("dtype", None) or f.string("torch_dtype", None) or "float32"
    return {
        "rms_norm_eps": f.number("rms_norm_eps", fam.eps_default),
        "tie_word_embeddings": f.flag("tie_word_embeddings", fam.tie_default),
        # only the families whose transformers class has the field; Qwen2's q/k/v biases are always there
        "attention_bias": f.flag("attention_bias", False) if fam.model_type in WITH_ATTENTION_BIAS else False,
        "mlp_bias": f.flag("mlp_bias", False) if fam.model_type in ("llama", "smollm3") else False,
        "bos_token_id": f.token_id("bos_token_id"),
        "eos_token_id": f.token_id("eos_token_id", many=True),
        "pad_token_id": f.token_id("pad_token_id"),
        "torch_dtype": dtype,
        "rope_finetuned": er.flag("rope_finetuned", None),  # type: ignore[arg-type]
        "name": name,
    }


def _hf_layers(f: Fields, fam: Family, n_layers: int) -> dict[str, Any]:
    """Sliding window, per-layer attention types, NoPE layers and Gemma 3's attention settings, by family."""
    mt = fam.model_type
    if mt in ("llama", "mistral", "qwen2", "phi3"):  # one window for every layer, where the family has one
        window = f.optional_positive_int("sliding_window")
        return {"sliding_window": window if f.flag("use_sliding_window", True) else None}
    if mt == "qwen3":
        window = f.positive_int("sliding_window", QWEN3_WINDOW) if f.flag("use_sliding_window", False) else None
        start = f.non_negative_int("max_window_layers", QWEN3_MAX_WINDOW_LAYERS)
        derived = tuple(SLIDING if window is not None and i >= start else FULL for i in range(n_layers))
        return {"sliding_window": window, "layer_types": _layer_types(f, n_layers, derived)}
    if mt == "smollm3":
        interval = f.positive_int("no_rope_layer_interval", SMOLLM3_NOPE_INTERVAL)
        nope = f.int_list("no_rope_layers", allowed=(0, 1))
        if nope is None:
            nope = tuple(int((i + 1) % interval != 0) for i in range(n_layers))
        elif len(nope) < n_layers:
            f.problems.append(f"'no_rope_layers' has {len(nope)} entries for {n_layers} layers")
            nope = (1,) * n_layers
        window = f.optional_positive_int("sliding_window") if f.flag("use_sliding_window", False) else None
        derived = tuple(SLIDING if window is not None and not nope[i] else FULL for i in range(n_layers))
        return {
            "sliding_window": window,
            "layer_types": _layer_types(f, n_layers, derived),
            "no_rope_layers": tuple(nope[:n_layers]),
        }
    # gemma3_text
    if f.flag("use_bidirectional_attention", False):
        f.problems.append("'use_bidirectional_attention' is true: bidirectional (embedding) Gemma 3 is not supported")
    pattern = f.positive_int("sliding_window_pattern", GEMMA3_PATTERN)
    derived = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))
    return {
        "sliding_window": f.positive_int("sliding_window", GEMMA3_WINDOW),
        "layer_types": _layer_types(f, n_layers, derived),
        "query_pre_attn_scalar": f.positive_int("query_pre_attn_scalar", GEMMA3_QUERY_SCALAR),
        "final_logit_softcapping": f.optional_number("final_logit_softcapping"),
        "attn_logit_softcapping": f.optional_number("attn_logit_softcapping"),
    }


def _layer_types(f: Fields, n_layers: int, derived: tuple[str, ...]) -> tuple[str, ...]:
    given = f.str_list("layer_types", allowed=(FULL, SLIDING))
    if given is None:
        return derived
    if len(given) != n_layers:
        f.problems.append(f"'layer_types' has {len(given)} entries for {n_layers} layers")
        return derived
    return given


def _check_relations(v: dict[str, Any], problems: list[str]) -> None:
    """Checks across fields: head grouping, rotary dims, LongRoPE factor counts."""
    heads, kv_heads = v["num_attention_heads"], v["num_key_value_heads"]
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if v["head_dim"] % 2:
        problems.append(f"head_dim must be a positive even integer, got {v['head_dim']!r}")
    rot = int(v["head_dim"] * v["partial_rotary_factor"])
    if rot < 2 or rot % 2:
        problems.append(
            f"the rotary dimension int(head_dim {v['head_dim']} x partial_rotary_factor "
            f"{v['partial_rotary_factor']:g}) = {rot} must be a positive even number"
        )
    for rope in (v["rope"], v["rope_local"]):
        if isinstance(rope, LongRope) and not len(rope.short_factor) == len(rope.long_factor) == rot // 2:
            problems.append(
                f"longrope short_factor/long_factor have {len(rope.short_factor)}/{len(rope.long_factor)} entries, "
                f"the rotary dimension {rot} needs {rot // 2}"
            )


# --------------------------------------------------------------------------- writing HF config.json


def _hf_family_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The fields of ``config.json`` only some families have."""
    mt = cfg.model_type
    if mt == "llama":
        return {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}
    if mt == "mistral":
        return {"sliding_window": cfg.sliding_window}
    if mt == "qwen2":
        return {"sliding_window": cfg.sliding_window, "use_sliding_window": False}
    if mt == "qwen3":
        return {
            "attention_bias": cfg.attention_bias,
            "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window,
            "layer_types": list(cfg.layer_types or ()),
        }
    if mt == "phi3":
        out: dict[str, Any] = {"sliding_window": cfg.sliding_window}
        if (orig := original_context(cfg.rope)) is not None:
            out["original_max_position_embeddings"] = orig
        if cfg.partial_rotary_factor != 1.0:
            rope = to_hf_rope(cfg.rope, head_dim=cfg.head_dim)
            out["rope_parameters"] = {**rope, "partial_rotary_factor": cfg.partial_rotary_factor}
        return out
    if mt == "smollm3":
        return {
            "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias,
            "no_rope_layers": list(cfg.no_rope_layers or ()),
            "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window,
            "layer_types": list(cfg.layer_types or ()),
        }
    # gemma3_text
    assert cfg.rope_local is not None
    return {
        "rope_parameters": {
            FULL: to_hf_rope(cfg.rope, head_dim=cfg.head_dim),
            SLIDING: to_hf_rope(cfg.rope_local, head_dim=cfg.head_dim),
        },
        "attention_bias": cfg.attention_bias,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "sliding_window": cfg.sliding_window,
        "layer_types": list(cfg.layer_types or ()),
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "use_bidirectional_attention": False,
    }
