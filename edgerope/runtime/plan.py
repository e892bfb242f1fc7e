"""Plan the memory llama.cpp needs to run a GGUF, and the largest context that fits a budget.

What it does: read the GGUF header (``edgerope.gguf.reader``, no native code) and estimate, for a context
length and K/V cache types, the bytes llama.cpp allocates on the CPU:

* weights: the file's tensor-data region, which llama.cpp maps (``CPU_Mapped model buffer``);
* KV cache: exact, ``edgerope.gguf.kv`` (n_ctx padded to 256, per-layer ``head_count_kv`` arrays summed);
* compute buffer: a model of ggml-alloc's peak over llama.cpp's worst-case reserve graph
  (``llama_context::sched_reserve``: n_tokens = min(n_ctx, n_ubatch), every token an output), see
  ``compute_buffer_bytes``;
* output buffer: n_vocab x n_outputs floats (``llama_context::output_reserve``);
* CPU work buffer: the ggml CPU backend converts a matmul's f32 operand to the other operand's type in a
  scratch buffer sized for the largest node (``work_buffer_bytes``);
* a fixed overhead (runtime library, threads, graph metadata).

Then ``largest_context`` searches the largest n_ctx (a multiple of 256, capped at the model's
context_length) whose total fits a budget, per cache type.

Sliding-window layers are planned with full-length caches: that is what llama.cpp allocates for
edgerope's runtime, which keeps the C API's default ``swa_full`` (llama-cli and llama-server turn it off and
allocate less; noted).  phi3's loader reads ``sliding_window`` and then disables it: no note there.

What it does not do: GPU memory (``edgerope.runtime.gpu_plan`` plans it from the same pieces), the smaller
sliding-window caches of ``swa_full`` off, recurrent state, multiple sequences; it loads nothing and never calls
llama.cpp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf import Keys

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.gguf.hparams import MAX_CTX, MAX_DIM, ModelHparams, model_hparams
from edgerope.gguf.kv import ARCHS_DISABLING_SWA, KV_PAD, SWA_NOTE, kv_bytes, kv_type, padded_ctx
from edgerope.gguf.reader import GGUFFile, using_gguf
from edgerope.rope.ggml import key
from edgerope.system.memory import MiB, available_memory, parse_size

OVERHEAD_BYTES = 8 * MiB  # thread stacks, graph metadata, tokenizer tables: RSS beyond the buffers (bench_plan.py)
BUDGET_SAFETY = 0.10  # the default budget keeps this fraction of MemAvailable free
PLAN_CACHE_TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the compute-buffer model needs, read from the GGUF."""

    n_embd: int
    n_ff: int  # largest feed-forward width over the layers
    n_head: int  # largest head count over the layers
    n_vocab: int
    n_ctx_train: int
    sliding_window: int | None


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes llama.cpp needs for one model, context and cache-type pair (CPU backend)."""

    path: str
    architecture: str
    n_ctx: int  # requested
    n_ctx_allocated: int  # padded to 256
    n_ctx_train: int
    type_k: str
    type_v: str
    flash_attn: bool  # what the compute-buffer estimate assumes
    n_batch: int
    n_ubatch: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int
    work_bytes: int
    overhead_bytes: int
    budget_bytes: int
    budget_source: str
    largest_ctx: dict[str, dict[str, Any]] = field(default_factory=dict)  # cache type -> {n_ctx, limited_by}
    notes: tuple[str, ...] = ()
    repacked_bytes: int = 0  # weights copied into llama.cpp's repack buffers (allocated beside the mapped file)

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.repacked_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.output_bytes
            + self.work_bytes
            + self.overhead_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def extrapolated(self) -> bool:
        return self.n_ctx > self.n_ctx_train

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, extrapolated=self.extrapolated)
        return d


# --------------------------------------------------------------------------------------------------------------
# sizes


def _count(value: Any, name: str, high: int, where: str) -> int:
    """A count from the header (the largest of a per-layer array), as an int in 0..high, else ``GGUFError``."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= high for v in values):
        shown = (
            value
            if not isinstance(value, list)
            else f"[{', '.join(map(repr, value[:4]))}{', ...' if len(value) > 4 else ''}]"
        )
        raise GGUFError(f"{name} is {shown}, not a count in 0..{high:,}", where=where, fix="re-convert the model")
    return max(values, default=0)


def model_shape(hp: ModelHparams, kv: dict[str, Any], *, where: str = "") -> ModelShape:
    arch = hp.architecture
    ffn_key, swa_key = key(Keys.LLM.FEED_FORWARD_LENGTH, arch), key(Keys.Attention.SLIDING_WINDOW, arch)
    n_ff = _count(kv.get(ffn_key, 0), ffn_key, MAX_DIM, where) or 4 * hp.n_embd
    swa = (
        None if arch in ARCHS_DISABLING_SWA or kv.get(swa_key) is None else _count(kv[swa_key], swa_key, MAX_CTX, where)
    )
    return ModelShape(
        n_embd=hp.n_embd,
        n_ff=n_ff,
        n_head=max(hp.n_head_layers),
        n_vocab=hp.n_vocab or 0,
        n_ctx_train=hp.n_ctx_train,
        sliding_window=int(swa) if swa else None,
    )


def kv_cache_bytes(hp: ModelHparams, n_ctx: int, *, type_k: str, type_v: str) -> int:
    """Exact KV bytes: the formula per layer with that layer's n_head_kv, n_ctx padded to 256."""
    return sum(
        kv_bytes(
            n_ctx,
            n_layers=1,
            n_kv_heads=h,
            head_dim_k=hp.head_dim_k,
            head_dim_v=hp.head_dim_v,
            type_k=type_k,
            type_v=type_v,
        )
        for h in hp.n_head_kv_layers
    )


def compute_phases(shape: ModelShape, n_ctx: int, *, n_ubatch: int, flash_attn: bool) -> tuple[int, int, int]:
    """ggml-alloc's peak in each phase of llama.cpp's worst-case graph: (attention, feed-forward, output) bytes.

    T = min(n_ctx_padded, n_ubatch) tokens, all outputs; n_kv = n_ctx_padded (f32 activations, 4 bytes):

    * attention: the KQ mask (n_kv x T, f32; f16 with flash attention) plus, without flash attention,
      the scores KQ (n_kv x T x n_head; softmax runs in place) and ~7 x n_embd per token of q/k/v/residual;
    * feed-forward / residual stream: the mask (alive until the last layer) plus max(4 n_ff + n_embd, 9 n_embd) + 8
      floats per token;
    * output: the logits (n_vocab x T) plus (2 n_embd + 8) floats per token (3 n_embd without flash attention).
    """
    n_kv = padded_ctx(n_ctx)
    t = min(n_kv, n_ubatch)
    mask = n_kv * t * (2 if flash_attn else 4)
    attn = mask + (0 if flash_attn else 4 * n_kv * t * shape.n_head + 4 * t * 7 * shape.n_embd)
    ffn = mask + 4 * t * (max(4 * shape.n_ff + shape.n_embd, 9 * shape.n_embd) + 8)
    out = 4 * t * (shape.n_vocab + 2 * shape.n_embd + 8 + (0 if flash_attn else shape.n_embd))
    return attn, ffn, out


def compute_buffer_bytes(shape: ModelShape, n_ctx: int, *, n_ubatch: int, flash_attn: bool) -> int:
    """ggml-alloc's peak for llama.cpp's worst-case graph (CPU), in bytes: the largest of ``compute_phases``.

    Calibrated on the CPU backend against llama.cpp's "compute buffer size" for three shapes, n_ctx
    256..4096, n_ubatch 64/512, flash attention on/off: within 0% .. +9% (never under).
    """
    return max(compute_phases(shape, n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn))


def work_buffer_bytes(shape: ModelShape, n_ctx: int, *, n_ubatch: int, flash_attn: bool, type_v: str) -> int:
    """The CPU backend's scratch buffer: the largest f32 operand converted for one matmul.

    Without flash attention the softmaxed scores (n_kv x T x n_head) are converted to the V cache's type
    (2 bytes for f16/bf16; f32 needs none) before KQ x V; otherwise the largest activation (T x n_ff)
    converted to f16 for the weight matmuls dominates.
    """
    n_kv = padded_ctx(n_ctx)
    t = min(n_kv, n_ubatch)
    act = 2 * t * max(shape.n_ff, shape.n_embd)
    if flash_attn or type_v == "f32":
        return act
    return max(act, 2 * n_kv * t * shape.n_head)


def output_buffer_bytes(shape: ModelShape, *, n_outputs: int) -> int:
    """llama.cpp's logits buffer: n_vocab x n_outputs floats."""
    return 4 * shape.n_vocab * max(1, n_outputs)


# --------------------------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class _Model:
    path: str
    hp: ModelHparams
    shape: ModelShape
    weights_bytes: int
    repacked_bytes: int = 0


def _read(src: str | Path | GGUFFile, repacked_bytes: int) -> _Model:
    with using_gguf(src) as f:
        hp = model_hparams(f)
        kv = f.kv()
        weights = f.file_size - f.data_offset
        path = str(f.path)
    return _Model(path, hp, model_shape(hp, kv, where=path), weights, repacked_bytes)


def _total(m: _Model, n_ctx: int, *, type_k: str, type_v: str, flash_attn: bool, n_batch: int, n_ubatch: int) -> int:
    ub = min(n_ubatch, n_batch, padded_ctx(n_ctx))
    return (
        m.weights_bytes
        + m.repacked_bytes
        + kv_cache_bytes(m.hp, n_ctx, type_k=type_k, type_v=type_v)
        + compute_buffer_bytes(m.shape, n_ctx, n_ubatch=ub, flash_attn=flash_attn)
        + output_buffer_bytes(m.shape, n_outputs=min(n_batch, padded_ctx(n_ctx)))
        + work_buffer_bytes(m.shape, n_ctx, n_ubatch=ub, flash_attn=flash_attn, type_v=type_v)
        + OVERHEAD_BYTES
    )


def _flash(type_v: str, flash_attn: bool | None) -> bool:
    """None: on when V is quantized (required), else planned off (the larger compute buffer)."""
    return kv_type(type_v).quantized if flash_attn is None else bool(flash_attn)


def largest_context(
    m: _Model, budget: int, *, type_k: str, type_v: str, flash_attn: bool | None, n_batch: int, n_ubatch: int
) -> dict[str, Any]:
    """Largest n_ctx (multiple of 256, <= context_length) whose planned total fits ``budget``."""
    fa = _flash(type_v, flash_attn)
    cap = m.hp.n_ctx_train

    def fits(n: int) -> bool:
        return _total(m, n, type_k=type_k, type_v=type_v, flash_attn=fa, n_batch=n_batch, n_ubatch=n_ubatch) <= budget

    n_ctx = largest_fitting_context(cap, fits)
    return {"n_ctx": n_ctx, "limited_by": "model" if n_ctx == cap else "memory"}


def largest_fitting_context(cap: int, fits: Callable[[int], bool]) -> int:
    """The largest context (``cap``, else a multiple of ``KV_PAD`` below it) for which ``fits`` holds; 0 if none.
    ``fits`` must be monotone: what a context needs rises with it."""
    if fits(cap):
        return cap
    lo, hi = 0, cap // KV_PAD  # fits(lo*256) holds (or lo=0), fits(hi*256) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * KV_PAD):
            lo = mid
        else:
            hi = mid
    return lo * KV_PAD


def plan_memory(
    path: str | Path | GGUFFile,
    *,
    n_ctx: int | None = None,
    type_k: str = "f16",
    type_v: str = "f16",
    memory_budget: int | str | None = None,
    n_batch: int = 512,
    n_ubatch: int = 512,
    flash_attn: bool | None = None,
    repacked_bytes: int = 0,
) -> MemoryPlan:
    """Plan llama.cpp's memory for ``path`` at ``n_ctx`` (default: the largest that fits) and these caches.

    ``memory_budget`` is bytes or a size string ("8GiB"); default: MemAvailable less 10%.  ``flash_attn``
    None plans flash attention on when V is quantized, off otherwise (larger compute buffer).  The plan
    also holds the largest fitting context for every cache type (K = V = that type).  ``repacked_bytes`` are
    weights llama.cpp copies into repack buffers (``edgerope.runtime.cpu_repack``), counted beside the mapped file.  Raises
    ``GGUFError`` for a bad file, ``RuntimeConfigError`` for bad settings.
    """
    tk, tv = kv_type(type_k).name, kv_type(type_v).name
    if n_batch < 1 or n_ubatch < 1:
        raise RuntimeConfigError(f"n_batch and n_ubatch must be >= 1, got {n_batch} and {n_ubatch}")
    if memory_budget is None:
        budget, source = int(available_memory() * (1 - BUDGET_SAFETY)), "MemAvailable less 10%"
    else:
        budget, source = parse_size(memory_budget), "given"
    m = _read(path, repacked_bytes)
    notes: list[str] = []
    if m.shape.sliding_window:
        notes.append(SWA_NOTE)
    if not m.shape.n_vocab:
        notes.append("the GGUF has no vocabulary size: logits not counted")
    fa = _flash(tv, flash_attn)
    opts = dict(flash_attn=flash_attn, n_batch=n_batch, n_ubatch=n_ubatch)
    largest = {t: largest_context(m, budget, type_k=t, type_v=t, **opts) for t in PLAN_CACHE_TYPES}
    pair = tk if tk == tv else f"{tk}/{tv}"  # f32/f32 is keyed "f32", like the listed types
    if pair not in largest:
        largest[pair] = largest_context(m, budget, type_k=tk, type_v=tv, **opts)
    if n_ctx is None:
        n_ctx = largest[pair]["n_ctx"] or KV_PAD
        notes.append(f"n_ctx {n_ctx}: the largest that fits")
    if not isinstance(n_ctx, int) or n_ctx < 1:
        raise RuntimeConfigError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_ctx > m.hp.n_ctx_train:
        notes.append(
            f"n_ctx {n_ctx} is beyond the model's context_length {m.hp.n_ctx_train}: extrapolation "
            "(the runtime refuses it unless allow_extrapolation)"
        )
    ub = min(n_ubatch, n_batch, padded_ctx(n_ctx))
    return MemoryPlan(
        path=m.path,
        architecture=m.hp.architecture,
        n_ctx=n_ctx,
        n_ctx_allocated=padded_ctx(n_ctx),
        n_ctx_train=m.hp.n_ctx_train,
        type_k=tk,
        type_v=tv,
        flash_attn=fa,
        n_batch=n_batch,
        n_ubatch=ub,
        weights_bytes=m.weights_bytes,
        kv_bytes=kv_cache_bytes(m.hp, n_ctx, type_k=tk, type_v=tv),
        compute_bytes=compute_buffer_bytes(m.shape, n_ctx, n_ubatch=ub, flash_attn=fa),
        output_bytes=output_buffer_bytes(m.shape, n_outputs=min(n_batch, padded_ctx(n_ctx))),
        work_bytes=work_buffer_bytes(m.shape, n_ctx, n_ubatch=ub, flash_attn=fa, type_v=tv),
        overhead_bytes=OVERHEAD_BYTES,
        budget_bytes=budget,
        budget_source=source,
        largest_ctx=largest,
        notes=tuple(notes),
        repacked_bytes=repacked_bytes,
    )
