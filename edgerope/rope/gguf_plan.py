"""How each edgerope rope variant is stored in GGUF, checked against the function llama.cpp computes from it.

``plan_gguf_rope`` maps a ``edgerope.rope.scaling`` variant to GGUF keys and frequency-factor tensors, then
*verifies* that llama.cpp's function of that plan (``edgerope.rope.ggml.LlamaCppRope``) equals the variant's
function (inverse frequencies and attention factor to 1e-9 relative) and raises ``UnsupportedRopeError`` when it
cannot.  Runtime-only settings (YaRN betas on arches that ignore their keys) are listed in ``plan.runtime``.

Nothing here touches files or llama_cpp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys

from edgerope.errors import UnsupportedRopeError
from edgerope.rope import scaling
from edgerope.rope.ggml import (
    ARCH_ROPE_FACTOR_TENSORS,
    ARCHS_READING_YARN_BETAS,
    ARCHS_READING_YARN_LOG_MUL,
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    SWA_ROPE_ARCHS,
    LlamaCppRope,
    key,
)

_U32, _F32, _STR, _BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.BOOL


@dataclass
class GGUFRopePlan:
    """What to write for one rope variant: metadata, F32 frequency-factor tensors, and runtime needs.

    ``kv`` maps full key names to (value, GGUFValueType); ``remove`` lists rope
    keys that must not be present; ``runtime`` holds llama_context_params that
    a runtime must pass for the function to match (empty when the file alone
    suffices); ``notes`` are caveats a user should read; ``sliding`` is the rope the sliding-window layers
    compute on ``SWA_ROPE_ARCHS`` (checked with the global one wherever the plan is verified).
    """

    arch: str
    kv: dict[str, tuple[Any, GGUFValueType]] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    remove: set[str] = field(default_factory=set)
    runtime: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sliding: scaling.RopeScaling | None = None

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
    sliding_rope: scaling.RopeScaling | None = None,
) -> GGUFRopePlan:
    """Map ``rope`` to GGUF keys/tensors for ``arch`` and verify llama.cpp computes the same function.

    ``head_dim`` is the rotary dimension (a part of the head under partial rotary).  ``sliding_rope`` is the
    rope of the sliding-window layers on ``SWA_ROPE_ARCHS`` (Gemma 3): plain rope at a base of its own,
    stored as ``rope.freq_base_swa``, and verified like the global one.  Raises ``UnsupportedRopeError`` for
    what GGUF cannot express (dynamic NTK, YaRN with non-default betas unless ``allow_runtime_rope``,
    untruncated YaRN ramps that differ, factor tensors the arch does not load, a scaled sliding rope).
    """
    plan = GGUFRopePlan(arch=arch)
    plan.remove = rope_key_names(arch) | set()
    kv = plan.kv
    kv[key(Keys.LLM.CONTEXT_LENGTH, arch)] = (int(context_length), _U32)
    kv[key(Keys.Rope.DIMENSION_COUNT, arch)] = (int(head_dim), _U32)
    kv[key(Keys.Rope.FREQ_BASE, arch)] = (float(rope.theta), _F32)
    _plan_variant(plan, rope, head_dim=head_dim, allow_runtime_rope=allow_runtime_rope)
    _check_factor_tensors(plan, rope)
    if sliding_rope is not None:
        _plan_sliding(plan, sliding_rope, head_dim=head_dim)
    if finetuned is not None and not isinstance(rope, (scaling.Default, scaling.NtkAware)):
        kv[key(Keys.Rope.SCALING_FINETUNED, arch)] = (bool(finetuned), _BOOL)
    plan.remove -= set(kv)
    verify_plan(rope, plan, head_dim=head_dim, sliding_rope=plan.sliding)
    return plan


def _check_factor_tensors(plan: GGUFRopePlan, rope: scaling.RopeScaling) -> None:
    """Refuse frequency-factor tensors the arch's llama.cpp loader does not create (the load would fail)."""
    loaded = ARCH_ROPE_FACTOR_TENSORS.get(plan.arch, ())
    if extra := [name for name in plan.tensors if name not in loaded]:
        raise UnsupportedRopeError(
            f"{rope.name} rope scaling needs per-frequency factor tensors ({', '.join(extra)}), which llama.cpp's "
            f"{plan.arch!r} architecture does not load (its graph passes no factors to the rope)",
            fix="use YaRN or linear scaling for this model (llama3 and longrope are carried by the llama arch, "
            "longrope also by phi3)",
        )


def _plan_sliding(plan: GGUFRopePlan, rope: scaling.RopeScaling, *, head_dim: int) -> None:
    """The sliding-window layers' rope: ``rope.freq_base_swa``; llama.cpp never scales these layers."""
    if plan.arch not in SWA_ROPE_ARCHS:
        raise UnsupportedRopeError(
            f"llama.cpp's {plan.arch!r} architecture has no rope of its own for sliding-window layers",
            where=f"GGUF arch {plan.arch}",
        )
    if isinstance(rope, scaling.NtkAware):
        rope = scaling.Default(theta=scaling.ntk_theta(rope.theta, rope.alpha, head_dim))
    if not isinstance(rope, scaling.Default):
        raise UnsupportedRopeError(
            f"the sliding-window layers use {scaling.describe(rope)}; llama.cpp's {plan.arch} computes plain rope "
            "there (freq_scale_swa is fixed at 1, only the base rope.freq_base_swa is read)",
            where="rope_parameters.sliding_attention",
            fix="scale the full-attention layers only (as the released models do), or keep the sliding ones plain",
        )
    plan.kv[key(Keys.Rope.FREQ_BASE_SWA, plan.arch)] = (float(rope.theta), _F32)
    plan.sliding = rope


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


def verify_plan(
    rope: scaling.RopeScaling,
    plan: GGUFRopePlan,
    *,
    head_dim: int,
    sliding_rope: scaling.RopeScaling | None = None,
) -> None:
    """Raise ``UnsupportedRopeError`` unless llama.cpp's function of ``plan`` equals ``rope``'s function (and, on
    the sliding-window layers, ``sliding_rope``'s)."""
    cases: list[tuple[int | None, int | None]] = [(None, None)]  # (n_ctx for llama.cpp, seq_len for HF)
    if isinstance(rope, scaling.LongRope):
        orig = rope.original_max_position_embeddings
        cases = [(orig, orig), (orig + 256, orig + 1)] if orig % 256 == 0 else [(orig + 256, orig + 1)]
    tensors = {k: v.astype(np.float64) for k, v in plan.tensors.items()}
    kv = plan.kv_values()
    if sliding_rope is not None:  # the window only has to be there for the resolution; convert writes the real one
        kv.setdefault(key(Keys.Attention.SLIDING_WINDOW, plan.arch), 1)
    layers = [("full", rope)] + ([("sliding", sliding_rope)] if sliding_rope is not None else [])
    for layer, want_rope in layers:
        for n_ctx, seq_len in cases:
            ours = LlamaCppRope.from_gguf(
                plan.arch, kv, tensors=tensors, n_ctx=n_ctx, runtime=plan.runtime, layer=layer
            )
            want = scaling.inv_freq(want_rope, head_dim, seq_len=seq_len)
            got = ours.inv_freq(head_dim)
            # float32 storage of factors and keys limits agreement to ~1e-7 relative
            err = float(np.max(np.abs(got - want) / np.abs(want)))
            target = scaling.attention_factor(want_rope)
            mag_err = abs(ours.magnitude - target) / target
            if err > 1e-6 or mag_err > 1e-6:
                what = "" if layer == "full" else f" on the sliding-window layers ({scaling.describe(rope)} elsewhere)"
                raise UnsupportedRopeError(
                    f"llama.cpp would compute a different rope function for {scaling.describe(want_rope)}{what} "
                    f"(max relative frequency error {err:.2e}, magnitude {ours.magnitude:.6g} vs {target:.6g})",
                    where=f"GGUF arch {plan.arch}",
                    fix="this rope configuration cannot be represented in GGUF"
                    + (
                        "; llama.cpp applies the YaRN attention factor to the sliding-window layers too, so only "
                        "the default one is exact there"
                        if layer == "sliding"
                        else "; use default YaRN parameters"
                    ),
                )


def with_runtime(plan: GGUFRopePlan, **runtime: float) -> GGUFRopePlan:
    """A copy of ``plan`` with extra runtime overrides (for tests and set-rope)."""
    return replace(plan, runtime={**plan.runtime, **runtime})
