"""What a fine-tuning run leaves behind: the fine-tuned checkpoint or LoRA adapter folder, and its GGUF.

What it does:

* ``write_output``: the final Hugging Face checkpoint (weights in the source dtype, the config with the scaled
  rope and ``rope_finetuned``), or for LoRA the adapter folder (``edgerope.train.lora``); files of the other
  kind left there by an earlier run (``--force``) are removed, so the folder is one or the other;
* ``AdapterSaver``: what a training checkpoint saves under LoRA (the adapter, not the frozen base);
* ``write_gguf``: ``finetune --gguf OUTTYPE``'s ``model.<OUTTYPE>.gguf`` in the output folder, through
  ``edgerope.convert`` (an adapter merged into its base first, ``edgerope.convert.lora``), so the next step
  is ``edgerope ask``.

What it does not do: train, or write resumable training checkpoints (``edgerope.train.checkpoint``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edgerope.errors import ConfigError, OutputError
from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel
from edgerope.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EDGEROPE_ADAPTER, LoraSettings, save_adapter

FULL_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, EDGEROPE_ADAPTER)
DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # written by edgerope.convert.export itself


class AdapterSaver:
    """``save_pretrained(folder)`` for training checkpoints of a LoRA run: the adapter files only."""

    def __init__(self, model: LlamaModel, lora: LoraSettings, *, base: Path, config: ModelConfig) -> None:
        self.model, self.lora, self.base, self.config = model, lora, base, config

    def save_pretrained(self, folder: Path) -> None:
        from edgerope.train.lora import write_adapter_files

        Path(folder).mkdir(parents=True, exist_ok=True)
        write_adapter_files(Path(folder), self.model, self.lora, base=self.base, config=self.config)


def check_gguf_outtype(outtype: str) -> str:
    """``outtype`` normalised (f16, q8_0, Q4_K_M, ...), or ``ConfigError`` naming the choices."""
    if outtype.lower() in DIRECT_OUTTYPES:
        return outtype.lower()
    from edgerope.runtime.native import QUANT_TYPES

    if outtype.upper() in QUANT_TYPES:
        return outtype.upper()
    raise ConfigError(
        f"unknown GGUF type {outtype!r}",
        fix=f"--gguf takes {', '.join(DIRECT_OUTTYPES)} or a llama.cpp type ({', '.join(sorted(QUANT_TYPES)[:6])}, ...)",
    )


def _remove(out: Path, names: Sequence[str]) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)


def write_output(
    out: Path,
    model: LlamaModel,
    tok_files: list[Path],
    dtype: str,
    *,
    lora: LoraSettings | None,
    base: Path,
    config: ModelConfig,
) -> None:
    """The run's result in ``out``: the fine-tuned checkpoint (weights in ``dtype``), or the LoRA adapter folder."""
    if lora is not None:
        _remove(out, FULL_FILES)
        save_adapter(out, model.to("cpu"), lora, base=base, config=config, tokenizer_files=tok_files)
        return
    _remove(out, ADAPTER_FILES)
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


def gguf_path(out: Path, outtype: str) -> Path:
    """Where ``finetune --gguf OUTTYPE`` writes: ``<out>/model.<OUTTYPE>.gguf``."""
    return out / f"model.{outtype}.gguf"


def write_gguf(out: Path, outtype: str, *, lora: bool) -> dict[str, Any]:
    """Convert the run's output folder ``out`` to ``gguf_path(out, outtype)`` (an adapter merged first)."""
    path = gguf_path(out, outtype)
    quant = None
    if lora:
        from edgerope.convert.lora import convert_merged

        report, quant = convert_merged(out, path, outtype=outtype, force=True)
    elif outtype in DIRECT_OUTTYPES:
        from edgerope.convert.export import convert

        report = convert(out, path, outtype=outtype, force=True)
    else:
        from edgerope.convert.quantize import convert_quantized

        report, quant = convert_quantized(out, path, qtype=outtype, force=True)
    return {
        "path": str(path),
        "outtype": outtype,
        "bytes": path.stat().st_size,
        "context_length": report.context_length,
        "rope": report.rope,
        "merged_lora": lora,
        "quantized_by_llama_cpp": quant is not None,
        "notes": list(report.notes) + list(report.rope_notes),
    }
