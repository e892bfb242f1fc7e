"""Checking a GGUF edgerope has just written, before it is renamed into place (convert and set-rope share it).

* ``open_written`` re-reads the file, turning any read error into ``OutputError``;
* ``rope_plan_problems``: the plan's rope keys are there with their exact types and values, the keys it removes
  are absent, its frequency-factor tensors hold the planned F32 values;
* ``rope_function_problem``: the function llama.cpp resolves from the written keys (``LlamaCppRope``, with the
  plan's runtime parameters) equals the rope variant's inverse frequencies and magnitude -- the contract
  itself, checked on the bytes on disk.

What it does not do: check tensor data or the rest of the metadata (each writer knows what it copied).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from edgerope.errors import EdgeropeError, OutputError
from edgerope.gguf.reader import GGUFFile, open_gguf
from edgerope.rope.ggml import LlamaCppRope, has_sliding_rope
from edgerope.rope.gguf_plan import GGUFRopePlan
from edgerope.rope.scaling import RopeScaling, attention_factor, inv_freq


def open_written(path: Path, *, what: str = "the written GGUF") -> GGUFFile:
    """Re-open a file just written; ``OutputError`` when it does not read back as a GGUF."""
    try:
        return open_gguf(path)
    except EdgeropeError as exc:
        raise OutputError(f"{what} cannot be read back: {exc.what}", where=str(path)) from None


def rope_plan_problems(g: GGUFFile, plan: GGUFRopePlan) -> list[str]:
    """Where the written rope keys and factor tensors differ from ``plan`` (empty: none)."""
    problems = []
    for name, values in plan.tensors.items():
        t = g.tensor(name)
        if t is None or t.data_offset + t.n_bytes > g.file_size:
            problems.append(f"rope tensor {name} is missing")
        elif not np.array_equal(g.tensor_values(name), values.astype(np.float32).ravel()):
            problems.append(f"rope tensor {name} differs from the plan")
    for k, (value, vtype) in plan.kv.items():
        mv = g.metadata.get(k)
        if mv is None:
            problems.append(f"rope key {k} is missing")
            continue
        expect = float(np.float32(value)) if vtype == GGUFValueType.FLOAT32 else value
        if mv.type != vtype or mv.value != expect:
            problems.append(f"rope key {k}: stored {mv.value!r} ({mv.type.name}), planned {value!r} ({vtype.name})")
    problems += [f"rope key {k} must not be present" for k in plan.remove if k in g.metadata]
    return problems


def rope_function_problem(
    g: GGUFFile,
    rope: RopeScaling,
    *,
    n_rot: int,
    plan: GGUFRopePlan,
    n_ctx: int | None = None,
    layer: str = "full",
) -> str | None:
    """None when llama.cpp would compute ``rope`` from the written file (1e-6 relative), else why not.

    ``n_ctx``: the context both sides are resolved at (LongRoPE picks its factors from it; docs/llama_cpp.md
    pitfall 8); None: llama.cpp's default context and Hugging Face's short sequences.  ``layer``
    ``"sliding"``: the sliding-window layers of an arch that ropes them on a base of their own (Gemma 3);
    checking the full layers checks these too when the plan records their rope (``plan.sliding``)."""
    if layer == "full" and plan.sliding is not None and has_sliding_rope(g.architecture, g.arch_kv()):
        problem = rope_function_problem(g, plan.sliding, n_rot=n_rot, plan=plan, n_ctx=n_ctx, layer="sliding")
        if problem:
            return problem
    got = LlamaCppRope.from_gguf(
        g.architecture, g.arch_kv(), tensors=g.freq_factors(), n_ctx=n_ctx, runtime=plan.runtime, layer=layer
    )
    want = inv_freq(rope, n_rot, seq_len=n_ctx)
    err = float(np.max(np.abs(got.inv_freq(n_rot) - want) / want))
    if err > 1e-6 or not math.isclose(got.magnitude, attention_factor(rope), rel_tol=1e-6):
        return (
            f"llama.cpp would resolve a different rope function{'' if layer == 'full' else ' on the ' + layer + ' layers'}"
            f" (frequency error {err:.2e}, magnitude "
            f"{got.magnitude:.6g} vs {attention_factor(rope):.6g})"
        )
    return None
