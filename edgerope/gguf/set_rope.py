"""Rewrite the rope scaling metadata of an existing GGUF, any llama.cpp architecture, tensor bytes copied verbatim.

``set_rope`` builds the requested rope variant with ``edgerope.rope.scaling`` (none,
linear, YaRN or static NTK; options checked in ``edgerope.gguf.set_rope_variant``), maps it to GGUF keys with
``edgerope.rope.gguf_plan.plan_gguf_rope`` for the file's architecture (which
refuses what that architecture would ignore), replaces the rope keys, drops
stale scaling keys and frequency-factor tensors that would change the new
function, and keeps every other key byte for byte.  The header is written by
``gguf.GGUFWriter``; tensor data is copied in the kernel (``copy_file_range``),
then compared with the source: the head, tail and evenly spaced blocks of every
run of tensors by default (what catches an offset or length mistake), every
byte with ``full_verify=True``.  The output is then re-opened and checked (metadata, tensor infos and
offsets, the rope function llama.cpp resolves) before it is renamed into
place.  Temp file in the destination folder, so a failure never leaves a
partial output; the input is only replaced with ``in_place=True`` and only
after verification (through a symlink: its target is rewritten and the link kept).

What it does not do: touch tensor values, convert or quantize (``edgerope.convert.export``),
or decide rope math (``edgerope.rope.scaling``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter, Keys

from edgerope.errors import OutputError, UnsupportedRopeError
from edgerope.gguf.hparams import model_hparams
from edgerope.gguf.reader import GGUFFile, TensorInfo, open_gguf
from edgerope.gguf.set_rope_variant import RopeOptions, build_variant, check_yarn_betas, family_notes, sliding_rope
from edgerope.gguf.verify import open_written, rope_function_problem
from edgerope.gguf.writer import FastArrayWriter
from edgerope.rope.ggml import ROPE_TENSORS, key
from edgerope.rope.gguf_plan import GGUFRopePlan, plan_gguf_rope
from edgerope.rope.scaling import RopeScaling, describe
from edgerope.system.files import check_free_space, check_output, copy_range, partial_path

CHUNK = 64 << 20  # kernel copy granularity (progress updates)
FULL_VERIFY_BLOCK = 2 << 20  # read-back compare stays in cache
SAMPLES = 8  # evenly spaced blocks compared per run of tensors, besides head and tail
SAMPLE_BYTES = 64 << 10
# architectures whose frequency-factor tensors are part of the model and required at load
ARCHS_WITH_INTRINSIC_ROPE_FREQS = frozenset({"gemma4"})
Progress = Callable[[int, int], None]


@dataclass
class SetRopeReport:
    input: str
    output: str
    in_place: bool
    architecture: str
    rope: str  # the new function, in words (edgerope.rope.scaling.describe)
    previous: dict[str, Any]  # the rope keys before
    context_length: int
    changed_keys: dict[str, Any]  # key -> new value (added or changed)
    removed_keys: list[str]
    removed_tensors: list[str]
    runtime: dict[str, float]  # llama_context_params a runtime must pass (empty: the file alone suffices)
    notes: list[str] = field(default_factory=list)
    bytes: int = 0
    tensor_bytes: int = 0
    seconds: float = 0.0
    verified: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Raw:
    """A metadata value kept as its exact source bytes (type id + payload)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _HeaderWriter(FastArrayWriter):
    """``gguf_stream.FastArrayWriter`` that emits ``_Raw`` values verbatim, so untouched keys stay byte-identical."""

    def _pack_val(
        self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None
    ) -> bytes:
        if isinstance(val, _Raw):
            return val.data if add_vtype else val.data[4:]
        return super()._pack_val(val, vtype, add_vtype, sub_type)


# --------------------------------------------------------------------------- writing


def _check_paths(
    src: Path, out_path: str | os.PathLike[str] | None, *, in_place: bool, force: bool, need_bytes: int
) -> Path:
    if in_place:
        if out_path is not None and Path(out_path).resolve() != src.resolve():
            raise OutputError("--in-place rewrites the input; do not also name a different output", where=str(out_path))
        # through a symlink (how the Hugging Face hub cache lays out files) the target is rewritten, beside the
        # target (same file system: an atomic rename), and the link keeps pointing at it
        target = src.resolve(strict=True) if src.is_symlink() else src
        check_free_space(target.parent, need_bytes)
        return target
    if out_path is None:
        raise OutputError("no output file given", fix="pass -o OUT.gguf, or --in-place to replace the input")
    dest = Path(out_path)
    check_output(
        dest, force=force, inputs=[src], need_bytes=need_bytes, input_fix="use --in-place to rewrite the input"
    )
    return dest


def _write_header(tmp: Path, f: GGUFFile, kv: dict[str, tuple[Any, GGUFValueType]], tensors: list[TensorInfo]) -> int:
    """Write magic, metadata and tensor infos with ``GGUFWriter``, padded to the alignment; return the data start."""
    w = _HeaderWriter(tmp, f.architecture, endianess=f.endian)
    w.data_alignment = f.alignment
    for k, (value, vtype) in kv.items():
        w.add_key_value(k, value, vtype)
    for t in tensors:
        # GGUFWriter takes numpy-order shapes; a non-uint8 placeholder dtype keeps them as given for raw_dtype
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes, raw_dtype=t.ggml_type)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    w.write_padding(w.fout[0], w.fout[0].tell())
    w.flush()
    data_start = w.fout[0].tell()
    w.close()
    return data_start


def _layout(
    tensors: list[TensorInfo], data_start: int, alignment: int
) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    """Output offsets as ``GGUFWriter`` assigns them, and copy runs (src, dst, length) merged where contiguous."""
    runs: list[tuple[int, int, int]] = []
    offsets: dict[str, int] = {}
    rel = 0
    for t in tensors:
        dst = offsets[t.name] = data_start + rel
        src0, dst0, n0 = runs[-1] if runs else (0, 0, -1)
        if n0 >= 0 and t.data_offset - (src0 + n0) == dst - (dst0 + n0) >= 0:
            runs[-1] = (src0, dst0, t.data_offset + t.n_bytes - src0)  # same gap in both files: one run
        else:
            runs.append((t.data_offset, dst, t.n_bytes))
        rel += GGUFWriter.ggml_pad(t.n_bytes, alignment)
    return runs, offsets


def _copy_verified(
    src_fd: int,
    dst_fd: int,
    runs: list[tuple[int, int, int]],
    on_bytes: Callable[[int], None],
    *,
    full: bool = False,
) -> None:
    """Copy ``runs`` of (src_offset, dst_offset, length) in the kernel, then compare output with source bytes.

    The comparison reads back every byte with ``full``; otherwise, per run, the first and last block and up to
    ``SAMPLES`` evenly spaced blocks in between (a shifted offset or a short copy shows in all of them).
    """
    for src_off, dst_off, length in runs:
        pos = os.lseek(dst_fd, 0, os.SEEK_CUR)
        assert pos <= dst_off, (pos, dst_off)
        if pos < dst_off:
            os.write(dst_fd, bytes(dst_off - pos))  # zero padding up to the aligned offset
        done = 0
        while done < length:
            n = copy_range(src_fd, dst_fd, src_off + done, min(length - done, CHUNK))
            if n <= 0:
                raise OutputError(f"the input changed or shrank while copying (short copy at {src_off + done:,})")
            done += n
            on_bytes(n)
    block = FULL_VERIFY_BLOCK if full else SAMPLE_BYTES
    va, vb = memoryview(bytearray(block)), memoryview(bytearray(block))
    for src_off, dst_off, length in runs:
        if full:
            starts = range(0, length, block)
        else:
            step = max(length // (SAMPLES + 1), 1)
            starts = sorted({0, *range(step, length, step)[:SAMPLES], max(length - SAMPLE_BYTES, 0)})
        for start in starts:
            k = min(block, length - start)
            got_a = os.preadv(src_fd, [va[:k]], src_off + start)
            got_b = os.preadv(dst_fd, [vb[:k]], dst_off + start)
            if got_a != k or got_b != k or va[:k].tobytes() != vb[:k].tobytes():
                raise OutputError(
                    f"tensor bytes differ from the input at output byte {dst_off + start:,} (disk or filesystem error)"
                )


# --------------------------------------------------------------------------- set_rope


def set_rope(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    rope_type: str,
    factor: float | None = None,
    original_context: int | None = None,
    context_length: int | None = None,
    freq_base: float | None = None,
    attn_factor: float | None = None,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    in_place: bool = False,
    force: bool = False,
    full_verify: bool = False,
    progress: Progress | None = None,
) -> SetRopeReport:
    """Rewrite the rope metadata of the GGUF ``in_path`` into ``out_path`` (or in place). See the module docstring.

    ``factor`` is the scale (YaRN/linear) or the NTK alpha; ``original_context``
    defaults to the file's ``rope.scaling.original_context_length``, or to its
    context length when the file is unscaled; ``context_length`` defaults to
    factor x original; ``attn_factor`` is the YaRN attention factor (the cos/sin
    magnitude, Hugging Face's ``attention_factor``).  ``progress(done, total)``
    is called with tensor bytes copied.
    """
    t0 = time.perf_counter()
    src = Path(in_path)
    f = open_gguf(src)
    try:  # closed before the rename below, and on every error
        options = RopeOptions(
            rope_type, factor, original_context, context_length, freq_base, attn_factor, beta_fast, beta_slow
        )
        return _rewrite(
            f, src, out_path, options, in_place=in_place, force=force, full_verify=full_verify, progress=progress,
            t0=t0,
        )  # fmt: skip
    finally:
        f.close()


def _rewrite(
    f: GGUFFile,
    src: Path,
    out_path: str | os.PathLike[str] | None,
    options: RopeOptions,
    *,
    in_place: bool,
    force: bool,
    full_verify: bool,
    progress: Progress | None,
    t0: float,
) -> SetRopeReport:
    """``set_rope`` on the open input ``f`` (its arguments, the start time ``t0``)."""
    dest = _check_paths(src, out_path, in_place=in_place, force=force, need_bytes=f.file_size + (1 << 20))
    n_rot = _rotary_dims(f)
    stale_tensors = _stale_rope_tensors(f)
    rope, ctx = build_variant(f, options)
    check_yarn_betas(f, rope)
    plan = plan_gguf_rope(rope, arch=f.architecture, head_dim=n_rot, context_length=ctx, sliding_rope=sliding_rope(f))
    if plan.tensors:  # only llama3/longrope produce tensors, and set-rope does not build those
        raise UnsupportedRopeError(f"set-rope cannot write frequency-factor tensors ({', '.join(plan.tensors)})")
    report = _new_report(f, dest, in_place=in_place, rope=rope, context_length=ctx, plan=plan, stale=stale_tensors)
    if in_place and dest != src:
        report.notes.append(f"{src} is a symlink: its target {dest} was rewritten (the link is kept)")
    kv = _header_kv(f, plan)
    tensors = [t for t in f.tensors if t.name not in stale_tensors]
    total = sum(t.n_bytes for t in tensors)
    tmp = _create_partial(dest, src, in_place=in_place)
    try:
        data_start = _write_header(tmp, f, kv, tensors)
        runs, dst_offsets = _layout(tensors, data_start, f.alignment)
        _copy_tensor_data(
            src, tmp, runs, alignment=f.alignment, total=total, full=full_verify, sync=in_place, progress=progress
        )
        _verify(f, tmp, kv=kv, tensors=tensors, dst_offsets=dst_offsets, rope=rope, n_rot=n_rot, plan=plan)
        report.verified = True
        report.tensor_bytes = total
        report.bytes = tmp.stat().st_size
        f.close()
        os.replace(tmp, dest)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}", where=str(dest)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------- steps of set_rope


def _rotary_dims(f: GGUFFile) -> int:
    """The rotary dimension count llama.cpp uses; ``UnsupportedRopeError`` when the model has no rope."""
    n_rot = model_hparams(f).n_rot
    if n_rot <= 0:
        raise UnsupportedRopeError(
            f"arch {f.architecture!r} has no rotary embedding to scale (no attention heads)", where=str(f.path)
        )
    return n_rot


def _stale_rope_tensors(f: GGUFFile) -> list[str]:
    """The frequency-factor tensors present, which belong to the old scaling and are dropped.

    Refused where they are part of the architecture (llama.cpp requires them at load).
    """
    stale = [n for n in ROPE_TENSORS if f.tensor(n) is not None]
    arch = f.architecture
    if stale and arch in ARCHS_WITH_INTRINSIC_ROPE_FREQS:
        raise UnsupportedRopeError(
            f"{', '.join(stale)} is part of the {arch!r} architecture, not a rope scaling: set-rope would "
            "have to remove it and llama.cpp requires it",
            where=str(f.path),
            fix="scale this model's context at run time (rope_scaling_type, rope_freq_scale, yarn_orig_ctx)",
        )
    return stale


def _new_report(
    f: GGUFFile,
    dest: Path,
    *,
    in_place: bool,
    rope: RopeScaling,
    context_length: int,
    plan: GGUFRopePlan,
    stale: list[str],
) -> SetRopeReport:
    """The report before writing: previous rope keys, keys that change or go, and notes for the user."""
    arch = f.architecture
    previous = {
        k: v.value
        for k, v in f.metadata.items()
        if k.startswith(f"{arch}.rope.") or k == key(Keys.LLM.CONTEXT_LENGTH, arch)
    }
    report = SetRopeReport(
        input=str(f.path),
        output=str(dest),
        in_place=in_place,
        architecture=arch,
        rope=describe(rope),
        previous=previous,
        context_length=context_length,
        changed_keys={},
        removed_keys=sorted(k for k in plan.remove if k in f.metadata),
        removed_tensors=stale,
        runtime=dict(plan.runtime),
        notes=list(plan.notes),
    )
    for k, (value, vtype) in plan.kv.items():
        old = f.metadata.get(k)
        if old is None or old.type != vtype or not _same_value(old.value, value, vtype):
            report.changed_keys[k] = value
    report.notes += family_notes(f)
    for name in stale:
        report.notes.append(
            f"removed {name}: its per-pair factors belong to the previous rope scaling; the new function is "
            f"{describe(rope)} without them"
        )
    return report


def _header_kv(f: GGUFFile, plan: GGUFRopePlan) -> dict[str, tuple[Any, GGUFValueType]]:
    """The output's metadata: source order, rope keys replaced in place, new keys appended, the rest ``_Raw``."""
    kv: dict[str, tuple[Any, GGUFValueType]] = {}
    for k, mv in f.metadata.items():
        if k == Keys.General.ARCHITECTURE or k in plan.remove:
            continue
        kv[k] = plan.kv[k] if k in plan.kv else (_Raw(f.raw_value(k)), mv.type)
    for k, item in plan.kv.items():
        kv.setdefault(k, item)
    return kv


def _create_partial(dest: Path, src: Path, *, in_place: bool) -> Path:
    """Create the temp file beside ``dest`` (with the input's permissions when replacing it)."""
    tmp = partial_path(dest)
    mode = (src.stat().st_mode & 0o777) if in_place else 0o666
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    except OSError as exc:
        raise OutputError(f"cannot create a file in {dest.parent}: {exc.strerror or exc}", where=str(dest)) from None
    return tmp


def _copy_tensor_data(
    src: Path,
    tmp: Path,
    runs: list[tuple[int, int, int]],
    *,
    alignment: int,
    total: int,
    full: bool,
    sync: bool,
    progress: Progress | None,
) -> None:
    """Append the tensor ``runs`` to the header in ``tmp``, compared with the source, padded to ``alignment``.

    ``sync`` flushes the result to disk (before the input is replaced by it).
    """
    copied = 0

    def on_bytes(n: int) -> None:
        nonlocal copied
        copied += n
        if progress is not None:
            progress(min(copied, total), total)

    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(tmp, os.O_RDWR)
    try:
        os.lseek(dst_fd, 0, os.SEEK_END)
        _copy_verified(src_fd, dst_fd, runs, on_bytes, full=full)
        end = os.lseek(dst_fd, 0, os.SEEK_CUR)
        os.write(dst_fd, bytes(GGUFWriter.ggml_pad(end, alignment) - end))
        if sync:
            os.fsync(dst_fd)  # the input is about to be replaced: the new bytes must be on disk first
    finally:
        os.close(src_fd)
        os.close(dst_fd)


# --------------------------------------------------------------------------- verification


def _same_value(a: Any, b: Any, vtype: GGUFValueType) -> bool:
    if vtype == GGUFValueType.FLOAT32:
        return bool(np.float32(a) == np.float32(b))
    return a == b


def _verify(
    f: GGUFFile,
    tmp: Path,
    *,
    kv: dict[str, tuple[Any, GGUFValueType]],
    tensors: list[TensorInfo],
    dst_offsets: dict[str, int],
    rope: RopeScaling,
    n_rot: int,
    plan: GGUFRopePlan,
) -> None:
    """Re-open the written file and check it is exactly what was planned; raise ``OutputError`` otherwise."""

    def fail(what: str) -> OutputError:
        return OutputError(f"verification of the written file failed: {what}; nothing was written", where=str(tmp))

    try:
        g = open_written(tmp)
    except OutputError as exc:
        raise fail(exc.what) from None
    with g:
        if g.architecture != f.architecture:
            raise fail("architecture differs")
        if set(g.metadata) != set(kv) | {Keys.General.ARCHITECTURE}:
            raise fail(f"key set differs: {sorted(set(g.metadata) ^ (set(kv) | {Keys.General.ARCHITECTURE}))}")
        for k, (value, vtype) in kv.items():
            mv = g.metadata[k]
            same = (
                g.raw_value(k) == value.data
                if isinstance(value, _Raw)
                else mv.type == vtype and _same_value(mv.value, value, vtype)
            )
            if not same:
                raise fail(f"metadata key {k} differs")
        if [t.name for t in g.tensors] != [t.name for t in tensors]:
            raise fail("tensor list differs")
        for t, u in zip(tensors, g.tensors, strict=True):
            if (t.shape, t.ggml_type, t.n_bytes) != (u.shape, u.ggml_type, u.n_bytes) or u.data_offset != dst_offsets[
                t.name
            ]:
                raise fail(f"tensor info of {t.name} differs")
            # the bulk copy was compared chunk by chunk; here the reader's own offsets must see the same bytes
            n = min(4096, t.n_bytes)
            a, b = f.tensor_bytes(t.name), g.tensor_bytes(t.name)
            if not (np.array_equal(a[:n], b[:n]) and np.array_equal(a[t.n_bytes - n :], b[t.n_bytes - n :])):
                raise fail(f"tensor data of {t.name} differs")
        problem = rope_function_problem(g, rope, n_rot=n_rot, plan=plan)
        if problem:
            raise fail(problem)
