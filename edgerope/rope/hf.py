"""The Hugging Face config forms of rope scaling: parse them into a typed variant, write one back.

``parse_hf_rope`` turns a Hugging Face ``config.json`` (4.x ``rope_scaling`` +
``rope_theta`` or 5.x ``rope_parameters``) into a variant of
``edgerope.rope.scaling``; ``to_hf_rope`` writes one back.  The set of types
and keys is closed: anything unknown is a ``RopeConfigError``, never skipped.
Parsing runs in named steps: locate the rope dict, read the settings every type
shares (base, partial rotary, type, keys), then one parser per rope type.
``parse_hf_layer_ropes`` reads the per-layer-type form (Gemma 3: one rope for
the full-attention layers, one for the sliding-window layers) and
``hf_partial_rotary_factor`` the fraction of each head that rotates (Phi-4-mini).

What this module does not do: rope math (``edgerope.rope.scaling``) or GGUF
keys (``edgerope.rope.ggml``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from edgerope.errors import RopeConfigError
from edgerope.rope.scaling import (
    DEFAULT_THETA,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    Default,
    DynamicNtk,
    Linear,
    Llama3,
    LongRope,
    NtkAware,
    RopeScaling,
    Yarn,
    describe,
    ntk_theta,
)

_KNOWN_KEYS: dict[str, set[str]] = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "longrope": {"short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"},
    "ntk": {"alpha", "factor"},
}
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _number(d: Mapping[str, Any], key: str, where: str, *, positive: bool = True) -> float:
    if key not in d or d[key] is None:
        raise RopeConfigError(f"rope scaling is missing '{key}'", where=where, fix=f"add '{key}' to the rope config")
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RopeConfigError(f"rope '{key}' must be a number, got {value!r}", where=where)
    if positive and value <= 0:
        raise RopeConfigError(f"rope '{key}' must be > 0, got {value!r}", where=where)
    return float(value)


def _factor_list(d: Mapping[str, Any], key: str, where: str) -> tuple[float, ...]:
    value = d.get(key)
    if not isinstance(value, (list, tuple)) or not value:
        raise RopeConfigError(f"longrope '{key}' must be a non-empty list of numbers", where=where)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RopeConfigError(f"longrope '{key}' must hold numbers only", where=where) from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise RopeConfigError(f"longrope '{key}' entries must be finite and > 0", where=where)
    return out


# --------------------------------------------------------------------------- locating the rope dict


def _parse_both_forms(
    config: Mapping[str, Any], *, where: str, default_theta: float, partial_rotary: bool
) -> RopeScaling:
    """Both ``rope_parameters`` and ``rope_scaling`` present: parse each alone, they must mean the same."""
    kw = {"where": where, "default_theta": default_theta, "partial_rotary": partial_rotary}
    v5 = parse_hf_rope({k: v for k, v in config.items() if k != "rope_scaling"}, **kw)
    v4 = parse_hf_rope({k: v for k, v in config.items() if k != "rope_parameters"}, **kw)
    if v5 != v4:
        raise RopeConfigError(
            f"rope_parameters ({describe(v5)}) and rope_scaling ({describe(v4)}) disagree",
            where=where,
            fix="keep one of them in config.json (transformers 5.x lets rope_scaling win, llama.cpp's "
            "converter reads rope_parameters)",
        )
    return v5


def _locate_rope_dict(config: Mapping[str, Any], where: str) -> tuple[Mapping[str, Any], str]:
    """The rope dict (5.x ``rope_parameters``, else 4.x ``rope_scaling``, else empty) and the ``where`` naming it."""
    raw = config.get("rope_parameters")
    key_name = "rope_parameters"
    if raw is None:
        raw = config.get("rope_scaling")
        key_name = "rope_scaling"
    where = f"{where}: {key_name}" if raw else where
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RopeConfigError(f"'{key_name}' must be an object, got {type(raw).__name__}", where=where)
    if any(isinstance(v, Mapping) for v in raw.values()):
        raise RopeConfigError(
            "per-layer-type rope parameters (a nested rope config) are not read for this model family",
            where=where,
            fix="one rope setting for all layers, except Gemma 3 (full_attention / sliding_attention)",
        )
    return raw, where


# --------------------------------------------------------------------------- settings every type shares


def _theta(raw: Mapping[str, Any], config: Mapping[str, Any], where: str, default: float) -> float:
    """The base: the rope dict's ``rope_theta`` (5.x), else the top-level one (4.x), else the family's default."""
    theta = raw.get("rope_theta", config.get("rope_theta", default))
    return _number({"rope_theta": theta}, "rope_theta", where)


def hf_partial_rotary_factor(config: Mapping[str, Any], *, where: str = "config.json") -> float:
    """The fraction of each head that rotates: the 5.x rope dict's ``partial_rotary_factor``, else the top-level
    (4.x) one, else 1.  Both present and different is an error; so is a value outside (0, 1]."""
    raw = config.get("rope_parameters")
    in_dict = raw.get("partial_rotary_factor") if isinstance(raw, Mapping) else None
    top = config.get("partial_rotary_factor")
    if in_dict is not None and top is not None and in_dict != top:
        raise RopeConfigError(
            f"partial_rotary_factor is {top!r} at the top level but {in_dict!r} in rope_parameters",
            where=where,
            fix="keep one value (transformers 5.x reads the one in rope_parameters)",
        )
    value = in_dict if in_dict is not None else top
    if value is None:
        return 1.0
    factor = _number({"partial_rotary_factor": value}, "partial_rotary_factor", where)
    if factor > 1:
        raise RopeConfigError(f"partial_rotary_factor must be in (0, 1], got {value!r}", where=where)
    return factor


def _check_full_rotary(config: Mapping[str, Any], where: str) -> None:
    partial = hf_partial_rotary_factor(config, where=where)
    if partial != 1.0:
        raise RopeConfigError(
            f"partial rotary embeddings (partial_rotary_factor={partial:g}) are not supported for this model family",
            where=where,
            fix="only Phi-3 (Phi-4-mini) checkpoints rotate part of each head; other families rotate it whole",
        )


def _rope_type(raw: Mapping[str, Any], where: str) -> str:
    """The rope type (``rope_type``, legacy ``type``, else default), checked with its keys against the closed set."""
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if not isinstance(rope_type, str):
        raise RopeConfigError(
            f"the rope type must be a string, got {rope_type!r}",
            where=where,
            fix=f"use one of: {', '.join(sorted(_KNOWN_KEYS))}",
        )
    if rope_type == "su":  # the Phi-3 preview name of longrope
        rope_type = "longrope"
    if rope_type not in _KNOWN_KEYS:
        raise RopeConfigError(
            f"unknown rope type {rope_type!r}",
            where=where,
            fix=f"use one of: {', '.join(sorted(_KNOWN_KEYS))}",
        )
    unknown = set(raw) - _KNOWN_KEYS[rope_type] - _COMMON_KEYS
    if unknown:
        raise RopeConfigError(
            f"unknown key(s) for rope type {rope_type!r}: {', '.join(sorted(unknown))}",
            where=where,
            fix=f"allowed keys: {', '.join(sorted(_KNOWN_KEYS[rope_type] | {'rope_type', 'rope_theta'}))}",
        )
    return rope_type


@dataclass(frozen=True)
class _RopeSource:
    """What a per-type parser reads: the whole config, its located rope dict, and the shared settings."""

    config: Mapping[str, Any]
    raw: Mapping[str, Any]
    rope_type: str
    theta: float
    where: str

    @property
    def max_pos(self) -> Any:
        return self.config.get("max_position_embeddings")

    def orig_ctx(self) -> int:
        """``original_max_position_embeddings`` the way transformers 5.x resolves it: top-level attribute
        first, then the rope dict, then ``max_position_embeddings``."""
        value = self.config.get("original_max_position_embeddings") or self.raw.get("original_max_position_embeddings")
        value = value or self.max_pos
        if value is None:
            raise RopeConfigError(
                f"rope type {self.rope_type!r} needs original_max_position_embeddings",
                where=self.where,
                fix="add original_max_position_embeddings (the pre-training context) to the rope config",
            )
        return int(_number({"original_max_position_embeddings": value}, "original_max_position_embeddings", self.where))

    def number(self, key: str, *, positive: bool = True) -> float:
        return _number(self.raw, key, self.where, positive=positive)


# --------------------------------------------------------------------------- one parser per rope type


def _parse_default(src: _RopeSource) -> RopeScaling:
    return Default(theta=src.theta)


def _parse_linear(src: _RopeSource) -> RopeScaling:
    return Linear(theta=src.theta, factor=src.number("factor"))


def _parse_ntk(src: _RopeSource) -> RopeScaling:
    alpha = src.raw.get("alpha", src.raw.get("factor"))
    return NtkAware(theta=src.theta, alpha=_number({"alpha": alpha}, "alpha", src.where))


def _parse_dynamic(src: _RopeSource) -> RopeScaling:
    if src.max_pos is None:
        raise RopeConfigError("dynamic rope needs max_position_embeddings", where=src.where)
    return DynamicNtk(theta=src.theta, factor=src.number("factor"), max_position_embeddings=int(src.max_pos))


def _parse_yarn(src: _RopeSource) -> RopeScaling:
    raw = src.raw
    orig = src.orig_ctx()
    factor = raw.get("factor")
    factor = src.number("factor") if factor is not None else (src.max_pos or orig) / orig
    opt = {
        k: src.number(k, positive=False)
        for k in ("attention_factor", "mscale", "mscale_all_dim")
        if raw.get(k) is not None
    }
    return Yarn(
        theta=src.theta,
        factor=factor,
        original_max_position_embeddings=orig,
        beta_fast=float(raw.get("beta_fast") or YARN_BETA_FAST),
        beta_slow=float(raw.get("beta_slow") or YARN_BETA_SLOW),
        truncate=bool(raw.get("truncate", True)),
        **opt,
    )


def _parse_llama3(src: _RopeSource) -> RopeScaling:
    return Llama3(
        theta=src.theta,
        factor=src.number("factor"),
        low_freq_factor=src.number("low_freq_factor"),
        high_freq_factor=src.number("high_freq_factor"),
        original_max_position_embeddings=src.orig_ctx(),
    )


def _parse_longrope(src: _RopeSource) -> RopeScaling:
    raw = src.raw
    orig = src.orig_ctx()
    factor = raw.get("factor")
    if factor is None:
        factor = (src.max_pos or orig) / orig
    att = raw.get("attention_factor")
    return LongRope(
        theta=src.theta,
        short_factor=_factor_list(raw, "short_factor", src.where),
        long_factor=_factor_list(raw, "long_factor", src.where),
        original_max_position_embeddings=orig,
        factor=_number({"factor": factor}, "factor", src.where),
        attention_factor=None if att is None else src.number("attention_factor"),
    )


# the same closed set as _KNOWN_KEYS
_PARSERS: dict[str, Callable[[_RopeSource], RopeScaling]] = {
    "default": _parse_default,
    "linear": _parse_linear,
    "ntk": _parse_ntk,
    "dynamic": _parse_dynamic,
    "yarn": _parse_yarn,
    "llama3": _parse_llama3,
    "longrope": _parse_longrope,
}


# --------------------------------------------------------------------------- the public pair


def parse_hf_rope(
    config: Mapping[str, Any],
    *,
    where: str = "config.json",
    default_theta: float = DEFAULT_THETA,
    partial_rotary: bool = False,
) -> RopeScaling:
    """Parse the rope settings of a Hugging Face config dict into a typed variant.

    Accepts the 5.x ``rope_parameters`` form and the 4.x ``rope_scaling`` plus
    top-level ``rope_theta`` form (legacy ``type`` key included).  Resolves
    ``original_max_position_embeddings`` the way transformers 5.x does
    (top-level attribute first, then the rope dict, then
    ``max_position_embeddings``).  Unknown types and keys are errors, and so
    are both forms present with different meanings (transformers 5.x would
    use ``rope_scaling``, llama.cpp's converter ``rope_parameters``).
    ``default_theta`` is the family's base when the config names none (transformers keeps one per config
    class); ``partial_rotary`` accepts a ``partial_rotary_factor`` below 1 (read it with
    ``hf_partial_rotary_factor``), otherwise it is refused.
    """
    if config.get("rope_parameters") and config.get("rope_scaling"):
        return _parse_both_forms(config, where=where, default_theta=default_theta, partial_rotary=partial_rotary)
    raw, where = _locate_rope_dict(config, where)
    theta = _theta(raw, config, where, default_theta)
    if partial_rotary:
        hf_partial_rotary_factor(config, where=where)
    else:
        _check_full_rotary(config, where)
    rope_type = _rope_type(raw, where)
    src = _RopeSource(config=config, raw=raw, rope_type=rope_type, theta=theta, where=where)
    return _PARSERS[rope_type](src)


LAYER_TYPES = ("full_attention", "sliding_attention")


def parse_hf_layer_ropes(
    config: Mapping[str, Any],
    *,
    where: str = "config.json",
    full_theta: float,
    sliding_theta: float,
    sliding_theta_key: str = "rope_local_base_freq",
) -> dict[str, RopeScaling]:
    """The rope of each layer type, ``{"full_attention": ..., "sliding_attention": ...}`` (the Gemma 3 layout).

    5.x: ``rope_parameters`` holds one dict per layer type, each parsed like a flat rope dict (missing bases
    default to the top-level ``rope_theta`` / ``sliding_theta_key``, else ``full_theta`` / ``sliding_theta``).
    4.x: ``rope_scaling`` + ``rope_theta`` describe the full-attention layers, the sliding layers are plain
    rope at ``sliding_theta_key``.  A flat 5.x ``rope_parameters`` (no layer types) is refused: transformers
    keeps it but computes plain rope for both layer types from its own defaults, so its meaning is ambiguous.
    """
    raw = config.get("rope_parameters")
    max_pos = {"max_position_embeddings": config.get("max_position_embeddings")}
    top_theta = config.get("rope_theta", full_theta)
    local_theta = config.get(sliding_theta_key, sliding_theta)
    if raw is None:  # 4.x
        legacy = config.get("rope_scaling")
        if isinstance(legacy, Mapping) and "type" in legacy and "rope_type" not in legacy:
            raise RopeConfigError(
                f"rope_scaling names its type with the legacy key 'type' ({legacy['type']!r}): transformers 5.x "
                "merges it into the full-attention rope, which keeps rope_type 'default', so it computes plain "
                "rope, while llama.cpp's converter applies the scaling",
                where=f"{where}: rope_scaling",
                fix=f'write "rope_type": {json.dumps(legacy["type"])} (the released Gemma 3 configs do)',
            )
        v4 = {**max_pos, "rope_theta": top_theta, "rope_scaling": legacy}
        full = parse_hf_rope(v4, where=where, default_theta=full_theta)
        local = parse_hf_rope({**max_pos, "rope_theta": local_theta}, where=f"{where}: {sliding_theta_key}")
        return {"full_attention": full, "sliding_attention": local}
    base_where, where = where, f"{where}: rope_parameters"
    if not isinstance(raw, Mapping):
        raise RopeConfigError(f"'rope_parameters' must be an object, got {type(raw).__name__}", where=where)
    if config.get("rope_scaling"):
        raise RopeConfigError(
            "both rope_parameters and rope_scaling are present",
            where=where,
            fix="keep rope_parameters with one dict per layer type (transformers 5.x merges rope_scaling into the "
            "full_attention one, llama.cpp's converter reads rope_parameters)",
        )
    if set(raw) != set(LAYER_TYPES) or not all(isinstance(raw[k], Mapping) for k in LAYER_TYPES):
        raise RopeConfigError(
            f"rope_parameters must hold exactly the layer types {', '.join(LAYER_TYPES)}, got keys "
            f"{', '.join(map(str, raw)) or 'none'}",
            where=where,
            fix='write {"full_attention": {"rope_type": ..., "rope_theta": ...}, "sliding_attention": {...}}; '
            "a flat rope dict is ignored by transformers for this family",
        )
    out = {}
    for layer_type, default in (("full_attention", top_theta), ("sliding_attention", local_theta)):
        sub = {**max_pos, "rope_parameters": {"rope_theta": default, **raw[layer_type]}}
        out[layer_type] = parse_hf_rope(sub, where=f"{base_where} ({layer_type})")
    return out


def to_hf_rope(rope: RopeScaling, *, head_dim: int) -> dict[str, Any]:
    """The 5.x ``rope_parameters`` dict for ``rope`` (NTK-aware becomes ``default`` with the new base)."""
    if isinstance(rope, NtkAware):
        return {"rope_type": "default", "rope_theta": ntk_theta(rope.theta, rope.alpha, head_dim)}
    out: dict[str, Any] = {"rope_type": rope.name, "rope_theta": rope.theta}
    for f in fields(rope):
        if f.name == "theta":
            continue
        value = getattr(rope, f.name)
        if f.name == "max_position_embeddings":
            continue
        if value is None:
            continue
        if isinstance(rope, Yarn) and f.name in ("beta_fast", "beta_slow", "truncate") and value == f.default:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
