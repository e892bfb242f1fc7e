"""Check a saved llama.cpp sequence state against what it claims to hold, before restoring it.

``llama_state_seq_get_data`` writes a magic (u32 ``0xaf143cd8``) and the sequence id (i32)
(``llama_context::state_seq_get_data``), then the KV cells of the sequence (``llama_kv_cache::state_write`` in
``src/llama-kv-cache.cpp`` of the vendored llama.cpp): the stream count (u32), then per stream the cell count
(u32), per cell its position (i32), seq-id count (u32) and seq ids (i32 each), then ``v_trans`` (u32), the layer
count (u32), per layer the K type (i32), K row size (u64) and cells x row bytes, then per layer the V type (i32)
and either the V row size (u64) and cells x row bytes, or (transposed V) the element size (u32), the V width
(u32) and width x cells x element bytes.

``check_seq_state(data, n_tokens=..., type_k=..., type_v=..., row_sizes=...)`` walks that layout without copying
the tensor data and raises ``StateMismatch`` unless the state holds exactly ``n_tokens`` cells at positions
``0..n_tokens-1`` of one sequence, every layer has the expected cache types and row sizes, and nothing is left
over.  A state that passes is exactly the shape llama.cpp would write for this model and settings; a short,
padded, foreign or crafted one is refused before llama.cpp reads it (whose own checks would throw, or accept a
state holding fewer cells than the cache entry says).

What it does not do: check the numbers in the tensors (the cache's checksum covers the bytes), or read states of
multi-stream, M-RoPE or sliding-window caches (refused as a mismatch: such entries are evaluated again).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
SEQ_STATE_MAGIC = 0xAF143CD8


class StateMismatch(Exception):
    """The state's structure does not match what it should hold (the message says where)."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, s: struct.Struct, what: str) -> int:
        if self.pos + s.size > len(self.data):
            raise StateMismatch(f"the state ends inside {what} (offset {self.pos})")
        (value,) = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return int(value)

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise StateMismatch(f"the state ends inside {what} ({n} bytes at offset {self.pos})")
        self.pos += n


def check_seq_state(
    data: bytes,
    *,
    n_tokens: int,
    type_k: int,
    type_v: int,
    row_sizes_k: Sequence[int],
    row_sizes_v: Sequence[int],
) -> None:
    """Raise ``StateMismatch`` unless ``data`` is one sequence of ``n_tokens`` cells at positions 0.., with K/V of
    ggml types ``type_k``/``type_v`` and the given per-layer row sizes (bytes per cell)."""
    r = _Reader(data)
    if r.take(_U32, "the magic") != SEQ_STATE_MAGIC:
        raise StateMismatch("not a llama.cpp sequence state (bad magic)")
    if r.take(_I32, "the sequence id") != 0:
        raise StateMismatch("the state is not of sequence 0")
    if r.take(_U32, "the stream count") != 1:
        raise StateMismatch("the state has more than one stream")
    cells = r.take(_U32, "the cell count")
    if cells != n_tokens:
        raise StateMismatch(f"the state holds {cells} cells, the entry says {n_tokens}")
    for i in range(cells):
        pos = r.take(_I32, "a cell position")
        if pos != i:
            raise StateMismatch(f"cell {i} is at position {pos}")
        n_seq = r.take(_U32, "a cell's sequence count")
        if n_seq != 1:
            raise StateMismatch(f"cell {i} belongs to {n_seq} sequences")
        r.skip(_I32.size, "a sequence id")
    v_trans = r.take(_U32, "the V layout")
    n_layer = r.take(_U32, "the layer count")
    if n_layer != len(row_sizes_k) or n_layer != len(row_sizes_v):
        raise StateMismatch(f"the state has {n_layer} layers, the model {len(row_sizes_k)}")
    for il, row in enumerate(row_sizes_k):
        t, size = r.take(_I32, "a K type"), r.take(_U64, "a K row size")
        if t != type_k or size != row:
            raise StateMismatch(f"layer {il}: K type {t} row {size} bytes, expected type {type_k} row {row}")
        r.skip(cells * size, f"layer {il}'s keys")
    for il, row in enumerate(row_sizes_v):
        t = r.take(_I32, "a V type")
        if t != type_v:
            raise StateMismatch(f"layer {il}: V type {t}, expected {type_v}")
        if v_trans == 0:
            size = r.take(_U64, "a V row size")
            if size != row:
                raise StateMismatch(f"layer {il}: V row {size} bytes, expected {row}")
            r.skip(cells * size, f"layer {il}'s values")
        else:
            el, width = r.take(_U32, "a V element size"), r.take(_U32, "a V width")
            if el * width != row:
                raise StateMismatch(f"layer {il}: V {width} x {el} bytes, expected {row} bytes per cell")
            r.skip(width * cells * el, f"layer {il}'s values")
    if r.pos != len(r.data):
        raise StateMismatch(f"{len(r.data) - r.pos} bytes follow the last layer")
