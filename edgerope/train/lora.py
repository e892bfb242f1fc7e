"""LoRA fine-tuning with peft: low-rank adapters on the attention and MLP projections, saved in PEFT's format.

What it does:

* ``LoraSettings``: rank, alpha, target modules (the seven projections by default: ``q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, the HF names ``edgerope.models.llama``
  keeps), checked before anything is built;
* ``add_lora`` puts peft's LoRA layers on those modules of a ``LlamaModel`` (``peft.inject_adapter_in_model``;
  the base weights frozen, B initialised to zero so the model starts as the base);
* ``adapter_state`` / ``load_adapter_state``: the adapter tensors under PEFT's file names
  (``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)), float32;
* ``save_adapter`` writes an adapter folder: ``adapter_model.safetensors`` and ``adapter_config.json``
  (peft's ``LoraConfig.save_pretrained``: PEFT and llama.cpp's ``convert_lora_to_gguf.py`` read it), plus
  ``edgerope_adapter.json`` (the base checkpoint and the fine-tuned config with its scaled rope, which the base
  lacks) and the tokenizer files; atomically (temp folder, re-read, rename).

The scaled rope is not in the adapter: it is the model's config.  ``edgerope.convert.lora`` merges an adapter
folder into its base (the merged checkpoint carries the rope) or writes a llama.cpp adapter GGUF, which runs
on a base GGUF with that rope.

What it does not do: train embeddings, norms or biases (llama.cpp's adapter format carries only the low-rank
pairs, so an adapter GGUF would silently drop them), quantized bases (QLoRA), DoRA or rsLoRA.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from edgerope.errors import CheckpointError, ConfigError
from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel
from edgerope.system.files import partial_path, remove_path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG, EDGEROPE_ADAPTER = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "edgerope_adapter.json",
)
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before module names


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter's shape: W x + (alpha / rank) B A x on every ``targets`` projection."""

    rank: int = 16
    alpha: float | None = None  # None: 2 x rank
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be an integer >= 1, got {self.rank!r} (--lora-rank)")
        if self.alpha is not None and not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r} (--lora-alpha)")
        if not self.targets:
            problems.append("no target modules (--lora-targets)")
        if unknown := sorted(set(self.targets) - set(TARGETS)):
            problems.append(f"unknown target modules {unknown} (--lora-targets takes {', '.join(TARGETS)})")
        if problems:
            raise ConfigError("LoRA settings:\n    - " + "\n    - ".join(problems))

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else 2 * self.rank)

    @property
    def scale(self) -> float:
        """The factor on B A (PEFT's and llama.cpp's: alpha / rank)."""
        return self.lora_alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "alpha": self.lora_alpha, "targets": list(self.targets)}

    def peft_config(self, base: str | None = None) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base,
        )


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "LoRA needs the 'peft' package", fix="pip install 'edgerope[lora]' (or pip install peft)"
        ) from None
    return peft


def lora_params(cfg: ModelConfig, s: LoraSettings) -> int:
    """Trainable parameters of ``s`` on a model of ``cfg``: rank x (in + out) per target per layer."""
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    shapes |= {"gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    return cfg.num_hidden_layers * sum(s.rank * sum(shapes[t]) for t in s.targets)


def add_lora(model: LlamaModel, s: LoraSettings) -> LlamaModel:
    """Put LoRA layers on ``s.targets`` of ``model`` in place (base weights frozen); returns ``model``."""
    peft = _peft()
    missing = [t for t in s.targets if not any(n.endswith("." + t) for n, _ in model.named_modules())]
    if missing:
        raise ConfigError(f"the model has no {missing} modules to put LoRA on", fix=f"use --lora-targets {TARGETS}")
    peft.inject_adapter_in_model(s.peft_config(), model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


def adapter_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    """The adapter tensors (float32, on the CPU) under PEFT's file names."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def load_adapter_state(model: LlamaModel, state: dict[str, torch.Tensor], *, where: str) -> None:
    """Load ``adapter_state``-named tensors into ``model``'s LoRA layers; every one must match, none be missing."""
    from peft import set_peft_model_state_dict

    plain = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    have = {k.removeprefix(PEFT_PREFIX) for k in adapter_state(model)}
    if set(plain) != have:
        lost, extra = sorted(have - set(plain)), sorted(set(plain) - have)
        raise CheckpointError(
            f"the adapter does not match the model: missing {lost[:4]}, unexpected {extra[:4]}", where=where
        )
    result = set_peft_model_state_dict(model, plain)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"unexpected adapter tensors {result.unexpected_keys[:4]}", where=where)


def read_adapter(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` in ``adapter_dir``."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(
            "no adapter_model.safetensors", where=str(adapter_dir), fix="point at a LoRA output folder"
        )
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_adapter_files(
    folder: Path,
    model: LlamaModel,
    s: LoraSettings,
    *,
    base: Path,
    config: ModelConfig,
    tokenizer_files: Sequence[Path] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the adapter files (see the module docstring) into the existing ``folder``, then re-read the weights."""
    state = adapter_state(model)
    meta = {
        "format": "edgerope-lora-1",
        "base_model": str(base.resolve()),
        "lora": s.to_dict(),
        "config": config.to_hf(),  # the fine-tuned model's config: the scaled rope, rope_finetuned
        **(extra or {}),
    }
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    s.peft_config(str(base.resolve())).save_pretrained(str(folder))
    (folder / EDGEROPE_ADAPTER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    for f in tokenizer_files:
        shutil.copy2(f, folder / f.name)
    back = read_adapter(folder)
    if set(back) != set(state) or any(not torch.equal(back[k], v) for k, v in state.items()):
        raise CheckpointError("the adapter did not read back as written", where=str(folder))


def save_adapter(out_dir: Path, model: LlamaModel, s: LoraSettings, **kw: Any) -> Path:
    """Write the adapter files into ``out_dir`` (created; other files there are kept): written and checked in a
    temp folder beside it, then each file renamed into place.  ``kw``: ``write_adapter_files``' keywords."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(out_dir / ADAPTER_WEIGHTS, "adapter")
    try:
        tmp.mkdir()
        write_adapter_files(tmp, model, s, **kw)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        remove_path(tmp)
    return out_dir


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """``edgerope_adapter.json`` of an adapter folder (base checkpoint, LoRA settings, fine-tuned config)."""
    path = Path(adapter_dir) / EDGEROPE_ADAPTER
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {EDGEROPE_ADAPTER}: {exc}", where=str(path)) from None
