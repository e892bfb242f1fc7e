"""The GGUF header parser under ``edgerope.gguf.reader``: ``gguf.GGUFReader`` with every count, length, offset and
shape bounded against the file and llama.cpp's own limits before it is used, so a corrupt or hostile header is a
clean error, never a huge allocation, a recursion or a read past the end.

What it does not do: decode metadata into Python values or give the typed view (``edgerope.gguf.reader``).
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

REFETCH_FIX = "download or copy the file again and compare its size (and checksum, if published) with the source"


class _PastEnd(Exception):
    def __init__(self, offset: int, end: int, size: int, in_tensor_data: bool) -> None:
        super().__init__(offset, end, size)
        self.offset, self.end, self.size, self.in_tensor_data = offset, end, size, in_tensor_data


class _Corrupt(Exception):
    """A header value llama.cpp's own GGUF reader refuses (``ggml/src/gguf.cpp``), found before anything is
    allocated for it; the message says which and why, ``fix`` what to do (default: fetch the file again)."""

    def __init__(self, what: str, fix: str = REFETCH_FIX) -> None:
        super().__init__(what)
        self.fix = fix


# llama.cpp's limits (ggml/src/gguf.cpp): it refuses files beyond them, so nothing here allocates for more
GGUF_MAX_STRING_LENGTH = 1 << 30
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30
GGML_MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a one-byte key, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (an empty name, no dims)


class _BoundedReader(GGUFReader):
    """``GGUFReader`` with every read bounds-checked, every count checked before it is used, no recursion, and
    metadata arrays read in one piece.

    * The stock reader slices its memmap, which silently returns fewer bytes
      past the end and fails later with an unrelated numpy error; here a read
      past the end raises ``_PastEnd`` so a short file is reported as such.
    * Counts come from the file, so each is checked against what the rest of the
      file can hold (key and tensor counts), against llama.cpp's own limits (array
      lengths, string lengths, tensor dimensions, element counts that overflow
      int64) before anything is built from it: a corrupt count is a ``_Corrupt``
      error, never a loop over 2^63 items or a huge allocation.
    * Arrays of arrays are refused where they are found, without descending into
      them: llama.cpp's reader rejects them ("invalid GGUF type"), and the stock
      reader recurses once per level (a 5,000-deep array raised RecursionError).
    * The stock reader builds one numpy view per array element (measured 1.4 s
      for a 32,000-token vocab, far more for 128k tokens plus merges).  Arrays
      of scalars become one typed view and arrays of strings one byte view,
      found by walking the string lengths; ``_field_value`` decodes both on first use.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.shape[0]:
            raise _PastEnd(int(offset), end, int(self.data.shape[0]), hasattr(self, "data_offset"))
        return super()._get(offset, dtype, count, override_order)

    def _get_str(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        n = int(self._get(offset, np.uint64)[0])
        if n > GGUF_MAX_STRING_LENGTH:
            raise _Corrupt(f"a string at offset {offset:,} claims {n:,} bytes (llama.cpp reads at most 1 GiB)")
        return super()._get_str(offset)

    def _remaining(self, offset: int) -> int:
        return max(0, int(self.data.shape[0]) - int(offset))

    def _build_fields(self, offs: int, count: int) -> int:
        count = int(count)
        if count > self._remaining(offs) // MIN_KV_BYTES:  # a cut file or a corrupt count: never loop over it
            raise _PastEnd(offs, offs + count * MIN_KV_BYTES, int(self.data.shape[0]), False)
        for _ in range(count):
            orig_offs = offs
            klen, kdata = self._get_str(offs)
            name = bytes(kdata).decode("utf-8")
            if not name:
                raise _Corrupt(f"an empty metadata key at offset {orig_offs:,}")
            offs += int(klen.nbytes + kdata.nbytes)
            raw_type = self._get(offs, np.uint32)
            offs += int(raw_type.nbytes)
            try:
                size, parts, idxs, types = self._get_field_parts(offs, int(raw_type[0]))
            except _Corrupt as exc:
                raise _Corrupt(f"metadata key {name!r}: {exc}", exc.fix) from None
            base = [klen, kdata, raw_type]
            self._push_field(
                ReaderField(orig_offs, name, base + parts, [i + len(base) for i in idxs], types), skip_sum=True
            )
            offs += size
        return offs

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[Any]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        sub = GGUFValueType(int(item_type[0]))
        start, n = orig_offs + 12, int(length[0])
        if sub == GGUFValueType.ARRAY:
            raise _Corrupt(
                "it is an array of arrays, which llama.cpp's GGUF reader refuses ('invalid GGUF type')",
                fix="the tool that wrote this file wrote a value llama.cpp cannot read: remove that key, or re-convert "
                "the model",
            )
        if n > GGUF_MAX_ARRAY_ELEMENTS:
            raise _Corrupt(f"an array of {n:,} elements (llama.cpp reads at most {GGUF_MAX_ARRAY_ELEMENTS:,})")
        if sub == GGUFValueType.STRING:
            body = self._get(start, np.uint8, _string_array_end(self, start, n) - start)
        elif sub in self.gguf_scalar_to_np:
            body = self._get(start, self.gguf_scalar_to_np[sub], n)
        else:
            raise _Corrupt(f"an array of unknown element type {sub!r}")
        return 12 + int(body.nbytes), [item_type, length, body], [2], [GGUFValueType.ARRAY, sub]

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[ReaderField]]:
        count = int(count)
        if count > self._remaining(offs) // MIN_TENSOR_INFO_BYTES:
            raise _PastEnd(offs, offs + count * MIN_TENSOR_INFO_BYTES, int(self.data.shape[0]), False)
        return super()._build_tensor_info(offs, count)

    def _get_tensor_info_field(self, orig_offs: int) -> ReaderField:
        name_len, name_data = self._get_str(orig_offs)
        n_dims = int(self._get(orig_offs + 8 + int(name_data.nbytes), np.uint32)[0])
        if n_dims > GGML_MAX_DIMS:
            name = bytes(name_data).decode("utf-8", "replace")
            raise _Corrupt(f"tensor {name!r} has {n_dims:,} dimensions (llama.cpp allows at most {GGML_MAX_DIMS})")
        return super()._get_tensor_info_field(orig_offs)

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        size = int(self.data.shape[0])
        for field in fields:
            _check_tensor_shape(field, size)
            offset = int(field.parts[5][0])
            if offset > size:  # start + offset would wrap around in the stock reader's uint64 sum
                raise _Corrupt(f"tensor {field.name!r} has its data at offset {offset:,}, past the end of the file")
            if offset % self.alignment:
                raise _Corrupt(
                    f"tensor {field.name!r} has its data at offset {offset:,}, not a multiple of the alignment "
                    f"{self.alignment} (llama.cpp refuses it)"
                )
        super()._build_tensors(start_offs, fields)


def _check_tensor_shape(field: ReaderField, file_size: int) -> None:
    """Refuse a tensor whose element count overflows int64, whose rows do not fill whole blocks, or whose bytes
    could not fit in the file (llama.cpp's checks in ``gguf_init_from_file_impl``), before anything is sized
    from it."""
    name = field.name
    dims = [int(d) for d in field.parts[3]]
    ggml_type = GGMLQuantizationType(int(field.parts[4][0]))
    n = 1
    for d in dims:
        if d > INT64_MAX or (d and n > INT64_MAX // d):
            raise _Corrupt(f"tensor {name!r} has shape {tuple(dims)}: its element count overflows int64")
        n *= d
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if dims and dims[0] % block:
        raise _Corrupt(
            f"tensor {name!r} ({ggml_type.name}) has rows of {dims[0]} elements, not a multiple of its block size "
            f"{block}"
        )
    n_bytes = n // block * type_size
    if n_bytes > file_size:
        raise _Corrupt(
            f"tensor {name!r} has shape {tuple(dims)} of {ggml_type.name}: {n_bytes:,} bytes, more than the whole "
            f"file ({file_size:,} bytes)"
        )


def _len_format(reader: GGUFReader) -> str:
    swapped = reader.byte_order == "S"
    little = (sys.byteorder == "little") != swapped
    return "<Q" if little else ">Q"


def _string_array_end(reader: GGUFReader, start: int, n: int) -> int:
    """Offset just past ``n`` length-prefixed strings starting at ``start``."""
    buf, size, fmt, off = memoryview(reader.data), int(reader.data.shape[0]), _len_format(reader), start
    for _ in range(n):
        if off + 8 > size:
            raise _PastEnd(off, off + 8, size, False)
        off += 8 + struct.unpack_from(fmt, buf, off)[0]
    if off > size:
        raise _PastEnd(start, off, size, False)
    return off


def _split_strings(body: np.ndarray, n: int, fmt: str) -> list[str]:
    raw, out, off = body.tobytes(), [], 0
    for _ in range(n):
        (ln,) = struct.unpack_from(fmt, raw, off)
        out.append(raw[off + 8 : off + 8 + ln].decode("utf-8", "replace"))
        off += 8 + ln
    return out
