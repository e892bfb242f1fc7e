"""Long-context fine-tuning of a Llama-family checkpoint with a scaled rope (full length or PoSE).

What it does:

* builds the scaled rope (YaRN, linear, NTK-aware; ``edgerope.train.recipe``) from the checkpoint's
  original context with ``edgerope.rope.scaling`` and refuses inconsistent requests
  (target <= original, factor != target / original, unknown type, an already
  scaled checkpoint unless ``rescale``);
* tokenizes and packs the data with the checkpoint's tokenizer
  (``edgerope.train.data``), holds out documents for an evaluation loss;
* estimates the memory a step needs before starting and refuses, with a
  suggestion, a run that would not fit;
* trains with AdamW (0.9, 0.95), no weight decay, linear warmup then cosine
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
  ``rope_finetuned``, so ``edgerope convert`` needs no rope flags.

What it does not do: FSDP / sharded models (every rank holds the whole model;
not implemented), LoRA, chat templates, dropout, streaming data.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerope.errors import ConfigError, OutputError, TrainingError
from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel, RotaryEmbedding
from edgerope.rope.scaling import describe
from edgerope.system.device import pick_device
from edgerope.train.checkpoint import (
    DistContext,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
    settings_diff,
)
from edgerope.train.checkpoint import rng_state as get_rng_state
from edgerope.train.data import PAD, PoseSampler, build_dataset, epoch_order
from edgerope.train.recipe import (
    SCHEDULES,
    autocast_dtype,
    available_memory,
    default_lr,
    estimate_memory,
    lr_multiplier,
    memory_in_use,
    original_context_of,
    peak_memory,
    scaled_rope,
)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EVAL_ROWS = 8  # held-out rows scored per evaluation


@dataclass(frozen=True)
class FinetuneProgress:
    """One optimizer step, as reported to the ``progress`` callback."""

    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float
    eta_s: float
    heldout_loss: float | None = None


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
    pose: bool = False,
    pose_chunks: int = 2,
    whole_documents: bool = False,
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
    progress: Callable[[FinetuneProgress], None] | None = None,
) -> FinetuneReport:
    """Fine-tune the HF checkpoint ``checkpoint_dir`` at a scaled rope; write the result to ``out_dir``.

    ``seq_len`` defaults to the target context (full fine-tune) or the original context (PoSE).
    ``warmup`` defaults to min(20, steps // 10).  ``memory_limit`` (bytes) replaces the free memory
    the estimate is checked against.  ``resume`` continues from the newest checkpoint in ``out_dir``
    with the same settings.  Under ``torchrun`` the run is data-parallel (see the module docstring).
    Raises an ``EdgeropeError`` subclass on bad input, before any training.
    """
    src, out = Path(checkpoint_dir), Path(out_dir)
    dist = DistContext.from_env()
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
    amp = autocast_dtype(precision, dev)
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}", fix=f"use one of {', '.join(SCHEDULES)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")

    cfg = ModelConfig.load(src)
    original = original_context_of(cfg, rescale=rescale, where=str(src / "config.json"))
    variant, target = scaled_rope(
        rope, theta=cfg.rope.theta, head_dim=cfg.head_dim, original=original, factor=factor, target=target_context
    )
    new_cfg = cfg.replace(rope=variant, max_position_embeddings=target, rope_finetuned=True)
    seq_len = seq_len or (original if pose else target)
    if seq_len > target:
        raise ConfigError(f"seq_len {seq_len} exceeds the target context {target}", fix=f"use seq_len <= {target}")
    if pose and seq_len >= target:
        raise ConfigError("PoSE trains inside a window shorter than the target", fix=f"seq_len < {target}")
    warmup = min(20, steps // 10) if warmup is None else warmup

    need = estimate_memory(new_cfg, batch_size=batch_size, seq_len=seq_len, grad_checkpointing=grad_checkpointing)
    have = memory_limit if memory_limit is not None else available_memory(dev)
    if need > have:
        hints = []
        if not pose:
            hints.append(f"PoSE (--pose trains at seq_len {original} and reaches {target})")
        if batch_size > 1:
            hints.append("a smaller --batch-size with more --grad-accum")
        if not grad_checkpointing:
            hints.append("--grad-checkpointing")
        hints.append("a shorter --seq-len")
        raise TrainingError(
            f"the run needs about {need / 2**20:.1f} MiB, {have / 2**20:.1f} MiB is available",
            where=f"batch {batch_size} x seq_len {seq_len} on {dev}",
            fix="try " + ", or ".join(hints),
        )

    # settings that decide the result: a resume must match them all
    settings = {
        "checkpoint": str(src.resolve()),
        "data": [str(Path(p).resolve()) for p in data],
        "rope": describe(variant),
        "target_context": target,
        "pose": pose,
        "pose_chunks": pose_chunks,
        "whole_documents": whole_documents,
        "steps": steps,
        "global_batch": batch_size * grad_accum * dist.world_size,
        "seq_len": seq_len,
        "lr": lr,
        "schedule": schedule,
        "warmup": warmup,
        "precision": precision,
        "holdout": holdout,
        "seed": seed,
    }
    _check_out_dir(out, resume=resume, force=force)

    packed = build_dataset(data, src, seq_len=seq_len + 1, holdout=holdout, seed=seed, whole=whole_documents)
    train_rows, n_rows = packed.train, packed.train.shape[0]
    pad_input = int(train_rows[train_rows != PAD].max())  # causal attention: tokens after the content change nothing
    torch.manual_seed(seed)
    model = LlamaModel.from_pretrained(src, dtype=torch.float32)
    save_dtype = ModelConfig.load(src).torch_dtype
    model.config, model.rotary = new_cfg, RotaryEmbedding(variant, head_dim=new_cfg.head_dim)
    model.gradient_checkpointing = grad_checkpointing
    model.to(dev)
    peak_lr = lr if lr is not None else default_lr(cfg.n_params)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, steps=steps, warmup=warmup, schedule=schedule)
    )

    state = TrainerState(0, 0, [], [], 0, 0.0, {}, {}, {})
    resumed_from = None
    if resume:
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
        weights = LlamaModel.from_pretrained(ckpt, dtype=torch.float32).state_dict()
        model.load_state_dict(weights)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
        set_rng_state(state.rng)
        resumed_from = state.step

    dist.init(dev)
    train_model: torch.nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    tok_files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    per_micro = batch_size * dist.world_size  # rows of one micro-step over all ranks
    epochs: dict[int, np.ndarray] = {}

    def rows_at(start: int, count: int) -> np.ndarray:
        """Row indices start..start+count-1 of the endless, per-epoch shuffled stream."""
        idx = []
        for k in range(start, start + count):
            e = k // n_rows
            if e not in epochs:
                epochs.clear()
                epochs[e] = epoch_order(n_rows, seed=seed, epoch=e)
            idx.append(epochs[e][k % n_rows])
        return np.asarray(idx)

    mem_before = memory_in_use(dev)
    t_start, tokens_run = time.perf_counter(), 0
    model.train()
    while state.step < steps:
        step = state.step
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for a in range(grad_accum):
            first = state.rows_seen + a * per_micro + dist.rank * batch_size
            rows = torch.from_numpy(train_rows[rows_at(first, batch_size)].astype(np.int64)).to(dev)  # (B, T+1)
            inputs, labels = rows[:, :-1], rows[:, 1:]  # (B, T) each
            if whole_documents:  # padding after a row's last document: not a target; as an input, any token
                inputs = inputs.masked_fill(inputs == PAD, pad_input)
                labels = labels.masked_fill(labels == PAD, -100)
            pos = None
            if pose:  # the whole micro-batch's ids from (seed, step, a); each rank takes its slice
                sampler = PoseSampler(seq_len, target, chunks=pose_chunks, seed=[seed, step, a])  # type: ignore[arg-type]
                all_pos = sampler.sample(per_micro)  # (B x world, T)
                pos = torch.from_numpy(all_pos[dist.rank * batch_size : (dist.rank + 1) * batch_size]).to(dev)
            sync = not dist.enabled or a == grad_accum - 1
            ctx = train_model.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
            with ctx, _autocast(dev, amp):
                logits = train_model(inputs, pos)  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())  # (B*T, V)
                (loss / grad_accum).backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step_loss = dist.mean(loss_sum / grad_accum, dev)
        state.step += 1
        state.rows_seen += grad_accum * per_micro
        state.losses.append(step_loss)
        n_tok = grad_accum * per_micro * seq_len
        state.tokens += n_tok
        tokens_run += n_tok
        held = None
        if packed.heldout.shape[0] and ((eval_every and state.step % eval_every == 0) or state.step == steps):
            held = dist.mean(_heldout_loss(model, packed.heldout[:EVAL_ROWS], dev, amp), dev)
            state.heldout.append((state.step, held))
        elapsed = time.perf_counter() - t_start
        if save_every and state.step % save_every == 0 and state.step < steps:
            _save(out, model, opt, sched, state, settings, tok_files, dist, elapsed)
        if progress is not None and dist.is_main:
            tps = tokens_run / max(elapsed, 1e-9)
            eta = (steps - state.step) * elapsed / max(1, state.step - (resumed_from or 0))
            progress(FinetuneProgress(state.step, steps, step_loss, sched.get_last_lr()[0], tps, eta, held))

    seconds = time.perf_counter() - t_start
    if dist.is_main:
        _write_output(out, model, tok_files, save_dtype)
    dist.barrier()
    return FinetuneReport(
        output_dir=str(out),
        rope=describe(variant),
        original_context=original,
        target_context=target,
        pose=pose,
        seq_len=seq_len,
        steps=steps,
        losses=list(state.losses),
        heldout_losses=[(int(s), float(v)) for s, v in state.heldout],
        tokens=state.tokens,
        seconds=seconds,
        tokens_per_s=tokens_run / max(seconds, 1e-9),
        peak_memory_bytes=peak_memory(dev),
        memory_before_training_bytes=mem_before,
        memory_estimate_bytes=need,
        device=str(dev),
        precision="bf16" if amp is not None else "fp32",
        world_size=dist.world_size,
        resumed_from_step=resumed_from,
        settings=settings,
    )


def _autocast(dev: torch.device, amp: torch.dtype | None) -> Any:
    return torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def _check_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError("the output path is a file, not a folder", where=str(out), fix="name a folder")
    if resume:
        return
    if (out / "config.json").exists() and not force:
        raise OutputError(
            "a fine-tuned checkpoint already exists here", where=str(out), fix="pass --force or a new folder"
        )
    if latest_checkpoint(out) is not None and not force:
        raise OutputError(
            "the output folder holds training checkpoints of another run",
            where=str(out),
            fix="pass --resume to continue it, --force to start over, or a new folder",
        )


@torch.no_grad()
def _heldout_loss(model: LlamaModel, rows: np.ndarray, dev: torch.device, amp: torch.dtype | None) -> float:
    """Mean next-token loss over held-out ``rows`` (M, T+1), positions 0..T-1."""
    model.eval()
    total = 0.0
    for r in rows:
        x = torch.from_numpy(r.astype(np.int64)).to(dev)[None]  # (T+1,) -> (1, T+1)
        with _autocast(dev, amp):
            logits = model(x[:, :-1])  # (1, T, V)
        total += float(torch.nn.functional.cross_entropy(logits[0], x[0, 1:]))
    model.train()
    return total / len(rows)


def _save(out, model, opt, sched, state, settings, tok_files, dist, elapsed) -> None:  # noqa: ANN001
    if dist.is_main:
        state.optimizer, state.scheduler, state.rng = opt.state_dict(), sched.state_dict(), get_rng_state()
        save_checkpoint(out, model=model, state=state, settings=settings, tokenizer_files=tok_files)
        state.optimizer, state.scheduler, state.rng = {}, {}, {}
    dist.barrier()


def _write_output(out: Path, model: LlamaModel, tok_files: list[Path], dtype: str) -> None:
    """The final HF checkpoint in ``out`` (weights in the source dtype), re-read and checked."""
    torch_dtype = getattr(torch, dtype, torch.float32)
    model = model.to("cpu")
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    model.save_pretrained(out, force=True)
    for f in tok_files:
        shutil.copy2(f, out / f.name)
    back = ModelConfig.load(out)
    if back != model.config.replace(torch_dtype=back.torch_dtype):
        raise OutputError("the written config did not read back as the fine-tuned config", where=str(out))
