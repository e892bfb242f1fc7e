"""The training loop of ``edgerope.train.finetune``: micro-batches, optimizer steps, held-out loss, checkpoints.

What it does:

* ``Batches`` serves the packed rows as an endless stream, shuffled per epoch from
  ``(seed, epoch)``, with the retrieval rows of ``edgerope.train.mix`` interleaved by a seeded schedule
  when the run has them; each rank takes its slice of every micro-batch (PoSE position
  ids drawn for the whole micro-batch from ``(seed, step, micro-step)``);
* ``train`` runs the optimizer steps from the trainer's state to the last step:
  gradient accumulation (DDP syncs on the last micro-step only), clipping at 1.0,
  the held-out loss every ``eval_every`` steps and at the end, a resumable
  checkpoint every ``save_every`` steps (rank 0 writes), a progress callback.

What it does not do: check the request, build the model or optimizer, resume, or write the fine-tuned
model (``edgerope.train.finetune`` does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerope.models.llama import LlamaModel
from edgerope.train.checkpoint import DistContext, TrainerState, save_checkpoint
from edgerope.train.checkpoint import rng_state as get_rng_state
from edgerope.train.data import PAD, PackedData, PoseSampler, TextTokenizer, epoch_order
from edgerope.train.mix import RetrievalMix, RetrievalRows

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


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know about the run, resolved and checked by ``finetune``."""

    dev: torch.device
    amp: torch.dtype | None  # autocast dtype, None: fp32
    dist: DistContext
    steps: int
    batch_size: int  # rows per rank per micro-step
    grad_accum: int
    seq_len: int
    target: int
    pose: bool
    pose_chunks: int
    whole_documents: bool
    seed: int
    eval_every: int | None
    save_every: int | None

    @property
    def per_micro(self) -> int:
        """Rows of one micro-step over all ranks."""
        return self.batch_size * self.dist.world_size


@dataclass
class Trainer:
    """The model, what the forward pass goes through (the model or its DDP wrapper), optimizer, schedule, state."""

    model: LlamaModel
    train_model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    state: TrainerState


class Batches:
    """Micro-batches of the training rows (N, T+1): the endless, per-epoch shuffled stream of the packed text,
    with retrieval rows (``edgerope.train.mix``) interleaved when ``retrieval`` is given.

    ``retrieval`` takes a ``fraction`` of the first ``n_rows`` stream positions (a seeded choice of exactly
    round(fraction x n_rows) of them; later positions are text); the text positions read the packed rows in
    their per-epoch order, the retrieval positions read retrieval rows 0, 1, 2, ... in turn.
    """

    def __init__(
        self,
        rows: np.ndarray,
        *,
        seed: int,
        retrieval: RetrievalRows | None = None,
        fraction: float = 0.0,
        n_rows: int = 0,
    ) -> None:
        self.rows, self.n_rows, self.seed = rows, rows.shape[0], seed
        self.pad_input = int(rows[rows != PAD].max())  # causal attention: tokens after the content change nothing
        self._epochs: dict[int, np.ndarray] = {}  # the current epoch's order only
        self.retrieval = retrieval
        n_ret = round(fraction * n_rows) if retrieval is not None else 0
        mask = np.random.default_rng([seed, 0x736368]).permutation(n_rows) < n_ret  # (n_rows,) retrieval here?
        self._is_retrieval = mask
        self._rank = np.where(mask, np.cumsum(mask) - 1, np.cumsum(~mask) - 1)  # (n_rows,) index within its kind
        self.n_text_scheduled = int(n_rows - n_ret)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Packed-row indices of text positions start..start+count-1 of the text stream."""
        idx = []
        for k in range(start, start + count):
            e = k // self.n_rows
            if e not in self._epochs:
                self._epochs.clear()
                self._epochs[e] = epoch_order(self.n_rows, seed=self.seed, epoch=e)
            idx.append(self._epochs[e][k % self.n_rows])
        return np.asarray(idx)

    def rows_at(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows (count, T+1) int32 at stream positions start..start+count-1, and which of their tokens are
        targets (count, T+1) bool -- None when all are (text rows; their padding is marked ``PAD`` instead)."""
        rows, targets = [], []
        for k in range(start, start + count):
            if k < len(self._is_retrieval) and self._is_retrieval[k]:
                ids, target = self.retrieval.row(int(self._rank[k]))  # type: ignore[union-attr]
                rows.append(ids)
                targets.append(target)
            else:
                text_k = int(self._rank[k]) if k < len(self._rank) else self.n_text_scheduled + k - len(self._rank)
                rows.append(self.rows[int(self.indices(text_k, 1)[0])])
                targets.append(None)
        if all(t is None for t in targets):
            return np.stack(rows), None
        return np.stack(rows), np.stack(
            [np.ones(len(r), bool) if t is None else t for r, t in zip(rows, targets, strict=True)]
        )

    def micro_batch(
        self, run: LoopSettings, *, rows_seen: int, step: int, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """(inputs, labels, position ids or None, per-row loss?) of this rank's rows of micro-step ``micro`` of
        ``step``; labels that are no target are -100; the loss is a mean per row when retrieval rows are in."""
        first = rows_seen + micro * run.per_micro + run.dist.rank * run.batch_size
        ids, targets = self.rows_at(first, run.batch_size)
        rows = torch.from_numpy(ids.astype(np.int64)).to(run.dev)  # (B, T+1)
        inputs, labels = rows[:, :-1], rows[:, 1:]  # (B, T) each
        if run.whole_documents:  # padding after a row's last document: not a target; as an input, any token
            inputs = inputs.masked_fill(inputs == PAD, self.pad_input)
            labels = labels.masked_fill(labels == PAD, -100)
        if targets is not None:  # retrieval rows: only their answers are targets (answers-only loss)
            labels = labels.masked_fill(~torch.from_numpy(targets[:, 1:]).to(run.dev), -100)
        pos = None
        if run.pose:  # the whole micro-batch's ids from (seed, step, micro); each rank takes its slice
            seed = [run.seed, step, micro]
            sampler = PoseSampler(run.seq_len, run.target, chunks=run.pose_chunks, seed=seed)  # type: ignore[arg-type]
            all_pos = sampler.sample(run.per_micro)  # (B x world, T)
            lo = run.dist.rank * run.batch_size
            pos = torch.from_numpy(all_pos[lo : lo + run.batch_size]).to(run.dev)  # (B, T)
        return inputs, labels, pos, targets is not None


def training_stream(
    tok: TextTokenizer, packed: PackedData, run: LoopSettings, mix: RetrievalMix
) -> tuple[Batches, dict[str, Any]]:
    """The run's stream of rows -- the packed text, with ``mix.fraction`` of the run's rows made retrieval rows
    from the training text -- and a summary of the data (``PackedData.summary``, the rows of each kind)."""
    n_rows = run.steps * run.grad_accum * run.per_micro
    summary = {**packed.summary(), "retrieval_mix": mix.to_dict()}
    if mix.fraction == 0:
        return Batches(packed.train, seed=run.seed), {**summary, "rows": {"text": n_rows, "retrieval": 0}}
    n_ret = round(mix.fraction * n_rows)
    retrieval = RetrievalRows(
        tok, packed.train_pieces, seq_len=run.seq_len + 1, n_rows=max(1, n_ret), mix=mix, seed=run.seed
    )
    batches = Batches(packed.train, seed=run.seed, retrieval=retrieval, fraction=mix.fraction, n_rows=n_rows)
    rows = {"text": n_rows - n_ret, "retrieval": n_ret}
    return batches, {**summary, "rows": rows, "retrieval_rows_by_first_sample": retrieval.counts() if n_ret else {}}


def train(
    run: LoopSettings,
    t: Trainer,
    batches: Batches,
    heldout: np.ndarray,
    *,
    out: Path,
    settings: dict[str, Any],
    tokenizer_files: list[Path],
    progress: Callable[[FinetuneProgress], None] | None,
    resumed_from: int | None,
    saver: Any = None,
) -> tuple[float, int]:
    """Optimizer steps from ``t.state.step`` to ``run.steps``; returns (seconds, tokens this call trained on).

    ``heldout`` (M, T+1) are the held-out rows; checkpoints go to ``out`` with ``settings`` and ``tokenizer_files``,
    the weights through ``saver.save_pretrained`` (default: the model's own; LoRA: the adapter's).
    """
    t_start, tokens_run = time.perf_counter(), 0
    t.model.train()
    while t.state.step < run.steps:
        step_loss = _optimizer_step(run, t, batches)
        tokens_run += _record_step(run, t.state, step_loss)
        held = _heldout_if_due(run, t, heldout)
        elapsed = time.perf_counter() - t_start
        if run.save_every and t.state.step % run.save_every == 0 and t.state.step < run.steps:
            _save(out, t, settings, tokenizer_files, run.dist, saver or t.model)
        if progress is not None and run.dist.is_main:
            tps = tokens_run / max(elapsed, 1e-9)
            eta = (run.steps - t.state.step) * elapsed / max(1, t.state.step - (resumed_from or 0))
            progress(FinetuneProgress(t.state.step, run.steps, step_loss, t.sched.get_last_lr()[0], tps, eta, held))
    return time.perf_counter() - t_start, tokens_run


def _optimizer_step(run: LoopSettings, t: Trainer, batches: Batches) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the loss, averaged over them and over the ranks."""
    t.opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for micro in range(run.grad_accum):
        inputs, labels, pos, per_row = batches.micro_batch(
            run, rows_seen=t.state.rows_seen, step=t.state.step, micro=micro
        )
        sync = not run.dist.enabled or micro == run.grad_accum - 1
        loss_sum += _forward_backward(run, t.train_model, inputs, labels, pos, sync=sync, per_row=per_row)
    torch.nn.utils.clip_grad_norm_(t.model.parameters(), 1.0)
    t.opt.step()
    t.sched.step()
    return run.dist.mean(loss_sum / run.grad_accum, run.dev)


def _forward_backward(
    run: LoopSettings,
    model: torch.nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    pos: torch.Tensor | None,
    *,
    sync: bool,
    per_row: bool = False,
) -> float:
    """The loss of one micro-batch; its gradient / grad_accum accumulated (DDP all-reduces only when ``sync``)."""
    ctx = model.no_sync() if not sync else contextlib.nullcontext()  # type: ignore[operator]
    with ctx, _autocast(run.dev, run.amp):
        logits = model(inputs, pos)  # (B, T, V)
        if per_row:
            loss = row_mean_loss(logits, labels)
        else:
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())  # (B*T, V)
        (loss / run.grad_accum).backward()
    return float(loss.detach())


def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, T, V) against ``labels`` (B, T; -100: not a target), the mean over rows of
    each row's mean: a retrieval row with a few answer tokens weighs as much as a row of text (rows without
    targets left out)."""
    valid = labels != -100  # (B, T)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")  # (B*T,)
    ce = ce.view(labels.shape)  # (B*T,) -> (B, T)
    per_row = (ce * valid).sum(1) / valid.sum(1).clamp(min=1)  # (B,)
    return per_row[valid.any(1)].mean()


def _record_step(run: LoopSettings, state: TrainerState, loss: float) -> int:
    """Count one finished optimizer step in ``state``; returns the tokens it trained on (all ranks)."""
    state.step += 1
    state.rows_seen += run.grad_accum * run.per_micro
    state.losses.append(loss)
    n_tok = run.grad_accum * run.per_micro * run.seq_len
    state.tokens += n_tok
    return n_tok


def _heldout_if_due(run: LoopSettings, t: Trainer, heldout: np.ndarray) -> float | None:
    """The held-out loss (mean over ranks), recorded in the state, every ``eval_every`` steps and at the last."""
    due = (run.eval_every and t.state.step % run.eval_every == 0) or t.state.step == run.steps
    if not (heldout.shape[0] and due):
        return None
    held = run.dist.mean(_heldout_loss(t.model, heldout[:EVAL_ROWS], run.dev, run.amp), run.dev)
    t.state.heldout.append((t.state.step, held))
    return held


def _autocast(dev: torch.device, amp: torch.dtype | None) -> Any:
    return torch.autocast(dev.type, dtype=amp) if amp is not None else contextlib.nullcontext()


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


def _save(
    out: Path, t: Trainer, settings: dict[str, Any], tokenizer_files: list[Path], dist: DistContext, saver: Any
) -> None:
    """A resumable checkpoint of the run so far (rank 0 writes; every rank waits for it)."""
    if dist.is_main:
        state = t.state
        state.optimizer, state.scheduler, state.rng = t.opt.state_dict(), t.sched.state_dict(), get_rng_state()
        save_checkpoint(out, model=saver, state=state, settings=settings, tokenizer_files=tokenizer_files)
        state.optimizer, state.scheduler, state.rng = {}, {}, {}
    dist.barrier()
