"""Logits parity between the PyTorch model and llama.cpp: the check behind edgerope's contract.

``check_parity`` runs the same tokens through the PyTorch model of a Hugging
Face checkpoint (fp32) and through llama.cpp on a GGUF converted from it, and
reports the error per position bucket (multiples of the original context), so
a rope bug beyond the trained window shows up where it lives.

Needs torch (for the reference) and llama-cpp-python (for the runtime); both
are imported only when a check runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Bucket:
    """Error over positions [start, stop)."""

    start: int
    stop: int
    rel_l2: float  # ||got - ref||_F / ||ref||_F over the bucket's logits
    max_abs: float

    def label(self) -> str:
        return f"{self.start}-{self.stop - 1}"


@dataclass
class ParityResult:
    """One comparison: a GGUF under one KV-cache setting against the PyTorch reference."""

    type_k: str
    type_v: str
    flash_attn: bool
    n_positions: int
    rel_l2: float
    max_abs: float
    buckets: list[Bucket] = field(default_factory=list)

    @property
    def kv(self) -> str:
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"

    def table(self) -> str:
        """Per-bucket errors as aligned text, for failure messages and the CLI."""
        lines = [
            f"KV {self.kv}{' +FA' if self.flash_attn else ''}: rel L2 {self.rel_l2:.2e}, max |d| {self.max_abs:.2e}"
        ]
        lines += [f"  positions {b.label():>11}: rel L2 {b.rel_l2:.2e}  max |d| {b.max_abs:.2e}" for b in self.buckets]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_edges(n_positions: int, original_context: int) -> list[int]:
    """Bucket boundaries: [0, L0), [L0, 2 L0), [2 L0, 4 L0), ... up to n_positions."""
    edges = [0]
    edge = original_context
    while edge < n_positions:
        edges.append(edge)
        edge *= 2
    edges.append(n_positions)
    return edges


def compare_logits(ref: np.ndarray, got: np.ndarray, *, original_context: int) -> tuple[float, float, list[Bucket]]:
    """Relative L2 and max abs error overall and per bucket; ``ref``, ``got`` are (T, V) float arrays."""
    if ref.shape != got.shape:
        raise ValueError(f"logits shapes differ: reference {ref.shape}, llama.cpp {got.shape}")
    ref64, diff = ref.astype(np.float64), got.astype(np.float64) - ref.astype(np.float64)
    edges = bucket_edges(ref.shape[0], original_context)
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        d, r = diff[lo:hi], ref64[lo:hi]
        buckets.append(Bucket(lo, hi, float(np.linalg.norm(d) / np.linalg.norm(r)), float(np.abs(d).max())))
    return float(np.linalg.norm(diff) / np.linalg.norm(ref64)), float(np.abs(diff).max()), buckets


def reference_logits(hf_dir: str | Path, tokens: list[int]) -> np.ndarray:
    """Logits (T, V) of the PyTorch model in fp32 for one sequence."""
    import torch

    from edgerope.models.llama import LlamaModel

    model = LlamaModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens], dtype=torch.long))  # (1, T, V)
    return logits[0].float().numpy()


def llama_cpp_logits(
    gguf_path: str | Path,
    tokens: list[int],
    *,
    n_ctx: int,
    type_k: str = "f32",
    type_v: str = "f32",
    flash_attn: bool = False,
) -> np.ndarray:
    """Logits (T, V) from the real llama.cpp runtime for one sequence."""
    from edgerope.runtime.runtime import Runtime

    with Runtime.open(
        gguf_path,
        n_ctx=n_ctx,
        type_k=type_k,
        type_v=type_v,
        flash_attn="on" if flash_attn else "off",
        backend="cpu",
        allow_extrapolation=True,
    ) as rt:
        return rt.logits(tokens)


def check_parity(
    hf_dir: str | Path,
    gguf_path: str | Path,
    *,
    tokens: list[int],
    original_context: int,
    kv_settings: tuple[tuple[str, str, bool], ...] = (("f32", "f32", False),),
    n_ctx: int | None = None,
    reference: np.ndarray | None = None,
) -> list[ParityResult]:
    """Compare llama.cpp on ``gguf_path`` with the PyTorch model of ``hf_dir`` for each (type_k, type_v, flash_attn)."""
    ref = reference_logits(hf_dir, tokens) if reference is None else reference
    results = []
    for type_k, type_v, fa in kv_settings:
        got = llama_cpp_logits(
            gguf_path, tokens, n_ctx=n_ctx or len(tokens), type_k=type_k, type_v=type_v, flash_attn=fa
        )
        rel, mx, buckets = compare_logits(ref, got, original_context=original_context)
        results.append(ParityResult(type_k, type_v, fa, len(tokens), rel, mx, buckets))
    return results
