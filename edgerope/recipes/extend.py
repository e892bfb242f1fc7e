"""The context-extension experiment: every way to stretch a model's context, converted to GGUF, measured in llama.cpp.

What it does, from one base checkpoint (by default the built-in tiny model, trained at context 256):

* makes each ``Variant``: the base as is (no scaling: positions past the trained context are extrapolated),
  rope scaling without training (``edgerope set-rope`` on the base GGUF: linear, YaRN, NTK), and rope scaling
  plus a fine-tune (``edgerope finetune`` at the target length, or PoSE inside the original window), each
  fine-tune run as its own ``python -m edgerope finetune`` process so that its peak memory is its own;
* converts every checkpoint to a GGUF (Q8_0 weights by default) with ``edgerope.convert.export.convert``;
* fine-tunes on one of three data recipes (``DATA``): ``jsonl``, a JSONL file of documentation spans and
  retrieval samples in EVAL.md's templates (``edgerope.train.synthetic.write_jsonl``; the demo's); ``text``,
  the documentation as one plain-text file with finetune's default retrieval mix (the command README
  documents for a user's own text); ``text-only``, the same file with ``--retrieval-mix 0``; every weight, or
  LoRA adapters (``Variant.lora``, merged when converted);
* evaluates each GGUF in llama.cpp (``edgerope.runtime.runtime``; q8_0 KV cache by default): passkey accuracy per
  length x depth (a prompt "at length L" leaves room for the answer inside L) in EVAL.md's format and, with
  ``Settings.independent``, in a format no training data holds (``extend_eval.independent_passkey_grid``),
  multi-key accuracy, and the
  perplexity of the same held-out documentation tokens (the first max(ppl_lengths) of each document) read
  through a context window of each length (sliding, stride half the window; the longest is one pass: EVAL.md's
  signature of success is that more context lowers it), all through ``edgerope.evaluation.protocols``
  (the measurements: ``edgerope.recipes.extend_eval``);
* optionally checks that PyTorch and llama.cpp give the same passkey answers for one fine-tuned variant.

``run_extension`` returns an ``ExtensionReport`` (JSON-able) that the demo and ``bench/quality`` print and plot.

What it does not do: pretrain (``edgerope.recipes.pretrain``), print, or choose hyper-parameters beyond ``Settings``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgerope.errors import ConfigError, TrainingError
from edgerope.recipes.extend_eval import evaluate_gguf, passkey_agreement
from edgerope.rope import SCALING_CHOICES
from edgerope.train.synthetic import write_jsonl

TUNES = (None, "full", "pose")
CHARS_PER_TOKEN = 3.0  # rough size of the tiny tokenizer's tokens, only to size the fine-tuning samples
DATA = {  # data recipe -> what it is, in words (reports say which data each number used)
    "jsonl": "synthetic JSONL: documentation spans + passkey/multi-key/Q&A samples in EVAL.md's templates",
    "text": "the documentation as one .txt file, finetune's default retrieval mix (README's command)",
    "text-only": "the documentation as one .txt file, --retrieval-mix 0 (the text alone)",
}
TEXT_FILE = "pydoc_topics.txt"  # the plain-text file of the text recipes, in the work folder


@dataclass(frozen=True)
class Variant:
    """One way to reach ``factor`` x the base context: a rope type, and no, full-length or PoSE fine-tuning."""

    name: str
    rope: str = "none"
    factor: float = 1.0
    tune: str | None = None
    data: str = "jsonl"  # a key of DATA (fine-tuned variants)
    lora: bool = False  # LoRA adapters (finetune --lora) instead of every weight

    def __post_init__(self) -> None:
        if self.data not in DATA:
            raise ConfigError(f"unknown data recipe {self.data!r}", fix=f"use one of {', '.join(DATA)}")
        if self.lora and self.tune is None:
            raise ConfigError(f"{self.name}: LoRA needs a fine-tune")
        if self.rope not in SCALING_CHOICES:
            raise ConfigError(f"unknown rope type {self.rope!r}", fix=f"use one of {', '.join(SCALING_CHOICES)}")
        if self.tune not in TUNES:
            raise ConfigError(f"unknown fine-tune {self.tune!r}", fix="use None, 'full' or 'pose'")
        if self.rope == "none" and (self.tune or self.factor != 1.0):
            raise ConfigError(f"{self.name}: no scaling means factor 1 and no fine-tune")
        if self.rope != "none" and self.factor <= 1.0:
            raise ConfigError(f"{self.name}: a scaled rope needs a factor > 1, got {self.factor}")


def demo_variants(factor: int = 8) -> tuple[Variant, ...]:
    """The story in five rows: no scaling, linear, YaRN, YaRN + fine-tune, YaRN + PoSE fine-tune."""
    return (
        Variant("no scaling", "none"),
        Variant(f"linear x{factor}", "linear", factor),
        Variant(f"yarn x{factor}", "yarn", factor),
        Variant(f"yarn x{factor} + fine-tune", "yarn", factor, "full"),
        Variant(f"yarn x{factor} + PoSE", "yarn", factor, "pose"),
    )


@dataclass(frozen=True)
class Settings:
    """What is trained and measured.  Lengths are in tokens; ``trials`` is per (length, depth) cell."""

    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 4
    multikey_trials: int = 0  # per length; 0 skips multi-key
    ppl_lengths: tuple[int, ...] = (256, 2048)
    weights: str = "q8_0"
    kv: str = "q8_0"
    ft_steps: int = 300
    ft_batch: int = 1
    # PoSE: 2 x 256 tokens a step (accumulated, so activations of one 256-token row).  pose_steps None: as many
    # training tokens as the full fine-tune to the same target (x8: 1200 steps, x16: 2400); in tuning runs outside
    # bench/ the previous tiny model's (4 heads of 32) x8 PoSE reached 78% passkey at 2048 with half as many, 98%
    # with as many
    pose_steps: int | None = None
    pose_batch: int = 1
    pose_chunks: int = 2  # finetune --pose-chunks: pieces of the window, each after its own position skip
    pose_grad_accum: int = 2
    whole_documents: bool = False  # finetune --whole-documents: no retrieval sample cut at a row boundary
    min_fraction: int = 32  # full fine-tune samples are 1/32 .. 1 of the target: short distances stay trained
    lr: float = 1e-3
    lora_lr: float | None = None  # None: finetune's LoRA default
    text_steps: int | None = None  # full fine-tunes on the text recipes: None = ft_steps
    seed: int = 0
    eval_seed: int = 1234
    n_threads: int | None = None
    independent: bool = False  # also the passkey grid in the independent format (extend_eval)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 64:
            raise ConfigError(f"lengths must be >= 64 tokens, got {self.lengths}")
        if self.trials < 1 or self.ft_steps < 1 or (self.pose_steps is not None and self.pose_steps < 1):
            raise ConfigError("trials and fine-tuning steps must be >= 1")

    def pose_steps_for(self, target: int, window: int) -> int:
        """PoSE steps to ``target`` in a ``window``-token window: ``pose_steps``, or the full run's token count."""
        if self.pose_steps is not None:
            return self.pose_steps
        return math.ceil(self.ft_steps * self.ft_batch * target / (self.pose_batch * self.pose_grad_accum * window))


@dataclass
class VariantResult:
    """One variant's files and measurements (grids as ``GridResult.to_dict``, perplexity per length)."""

    name: str
    rope: str
    factor: float
    tune: str | None
    gguf: str
    gguf_bytes: int
    context_length: int
    passkey: dict[str, Any]
    passkey_by_length: dict[int, float]
    multikey_by_length: dict[int, float] = field(default_factory=dict)
    perplexity: dict[int, float] = field(default_factory=dict)
    perplexity_detail: dict[int, dict[str, Any]] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None
    seconds: float = 0.0
    data: str | None = None  # the data recipe, in words (None: no training)
    independent: dict[str, Any] = field(default_factory=dict)  # grid in the independent format
    independent_by_length: dict[int, float] = field(default_factory=dict)

    @property
    def passkey_accuracy(self) -> float:
        return float(self.passkey.get("accuracy", 0.0))


@dataclass
class ExtensionReport:
    base: str
    original_context: int
    settings: dict[str, Any]
    results: list[VariantResult]
    agreement: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result(self, name: str) -> VariantResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)


StepFn = Callable[[str], None]


def _noop(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------- models


def _finetune_command(
    base: Path, out: Path, data: Path, variant: Variant, s: Settings, target: int, original: int
) -> list[str]:
    """The ``python -m edgerope finetune`` command line of a variant."""
    pose = variant.tune == "pose"
    steps = s.pose_steps_for(target, original) if pose else s.ft_steps
    if variant.data != "jsonl" and not pose and s.text_steps:
        steps = s.text_steps
    cmd = [
        sys.executable, "-m", "edgerope", "finetune", str(base), "--data", str(data), "-o", str(out),
        "--rope", variant.rope, "--target-context", str(target), "--steps", str(steps),
        "--batch-size", str(s.pose_batch if pose else s.ft_batch),
        "--grad-accum", str(s.pose_grad_accum if pose else 1),
        "--seed", str(s.seed), "--device", "cpu", "--force", "--json",
    ]  # fmt: skip
    if variant.lora:
        cmd += ["--lora"] + (["--lr", str(s.lora_lr)] if s.lora_lr else [])
    else:
        cmd += ["--lr", str(s.lr)]
    if variant.data == "jsonl":  # the demo's recipe, as it was: many documents, its own retrieval samples
        cmd += ["--holdout", "0.02", "--retrieval-mix", "0"]
    elif variant.data == "text-only":
        cmd += ["--retrieval-mix", "0"]
    if pose:
        cmd += ["--pose", "--pose-chunks", str(s.pose_chunks)]
    if s.whole_documents:
        cmd.append("--whole-documents")
    return cmd


def _finetune_process(
    base: Path, out: Path, data: Path, variant: Variant, s: Settings, target: int, original: int
) -> dict[str, Any]:
    """``python -m edgerope finetune ... --json`` in its own process; its report (peak memory is that run's)."""
    cmd = _finetune_command(base, out, data, variant, s, target, original)
    env = dict(os.environ)
    if s.n_threads:
        env["OMP_NUM_THREADS"] = str(s.n_threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise TrainingError(
            f"fine-tuning {variant.name} failed (exit {proc.returncode})",
            where=" ".join(cmd[:6]) + " ...",
            fix="see its message: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:400],
        )
    report = json.loads(proc.stdout)
    keep = ("steps", "seq_len", "tokens", "seconds", "tokens_per_s", "peak_memory_bytes",
            "memory_before_training_bytes", "precision", "pose", "heldout_losses", "data", "lora",
            "trainable_params")  # fmt: skip
    out_report = {k: report[k] for k in keep}
    out_report["final_loss"] = float(sum(report["losses"][-10:]) / len(report["losses"][-10:]))
    out_report["training_memory_bytes"] = report["peak_memory_bytes"] - report["memory_before_training_bytes"]
    out_report["command"] = ["edgerope", *cmd[3:]]
    return out_report


def target_context(original: int, factor: float) -> int:
    """The context a variant extends ``original`` to (one rounding everywhere)."""
    return int(round(original * factor))


def _gguf_for(
    variant: Variant, *, base: Path, base_gguf: Path, work: Path, s: Settings, data: dict[str, Path], step: StepFn
) -> tuple[Path, dict[str, Any] | None]:
    from edgerope.convert.export import convert
    from edgerope.gguf.set_rope import set_rope
    from edgerope.models.config import ModelConfig

    original = ModelConfig.load(base).max_position_embeddings
    target = target_context(original, variant.factor)
    slug = variant.name.replace(" ", "_").replace("+", "").replace("__", "_")
    if variant.rope == "none":
        return base_gguf, None
    if variant.tune is None:
        out = work / f"{slug}.gguf"
        step(f"{variant.name}: edgerope set-rope --type {variant.rope} --factor {variant.factor:g} (no training)")
        set_rope(base_gguf, out, rope_type=variant.rope, factor=variant.factor, force=True)
        return out, None
    ckpt = work / slug
    kind = f"PoSE inside the {original} window" if variant.tune == "pose" else f"full length, {target} tokens"
    step(f"{variant.name}: edgerope finetune --rope {variant.rope} ({kind})")
    ft = _finetune_process(base, ckpt, data[_data_key(variant)], variant, s, target, original)
    out = work / f"{slug}.gguf"
    if variant.lora:
        from edgerope.convert.lora import convert_merged

        convert_merged(ckpt, out, outtype=s.weights, force=True)
    else:
        convert(ckpt, out, outtype=s.weights, force=True)
    return out, {**ft, "checkpoint": str(ckpt)}


def _data_key(v: Variant) -> str:
    """Which data file a fine-tuned variant reads: the demo's JSONL (per tune kind) or the one text file."""
    return str(v.tune) if v.data == "jsonl" else "text"


def _write_data(work: Path, base: Path, s: Settings, variants: Sequence[Variant]) -> dict[str, Path]:
    """Fine-tuning data (JSONL): samples up to the target length (full) and up to the window (PoSE)."""
    from edgerope.models.config import ModelConfig

    original = ModelConfig.load(base).max_position_embeddings
    out: dict[str, Path] = {}
    if any(v.tune is not None and v.data != "jsonl" for v in variants):
        from edgerope.train.synthetic import corpus_text

        out["text"] = work / TEXT_FILE  # what a user has: one plain-text file (never the held-out topics)
        out["text"].write_text(corpus_text(), encoding="utf-8")
    for v in variants:
        if v.tune is None or v.data != "jsonl" or v.tune in out:
            continue
        if v.tune == "full":
            target = target_context(original, v.factor)
            n = max(64, math.ceil(s.ft_steps * s.ft_batch * 2.0))  # ~2 samples per row of `target` tokens
            out["full"] = write_jsonl(
                work / "finetune_full.jsonl", n_samples=n, max_chars=int(target * CHARS_PER_TOKEN), seed=s.seed + 1,
                min_fraction=s.min_fraction,
                force=True,
            )  # fmt: skip
        else:
            steps = max(
                s.pose_steps_for(target_context(original, x.factor), original) for x in variants if x.tune == "pose"
            )
            n = max(64, math.ceil(steps * s.pose_batch * s.pose_grad_accum * 2.0))
            out["pose"] = write_jsonl(
                work / "finetune_pose.jsonl", n_samples=n, max_chars=int(original * CHARS_PER_TOKEN), seed=s.seed + 2,
                force=True,
            )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- the run


def run_extension(
    base: str | Path,
    workdir: str | Path,
    *,
    variants: Sequence[Variant] | None = None,
    settings: Settings | None = None,
    agreement_for: str | None = None,
    agreement_lengths: Sequence[int] = (),
    on_step: StepFn | None = None,
) -> ExtensionReport:
    """Make, convert and evaluate every variant of the checkpoint ``base`` in ``workdir`` (created)."""
    from edgerope.convert.export import convert
    from edgerope.models.config import ModelConfig

    t0 = time.perf_counter()
    s = settings or Settings()
    variants = tuple(variants or demo_variants())
    step = on_step or _noop
    base, work = Path(base), Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    original = ModelConfig.load(base).max_position_embeddings
    _check_targets(variants, s, original)
    step(f"base model: {base} (trained context {original}); GGUFs with {s.weights} weights, KV cache {s.kv}")
    base_gguf = work / "base.gguf"
    convert(base, base_gguf, outtype=s.weights, force=True)
    data = _write_data(work, base, s, variants)
    results = [
        _variant_result(v, base=base, base_gguf=base_gguf, work=work, s=s, data=data, original=original, step=step)
        for v in variants
    ]
    report = ExtensionReport(str(base), original, {**asdict(s), "variants": [asdict(v) for v in variants]}, results)
    if agreement_for is not None:
        report.agreement = _agreement(report.result(agreement_for), work, s, agreement_lengths, step)
    report.seconds = time.perf_counter() - t0
    return report


def _check_targets(variants: Sequence[Variant], s: Settings, original: int) -> None:
    """A fine-tuned variant's target must reach the longest evaluated length."""
    for v in variants:
        longest = max(s.lengths)
        if v.rope != "none" and original * v.factor < longest and v.tune is not None:
            raise ConfigError(
                f"{v.name}: the target {original * v.factor:g} is shorter than the longest length {longest}"
            )


def _variant_result(
    v: Variant,
    *,
    base: Path,
    base_gguf: Path,
    work: Path,
    s: Settings,
    data: dict[str, Path],
    original: int,
    step: StepFn,
) -> VariantResult:
    """Make and convert variant ``v``, then measure its GGUF at every length (and at its target when longer)."""
    tv = time.perf_counter()
    gguf, ft = _gguf_for(v, base=base, base_gguf=base_gguf, work=work, s=s, data=data, step=step)
    target = target_context(original, v.factor)
    lengths = (*s.lengths, target) if target > max(s.lengths) else s.lengths  # x16: also at its target
    step(f"{v.name}: passkey {', '.join(map(str, lengths))} tokens in llama.cpp")
    ev = evaluate_gguf(gguf, s, lengths=lengths)
    return VariantResult(
        name=v.name,
        rope=v.rope,
        factor=v.factor,
        tune=v.tune,
        gguf=str(gguf),
        gguf_bytes=gguf.stat().st_size,
        context_length=ev["context_length"],
        passkey=ev["passkey"],
        passkey_by_length=ev["passkey_by_length"],
        multikey_by_length=ev.get("multikey_by_length", {}),
        perplexity=ev.get("perplexity", {}),
        perplexity_detail=ev.get("perplexity_detail", {}),
        finetune=ft,
        seconds=time.perf_counter() - tv,
        data=DATA[v.data] if v.tune else None,
        independent=ev.get("independent", {}),
        independent_by_length=ev.get("independent_by_length", {}),
    )


def _agreement(r: VariantResult, work: Path, s: Settings, lengths: Sequence[int], step: StepFn) -> dict[str, Any]:
    """PyTorch vs llama.cpp passkey answers of the fine-tuned variant ``r`` (its checkpoint converted to f32)."""
    from edgerope.convert.export import convert

    if not r.finetune:
        raise ConfigError(f"agreement needs a fine-tuned variant, {r.name!r} is not")
    step(f"{r.name}: PyTorch vs llama.cpp (f16 KV) passkey answers")
    f32 = work / "agreement.f32.gguf"
    convert(r.finetune["checkpoint"], f32, outtype="f32", force=True)
    return passkey_agreement(Path(r.finetune["checkpoint"]), f32, s, lengths=tuple(lengths) or s.lengths)
