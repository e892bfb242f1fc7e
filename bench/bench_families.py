"""Benchmark: edgerope's converter and llama.cpp's own, per family and rope variant, through one parity check.

What it measures: for every family x rope-variant cell of ``tests/helpers/families.py`` (Llama 3.x, SmolLM2,
Qwen3, Gemma 3, Phi-3.5/Phi-4-mini, SmolLM3; tiny random checkpoints, trained context 64), the logits of
llama.cpp (f32 weights, f32 KV cache, one sequence of 4x the trained context) on

  edgerope   ``edgerope.convert.export.convert(..., outtype="f32")``
  llama.cpp  the vendored ``convert_hf_to_gguf.py --outtype f32`` of the llama-cpp-python 0.3.36 sdist (fetched
             with ``pip download`` by bench/bench_convert.py's ``llama_cpp_converter``; never copied here)

against the reference: transformers 5.24 (fp32, eager) where it builds the config, else edgerope's PyTorch
model (Phi-3 with YaRN, which transformers refuses).  Each file is classified ``exact`` (relative L2 of the
logits <= 1e-4, 1e-3 for GeGLU Gemma 3: docs/llama_cpp.md §11.5), ``different`` (it loads and runs and
computes something else -- silently), ``refused`` (edgerope's typed error, with its reason), ``converter
error`` or ``load error``.  The rope keys each file holds are recorded, so a difference can be read off them.

What it does not do: time anything, or test (tests/convert/test_families.py is the CI check of edgerope's
column; this script is where llama.cpp's converter is compared).

    PYTHONPATH=. .venv/bin/python bench/bench_families.py [--cells ID ...]

Writes ``bench/results/families.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

sys.path.insert(0, str(C.REPO_ROOT / "tests"))  # the cells are the tests' own (tests/helpers/families.py)
from bench_convert import llama_cpp_converter  # noqa: E402
from helpers.families import CELLS, L0, Cell, T  # noqa: E402

RESULT = C.RESULTS_DIR / "families.json"
TOKENS = [2] + np.random.default_rng(0).integers(3, 1000, size=T - 1).tolist()
ROPE_KEY_PARTS = (".rope.", ".context_length", ".sliding_window", "attention.key_length", "final_logit_softcapping")


def reference(path: Path, cell: Cell) -> tuple[np.ndarray, str]:
    import torch

    if cell.hf:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        what = "transformers"
    else:
        from edgerope.models.base import CausalLM

        model, what = CausalLM.from_pretrained(path), "edgerope PyTorch (transformers refuses this config)"
    with torch.no_grad():
        out = model.eval()(torch.tensor([TOKENS]))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits[0].float().numpy().astype(np.float64), what


def run_llama_cpp(path: Path) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False
    )
    try:
        llm.eval(TOKENS)
        return np.asarray(llm.scores[:T], dtype=np.float64)
    finally:
        llm.close()


def rope_keys(path: Path) -> dict[str, Any]:
    import gguf

    r = gguf.GGUFReader(path)
    out: dict[str, Any] = {k: f.contents() for k, f in r.fields.items() if any(p in k for p in ROPE_KEY_PARTS)}
    out["tensors"] = sorted(t.name for t in r.tensors if t.name.startswith("rope_"))
    return out


def judge(path: Path, ref: np.ndarray, tol: float) -> dict[str, Any]:
    """Load ``path`` in llama.cpp and compare; the outcome with its numbers and the rope keys."""
    try:
        got = run_llama_cpp(path)
    except Exception as exc:  # llama_cpp raises ValueError on a failed load; keep whatever it says
        return {"outcome": "load error", "error": f"{type(exc).__name__}: {exc}", "rope_keys": rope_keys(path)}
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    edges = [0, L0, 2 * L0, T]
    per = {f"{a}-{b - 1}": float(np.linalg.norm(got[a:b] - ref[a:b]) / np.linalg.norm(ref[a:b])) for a, b in
           zip(edges, edges[1:], strict=False)}  # fmt: skip
    return {
        "outcome": "exact" if rel <= tol else "different",
        "rel_l2": rel,
        "rel_l2_by_position": per,
        "rope_keys": rope_keys(path),
    }


def edgerope_column(hf: Path, out: Path, ref: np.ndarray, tol: float) -> dict[str, Any]:
    from edgerope.convert.export import convert
    from edgerope.errors import EdgeropeError

    try:
        report = convert(hf, out, outtype="f32")
    except EdgeropeError as exc:
        return {"outcome": "refused", "error": type(exc).__name__, "reason": exc.what}
    return {**judge(out, ref, tol), "rope": report.rope, "notes": list(report.notes) + list(report.rope_notes)}


def llama_cpp_column(hf: Path, out: Path, ref: np.ndarray, tol: float) -> dict[str, Any]:
    script = llama_cpp_converter()
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(script), str(hf), "--outtype", "f32", "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        return {"outcome": "converter error", "error": "\n".join(lines[-3:])}
    return judge(out, ref, tol)


def run_cell(cell: Cell, work: Path, tok_dir: Path) -> dict[str, Any]:
    hf = cell.make(work / cell.id.replace("phi", "p"), tok_dir)  # a folder named like Phi-3 changes llama.cpp's vocab
    ref, what = reference(hf, cell)
    tol = 1e-3 if cell.geglu else 1e-4
    t0 = time.perf_counter()
    row = {
        "id": cell.id,
        "family": cell.family,
        "variant": cell.variant,
        "model_type": cell.model_type,
        "reference": what,
        "tolerance_rel_l2": tol,
        "edgerope_expected": cell.expect,
        "edgerope": edgerope_column(hf, work / f"{cell.id}.edgerope.gguf", ref, tol),
        "llama_cpp_converter": llama_cpp_column(hf, work / f"{cell.id}.llama_cpp.gguf", ref, tol),
    }
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def count(col: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in rows:
            out[r[col]["outcome"]] = out.get(r[col]["outcome"], 0) + 1
        return out

    silent = [r["id"] for r in rows if r["llama_cpp_converter"]["outcome"] == "different"]
    return {
        "cells": len(rows),
        "edgerope": count("edgerope"),
        "llama_cpp_converter": count("llama_cpp_converter"),
        "llama_cpp_converter_silently_different": silent,
        "edgerope_exact_or_refused_everywhere": all(r["edgerope"]["outcome"] in ("exact", "refused") for r in rows),
        "edgerope_matches_expectation": all(
            (r["edgerope"]["outcome"] == "exact") == (r["edgerope_expected"] == "exact") for r in rows
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="*", help="cell ids (default: all)")
    args = ap.parse_args(argv)
    import transformers

    from edgerope.models.tiny_random import train_tokenizer

    transformers.logging.set_verbosity_error()
    cells = [c for c in CELLS if not args.cells or c.id in args.cells]
    rows = []
    with tempfile.TemporaryDirectory(dir=C.WORK_DIR if C.WORK_DIR.is_dir() else None) as tmp:
        work = Path(tmp)
        train_tokenizer(work / "tok")
        for cell in cells:
            row = run_cell(cell, work, work / "tok")
            rows.append(row)
            er, lc = row["edgerope"], row["llama_cpp_converter"]
            print(
                f"{cell.id:24s} edgerope {er['outcome']:9s} {er.get('rel_l2', float('nan')):9.2e}   "
                f"llama.cpp {lc['outcome']:15s} {lc.get('rel_l2', float('nan')):9.2e}",
                flush=True,
            )
    result = {
        "benchmark": "families",
        "when": C.now_utc(),
        "machine": C.machine_info(),
        "settings": {
            "original_context": L0,
            "positions": T,
            "weights": "f32",
            "kv_cache": "f32",
            "llama_cpp_python": "0.3.36",
            "reference": "transformers 5.24 (fp32, eager), else edgerope's PyTorch model",
        },
        "summary": summarize(rows),
        "cells": rows,
    }
    C.write_json(RESULT, result)
    print(C.format_table(["summary", "value"], [[k, str(v)] for k, v in result["summary"].items()]))


if __name__ == "__main__":
    main()
