"""What devices this llama.cpp build can run on, as llama.cpp reports them: ggml's backend device registry.

``backend_devices()`` lists every device (``ggml_backend_dev_count`` / ``ggml_backend_dev_get``) with its name
(``CUDA0``, ``Metal``, ``Vulkan0``, ``CPU``), description (``NVIDIA H100 80GB HBM3``), type (cpu, gpu, igpu,
accel), backend registry name (``CUDA``, ``ROCm``, ``Metal``, ``CPU``, ...), free and total memory in bytes
(``ggml_backend_dev_memory``: for CUDA, ``cudaMemGetInfo`` after the device's context exists) and the features
its backend reports (``ggml_backend_get_features`` through the registry; CUDA: ``ARCHS``, ``FA_QUANTS`` -- the
K/V type pairs its flash attention was compiled for --, ``USE_GRAPHS``, ...).  Plain dicts: the decisions made
from them (``edgerope.runtime.gpu_plan``) are pure and tested with injected devices.

The binding has no wrappers for these; they are looked up through libllama, like the CPU queries in ``_lib``.
"""

from __future__ import annotations

import ctypes
from typing import Any

from edgerope.runtime.native._lib import _ggml_fn, _text, logger, registry_features

# enum ggml_backend_dev_type (ggml-backend.h)
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def backend_devices() -> list[dict[str, Any]]:
    """Every device of this llama.cpp build (see the module docstring), in llama.cpp's order; [] when the build
    lacks the registry symbols."""
    vp, size_t = ctypes.c_void_p, ctypes.c_size_t
    try:
        count = _ggml_fn("ggml_backend_dev_count", size_t, [])
        get = _ggml_fn("ggml_backend_dev_get", vp, [size_t])
        name = _ggml_fn("ggml_backend_dev_name", ctypes.c_char_p, [vp])
        description = _ggml_fn("ggml_backend_dev_description", ctypes.c_char_p, [vp])
        dev_type = _ggml_fn("ggml_backend_dev_type", ctypes.c_int, [vp])
        memory = _ggml_fn("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(size_t), ctypes.POINTER(size_t)])
        reg_of = _ggml_fn("ggml_backend_dev_backend_reg", vp, [vp])
        reg_name = _ggml_fn("ggml_backend_reg_name", ctypes.c_char_p, [vp])
    except (AttributeError, OSError) as exc:
        logger.warning("cannot list llama.cpp's devices: %s", exc)
        return []
    out = []
    features: dict[int, dict[str, str]] = {}
    for i in range(int(count())):
        dev = get(i)
        free, total = size_t(0), size_t(0)
        memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = reg_of(dev)
        if reg not in features:
            features[reg] = registry_features(reg) if reg else {}
        out.append(
            {
                "index": i,
                "name": _text(name(dev)),
                "description": _text(description(dev)),
                "type": DEVICE_TYPES.get(int(dev_type(dev)), "unknown"),
                "backend": _text(reg_name(reg)) if reg else "",
                "memory_free": int(free.value),
                "memory_total": int(total.value),
                "features": dict(features[reg]),
            }
        )
    return out
