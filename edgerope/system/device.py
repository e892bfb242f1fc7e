"""Which PyTorch device a command runs on: one low-level place for training, evaluation and pretraining.

torch is imported when a device is picked, not when this module is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgerope.errors import ConfigError

if TYPE_CHECKING:
    import torch


def pick_device(device: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error for one not here."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}", fix="use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported", fix="use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: this PyTorch sees no CUDA GPU",
                fix="use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)",
                fix=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
    return dev
