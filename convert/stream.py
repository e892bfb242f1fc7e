"""Streaming tensors into a GGUF file.

What it does:

* ``write_gguf`` drives ``gguf.GGUFWriter`` in its streaming order (tensor
  infos, header, metadata, tensor table, then one tensor at a time);
* tensors whose stored bytes are kept are copied by the kernel
  (``copy_file_range``/``sendfile``) without entering Python; the others are
  converted in chunks of rows on a thread pool (numpy releases the GIL) into
  one of two reused buffers, the next tensor being made while the previous
  one is written, so memory stays near two tensors whatever the model size.

What it does not do: decide names, types, permutations or metadata (that is
``edgerope.convert.export``), pack metadata (``edgerope.gguf.writer``), read checkpoints (``edgerope.convert.safetensors_reader``) or read
GGUF files back (``edgerope.gguf.reader``).
"""

from __future__ import annotations

import errno
import functools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from edgerope.convert.safetensors_reader import STORAGE_DTYPES, TensorEntry, to_float32
from edgerope.errors import CheckpointError
from edgerope.gguf.writer import FastArrayWriter
from edgerope.system.files import copy_range

# stored safetensors dtype -> the GGML type that holds the same bytes (raw copy possible)
SAME_BYTES = {"F32": QT.F32, "F16": QT.F16, "BF16": QT.BF16}
CHUNK_ELEMENTS = 1 << 20  # rows per conversion task: about this many elements


@dataclass
class TensorJob:
    """One output tensor: where it comes from and how it is stored."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: QT
    entry: TensorEntry | None = None  # None for rope factor tensors
    array: np.ndarray | None = None  # rope factor values
    row_order: np.ndarray | None = None  # written rows = stored rows[row_order] (the llama arch's Q/K permutation)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


class RawBytes:
    """Bytes of a checkpoint file, written with an in-kernel copy; quacks like the array ``write_tensor_data`` takes."""

    def __init__(self, path: Path, start: int, nbytes: int) -> None:
        self.path, self.start, self.nbytes = path, start, nbytes

    def tofile(self, fout: Any) -> None:
        fout.flush()
        dst = fout.fileno()
        with self.path.open("rb") as src:
            done = 0
            while done < self.nbytes:
                n = copy_range(src.fileno(), dst, self.start + done, self.nbytes - done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short read from {self.path}")
                done += n
        fout.seek(0, os.SEEK_END)  # resync the buffered writer with the descriptor


class ArrayBytes:
    """An array written with plain ``os.write`` calls of 16 MiB (``ndarray.tofile`` of a large array is ~10x slower)."""

    def __init__(self, array: np.ndarray) -> None:
        self.view = memoryview(np.ascontiguousarray(array)).cast("B")
        self.nbytes = self.view.nbytes

    def tofile(self, fout: Any) -> None:
        fout.flush()
        dst, done = fout.fileno(), 0
        while done < self.nbytes:
            done += os.write(dst, self.view[done : done + (1 << 24)])
        fout.seek(0, os.SEEK_END)  # resync the buffered writer with the descriptor


OUT_DTYPES = {QT.F32: np.dtype(np.float32), QT.F16: np.dtype(np.float16), QT.BF16: np.dtype(np.uint16)}


@functools.cache
def bf16_to_f16_table() -> np.ndarray:
    """float16 of every bfloat16 bit pattern, shape (65536,): bf16 -> f16 in one gather, exactly as
    bf16 -> f32 -> f16 with round-to-nearest-even (overflow to inf, NaN kept)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float16)


class _Producer:
    """Turns a TensorJob into the bytes to write, converting chunks of rows on a thread pool.

    Source rows are read with ``pread`` into per-thread scratch buffers (no memory map shared by the
    threads); results go into one of two reused output buffers (one being written while the next is
    filled), so peak memory is about two output tensors plus a few chunks, whatever the model size.
    """

    def __init__(self, pool: ThreadPoolExecutor, jobs: list[TensorJob]) -> None:
        self.pool = pool
        biggest = max((j.nbytes for j in jobs if j.entry is not None), default=0)
        self.buffers = [np.empty(biggest, dtype=np.uint8) for _ in range(2)]
        self.turn = 0
        self.fds: dict[Path, int] = {}
        self.local = threading.local()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def _scratch(self, name: str, nbytes: int) -> np.ndarray:
        buf = getattr(self.local, name, None)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, CHUNK_ELEMENTS * 4), dtype=np.uint8)
            setattr(self.local, name, buf)
        return buf[:nbytes]

    def __call__(self, job: TensorJob) -> ArrayBytes | RawBytes:
        if job.array is not None:
            return ArrayBytes(job.array.astype(np.float32))
        entry = job.entry
        assert entry is not None
        same = SAME_BYTES.get(entry.dtype) == job.qtype
        if same and job.row_order is None:
            return RawBytes(entry.file, entry.start, entry.nbytes)  # copied by the kernel as they are
        storage = STORAGE_DTYPES[entry.dtype]
        n_rows = entry.shape[0]
        row_elems = math.prod(entry.shape[1:])
        # where each stored row goes: out = old[order]  <=>  out[inv] = old
        inv = None if job.row_order is None else np.argsort(job.row_order)
        out_buf = self.buffers[self.turn][: job.nbytes]
        self.turn ^= 1
        if job.qtype == QT.Q8_0:
            out = out_buf.reshape(gguf.quant_shape_to_byte_shape(entry.shape, QT.Q8_0))
        else:
            out = out_buf.view(OUT_DTYPES[job.qtype]).reshape(entry.shape)
        step = max(1, CHUNK_ELEMENTS // max(1, row_elems))
        fd, dtype, qtype = self._fd(entry.file), entry.dtype, job.qtype

        def work(start: int) -> None:
            stop = min(n_rows, start + step)
            n = (stop - start) * row_elems
            raw = self._scratch("src", n * storage.itemsize)
            got = os.preadv(fd, [raw], entry.start + (start * row_elems) * storage.itemsize)
            if got != raw.nbytes:
                raise CheckpointError(f"short read of {entry.name}", where=str(entry.file))
            rows = raw.view(storage).reshape(stop - start, *entry.shape[1:])  # (chunk rows, cols)
            if same:
                value = rows
            elif dtype == "BF16" and qtype == QT.F16:  # one table lookup per element
                if inv is None:
                    np.take(bf16_to_f16_table(), rows, out=out[start:stop])
                    return
                value = np.take(bf16_to_f16_table(), rows)
            elif dtype == "BF16" and qtype == QT.F32:
                bits = self._scratch("bits", n * 4).view(np.uint32)
                np.left_shift(rows.reshape(-1), 16, out=bits, dtype=np.uint32)  # bf16 -> f32: the high half
                value = bits.view(np.float32).reshape(rows.shape)
            elif qtype in (QT.F16, QT.F32):
                value = rows
            else:  # bf16 from f32/f16, q8_0: gguf's numpy quantizers
                q = gguf.quantize(to_float32(rows, dtype), qtype)
                value = q.view(np.uint16) if qtype == QT.BF16 else q
            with np.errstate(over="ignore"):  # f16 overflow is checked once the tensor is done
                if inv is not None:
                    out[inv[start:stop]] = value  # scatter the rows to their permuted places, casting as needed
                else:
                    np.copyto(out[start:stop], value, casting="unsafe")

        list(self.pool.map(work, range(0, n_rows, step)))
        if qtype == QT.F16 and dtype != "F16":
            # a weight beyond float16's range would silently become inf: refuse instead
            def overflow(start: int) -> bool:
                return bool(np.isinf(out[start : start + step]).any())

            if any(self.pool.map(overflow, range(0, n_rows, step))):
                raise CheckpointError(
                    f"tensor {entry.name} has values beyond the float16 range (|x| > 65504): an f16 GGUF would hold inf",
                    where=str(entry.file),
                    fix="convert with --outtype bf16 or f32",
                )
        return ArrayBytes(out)


def write_gguf(
    path: Path,
    arch: str,
    jobs: list[TensorJob],
    *,
    add_kv: Callable[[gguf.GGUFWriter], None],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a GGUF: ``add_kv(writer)`` adds the metadata, then every job's tensor is streamed, then fsync.

    Raises OSError from the file system (the caller maps it and removes ``path``).
    """
    w = FastArrayWriter(path, arch)
    add_kv(w)
    for job in jobs:
        w.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
    total, done = sum(j.nbytes for j in jobs), 0
    workers = max(1, min(8, os.cpu_count() or 1))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as ahead:
            produce = _Producer(pool, jobs)
            pending = None
            try:
                pending = ahead.submit(produce, jobs[0]) if jobs else None
                for i, job in enumerate(jobs):
                    assert pending is not None
                    data = pending.result()
                    pending = ahead.submit(produce, jobs[i + 1]) if i + 1 < len(jobs) else None
                    if data.nbytes != job.nbytes:  # pragma: no cover - planning and producing disagree
                        raise AssertionError(f"{job.name}: {data.nbytes} bytes produced, {job.nbytes} planned")
                    w.write_tensor_data(data)
                    done += job.nbytes
                    if progress is not None:
                        progress(done, total)
            finally:
                if pending is not None:
                    pending.cancel()
                    wait([pending])
                produce.close()
        assert w.fout is not None
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())
    finally:
        w.close()
