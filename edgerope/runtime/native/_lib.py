"""Loading llama-cpp-python's bindings, routing llama.cpp's log, querying the CPU backend, and the activity
record for the crash guard: what every other part of ``edgerope.runtime.native`` stands on.

``llama_cpp`` is imported on the first call of ``_llama()``, never at import time.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgerope.errors import EdgeropeError, RuntimeConfigError
from edgerope.system.files import atomic_output

LOGGER_NAME = "edgerope.llama_cpp"
logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message).
_GGML_LOG_DEBUG, _GGML_LOG_INFO, _GGML_LOG_WARN, _GGML_LOG_CONT = 1, 2, 3, 5
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}

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


def native_error_lines(mark: int) -> str:
    """llama.cpp's warning/error lines since ``mark``, for error messages."""
    lines = _ROUTER.lines_since(mark, min_level=_GGML_LOG_WARN)
    return "; ".join(lines[-4:])


def _said(mark: int) -> str:
    lines = native_error_lines(mark)
    return f" (llama.cpp: {lines})" if lines else ""


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


# --------------------------------------------------------------------------------------------------------------
# What this build and CPU offer


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


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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


class _Feature(ctypes.Structure):
    """``struct ggml_backend_feature``: a name/value pair of a backend's build and hardware features."""

    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace")


def registry_features(reg: int) -> dict[str, str]:
    """``ggml_backend_get_features`` of one backend registry (NULL-terminated name/value pairs), {} if absent."""
    vp = ctypes.c_void_p
    addr = _ggml_fn("ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p])(reg, b"ggml_backend_get_features")
    if not addr:
        return {}
    feats = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), vp)(addr)(reg)
    out: dict[str, str] = {}
    i = 0
    while feats and feats[i].name:
        out[_text(feats[i].name)] = _text(feats[i].value)
        i += 1
    return out


def _cpu_features() -> dict[str, str]:
    """``ggml_backend_get_features`` of the CPU backend: what the build was compiled with and found."""
    vp = ctypes.c_void_p
    dev = _ggml_fn("ggml_backend_dev_by_type", vp, [ctypes.c_int])(0)
    if not dev:
        return {}
    return registry_features(_ggml_fn("ggml_backend_dev_backend_reg", vp, [vp])(dev))


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


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override``: a tensor-name regex and the buffer type for matches."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


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
