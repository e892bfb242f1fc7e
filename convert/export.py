"""Convert a Hugging Face checkpoint folder to one GGUF file, rope metadata exact.

Families: Llama (Llama 2/3.x, SmolLM2), Mistral, Qwen2, Qwen3, Gemma 3 (text), Phi-3 (Phi-3.5-mini,
Phi-4-mini), SmolLM3 (``edgerope.models.config.FAMILIES``).

What it does:

* reads ``config.json`` (``edgerope.models.config``), the safetensors checkpoint
  (``edgerope.convert.safetensors_reader``, no torch) and the tokenizer (``edgerope.convert.vocab``);
* refuses, before anything is written, what the family's llama.cpp architecture would compute differently
  (``edgerope.convert.families``), and checks every tensor against the config (missing, unexpected, unknown
  and mis-shaped tensors are reported together);
* writes rope metadata and frequency-factor tensors exactly as
  ``edgerope.rope.gguf_plan.plan_gguf_rope`` plans them (this module has no rope
  math; Gemma 3's sliding layers get their own base), the family's metadata, fused tensors as they are
  (Phi-3's qkv / gate_up), permutes Q/K rows for the adjacent-pair arches (docs/llama_cpp.md §3.1) and
  stores Gemma 3's norms the way llama.cpp multiplies them;
* streams tensors to a temp file beside the output: raw bytes when the stored
  type is kept, otherwise chunked casts spread over threads while the previous
  tensor is written; fsyncs, re-reads the file with ``edgerope.gguf.reader.open_gguf``,
  verifies it against the plan, then renames it into place.

What it does not do: K-quants (``edgerope.convert.quantize`` makes them from an f16/bf16
GGUF with llama.cpp's own quantizer), LoRA adapters, other architectures.
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType

from edgerope.convert import families
from edgerope.convert.families import neox_to_norm_rows
from edgerope.convert.safetensors_reader import SafetensorsCheckpoint, check_input_files
from edgerope.convert.stream import SAME_BYTES, TensorJob, write_gguf
from edgerope.convert.vocab import load_vocab
from edgerope.errors import (
    CheckpointError,
    ConfigError,
    EdgeropeError,
    OutputError,
)
from edgerope.gguf.verify import open_written, rope_function_problem, rope_plan_problems
from edgerope.models.config import ModelConfig
from edgerope.models.layout import hf_tensor_shapes
from edgerope.rope import gguf_plan
from edgerope.rope.scaling import DynamicNtk, Llama3, LongRope, RopeScaling, Yarn, describe, original_context
from edgerope.system.files import atomic_output, check_output

# outtype -> (GGML type of the big 2-D tensors, general.file_type).  K-quant outtypes are not made here:
# they come from edgerope.convert.quantize run on an f16/bf16 GGUF (the CLI chains the two).
OUTTYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
GGUF_ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
    "smollm3": gguf.MODEL_ARCH.SMOLLM3,
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp has no use for them
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ConvertReport:
    """What ``convert`` wrote."""

    path: Path
    arch: str
    outtype: str
    n_tensors: int
    bytes: int
    context_length: int
    rope: str  # the rope scaling in words
    rope_notes: tuple[str, ...]
    runtime: dict[str, float]  # llama_context_params a runtime must pass (empty: the file alone is exact)
    tokenizer: str  # "sentencepiece" or "bpe (<pre>)"
    n_vocab: int
    notes: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


# --------------------------------------------------------------------------- planning


def extended_context(cfg: ModelConfig, rope: RopeScaling) -> int:
    """The context the GGUF advertises: max_position_embeddings, or factor x original when a scaled config
    keeps max_position_embeddings at the original length (the Qwen2.5 layout)."""
    orig = original_context(rope)
    if isinstance(rope, (Yarn, Llama3, LongRope)) and orig and cfg.max_position_embeddings <= orig:
        return round(rope.factor * orig)
    return cfg.max_position_embeddings


def _out_type(name: str, shape: tuple[int, ...], outtype: str, notes: list[str]) -> QT:
    qtype = OUTTYPES[outtype][0]
    if len(shape) < 2:
        return QT.F32  # norms and biases stay F32 (llama.cpp does the same)
    if qtype == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
        notes.append(f"{name}: rows of {shape[-1]} are not a multiple of 32, stored as F16 instead of Q8_0")
        return QT.F16
    return qtype


def _layer_key(hf_name: str) -> tuple[int, str]:
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    if m:
        return int(m.group(1)), hf_name
    return (-1 if "embed_tokens" in hf_name else 1 << 30), hf_name


def plan_tensors(
    cfg: ModelConfig, ckpt: SafetensorsCheckpoint, *, arch: str, outtype: str, notes: list[str]
) -> list[TensorJob]:
    """Match the checkpoint against the config and map every tensor to its GGUF name and type."""
    where = str(ckpt.model_dir)
    expected = hf_tensor_shapes(cfg)
    tmap = gguf.get_tensor_name_map(GGUF_ARCHS[arch], cfg.num_hidden_layers)
    present = dict(ckpt.entries)
    for name in [n for n in present if n.endswith(IGNORED_SUFFIXES)]:
        del present[name]
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        del present["lm_head.weight"]
        notes.append(
            "tie_word_embeddings is set: the checkpoint's lm_head.weight was left out (llama.cpp reuses token_embd)"
        )
    missing = [n for n in expected if n not in present]
    unknown = sorted(
        n for n in present if n not in expected and tmap.get_name(n, try_suffixes=(".weight", ".bias")) is None
    )
    unexpected = sorted(n for n in present if n not in expected and n not in unknown)
    wrong_shape = [
        f"{n}: {list(present[n].shape)} (config expects {list(s)})"
        for n, s in expected.items()
        if n in present and present[n].shape != s
    ]
    non_float = [f"{n}: {present[n].dtype}" for n in expected if n in present and present[n].dtype not in SAME_BYTES]
    problems = []
    for title, items in (
        ("missing tensors", missing),
        (f"unknown tensors (not part of a {cfg.architecture} model)", unknown),
        ("unexpected tensors for this config", unexpected),
        ("shape mismatches", wrong_shape),
        ("unsupported dtypes (need F32, F16 or BF16)", non_float),
    ):
        if items:
            shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
            problems.append(f"{title} ({len(items)}):\n      " + "\n      ".join(shown))
    if problems:
        raise CheckpointError(
            "the checkpoint does not match config.json:\n    " + "\n    ".join(problems),
            where=where,
            fix="use the config.json saved with these weights (vocab_size, hidden sizes, head counts, "
            "layer count, attention_bias, tie_word_embeddings must describe the tensors)",
        )
    jobs: list[TensorJob] = []
    for hf_name in sorted(expected, key=_layer_key):
        entry = present[hf_name]
        gguf_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # pragma: no cover - every expected name is in gguf's map
            raise CheckpointError(f"gguf has no name for {hf_name}", where=where)
        shape = entry.shape
        values = families.transformed(cfg, hf_name, lambda name=hf_name: ckpt.float32(name))
        if values is not None:  # small 1-D tensors llama.cpp needs in another form (Gemma 3's norms)
            jobs.append(TensorJob(gguf_name, shape, QT.F32, array=values))
            continue
        order = families.row_order(cfg, hf_name, shape[0])
        jobs.append(
            TensorJob(gguf_name, shape, _out_type(gguf_name, shape, outtype, notes), entry=entry, row_order=order)
        )
    return jobs


# --------------------------------------------------------------------------- writing


def _output_error(exc: OSError, path: Path) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("the disk is full", where=str(path.parent), fix="free space or write elsewhere")
    if exc.errno == errno.EFBIG:
        return OutputError(
            "the output is larger than the file-size limit (ulimit -f) or the filesystem allows",
            where=str(path),
            fix="raise the limit or write to another filesystem",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError("the output folder is not writable", where=str(path.parent), fix="choose a writable folder")
    if exc.errno is None:  # numpy's tofile reports short writes without an errno
        return OutputError(f"cannot write the output ({exc}); is the disk full?", where=str(path))
    return OutputError(f"cannot write the output: {exc.strerror or exc}", where=str(path))


def model_name(cfg: ModelConfig, hf_dir: Path) -> str:
    """``general.name`` as written: the config's record, else the model card's, else the folder name."""
    try:
        meta = gguf.Metadata.load(None, hf_dir, None, cfg.n_params)
    except Exception as exc:  # gguf's model-card reader raises yaml/json/value errors alike
        raise ConfigError(f"cannot read the model card metadata: {exc}", where=str(hf_dir / "README.md")) from None
    return cfg.name or meta.name or hf_dir.resolve().name


def _add_metadata(
    w: gguf.GGUFWriter, cfg: ModelConfig, hf_dir: Path, *, outtype: str, n_vocab: int, context: int
) -> None:
    meta = gguf.Metadata.load(None, hf_dir, None, cfg.n_params)  # model_name() has read it once without error
    meta.name = model_name(cfg, hf_dir)
    meta.size_label = meta.size_label or gguf.size_label(cfg.n_params, 0, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.add_vocab_size(n_vocab)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for k, (value, vtype) in families.family_kv(cfg, context=context).items():
        w.add_key_value(k, value, vtype, sub_type=GGUFValueType.BOOL if vtype == GGUFValueType.ARRAY else None)
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def verify_gguf(
    path: Path,
    jobs: list[TensorJob],
    plan: gguf_plan.GGUFRopePlan,
    *,
    rope: RopeScaling | None = None,
    n_rot: int = 0,
    n_ctx: int | None = None,
) -> None:
    """Re-read ``path`` and check tensors (names, shapes, types, offsets), the rope keys and factor tensors against
    the plan, and (given ``rope`` and ``n_rot``) the function llama.cpp resolves from them (on the sliding-window
    layers too, where the plan has a rope for them)."""
    problems: list[str] = []
    with open_written(path) as g:
        # TensorInfo.shape is GGUF order (ne0 first), TensorJob.shape numpy order (rows first)
        got = [(t.name, tuple(reversed(t.shape)), t.ggml_type) for t in g.tensors]
        want = [(j.name, tuple(j.shape), j.qtype) for j in jobs]
        if got != want:
            diff = [f"{a} != {b}" for a, b in zip(got, want, strict=False) if a != b][:5]
            problems.append(f"tensors differ from the plan ({len(got)} written, {len(want)} planned): {diff}")
        if any(t.data_offset + j.nbytes > g.file_size for t, j in zip(g.tensors, jobs, strict=False)):
            problems.append(f"tensor data runs past the end of the file ({g.file_size} bytes)")
        problems += rope_plan_problems(g, plan)
        if rope is not None and not problems:
            problems += [p for p in [rope_function_problem(g, rope, n_rot=n_rot, plan=plan, n_ctx=n_ctx)] if p]
    if problems:
        raise OutputError("the written GGUF failed verification:\n    - " + "\n    - ".join(problems), where=str(path))


@dataclass(frozen=True)
class _RopeDecision:
    """The rope a conversion writes: the variant, the context, the GGUF plan and what to tell the user."""

    rope: RopeScaling
    context: int
    plan: gguf_plan.GGUFRopePlan
    words: str
    notes: tuple[str, ...]


def _decide_rope(
    cfg: ModelConfig, hf_dir: Path, *, arch: str, bake_dynamic: int | None, allow_runtime_rope: bool
) -> _RopeDecision:
    """The checkpoint's rope as llama.cpp will compute it, or a refusal of what the GGUF cannot carry."""
    rope, notes = cfg.rope, []
    words = describe(rope)
    context = extended_context(cfg, rope)
    if bake_dynamic is not None:
        if not isinstance(rope, DynamicNtk):
            raise ConfigError(
                f"--bake-dynamic applies to dynamic NTK rope scaling only; this model uses {rope.name}",
                where=str(hf_dir / "config.json"),
                fix="drop --bake-dynamic",
            )
        if bake_dynamic <= 0:
            raise ConfigError(f"--bake-dynamic must be a positive token count, got {bake_dynamic}")
        rope = gguf_plan.bake_dynamic(rope, seq_len=bake_dynamic, dim=cfg.head_dim)
        context = bake_dynamic
        words += f", baked at {bake_dynamic} tokens (theta {rope.theta:.6g})"
        notes.append(
            f"dynamic NTK was frozen at {bake_dynamic} tokens: llama.cpp matches Hugging Face only for forwards of "
            f"exactly {bake_dynamic} positions"
        )
    try:
        plan = gguf_plan.plan_gguf_rope(
            rope,
            arch=arch,
            head_dim=cfg.rotary_dim,
            context_length=context,
            finetuned=cfg.rope_finetuned,
            allow_runtime_rope=allow_runtime_rope,
            sliding_rope=_sliding_rope(cfg),
        )
    except EdgeropeError as exc:
        exc.where = exc.where or str(hf_dir / "config.json")
        raise
    if cfg.rope_local is not None:
        words += f"; sliding-window layers: {describe(cfg.rope_local)}"
    return _RopeDecision(rope, context, plan, words, tuple(notes) + tuple(plan.notes))


def _sliding_rope(cfg: ModelConfig) -> RopeScaling | None:
    """The sliding-window layers' own rope, where the family has one and some layer slides (Gemma 3)."""
    if cfg.rope_local is None or not any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)):
        return None
    return cfg.rope_local


def convert(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "f16",
    force: bool = False,
    bake_dynamic: int | None = None,
    allow_runtime_rope: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertReport:
    """Convert the HF checkpoint folder ``hf_dir`` to the GGUF file ``out_path``.

    ``outtype`` is one of f32, f16, bf16, q8_0 (1-D tensors and rope factors
    stay F32).  ``bake_dynamic=N`` freezes a dynamic-NTK model at N tokens
    (exact only for prompts of N tokens); ``allow_runtime_rope`` accepts rope
    settings llama.cpp can only get as runtime parameters (listed in the
    report).  ``progress(done_bytes, total_bytes)`` is called per tensor.
    Raises an ``EdgeropeError`` subclass on bad input; never leaves a partial file.
    """
    t0 = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown outtype {outtype!r}", fix=f"use one of {', '.join(OUTTYPES)}")
    check_input_files(hf_dir)  # a FIFO or device as config/tokenizer/weights would block or read forever
    cfg = ModelConfig.load(hf_dir)
    arch = cfg.gguf_arch
    rd = _decide_rope(cfg, hf_dir, arch=arch, bake_dynamic=bake_dynamic, allow_runtime_rope=allow_runtime_rope)
    notes: list[str] = []
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        emb = ckpt.entries.get("model.embed_tokens.weight")
        n_rows = emb.shape[0] if emb is not None and len(emb.shape) == 2 else cfg.vocab_size
        vocab = load_vocab(hf_dir, n_embd_rows=n_rows)
        notes += families.check_carriable(
            cfg,
            context=rd.context,
            model_name=model_name(cfg, hf_dir),
            tokens=vocab.tokens,
            where=str(hf_dir / "config.json"),
        )
        jobs = plan_tensors(cfg, ckpt, arch=arch, outtype=outtype, notes=notes)
        notes += vocab.notes
        jobs = [TensorJob(name, arr.shape, QT.F32, array=arr) for name, arr in rd.plan.tensors.items()] + jobs
        est = sum(j.nbytes for j in jobs) + 64 * len(vocab) + (1 << 20)
        inputs = [*ckpt.files, *(p for p in hf_dir.iterdir() if p.is_file())]
        check_output(out, force=force, inputs=inputs, need_bytes=est, input_fix="write the GGUF elsewhere")

        def add_kv(w: gguf.GGUFWriter) -> None:
            _add_metadata(w, cfg, hf_dir, outtype=outtype, n_vocab=len(vocab), context=rd.context)
            for k, (value, vtype) in rd.plan.kv.items():
                w.add_key_value(k, value, vtype)
            vocab.write(w)

        with atomic_output(out) as tmp:
            try:
                write_gguf(tmp, arch, jobs, add_kv=add_kv, progress=progress)
            except OSError as exc:
                raise _output_error(exc, out) from None
            verify_gguf(tmp, jobs, rd.plan, rope=rd.rope, n_rot=cfg.rotary_dim, n_ctx=rd.context)
    return ConvertReport(
        path=out,
        arch=arch,
        outtype=outtype,
        n_tensors=len(jobs),
        bytes=out.stat().st_size,
        context_length=rd.context,
        rope=rd.words,
        rope_notes=rd.notes,
        runtime=dict(rd.plan.runtime),
        tokenizer=vocab.kind if vocab.kind == "sentencepiece" else f"{vocab.kind} ({vocab.pre})",
        n_vocab=len(vocab),
        notes=tuple(notes),
        seconds=time.perf_counter() - t0,
    )


__all__ = [
    "ConvertReport",
    "EdgeropeError",
    "OUTTYPES",
    "convert",
    "extended_context",
    "neox_to_norm_rows",
    "verify_gguf",
]
