"""What llama.cpp will compute from any GGUF file, in words and numbers, plus lint findings.

``inspect_gguf(path, n_ctx=...)`` reads a GGUF (ours or anyone's) and reports:
the model (architecture, size, tensor types), its contexts (trained, original,
effective), the rope function llama.cpp resolves from the file (through
``edgerope.rope.ggml.LlamaCppRope.from_gguf``: base, scaling, YaRN ramp,
magnitude, frequency factors, NORM/NEOX rotation, per-pair bands and
wavelengths), KV-cache bytes per cache type (``edgerope.gguf.kv``), and findings
(error / warning / info, with a fix, from ``edgerope.gguf.lint``) for the known ways a GGUF silently
computes the wrong thing or makes llama.cpp fail (docs/llama_cpp.md §10).

What it does not do: rope math (``edgerope.rope.scaling`` / ``edgerope.rope.ggml``),
load the model in llama.cpp, print, or change the file (``edgerope.gguf.set_rope``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from edgerope.errors import GGUFError
from edgerope.gguf.hparams import ModelHparams, model_hparams
from edgerope.gguf.kv import ARCHS_DISABLING_SWA, KV_TYPES, SWA_NOTE, kv_bytes_per_token, padded_ctx
from edgerope.gguf.lint import ERROR, Finding, lint_gguf
from edgerope.gguf.reader import GGUFFile, open_gguf
from edgerope.rope.ggml import NEOX_ARCHS, LlamaCppRope
from edgerope.rope.scaling import base_inv_freq

KV_REPORT_TYPES = tuple(KV_TYPES)  # every cache type llama.cpp accepts


@dataclass
class RopeReport:
    """The rope function llama.cpp resolves from the file (C-API defaults for every runtime override)."""

    summary: str
    rotation: str  # "NEOX" (x[i], x[i+d/2]) or "NORM" (x[2i], x[2i+1])
    n_rot: int
    scaling_type: str
    scaling_type_key_present: bool
    freq_base: float
    freq_scale: float
    factor: float
    ext_factor: float
    attn_factor: float  # the kernel's attn_factor argument
    magnitude: float  # multiplies cos and sin; logits scale by its square
    beta_fast: float
    beta_slow: float
    n_ctx_orig: int
    freq_factors: dict[str, Any] | None
    wavelength_min: float  # positions per full turn of the fastest / slowest pair
    wavelength_max: float
    pairs: dict[str, Any]


@dataclass
class KVReport:
    n_layers: int
    n_head_kv: int | list[int]
    head_dim_k: int
    head_dim_v: int
    bytes_per_token: dict[str, float]  # cache type (K and V alike) -> bytes per token, all layers
    bytes_at_context: dict[int, dict[str, int]]  # allocated context -> type -> bytes (padded to 256)
    notes: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    n_parameters: int
    n_tensors: int
    tensor_types: dict[str, dict[str, int]]  # ggml type -> {"count", "bytes"}
    hparams: dict[str, Any] | None
    context_trained: int | None
    context_original: int | None
    context_effective: int | None
    rope: RopeReport | None
    kv: KVReport | None
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kv is not None:
            out["kv"]["bytes_at_context"] = {str(k): v for k, v in self.kv.bytes_at_context.items()}
        return out

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)


# --------------------------------------------------------------------------- rope


def _ranges(idx: np.ndarray) -> str:
    """'0-9, 12' for sorted indices."""
    if idx.size == 0:
        return "none"
    out, start, prev = [], int(idx[0]), int(idx[0])
    for i in (int(x) for x in idx[1:]):
        if i != prev + 1:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = i
        prev = i
    out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(out)


def _rope_report(f: GGUFFile, rope: LlamaCppRope, n_rot: int, factors: dict[str, np.ndarray]) -> RopeReport:
    arch = f.architecture
    stype_key = f.arch_get(Keys.Rope.SCALING_TYPE)
    stype = stype_key if isinstance(stype_key, str) else "linear"
    base = base_inv_freq(rope.freq_base, n_rot)  # shape (n_rot/2,)
    eff = rope.inv_freq(n_rot)
    ratio = eff / base
    wavelength = 2 * math.pi / eff
    pairs: dict[str, Any] = {"count": n_rot // 2}
    mag = f"; cos/sin x{rope.magnitude:.6g} (logits x{rope.magnitude**2:.6g})" if rope.magnitude != 1 else ""
    ff_summary = None
    used = None
    if rope.freq_factors is not None:
        used = next((n for n, v in factors.items() if tuple(float(x) for x in v) == rope.freq_factors), "?")
        ff = np.asarray(rope.freq_factors)
        ff_summary = {
            "tensor": used,
            "min": float(ff.min()),
            "max": float(ff.max()),
            "pairs_not_1": int(np.sum(~np.isclose(ff, 1.0))),
        }
    if rope.ext_factor != 0:
        mix = rope.extrapolation_mix(n_rot)
        ext, interp = np.flatnonzero(mix >= 1.0), np.flatnonzero(mix <= 0.0)
        blend = np.flatnonzero((mix > 0.0) & (mix < 1.0))
        pairs.update(extrapolated=_ranges(ext), blended=_ranges(blend), interpolated=_ranges(interp))
        summary = (
            f"YaRN x{1 / rope.freq_scale:g} from {rope.n_ctx_orig} (beta_fast {rope.beta_fast:g}, beta_slow "
            f"{rope.beta_slow:g}); pairs extrapolated (angle kept): {pairs['extrapolated']}; blended: "
            f"{pairs['blended']}; interpolated by 1/{1 / rope.freq_scale:g}: {pairs['interpolated']}{mag}"
        )
    else:
        unchanged = np.flatnonzero(np.isclose(ratio, 1.0, rtol=1e-9))
        pairs.update(unchanged=_ranges(unchanged), scaled=_ranges(np.flatnonzero(~np.isclose(ratio, 1.0, rtol=1e-9))))
        pairs["angle_scale_min"], pairs["angle_scale_max"] = float(ratio.min()), float(ratio.max())
        if unchanged.size == ratio.size:
            summary = f"plain RoPE, base {rope.freq_base:g}, no scaling{mag}"
        elif used is None:
            summary = f"linear interpolation: every angle divided by {1 / rope.freq_scale:g}{mag}"
        else:
            summary = (
                f"per-pair frequency factors from {used}: pairs {pairs['unchanged']} unchanged, "
                f"{pairs['scaled']} slowed by up to x{1 / ratio.min():.4g}{mag}"
            )
    pairs["beyond_original_context"] = int(np.sum(wavelength > rope.n_ctx_orig))
    return RopeReport(
        summary=summary,
        rotation="NEOX" if arch in NEOX_ARCHS else "NORM",
        n_rot=n_rot,
        scaling_type=stype,
        scaling_type_key_present=stype_key is not None,
        freq_base=rope.freq_base,
        freq_scale=rope.freq_scale,
        factor=1.0 / rope.freq_scale,
        ext_factor=rope.ext_factor,
        attn_factor=rope.attn_factor,
        magnitude=rope.magnitude,
        beta_fast=rope.beta_fast,
        beta_slow=rope.beta_slow,
        n_ctx_orig=rope.n_ctx_orig,
        freq_factors=ff_summary,
        wavelength_min=float(wavelength.min()),
        wavelength_max=float(wavelength.max()),
        pairs=pairs,
    )


# --------------------------------------------------------------------------- KV cache


def _kv_report(hp: ModelHparams, contexts: list[int], sliding: bool) -> KVReport:
    layers = hp.n_head_kv_layers
    per_token = {
        t: sum(
            kv_bytes_per_token(
                n_layers=1, n_kv_heads=h, head_dim_k=hp.head_dim_k, head_dim_v=hp.head_dim_v, type_k=t, type_v=t
            )
            for h in layers
        )
        for t in KV_REPORT_TYPES
    }
    at = {c: {t: int(round(padded_ctx(c) * b)) for t, b in per_token.items()} for c in contexts}
    notes = []
    if hp.head_dim_k % 32 or hp.head_dim_v % 32:
        notes.append("quantized cache types need head dims divisible by 32 (flash attention); this model has not")
    notes.append("a quantized V cache needs flash_attn=True in llama-cpp-python")
    if sliding:
        notes.append(SWA_NOTE)
    return KVReport(
        n_layers=hp.n_layers,
        n_head_kv=list(hp.n_head_kv) if isinstance(hp.n_head_kv, tuple) else hp.n_head_kv,
        head_dim_k=hp.head_dim_k,
        head_dim_v=hp.head_dim_v,
        bytes_per_token=per_token,
        bytes_at_context=at,
        notes=notes,
    )


# --------------------------------------------------------------------------- entry point


def inspect_gguf(path: str | os.PathLike[str], *, n_ctx: int | None = None) -> InspectReport:
    """Report what llama.cpp computes from the GGUF at ``path`` (for an allocated context ``n_ctx``), and lint it.

    Raises ``GGUFError`` only when the file cannot be read at all; everything
    llama.cpp would reject or mis-compute becomes a ``Finding``.
    """
    f = open_gguf(path)
    arch = f.architecture
    findings: list[Finding] = []
    types: dict[str, dict[str, int]] = {}
    for t in f.tensors:
        entry = types.setdefault(t.ggml_type.name, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += t.n_bytes
    try:
        hp: ModelHparams | None = model_hparams(f)
    except GGUFError as exc:
        hp = None
        findings.append(Finding(ERROR, "not_a_model", exc.what, exc.fix))
    factors = f.freq_factors()
    rope = rope_rep = None
    try:
        rope = LlamaCppRope.from_gguf(arch, f.arch_kv(), tensors=factors, n_ctx=n_ctx)
    except GGUFError as exc:
        findings.append(Finding(ERROR, "rope_unreadable", exc.what, exc.fix))
    if rope is not None and hp is not None and hp.n_rot > 0:
        try:
            rope_rep = _rope_report(f, rope, hp.n_rot, factors)
        except GGUFError:
            pass  # frequency factors of the wrong length: reported by the lint below
    findings += lint_gguf(f, hparams=hp, rope=rope, factors=factors, n_ctx=n_ctx)
    ctx_train = hp.n_ctx_train if hp else None
    kv = None
    if hp is not None and hp.head_dim_k > 0:
        ctx_list = sorted({c for c in (n_ctx, ctx_train, rope.n_ctx_orig if rope else None) if c})
        sliding = f.arch_get(Keys.Attention.SLIDING_WINDOW) is not None and f.architecture not in ARCHS_DISABLING_SWA
        kv = _kv_report(hp, ctx_list, sliding)
    return InspectReport(
        path=str(Path(path)),
        file_size=f.file_size,
        gguf_version=f.version,
        architecture=arch,
        name=f.get(Keys.General.NAME),
        n_parameters=f.n_parameters,
        n_tensors=len(f.tensors),
        tensor_types=types,
        hparams=None if hp is None else {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(hp).items()},
        context_trained=ctx_train,
        context_original=rope.n_ctx_orig if rope else None,
        context_effective=padded_ctx(n_ctx or ctx_train) if (n_ctx or ctx_train) else None,
        rope=rope_rep,
        kv=kv,
        findings=findings,
    )
