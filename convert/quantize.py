"""Quantize a GGUF with llama.cpp's own quantizer, then prove the rope metadata survived.

What it does: checks the input (a runnable GGUF, F32 rope frequency-factor
tensors), runs ``llama_model_quantize`` (through ``edgerope.runtime.native``) into a
temp file beside the output, re-reads input and output and verifies that every
metadata key except ``general.file_type``/``general.quantization_version`` is
byte-identical (the rope keys included), that tensor names and shapes are
identical, and that ``rope_freqs``/``rope_factors_*`` are still F32 and
byte-identical; only then renames the temp file into place.

What it does not do: importance-matrix quantization (so no IQ1/IQ2/IQ3_XXS
types), per-tensor type overrides, or requantizing an already quantized file.
K-quants need rows divisible by 256: llama.cpp demotes tensors that are not
(Q4_K -> Q5_0, Q6_K -> Q8_0, ...), and the report lists them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.gguf.checks import check_runnable
from edgerope.gguf.reader import GGUFFile, open_gguf
from edgerope.rope.ggml import ROPE_TENSORS
from edgerope.runtime import native
from edgerope.system.files import check_output, partial_path

QUANT_TYPES = native.QUANT_TYPES
# keys llama.cpp's quantizer rewrites; everything else must come through byte for byte
REWRITTEN_KEYS = frozenset({Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION})


def main_type(qtype: str) -> GGMLQuantizationType:
    """The ggml type most 2-D tensors get for a quantization name (Q4_K_M -> Q4_K, IQ3_M -> IQ3_S)."""
    name = qtype.upper()
    if name in ("IQ3_S", "IQ3_M"):
        return GGMLQuantizationType.IQ3_S
    for suffix in ("_S", "_M", "_L"):
        if name.endswith(suffix) and "_K" in name:
            name = name[: -len(suffix)]
    return GGMLQuantizationType[name]


@dataclass(frozen=True)
class QuantizeReport:
    """A verified quantization: sizes, the resulting tensor types, and tensors llama.cpp had to demote."""

    path: Path
    source: Path
    qtype: str
    bytes_in: int
    bytes_out: int
    seconds: float
    tensor_types: dict[str, int]  # ggml type name -> number of tensors in the output
    demoted: dict[str, str] = field(default_factory=dict)  # tensor -> type, for rows the main type cannot hold
    rope_tensors: tuple[str, ...] = ()  # verified F32 and byte-identical
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["source"] = str(self.path), str(self.source)
        return d


def _check_qtype(qtype: str) -> str:
    name = qtype.upper()
    if name in native.QUANT_TYPES:
        return name
    if name in native.QUANT_NEEDS_IMATRIX:
        raise RuntimeConfigError(
            f"quantization type {qtype!r} needs an importance matrix, which edgerope does not compute",
            fix="use llama.cpp's llama-imatrix and llama-quantize, or a type such as Q4_K_M or IQ4_XS",
        )
    raise RuntimeConfigError(f"unknown quantization type {qtype!r}", fix=f"use one of: {', '.join(QUANT_TYPES)}")


def verify_quantized(src: GGUFFile, out: GGUFFile) -> tuple[str, ...]:
    """Raise ``GGUFError`` unless ``out`` keeps ``src``'s metadata, tensor names/shapes and F32 rope tensors.

    Returns the rope frequency-factor tensors verified.
    """
    _check_metadata_kept(src, out)
    _check_shapes_kept(src, out)
    return _check_rope_tensors_kept(src, out)


def _check_metadata_kept(src: GGUFFile, out: GGUFFile) -> None:
    """Every key but ``REWRITTEN_KEYS`` present in both and byte-identical."""
    where = str(out.path)
    keys_in = set(src.metadata) - REWRITTEN_KEYS
    keys_out = set(out.metadata) - REWRITTEN_KEYS
    if keys_in != keys_out:
        raise GGUFError(
            "the quantizer changed the metadata keys: "
            f"lost {sorted(keys_in - keys_out)}, added {sorted(keys_out - keys_in)}",
            where=where,
        )
    changed = sorted(k for k in keys_in if src.raw_value(k) != out.raw_value(k))
    if changed:
        raise GGUFError(f"the quantizer changed metadata values: {', '.join(changed[:10])}", where=where)


def _check_shapes_kept(src: GGUFFile, out: GGUFFile) -> None:
    """The same tensor names with the same shapes."""
    shapes_in = {t.name: t.shape for t in src.tensors}
    shapes_out = {t.name: t.shape for t in out.tensors}
    if shapes_in != shapes_out:
        diff = sorted(set(shapes_in.items()) ^ set(shapes_out.items()))
        raise GGUFError(f"the quantizer changed tensor names or shapes: {diff[:6]}", where=str(out.path))


def _check_rope_tensors_kept(src: GGUFFile, out: GGUFFile) -> tuple[str, ...]:
    """The frequency-factor tensors still F32 (llama.cpp needs them so) and byte-identical; their names."""
    where = str(out.path)
    rope = []
    for name in ROPE_TENSORS:
        t = out.tensor(name)
        if t is None:
            continue
        if t.ggml_type != GGMLQuantizationType.F32:
            raise GGUFError(f"{name} came out as {t.ggml_type.name}; llama.cpp needs it F32", where=where)
        if not (src.tensor_bytes(name) == out.tensor_bytes(name)).all():
            raise GGUFError(f"the quantizer changed the values of {name}", where=where)
        rope.append(name)
    return tuple(rope)


def quantize(
    in_path: str | Path,
    out_path: str | Path,
    *,
    qtype: str = "Q4_K_M",
    force: bool = False,
    n_threads: int | None = None,
) -> QuantizeReport:
    """Quantize the GGUF ``in_path`` to ``out_path`` as ``qtype`` (a llama-quantize name such as Q4_K_M).

    The input is never modified; on any error no output file is left behind.
    """
    t0 = time.perf_counter()
    src_path, out = Path(in_path), Path(out_path)
    name = _check_qtype(qtype)
    bytes_in = _check_source(src_path)
    check_output(
        out,
        force=force,
        inputs=[src_path],
        need_bytes=bytes_in * (2 if name == "F32" else 1),
        input_fix="write to another file",
    )
    tmp = partial_path(out)
    try:
        native.quantize(src_path, tmp, ftype=native.ftype_id(name), n_threads=n_threads)
        if not tmp.is_file():
            raise GGUFError("llama.cpp reported success but wrote no file", where=str(tmp))
        with open_gguf(src_path) as src, open_gguf(tmp) as res:
            rope = verify_quantized(src, res)
            counts = Counter(t.ggml_type.name for t in res.tensors)
            demoted = _demoted(res, name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return QuantizeReport(
        path=out,
        source=src_path,
        qtype=name,
        bytes_in=bytes_in,
        bytes_out=out.stat().st_size,
        seconds=time.perf_counter() - t0,
        tensor_types=dict(sorted(counts.items())),
        demoted=demoted,
        rope_tensors=rope,
        notes=_notes(demoted, name),
    )


def _check_source(src_path: Path) -> int:
    """Refuse an input llama.cpp cannot run or that is already quantized; return its size in bytes."""
    with open_gguf(src_path) as src:
        check_runnable(src)
        if any(
            t.ggml_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
            for t in src.tensors
        ):
            kinds = sorted({t.ggml_type.name for t in src.tensors})
            raise GGUFError(
                f"the input is already quantized ({', '.join(kinds)}); requantizing loses quality",
                where=str(src_path),
                fix="quantize from the f32/f16/bf16 GGUF that edgerope convert wrote",
            )
        return src.file_size


def _block_size(qtype: str) -> int:
    """Elements per block of the main type of ``qtype`` (a row length must be a multiple of it)."""
    return GGML_QUANT_SIZES[main_type(qtype)][0]


def _demoted(res: GGUFFile, qtype: str) -> dict[str, str]:
    """Tensor -> type for the 2-D tensors llama.cpp stored in another type because their rows do not fit blocks."""
    block = _block_size(qtype)
    return {
        t.name: t.ggml_type.name
        for t in res.tensors
        if len(t.shape) >= 2 and t.shape[0] % block and t.ggml_type != main_type(qtype)
    }


def _notes(demoted: dict[str, str], qtype: str) -> tuple[str, ...]:
    if not demoted:
        return ()
    return (
        f"{len(demoted)} tensor(s) have rows of a length not divisible by {_block_size(qtype)} "
        f"({main_type(qtype).name} blocks); llama.cpp stored them in another type",
    )


def convert_quantized(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    qtype: str,
    force: bool = False,
    n_threads: int | None = None,
    **convert_options: Any,
) -> tuple[Any, QuantizeReport]:
    """Convert an HF checkpoint and quantize it with llama.cpp in one step (``convert --outtype Q4_K_M``).

    The intermediate f16 GGUF is written beside the output under a hidden name and removed afterwards,
    whatever happens.  Returns (ConvertReport of the intermediate, QuantizeReport of the output).
    """
    from edgerope.convert.export import convert

    name = _check_qtype(qtype)
    out = Path(out_path)
    hf_files = [p for p in Path(hf_dir).iterdir() if p.is_file()] if Path(hf_dir).is_dir() else []
    check_output(out, force=force, inputs=hf_files, input_fix="write the GGUF elsewhere")  # before converting
    tmp = partial_path(out, "f16")
    try:
        conv = convert(hf_dir, tmp, outtype="f16", force=True, **convert_options)
        report = quantize(tmp, out, qtype=name, force=force, n_threads=n_threads)
    finally:
        tmp.unlink(missing_ok=True)
    return conv, report
