"""Fine-tuning test settings shared by the CPU and CUDA tests."""

from __future__ import annotations


def small(**kw):
    """Fast settings for the tiny model: factor 2 (256 -> 512), 64-token rows, lr high enough to move in 10 steps,
    the text alone (retrieval samples need rows of 128 tokens or more; tests/train/test_mix.py covers them)."""
    base = dict(
        rope="yarn", factor=2, steps=6, batch_size=2, seq_len=64, lr=3e-3, seed=0, device="cpu", retrieval_mix=0.0
    )
    base.update(kw)
    return base


class Interrupted(Exception):
    """Raised from a progress callback: the run stops part-way, as a crash would stop it."""


def stop_at(step: int):
    """A progress callback that interrupts the run after optimizer step ``step``."""

    def progress(p):
        if p.step == step:
            raise Interrupted

    return progress
