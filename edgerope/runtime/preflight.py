"""Preflight for ``edgerope.runtime.runtime``: decide and check every llama.cpp setting for a GGUF before anything native.

What it does: ``plan_runtime`` reads the GGUF (``edgerope.gguf.reader``) and its planned memory
(``edgerope.runtime.plan``) and returns a ``RuntimePlan`` -- context length (default: the largest that fits the
memory budget, capped at the model's context_length), cache types, flash attention, backend, threads, rope
runtime parameters and the rope function llama.cpp will compute -- or refuses with a typed error what would
make llama.cpp abort the process or silently compute something else (docs/llama_cpp.md §2 and §7,
docs/llama_cpp.md pitfalls 3, 4, 8, 13, 15-19).

With GPU offload (``edgerope.runtime.offload`` and ``gpu_plan``, from the devices llama.cpp reports) it decides the layers
offloaded and the context from each device's free memory, and checks the cache types against what CUDA's
flash attention can run (``edgerope.runtime.gpu_devices``).

What it does not do: load anything.  The only native calls are queries of the llama.cpp build: can it offload,
which devices with how much free memory, which CPU layouts it offers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gguf import Keys

from edgerope.errors import RuntimeConfigError
from edgerope.gguf.checks import check_runnable
from edgerope.gguf.hparams import ModelHparams, model_hparams
from edgerope.gguf.kv import KVType, kv_bytes, kv_type, padded_ctx
from edgerope.gguf.reader import GGUFFile, using_gguf
from edgerope.rope.ggml import ARCHS_READING_YARN_BETAS, ROPE_FACTORS_LONG, LlamaCppRope, key
from edgerope.runtime.cpu_repack import CpuBackend, CpuRepack, WeightLayout, plan_layout
from edgerope.runtime.gpu_plan import GpuPlan
from edgerope.runtime.native import (
    ContextParams,
    FlashAttn,
    RopeOverrides,
    cpu_backend,
    default_threads,
)
from edgerope.runtime.offload import offload_targets, plan_gpu
from edgerope.runtime.plan import MemoryPlan, plan_memory
from edgerope.system.memory import format_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_CTX = 4096  # default n_ctx cap only when memory cannot be planned (no memory query on this platform)
SUGGEST_CACHE_TYPES = ("q8_0", "q4_0")  # a refusal for memory also says how far these caches reach
DEFAULT_N_BATCH = 512
Backend = Literal["auto", "cpu", "gpu"]
FLASH_ATTN_CHOICES = tuple(m.value for m in FlashAttn)


@dataclass(frozen=True)
class RuntimePlan:
    """Every llama.cpp setting for one GGUF, decided and checked before anything native is loaded."""

    path: Path
    architecture: str
    hparams: ModelHparams
    n_ctx: int  # requested; llama.cpp allocates it padded to a multiple of 256
    n_batch: int
    n_threads: int
    type_k: KVType
    type_v: KVType
    flash_attn: FlashAttn  # what is passed to llama.cpp (AUTO is resolved by llama.cpp)
    backend: Backend  # the requested one
    n_gpu_layers: int
    rope: RopeOverrides  # caller overrides plus the runtime needs recorded in the GGUF
    rope_function: LlamaCppRope  # what llama.cpp will compute with these settings
    rope_description: str
    notes: tuple[str, ...] = ()
    n_ctx_source: str = "requested"  # how n_ctx was chosen, in words
    memory_plan: MemoryPlan | None = None  # the CPU memory plan; None with GPU offload (gpu_plan) or not planned
    weight_layout: WeightLayout | None = None  # the CPU weight-layout (repack) decision; None: llama.cpp's default
    gpu_plan: GpuPlan | None = None  # layers per device, VRAM per device, CPU memory (GPU offload only)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes llama.cpp allocates for the KV cache at this n_ctx (padded to 256)."""
        hp = self.hparams
        return sum(
            kv_bytes(
                self.n_ctx,
                n_layers=1,
                n_kv_heads=h,
                head_dim_k=hp.head_dim_k,
                head_dim_v=hp.head_dim_v,
                type_k=self.type_k.name,
                type_v=self.type_v.name,
            )
            for h in hp.n_head_kv_layers
        )

    def context_params(self) -> ContextParams:
        return ContextParams(
            n_ctx=self.n_ctx,
            n_batch=self.n_batch,
            n_ubatch=self.n_batch,
            n_threads=self.n_threads,
            type_k=self.type_k.id,
            type_v=self.type_v.id,
            flash_attn=self.flash_attn,
            offload_kqv=self.n_gpu_layers != 0,
            rope=self.rope,
        )


def _flash_attn(value: str | bool) -> FlashAttn:
    if isinstance(value, bool):
        return FlashAttn.ON if value else FlashAttn.OFF
    try:
        return FlashAttn(str(value).lower())
    except ValueError:
        raise RuntimeConfigError(
            f"unknown flash_attn setting {value!r}", fix=f"use one of: {', '.join(FLASH_ATTN_CHOICES)}"
        ) from None


def _describe(fn: LlamaCppRope, stype: str, hp: ModelHparams) -> str:
    if fn.ext_factor != 0:
        kind = "yarn"
    elif stype == "longrope":
        kind = "longrope"
    else:
        kind = "linear" if fn.freq_scale != 1.0 else "plain"
    words = [f"{kind} rope, base {fn.freq_base:g}"]
    if fn.freq_scale != 1.0:
        words.append(f"factor {1.0 / fn.freq_scale:g}")
    if fn.ext_factor != 0:
        words.append(f"YaRN ramp over original context {fn.n_ctx_orig} (betas {fn.beta_fast:g}/{fn.beta_slow:g})")
    if fn.freq_factors is not None:
        words.append(f"per-band frequency factors ({len(fn.freq_factors)})")
    words.append(f"magnitude {fn.magnitude:.6g}")
    words.append(f"rotary dims {hp.n_rot}")
    return ", ".join(words)


def _planner_flash(fa: FlashAttn) -> bool | None:
    return {FlashAttn.ON: True, FlashAttn.OFF: False}.get(fa)  # AUTO: planned off, the larger buffer


def _plan_context(
    path: str | Path | GGUFFile,
    hp: ModelHparams,
    *,
    n_ctx: int | None,
    tk: KVType,
    tv: KVType,
    fa: FlashAttn,
    n_batch: int,
    memory_budget: int | str | None,
    repacked_bytes: int = 0,
) -> tuple[int, str, MemoryPlan | None]:
    """(n_ctx, how it was chosen, the CPU memory plan); refuses a context whose planned memory exceeds the
    budget."""
    where = str(path.path if isinstance(path, GGUFFile) else path)
    opts = dict(
        type_k=tk.name,
        type_v=tv.name,
        n_batch=n_batch,
        n_ubatch=n_batch,
        flash_attn=_planner_flash(fa),
        repacked_bytes=repacked_bytes,
    )
    if memory_budget is None:
        try:
            mem = plan_memory(path, n_ctx=n_ctx, **opts)
        except RuntimeConfigError as exc:  # no /proc/meminfo: run without a plan rather than refuse
            if n_ctx is not None:
                return n_ctx, f"requested (memory not planned: {exc.what})", None
            n = min(hp.n_ctx_train, DEFAULT_MAX_CTX)
            return n, f"context_length capped at {DEFAULT_MAX_CTX} (memory not planned: {exc.what})", None
    else:
        mem = plan_memory(path, n_ctx=n_ctx, memory_budget=memory_budget, **opts)
    pair = tk.name if tk.name == tv.name else f"{tk.name}/{tv.name}"
    budget = f"{format_bytes(mem.budget_bytes)} ({mem.budget_source})"
    if not mem.fits:
        sugg = [f"n_ctx <= {mem.largest_ctx[pair]['n_ctx']} with the {pair} cache"]
        sugg += [f"{t} cache: n_ctx <= {mem.largest_ctx[t]['n_ctx']}" for t in SUGGEST_CACHE_TYPES if t != pair]
        asked = "n_ctx " + (str(n_ctx) if n_ctx is not None else f"{mem.n_ctx} (the smallest)")
        raise RuntimeConfigError(
            f"{asked} needs about {format_bytes(mem.total_bytes)} (weights {format_bytes(mem.weights_bytes)}, "
            f"KV cache {format_bytes(mem.kv_bytes)}, compute {format_bytes(mem.compute_bytes)}), over the memory "
            f"budget of {budget}",
            where=where,
            fix="use " + "; or ".join(sugg) + "; or give a larger memory_budget (--memory)",
        )
    if n_ctx is not None:
        return n_ctx, f"requested (planned {format_bytes(mem.total_bytes)} of a {budget} budget)", mem
    if mem.largest_ctx[pair]["limited_by"] == "model":
        how = f"the model's context_length {hp.n_ctx_train}, which fits the memory budget of {budget}"
    else:
        how = (
            f"the largest that fits the memory budget of {budget} (planned {format_bytes(mem.total_bytes)}); "
            f"the model's context_length is {hp.n_ctx_train}"
        )
    return mem.n_ctx, how, mem


@dataclass(frozen=True)
class _Caches:
    type_k: KVType
    type_v: KVType
    flash_attn: FlashAttn
    notes: tuple[str, ...]


def _check_numbers(hp: ModelHparams, n_ctx: int | None, n_batch: int, n_threads: int | None, *, extrapolate: bool,
                   where: str) -> None:  # fmt: skip
    if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1):
        raise RuntimeConfigError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_ctx is not None and n_ctx > hp.n_ctx_train and not extrapolate:
        raise RuntimeConfigError(
            f"n_ctx {n_ctx} is beyond the model's context_length {hp.n_ctx_train}: positions past it were never "
            "trained (or extended by rope scaling)",
            where=where,
            fix=f"use n_ctx <= {hp.n_ctx_train}, fine-tune/convert with rope scaling for a longer context, or pass "
            "allow_extrapolation=True to run it anyway",
        )
    if n_batch < 1 or n_threads is not None and n_threads < 1:
        raise RuntimeConfigError(f"n_batch and n_threads must be >= 1, got {n_batch} and {n_threads}")


def _caches(hp: ModelHparams, type_k: str, type_v: str, flash_attn: str | bool, *, where: str) -> _Caches:
    """Cache types and flash attention, checked against the model (docs/llama_cpp.md §7, pitfall 16)."""
    tk, tv = kv_type(type_k), kv_type(type_v)
    fa = _flash_attn(flash_attn)
    notes: list[str] = []
    for t, head_dim, which in ((tk, hp.head_dim_k, "K"), (tv, hp.head_dim_v, "V")):
        if t.quantized and head_dim % t.block_size:
            raise RuntimeConfigError(
                f"a {t.name} {which} cache needs a head size that is a multiple of {t.block_size}; this model's "
                f"{which} head size is {head_dim}",
                where=where,
                fix=f"use an unquantized {which} cache (f16, bf16 or f32)",
            )
    if tv.quantized:
        if fa is FlashAttn.OFF:
            raise RuntimeConfigError(
                f"a quantized V cache ({tv.name}) needs flash attention, which is off",
                where=where,
                fix="use flash_attn='auto' or 'on', or an unquantized V cache",
            )
        if fa is FlashAttn.AUTO:
            fa = FlashAttn.ON
            notes.append(f"flash attention on: required by the {tv.name} V cache")
    elif fa is FlashAttn.AUTO and tk.name == "f32" and tv.name == "f32":
        fa = FlashAttn.OFF  # llama.cpp's flash attention casts an f32 cache to f16
        notes.append("flash attention off: llama.cpp would cast the f32 KV cache to f16 inside it")
    elif fa is FlashAttn.ON and "f32" in (tk.name, tv.name):
        notes.append("flash attention casts the f32 cache to f16 while attending: f16 precision")
    return _Caches(tk, tv, fa, tuple(notes))


def _rope_overrides(
    arch: str, kv: Mapping[str, Any], given: Mapping[str, float] | None
) -> tuple[RopeOverrides, tuple[str, ...]]:
    """The caller's rope overrides plus what the GGUF records but this arch does not read (docs/llama_cpp.md pitfall 2)."""
    values = dict(given or {})
    notes = []
    for field_name, template in (
        ("yarn_beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
        ("yarn_beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW),
    ):
        value = kv.get(key(template, arch))
        if value is not None and arch not in ARCHS_READING_YARN_BETAS and field_name not in values:
            values[field_name] = float(value)
            notes.append(
                f"{field_name}={float(value):g} applied at run time: the GGUF records it, llama.cpp ignores the key "
                f"on arch {arch!r}"
            )
    return RopeOverrides.from_mapping(values), tuple(notes)


def _longrope_note(stype: str, n_ctx: int, fn: LlamaCppRope) -> str | None:
    if stype != "longrope" or padded_ctx(n_ctx) <= fn.n_ctx_orig:
        return None
    msg = (
        f"LongRoPE: n_ctx {n_ctx} (allocated {padded_ctx(n_ctx)}) exceeds the original context {fn.n_ctx_orig}, "
        "so llama.cpp uses the long factors for every prompt, short ones included; Hugging Face uses the short "
        f"factors for sequences up to {fn.n_ctx_orig} tokens (docs/llama_cpp.md pitfall 8)"
    )
    logger.warning("%s", msg)
    return msg


@dataclass(frozen=True)
class _Memory:
    n_ctx: int
    source: str  # how n_ctx was chosen, in words
    plan: MemoryPlan | None  # the CPU memory plan (None with GPU offload: ``gpu_plan`` plans it)
    layout: WeightLayout


def _memory_and_layout(
    f: GGUFFile,
    hp: ModelHparams,
    caches: _Caches,
    *,
    n_ctx: int | None,
    n_batch: int,
    memory_budget: int | str | None,
    gpu_plan: GpuPlan | None,
    weights: list[Any],
    repack: CpuRepack,
) -> _Memory:
    """The context and the CPU memory plan, then the CPU weight layout (from what llama.cpp reports about this CPU:
    the first native query).  Memory is planned first without repacked weight copies, so a request that cannot fit
    is refused before any native call, then again with them (they are allocated beside the mapped file)."""
    plan_args = dict(
        n_ctx=n_ctx, tk=caches.type_k, tv=caches.type_v, fa=caches.flash_attn, n_batch=n_batch,
        memory_budget=memory_budget,
    )  # fmt: skip
    mem = None
    if gpu_plan is not None:
        n, source = gpu_plan.n_ctx, gpu_plan.n_ctx_source
    else:
        n, source, mem = _plan_context(f, hp, **plan_args)  # type: ignore[arg-type]
    layout = plan_layout(repack, CpuBackend(*cpu_backend()), weights, gpu_offload=gpu_plan is not None)
    if layout.repacked_bytes and mem is not None:
        n, source, mem = _plan_context(f, hp, **plan_args, repacked_bytes=layout.repacked_bytes)  # type: ignore[arg-type]
    return _Memory(n, source, mem, layout)


def plan_runtime(
    src: str | Path | GGUFFile,
    *,
    n_ctx: int | None = None,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: str | bool = "auto",
    backend: Backend = "auto",
    n_threads: int | None = None,
    n_batch: int = DEFAULT_N_BATCH,
    rope_overrides: Mapping[str, float] | None = None,
    allow_extrapolation: bool = False,
    memory_budget: int | str | None = None,
    cpu_repack: str | CpuRepack | None = None,
    n_gpu_layers: int | None = None,
    gpu_memory_budget: int | str | None = None,
) -> RuntimePlan:
    """Check a run request against the GGUF and decide every llama.cpp setting (what ``Runtime.open`` loads).

    ``src`` is the GGUF's path, or the file already open (``edgerope.gguf.reader``: its header is parsed once
    per command and passed down).  ``n_ctx`` defaults to the largest context whose planned memory
    (``edgerope.runtime.plan``, for these cache types and flash attention) fits ``memory_budget`` (bytes or
    "8GiB"; default: MemAvailable less 10%), capped at the model's context_length (the rope-extended length);
    ``RuntimePlan.n_ctx_source`` says which limit chose it.  A requested ``n_ctx`` whose planned memory exceeds
    the budget is refused with the planner's suggestion.  Beyond context_length only with ``allow_extrapolation``.
    ``type_k``/``type_v`` are cache type names (``edgerope.gguf.kv``).  ``flash_attn`` is "auto" (on for a
    quantized V cache, off for an f32 cache, else llama.cpp's choice), "on" or "off".

    GPU: ``backend`` "auto" offloads when the build has a GPU and at least one layer fits it (else the CPU,
    noted), "gpu" insists (refusing what does not fit), "cpu" never offloads.  ``n_gpu_layers`` (-1: all; None:
    every layer when the context fits that way, else as many as fit) and the context are planned from each
    device's free memory less 1 GiB, or ``gpu_memory_budget`` per device (``edgerope.runtime.gpu_plan``: weights,
    KV cache and compute buffer per device; ``RuntimePlan.gpu_plan``); ``memory_budget`` is then the CPU side's.
    Cache types CUDA's flash attention cannot run are refused, slow pairs warned (``gpu_devices``).

    ``rope_overrides`` takes llama_context_params rope fields
    (``RopeOverrides``); unset ones come from the GGUF.  ``cpu_repack`` is the CPU weight-layout policy
    (``edgerope.runtime.cpu_repack``: "auto" avoids the buffer types known to crash, "on" is llama.cpp's
    default, "off" turns repacking off; None: ``$EDGEROPE_CPU_REPACK``, else "auto").

    Raises ``GGUFError``/``RuntimeConfigError`` before anything is loaded: the file's refusals come before any
    native call; the GPU ones follow the only native calls made here, queries of the build (can it offload,
    which devices with how much free memory, which CPU layouts).
    """
    # Long because the docstring documents every request field; the body is one named step per line, in the order
    # that keeps every refusal ahead of the first native call.
    repack = CpuRepack.parse(cpu_repack)
    with using_gguf(src) as f:
        where = str(f.path)
        arch = check_runnable(f)
        hp = model_hparams(f)
        kv, freq_factors, weights = f.kv(), f.freq_factors(), list(f.tensors)
        _check_numbers(hp, n_ctx, n_batch, n_threads, extrapolate=allow_extrapolation, where=where)
        caches = _caches(hp, type_k, type_v, flash_attn, where=where)
        devices = offload_targets(backend, n_gpu_layers)
        gpu_plan, gpu_notes = None, ()
        if devices:
            gpu_plan, gpu_notes = plan_gpu(
                f, hp, devices, caches, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_batch=n_batch,
                memory_budget=memory_budget, gpu_memory_budget=gpu_memory_budget, backend=backend,
            )  # fmt: skip
        # refusals of the rope (unknown overrides, a scaling type llama.cpp lacks) before the native queries below
        rope, rope_notes = _rope_overrides(arch, kv, rope_overrides)
        LlamaCppRope.from_gguf(arch, kv, tensors=freq_factors, n_ctx=n_ctx, runtime=rope.explicit())
        memory = _memory_and_layout(
            f, hp, caches, n_ctx=n_ctx, n_batch=n_batch, memory_budget=memory_budget, gpu_plan=gpu_plan,
            weights=weights, repack=repack,
        )  # fmt: skip
        n_ctx_planned, n_ctx_source, mem, layout = memory.n_ctx, memory.source, memory.plan, memory.layout
        fn = LlamaCppRope.from_gguf(arch, kv, tensors=freq_factors, n_ctx=n_ctx_planned, runtime=rope.explicit())
    stype = kv.get(key(Keys.Rope.SCALING_TYPE, arch), "linear")
    if arch == "phi3" and ROPE_FACTORS_LONG in freq_factors:  # phi3's loader takes long/short factors whatever the type
        stype = "longrope"
    notes = [
        *caches.notes,
        *rope_notes,
        *gpu_notes,
        *(n for n in (mem.notes if mem else ()) if not n.startswith("n_ctx ")),
    ]
    longrope = _longrope_note(stype, n_ctx_planned, fn)
    return RuntimePlan(
        path=Path(where),
        architecture=arch,
        hparams=hp,
        n_ctx=n_ctx_planned,
        n_batch=min(n_batch, padded_ctx(n_ctx_planned)),
        n_threads=n_threads or default_threads(),
        type_k=caches.type_k,
        type_v=caches.type_v,
        flash_attn=caches.flash_attn,
        backend=backend,
        n_gpu_layers=gpu_plan.n_gpu_layers if gpu_plan is not None else 0,
        rope=rope,
        rope_function=fn,
        rope_description=_describe(fn, stype, hp),
        notes=tuple([*notes, longrope] if longrope else notes),
        n_ctx_source=n_ctx_source,
        memory_plan=mem,
        weight_layout=layout,
        gpu_plan=gpu_plan,
    )
