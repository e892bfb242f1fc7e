"""Run a GGUF in llama.cpp with settings checked against the file first: logits for every position, greedy text.

What it does:

* ``plan_runtime`` reads the GGUF (``edgerope.gguf_file``) and decides every
  llama.cpp setting *before* any native call, refusing with a typed error what
  would make llama.cpp abort the process or silently compute something else
  (ROPE_GGUF.md sections 2 and 7, pitfalls 3, 4, 8, 13, 15-19): a missing,
  foreign or truncated file, an architecture llama.cpp does not know, a
  context beyond the model's ``context_length``, unknown cache types, a
  quantized V cache without flash attention, quantized caches on a head size
  that is not a multiple of 32, F16 rope frequency-factor tensors;
* ``Runtime.open`` then loads the model and creates the context through
  ``edgerope.native`` (the only module touching llama_cpp), applying the
  rope runtime parameters the GGUF records but llama.cpp does not read from it
  (YaRN betas on the llama arch) and reporting all of it in ``Runtime.info``;
* ``Runtime.logits`` evaluates one sequence in n_batch chunks and returns the
  logits of every position; ``Runtime.generate`` decodes greedily with
  llama.cpp's own sampler.

``Runtime.prefill``, ``state_bytes``/``restore_state`` and ``clear=False`` on
``logits``/``generate`` let a caller keep a prefix in the cache (``edgerope.ask``
saves it on disk with ``edgerope.doccache``).

``generate(sampling=Sampling(...))`` samples with llama.cpp's chain (top-k, top-p, temperature, seeded draw).

The default context is the largest whose memory (``edgerope.plan``) fits the budget, capped at the model's
context_length; a requested context over the budget is refused with the planner's suggestion
(``info.n_ctx_source`` says how n_ctx was chosen).

KV shift: ``Runtime.shift`` drops cached positions and moves the rest down, only for models whose rope
magnitude is 1 (plain, linear, llama3).  For YaRN, LongRoPE or any ``attn_factor`` llama.cpp's shift
multiplies the cached keys by the magnitude a second time (pitfall 15), so ``shift`` refuses and edgerope
never shifts such a model implicitly: nothing here or in ``ask``/``serve`` shifts on its own; callers
re-evaluate the kept tokens.  ``info.kv_shift_exact`` says which case a model is.

What it does not do: serve requests (``edgerope.server``), plan GPU memory.
A ``Runtime`` is not thread-safe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, Keys, TokenType

from edgerope import native as N
from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.ggml_rope import ARCHS_READING_YARN_BETAS, ROPE_TENSORS, LlamaCppRope, key
from edgerope.gguf_file import GGUFFile, ModelHparams, model_hparams, open_gguf
from edgerope.kv import KVType, kv_bytes, kv_type, padded_ctx
from edgerope.plan import MemoryPlan, format_bytes, plan_memory

logger = logging.getLogger(__name__)

DEFAULT_MAX_CTX = 4096  # default n_ctx cap only when memory is not planned (GPU offload)
SUGGEST_CACHE_TYPES = ("q8_0", "q4_0")  # a refusal for memory also says how far these caches reach
DEFAULT_N_BATCH = 512
Backend = Literal["auto", "cpu", "gpu"]
BACKENDS = ("auto", "cpu", "gpu")
FLASH_ATTN_CHOICES = tuple(m.value for m in N.FlashAttn)
SUPPORTED_ARCHS = frozenset(MODEL_ARCH_NAMES.values())


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
    flash_attn: N.FlashAttn  # what is passed to llama.cpp (AUTO is resolved by llama.cpp)
    backend: Backend  # the requested one
    n_gpu_layers: int
    rope: N.RopeOverrides  # caller overrides plus the runtime needs recorded in the GGUF
    rope_function: LlamaCppRope  # what llama.cpp will compute with these settings
    rope_description: str
    notes: tuple[str, ...] = ()
    n_ctx_source: str = "requested"  # how n_ctx was chosen, in words
    memory_plan: MemoryPlan | None = None  # None when not planned (GPU offload)

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

    def context_params(self) -> N.ContextParams:
        return N.ContextParams(
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


@dataclass(frozen=True)
class RuntimeInfo:
    """What an open ``Runtime`` runs: backend, context, caches, flash attention and the rope function."""

    path: str
    architecture: str
    backend: str  # "cpu" or "gpu": where the layers run
    gpu_offload_supported: bool  # whether this llama.cpp build can offload at all
    n_gpu_layers: int
    n_ctx: int  # the usable context (requested)
    n_ctx_allocated: int  # llama.cpp's allocation (padded to 256)
    n_ctx_train: int  # the GGUF's context_length (the rope-extended length)
    n_batch: int
    n_threads: int
    n_vocab: int
    type_k: str
    type_v: str
    kv_cache_bytes: int
    flash_attn: bool  # whether llama.cpp ended up using it
    flash_attn_requested: str
    rope: str  # the rope function llama.cpp computes, in words
    rope_overrides: dict[str, float] = field(default_factory=dict)  # runtime rope parameters passed
    kv_shift_exact: bool = True  # False when the rope magnitude is not 1 (pitfall 15): shift() refuses
    n_ctx_source: str = "requested"  # how n_ctx was chosen: requested, or the memory budget / model limit
    memory_planned_bytes: int | None = None  # edgerope.plan's total for these settings (None: not planned)
    memory_budget_bytes: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """Greedy output: the new tokens (without the stop token), their text, and why it stopped."""

    tokens: list[int]
    text: str
    stop_reason: Literal["eog", "stop", "length", "context"]
    stop_token: int | None = None


@dataclass(frozen=True)
class Sampling:
    """Random sampling by llama.cpp's sampler chain (``generate(sampling=...)``): top-k (0: off), top-p (1: off),
    temperature (> 0), then a draw seeded with ``seed`` (same seed, same settings, same prompt: same tokens)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 100):
            raise RuntimeConfigError(f"temperature must be in (0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RuntimeConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RuntimeConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise RuntimeConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


# --------------------------------------------------------------------------------------------------------------
# Preflight


def _flash_attn(value: str | bool) -> N.FlashAttn:
    if isinstance(value, bool):
        return N.FlashAttn.ON if value else N.FlashAttn.OFF
    try:
        return N.FlashAttn(str(value).lower())
    except ValueError:
        raise RuntimeConfigError(
            f"unknown flash_attn setting {value!r}", fix=f"use one of: {', '.join(FLASH_ATTN_CHOICES)}"
        ) from None


def check_runnable(f: GGUFFile) -> str:
    """Return the architecture; refuse what makes llama.cpp abort while loading or running a GGUF."""
    where = str(f.path)
    arch = f.architecture
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"architecture {arch!r} is not one llama.cpp knows",
            where=where,
            fix="only GGUFs of llama.cpp architectures can run (llama, qwen2, ...)",
        )
    for name in ROPE_TENSORS:
        t = f.tensor(name)
        if t is not None and t.ggml_type != GGMLQuantizationType.F32:
            raise GGUFError(
                f"rope frequency-factor tensor {name} is {t.ggml_type.name}; llama.cpp aborts the process unless it "
                "is F32 (pitfall 13)",
                where=where,
                fix="re-convert with edgerope convert (it keeps these tensors F32), or rewrite the rope with "
                "edgerope set-rope",
            )
    if f.get(Keys.Tokenizer.MODEL) == "llama":  # SentencePiece: unseen characters need the 256 byte pieces
        types = f.get(Keys.Tokenizer.TOKEN_TYPE) or []
        n_bytes = sum(1 for t in types if t == TokenType.BYTE)
        if n_bytes < 256:
            raise GGUFError(
                f"the SentencePiece vocab has {n_bytes} of the 256 byte pieces (<0x00>..<0xFF>); llama.cpp aborts "
                "the process on the first character outside the vocab (pitfall 19)",
                where=where,
                fix="re-train the tokenizer with byte_fallback=True and convert again",
            )
    return arch


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


def _planner_flash(fa: N.FlashAttn) -> bool | None:
    return {N.FlashAttn.ON: True, N.FlashAttn.OFF: False}.get(fa)  # AUTO: planned off, the larger buffer


def _plan_context(
    path: str | Path,
    hp: ModelHparams,
    *,
    n_ctx: int | None,
    tk: KVType,
    tv: KVType,
    fa: N.FlashAttn,
    n_batch: int,
    memory_budget: int | str | None,
    gpu: bool,
) -> tuple[int, str, MemoryPlan | None]:
    """(n_ctx, how it was chosen, the memory plan); refuses a context whose planned memory exceeds the budget."""
    where = str(path)
    if gpu:  # edgerope.plan models the CPU backend only
        if n_ctx is not None:
            return n_ctx, "requested (memory not planned: GPU offload)", None
        n = min(hp.n_ctx_train, DEFAULT_MAX_CTX)
        return n, f"context_length {hp.n_ctx_train} capped at {DEFAULT_MAX_CTX} (memory not planned: GPU offload)", None
    opts = dict(type_k=tk.name, type_v=tv.name, n_batch=n_batch, n_ubatch=n_batch, flash_attn=_planner_flash(fa))
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


def plan_runtime(
    path: str | Path,
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
) -> RuntimePlan:
    """Check a run request against the GGUF and decide every llama.cpp setting (what ``Runtime.open`` loads).

    ``n_ctx`` defaults to the largest context whose planned memory (``edgerope.plan``, for these cache
    types and flash attention) fits ``memory_budget`` (bytes or "8GiB"; default: MemAvailable less 10%),
    capped at the model's context_length (the rope-extended length); ``RuntimePlan.n_ctx_source`` says
    which limit chose it.  A requested ``n_ctx`` whose planned memory exceeds the budget is refused with
    the planner's suggestion.  With GPU offload memory is not planned (the default is context_length
    capped at 4096, noted).  Beyond context_length only with ``allow_extrapolation``.
    ``type_k``/``type_v`` are cache type names (``edgerope.kv``).
    ``flash_attn`` is "auto" (on for a quantized V cache, off for an f32 cache, else llama.cpp's
    choice), "on" or "off".  ``backend`` "auto" offloads every layer when the build can.
    ``rope_overrides`` takes llama_context_params rope fields (``RopeOverrides``); unset ones come
    from the GGUF.  Raises ``GGUFError``/``RuntimeConfigError`` before loading anything native.

    Loads no model: the only native call is asking the llama.cpp build whether it can offload to a GPU.
    """
    with open_gguf(path) as f:
        arch = check_runnable(f)
        hp = model_hparams(f)
        kv = f.kv()
        freq_factors = f.freq_factors()
    where = str(path)
    notes: list[str] = []

    # context (the default is decided below, once caches and backend are known)
    if n_ctx is not None and (not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1):
        raise RuntimeConfigError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if n_ctx is not None and n_ctx > hp.n_ctx_train and not allow_extrapolation:
        raise RuntimeConfigError(
            f"n_ctx {n_ctx} is beyond the model's context_length {hp.n_ctx_train}: positions past it were never "
            "trained (or extended by rope scaling)",
            where=where,
            fix=f"use n_ctx <= {hp.n_ctx_train}, fine-tune/convert with rope scaling for a longer context, or pass "
            "allow_extrapolation=True to run it anyway",
        )
    if n_batch < 1 or n_threads is not None and n_threads < 1:
        raise RuntimeConfigError(f"n_batch and n_threads must be >= 1, got {n_batch} and {n_threads}")

    # caches and flash attention (ROPE_GGUF.md section 7, pitfall 16)
    tk, tv = kv_type(type_k), kv_type(type_v)
    fa = _flash_attn(flash_attn)
    for t, head_dim, which in ((tk, hp.head_dim_k, "K"), (tv, hp.head_dim_v, "V")):
        if t.quantized and head_dim % t.block_size:
            raise RuntimeConfigError(
                f"a {t.name} {which} cache needs a head size that is a multiple of {t.block_size}; this model's "
                f"{which} head size is {head_dim}",
                where=where,
                fix=f"use an unquantized {which} cache (f16, bf16 or f32)",
            )
    if tv.quantized:
        if fa is N.FlashAttn.OFF:
            raise RuntimeConfigError(
                f"a quantized V cache ({tv.name}) needs flash attention, which is off",
                where=where,
                fix="use flash_attn='auto' or 'on', or an unquantized V cache",
            )
        if fa is N.FlashAttn.AUTO:
            fa = N.FlashAttn.ON
            notes.append(f"flash attention on: required by the {tv.name} V cache")
    elif fa is N.FlashAttn.AUTO and tk.name == "f32" and tv.name == "f32":
        fa = N.FlashAttn.OFF  # llama.cpp's flash attention casts an f32 cache to f16
        notes.append("flash attention off: llama.cpp would cast the f32 KV cache to f16 inside it")
    elif fa is N.FlashAttn.ON and "f32" in (tk.name, tv.name):
        notes.append("flash attention casts the f32 cache to f16 while attending: f16 precision")

    # backend
    if backend not in BACKENDS:
        raise RuntimeConfigError(f"unknown backend {backend!r}", fix=f"use one of: {', '.join(BACKENDS)}")
    gpu = N.supports_gpu_offload() if backend != "cpu" else False
    if backend == "gpu" and not gpu:
        raise RuntimeConfigError(
            "backend 'gpu' was requested, but this llama.cpp build has no GPU support",
            fix="reinstall llama-cpp-python with a GPU backend (e.g. CMAKE_ARGS='-DGGML_CUDA=on'), or use "
            "backend='cpu'",
        )

    # memory (edgerope.plan): the default context is the largest that fits; a requested one must fit
    n_ctx, n_ctx_source, mem = _plan_context(
        path, hp, n_ctx=n_ctx, tk=tk, tv=tv, fa=fa, n_batch=n_batch, memory_budget=memory_budget, gpu=gpu
    )
    if mem is not None and mem.notes:
        notes.extend(n for n in mem.notes if not n.startswith("n_ctx "))

    # rope: caller overrides, plus what the GGUF records but this arch does not read (pitfall 2)
    given = dict(rope_overrides or {})
    stype = kv.get(key(Keys.Rope.SCALING_TYPE, arch), "linear")
    for field_name, template in (
        ("yarn_beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
        ("yarn_beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW),
    ):
        value = kv.get(key(template, arch))
        if value is not None and arch not in ARCHS_READING_YARN_BETAS and field_name not in given:
            given[field_name] = float(value)
            notes.append(
                f"{field_name}={float(value):g} applied at run time: the GGUF records it, llama.cpp ignores the key "
                f"on arch {arch!r}"
            )
    rope = N.RopeOverrides.from_mapping(given)
    fn = LlamaCppRope.from_gguf(arch, kv, tensors=freq_factors, n_ctx=n_ctx, runtime=rope.explicit())
    if stype == "longrope" and padded_ctx(n_ctx) > fn.n_ctx_orig:
        msg = (
            f"LongRoPE: n_ctx {n_ctx} (allocated {padded_ctx(n_ctx)}) exceeds the original context {fn.n_ctx_orig}, "
            "so llama.cpp uses the long factors for every prompt, short ones included; Hugging Face uses the short "
            f"factors for sequences up to {fn.n_ctx_orig} tokens (pitfall 8)"
        )
        logger.warning("%s", msg)
        notes.append(msg)

    return RuntimePlan(
        path=Path(path),
        architecture=arch,
        hparams=hp,
        n_ctx=n_ctx,
        n_batch=min(n_batch, padded_ctx(n_ctx)),
        n_threads=n_threads or N.default_threads(),
        type_k=tk,
        type_v=tv,
        flash_attn=fa,
        backend=backend,
        n_gpu_layers=-1 if gpu else 0,
        rope=rope,
        rope_function=fn,
        rope_description=_describe(fn, stype, hp),
        notes=tuple(notes),
        n_ctx_source=n_ctx_source,
        memory_plan=mem,
    )


# --------------------------------------------------------------------------------------------------------------
# Runtime


class Runtime:
    """An open GGUF in llama.cpp: ``with Runtime.open(path) as rt: rt.logits(rt.tokenize("..."))``."""

    def __init__(self, plan: RuntimePlan) -> None:
        self.plan = plan
        self._model: N.NativeModel | None = None
        self._ctx: N.NativeContext | None = None
        self._sampler: N.NativeSampler | None = None
        try:
            self._model = N.NativeModel(plan.path, n_gpu_layers=plan.n_gpu_layers, cpu_only=plan.n_gpu_layers == 0)
            self._ctx = N.NativeContext(self._model, plan.context_params())
            self._sampler = N.NativeSampler.greedy()
        except BaseException:
            self.close()
            raise
        fn = plan.rope_function
        self._info = RuntimeInfo(
            path=str(plan.path),
            architecture=plan.architecture,
            backend="gpu" if plan.n_gpu_layers != 0 else "cpu",
            gpu_offload_supported=N.supports_gpu_offload(),
            n_gpu_layers=plan.n_gpu_layers,
            n_ctx=plan.n_ctx,
            n_ctx_allocated=self._ctx.n_ctx,
            n_ctx_train=plan.hparams.n_ctx_train,
            n_batch=self._ctx.n_batch,
            n_threads=plan.n_threads,
            n_vocab=self._ctx.n_vocab,
            type_k=plan.type_k.name,
            type_v=plan.type_v.name,
            kv_cache_bytes=plan.kv_cache_bytes,
            flash_attn=self._ctx.flash_attn,
            flash_attn_requested=plan.flash_attn.value,
            rope=plan.rope_description,
            rope_overrides=plan.rope.explicit(),
            kv_shift_exact=math.isclose(fn.magnitude, 1.0, rel_tol=1e-9),
            n_ctx_source=plan.n_ctx_source,
            memory_planned_bytes=plan.memory_plan.total_bytes if plan.memory_plan else None,
            memory_budget_bytes=plan.memory_plan.budget_bytes if plan.memory_plan else None,
            notes=plan.notes,
        )
        logger.info("opened %s: %s", plan.path, plan.rope_description)

    @classmethod
    def open(cls, path: str | Path, **request: Any) -> Runtime:
        """Check the request against the GGUF with ``plan_runtime(path, **request)`` (its keyword arguments and
        defaults), then load the model and create the context.

        Raises ``GGUFError``/``RuntimeConfigError`` (and ``TypeError`` for an unknown argument) before loading
        anything native.
        """
        return cls(plan_runtime(path, **request))

    # lifetime
    @property
    def closed(self) -> bool:
        return self._model is None

    def close(self) -> None:
        """Free the sampler, context and model.  Safe to call twice."""
        for handle in (self._sampler, self._ctx, self._model):
            if handle is not None:
                handle.close()
        self._sampler = self._ctx = self._model = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.plan.n_ctx}, {self.plan.type_k.name}/{self.plan.type_v.name}"
        return f"Runtime({str(self.plan.path)!r}, {state})"

    def _open(self) -> tuple[N.NativeModel, N.NativeContext, N.NativeSampler]:
        if self._model is None or self._ctx is None or self._sampler is None:
            raise RuntimeConfigError(
                "this Runtime has been closed", where=str(self.plan.path), fix="open a new one with Runtime.open"
            )
        return self._model, self._ctx, self._sampler

    @property
    def info(self) -> RuntimeInfo:
        self._open()
        return self._info

    @property
    def n_vocab(self) -> int:
        return self.info.n_vocab

    @property
    def n_ctx(self) -> int:
        return self.plan.n_ctx

    # tokens
    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text`` by the GGUF's tokenizer.

        ``add_bos=None`` adds BOS exactly when the GGUF says so (``tokenizer.ggml.add_bos_token``, like
        Hugging Face); True/False force it.  ``special`` parses special-token text such as ``</s>``.
        """
        model, _, _ = self._open()
        if add_bos is None:
            return model.tokenize(text, add_special=True, parse_special=special)
        ids = model.tokenize(text, add_special=False, parse_special=special)
        if add_bos:
            if model.bos is None:
                raise RuntimeConfigError("add_bos=True, but the model has no BOS token", where=str(self.plan.path))
            ids.insert(0, model.bos)
        return ids

    def detokenize(self, tokens: Sequence[int] | np.ndarray) -> str:
        """Text of ``tokens`` without special tokens (a leading BOS is dropped, as SentencePiece decodes)."""
        model, _, _ = self._open()
        ids = list(np.asarray(tokens, dtype=np.int64).ravel())
        if ids and ids[0] == model.bos:
            ids = ids[1:]
        return model.detokenize(ids)

    def _check_length(self, n: int, what: str) -> None:
        if n == 0:
            raise RuntimeConfigError(f"{what} is empty", fix="pass at least one token")
        if n > self.plan.n_ctx:
            raise RuntimeConfigError(
                f"{what} has {n} tokens, the runtime was opened with n_ctx {self.plan.n_ctx}",
                where=str(self.plan.path),
                fix=f"open the runtime with n_ctx >= {n}",
            )

    # evaluation
    def logits(self, tokens: Sequence[int] | np.ndarray, *, clear: bool = True) -> np.ndarray:
        """Logits of every position of one sequence, float32, shape (T, n_vocab); from an empty cache, or
        appended after the cached positions with ``clear=False``."""
        _, ctx, _ = self._open()
        self._check_length(len(tokens), "the token sequence")
        if clear:
            ctx.clear()
        return ctx.logits(tokens)

    @property
    def n_past(self) -> int:
        """Positions in the KV cache now."""
        return self._open()[1].n_past

    @property
    def n_evaluated(self) -> int:
        """Tokens run through llama.cpp since the runtime opened (a restored state adds none)."""
        return self._open()[1].n_evaluated

    def prefill(
        self, tokens: Sequence[int] | np.ndarray, *, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Empty the cache and evaluate ``tokens`` in n_batch chunks, calling ``progress(done, total)``."""
        _, ctx, _ = self._open()
        self._check_length(len(tokens), "the prefix")
        ctx.clear()
        ids = np.asarray(tokens, dtype=np.int32)
        step = ctx.n_batch
        for start in range(0, len(ids), step):
            ctx.decode(ids[start : start + step], outputs="none")
            if progress is not None:
                progress(min(start + step, len(ids)), len(ids))

    def shift(self, n_discard: int, *, n_keep: int = 0) -> None:
        """Drop ``n_discard`` cached positions after the first ``n_keep`` and move the later ones down, so that
        a conversation can go on past the context without evaluating the kept tokens again.

        Refused (``RuntimeConfigError``) when the rope magnitude is not 1 (YaRN's default attention factor,
        LongRoPE, any ``rope.scaling.attn_factor``): llama.cpp re-ropes the moved keys and multiplies them by
        the magnitude a second time (ROPE_GGUF.md section 7, pitfall 15); evaluate the kept tokens again
        instead.  ``info.kv_shift_exact`` tells in advance.

        Even an exact shift is not a re-evaluation: the kept positions keep the keys and values they were
        computed with, and past the first layer those saw the dropped tokens.  The rope part is exact (the
        first layer matches re-evaluation to float precision); the rest is llama.cpp's usual context shift.
        """
        _, ctx, _ = self._open()
        m = self.plan.rope_function.magnitude
        if not self._info.kv_shift_exact:
            raise RuntimeConfigError(
                f"this model's rope magnitude is {m:.6g}, not 1: llama.cpp's KV shift would multiply the cached "
                "keys by it a second time and change the logits (pitfall 15)",
                where=str(self.plan.path),
                fix="re-evaluate the kept tokens instead: logits(kept_tokens) or prefill(kept_tokens) from an empty "
                "cache",
            )
        for name, value in (("n_discard", n_discard), ("n_keep", n_keep)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise RuntimeConfigError(f"{name} must be an integer, got {value!r}")
        ctx.shift(n_keep=n_keep, n_discard=n_discard)

    def state_bytes(self) -> bytes:
        """llama.cpp's saved state of the cached positions (restore it with ``restore_state``)."""
        return self._open()[1].state_bytes()

    def restore_state(self, data: bytes, *, n_past: int) -> None:
        """Put back a state from ``state_bytes`` of a runtime with identical settings, holding ``n_past``."""
        self._open()[1].restore_state(data, n_past=n_past)

    def generate(
        self,
        prompt_tokens: Sequence[int] | np.ndarray,
        max_tokens: int = 64,
        *,
        stop: Iterable[int] = (),
        stop_at_eog: bool = True,
        clear: bool = True,
        on_token: Callable[[int], None] | None = None,
        sampling: Sampling | None = None,
    ) -> Generation:
        """Greedy continuation of ``prompt_tokens`` (from an empty cache, or after the cached positions with
        ``clear=False``) by llama.cpp's sampler chain; ``on_token(token)`` is called as each one is picked.
        ``sampling`` draws tokens at random instead (a chain built for this call).

        Stops after ``max_tokens`` new tokens, at a token in ``stop``, at an end-of-generation token
        (EOS/EOT) unless ``stop_at_eog`` is False, or when the context is full.
        """
        model, ctx, greedy = self._open()
        self._check_length(len(prompt_tokens), "the prompt")
        if max_tokens < 0:
            raise RuntimeConfigError(f"max_tokens must be >= 0, got {max_tokens}")
        if sampling is None:
            return self._generate(model, ctx, greedy, prompt_tokens, max_tokens, stop, stop_at_eog, clear, on_token)
        with N.NativeSampler.random(**asdict(sampling)) as chain:
            return self._generate(model, ctx, chain, prompt_tokens, max_tokens, stop, stop_at_eog, clear, on_token)

    def _generate(
        self,
        model: N.NativeModel,
        ctx: N.NativeContext,
        sampler: N.NativeSampler,
        prompt_tokens: Sequence[int] | np.ndarray,
        max_tokens: int,
        stop: Iterable[int],
        stop_at_eog: bool,
        clear: bool,
        on_token: Callable[[int], None] | None,
    ) -> Generation:
        stops = {int(t) for t in stop}
        if clear:
            ctx.clear()
        sampler.reset()
        ctx.decode(prompt_tokens, outputs="last")
        out: list[int] = []
        reason: Literal["eog", "stop", "length", "context"] = "length"
        stop_token = None
        while len(out) < max_tokens:
            tok = sampler.sample(ctx)
            if on_token is not None:
                on_token(tok)
            if (stop_at_eog and model.is_eog(tok)) or tok in stops:
                reason, stop_token = ("stop" if tok in stops else "eog"), tok
                break
            out.append(tok)
            if len(out) == max_tokens:
                break
            if ctx.n_past >= self.plan.n_ctx:
                reason = "context"
                break
            ctx.decode([tok], outputs="last")
        return Generation(out, model.detokenize(out), reason, stop_token)
