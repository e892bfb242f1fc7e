"""Rewrite the rope scaling metadata of an existing GGUF, any llama.cpp architecture, tensor bytes copied verbatim.

``set_rope`` builds the requested rope variant with ``edgerope.rope.scaling`` (none,
linear, YaRN or static NTK), maps it to GGUF keys with
``edgerope.rope.ggml.plan_gguf_rope`` for the file's architecture (which
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
after verification.

What it does not do: touch tensor values, convert or quantize (``edgerope.convert.export``),
or decide rope math (``edgerope.rope.scaling``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter, Keys

from edgerope.errors import OutputError, RopeConfigError, UnsupportedRopeError
from edgerope.gguf.reader import GGUFFile, TensorInfo, model_hparams, open_gguf
from edgerope.gguf.verify import open_written, rope_function_problem
from edgerope.gguf.writer import FastArrayWriter
from edgerope.rope import SCALING_CHOICES
from edgerope.rope.ggml import ARCHS_READING_YARN_BETAS, ROPE_TENSORS, GGUFRopePlan, key, plan_gguf_rope
from edgerope.rope.scaling import (
    DEFAULT_THETA,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    Default,
    Linear,
    NtkAware,
    RopeScaling,
    Yarn,
    describe,
    validate_for_context,
)
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


# --------------------------------------------------------------------------- the variant


def _file_is_unscaled(f: GGUFFile) -> bool:
    stype = f.arch_get(Keys.Rope.SCALING_TYPE)
    factor = f.arch_get(Keys.Rope.SCALING_FACTOR) or f.get(f"{f.architecture}.rope.scale_linear")
    has_factors = any(f.tensor(n) is not None for n in ROPE_TENSORS)
    return stype in (None, "none", "linear") and factor in (None, 0, 1) and not has_factors


def _build_variant(
    f: GGUFFile,
    *,
    rope_type: str,
    factor: float | None,
    original_context: int | None,
    context_length: int | None,
    freq_base: float | None,
    attn_factor: float | None,
    beta_fast: float | None,
    beta_slow: float | None,
) -> tuple[RopeScaling, int]:
    where = f"set-rope --type {rope_type}"
    if rope_type not in SCALING_CHOICES:
        raise RopeConfigError(
            f"unknown rope type {rope_type!r}", where=where, fix=f"use one of: {', '.join(SCALING_CHOICES)}"
        )
    if rope_type != "yarn" and (attn_factor is not None or beta_fast is not None or beta_slow is not None):
        raise RopeConfigError(
            "--attn-factor and --beta-fast/--beta-slow apply to YaRN only",
            where=where,
            fix="drop them, or use --type yarn",
        )
    theta = float(freq_base) if freq_base is not None else float(f.arch_get(Keys.Rope.FREQ_BASE, DEFAULT_THETA))
    ctx_file = int(f.arch_get(Keys.LLM.CONTEXT_LENGTH))
    orig_file = f.arch_get(Keys.Rope.SCALING_ORIG_CTX_LEN)
    scaled = rope_type in ("linear", "yarn") or (rope_type == "ntk" and factor is not None)
    if scaled:
        if factor is None:
            raise RopeConfigError(f"--type {rope_type} needs --factor", where=where, fix="e.g. --factor 4")
        if not math.isfinite(factor) or factor <= 1:
            raise RopeConfigError(
                f"{rope_type} factor must be > 1 to extend the context, got {factor:g}",
                where=where,
                fix="use a factor such as 4 or 8, or --type none for no scaling",
            )
    if original_context is None:
        if orig_file is not None:
            original_context = int(orig_file)
        elif _file_is_unscaled(f):
            original_context = ctx_file
        elif scaled:
            raise RopeConfigError(
                f"the file is already rope-scaled and does not record its original context (context_length {ctx_file})",
                where=str(f.path),
                fix="give the pre-training context with --original-context",
            )
        else:
            original_context = ctx_file
    if original_context <= 0:
        raise RopeConfigError(f"original context must be > 0, got {original_context}", where=where)
    if context_length is None:
        context_length = int(round(factor * original_context)) if scaled and factor else original_context
    if scaled and original_context >= context_length:
        raise RopeConfigError(
            f"original context {original_context} must be smaller than the context length {context_length}",
            where=where,
            fix=f"set the context length to factor x original, e.g. {int(round(factor * original_context))}",
        )
    rope: RopeScaling
    if rope_type == "none":
        rope = Default(theta=theta)
    elif rope_type == "linear":
        rope = Linear(theta=theta, factor=float(factor))
    elif rope_type == "yarn":
        rope = Yarn(
            theta=theta,
            factor=float(factor),
            original_max_position_embeddings=int(original_context),
            beta_fast=YARN_BETA_FAST if beta_fast is None else float(beta_fast),
            beta_slow=YARN_BETA_SLOW if beta_slow is None else float(beta_slow),
            attention_factor=attn_factor,
        )
        validate_for_context(rope, context_length=context_length, where=where)
    elif factor is not None:
        rope = NtkAware(theta=theta, alpha=float(factor))
    elif freq_base is not None:
        rope = Default(theta=theta)  # NTK given directly as the new base
    else:
        raise RopeConfigError("--type ntk needs --factor (alpha) or --freq-base (the new base)", where=where)
    return rope, int(context_length)


# --------------------------------------------------------------------------- writing


def _check_paths(
    src: Path, out_path: str | os.PathLike[str] | None, *, in_place: bool, force: bool, need_bytes: int
) -> Path:
    if in_place:
        if out_path is not None and Path(out_path).resolve() != src.resolve():
            raise OutputError("--in-place rewrites the input; do not also name a different output", where=str(out_path))
        check_free_space(src.parent, need_bytes)
        return src
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
    dest = _check_paths(src, out_path, in_place=in_place, force=force, need_bytes=f.file_size + (1 << 20))
    arch = f.architecture
    hp = model_hparams(f)
    if hp.n_rot <= 0:
        raise UnsupportedRopeError(
            f"arch {arch!r} has no rotary embedding to scale (no attention heads)", where=str(src)
        )
    stale_tensors = [n for n in ROPE_TENSORS if f.tensor(n) is not None]
    if stale_tensors and arch in ARCHS_WITH_INTRINSIC_ROPE_FREQS:
        raise UnsupportedRopeError(
            f"{', '.join(stale_tensors)} is part of the {arch!r} architecture, not a rope scaling: set-rope would "
            "have to remove it and llama.cpp requires it",
            where=str(src),
            fix="scale this model's context at run time (rope_scaling_type, rope_freq_scale, yarn_orig_ctx)",
        )
    rope, ctx = _build_variant(
        f,
        rope_type=rope_type,
        factor=factor,
        original_context=original_context,
        context_length=context_length,
        freq_base=freq_base,
        attn_factor=attn_factor,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
    )
    if isinstance(rope, Yarn) and (rope.beta_fast, rope.beta_slow) != (YARN_BETA_FAST, YARN_BETA_SLOW):
        if arch not in ARCHS_READING_YARN_BETAS:
            fast, slow = f"{rope.beta_fast:g}", f"{rope.beta_slow:g}"
            raise UnsupportedRopeError(
                f"llama.cpp ignores the yarn_beta_* keys on arch {arch!r} (only "
                f"{', '.join(sorted(ARCHS_READING_YARN_BETAS))} read them): the file cannot carry "
                f"beta_fast={fast}, beta_slow={slow}",
                where=str(src),
                fix=f"set-rope without --beta-fast/--beta-slow and pass them at run time: llama-cli "
                f"--yarn-beta-fast {fast} --yarn-beta-slow {slow}, or Llama(yarn_beta_fast={fast}, yarn_beta_slow={slow})",
            )
    plan = plan_gguf_rope(rope, arch=arch, head_dim=hp.n_rot, context_length=ctx)
    if plan.tensors:  # only llama3/longrope produce tensors, and set-rope does not build those
        raise UnsupportedRopeError(f"set-rope cannot write frequency-factor tensors ({', '.join(plan.tensors)})")
    previous = {
        k: v.value
        for k, v in f.metadata.items()
        if k.startswith(f"{arch}.rope.") or k == key(Keys.LLM.CONTEXT_LENGTH, arch)
    }
    report = SetRopeReport(
        input=str(src),
        output=str(dest),
        in_place=in_place,
        architecture=arch,
        rope=describe(rope),
        previous=previous,
        context_length=ctx,
        changed_keys={},
        removed_keys=sorted(k for k in plan.remove if k in f.metadata),
        removed_tensors=stale_tensors,
        runtime=dict(plan.runtime),
        notes=list(plan.notes),
    )
    for k, (value, vtype) in plan.kv.items():
        old = f.metadata.get(k)
        if old is None or old.type != vtype or not _same_value(old.value, value, vtype):
            report.changed_keys[k] = value
    if f.arch_get(Keys.Attention.SLIDING_WINDOW) is not None or f.arch_get(Keys.Rope.FREQ_BASE_SWA) is not None:
        report.notes.append(
            f"{arch} has sliding-window layers with rope settings of their own; set-rope changed the global rope "
            "keys only"
        )
    for name in stale_tensors:
        report.notes.append(
            f"removed {name}: its per-pair factors belong to the previous rope scaling; the new function is "
            f"{describe(rope)} without them"
        )
    # --- header plan: source order, rope keys replaced in place, new keys appended
    kv: dict[str, tuple[Any, GGUFValueType]] = {}
    for k, mv in f.metadata.items():
        if k == Keys.General.ARCHITECTURE or k in plan.remove:
            continue
        kv[k] = plan.kv[k] if k in plan.kv else (_Raw(f.raw_value(k)), mv.type)
    for k, item in plan.kv.items():
        kv.setdefault(k, item)
    tensors = [t for t in f.tensors if t.name not in stale_tensors]
    total = sum(t.n_bytes for t in tensors)
    tmp = partial_path(dest)
    mode = (src.stat().st_mode & 0o777) if in_place else 0o666
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
    except OSError as exc:
        raise OutputError(f"cannot create a file in {dest.parent}: {exc.strerror or exc}", where=str(dest)) from None
    try:
        data_start = _write_header(tmp, f, kv, tensors)
        runs, dst_offsets = _layout(tensors, data_start, f.alignment)
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
            _copy_verified(src_fd, dst_fd, runs, on_bytes, full=full_verify)
            end = os.lseek(dst_fd, 0, os.SEEK_CUR)
            os.write(dst_fd, bytes(GGUFWriter.ggml_pad(end, f.alignment) - end))
            if in_place:
                os.fsync(dst_fd)  # the input is about to be replaced: the new bytes must be on disk first
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        _verify(f, tmp, kv=kv, tensors=tensors, dst_offsets=dst_offsets, rope=rope, n_rot=hp.n_rot, plan=plan)
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
