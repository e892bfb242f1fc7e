"""Run a GGUF in llama.cpp with settings checked against the file first: logits for every position, greedy text.

What it does:

* ``plan_runtime`` (``edgerope.runtime.preflight``, re-exported here) reads the GGUF (``edgerope.gguf.reader``) and decides every
  llama.cpp setting *before* any native call, refusing with a typed error what
  would make llama.cpp abort the process or silently compute something else
  (docs/llama_cpp.md §2 and §7, pitfalls 3, 4, 8, 13, 15-19): a missing,
  foreign or truncated file, an architecture llama.cpp does not know, a
  context beyond the model's ``context_length``, unknown cache types, a
  quantized V cache without flash attention, quantized caches on a head size
  that is not a multiple of 32, F16 rope frequency-factor tensors;
* ``Runtime.open`` then loads the model and creates the context through
  ``edgerope.runtime.native`` (the only module touching llama_cpp), applying the
  rope runtime parameters the GGUF records but llama.cpp does not read from it
  (YaRN betas on the llama arch) and reporting all of it in ``Runtime.info``;
* ``Runtime.logits`` evaluates one sequence in n_batch chunks and returns the
  logits of every position; ``Runtime.generate`` decodes greedily with
  llama.cpp's own sampler.

``Runtime.prefill``, ``state_bytes``/``restore_state`` and ``clear=False`` on
``logits``/``generate`` let a caller keep a prefix in the cache (``edgerope.apps.ask``
saves it on disk with ``edgerope.runtime.doccache``).

``generate(sampling=Sampling(...))`` samples with llama.cpp's chain (top-k, top-p, temperature, seeded draw).

The default context is the largest whose memory (``edgerope.runtime.plan``) fits the budget, capped at the model's
context_length; a requested context over the budget is refused with the planner's suggestion
(``info.n_ctx_source`` says how n_ctx was chosen).

KV shift: ``Runtime.shift`` drops cached positions and moves the rest down, only for models whose rope
magnitude is 1 (plain, linear, llama3).  For YaRN, LongRoPE or any ``attn_factor`` llama.cpp's shift
multiplies the cached keys by the magnitude a second time (docs/llama_cpp.md pitfall 15), so ``shift`` refuses and edgerope
never shifts such a model implicitly: nothing here or in ``ask``/``serve`` shifts on its own; callers
re-evaluate the kept tokens.  ``info.kv_shift_exact`` says which case a model is.

What it does not do: serve requests (``edgerope.apps.server``), plan GPU memory.
A ``Runtime`` is not thread-safe.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgerope.errors import RuntimeConfigError
from edgerope.runtime.lora import AdapterPlan, check_adapter
from edgerope.runtime.native import (
    NativeContext,
    NativeLoraAdapter,
    NativeModel,
    NativeSampler,
    note_activity,
    set_lora_adapters,
    supports_gpu_offload,
)
from edgerope.runtime.offload import BACKENDS
from edgerope.runtime.preflight import (  # re-exported: the preflight half of this module's API
    DEFAULT_MAX_CTX,
    DEFAULT_N_BATCH,
    FLASH_ATTN_CHOICES,
    Backend,
    RuntimePlan,
    plan_runtime,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_CTX",
    "DEFAULT_N_BATCH",
    "FLASH_ATTN_CHOICES",
    "Backend",
    "Generation",
    "Runtime",
    "RuntimeInfo",
    "RuntimePlan",
    "Sampling",
    "plan_runtime",
]

logger = logging.getLogger(__name__)


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
    kv_shift_exact: bool = (
        True  # False when the rope magnitude is not 1 (docs/llama_cpp.md pitfall 15): shift() refuses
    )
    n_ctx_source: str = "requested"  # how n_ctx was chosen: requested, or the memory budget / model limit
    memory_planned_bytes: int | None = None  # edgerope.runtime.plan's total for these settings (None: not planned)
    memory_budget_bytes: int | None = None
    notes: tuple[str, ...] = ()
    cpu_repack: dict[str, Any] = field(default_factory=dict)  # the weight-layout decision (edgerope.runtime.cpu_repack)
    lora: tuple[dict[str, Any], ...] = ()  # LoRA adapters applied (edgerope.runtime.lora.AdapterPlan.to_dict)

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
# Runtime


class Runtime:
    """An open GGUF in llama.cpp: ``with Runtime.open(path) as rt: rt.logits(rt.tokenize("..."))``."""

    def __init__(self, plan: RuntimePlan, adapters: Sequence[AdapterPlan] = ()) -> None:
        self.plan = plan
        self._model: NativeModel | None = None
        self._ctx: NativeContext | None = None
        self._sampler: NativeSampler | None = None
        self._adapters: list[NativeLoraAdapter] = []
        layout = plan.weight_layout
        note_activity(
            "loading and running a model",
            model=str(plan.path),
            architecture=plan.architecture,
            settings=f"n_ctx {plan.n_ctx}, KV {plan.type_k.name}/{plan.type_v.name}, flash attention "
            f"{plan.flash_attn.value}, threads {plan.n_threads}, n_batch {plan.n_batch}, gpu layers {plan.n_gpu_layers}",
            cpu_repack=layout.to_dict() if layout else None,
        )
        try:
            self._model = NativeModel(
                plan.path,
                n_gpu_layers=plan.n_gpu_layers,
                cpu_only=plan.n_gpu_layers == 0,
                use_extra_bufts=layout.use_extra_bufts if layout else True,
                buft_overrides=layout.overrides if layout else (),
            )
            self._ctx = NativeContext(self._model, plan.context_params())
            self._sampler = NativeSampler.greedy()
            self._adapters = [NativeLoraAdapter(self._model, a.path) for a in adapters]
            if adapters:
                set_lora_adapters(self._ctx, [(h, a.scale) for h, a in zip(self._adapters, adapters, strict=True)])
        except BaseException:
            self.close()
            raise
        fn = plan.rope_function
        self._info = RuntimeInfo(
            path=str(plan.path),
            architecture=plan.architecture,
            backend="gpu" if plan.n_gpu_layers != 0 else "cpu",
            gpu_offload_supported=supports_gpu_offload(),
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
            cpu_repack=plan.weight_layout.to_dict() if plan.weight_layout else {},
            lora=tuple(a.to_dict() for a in adapters),
        )
        logger.info("opened %s: %s", plan.path, plan.rope_description)

    @classmethod
    def open(
        cls, path: str | Path, *, lora: str | Path | None = None, lora_scale: float = 1.0, **request: Any
    ) -> Runtime:
        """Check the request against the GGUF with ``plan_runtime(path, **request)`` (its keyword arguments and
        defaults), then load the model and create the context.  ``lora``: a llama.cpp LoRA adapter GGUF for
        this model, applied at ``lora_scale`` (checked first by ``edgerope.runtime.lora.check_adapter``).

        Raises ``GGUFError``/``RuntimeConfigError`` (and ``TypeError`` for an unknown argument) before loading
        anything native.
        """
        plan = plan_runtime(path, **request)
        if lora is None:
            return cls(plan)
        adapter = check_adapter(
            lora, base=plan.path, base_rope=plan.rope_function, n_rot=plan.hparams.n_rot, n_ctx=plan.n_ctx,
            scale=lora_scale,
        )  # fmt: skip
        return cls(plan, (adapter,))

    # lifetime
    @property
    def closed(self) -> bool:
        return self._model is None

    def close(self) -> None:
        """Free the sampler, context, LoRA adapters and model.  Safe to call twice."""
        for handle in (self._sampler, self._ctx, *self._adapters, self._model):
            if handle is not None:
                handle.close()
        self._sampler = self._ctx = self._model = None
        self._adapters = []

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"n_ctx={self.plan.n_ctx}, {self.plan.type_k.name}/{self.plan.type_v.name}"
        return f"Runtime({str(self.plan.path)!r}, {state})"

    def _open(self) -> tuple[NativeModel, NativeContext, NativeSampler]:
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
        the magnitude a second time (docs/llama_cpp.md §7, pitfall 15); evaluate the kept tokens again
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
                "keys by it a second time and change the logits (docs/llama_cpp.md pitfall 15)",
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
        with NativeSampler.random(**asdict(sampling)) as chain:
            return self._generate(model, ctx, chain, prompt_tokens, max_tokens, stop, stop_at_eog, clear, on_token)

    def _generate(
        self,
        model: NativeModel,
        ctx: NativeContext,
        sampler: NativeSampler,
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
