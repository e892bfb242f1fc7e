"""All rope scaling math, in one place.

Every supported scaling method is a frozen dataclass (a closed set, see
``RopeScaling``).  Each reduces to two things that both the PyTorch model and
the GGUF exporter use:

* ``inv_freq(rope, dim)`` -- the per-pair inverse frequencies, shape (dim/2,);
* ``attention_factor(rope)`` -- the magnitude multiplied into cos and sin
  (so q.k scales by its square).

The formulas follow transformers >= 4.56 (explicit YaRN factor,
``original_max_position_embeddings`` honoured); see ``docs/llama_cpp.md`` §4.

What this module does not do: read or write Hugging Face config dicts (that
is ``edgerope.rope.hf``), or decide how a variant is stored in GGUF or what
llama.cpp computes from GGUF keys -- that is ``edgerope.rope.ggml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgerope.errors import RopeConfigError

DEFAULT_THETA = 10000.0
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class Default:
    """Plain RoPE: inv_freq_i = theta^(-2i/d)."""

    theta: float = DEFAULT_THETA
    name = "default"


@dataclass(frozen=True)
class Linear:
    """Position interpolation (PI): every frequency divided by ``factor``."""

    theta: float
    factor: float
    name = "linear"


@dataclass(frozen=True)
class NtkAware:
    """Static NTK-aware scaling: a new base theta * alpha^(d/(d-2)), no other change.

    Hugging Face has no rope type for it; it is stored as ``rope_theta`` = the
    new base with the default type, and in GGUF as ``rope.freq_base``.
    """

    theta: float
    alpha: float
    name = "ntk"


@dataclass(frozen=True)
class DynamicNtk:
    """Hugging Face ``dynamic``: the base grows with the current sequence length.

    Parsed so that it can be named in errors; it has no fixed-function form
    (the base depends on each forward's length), so it cannot be exported.
    """

    theta: float
    factor: float
    max_position_embeddings: int
    name = "dynamic"


@dataclass(frozen=True)
class Yarn:
    """YaRN: NTK-by-parts interpolation plus an attention temperature."""

    theta: float
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = YARN_BETA_FAST
    beta_slow: float = YARN_BETA_SLOW
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    name = "yarn"


@dataclass(frozen=True)
class Llama3:
    """Llama 3.1 per-band scaling: low frequencies by ``factor``, high ones kept, a smooth band between."""

    theta: float
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    name = "llama3"


@dataclass(frozen=True)
class LongRope:
    """LongRoPE: searched per-pair factors, a short set within the original window and a long set past it."""

    theta: float
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float
    attention_factor: float | None = None
    name = "longrope"


RopeScaling = Default | Linear | NtkAware | DynamicNtk | Yarn | Llama3 | LongRope
VARIANTS: dict[str, type] = {c.name: c for c in (Default, Linear, NtkAware, DynamicNtk, Yarn, Llama3, LongRope)}


# --------------------------------------------------------------------------- math


def base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Unscaled inverse frequencies theta^(-2i/dim), i = 0..dim/2-1, float64, shape (dim/2,)."""
    if dim <= 0 or dim % 2:
        raise RopeConfigError(f"rope dimension must be a positive even number, got {dim}")
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def ntk_theta(theta: float, alpha: float, dim: int) -> float:
    """The NTK-aware base for a scale ``alpha``: theta * alpha^(dim/(dim-2))."""
    return theta * alpha ** (dim / (dim - 2))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude g(F, m) = 1 + 0.1 m ln F (1 for F <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_range(
    *, dim: int, theta: float, original_context: int, beta_fast: float, beta_slow: float, truncate: bool = True
) -> tuple[float, float]:
    """The pair-index band [low, high] over which YaRN blends interpolation and extrapolation."""

    def corr(beta: float) -> float:
        return dim * math.log(original_context / (beta * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_extrapolation_weight(rope: Yarn, dim: int) -> np.ndarray:
    """Per-pair weight of the *unscaled* frequency (1 = extrapolate, 0 = interpolate by F), shape (dim/2,)."""
    low, high = yarn_correction_range(
        dim=dim,
        theta=rope.theta,
        original_context=rope.original_max_position_embeddings,
        beta_fast=rope.beta_fast,
        beta_slow=rope.beta_slow,
        truncate=rope.truncate,
    )
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return 1.0 - ramp


def llama3_freq_factors(rope: Llama3, dim: int) -> np.ndarray:
    """Per-pair divisors ff_i (inv_freq = base_inv_freq / ff), shape (dim/2,): 1, F, or the smooth band."""
    inv = base_inv_freq(rope.theta, dim)
    wavelen = 2 * math.pi / inv
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    mid = 1.0 / ((1.0 - smooth) / rope.factor + smooth)
    ff = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, rope.factor, mid))
    return ff.astype(np.float64)


def longrope_factors(rope: LongRope, *, seq_len: int | None) -> np.ndarray:
    """The LongRoPE factor set Hugging Face picks for a forward of ``seq_len`` positions."""
    long = seq_len is not None and seq_len > rope.original_max_position_embeddings
    return np.asarray(rope.long_factor if long else rope.short_factor, dtype=np.float64)


def dynamic_theta(rope: DynamicNtk, dim: int, seq_len: int | None) -> float:
    """Hugging Face's dynamic-NTK base for a forward whose largest position is ``seq_len - 1``."""
    length = max(seq_len or 0, rope.max_position_embeddings)
    scale = rope.factor * length / rope.max_position_embeddings - (rope.factor - 1)
    return rope.theta * scale ** (dim / (dim - 2))


def inv_freq(rope: RopeScaling, dim: int, *, seq_len: int | None = None) -> np.ndarray:
    """Inverse frequencies of ``rope`` for rotary dimension ``dim``, float64, shape (dim/2,).

    ``seq_len`` (= max position + 1 of the forward) matters only for the
    length-dependent methods, ``DynamicNtk`` and ``LongRope``.
    """
    match rope:
        case Default():
            return base_inv_freq(rope.theta, dim)
        case Linear():
            return base_inv_freq(rope.theta, dim) / rope.factor
        case NtkAware():
            return base_inv_freq(ntk_theta(rope.theta, rope.alpha, dim), dim)
        case DynamicNtk():
            return base_inv_freq(dynamic_theta(rope, dim, seq_len), dim)
        case Yarn():
            base = base_inv_freq(rope.theta, dim)
            w = yarn_extrapolation_weight(rope, dim)
            return base / rope.factor * (1.0 - w) + base * w
        case Llama3():
            return base_inv_freq(rope.theta, dim) / llama3_freq_factors(rope, dim)
        case LongRope():
            ext = longrope_factors(rope, seq_len=seq_len)
            if ext.shape != (dim // 2,):
                raise RopeConfigError(
                    f"longrope factors have {ext.size} entries, the rotary dimension needs {dim // 2}",
                    fix="give short_factor and long_factor with head_dim/2 entries each",
                )
            return base_inv_freq(rope.theta, dim) / ext
    raise TypeError(f"not a rope scaling variant: {rope!r}")


def attention_factor(rope: RopeScaling) -> float:
    """The magnitude multiplied into cos and sin (1 for all but YaRN and LongRoPE)."""
    match rope:
        case Yarn():
            if rope.attention_factor is not None:
                return float(rope.attention_factor)
            if rope.mscale and rope.mscale_all_dim:
                return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
            return yarn_mscale(rope.factor)
        case LongRope():
            if rope.attention_factor is not None:
                return float(rope.attention_factor)
            if rope.factor <= 1:
                return 1.0
            return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
    return 1.0


def scale_factor(rope: RopeScaling) -> float:
    """The nominal context multiplier of a method (1 for none)."""
    match rope:
        case Default():
            return 1.0
        case NtkAware():
            return rope.alpha
    return float(rope.factor)


def original_context(rope: RopeScaling) -> int | None:
    """The pre-training context a method extends from, when the method records it."""
    match rope:
        case Yarn() | Llama3() | LongRope():
            return rope.original_max_position_embeddings
        case DynamicNtk():
            return rope.max_position_embeddings
    return None


def describe(rope: RopeScaling) -> str:
    """One line in words, e.g. ``yarn x8 from 256 (theta 10000, attention factor 1.2079)``."""
    parts = [rope.name]
    if not isinstance(rope, Default):
        parts.append(f"x{scale_factor(rope):g}")
    if (orig := original_context(rope)) is not None:
        parts.append(f"from {orig}")
    extra = [f"theta {rope.theta:g}"]
    if attention_factor(rope) != 1.0:
        extra.append(f"attention factor {attention_factor(rope):.6g}")
    if isinstance(rope, Yarn) and (rope.beta_fast, rope.beta_slow) != (YARN_BETA_FAST, YARN_BETA_SLOW):
        extra.append(f"beta_fast {rope.beta_fast:g}, beta_slow {rope.beta_slow:g}")
    return " ".join(parts) + f" ({', '.join(extra)})"


def validate_for_context(rope: RopeScaling, *, context_length: int, where: str = "rope") -> None:
    """Check that a scaled context is consistent: factor > 1 for YaRN, original < extended context."""
    match rope:
        case Yarn() | Linear() | Llama3():
            if rope.factor <= 1:
                raise RopeConfigError(
                    f"{rope.name} factor must be > 1 to extend the context, got {rope.factor:g}",
                    where=where,
                    fix="use a factor such as 4 or 8, or rope type 'default' for no scaling",
                )
    orig = original_context(rope)
    if orig is not None and not isinstance(rope, DynamicNtk) and orig >= context_length:
        raise RopeConfigError(
            f"original context {orig} must be smaller than the context length {context_length}",
            where=where,
            fix=f"set the context length to factor x original, e.g. {int(scale_factor(rope) * orig)}",
        )
