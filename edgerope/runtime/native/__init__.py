"""Handle owners over llama.cpp's C API (llama-cpp-python's ctypes bindings): the only package importing llama_cpp.

Three layers, as in llama-cpp-python: the raw bindings (``llama_cpp.llama_cpp``),
the handle owners here (``NativeModel``, ``NativeContext``, ``NativeSampler``:
context managers with an idempotent ``close()``), and the checked, high-level
``edgerope.runtime.runtime.Runtime`` on top.

What this package does:

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

Modules: ``_lib`` (loading the bindings, the log router, CPU backend queries, the activity record for the
crash guard), ``devices`` (``backend_devices``: llama.cpp's device list with memory and backend features),
``params`` (``FlashAttn``, ``RopeOverrides``, ``ContextParams``), ``handles`` (``NativeModel``,
``NativeContext``, ``NativeSampler``), ``adapter`` (``NativeLoraAdapter``, ``set_lora_adapters``) and ``quantization``
(``quantize``, ``QUANT_TYPES``).  Import the
public names from this package.
"""

from __future__ import annotations

from edgerope.runtime.native._lib import (
    CRASH_RECORD_ENV,
    LOGGER_NAME,
    _llama,  # noqa: F401 -- loads the bindings ahead of a measurement (bench/bench_plan.py)
    bindings_version,
    cpu_backend,
    default_threads,
    logger,
    native_error_lines,
    note_activity,
    supports_gpu_offload,
    system_info,
)
from edgerope.runtime.native.adapter import NativeLoraAdapter, set_lora_adapters
from edgerope.runtime.native.devices import backend_devices
from edgerope.runtime.native.handles import NativeContext, NativeModel, NativeSampler
from edgerope.runtime.native.params import ContextParams, FlashAttn, RopeOverrides
from edgerope.runtime.native.quantization import QUANT_NEEDS_IMATRIX, QUANT_TYPES, ftype_id, quantize

__all__ = [
    "CRASH_RECORD_ENV",
    "LOGGER_NAME",
    "QUANT_NEEDS_IMATRIX",
    "QUANT_TYPES",
    "ContextParams",
    "FlashAttn",
    "NativeContext",
    "NativeLoraAdapter",
    "NativeModel",
    "NativeSampler",
    "RopeOverrides",
    "backend_devices",
    "bindings_version",
    "cpu_backend",
    "default_threads",
    "ftype_id",
    "logger",
    "native_error_lines",
    "note_activity",
    "quantize",
    "set_lora_adapters",
    "supports_gpu_offload",
    "system_info",
]
