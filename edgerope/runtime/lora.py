"""Checking a llama.cpp LoRA adapter GGUF against the base GGUF it will run on, before anything native.

``check_adapter`` refuses, with the reason and a fix, what llama.cpp would reject or silently compute wrong:

* a file that is not a LoRA adapter GGUF (``general.type`` "adapter", ``adapter.type`` "lora";
  src/llama-adapter.cpp), or whose ``general.architecture`` is not the base's;
* a ``<name>.lora_a`` without its ``.lora_b`` (or the reverse), a tensor the base lacks, shapes that do not
  fit (lora_a ne [in, r], lora_b ne [r, out], base ne [in, out]), a tensor with another suffix;
* an adapter trained at a rope the base GGUF does not compute: edgerope records it (``edgerope.adapter.rope``,
  ``edgerope.convert.lora``) and llama.cpp would apply the adapter to a model whose positions mean something
  else -- e.g. an adapter fine-tuned at YaRN x8 on a base converted without scaling.

What it does not do: load the adapter (``edgerope.runtime.native.adapter``), plan its memory (a few MiB at
most: rank x (in + out) values per adapted matrix).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerope.errors import EdgeropeError, GGUFError, RuntimeConfigError
from edgerope.gguf.reader import GGUFFile, open_gguf
from edgerope.rope.hf import parse_hf_rope
from edgerope.rope.scaling import attention_factor, describe, inv_freq

ROPE_KEY = "edgerope.adapter.rope"  # written by edgerope.convert.lora


@dataclass(frozen=True)
class AdapterPlan:
    """A checked adapter: its path, the scale it runs at, and what it holds."""

    path: Path
    scale: float
    alpha: float
    rank: int
    n_pairs: int
    rope: str | None  # the rope it was trained at, in words (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "path": str(self.path)}


ADAPTER_FIX = "write the adapter with `edgerope convert ADAPTER_DIR --lora-gguf -o adapter.gguf`"


def _pairs(a: GGUFFile, where: str) -> dict[str, dict[str, tuple[int, ...]]]:
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in a.tensors:
        for suffix in (".lora_a", ".lora_b"):
            if t.name.endswith(suffix):
                pairs.setdefault(t.name.removesuffix(suffix), {})[suffix] = t.shape
                break
        else:
            if not t.name.endswith("_norm.weight"):  # llama.cpp skips adapter norms; anything else it refuses
                raise GGUFError(f"adapter tensor {t.name!r} is neither a .lora_a nor a .lora_b", where=where)
    return pairs


def _check_shapes(pairs: dict[str, dict[str, tuple[int, ...]]], base: GGUFFile, where: str) -> int:
    """The rank; ``GGUFError`` listing every pair that does not fit the base."""
    problems, ranks = [], set()
    for name, ab in sorted(pairs.items()):
        a, b, w = ab.get(".lora_a"), ab.get(".lora_b"), base.tensor(name)
        if a is None or b is None:
            problems.append(f"{name}: lora_a or lora_b is missing")
        elif w is None:
            problems.append(f"{name}: the base model has no such tensor")
        elif len(a) != 2 or len(b) != 2 or a[0] != w.shape[0] or b[1] != w.shape[1] or a[1] != b[0]:
            problems.append(f"{name}: lora_a {list(a)} and lora_b {list(b)} do not fit the base's {list(w.shape)}")
        else:
            ranks.add(a[1])
    if problems:
        raise GGUFError(
            "the LoRA adapter does not fit the base model:\n    - " + "\n    - ".join(problems[:12]),
            where=where,
            fix="use the base GGUF the adapter was made for",
        )
    return min(ranks) if ranks else 0


def _check_rope(recorded: str, base_fn: Any, n_rot: int, n_ctx: int, where: str) -> str:
    """The adapter's rope in words; ``RuntimeConfigError`` when the base computes another function."""
    try:
        info = json.loads(recorded)
        rope = parse_hf_rope(
            {"rope_parameters": info["rope_parameters"], "max_position_embeddings": info["context_length"]},
            where=f"{where}: {ROPE_KEY}",
        )
    except (ValueError, KeyError, TypeError, EdgeropeError) as exc:
        raise GGUFError(f"the adapter's {ROPE_KEY} cannot be read: {exc}", where=where) from None
    want = inv_freq(rope, n_rot, seq_len=n_ctx)
    err = float(np.max(np.abs(base_fn.inv_freq(n_rot) - want) / want))
    if err > 1e-6 or not math.isclose(base_fn.magnitude, attention_factor(rope), rel_tol=1e-6):
        raise RuntimeConfigError(
            f"the adapter was trained at {describe(rope)}, and the base GGUF computes another rope "
            f"(frequency error {err:.2e}, magnitude {base_fn.magnitude:.6g} vs {attention_factor(rope):.6g})",
            where=where,
            fix="run it on a base GGUF with that rope (`edgerope set-rope BASE.gguf -o ... --type ... --factor ...`),"
            " or convert the adapter merged: `edgerope convert ADAPTER_DIR -o model.gguf`",
        )
    return describe(rope)


def check_adapter(
    path: str | Path, *, base: str | Path, base_rope: Any, n_rot: int, n_ctx: int, scale: float
) -> AdapterPlan:
    """Check the adapter GGUF ``path`` against the base GGUF ``base`` whose rope function (``LlamaCppRope``) is
    ``base_rope`` at ``n_ctx``; returns what it holds, or raises ``GGUFError`` / ``RuntimeConfigError``."""
    p = Path(path)
    where = str(p)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise RuntimeConfigError(f"the LoRA scale must be a finite number, got {scale!r}")
    with open_gguf(p) as a, open_gguf(base) as b:
        kind, atype = a.get("general.type"), a.get("adapter.type")
        if kind != "adapter" or atype != "lora":
            raise GGUFError(
                f"not a LoRA adapter GGUF (general.type {kind!r}, adapter.type {atype!r})",
                where=where,
                fix=ADAPTER_FIX,
            )
        if a.get("general.architecture") != b.architecture:
            raise GGUFError(
                f"the adapter is for {a.get('general.architecture')!r}, the base model is {b.architecture!r}",
                where=where,
                fix="use the base GGUF the adapter was made for",
            )
        rank = _check_shapes(_pairs(a, where), b, where)
        recorded = a.get(ROPE_KEY)
        words = _check_rope(recorded, base_rope, n_rot, n_ctx, where) if isinstance(recorded, str) else None
        alpha = float(a.get("adapter.lora.alpha", 0.0) or 0.0)
        return AdapterPlan(p, float(scale), alpha, rank, len(_pairs(a, where)), words)
