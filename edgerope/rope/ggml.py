"""The rope function llama.cpp computes, and how each edgerope variant is stored in GGUF.

Two directions, one module, so that they can check each other:

* ``LlamaCppRope.from_gguf`` resolves GGUF rope keys (and runtime overrides)
  the way llama.cpp's loader and context do (docs/llama_cpp.md §1-§3) into
  the per-pair angles and the cos/sin magnitude the ggml kernel will use;
* ``plan_gguf_rope`` maps a ``edgerope.rope.scaling`` variant to GGUF keys and
  frequency-factor tensors, then *verifies* that llama.cpp's function of that
  plan equals the variant's function (inverse frequencies and attention factor
  to 1e-9 relative) and raises ``UnsupportedRopeError`` when it cannot.

Nothing here touches files or llama_cpp; GGUF I/O lives in ``edgerope.gguf.reader``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys

from edgerope.errors import GGUFError, UnsupportedRopeError
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
_U32, _F32, _STR, _BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL


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
    ) -> LlamaCppRope:
        """Resolve the rope function from GGUF metadata ``kv`` (key -> python value) like llama.cpp does.

        ``tensors`` holds any frequency-factor tensors present (name -> values);
        ``n_ctx`` is the context a runtime would allocate (LongRoPE switches on it);
        ``runtime`` holds llama_context_params rope overrides (llama-cpp-python names,
        C sentinels: <0 / 0 mean "from model").
        """
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


@dataclass
class GGUFRopePlan:
    """What to write for one rope variant: metadata, F32 frequency-factor tensors, and runtime needs.

    ``kv`` maps full key names to (value, GGUFValueType); ``remove`` lists rope
    keys that must not be present; ``runtime`` holds llama_context_params that
    a runtime must pass for the function to match (empty when the file alone
    suffices); ``notes`` are caveats a user should read.
    """

    arch: str
    kv: dict[str, tuple[Any, GGUFValueType]] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    remove: set[str] = field(default_factory=set)
    runtime: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def kv_values(self) -> dict[str, Any]:
        return {k: v for k, (v, _) in self.kv.items()}


def rope_key_names(arch: str) -> set[str]:
    """Every rope-scaling key name edgerope may write or remove for ``arch``."""
    return {key(getattr(Keys.Rope, n), arch) for n in dir(Keys.Rope) if n.startswith("SCALING_")} | {
        f"{arch}.rope.scale_linear"
    }


def bake_dynamic(rope: scaling.DynamicNtk, *, seq_len: int, dim: int) -> scaling.Default:
    """Freeze dynamic NTK at one length: the fixed base Hugging Face uses for a forward of exactly ``seq_len``."""
    return scaling.Default(theta=scaling.dynamic_theta(rope, dim, seq_len))


def plan_gguf_rope(
    rope: scaling.RopeScaling,
    *,
    arch: str,
    head_dim: int,
    context_length: int,
    finetuned: bool | None = None,
    allow_runtime_rope: bool = False,
) -> GGUFRopePlan:
    """Map ``rope`` to GGUF keys/tensors for ``arch`` and verify llama.cpp computes the same function.

    Raises ``UnsupportedRopeError`` for what GGUF cannot express (dynamic NTK,
    YaRN with non-default betas unless ``allow_runtime_rope``, untruncated
    YaRN ramps that differ).
    """
    plan = GGUFRopePlan(arch=arch)
    plan.remove = rope_key_names(arch) | set()
    kv = plan.kv
    kv[key(Keys.LLM.CONTEXT_LENGTH, arch)] = (int(context_length), _U32)
    kv[key(Keys.Rope.DIMENSION_COUNT, arch)] = (int(head_dim), _U32)
    kv[key(Keys.Rope.FREQ_BASE, arch)] = (float(rope.theta), _F32)
    _plan_variant(plan, rope, head_dim=head_dim, allow_runtime_rope=allow_runtime_rope)
    if finetuned is not None and not isinstance(rope, (scaling.Default, scaling.NtkAware)):
        kv[key(Keys.Rope.SCALING_FINETUNED, arch)] = (bool(finetuned), _BOOL)
    plan.remove -= set(kv)
    verify_plan(rope, plan, head_dim=head_dim)
    return plan


def _plan_variant(plan: GGUFRopePlan, rope: scaling.RopeScaling, *, head_dim: int, allow_runtime_rope: bool) -> None:
    """Add what ``rope``'s variant needs beyond context length, rope dimension and base to ``plan``."""
    arch, kv = plan.arch, plan.kv
    where = f"rope scaling {rope.name}"
    match rope:
        case scaling.Default():
            pass  # no type key: docs/llama_cpp.md pitfall 6 ("none" would discard a runtime rope_freq_scale)
        case scaling.NtkAware():
            kv[key(Keys.Rope.FREQ_BASE, arch)] = (scaling.ntk_theta(rope.theta, rope.alpha, head_dim), _F32)
        case scaling.Linear():
            kv[key(Keys.Rope.SCALING_TYPE, arch)] = ("linear", _STR)
            kv[key(Keys.Rope.SCALING_FACTOR, arch)] = (float(rope.factor), _F32)
        case scaling.DynamicNtk():
            raise UnsupportedRopeError(
                "dynamic NTK rope scaling has no GGUF representation: Hugging Face recomputes the base for every "
                "forward from its length, llama.cpp uses one fixed function (llama.cpp's converter silently "
                "writes unscaled RoPE here)",
                where=where,
                fix="fine-tune or convert with YaRN instead (rope_type 'yarn'), or bake one fixed length with "
                "--bake-dynamic N (exact only for prompts of N tokens)",
            )
        case scaling.Yarn():
            _plan_yarn(plan, rope, where=where, allow_runtime_rope=allow_runtime_rope)
        case scaling.Llama3():
            plan.tensors[ROPE_FREQS] = scaling.llama3_freq_factors(rope, head_dim).astype(np.float32)
            # no scaling type or factor: docs/llama_cpp.md pitfall 7 (a factor would add a global 1/F on top)
        case scaling.LongRope():
            _plan_longrope(plan, rope)
        case _:
            raise TypeError(f"not a rope scaling variant: {rope!r}")


def _plan_yarn(plan: GGUFRopePlan, rope: scaling.Yarn, *, where: str, allow_runtime_rope: bool) -> None:
    """YaRN: type, factor, original context, an attention factor when it differs from llama.cpp's own, betas."""
    arch, kv = plan.arch, plan.kv
    if rope.factor <= 1:
        raise UnsupportedRopeError(f"YaRN factor must be > 1, got {rope.factor:g}", where=where)
    kv[key(Keys.Rope.SCALING_TYPE, arch)] = ("yarn", _STR)
    kv[key(Keys.Rope.SCALING_FACTOR, arch)] = (float(rope.factor), _F32)
    kv[key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = (int(rope.original_max_position_embeddings), _U32)
    target = scaling.attention_factor(rope)
    if arch in ARCHS_READING_YARN_LOG_MUL:
        raise UnsupportedRopeError(f"YaRN export for arch {arch!r} is not supported", where=where)
    default = scaling.yarn_mscale(rope.factor)
    if not math.isclose(target, default, rel_tol=1e-12):
        kv[key(Keys.Rope.SCALING_ATTN_FACTOR, arch)] = (target / default, _F32)
    if (rope.beta_fast, rope.beta_slow) != (scaling.YARN_BETA_FAST, scaling.YARN_BETA_SLOW):
        _plan_yarn_betas(plan, rope, where=where, allow_runtime_rope=allow_runtime_rope)


def _plan_yarn_betas(plan: GGUFRopePlan, rope: scaling.Yarn, *, where: str, allow_runtime_rope: bool) -> None:
    """Non-default YaRN betas: GGUF keys where the arch reads them, else runtime overrides if allowed, else an error."""
    arch, kv = plan.arch, plan.kv
    if arch in ARCHS_READING_YARN_BETAS:
        kv[key(Keys.Rope.SCALING_YARN_BETA_FAST, arch)] = (float(rope.beta_fast), _F32)
        kv[key(Keys.Rope.SCALING_YARN_BETA_SLOW, arch)] = (float(rope.beta_slow), _F32)
    elif allow_runtime_rope:
        kv[key(Keys.Rope.SCALING_YARN_BETA_FAST, arch)] = (float(rope.beta_fast), _F32)
        kv[key(Keys.Rope.SCALING_YARN_BETA_SLOW, arch)] = (float(rope.beta_slow), _F32)
        plan.runtime = {"yarn_beta_fast": rope.beta_fast, "yarn_beta_slow": rope.beta_slow}
        plan.notes.append(
            f"llama.cpp ignores yarn_beta_* keys on arch {arch!r}: pass yarn_beta_fast={rope.beta_fast:g}, "
            f"yarn_beta_slow={rope.beta_slow:g} at run time (edgerope's runtime does this itself)"
        )
    else:
        raise UnsupportedRopeError(
            f"YaRN beta_fast={rope.beta_fast:g}, beta_slow={rope.beta_slow:g} cannot be stored for arch "
            f"{arch!r}: llama.cpp ignores the yarn_beta_* keys there and would use 32/1",
            where=where,
            fix="pass --allow-runtime-rope to record them for runtimes that apply them "
            "(edgerope's runtime does; plain llama.cpp needs --yarn-beta-fast/--yarn-beta-slow)",
        )


def _plan_longrope(plan: GGUFRopePlan, rope: scaling.LongRope) -> None:
    """LongRoPE: type, original context, attention factor, and both factor sets as tensors."""
    arch, kv = plan.arch, plan.kv
    kv[key(Keys.Rope.SCALING_TYPE, arch)] = ("longrope", _STR)
    kv[key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = (int(rope.original_max_position_embeddings), _U32)
    kv[key(Keys.Rope.SCALING_ATTN_FACTOR, arch)] = (float(scaling.attention_factor(rope)), _F32)
    for name, values in ((ROPE_FACTORS_LONG, rope.long_factor), (ROPE_FACTORS_SHORT, rope.short_factor)):
        plan.tensors[name] = np.asarray(values, dtype=np.float32)
    plan.notes.append(
        "llama.cpp picks the LongRoPE factor set from the allocated context, not the prompt length: "
        f"with n_ctx > {rope.original_max_position_embeddings} short prompts use the long factors "
        "(Hugging Face uses the short ones); edgerope's runtime warns about this"
    )


def verify_plan(rope: scaling.RopeScaling, plan: GGUFRopePlan, *, head_dim: int) -> None:
    """Raise ``UnsupportedRopeError`` unless llama.cpp's function of ``plan`` equals ``rope``'s function."""
    cases: list[tuple[int | None, int | None]] = [(None, None)]  # (n_ctx for llama.cpp, seq_len for HF)
    if isinstance(rope, scaling.LongRope):
        orig = rope.original_max_position_embeddings
        cases = [(orig, orig), (orig + 256, orig + 1)] if orig % 256 == 0 else [(orig + 256, orig + 1)]
    tensors = {k: v.astype(np.float64) for k, v in plan.tensors.items()}
    for n_ctx, seq_len in cases:
        ours = LlamaCppRope.from_gguf(plan.arch, plan.kv_values(), tensors=tensors, n_ctx=n_ctx, runtime=plan.runtime)
        want = scaling.inv_freq(rope, head_dim, seq_len=seq_len)
        got = ours.inv_freq(head_dim)
        # float32 storage of factors and keys limits agreement to ~1e-7 relative
        err = float(np.max(np.abs(got - want) / np.abs(want)))
        mag_err = abs(ours.magnitude - scaling.attention_factor(rope)) / scaling.attention_factor(rope)
        if err > 1e-6 or mag_err > 1e-6:
            raise UnsupportedRopeError(
                f"llama.cpp would compute a different rope function for {scaling.describe(rope)} "
                f"(max relative frequency error {err:.2e}, magnitude error {mag_err:.2e})",
                where=f"GGUF arch {plan.arch}",
                fix="this rope configuration cannot be represented in GGUF; use default YaRN parameters",
            )


def with_runtime(plan: GGUFRopePlan, **runtime: float) -> GGUFRopePlan:
    """A copy of ``plan`` with extra runtime overrides (for tests and set-rope)."""
    return replace(plan, runtime={**plan.runtime, **runtime})
