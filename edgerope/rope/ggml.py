"""The rope function llama.cpp computes, and how each edgerope variant is stored in GGUF.

``LlamaCppRope.from_gguf`` resolves GGUF rope keys (and runtime overrides) the way llama.cpp's loader and
context do (docs/llama_cpp.md §1-§3) into the per-pair angles and the cos/sin magnitude the ggml kernel will
use.  The other direction, a variant's GGUF form checked against this function, is
``edgerope.rope.gguf_plan``.

Nothing here touches files or llama_cpp; GGUF I/O lives in ``edgerope.gguf.reader``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import Keys

from edgerope.errors import GGUFError
from edgerope.rope import scaling

# Architectures whose loader reads the optional YaRN keys (docs/llama_cpp.md §1).
ARCHS_READING_YARN_BETAS = frozenset({"grok", "mistral3"})
ARCHS_READING_YARN_EXT_ATTN = frozenset({"grok"})
ARCHS_READING_YARN_LOG_MUL = frozenset({"deepseek2", "deepseek32", "mistral3"})
# Architectures that rotate (x[i], x[i+d/2]) -- HF layout, no Q/K permutation at conversion.
NEOX_ARCHS = frozenset(
    {
        "qwen",
        "qwen2",
        "qwen2moe",
        "qwen3",
        "qwen3moe",
        "phi2",
        "phi3",
        "gemma",
        "gemma2",
        "gemma3",
        "stablelm",
        "falcon",
        "gptneox",
        "olmo2",
        "starcoder2",
        "exaone",
        "gpt-oss",
    }
)
SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# llama_rope_scaling_type values a runtime may pass (-1, "from model", resolves to the GGUF's type)
_RUNTIME_SCALING_TYPES = {0: "none", 1: "linear", 2: "yarn", 3: "longrope"}
VERIFY_RTOL = 1e-9

ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS_LONG = "rope_factors_long.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"
ROPE_TENSORS = (ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)
# The frequency-factor tensors each arch's loader creates and its graph hands to ggml_rope_ext
# (src/models/<arch>.cpp); elsewhere (qwen2, qwen3, gemma3, smollm3, ...) a factor tensor is an unused tensor
# and the load fails ("wrong number of tensors"), so llama3 / longrope cannot be carried there.
ARCH_ROPE_FACTOR_TENSORS: dict[str, tuple[str, ...]] = {
    "llama": ROPE_TENSORS,
    "phi3": (ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT),
}
# Arches whose sliding-window layers rope with a base of their own and no scaling: ``get_rope_freq_base/scale``
# return ``rope.freq_base_swa`` (default 10000) and freq_scale_swa = 1 for them (docs/llama_cpp.md §12.2); the
# YaRN ext_factor and the attention factor of the context still apply to them.
SWA_ROPE_ARCHS = frozenset({"gemma3"})
DEFAULT_SWA_FREQ_BASE = 10000.0
LAYER_KINDS = ("full", "sliding")


def key(template: str, arch: str) -> str:
    """Format a ``gguf.Keys`` template such as ``{arch}.rope.freq_base``."""
    return template.format(arch=arch)


@dataclass(frozen=True)
class LlamaCppRope:
    """The arguments every ``ggml_rope_ext`` call receives, after llama.cpp's resolution.

    ``attn_factor`` is the value handed to the kernel (cparams.yarn_attn_factor),
    which the kernel multiplies by (1 + 0.1 ln F) again when ext_factor != 0.
    """

    freq_base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    n_ctx_orig: int
    freq_factors: tuple[float, ...] | None = None

    def inv_freq(self, dim: int) -> np.ndarray:
        """Effective per-pair angle per position, float64, shape (dim/2,) -- ggml's rope_yarn in closed form."""
        extrap = scaling.base_inv_freq(self.freq_base, dim)
        if self.freq_factors is not None:
            ff = np.asarray(self.freq_factors, dtype=np.float64)
            if ff.shape != extrap.shape:
                raise GGUFError(f"rope frequency factors have {ff.size} entries, rope dimension {dim} needs {dim // 2}")
            extrap = extrap / ff
        interp = self.freq_scale * extrap
        if self.ext_factor == 0:
            return interp
        mix = self.extrapolation_mix(dim)
        return interp * (1.0 - mix) + extrap * mix

    def extrapolation_mix(self, dim: int) -> np.ndarray:
        """Per-pair weight of the unscaled angle (1 = extrapolated, 0 = interpolated by freq_scale), shape (dim/2,)."""
        if self.ext_factor == 0:
            return np.zeros(dim // 2)
        low, high = scaling.yarn_correction_range(
            dim=dim,
            theta=self.freq_base,
            original_context=self.n_ctx_orig,
            beta_fast=self.beta_fast,
            beta_slow=self.beta_slow,
        )
        ramp = 1.0 - np.clip((np.arange(dim // 2) - low) / max(0.001, high - low), 0.0, 1.0)
        return ramp * self.ext_factor

    @property
    def magnitude(self) -> float:
        """The factor multiplied into cos and sin (q.k scales by its square)."""
        if self.ext_factor != 0:
            return self.attn_factor * (1.0 + 0.1 * math.log(1.0 / self.freq_scale))
        return self.attn_factor

    @classmethod
    def from_gguf(
        cls,
        arch: str,
        kv: Mapping[str, Any],
        *,
        tensors: Mapping[str, np.ndarray] | None = None,
        n_ctx: int | None = None,
        n_seq_max: int = 1,
        runtime: Mapping[str, float] | None = None,
        layer: str = "full",
    ) -> LlamaCppRope:
        """Resolve the rope function from GGUF metadata ``kv`` (key -> python value) like llama.cpp does.

        ``tensors`` holds any frequency-factor tensors present (name -> values);
        ``n_ctx`` is the context a runtime would allocate (LongRoPE switches on it);
        ``runtime`` holds llama_context_params rope overrides (llama-cpp-python names,
        C sentinels: <0 / 0 mean "from model"); ``layer`` is ``"full"`` or, on ``SWA_ROPE_ARCHS`` with a
        sliding window, ``"sliding"``: the sliding-window layers' own base, never scaled.
        """
        if layer not in LAYER_KINDS:
            raise ValueError(f"layer must be one of {LAYER_KINDS}, got {layer!r}")
        tensors = tensors or {}
        rt = dict(runtime or {})
        model = _ModelRope.read(arch, kv)
        rtype = {-1: model.scaling_type, **_RUNTIME_SCALING_TYPES}[int(rt.get("rope_scaling_type", -1))]
        base = rt.get("rope_freq_base") or model.freq_base
        scale = rt.get("rope_freq_scale") or model.freq_scale
        if rtype == "none":
            scale = 1.0
        ext = _ext_factor(arch, kv, rt, rtype=rtype)
        attn = _kernel_attn_factor(arch, kv, rt, ext=ext, scale=scale) * model.attn_factor
        beta_fast, beta_slow = _yarn_betas(arch, kv, rt)
        n_ctx_orig = int(rt["yarn_orig_ctx"]) if rt.get("yarn_orig_ctx") else model.n_ctx_orig
        ff = _freq_factors(arch, model, tensors, n_ctx=n_ctx, n_seq_max=n_seq_max, n_ctx_orig=n_ctx_orig)
        if layer == "sliding":
            base, scale = _sliding_base(arch, kv), 1.0
        return cls(
            freq_base=float(base),
            freq_scale=float(scale),
            ext_factor=float(ext),
            attn_factor=float(attn),
            beta_fast=float(beta_fast),
            beta_slow=float(beta_slow),
            n_ctx_orig=int(n_ctx_orig),
            freq_factors=None if ff is None else tuple(float(x) for x in np.asarray(ff).ravel()),
        )


# --------------------------------------------------------------------------- llama.cpp's resolution, step by step


def _get(kv: Mapping[str, Any], arch: str, template: str, default: Any = None) -> Any:
    return kv.get(key(template, arch), default)


@dataclass(frozen=True)
class _ModelRope:
    """The rope keys llama.cpp's loader reads for every arch (hparams; docs/llama_cpp.md §1)."""

    ctx_train: Any
    scaling_type: str
    freq_base: Any
    freq_scale: float
    n_ctx_orig: Any
    attn_factor: Any

    @classmethod
    def read(cls, arch: str, kv: Mapping[str, Any]) -> _ModelRope:
        ctx_train = _get(kv, arch, Keys.LLM.CONTEXT_LENGTH)
        if ctx_train is None:
            raise GGUFError(f"missing required key {key(Keys.LLM.CONTEXT_LENGTH, arch)}")
        stype = _get(kv, arch, Keys.Rope.SCALING_TYPE, "linear")
        if stype not in SCALING_TYPES:
            raise GGUFError(
                f"rope scaling type {stype!r} is not one llama.cpp knows (it aborts on load)",
                fix=f"set {key(Keys.Rope.SCALING_TYPE, arch)} to one of {', '.join(SCALING_TYPES)}",
            )
        factor = _get(kv, arch, Keys.Rope.SCALING_FACTOR)
        if factor is None:  # the legacy key counts only when the new one is absent; 0 means "no scaling"
            factor = kv.get(f"{arch}.rope.scale_linear")
        return cls(
            ctx_train=ctx_train,
            scaling_type=stype,
            freq_base=_get(kv, arch, Keys.Rope.FREQ_BASE, 10000.0),
            freq_scale=1.0 / factor if factor else 1.0,
            n_ctx_orig=_get(kv, arch, Keys.Rope.SCALING_ORIG_CTX_LEN) or ctx_train,
            attn_factor=_get(kv, arch, Keys.Rope.SCALING_ATTN_FACTOR, 1.0),
        )


def has_sliding_rope(arch: str, kv: Mapping[str, Any]) -> bool:
    """Whether llama.cpp builds ``arch`` with sliding-window layers that rope on a base of their own."""
    return arch in SWA_ROPE_ARCHS and bool(_get(kv, arch, Keys.Attention.SLIDING_WINDOW, 0))


def _sliding_base(arch: str, kv: Mapping[str, Any]) -> float:
    if not has_sliding_rope(arch, kv):
        raise GGUFError(
            f"arch {arch!r} has no sliding-window layers with a rope of their own in this file",
            fix=f"only {', '.join(sorted(SWA_ROPE_ARCHS))} with {key(Keys.Attention.SLIDING_WINDOW, arch)} > 0 has them",
        )
    return float(_get(kv, arch, Keys.Rope.FREQ_BASE_SWA, DEFAULT_SWA_FREQ_BASE))


def _ext_factor(arch: str, kv: Mapping[str, Any], rt: Mapping[str, float], *, rtype: str) -> float:
    """YaRN's extrapolation mix: the runtime's, else grok's GGUF key, else 1 for yarn and 0 otherwise."""
    ext = rt.get("yarn_ext_factor", -1.0)
    if ext < 0 and arch in ARCHS_READING_YARN_EXT_ATTN:
        ext = _get(kv, arch, Keys.Rope.SCALING_YARN_EXT_FACTOR, -1.0)
    if ext < 0:
        ext = 1.0 if rtype == "yarn" else 0.0
    return ext


def _yarn_betas(arch: str, kv: Mapping[str, Any], rt: Mapping[str, float]) -> tuple[float, float]:
    """(beta_fast, beta_slow): the runtime's, else the GGUF's on the arches that read them, else 32 and 1."""
    beta_fast = rt.get("yarn_beta_fast", -1.0)
    beta_slow = rt.get("yarn_beta_slow", -1.0)
    if beta_fast < 0:
        beta_fast = _get(kv, arch, Keys.Rope.SCALING_YARN_BETA_FAST, 32.0) if arch in ARCHS_READING_YARN_BETAS else 32.0
    if beta_slow < 0:
        beta_slow = _get(kv, arch, Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0) if arch in ARCHS_READING_YARN_BETAS else 1.0
    return beta_fast, beta_slow


def _kernel_attn_factor(
    arch: str, kv: Mapping[str, Any], rt: Mapping[str, float], *, ext: float, scale: float
) -> float:
    """cparams.yarn_attn_factor before the GGUF's ``rope.scaling.attn_factor`` multiplies it.

    With YaRN active (ext != 0) llama.cpp replaces any runtime or GGUF value by the YaRN magnitude divided by
    the (1 + 0.1 ln F) the kernel multiplies in again (docs/llama_cpp.md §2).
    """
    attn = rt.get("yarn_attn_factor", -1.0)
    if attn < 0:
        attn = _get(kv, arch, Keys.Rope.SCALING_YARN_ATTN_FACTOR, 1.0) if arch in ARCHS_READING_YARN_EXT_ATTN else 1.0
    if ext != 0:
        big_f = 1.0 / scale
        log_mul = _get(kv, arch, Keys.Rope.SCALING_YARN_LOG_MUL, 0.0) if arch in ARCHS_READING_YARN_LOG_MUL else 0.0
        if arch in ("deepseek2", "deepseek32"):
            log_mul /= 0.1
        if log_mul:
            attn = scaling.yarn_mscale(big_f, 1.0) / scaling.yarn_mscale(big_f, log_mul)
        else:
            attn = scaling.yarn_mscale(big_f, 1.0)
        attn /= 1.0 + 0.1 * math.log(big_f)
    return attn


def _freq_factors(
    arch: str,
    model: _ModelRope,
    tensors: Mapping[str, np.ndarray],
    *,
    n_ctx: int | None,
    n_seq_max: int,
    n_ctx_orig: int,
) -> np.ndarray | None:
    """The frequency-factor tensor in use: ``rope_freqs``, else LongRoPE's long or short set by the allocated
    per-sequence context (``n_ctx``, default the training context, padded to 256), else none."""
    if ROPE_FREQS in tensors:
        return tensors[ROPE_FREQS]
    if model.scaling_type == "longrope" or arch == "phi3":
        ctx = int(n_ctx or model.ctx_train)
        n_ctx_seq = math.ceil(ctx / 256) * 256 // max(1, n_seq_max)
        return tensors.get(ROPE_FACTORS_LONG if n_ctx_seq > n_ctx_orig else ROPE_FACTORS_SHORT)
    return None
