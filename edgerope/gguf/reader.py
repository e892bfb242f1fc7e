"""Safe GGUF reading: a typed, validated view of any GGUF file, on top of ``gguf.GGUFReader``.

What it does:

* ``open_gguf(path)`` checks the file before and while ``gguf.GGUFReader``
  parses it and turns every failure into a ``GGUFError`` that says what is
  wrong, where, and what to do: missing file, not a GGUF at all (and what it
  looks like instead: safetensors, an HTML page, a Git LFS pointer, a legacy
  GGML file, ...), an unsupported GGUF version, a header or tensor data cut
  short (an interrupted download), or a header the reader cannot parse;
* ``GGUFFile`` exposes the architecture, every metadata key as a python value
  with its ``GGUFValueType``, the tensor infos (name, shape, ggml type, byte
  size, absolute data offset), raw bytes of a key or a tensor, and the
  frequency-factor tensors (``rope_freqs`` / ``rope_factors_long`` /
  ``rope_factors_short``) as float arrays whatever their stored type.

What it does not do: parse the binary format itself (``gguf.GGUFReader``
does), derive the model's hyperparameters (``edgerope.gguf.hparams``),
interpret rope keys (``edgerope.rope.ggml``), lint (``edgerope.gguf.inspect``)
or write files (``edgerope.gguf.set_rope``, ``edgerope.convert.export``).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUF_MAGIC, GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, Keys
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS, ReaderField
from gguf.quants import dequantize

from edgerope.errors import GGUFError
from edgerope.gguf.header_parser import (
    REFETCH_FIX,
    _BoundedReader,
    _Corrupt,
    _len_format,
    _PastEnd,
    _split_strings,
)
from edgerope.rope.ggml import ROPE_TENSORS, key
from edgerope.system.files import special_file_kind

GGUF_MAGIC_BYTES = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
HEADER_MIN_BYTES = 24  # magic, version, tensor count, kv count
MAX_FREQ_FACTORS = 1 << 19  # one per rotary pair; rotary dimensions are bounded by edgerope.gguf.hparams.MAX_DIM


class MetaValue:
    """One metadata value: the python value, its GGUF type, and the element type for arrays.

    String arrays (token lists, merges) are decoded on first access of ``value``.
    """

    __slots__ = ("type", "sub_type", "length", "_value", "_load")

    def __init__(
        self,
        value: Any,
        type: GGUFValueType,
        sub_type: GGUFValueType | None = None,
        *,
        length: int | None = None,
        load: Any = None,
    ) -> None:
        self.type, self.sub_type, self._value, self._load = type, sub_type, value, load
        self.length = length if length is not None else (len(value) if isinstance(value, list) else None)

    @property
    def value(self) -> Any:
        if self._load is not None:
            self._value, self._load = self._load(), None
        return self._value

    @property
    def type_name(self) -> str:
        if self.type == GGUFValueType.ARRAY:
            return f"array[{self.sub_type.name.lower() if self.sub_type is not None else '?'}]"
        return self.type.name.lower()

    def __repr__(self) -> str:
        return f"MetaValue({self.type_name}, {self.value!r})"


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the file describes it. ``shape`` is in GGUF order (ne0, the contiguous axis, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute byte offset in the file


# --------------------------------------------------------------------------- sniffing


def _legacy_ggml_magics() -> dict[bytes, str]:
    # pre-GGUF llama.cpp files start with a little-endian uint32 spelling these tags
    return {struct.pack("<I", int.from_bytes(tag.encode(), "big")): tag for tag in ("ggml", "ggmf", "ggjt", "ggla")}


def describe_foreign(head: bytes) -> str:
    """What a non-GGUF file looks like, from its first bytes (used in 'not a GGUF' errors)."""
    if not head:
        return "an empty file"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file (only the pointer was downloaded, not the model)"
    if len(head) >= 10 and head[8:10] in (b'{"', b"{}") and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "a safetensors file (a Hugging Face checkpoint)"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:2048]:
        return "an HTML page (often an error or login page saved in place of the model)"
    if text.startswith((b"{", b"[")):
        return "a JSON file"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (PyTorch .bin/.pt checkpoints are ZIP archives)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (an old PyTorch checkpoint)"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    legacy = _legacy_ggml_magics().get(head[:4])
    if legacy:
        return f"a legacy GGML file (magic {legacy!r}, the llama.cpp format before GGUF, 2023)"
    return f"unrecognised data (first bytes: {head[:8].hex(' ')})"


def _not_gguf_fix(kind: str) -> str:
    if kind.startswith("a safetensors") or kind.startswith("a ZIP") or kind.startswith("a Python pickle"):
        return "convert the Hugging Face checkpoint with 'edgerope convert' first"
    if kind.startswith("a Git LFS"):
        return "fetch the real file (git lfs pull, or download it directly)"
    if kind.startswith("a legacy GGML"):
        return "re-convert the model from its original checkpoint; llama.cpp no longer reads GGML files"
    return REFETCH_FIX


def _field_value(field: ReaderField, fmt: str) -> MetaValue:
    vtype = GGUFValueType(int(field.types[0]))
    if vtype == GGUFValueType.STRING:
        return MetaValue(bytes(field.parts[-1]).decode("utf-8", "replace"), vtype)
    if vtype != GGUFValueType.ARRAY:
        return MetaValue(field.parts[-1].tolist()[0], vtype)
    # key-value parts: key length, key, value type, element type, length, then the items (see _BoundedReader,
    # which refuses arrays of arrays); both kinds are decoded on first use, so an unused long array costs nothing
    sub = GGUFValueType(int(field.parts[3][0]))
    body, n = field.parts[5], int(field.parts[4][0])
    if sub == GGUFValueType.STRING:
        return MetaValue(None, vtype, sub, length=n, load=lambda: _split_strings(body, n, fmt))
    return MetaValue(None, vtype, sub, length=n, load=body.tolist)


class GGUFFile:
    """A parsed GGUF file (metadata decoded eagerly, tensor data memory-mapped). Use ``open_gguf``."""

    def __init__(self, path: Path, reader: GGUFReader) -> None:
        self.path = path
        self._reader = reader
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.file_size = int(reader.data.shape[0])
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.endian = reader.endianess
        self._fields = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        fmt = _len_format(reader)
        self.metadata: dict[str, MetaValue] = {name: _field_value(f, fmt) for name, f in self._fields.items()}
        self.tensors: list[TensorInfo] = [
            TensorInfo(
                name=t.name,
                shape=tuple(int(d) for d in t.shape),
                ggml_type=GGMLQuantizationType(int(t.tensor_type)),
                n_elements=int(t.n_elements),
                n_bytes=int(t.n_bytes),
                data_offset=int(t.data_offset),
            )
            for t in reader.tensors
        ]
        self._tensor_index = {t.name: i for i, t in enumerate(self.tensors)}

    # ----------------------------------------------------------- metadata

    @property
    def architecture(self) -> str:
        arch = self.get(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str) or not arch:
            raise GGUFError(
                "the file has no general.architecture key",
                where=str(self.path),
                fix="this is not a model llama.cpp can load; re-convert it",
            )
        return arch

    @property
    def big_endian(self) -> bool:
        return self.endian == GGUFEndian.BIG

    def get(self, name: str, default: Any = None) -> Any:
        """The python value of metadata key ``name`` (``default`` when absent)."""
        mv = self.metadata.get(name)
        return default if mv is None else mv.value

    def arch_get(self, template: str, default: Any = None) -> Any:
        """The value of an ``{arch}.``-templated ``gguf.Keys`` key for this file's architecture."""
        return self.get(key(template, self.architecture), default)

    def kv(self) -> dict[str, Any]:
        """All metadata as key -> python value."""
        return {k: v.value for k, v in self.metadata.items()}

    def arch_kv(self) -> dict[str, Any]:
        """The ``{arch}.*`` keys as key -> python value (the form ``LlamaCppRope.from_gguf`` takes)."""
        prefix = self.architecture + "."
        return {k: v.value for k, v in self.metadata.items() if k.startswith(prefix)}

    def raw_value(self, name: str) -> bytes:
        """The exact bytes of key ``name``'s value as stored (type id + payload, in the file's byte order)."""
        field = self._fields[name]
        start = field.offset + int(field.parts[0].nbytes) + int(field.parts[1].nbytes)
        end = field.offset + sum(int(p.nbytes) for p in field.parts)
        return self._reader.data[start:end].tobytes()

    # ----------------------------------------------------------- tensors

    def tensor(self, name: str) -> TensorInfo | None:
        i = self._tensor_index.get(name)
        return None if i is None else self.tensors[i]

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` as a read-only uint8 view, shape (n_bytes,)."""
        t = self.tensors[self._tensor_index[name]]
        return self._reader.data[t.data_offset : t.data_offset + t.n_bytes]

    def tensor_values(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float64 (dequantized if needed), flattened, shape (n_elements,)."""
        rt = self._reader.tensors[self._tensor_index[name]]
        data = rt.data
        if data.dtype == np.uint8:  # quantized and bf16 tensors come as raw bytes
            data = dequantize(data, GGMLQuantizationType(int(rt.tensor_type)))
        return np.asarray(data, dtype=np.float64).ravel()

    def freq_factors(self) -> dict[str, np.ndarray]:
        """The frequency-factor tensors present (``rope_freqs.weight`` etc.) as float64 arrays.

        Refuses (``GGUFError``) one longer than any rotary dimension could use (``MAX_FREQ_FACTORS``) before
        decoding it: a corrupt shape must not turn into gigabytes of float64.
        """
        out = {}
        for name in ROPE_TENSORS:
            t = self.tensor(name)
            if t is None:
                continue
            if t.n_elements > MAX_FREQ_FACTORS:
                raise GGUFError(
                    f"frequency-factor tensor {name} has {t.n_elements:,} values; a rotary dimension needs at most "
                    f"{MAX_FREQ_FACTORS:,} (one per pair)",
                    where=str(self.path),
                    fix="the file is corrupt or not a model; re-convert it",
                )
            out[name] = self.tensor_values(name)
        return out

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    # ----------------------------------------------------------- lifetime

    def close(self) -> None:
        """Drop the memory map (views handed out keep it alive until they are gone)."""
        self._reader = None  # type: ignore[assignment]

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; raise ``GGUFError`` (what/where/fix) for anything unreadable."""
    p = Path(path)
    where = str(p)
    if not p.exists():
        raise GGUFError(f"no such file: {p}", where=where, fix="check the path")
    if p.is_dir():
        raise GGUFError(f"{p} is a folder, not a GGUF file", where=where, fix="give the path of the .gguf file")
    special = special_file_kind(p)
    if special:  # opening a FIFO blocks until a writer comes; a device reads forever
        raise GGUFError(f"{p} is {special}, not a regular file", where=where, fix="give the path of a .gguf file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise GGUFError(
            f"cannot read {p}: {exc.strerror or exc}", where=where, fix="check the file's permissions"
        ) from None
    if not head.startswith(GGUF_MAGIC_BYTES):
        if len(head) < 4 and GGUF_MAGIC_BYTES.startswith(head) and head:
            raise GGUFError(
                f"the file is only {size} bytes, cut off inside the GGUF header", where=where, fix=REFETCH_FIX
            )
        kind = describe_foreign(head)
        raise GGUFError(f"not a GGUF file: it looks like {kind}", where=where, fix=_not_gguf_fix(kind))
    if size < HEADER_MIN_BYTES:
        raise GGUFError(
            f"the file is only {size} bytes, cut off inside the GGUF header (needs at least {HEADER_MIN_BYTES})",
            where=where,
            fix=REFETCH_FIX,
        )
    version = struct.unpack("<I", head[4:8])[0]
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        version = struct.unpack(">I", head[4:8])[0]
    if version not in READER_SUPPORTED_VERSIONS:
        if version < min(READER_SUPPORTED_VERSIONS):
            what = f"GGUF version {version} is an early draft of the format that llama.cpp no longer reads"
            fix = "re-convert the model from its original checkpoint"
        else:
            what = f"GGUF version {version} is newer than this reader supports ({READER_SUPPORTED_VERSIONS})"
            fix = "upgrade the gguf package together with edgerope"
        raise GGUFError(what, where=where, fix=fix)
    try:
        reader = _BoundedReader(p, "r")
    except _Corrupt as exc:
        raise GGUFError(f"the GGUF header is corrupt: {exc}", where=where, fix=exc.fix) from None
    except _PastEnd as exc:
        missing = exc.end - exc.size
        if exc.in_tensor_data:
            what = (
                f"the file is truncated: tensor data runs to byte {exc.end:,} but the file ends at {exc.size:,} "
                f"({missing:,} bytes missing)"
            )
        else:
            what = (
                f"the GGUF header is cut short or corrupt: it needs bytes up to {exc.end:,} "
                f"(reading at offset {exc.offset:,}) but the file is {exc.size:,} bytes"
            )
        raise GGUFError(what, where=where, fix=REFETCH_FIX) from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError, TypeError) as exc:
        detail = str(exc).strip("'\"") or type(exc).__name__
        if "GGMLQuantizationType" in detail:
            what = f"the file uses a tensor type this gguf package does not know ({detail})"
            fix = "upgrade the gguf package (a newer quantization type), or re-download if the file is corrupt"
        else:
            what = f"the GGUF header is corrupt: {detail}"
            fix = REFETCH_FIX
        raise GGUFError(what, where=where, fix=fix) from None
    except OSError as exc:
        raise GGUFError(f"cannot read {p}: {exc}", where=where, fix="check the file's permissions") from None
    return GGUFFile(p, reader)


@contextlib.contextmanager
def using_gguf(src: str | os.PathLike[str] | GGUFFile) -> Iterator[GGUFFile]:
    """The parsed file for ``src``: the ``GGUFFile`` itself (left open for its owner), or ``src`` opened and
    closed around the block.  Lets a command parse a GGUF header once and pass the view down."""
    if isinstance(src, GGUFFile):
        yield src
        return
    with open_gguf(src) as f:
        yield f
