"""Long-context fine-tuning of a Llama-family checkpoint with a scaled rope (full length or PoSE).

What it does:

* builds the scaled rope (YaRN, linear, NTK-aware; ``edgerope.train.recipe``) from the checkpoint's original
  context with ``edgerope.rope.scaling`` and refuses inconsistent requests (target <= original, factor !=
  target / original, unknown type, an already scaled checkpoint unless ``rescale``); or, ``rope="keep"``,
  trains at the checkpoint's own rope (LongRoPE, llama3, ...) as its config.json declares it;
* tokenizes and packs the data with the checkpoint's tokenizer
  (``edgerope.train.data``), holds out whole documents or, for one long file,
  chunks of it for an evaluation loss; interleaves retrieval rows built from
  the training text (``retrieval_mix``, ``edgerope.train.mix``: passkey,
  multi-key, document Q&A and recall samples);
* estimates the memory a step needs before starting and refuses, with a
  suggestion (LoRA among them when it would fit), a run that would not fit;
* trains every weight, or LoRA adapters on the projections (``lora``,
  ``edgerope.train.lora``, with peft);
* trains (the loop: ``edgerope.train.loop``) with AdamW (0.9, 0.95), no weight decay, linear warmup then cosine
  or linear decay (YaRN's recipe, the learning rate scaled to the model
  size), gradient accumulation, gradient checkpointing, bf16 autocast where
  the device has it; full length (rows of the target length) or PoSE (rows of
  the original window whose position ids jump so that distances up to the
  target are seen);
* saves atomic, resumable checkpoints (``edgerope.train.checkpoint``); a resume
  continues bit-exactly and is refused when the settings differ;
* runs data-parallel under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA):
  each rank takes its slice of every micro-batch, so the global batch is
  batch_size x grad_accum x world_size and the loss curve is the
  single-process one; only rank 0 writes;
* writes an HF checkpoint whose config carries the new rope and
  ``rope_finetuned``, so ``edgerope convert`` needs no rope flags (LoRA: an
  adapter folder, ``edgerope.train.output``), and with ``gguf`` the GGUF beside
  it, ready for ``edgerope ask``.

What it does not do: FSDP / sharded models (every rank holds the whole model;
not implemented), chat templates, dropout, streaming data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgerope.errors import ConfigError, OutputError, TrainingError
from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel
from edgerope.rope import KEEP
from edgerope.rope.scaling import RopeScaling, describe
from edgerope.system.device import pick_device
from edgerope.train.checkpoint import (
    DistContext,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    set_rng_state,
    settings_diff,
)
from edgerope.train.data import build_dataset, load_tokenizer
from edgerope.train.loop import FinetuneProgress, LoopSettings, Trainer, train, training_stream
from edgerope.train.lora import ADAPTER_CONFIG, LoraSettings, add_lora, load_adapter_state, lora_params, read_adapter
from edgerope.train.mix import DEFAULT_RETRIEVAL_MIX, RetrievalMix, check_row_length
from edgerope.train.output import AdapterSaver, check_gguf_outtype, write_gguf, write_output
from edgerope.train.recipe import (
    SCHEDULES,
    autocast_dtype,
    available_memory,
    default_lr,
    estimate_memory,
    kept_rope,
    lr_multiplier,
    memory_in_use,
    original_context_of,
    peak_memory,
    scaled_rope,
)

__all__ = ["FinetuneProgress", "FinetuneReport", "finetune"]

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class FinetuneReport:
    """What a run did: per-step losses, held-out losses, speed and memory, where the model went."""

    output_dir: str
    rope: str
    original_context: int
    target_context: int
    pose: bool
    seq_len: int
    steps: int
    losses: list[float]
    heldout_losses: list[tuple[int, float]]
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_memory_bytes: int  # CUDA: max allocated during training; CPU: the process's peak RSS
    memory_before_training_bytes: int  # in use when the training loop started (CPU: RSS incl. torch, data)
    memory_estimate_bytes: int
    device: str
    precision: str
    world_size: int
    resumed_from_step: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # files, tokens, held-out split, retrieval rows by kind
    lora: dict[str, Any] | None = None  # rank, alpha, targets, trainable parameters (None: every weight trained)
    trainable_params: int = 0
    gguf: dict[str, Any] | None = None  # the GGUF written with ``gguf=`` (path, outtype, bytes, rope)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- training


def finetune(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    rope: str = "yarn",
    factor: float | None = None,
    target_context: int | None = None,
    data: Sequence[str | Path],
    text_field: str = "text",
    retrieval_mix: float | RetrievalMix = DEFAULT_RETRIEVAL_MIX,
    pose: bool = False,
    pose_chunks: int = 2,
    whole_documents: bool = False,
    lora: LoraSettings | None = None,
    steps: int = 100,
    batch_size: int = 1,
    grad_accum: int = 1,
    lr: float | None = None,
    schedule: str = "cosine",
    warmup: int | None = None,
    seq_len: int | None = None,
    grad_checkpointing: bool = False,
    precision: str = "auto",
    holdout: float = 0.05,
    save_every: int | None = None,
    eval_every: int | None = None,
    resume: bool = False,
    force: bool = False,
    rescale: bool = False,
    seed: int = 0,
    device: str = "auto",
    memory_limit: int | None = None,
    gguf: str | None = None,
    progress: Callable[[FinetuneProgress], None] | None = None,
) -> FinetuneReport:
    """Fine-tune the HF checkpoint ``checkpoint_dir`` at a scaled rope; write the result to ``out_dir``.

    ``rope="keep"`` trains at the checkpoint's own rope (no factor, target or rescale; the output keeps it).
    ``seq_len`` defaults to the target context (full; "keep": the checkpoint's, at most 32768) or the original (PoSE).
    ``retrieval_mix`` is the share of training rows that are retrieval samples built from the training text
    (``edgerope.train.mix``; 0: the text alone), or a ``RetrievalMix`` (kinds, loss) for finer control.  ``lora`` trains adapters instead of every weight (the output
    is an adapter folder).  ``warmup`` defaults to min(20, steps // 10).  ``memory_limit`` (bytes) replaces the
    free memory the estimate is checked against.  ``resume`` continues from the newest checkpoint in
    ``out_dir`` with the same settings.  ``gguf`` (an outtype of ``edgerope convert``: f16, q8_0, Q4_K_M, ...)
    also writes ``out_dir/model.<gguf>.gguf`` with the fine-tuned rope.  Under ``torchrun`` the run is
    data-parallel (see the module docstring).  Raises an ``EdgeropeError`` subclass on bad input, before any
    training.
    """
    src, out = Path(checkpoint_dir), Path(out_dir)
    dist = DistContext.from_env()
    dev = _training_device(device, dist)
    amp = autocast_dtype(precision, dev)
    _check_counts(schedule, steps=steps, batch_size=batch_size, grad_accum=grad_accum)
    mix = retrieval_mix if isinstance(retrieval_mix, RetrievalMix) else RetrievalMix(retrieval_mix)
    if gguf is not None:
        gguf = check_gguf_outtype(gguf)
    plan = _plan_rope(
        src, rope, factor=factor, target_context=target_context, rescale=rescale, pose=pose, seq_len=seq_len
    )
    if mix.fraction > 0:
        check_row_length(plan.seq_len + 1)
    warmup = min(20, steps // 10) if warmup is None else warmup
    run = LoopSettings(
        dev=dev, amp=amp, dist=dist, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        seq_len=plan.seq_len, target=plan.target, pose=pose, pose_chunks=pose_chunks,
        whole_documents=whole_documents, seed=seed, eval_every=eval_every, save_every=save_every,
    )  # fmt: skip
    need = _check_memory(plan, run, grad_checkpointing=grad_checkpointing, memory_limit=memory_limit, lora=lora)
    settings = _settings(
        src, data, plan, run, lr=lr, schedule=schedule, warmup=warmup, precision=precision, holdout=holdout,
        mix=mix, lora=lora, text_field=text_field,
    )  # fmt: skip
    _check_out_dir(out, resume=resume, force=force)

    packed = build_dataset(
        data, src, seq_len=plan.seq_len + 1, holdout=holdout, seed=seed, whole=whole_documents, text_field=text_field
    )
    batches, data_summary = training_stream(load_tokenizer(src), packed, run, mix)
    trainer = _build_trainer(
        src, plan, run, lr=lr, schedule=schedule, warmup=warmup, grad_checkpointing=grad_checkpointing, lora=lora
    )
    resumed_from = _resume(out, settings, trainer, lora=lora) if resume else None
    dist.init(dev)
    trainer.train_model = _wrap_ddp(trainer.model, dist, dev)
    tok_files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    saver = AdapterSaver(trainer.model, lora, base=src, config=plan.new_cfg) if lora else trainer.model

    mem_before = memory_in_use(dev)
    seconds, tokens_run = train(
        run, trainer, batches, packed.heldout, out=out, settings=settings, tokenizer_files=tok_files,
        progress=progress, resumed_from=resumed_from, saver=saver,
    )  # fmt: skip
    gguf_info = None
    if dist.is_main:
        write_output(out, trainer.model, tok_files, plan.cfg.torch_dtype, lora=lora, base=src, config=plan.new_cfg)
        if gguf is not None:
            gguf_info = write_gguf(out, gguf, lora=lora is not None)
    dist.barrier()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return _report(
        out, plan, run, trainer.state, seconds=seconds, tokens_run=tokens_run, mem_before=mem_before,
        need=need, resumed_from=resumed_from, settings=settings, data=data_summary, trainable=trainable,
        lora={**lora.to_dict(), "trainable_params": trainable} if lora else None, gguf=gguf_info,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- checks


def _training_device(device: str, dist: DistContext) -> torch.device:
    """The device to train on; under ``torchrun`` on CUDA, this process's own GPU (made current)."""
    dev = pick_device(device)
    if dev.type == "cuda" and dist.enabled:
        if dist.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {dist.local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} here)",
                where="torchrun --nproc-per-node",
                fix=f"use --nproc-per-node <= {torch.cuda.device_count()}, or --device cpu",
            )
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    return dev


def _check_counts(schedule: str, *, steps: int, batch_size: int, grad_accum: int) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}", fix=f"use one of {', '.join(SCHEDULES)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class _RopePlan:
    """The checkpoint's config, the scaled rope the run trains at, and the config the output carries."""

    cfg: ModelConfig
    variant: RopeScaling
    new_cfg: ModelConfig
    original: int
    target: int
    seq_len: int


def _plan_rope(
    src: Path,
    rope: str,
    *,
    factor: float | None,
    target_context: int | None,
    rescale: bool,
    pose: bool,
    seq_len: int | None,
) -> _RopePlan:
    """The scaled (or "keep": its own) rope for the checkpoint in ``src`` and the row length; refuses bad requests."""
    cfg = ModelConfig.load(src)
    if rope == KEEP:
        variant, original, target, full_len = kept_rope(cfg, factor=factor, target=target_context, rescale=rescale)
        new_cfg = cfg.replace(rope_finetuned=True)
    else:
        original = original_context_of(cfg, rescale=rescale, where=str(src / "config.json"))
        variant, target = scaled_rope(
            rope, theta=cfg.rope.theta, head_dim=cfg.head_dim, original=original, factor=factor, target=target_context
        )
        new_cfg, full_len = cfg.replace(rope=variant, max_position_embeddings=target, rope_finetuned=True), target
    seq_len = seq_len or (original if pose else full_len)
    if seq_len > target:
        raise ConfigError(f"seq_len {seq_len} exceeds the target context {target}", fix=f"use seq_len <= {target}")
    if pose and seq_len >= target:
        raise ConfigError("PoSE trains inside a window shorter than the target", fix=f"seq_len < {target}")
    return _RopePlan(cfg, variant, new_cfg, original, target, seq_len)


def _check_memory(
    plan: _RopePlan, run: LoopSettings, *, grad_checkpointing: bool, memory_limit: int | None, lora: LoraSettings | None
) -> int:
    """The bytes a step needs (estimated); refuses, with what to try, a run that would not fit."""

    def need_for(lora: LoraSettings | None, *, ckpt: bool = grad_checkpointing) -> int:
        extra = {"lora_params": lora_params(plan.new_cfg, lora), "lora_rank": lora.rank} if lora else {}
        return estimate_memory(
            plan.new_cfg, batch_size=run.batch_size, seq_len=plan.seq_len, grad_checkpointing=ckpt, **extra
        )

    need = need_for(lora)
    have = memory_limit if memory_limit is not None else available_memory(run.dev)
    if need > have:
        hints = []
        if lora is None:
            with_lora = need_for(LoraSettings())
            if with_lora <= have:
                hints.append(f"LoRA (--lora: about {with_lora / 2**20:.1f} MiB, the base weights frozen)")
        if not run.pose and plan.original < plan.target:
            hints.append(f"PoSE (--pose trains at seq_len {plan.original} and reaches {plan.target})")
        if run.batch_size > 1:
            hints.append("a smaller --batch-size with more --grad-accum")
        if not grad_checkpointing:
            hints.append(f"--grad-checkpointing (about {need_for(lora, ckpt=True) / 2**20:.1f} MiB)")
        hints.append("a shorter --seq-len")
        raise TrainingError(
            f"the run needs about {need / 2**20:.1f} MiB, {have / 2**20:.1f} MiB is available",
            where=f"batch {run.batch_size} x seq_len {plan.seq_len} on {run.dev}"
            + (f", LoRA rank {lora.rank}" if lora else ", every weight trained"),
            fix="try " + ", or ".join(hints),
        )
    return need


def _settings(
    src: Path,
    data: Sequence[str | Path],
    plan: _RopePlan,
    run: LoopSettings,
    *,
    lr: float | None,
    schedule: str,
    warmup: int,
    precision: str,
    holdout: float,
    mix: RetrievalMix,
    lora: LoraSettings | None,
    text_field: str,
) -> dict[str, Any]:
    """The settings that decide the result: a resume must match them all."""
    return {
        "text_field": text_field,
        "retrieval_mix": mix.to_dict(),
        "lora": lora.to_dict() if lora else None,
        "checkpoint": str(src.resolve()),
        "data": [str(Path(p).resolve()) for p in data],
        "rope": describe(plan.variant),
        "target_context": plan.target,
        "pose": run.pose,
        "pose_chunks": run.pose_chunks,
        "whole_documents": run.whole_documents,
        "steps": run.steps,
        "global_batch": run.batch_size * run.grad_accum * run.dist.world_size,
        "seq_len": plan.seq_len,
        "lr": lr,
        "schedule": schedule,
        "warmup": warmup,
        "precision": precision,
        "holdout": holdout,
        "seed": run.seed,
    }


def _check_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError("the output path is a file, not a folder", where=str(out), fix="name a folder")
    if resume:
        return
    if ((out / "config.json").exists() or (out / ADAPTER_CONFIG).exists()) and not force:
        raise OutputError(
            "a fine-tuned checkpoint already exists here", where=str(out), fix="pass --force or a new folder"
        )
    if latest_checkpoint(out) is not None and not force:
        raise OutputError(
            "the output folder holds training checkpoints of another run",
            where=str(out),
            fix="pass --resume to continue it, --force to start over, or a new folder",
        )


# ---------------------------------------------------------------------------------------------------- setup


def _build_trainer(
    src: Path,
    plan: _RopePlan,
    run: LoopSettings,
    *,
    lr: float | None,
    schedule: str,
    warmup: int,
    grad_checkpointing: bool,
    lora: LoraSettings | None,
) -> Trainer:
    """The checkpoint's model at the scaled rope on the run's device (LoRA adapters added), AdamW over what is
    trained, the lr schedule, a fresh state."""
    torch.manual_seed(run.seed)
    model = LlamaModel.from_pretrained(src, dtype=torch.float32)
    model.set_config(plan.new_cfg)
    if lora is not None:
        add_lora(model, lora)
    model.gradient_checkpointing = grad_checkpointing
    model.to(run.dev)
    peak_lr = lr if lr is not None else default_lr(plan.cfg.n_params, lora=lora is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps=run.steps, warmup=warmup, schedule=schedule)
    )
    return Trainer(model, model, opt, sched, TrainerState(0, 0, [], [], 0, 0.0, {}, {}, {}))


def _resume(out: Path, settings: dict[str, Any], t: Trainer, *, lora: LoraSettings | None) -> int:
    """Load the newest checkpoint in ``out`` into ``t`` (weights or adapter, optimizer, schedule, RNG, state);
    its step.  Refuses when there is none or when its settings differ from ``settings``.
    """
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise TrainingError(
            "nothing to resume: no checkpoint in the output folder",
            where=str(out),
            fix="run without --resume to start fresh",
        )
    state, saved = load_checkpoint(ckpt)
    diff = settings_diff(saved, settings)
    if diff:
        raise TrainingError(
            "the resume would change the run's settings:\n    - " + "\n    - ".join(diff),
            where=str(ckpt),
            fix="resume with the same settings, or start a new run in another folder",
        )
    if lora is not None:
        load_adapter_state(t.model, read_adapter(ckpt), where=str(ckpt))
    else:
        t.model.load_state_dict(LlamaModel.from_pretrained(ckpt, dtype=torch.float32).state_dict())
    t.opt.load_state_dict(state.optimizer)
    t.sched.load_state_dict(state.scheduler)
    set_rng_state(state.rng)
    t.state = state
    return state.step


def _wrap_ddp(model: LlamaModel, dist: DistContext, dev: torch.device) -> torch.nn.Module:
    """What the forward pass goes through: the model, or under ``torchrun`` its DDP wrapper."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _report(
    out: Path,
    plan: _RopePlan,
    run: LoopSettings,
    state: TrainerState,
    *,
    seconds: float,
    tokens_run: int,
    mem_before: int,
    need: int,
    resumed_from: int | None,
    settings: dict[str, Any],
    data: dict[str, Any],
    trainable: int,
    lora: dict[str, Any] | None,
    gguf: dict[str, Any] | None,
) -> FinetuneReport:
    return FinetuneReport(
        output_dir=str(out),
        rope=describe(plan.variant),
        original_context=plan.original,
        target_context=plan.target,
        pose=run.pose,
        seq_len=plan.seq_len,
        steps=run.steps,
        losses=list(state.losses),
        heldout_losses=[(int(s), float(v)) for s, v in state.heldout],
        tokens=state.tokens,
        seconds=seconds,
        tokens_per_s=tokens_run / max(seconds, 1e-9),
        peak_memory_bytes=peak_memory(run.dev),
        memory_before_training_bytes=mem_before,
        memory_estimate_bytes=need,
        device=str(run.dev),
        precision="bf16" if run.amp is not None else "fp32",
        world_size=run.dist.world_size,
        resumed_from_step=resumed_from,
        settings=settings,
        data=data,
        lora=lora,
        trainable_params=trainable,
        gguf=gguf,
    )
