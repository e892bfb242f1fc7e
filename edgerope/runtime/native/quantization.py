"""llama.cpp's quantizer (``llama_model_quantize``) and the quantization names it accepts."""

from __future__ import annotations

import ctypes
import os

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.runtime.native._lib import _ROUTER, _llama, _said, note_activity

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


def ftype_id(name: str) -> int:
    """The ``llama_ftype`` value for a quantization name such as ``"Q4_K_M"`` (see ``QUANT_TYPES``)."""
    key = name.upper()
    if key not in QUANT_TYPES:
        raise RuntimeConfigError(f"unknown quantization type {name!r}", fix=f"use one of: {', '.join(QUANT_TYPES)}")
    const = "LLAMA_FTYPE_ALL_F32" if key == "F32" else "LLAMA_FTYPE_MOSTLY_" + _QUANT_ALIASES.get(key, key)
    return int(getattr(_llama(), const))


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
