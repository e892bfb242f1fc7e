"""Handle owners over llama.cpp's C API (llama-cpp-python's ctypes bindings): the only module importing llama_cpp.

Three layers, as in llama-cpp-python: the raw bindings (``llama_cpp.llama_cpp``),
the handle owners here (``NativeModel``, ``NativeContext``, ``NativeSampler``:
context managers with an idempotent ``close()``), and the checked, high-level
``edgerope.runtime.runtime.Runtime`` on top.

What this module does:

* imports ``llama_cpp`` lazily, on the first native call, so ``import
  edgerope.runtime.native`` is cheap and works without llama-cpp-python installed;
* routes llama.cpp's (and ggml's) log output into the Python logger
  ``edgerope.llama_cpp``: llama.cpp's chatty INFO lines arrive at DEBUG, its
  warnings and errors at WARNING and ERROR; the logger has a ``NullHandler``,
  so nothing reaches stderr unless the application configures logging;
* evaluates token batches and reads the logits of every position straight
  from llama.cpp's output buffer, one numpy copy per batch;
* greedy sampling with llama.cpp's own sampler chain, and ``quantize`` with
  llama.cpp's quantizer.

What it does not do: check requests against the GGUF (``edgerope.runtime.runtime`` does
that *before* any native call, because llama.cpp aborts the process on some bad
input), pick defaults, or print.  Rope overrides default to llama.cpp's C
"from model" sentinels, never to llama-cpp-python's ``Llama()`` defaults
(docs/llama_cpp.md §2, pitfalls 3 and 4).
"""

from __future__ import annotations

import collections
import ctypes
import enum
import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgerope.errors import EdgeropeError, GGUFError, RuntimeConfigError
from edgerope.system.files import atomic_output

LOGGER_NAME = "edgerope.llama_cpp"
logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message).
_GGML_LOG_DEBUG, _GGML_LOG_INFO, _GGML_LOG_WARN, _GGML_LOG_CONT = 1, 2, 3, 5
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


class FlashAttn(str, enum.Enum):
    """When llama.cpp uses flash attention (llama_flash_attn_type)."""

    AUTO = "auto"  # llama.cpp decides (on when the backend supports it)
    ON = "on"
    OFF = "off"

    @property
    def native(self) -> int:
        lib = _llama()
        return {
            FlashAttn.AUTO: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttn.ON: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn.OFF: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[self]


# Quantization names llama.cpp's quantize tool accepts (each maps to the binding's LLAMA_FTYPE_MOSTLY_<name>,
# F32 to LLAMA_FTYPE_ALL_F32; Q3_K/Q4_K/Q5_K are the tool's aliases of the _M variants).  Left out: the very-low-bit
# IQ1/IQ2/IQ3_XXS/IQ3_XS and Q2_K_S files (llama.cpp refuses them without an importance matrix) and the
# experimental TQ/MXFP4/NVFP4/Q1_0/Q2_0 types.
QUANT_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ3_S", "IQ3_M",
    "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K", "F16", "BF16", "F32",
)  # fmt: skip
_QUANT_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
QUANT_NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S")


# --------------------------------------------------------------------------------------------------------------
# Loading the bindings, logging


class _LogRouter:
    """The ctypes log callback: reassembles llama.cpp's message fragments into lines for ``logging``.

    It also keeps the most recent INFO-and-above lines (not the per-graph DEBUG flood), so a failed
    native call can say what llama.cpp said and the context can tell how flash attention was resolved.
    The callback object lives as long as this router (module lifetime): llama.cpp keeps the pointer.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a handler that logs natively must not deadlock
        self._parts: list[str] = []
        self._level = _GGML_LOG_DEBUG  # ggml level of the line being assembled
        self._count = 0  # lines kept so far
        self.recent: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=400)  # (seq, ggml level, line)
        self.c_callback: Any = None

    def __call__(self, level: int, text: bytes | None, user_data: Any) -> None:
        try:  # an exception must never propagate into C
            chunk = text.decode("utf-8", "replace") if text else ""
            with self._lock:
                if level != _GGML_LOG_CONT:
                    if self._parts:
                        self._emit()
                    self._level = level
                self._parts.append(chunk)
                if chunk.endswith("\n"):
                    self._emit()
        except Exception:  # noqa: BLE001
            pass

    def _emit(self) -> None:
        line = "".join(self._parts).rstrip("\n")
        self._parts.clear()
        if not line.strip():
            return
        if self._level >= _GGML_LOG_INFO:
            self._count += 1
            self.recent.append((self._count, self._level, line))
        py_level = _LOG_LEVELS.get(self._level, logging.DEBUG)
        if logger.isEnabledFor(py_level):
            logger.log(py_level, "%s", line)

    def mark(self) -> int:
        """A position in the line stream, for ``lines_since``."""
        with self._lock:
            return self._count

    def lines_since(self, mark: int, *, min_level: int = _GGML_LOG_INFO) -> list[str]:
        """INFO-and-above lines (``min_level`` is a ggml level) logged after ``mark``, still in the buffer."""
        with self._lock:
            if self._parts:
                self._emit()
            return [line for seq, level, line in self.recent if seq > mark and level >= min_level]


_ROUTER = _LogRouter()
_LIB: Any = None
_LIB_LOCK = threading.Lock()


def _llama() -> Any:
    """The raw bindings (``llama_cpp.llama_cpp``), imported and initialised once; logs routed to Python."""
    global _LIB
    if _LIB is not None:
        return _LIB
    with _LIB_LOCK:
        if _LIB is None:
            try:
                import llama_cpp.llama_cpp as lib
            except (ImportError, OSError, RuntimeError) as exc:
                raise EdgeropeError(
                    f"llama-cpp-python is not usable: {exc}",
                    fix="install it: pip install 'llama-cpp-python>=0.3.36,<0.4' (it compiles llama.cpp)",
                ) from exc
            _ROUTER.c_callback = lib.llama_log_callback(_ROUTER)
            lib.llama_log_set(_ROUTER.c_callback, ctypes.c_void_p(0))
            lib.llama_backend_init()
            _LIB = lib
    return _LIB


CRASH_RECORD_ENV = "EDGEROPE_CRASH_RECORD"


def note_activity(what: str, **details: Any) -> None:
    """Record what native work is about to run (model, settings), for a supervisor that reports a crash.

    Writes JSON to the file named by ``$EDGEROPE_CRASH_RECORD`` (set by the ``edgerope`` command's crash
    guard, ``edgerope.cli.guard``); a no-op otherwise.  A native crash cannot run Python, so this is written
    before the native call, not after.
    """
    path = os.environ.get(CRASH_RECORD_ENV)
    if not path:
        return
    import json

    record = {"what": what, **details}
    try:
        record["llama_cpp_build"] = bindings_version()
    except EdgeropeError:
        pass
    try:
        with atomic_output(Path(path)) as tmp:
            tmp.write_text(json.dumps(record, default=str), encoding="utf-8")
    except OSError:  # the record is a courtesy for the crash report; never fail the work for it
        pass


def native_error_lines(mark: int) -> str:
    """llama.cpp's warning/error lines since ``mark``, for error messages."""
    lines = _ROUTER.lines_since(mark, min_level=_GGML_LOG_WARN)
    return "; ".join(lines[-4:])


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU (CUDA, Metal, Vulkan, ...)."""
    return bool(_llama().llama_supports_gpu_offload())


def system_info() -> str:
    """llama.cpp's one-line description of the CPU features and backends it was built with."""
    return _llama().llama_print_system_info().decode("utf-8", "replace").strip()


def bindings_version() -> str:
    """llama-cpp-python's version plus the build's system info (what decides the saved KV state's format)."""
    _llama()
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}; {system_info()}"


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override``: a tensor-name regex and the buffer type for matches."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _ggml_fn(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """A ggml C function, looked up through libllama (dlsym searches its dependencies, libggml among them)."""
    lib = _llama()
    fn = getattr(lib._lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _cpu_extra_bufts() -> dict[str, int]:
    """The CPU device's extra buffer types, name -> pointer, in llama.cpp's order of preference."""
    vp = ctypes.c_void_p
    dev = _ggml_fn("ggml_backend_dev_by_type", vp, [ctypes.c_int])(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return {}
    reg = _ggml_fn("ggml_backend_dev_backend_reg", vp, [vp])(dev)
    get_proc = _ggml_fn("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p])
    addr = get_proc(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return {}
    arr = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(addr)(dev)
    name_of = _ggml_fn("ggml_backend_buft_name", ctypes.c_char_p, [vp])
    out: dict[str, int] = {}
    i = 0
    while arr and arr[i]:
        out[name_of(arr[i]).decode("utf-8", "replace")] = int(arr[i])
        i += 1
    return out


def _cpu_features() -> dict[str, str]:
    """``ggml_backend_get_features`` of the CPU backend: what the build was compiled with and found."""

    class _Feature(ctypes.Structure):
        _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]

    vp = ctypes.c_void_p
    dev = _ggml_fn("ggml_backend_dev_by_type", vp, [ctypes.c_int])(0)
    if not dev:
        return {}
    reg = _ggml_fn("ggml_backend_dev_backend_reg", vp, [vp])(dev)
    addr = _ggml_fn("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p])(reg, b"ggml_backend_get_features")
    if not addr:
        return {}
    feats = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), vp)(addr)(reg)
    out: dict[str, str] = {}
    i = 0
    while feats and feats[i].name:
        out[feats[i].name.decode()] = (feats[i].value or b"").decode()
        i += 1
    return out


_CPU_BACKEND: tuple[tuple[str, ...], dict[str, str]] | None = None


def cpu_backend() -> tuple[tuple[str, ...], dict[str, str]]:
    """(extra buffer type names, CPU features) as this llama.cpp build reports them on this CPU (cached)."""
    global _CPU_BACKEND
    if _CPU_BACKEND is None:
        try:
            _CPU_BACKEND = (tuple(_cpu_extra_bufts()), _cpu_features())
        except (AttributeError, OSError) as exc:  # a build without the backend registry symbols
            logger.warning("cannot query llama.cpp's CPU backend: %s", exc)
            _CPU_BACKEND = ((), {})
    return _CPU_BACKEND


def ftype_id(name: str) -> int:
    """The ``llama_ftype`` value for a quantization name such as ``"Q4_K_M"`` (see ``QUANT_TYPES``)."""
    key = name.upper()
    if key not in QUANT_TYPES:
        raise RuntimeConfigError(f"unknown quantization type {name!r}", fix=f"use one of: {', '.join(QUANT_TYPES)}")
    const = "LLAMA_FTYPE_ALL_F32" if key == "F32" else "LLAMA_FTYPE_MOSTLY_" + _QUANT_ALIASES.get(key, key)
    return int(getattr(_llama(), const))


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Handle:
    """Base of the handle owners: a context manager whose ``close()`` frees the native object once."""

    _what = "handle"
    _ptr: Any = None

    def _free(self, lib: Any, ptr: Any) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Free the native object.  Safe to call twice."""
        if self._ptr is not None and _LIB is not None:
            self._free(_LIB, self._ptr)
        self._ptr = None

    def handle(self) -> Any:
        """The native pointer; a clear error once closed."""
        if self._ptr is None:
            raise RuntimeConfigError(
                f"the {self._what} has been closed", fix="open a new one; close() frees llama.cpp's memory"
            )
        return self._ptr

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


# --------------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class RopeOverrides:
    """llama_context_params rope fields; the defaults are llama.cpp's C "take it from the GGUF" sentinels.

    ``yarn_attn_factor=-1`` defers to the model (1.0 on llama/qwen2): llama-cpp-python's ``Llama()``
    passes an explicit 1.0, and a value other than 1 multiplies the cos/sin magnitude for
    none/linear/longrope/llama3 models while YaRN discards it (docs/llama_cpp.md pitfalls 3 and 4).  Betas at -1 keep
    a GGUF value on the arches that read one (``Llama()`` would force 32/1).
    """

    rope_scaling_type: int = -1  # -1 from model; 0 none, 1 linear, 2 yarn, 3 longrope
    rope_freq_base: float = 0.0  # 0 from model
    rope_freq_scale: float = 0.0  # 0 from model; this is 1/factor
    yarn_ext_factor: float = -1.0  # <0 from model (1 for yarn, else 0)
    yarn_attn_factor: float = -1.0  # <0 from model
    yarn_beta_fast: float = -1.0  # <0 from model (32)
    yarn_beta_slow: float = -1.0  # <0 from model (1)
    yarn_orig_ctx: int = 0  # 0 from model

    @classmethod
    def from_mapping(cls, values: Mapping[str, float] | None, *, where: str = "rope_overrides") -> RopeOverrides:
        """Build from llama-cpp-python field names; unknown names are an error, not silently dropped."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RuntimeConfigError(
                f"unknown rope override(s): {', '.join(unknown)}", where=where, fix=f"use: {', '.join(sorted(known))}"
            )
        out: dict[str, Any] = {}
        for name, value in values.items():
            kind = int if name in ("rope_scaling_type", "yarn_orig_ctx") else float
            try:
                out[name] = kind(value)
            except (TypeError, ValueError):
                raise RuntimeConfigError(f"rope override {name}={value!r} is not a number", where=where) from None
        if out.get("rope_scaling_type", -1) not in (-1, 0, 1, 2, 3):
            raise RuntimeConfigError(
                f"rope_scaling_type {out['rope_scaling_type']} is not one llama.cpp knows",
                where=where,
                fix="use -1 (from model), 0 none, 1 linear, 2 yarn or 3 longrope",
            )
        return cls(**out)

    def explicit(self) -> dict[str, float]:
        """Only the fields that differ from the sentinels (the runtime overrides actually applied)."""
        default = RopeOverrides()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


@dataclass(frozen=True)
class ContextParams:
    """What a ``NativeContext`` is created with (a checked subset of llama_context_params)."""

    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 4
    type_k: int = 1  # ggml type id (gguf.GGMLQuantizationType): F32 0, F16 1, Q8_0 8, BF16 30, ...
    type_v: int = 1
    flash_attn: FlashAttn = FlashAttn.AUTO
    offload_kqv: bool = True  # False keeps the KV cache and attention on the CPU
    rope: RopeOverrides = RopeOverrides()


# --------------------------------------------------------------------------------------------------------------
# Handle owners


class NativeModel(_Handle):
    """Owns a ``llama_model``: the weights (or only the vocab) of one GGUF.

    ``cpu_only`` passes an empty device list, so no GPU backend is used even on a GPU build.
    Closing the model closes the contexts made from it first.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        vocab_only: bool = False,
        cpu_only: bool = False,
        use_extra_bufts: bool = True,
        buft_overrides: Sequence[tuple[str, str]] = (),
    ) -> None:
        lib = _llama()
        self.path = Path(path)
        self._ptr: Any = None
        self._contexts: weakref.WeakSet[NativeContext] = weakref.WeakSet()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = bool(vocab_only)
        no_devices = (ctypes.c_void_p * 1)(None)  # NULL-terminated, empty: CPU only; kept alive across the call
        if cpu_only:
            params.devices = ctypes.cast(no_devices, ctypes.c_void_p)
            params.n_gpu_layers = 0
        params.use_extra_bufts = bool(use_extra_bufts)
        overrides = _buft_overrides(buft_overrides)  # kept alive across the load
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        mark = _ROUTER.mark()
        ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not ptr:
            raise GGUFError(
                "llama.cpp could not load the model" + _said(mark),
                where=str(self.path),
                fix="check the file with `edgerope inspect`",
            )
        self._ptr = ptr
        self._vocab = lib.llama_model_get_vocab(ptr)
        self.vocab_only = bool(vocab_only)
        self.n_gpu_layers = params.n_gpu_layers

    _what = "model"

    def _free(self, lib: Any, ptr: Any) -> None:
        lib.llama_model_free(ptr)

    def close(self) -> None:
        """Free the model, and first every context made from it.  Safe to call twice."""
        for ctx in list(getattr(self, "_contexts", ())):
            ctx.close()
        super().close()
        self._vocab = None

    def _vocab_handle(self) -> Any:
        self.handle()
        return self._vocab

    # facts
    @property
    def n_vocab(self) -> int:
        return int(_llama().llama_vocab_n_tokens(self._vocab_handle()))

    @property
    def n_ctx_train(self) -> int:
        """As llama.cpp reports it now (a custom-YaRN context rewrites it, docs/llama_cpp.md pitfall 17)."""
        return int(_llama().llama_model_n_ctx_train(self.handle()))

    @property
    def bos(self) -> int | None:
        tok = int(_llama().llama_vocab_bos(self._vocab_handle()))
        return None if tok < 0 else tok

    @property
    def eos(self) -> int | None:
        tok = int(_llama().llama_vocab_eos(self._vocab_handle()))
        return None if tok < 0 else tok

    @property
    def add_bos(self) -> bool:
        return bool(_llama().llama_vocab_get_add_bos(self._vocab_handle()))

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, ...) per the GGUF vocab."""
        return bool(_llama().llama_vocab_is_eog(self._vocab_handle(), int(token)))

    # tokens
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``; ``add_special`` adds BOS/EOS as the GGUF vocab says."""
        lib = _llama()
        vocab = self._vocab_handle()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return np.ctypeslib.as_array(buf, shape=(cap,))[:n].tolist()
            cap = -n
        raise RuntimeConfigError(f"llama.cpp could not tokenize {len(data)} bytes of text")

    def detokenize(self, tokens: Sequence[int] | np.ndarray, *, special: bool = False) -> str:
        """Text for ``tokens`` (bytes that are not valid UTF-8 on their own become U+FFFD)."""
        lib = _llama()
        vocab = self._vocab_handle()
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        ptr = ids.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        cap = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = lib.llama_detokenize(vocab, ptr, len(ids), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n + 1
        raise RuntimeConfigError(f"llama.cpp could not detokenize {len(ids)} tokens")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp sees it (as a string), or None."""
        buf = ctypes.create_string_buffer(512)
        n = _llama().llama_model_meta_val_str(self.handle(), key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _llama().llama_model_meta_val_str(self.handle(), key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", "replace")


class NativeContext(_Handle):
    """Owns a ``llama_context`` (KV cache, compute buffers) for one sequence of one ``NativeModel``.

    It tracks ``n_past``, the number of cached positions: every ``decode``/``logits`` call appends
    at the end; ``clear()`` empties the cache.
    """

    def __init__(self, model: NativeModel, params: ContextParams) -> None:
        lib = _llama()
        self.model = model
        self.params = params
        self._ptr: Any = None
        self.n_past = 0
        self.n_evaluated = 0  # tokens run through llama_decode over the context's life (tests count prefills)
        self._seq_zero = ctypes.c_int32(0)  # every token's (single) sequence id points here
        cp = lib.llama_context_default_params()
        cp.n_ctx = int(params.n_ctx)
        cp.n_batch = int(params.n_batch)
        cp.n_ubatch = int(min(params.n_ubatch, params.n_batch))
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = int(params.n_threads)
        cp.type_k, cp.type_v = int(params.type_k), int(params.type_v)
        cp.flash_attn_type = params.flash_attn.native
        cp.offload_kqv = cp.op_offload = bool(params.offload_kqv)
        cp.embeddings = False
        for name, value in asdict(params.rope).items():
            setattr(cp, name, value)
        mark = _ROUTER.mark()
        ptr = lib.llama_init_from_model(model.handle(), cp)
        said = _ROUTER.lines_since(mark)
        if not ptr:
            raise RuntimeConfigError(
                "llama.cpp refused to create the context" + _said(mark),
                where=str(model.path),
                fix="check n_ctx, cache types and flash attention against the model",
            )
        self._ptr = ptr
        self._memory = lib.llama_get_memory(ptr)
        self.flash_attn = _flash_attn_from_log(said, params.flash_attn)
        self.n_ctx = int(lib.llama_n_ctx(ptr))
        self.n_batch = int(lib.llama_n_batch(ptr))
        self.n_vocab = model.n_vocab
        model._contexts.add(self)

    _what = "context"

    def _free(self, lib: Any, ptr: Any) -> None:
        lib.llama_free(ptr)
        self._memory = None

    def clear(self) -> None:
        """Empty the KV cache (positions restart at 0)."""
        self.handle()
        if self._memory is not None:
            _llama().llama_memory_clear(self._memory, True)
        self.n_past = 0

    def _decode_chunk(self, tokens: np.ndarray, *, output: np.ndarray) -> None:
        """One llama_decode of ``tokens`` (int32, len <= n_batch) at positions n_past..; ``output`` int8 flags."""
        lib = _llama()
        n = len(tokens)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        n_seq_id = np.ones(n, dtype=np.int32)
        seq_id = np.full(n, ctypes.addressof(self._seq_zero), dtype=np.uintp)  # (n,) pointers to one int32 0
        batch = lib.llama_batch(
            n_tokens=n,
            token=tokens.ctypes.data_as(ctypes.POINTER(lib.llama_token)),
            embd=None,
            pos=pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos)),
            n_seq_id=n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=seq_id.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id))),
            logits=output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        mark = _ROUTER.mark()
        rc = lib.llama_decode(self.handle(), batch)
        if rc != 0:
            # rc < 0 leaves processed ubatches in the cache: start over rather than guess its state
            self.clear()
            raise RuntimeConfigError(
                f"llama_decode failed with code {rc}" + _said(mark),
                fix="1 means no room in the KV cache (raise n_ctx); the cache was cleared",
            )
        self.n_past += n
        self.n_evaluated += n

    def _tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if ids.ndim != 1:
            raise RuntimeConfigError(f"tokens must be one sequence (1-D), got shape {ids.shape}")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise RuntimeConfigError(f"token ids must lie in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        if self.n_past + len(ids) > self.n_ctx:
            raise RuntimeConfigError(
                f"{self.n_past} cached + {len(ids)} new tokens exceed the context of {self.n_ctx}",
                fix="open the runtime with a larger n_ctx, or clear the cache",
            )
        return ids

    def decode(self, tokens: Sequence[int] | np.ndarray, *, outputs: Literal["last", "none"] = "last") -> None:
        """Append ``tokens`` in n_batch chunks; with ``"last"`` the final token's logits stay readable by a sampler."""
        self.handle()
        ids = self._tokens(tokens)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            flags = np.zeros(len(chunk), dtype=np.int8)
            if outputs == "last" and start + len(chunk) == len(ids):
                flags[-1] = 1
            self._decode_chunk(chunk, output=flags)

    def shift(self, *, n_keep: int, n_discard: int) -> None:
        """Drop the cached positions [n_keep, n_keep + n_discard) and move the later ones down by n_discard
        (``llama_memory_seq_rm`` + ``llama_memory_seq_add``; llama.cpp re-ropes the moved keys at the next
        decode).  The caller decides whether the rope allows it (docs/llama_cpp.md pitfall 15)."""
        lib = _llama()
        self.handle()
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= self.n_past):
            raise RuntimeConfigError(
                f"cannot discard {n_discard} positions after {n_keep} kept ones from {self.n_past} cached",
                fix="n_keep >= 0, n_discard >= 1, n_keep + n_discard <= the cached positions",
            )
        if not lib.llama_memory_can_shift(self._memory):
            raise RuntimeConfigError("this model's KV memory cannot be shifted", fix="evaluate the kept tokens again")
        if not lib.llama_memory_seq_rm(self._memory, 0, n_keep, n_keep + n_discard):
            self.clear()
            raise RuntimeConfigError("llama.cpp could not remove the positions; the cache was cleared")
        lib.llama_memory_seq_add(self._memory, 0, n_keep + n_discard, -1, -n_discard)
        self.n_past -= n_discard

    def state_bytes(self) -> bytes:
        """llama.cpp's saved state of the sequence (its KV cells, ``llama_state_seq_get_data``)."""
        lib = _llama()
        size = int(lib.llama_state_seq_get_size(self.handle(), 0))
        buf = (ctypes.c_uint8 * size)()
        n = int(lib.llama_state_seq_get_data(self._ptr, buf, size, 0))
        if n != size:
            raise RuntimeConfigError(f"llama.cpp saved {n} of {size} state bytes")
        return bytes(buf)

    def restore_state(self, data: bytes, *, n_past: int) -> None:
        """Replace the cache by ``data`` (from ``state_bytes`` of a context with the same settings) holding
        ``n_past`` positions.  On failure the cache is cleared and ``RuntimeConfigError`` raised."""
        lib = _llama()
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        mark = _ROUTER.mark()
        n = int(lib.llama_state_seq_set_data(self._ptr, buf, len(data), 0))
        if n == 0 or n_past > self.n_ctx:
            self.clear()
            raise RuntimeConfigError(
                "llama.cpp refused the saved sequence state" + _said(mark),
                fix="the state was saved with other context settings; evaluate the tokens again",
            )
        self.n_past = int(n_past)

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append ``tokens`` and return the logits of every one of them, float32, shape (T, n_vocab)."""
        lib = _llama()
        self.handle()
        ids = self._tokens(tokens)
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)  # (T, V)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode_chunk(chunk, output=np.ones(len(chunk), dtype=np.int8))
            ptr = lib.llama_get_logits(self._ptr)
            out[start : start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
        return out


class NativeSampler(_Handle):
    """Owns a llama.cpp sampler chain (``llama_sampler_chain_*``); ``greedy()`` builds argmax sampling."""

    def __init__(self) -> None:
        lib = _llama()
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        self._ptr: Any = lib.llama_sampler_chain_init(params)
        if not self._ptr:
            raise RuntimeConfigError("llama.cpp could not create a sampler chain")

    @classmethod
    def greedy(cls) -> NativeSampler:
        chain = cls()
        _llama().llama_sampler_chain_add(chain.handle(), _llama().llama_sampler_init_greedy())  # chain owns it
        return chain

    @classmethod
    def random(cls, *, temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> NativeSampler:
        """llama.cpp's chain: top-k (0: off), top-p (1: off), temperature, then a draw seeded with ``seed``."""
        lib = _llama()
        chain = cls()
        if top_k > 0:
            lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_top_k(int(top_k)))
        if top_p < 1.0:
            lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_top_p(float(top_p), 1))
        lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_temp(float(temperature)))
        lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_dist(int(seed)))
        return chain

    _what = "sampler"

    def _free(self, lib: Any, ptr: Any) -> None:
        lib.llama_sampler_free(ptr)

    def sample(self, ctx: NativeContext, idx: int = -1) -> int:
        """Pick a token from the logits of output ``idx`` (-1: the last) of ``ctx``'s latest decode."""
        return int(_llama().llama_sampler_sample(self.handle(), ctx.handle(), idx))

    def reset(self) -> None:
        """Forget accepted tokens (stateful samplers in the chain start over)."""
        _llama().llama_sampler_reset(self.handle())


def quantize(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, ftype: int, n_threads: int | None = None
) -> None:
    """Run llama.cpp's quantizer (``llama_model_quantize``, default params) from ``in_path`` to ``out_path``.

    1-D tensors (norms, ``rope_freqs``/``rope_factors_*``) are never quantized by llama.cpp;
    ``edgerope.convert.quantize`` verifies that on the output.
    """
    lib = _llama()
    note_activity("quantizing with llama.cpp", model=str(in_path), settings=f"ftype {ftype} -> {out_path}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(n_threads or 0)  # <= 0: all hardware threads
    mark = _ROUTER.mark()
    rc = lib.llama_model_quantize(os.fsencode(in_path), os.fsencode(out_path), ctypes.byref(params))
    if rc != 0:
        raise GGUFError(
            "llama.cpp could not quantize the model" + _said(mark),
            where=str(in_path),
            fix="see the llama.cpp message; the input was not changed",
        )


def _buft_overrides(pairs: Sequence[tuple[str, str]]) -> Any:
    """A NULL-terminated ``llama_model_tensor_buft_override`` array for (regex, CPU extra buffer type name)."""
    if not pairs:
        return None
    bufts = _cpu_extra_bufts()
    arr = (_BuftOverride * (len(pairs) + 1))()
    for i, (pattern, name) in enumerate(pairs):
        if name not in bufts:
            raise RuntimeConfigError(
                f"this llama.cpp build offers no {name} buffer type on this CPU",
                fix=f"use one of: {', '.join(bufts) or 'none'} (or cpu_repack='off')",
            )
        arr[i].pattern = pattern.encode("utf-8")
        arr[i].buft = bufts[name]
    arr[len(pairs)].pattern = None
    arr[len(pairs)].buft = None
    return arr


def _said(mark: int) -> str:
    lines = native_error_lines(mark)
    return f" (llama.cpp: {lines})" if lines else ""


def _flash_attn_from_log(lines: list[str], requested: FlashAttn) -> bool:
    """Whether flash attention ended up on: llama.cpp resolves AUTO at context creation and only logs it."""
    if requested is FlashAttn.OFF:
        return False
    text = "\n".join(lines)
    if "Flash Attention not supported" in text or "flash_attn is not compatible" in text:
        return False
    if requested is FlashAttn.ON or "Flash Attention enabled" in text or "enabling flash_attn" in text:
        return True
    return False
