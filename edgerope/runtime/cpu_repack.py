"""Where llama.cpp's CPU backend keeps the weights: the CPU weight-layout ("repack") policy.

llama.cpp's CPU backend can copy quantized weights into "extra buffer types" laid out for its fast
matrix-multiply kernels: ``CPU_REPACK`` (interleaved Q4_0/Q4_K/IQ4_NL rows for AVX2/AVX-512/NEON) and
``AMX`` (tiles for Intel's Advanced Matrix Extensions, Xeon "Sapphire Rapids" and later).  It uses every
extra buffer type the build and the CPU offer, in that order, unless ``llama_model_params.use_extra_bufts``
is off.  In the llama.cpp bundled with llama-cpp-python 0.3.36 the AMX path crashes the process
(``ggml_backend_amx_mul_mat``, SIGSEGV at the first decode of Q8_0 and Q4_K weights; docs/llama_cpp.md,
"Hardware and build facts").

The policy (``CpuRepack``):

* ``on``: llama.cpp's own default, every extra buffer type it offers (AMX included);
* ``off``: none (``use_extra_bufts`` off): the plain, memory-mapped layout;
* ``auto`` (the default): safe on every CPU.  Where an extra buffer type known to crash is present -- decided
  from the buffer types the llama.cpp build reports for this CPU, not from a model name -- extra buffer types
  are turned off and the weights ``CPU_REPACK`` would take anyway are steered to it by name
  (``tensor_buft_overrides``), so AVX2/AVX-512 repacking is kept.  Elsewhere it is llama.cpp's default.

``plan_layout`` decides this from what llama.cpp reports (``CpuBackend``: extra buffer types and CPU
features) and the GGUF's tensors; it is pure, so the decision is tested with injected features.  It also
predicts the bytes llama.cpp copies into repacked buffers (they are allocated, not memory-mapped), which the
memory planner counts.

Which tensors ``CPU_REPACK`` takes mirrors ggml's ``ggml_repack_get_optimal_repack_type`` (``REPACK_RULES``):
on x86 a matrix-multiply weight of type Q4_0, Q4_K, IQ4_NL or MXFP4 with AVX2, or Q2_K with AVX-512, whose
row count (ne1) is a multiple of 8; on ARM the NEON dot-product / int8-matmul rules.  Steering is only used
on x86 (AMX exists only there).  A tensor outside these rules is never steered (steering one that ggml cannot
repack would abort), so a miss costs speed, not safety.
"""

from __future__ import annotations

import enum
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as Q

from edgerope.errors import RuntimeConfigError
from edgerope.gguf.reader import TensorInfo

REPACK_BUFT = "CPU_REPACK"
POLICY_ENV = "EDGEROPE_CPU_REPACK"  # the process default when a caller passes no policy (the CLI's --cpu-repack)
# Extra buffer types that crash the llama.cpp this project pins (llama-cpp-python >=0.3.36,<0.4), with why.
CRASHING_BUFTS: Mapping[str, str] = {
    "AMX": "llama.cpp's AMX weight repacking crashes (SIGSEGV in ggml_backend_amx_mul_mat, or SIGILL in its AMX "
    "kernels) on Q4_0/Q8_0/Q4_K weights",
}
# Weights llama.cpp multiplies with GGML_OP_MUL_MAT (2-D) or MUL_MAT_ID (3-D experts), by name without "blk.N.".
MATMUL_WEIGHTS = frozenset(
    {
        "attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv",
        "ffn_gate", "ffn_up", "ffn_down", "output",
        "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
    }
)  # fmt: skip
# ggml's repack rules (ggml_repack_get_optimal_repack_type): type -> [(CPU features all needed, ne1 multiple)];
# a weight is repacked when any rule holds.  x86 first, then ARM.
REPACK_RULES: Mapping[Q, tuple[tuple[tuple[str, ...], int], ...]] = {
    Q.Q4_0: ((("AVX2",), 8), (("NEON", "MATMUL_INT8"), 4), (("NEON", "DOTPROD"), 4)),
    Q.Q4_K: ((("AVX2",), 8), (("NEON", "MATMUL_INT8"), 8), (("NEON", "DOTPROD"), 8)),
    Q.Q2_K: ((("AVX512",), 8),),
    Q.Q5_K: ((("NEON", "MATMUL_INT8"), 8), (("NEON", "DOTPROD"), 8)),
    Q.Q6_K: ((("NEON", "MATMUL_INT8"), 8), (("NEON", "DOTPROD"), 8)),
    Q.IQ4_NL: ((("AVX2",), 8), (("NEON", "DOTPROD"), 4)),
    Q.MXFP4: ((("AVX2",), 8), (("NEON", "DOTPROD"), 4)),
    Q.Q8_0: ((("NEON", "MATMUL_INT8"), 4), (("NEON", "DOTPROD"), 4)),
}
# Types llama.cpp's AMX buffer takes (amx/common.h qtype_has_amx_kernels), for the "on" memory estimate.
AMX_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS})
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


class CpuRepack(str, enum.Enum):
    """The CPU weight-layout policy (``--cpu-repack``)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def parse(cls, value: str | CpuRepack | None) -> CpuRepack:
        """A policy from its name; None takes ``$EDGEROPE_CPU_REPACK``, else ``auto``."""
        if value is None:
            value = os.environ.get(POLICY_ENV) or "auto"
        try:
            return cls(str(value.value if isinstance(value, CpuRepack) else value).lower())
        except ValueError:
            raise RuntimeConfigError(
                f"unknown cpu_repack policy {value!r}", fix=f"use one of: {', '.join(m.value for m in cls)}"
            ) from None


@dataclass(frozen=True)
class CpuBackend:
    """What the llama.cpp build reports about the CPU: its extra buffer types (in llama.cpp's order) and the
    features it was built with and found (``ggml_backend_get_features``: name -> value, e.g. AVX2 -> 1)."""

    extra_buffer_types: tuple[str, ...] = ()
    features: Mapping[str, str] = field(default_factory=dict)

    def has(self, feature: str) -> bool:
        return self.features.get(feature, "0") not in ("", "0")

    def describe(self) -> str:
        on = [k for k, v in self.features.items() if v not in ("", "0")]
        bufts = ", ".join(self.extra_buffer_types) or "none"
        return f"CPU features {' '.join(on) or 'none reported'}; extra buffer types: {bufts}"


@dataclass(frozen=True)
class WeightLayout:
    """How llama.cpp will lay out the CPU weights, and why."""

    policy: CpuRepack
    use_extra_bufts: bool  # llama_model_params.use_extra_bufts
    overrides: tuple[tuple[str, str], ...]  # (tensor-name regex, buffer type name) for tensor_buft_overrides
    repacked_bytes: int  # weight bytes copied into extra buffers (allocated, not memory-mapped)
    avoided: tuple[str, ...]  # crashing buffer types this layout keeps llama.cpp from using
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy.value,
            "use_extra_bufts": self.use_extra_bufts,
            "overrides": [list(o) for o in self.overrides],
            "repacked_bytes": self.repacked_bytes,
            "avoided": list(self.avoided),
            "reason": self.reason,
        }


def repacks(t: TensorInfo, cpu: CpuBackend) -> bool:
    """Whether ggml's ``CPU_REPACK`` buffer takes this weight (``REPACK_RULES``, matrix-multiply weights only)."""
    base = _base_name(t.name)
    if base not in MATMUL_WEIGHTS or len(t.shape) != (3 if base.endswith("_exps") else 2):
        return False
    return any(
        all(cpu.has(f) for f in needs) and t.shape[1] % multiple == 0
        for needs, multiple in REPACK_RULES.get(t.ggml_type, ())
    )


def _base_name(name: str) -> str:
    m = _LAYER.match(name)
    if m:
        return m.group(2)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def steering_patterns(names: Iterable[str], all_names: Iterable[str]) -> tuple[str, ...]:
    """Anchored regexes that match exactly ``names`` among ``all_names`` (one per tensor kind, layers listed or
    ``\\d+`` when every layer's tensor of that kind is included): few patterns, since llama.cpp compiles each
    pattern once per tensor it loads."""
    chosen = set(names)
    by_kind: dict[str, set[int]] = defaultdict(set)
    all_by_kind: dict[str, set[int]] = defaultdict(set)
    plain: list[str] = []
    for n in all_names:
        m = _LAYER.match(n)
        if m:
            all_by_kind[m.group(2)].add(int(m.group(1)))
    for n in sorted(chosen):
        m = _LAYER.match(n)
        if m:
            by_kind[m.group(2)].add(int(m.group(1)))
        else:
            plain.append(n)
    out = [f"^{re.escape(n)}$" for n in plain]
    for kind in sorted(by_kind):
        layers = by_kind[kind]
        kind_re = re.escape(kind)
        if layers == all_by_kind[kind]:
            out.append(rf"^blk\.\d+\.{kind_re}\.weight$")
        else:
            alt = "|".join(str(i) for i in sorted(layers))
            out.append(rf"^blk\.({alt})\.{kind_re}\.weight$")
    return tuple(out)


def plan_layout(
    policy: CpuRepack | str, cpu: CpuBackend, tensors: Iterable[TensorInfo], *, gpu_offload: bool = False
) -> WeightLayout:
    """Decide the CPU weight layout for a model (see the module docstring).

    With ``gpu_offload`` the weights live on the GPU and nothing is steered: extra buffer types are only
    turned off where a crashing one is present (``auto``) or asked (``off``).
    """
    policy = CpuRepack.parse(policy)
    tensors = list(tensors)
    crashing = tuple(b for b in cpu.extra_buffer_types if b in CRASHING_BUFTS)
    has_repack = REPACK_BUFT in cpu.extra_buffer_types
    repackable = [t for t in tensors if has_repack and repacks(t, cpu)]
    repack_bytes = sum(t.n_bytes for t in repackable)

    if policy is CpuRepack.OFF:
        return WeightLayout(policy, False, (), 0, crashing, "extra buffer types off (asked): weights memory-mapped")
    if policy is CpuRepack.ON or not crashing:
        taken = 0 if gpu_offload else _default_repacked_bytes(tensors, cpu, repackable)
        why = "llama.cpp's default: every extra buffer type it offers" + (
            f" ({', '.join(cpu.extra_buffer_types)})" if cpu.extra_buffer_types else " (none on this CPU/build)"
        )
        if policy is CpuRepack.ON and crashing:
            why += "; WARNING: " + "; ".join(CRASHING_BUFTS[b] for b in crashing)
        return WeightLayout(policy, True, (), taken, (), why)
    # auto, with a crashing buffer type present
    why = "; ".join(CRASHING_BUFTS[b] for b in crashing)
    if gpu_offload or not repackable:
        rest = "GPU offload" if gpu_offload else f"no weight of this model is taken by {REPACK_BUFT}"
        return WeightLayout(policy, False, (), 0, crashing, f"{', '.join(crashing)} avoided ({why}); {rest}")
    patterns = steering_patterns((t.name for t in repackable), (t.name for t in tensors))
    return WeightLayout(
        policy,
        False,
        tuple((p, REPACK_BUFT) for p in patterns),
        repack_bytes,
        crashing,
        f"{', '.join(crashing)} avoided ({why}); {len(repackable)} weights steered to {REPACK_BUFT}",
    )


def _default_repacked_bytes(tensors: list[TensorInfo], cpu: CpuBackend, repackable: list[TensorInfo]) -> int:
    """Bytes llama.cpp's default puts in extra buffers: AMX first (when offered), then CPU_REPACK."""
    amx = "AMX" in cpu.extra_buffer_types
    taken = {t.name for t in repackable}
    total = sum(t.n_bytes for t in repackable)
    if amx:
        total += sum(
            t.n_bytes
            for t in tensors
            if t.name not in taken and t.ggml_type in AMX_TYPES and _base_name(t.name) in MATMUL_WEIGHTS
        )
    return total
