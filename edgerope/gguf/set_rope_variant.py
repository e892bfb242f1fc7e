"""The rope variant ``set-rope`` writes: its options checked against the file and built as a typed variant.

``build_variant`` turns the options of ``edgerope.gguf.set_rope.set_rope`` (type, factor, original
context, context length, base, YaRN attention factor and betas) and the file's current rope keys into
an ``edgerope.rope.scaling`` variant and the context length to record; every inconsistent combination
is a ``RopeConfigError``.  ``check_yarn_betas`` refuses YaRN betas that the file's architecture would
ignore.  Per family: ``sliding_rope`` is the rope of Gemma 3's sliding-window layers, which set-rope keeps
(and verifies unchanged: llama.cpp applies a YaRN attention factor there too), and ``family_notes`` says
what set-rope changed in a family with more than one rope function or a partial one.

What it does not do: decide rope math (``edgerope.rope.scaling``), map the variant to GGUF keys
(``edgerope.rope.ggml``) or write the file (``edgerope.gguf.set_rope``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import Keys

from edgerope.errors import RopeConfigError, UnsupportedRopeError
from edgerope.gguf.hparams import model_hparams
from edgerope.gguf.reader import GGUFFile
from edgerope.rope import SCALING_CHOICES
from edgerope.rope.ggml import (
    ARCHS_READING_YARN_BETAS,
    DEFAULT_SWA_FREQ_BASE,
    ROPE_TENSORS,
    has_sliding_rope,
    key,
)
from edgerope.rope.scaling import (
    DEFAULT_THETA,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    Default,
    Linear,
    NtkAware,
    RopeScaling,
    Yarn,
    validate_for_context,
)


@dataclass(frozen=True)
class RopeOptions:
    """What ``set-rope`` was asked to write (``set_rope``'s rope arguments; None: the file's or the default)."""

    rope_type: str
    factor: float | None = None
    original_context: int | None = None
    context_length: int | None = None
    freq_base: float | None = None
    attn_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None


def build_variant(f: GGUFFile, options: RopeOptions) -> tuple[RopeScaling, int]:
    """The variant the options ask for on ``f`` and the context length to record (defaults: see ``set_rope``)."""
    rope_type, factor, original_context = options.rope_type, options.factor, options.original_context
    context_length, freq_base, attn_factor = options.context_length, options.freq_base, options.attn_factor
    beta_fast, beta_slow = options.beta_fast, options.beta_slow
    where = f"set-rope --type {rope_type}"
    _check_type_options(rope_type, attn_factor=attn_factor, beta_fast=beta_fast, beta_slow=beta_slow, where=where)
    theta = float(freq_base) if freq_base is not None else float(f.arch_get(Keys.Rope.FREQ_BASE, DEFAULT_THETA))
    scaled = rope_type in ("linear", "yarn") or (rope_type == "ntk" and factor is not None)
    if scaled:
        _check_factor(rope_type, factor, where=where)
    original = _original_context(f, original_context, scaled=scaled, where=where)
    ctx = _context_length(context_length, factor=factor, original_context=original, scaled=scaled, where=where)
    rope = _variant(
        rope_type,
        theta=theta,
        factor=factor,
        original_context=original,
        context_length=ctx,
        freq_base=freq_base,
        attn_factor=attn_factor,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        where=where,
    )
    return rope, int(ctx)


def check_yarn_betas(f: GGUFFile, rope: RopeScaling) -> None:
    """Refuse non-default YaRN betas on an architecture whose llama.cpp loader ignores the ``yarn_beta_*`` keys."""
    if not isinstance(rope, Yarn) or (rope.beta_fast, rope.beta_slow) == (YARN_BETA_FAST, YARN_BETA_SLOW):
        return
    arch = f.architecture
    if arch in ARCHS_READING_YARN_BETAS:
        return
    fast, slow = f"{rope.beta_fast:g}", f"{rope.beta_slow:g}"
    raise UnsupportedRopeError(
        f"llama.cpp ignores the yarn_beta_* keys on arch {arch!r} (only "
        f"{', '.join(sorted(ARCHS_READING_YARN_BETAS))} read them): the file cannot carry "
        f"beta_fast={fast}, beta_slow={slow}",
        where=str(f.path),
        fix=f"set-rope without --beta-fast/--beta-slow and pass them at run time: llama-cli "
        f"--yarn-beta-fast {fast} --yarn-beta-slow {slow}, or Llama(yarn_beta_fast={fast}, yarn_beta_slow={slow})",
    )


# --------------------------------------------------------------------------- steps


def _check_type_options(
    rope_type: str, *, attn_factor: float | None, beta_fast: float | None, beta_slow: float | None, where: str
) -> None:
    """A known type, and the YaRN-only options only with YaRN."""
    if rope_type not in SCALING_CHOICES:
        raise RopeConfigError(
            f"unknown rope type {rope_type!r}", where=where, fix=f"use one of: {', '.join(SCALING_CHOICES)}"
        )
    if rope_type != "yarn" and (attn_factor is not None or beta_fast is not None or beta_slow is not None):
        raise RopeConfigError(
            "--attn-factor and --beta-fast/--beta-slow apply to YaRN only",
            where=where,
            fix="drop them, or use --type yarn",
        )


def _check_factor(rope_type: str, factor: float | None, *, where: str) -> None:
    """A scaled variant needs a finite factor above 1."""
    if factor is None:
        raise RopeConfigError(f"--type {rope_type} needs --factor", where=where, fix="e.g. --factor 4")
    if not math.isfinite(factor) or factor <= 1:
        raise RopeConfigError(
            f"{rope_type} factor must be > 1 to extend the context, got {factor:g}",
            where=where,
            fix="use a factor such as 4 or 8, or --type none for no scaling",
        )


def _file_is_unscaled(f: GGUFFile) -> bool:
    stype = f.arch_get(Keys.Rope.SCALING_TYPE)
    factor = f.arch_get(Keys.Rope.SCALING_FACTOR) or f.get(f"{f.architecture}.rope.scale_linear")
    has_factors = any(f.tensor(n) is not None for n in ROPE_TENSORS)
    return stype in (None, "none", "linear") and factor in (None, 0, 1) and not has_factors


def _original_context(f: GGUFFile, given: int | None, *, scaled: bool, where: str) -> int:
    """The pre-training context: as given, else the file's record, else its context length when unscaled."""
    ctx_file = int(f.arch_get(Keys.LLM.CONTEXT_LENGTH))
    orig_file = f.arch_get(Keys.Rope.SCALING_ORIG_CTX_LEN)
    original = given
    if original is None:
        if orig_file is not None:
            original = int(orig_file)
        elif _file_is_unscaled(f):
            original = ctx_file
        elif scaled:
            raise RopeConfigError(
                f"the file is already rope-scaled and does not record its original context (context_length {ctx_file})",
                where=str(f.path),
                fix="give the pre-training context with --original-context",
            )
        else:
            original = ctx_file
    if original <= 0:
        raise RopeConfigError(f"original context must be > 0, got {original}", where=where)
    return original


def _context_length(given: int | None, *, factor: float | None, original_context: int, scaled: bool, where: str) -> int:
    """The context length to record: as given, else factor x original; a scaled one must exceed the original."""
    context_length = given
    if context_length is None:
        context_length = int(round(factor * original_context)) if scaled and factor else original_context
    if scaled and original_context >= context_length:
        raise RopeConfigError(
            f"original context {original_context} must be smaller than the context length {context_length}",
            where=where,
            fix=f"set the context length to factor x original, e.g. {int(round(factor * original_context))}",
        )
    return context_length


def _variant(
    rope_type: str,
    *,
    theta: float,
    factor: float | None,
    original_context: int,
    context_length: int,
    freq_base: float | None,
    attn_factor: float | None,
    beta_fast: float | None,
    beta_slow: float | None,
    where: str,
) -> RopeScaling:
    """The typed variant for ``rope_type`` (options already checked)."""
    if rope_type == "none":
        return Default(theta=theta)
    if rope_type == "linear":
        return Linear(theta=theta, factor=float(factor))
    if rope_type == "yarn":
        rope = Yarn(
            theta=theta,
            factor=float(factor),
            original_max_position_embeddings=int(original_context),
            beta_fast=YARN_BETA_FAST if beta_fast is None else float(beta_fast),
            beta_slow=YARN_BETA_SLOW if beta_slow is None else float(beta_slow),
            attention_factor=attn_factor,
        )
        validate_for_context(rope, context_length=context_length, where=where)
        return rope
    if factor is not None:
        return NtkAware(theta=theta, alpha=float(factor))
    if freq_base is not None:
        return Default(theta=theta)  # NTK given directly as the new base
    raise RopeConfigError("--type ntk needs --factor (alpha) or --freq-base (the new base)", where=where)


# --------------------------------------------------------------------------- per family


def sliding_rope(f: GGUFFile) -> Default | None:
    """The rope of the sliding-window layers where they have their own (Gemma 3), which set-rope keeps."""
    if not has_sliding_rope(f.architecture, f.arch_kv()):
        return None
    return Default(theta=float(f.arch_get(Keys.Rope.FREQ_BASE_SWA, DEFAULT_SWA_FREQ_BASE)))


def family_notes(f: GGUFFile) -> list[str]:
    """What set-rope changed, in words, for the families with several rope functions or a partial one."""
    arch, notes = f.architecture, []
    hp = model_hparams(f)
    n_rot, head_dim = hp.n_rot, hp.head_dim_k
    if (local := sliding_rope(f)) is not None:
        pattern = f.arch_get(Keys.Attention.SLIDING_WINDOW_PATTERN)
        n_sliding = sum(bool(x) for x in pattern) if isinstance(pattern, list) else None
        which = f"the {n_sliding} sliding-window layers" if n_sliding is not None else "the sliding-window layers"
        notes.append(
            f"{arch} has two rope functions: set-rope changed the one of the full-attention (global) layers "
            f"({key(Keys.Rope.FREQ_BASE, arch)}, rope.scaling.*); {which} keep plain rope at base "
            f"{local.theta:g} ({key(Keys.Rope.FREQ_BASE_SWA, arch)}), which llama.cpp never scales"
        )
    elif f.arch_get(Keys.Attention.SLIDING_WINDOW) is not None or f.arch_get(Keys.Rope.FREQ_BASE_SWA) is not None:
        notes.append(
            f"{arch} has sliding-window layers with rope settings of their own; set-rope changed the global rope "
            "keys only"
        )
    if arch == "smollm3":
        notes.append("smollm3 applies no rope on every 4th layer (NoPE); the new rope reaches the other layers")
    if n_rot != head_dim:
        notes.append(f"rope.dimension_count {n_rot} of a {head_dim}-channel head: the rope rotates {n_rot} channels")
    return notes
