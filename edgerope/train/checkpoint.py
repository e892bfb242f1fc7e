"""Training state for ``edgerope.train.finetune``: resumable checkpoints, RNG states, the distributed context.

What it does:

* ``save_checkpoint`` writes one training checkpoint -- model weights (an HF
  folder via ``LlamaModel.save_pretrained``), optimizer and scheduler states,
  the torch/numpy/python RNG states, the step and data position, the loss
  history and the run's settings -- into a temp folder beside the final one,
  then renames it into place (a crash never leaves a half-written
  checkpoint), and keeps the newest ``keep`` checkpoints;
* ``latest_checkpoint`` / ``load_checkpoint`` find and read the newest one;
* ``settings_diff`` lists the settings a resume would change;
* ``DistContext`` reads the ``torchrun`` environment (RANK, WORLD_SIZE,
  LOCAL_RANK) and starts ``torch.distributed`` (gloo on CPU, nccl on CUDA).

What it does not do: decide when to save (the trainer does) or shard model
state (no FSDP: every rank holds the whole model).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerope.errors import TrainingError
from edgerope.system.files import atomic_output

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
SETTINGS_FILE = "settings.json"


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- checkpoints


@dataclass
class TrainerState:
    """What a resume needs besides the model weights."""

    step: int
    rows_seen: int
    losses: list[float]
    heldout: list[tuple[int, float]]
    tokens: int
    seconds: float
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(
    out_dir: Path,
    *,
    model: Any,
    state: TrainerState,
    settings: dict[str, Any],
    tokenizer_files: list[Path],
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``state.step`` atomically (temp folder + rename); returns its folder."""
    final = checkpoint_dir(out_dir, state.step)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(final) as tmp:  # the same step saved again (a resumed run) is replaced whole
        model.save_pretrained(tmp)
        for f in tokenizer_files:
            shutil.copy2(f, tmp / f.name)
        torch.save(state.__dict__, tmp / STATE_FILE)
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for old in sorted(final.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir`` (temp folders are ignored), or None."""
    found = sorted(p for p in (out_dir / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[TrainerState, dict[str, Any]]:
    """(trainer state, settings) of the checkpoint folder ``path``."""
    try:
        raw = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)  # our own file
        settings = json.loads((path / SETTINGS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainingError(
            f"the checkpoint cannot be read: {exc}",
            where=str(path),
            fix="delete this checkpoint folder to resume from the one before, or start without --resume",
        ) from None
    return TrainerState(**raw), settings


def settings_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name: saved -> now`` for every setting that differs."""
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)
    ]


# ---------------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 when not launched by it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistContext:
        """Read RANK / WORLD_SIZE / LOCAL_RANK as set by ``torchrun``."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError:
            raise TrainingError(
                "RANK/WORLD_SIZE/LOCAL_RANK are not integers", where="environment", fix="launch with torchrun"
            ) from None
        return cls(rank, world, local)

    def init(self, device: torch.device) -> None:
        """Start the process group (gloo on CPU, nccl on CUDA) unless already started or single-process."""
        import torch.distributed as dist

        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of ``value`` over all ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size
