"""The built-in tiny model's recipe: pretrain a small Llama from scratch on offline text + retrieval samples.

What it does:

* ``TinyRecipe`` fixes everything that decides the result: tokenizer
  (SentencePiece BPE, byte fallback, identity normalization, split digits,
  trained on CPython's ``pydoc_data``), model shape, context 256, data
  mixture (documentation text, passkey and multi-key samples from
  ``edgerope.train.synthetic``), optimizer and schedule, seed;
* ``pretrain`` runs it on CPU (or CUDA) with a progress callback and writes a
  Hugging Face checkpoint folder (bf16 weights, tokenizer, ``recipe.json``
  with the recipe, the loss curve and the machine it ran on).

Deterministic for a given machine: the same recipe gives the same weights (batches come from
``[seed, step]``; float reductions may differ across CPUs or thread counts).

What it does not do: evaluate (``edgerope.evaluation.protocols``), ship the artifacts (``edgerope.models.builtin``),
or train anything but the tiny Llama.
"""

from __future__ import annotations

import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel
from edgerope.models.tiny_random import tiny_config, train_tokenizer, write_json, write_tokenizer_files
from edgerope.system.device import pick_device
from edgerope.train.data import load_tokenizer
from edgerope.train.synthetic import Mixture, RowBuilder


@dataclass(frozen=True)
class TinyRecipe:
    """Every setting of the built-in tiny model's pretraining."""

    vocab_size: int = 1000
    hidden_size: int = 128
    num_hidden_layers: int = 4
    # head_dim 64 (2 heads, 1 KV head): 32 rope frequencies instead of 16 at head_dim 32, same parameter count.
    # In a tuning run on a GPU, YaRN x16 + PoSE passkey at 4096 was 96% with it and 44% with 4 heads of 32.
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 384
    context: int = 256
    rope_theta: float = 10000.0
    steps: int = 7000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    mixture: Mixture = field(default_factory=Mixture)
    dense: bool = False  # retrieval rows hold several samples back to back
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PretrainProgress:
    step: int
    steps: int
    loss: float
    tokens_per_s: float
    eta_s: float


def _lr(recipe: TinyRecipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(
    out_dir: str | Path,
    recipe: TinyRecipe | None = None,
    *,
    device: str = "cpu",
    save_every: int | None = None,
    progress: Callable[[PretrainProgress], None] | None = None,
) -> Path:
    """Train the tiny model of ``recipe`` on ``device`` (auto, cpu, cuda, cuda:N) into ``out_dir`` (created if needed;
    the files a run writes replace those of an earlier run there)."""
    recipe = recipe or TinyRecipe()
    dev = pick_device(device)  # auto, cpu, cuda, cuda:N; an absent or unknown device fails before any file is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = train_tokenizer(tmp, vocab_size=recipe.vocab_size, seed=recipe.seed)
        write_tokenizer_files(out, model_file=model_file, chat_template=False)  # not trained to chat
    cfg = _model_config(recipe)
    write_json(out / "config.json", cfg.to_hf())  # the tokenizer loader reads bos/eos ids from it
    rows = RowBuilder(load_tokenizer(out), seq_len=recipe.context + 1, mixture=recipe.mixture, dense=recipe.dense)

    model = _initial_model(cfg, seed=recipe.seed).to(dev)  # drawn on the CPU generator: the same on every device
    losses, seconds = _train(model, rows, recipe, dev, out=out, save_every=save_every, progress=progress)

    model = model.to("cpu").to(torch.bfloat16)
    model.save_pretrained(out, force=True)
    _write_generation_config(out, cfg)
    write_json(out / "recipe.json", _recipe_record(recipe, model, losses, seconds=seconds, dev=dev))
    return out


def _model_config(recipe: TinyRecipe) -> ModelConfig:
    """The tiny Llama's config: the recipe's shape, context and rope base, tied embeddings."""
    return tiny_config(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.context,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta},
        tie_word_embeddings=True,
        name="edgerope-tiny",
    )


def _initial_model(cfg: ModelConfig, *, seed: int) -> LlamaModel:
    """The model at its GPT-2 style init: N(0, 0.02), residual projections scaled by depth (on the CPU)."""
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * cfg.num_hidden_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 0.02
                )
                p.normal_(0.0, std)
    return model


def _optimizer(model: LlamaModel, recipe: TinyRecipe) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95), weight decay on the matrices only."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )


def _train(
    model: LlamaModel,
    rows: RowBuilder,
    recipe: TinyRecipe,
    dev: torch.device,
    *,
    out: Path,
    save_every: int | None,
    progress: Callable[[PretrainProgress], None] | None,
) -> tuple[list[float], float]:
    """The training loop (batches from ``[seed, step]``, clipping at 1.0); (the loss per step, seconds).

    Every ``save_every`` steps but the last, an intermediate checkpoint in ``out/step-N``.
    """
    opt = _optimizer(model, recipe)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(recipe, step)
        ids = rows.rows(recipe.batch_size, seed=[recipe.seed, step])  # (B, T+1)
        batch = torch.from_numpy(ids.astype(np.int64)).to(dev)
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if save_every and (step + 1) % save_every == 0 and step + 1 < recipe.steps:
            _save(model, out, model.config, out / f"step-{step + 1}")
        if progress is not None:
            dt = time.perf_counter() - t0
            tps = (step + 1) * recipe.batch_size * recipe.context / dt
            progress(
                PretrainProgress(step + 1, recipe.steps, losses[-1], tps, dt / (step + 1) * (recipe.steps - step - 1))
            )
    return losses, time.perf_counter() - t0


def _recipe_record(
    recipe: TinyRecipe, model: LlamaModel, losses: list[float], *, seconds: float, dev: torch.device
) -> dict[str, Any]:
    """``recipe.json``: the recipe, the model's size, the loss curve, the time and the machine it ran on."""
    return {
        "recipe": recipe.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens": recipe.steps * recipe.batch_size * recipe.context,
        "seconds": round(seconds, 1),
        "loss_every_50_steps": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "losses": [round(x, 4) for x in losses],
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, torch {torch.__version__}, "
        + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"),
    }


def _write_generation_config(out: Path, cfg: Any) -> None:
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False, "max_new_tokens": 64}
    write_json(out / "generation_config.json", gen)


def _save(model: LlamaModel, src: Path, cfg: Any, dst: Path) -> None:
    """An intermediate bf16 checkpoint (weights, config, tokenizer files) in ``dst``."""
    copy = LlamaModel(cfg)
    copy.load_state_dict(model.state_dict())
    copy.to(torch.bfloat16).save_pretrained(dst, force=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, dst / name)
    _write_generation_config(dst, cfg)
