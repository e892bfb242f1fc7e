"""A streaming, validating reader for Hugging Face safetensors checkpoints, without torch.

What it does:

* finds ``model.safetensors`` or a sharded checkpoint
  (``model.safetensors.index.json`` + shards) in a model folder;
* parses each file's header itself (8-byte little-endian length, then JSON)
  and checks it against the file: JSON shape, known dtypes, byte counts that
  match dtype x shape, offsets inside the file (truncation), no overlapping
  tensors, index entries that exist in the shard they name.  Every problem is
  a ``CheckpointError`` naming the file;
* memory-maps the data, so a tensor is read only when it is asked for, and
  hands out raw storage (bfloat16 as ``uint16``) or float32 values;
* ``check_input_files`` refuses, by type and before anything is opened, a FIFO,
  device or socket where the converter reads a file (weights, index, config,
  tokenizer): opening a FIFO blocks until a writer comes, a device reads forever.

What it does not do: write safetensors, or read pickled ``.bin`` checkpoints.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerope.errors import CheckpointError
from edgerope.system.files import special_file_kind

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> numpy storage dtype (bf16 has no numpy dtype: it is stored and handed out as uint16)
STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: where its bytes are and what they hold."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: the 16 bits become the high half), same shape."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Decode a raw storage array of safetensors ``dtype`` to float32."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor of dtype {dtype} is not a floating-point weight")
    return raw.astype(np.float32)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns (entries by name, ``__metadata__``)."""
    where = str(path)
    text, n, size = _read_header_text(path)
    header = _parse_header(text, where=where)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError("corrupt safetensors header ('__metadata__' is not an object)", where=where)
    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    problems: list[str] = []
    for name, info in header.items():
        entry = _entry(name, info, path, data_start=data_start, file_size=size)
        if isinstance(entry, str):
            problems.append(entry)
        else:
            entries[name] = entry
    problems += _overlaps(entries)
    if problems:
        raise CheckpointError(
            "corrupt or truncated safetensors file:\n    - "
            + "\n    - ".join(problems[:20])
            + (f"\n    - ... and {len(problems) - 20} more" if len(problems) > 20 else ""),
            where=where,
            fix="re-download or re-save the checkpoint",
        )
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _read_header_text(path: Path) -> tuple[bytes, int, int]:
    """The header's JSON bytes, its length (the 8-byte little-endian prefix) and the file size."""
    where = str(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("file is too short to be safetensors (no header length)", where=where)
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"corrupt or truncated safetensors header: header length {n}, file size {size} bytes",
                    where=where,
                    fix="re-download or re-save the checkpoint",
                )
            text = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file: {exc.strerror or exc}", where=where) from None
    return text, n, size


def _parse_header(text: bytes, *, where: str) -> dict[str, Any]:
    """The header as a JSON object."""
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"corrupt safetensors header (not JSON: {exc})", where=where, fix="re-save the checkpoint"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not a JSON object)", where=where)
    return header


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, info: object, path: Path, *, data_start: int, file_size: int) -> TensorEntry | str:
    """The header entry ``name`` checked against the file: a ``TensorEntry``, or the problem in words."""
    if not isinstance(info, dict):
        return f"{name}: entry is not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in STORAGE_DTYPES:
        return f"{name}: unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        return f"{name}: bad shape {shape!r}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"{name}: bad data_offsets {offsets!r}"
    begin, end = offsets
    want = math.prod(shape) * STORAGE_DTYPES[dtype].itemsize
    if end - begin != want:
        return f"{name}: {end - begin} bytes stored, {dtype} x {shape} needs {want}"
    if end > file_size - data_start:
        return f"{name}: data ends at byte {data_start + end}, beyond the file's {file_size} bytes (truncated file)"
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _overlaps(entries: dict[str, TensorEntry]) -> list[str]:
    """Pairs of non-empty tensors whose byte ranges overlap, in words."""
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.nbytes)
    return [
        f"{a} and {b} overlap in the file"
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False)
        if start_b < end_a
    ]


INPUT_SUFFIXES = (".safetensors", ".json", ".model", ".txt")  # what the converter reads from a model folder


def check_input_files(model_dir: str | Path, names: list[str] | None = None) -> None:
    """Refuse (``CheckpointError``) a FIFO, device or socket among the files the converter reads from
    ``model_dir`` (``names``, default: every ``*.safetensors``, ``*.json``, ``*.model`` and ``*.txt`` entry),
    decided by ``stat``, before any of them is opened."""
    folder = Path(model_dir)
    if names is None:
        try:
            names = sorted(e.name for e in folder.iterdir() if e.name.endswith(INPUT_SUFFIXES))
        except OSError:
            return  # a missing or unreadable folder is reported by whoever reads it
    for name in names:
        kind = special_file_kind(folder / name)
        if kind:
            raise CheckpointError(
                f"{name} is {kind}, not a regular file: the converter would block or read forever",
                where=str(folder / name),
                fix="replace it with the real file (a symlink to a regular file is fine)",
            )


def checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a model folder and, when sharded, the index's name -> file map."""
    check_input_files(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"the shard index is not valid JSON: {exc}", where=str(index)) from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise CheckpointError("the shard index has no 'weight_map' of tensor name -> file", where=str(index))
        names = sorted(set(weight_map.values()))
        check_input_files(model_dir, [n for n in names if Path(n).name == n])
        missing = [n for n in names if not (model_dir / n).is_file() or Path(n).name != n]
        if missing:
            raise CheckpointError(
                f"the shard index names file(s) that are missing: {', '.join(missing)}",
                where=str(index),
                fix="download every shard listed in model.safetensors.index.json",
            )
        return [model_dir / n for n in names], weight_map
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single], None
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if len(others) == 1:
        return [model_dir / others[0]], None
    has_bin = any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))
    raise CheckpointError(
        "no safetensors checkpoint found" + (f" (several .safetensors files but no {INDEX_FILE})" if others else ""),
        where=str(model_dir),
        fix="save the model with safetensors (save_pretrained(..., safe_serialization=True))"
        if has_bin
        else f"point at a folder holding {SINGLE_FILE} or {INDEX_FILE} and its shards",
    )


class SafetensorsCheckpoint:
    """All tensors of a (possibly sharded) safetensors checkpoint, memory-mapped and validated up front."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.files, weight_map = checkpoint_files(self.model_dir)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            entries, meta = read_header(path)
            self.metadata.update(meta)
            for name, entry in entries.items():
                if name in self.entries:
                    raise CheckpointError(
                        f"tensor {name} is stored twice ({self.entries[name].file.name} and {path.name})",
                        where=str(self.model_dir),
                    )
                self.entries[name] = entry
        if weight_map is not None:
            wrong = [
                f"{name} (index says {fname})"
                for name, fname in weight_map.items()
                if name not in self.entries or self.entries[name].file.name != fname
            ]
            if wrong:
                raise CheckpointError(
                    f"the shard index lists tensors its shards do not hold: {', '.join(sorted(wrong)[:10])}",
                    where=str(self.model_dir / INDEX_FILE),
                    fix="re-download the checkpoint; the index and the shards do not belong together",
                )
        self._maps: dict[Path, np.memmap] = {}

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory maps (arrays handed out keep their own reference until freed)."""
        self._maps.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _map(self, path: Path) -> np.memmap:
        if path not in self._maps:
            try:
                self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot memory-map checkpoint file: {exc}", where=str(path)) from None
        return self._maps[path]

    def raw(self, name: str) -> np.ndarray:
        """The stored values of ``name`` without decoding, shape as stored (bf16 as uint16), read-only."""
        e = self.entries[name]
        storage = STORAGE_DTYPES[e.dtype]
        buf = self._map(e.file)[e.start : e.end]
        return buf.view(storage).reshape(e.shape)

    def float32(self, name: str) -> np.ndarray:
        """``name`` decoded to float32 (a new array)."""
        return to_float32(self.raw(name), self.entries[name].dtype)

    def tensors(self) -> Iterator[tuple[TensorEntry, np.ndarray]]:
        """Every tensor as (entry, raw storage array), one at a time, in file order."""
        for entry in sorted(self.entries.values(), key=lambda e: (str(e.file), e.start)):
            yield entry, self.raw(entry.name)
