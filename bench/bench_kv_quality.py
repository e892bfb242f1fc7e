"""KV-cache quantization quality: how far f16, q8_0 and q4_0 caches move the logits of a 2048-token prompt.

For one GGUF (the random 246M-parameter Q4_K_M model that ``bench_runtime.py`` builds and caches in
``bench/.work/runtime_model``; a smaller random model is built if it is missing) this evaluates the same
2048-token prompt with ``Runtime.logits`` under each cache type and compares every position's next-token
distribution with an f32-cache run (flash attention off, the reference) and with the f16-cache run (the noise
floor, see docs/EVAL.md "KV-cache quantization"): mean and max KL divergence, top-1 agreement and relative L2
of the logits, per position bucket.  Two prompts: random token ids (fixed seed) and the start of CPython's
``pydoc_data.topics`` text.

What it does not do: the weights are random, so the numbers show how much the cache quantization perturbs this
network's computation, not how much a trained model's quality drops; passkey/retrieval accuracy needs a trained
model (issue 3).  It measures no speed (see ``bench_runtime.py``).

Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_kv_quality.py``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

RUNTIME_MODEL = C.WORK_DIR / "runtime_model" / "model-q4_k_m.gguf"  # built by bench_runtime.py
SMALL_DIR = C.WORK_DIR / "kv_quality_model"
SMALL_MODEL = SMALL_DIR / "model-f16.gguf"
RESULT = C.RESULTS_DIR / "kv_quality.json"
N_TOKENS = 2048
N_CTX = 2048
THREADS = 2
SEED = 0
BUCKETS = ((0, 512), (512, 1024), (1024, 2048))
# (cache type, flash attention): f32 is the reference and runs without flash attention
CASES = (("f32", "off"), ("f16", "on"), ("q8_0", "on"), ("q4_0", "on"))

SMALL_SPEC: dict[str, Any] = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1408,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}

_BUILD_CODE = """
import json, sys, tempfile
from pathlib import Path
from edgerope.models.tiny_random import make_tiny_checkpoint
from edgerope.convert.export import convert
spec = json.loads(sys.argv[1]); out = Path(sys.argv[2])
cfg = {k: v for k, v in spec.items() if k != "vocab_size"}
with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", vocab_size=spec["vocab_size"], weight_std=0.02, **cfg)
    convert(ckpt, out, outtype="f16")
"""


def pick_model() -> tuple[Path, str]:
    """The cached runtime-bench model if it is there, else a smaller random f16 model (built once)."""
    if RUNTIME_MODEL.is_file():
        spec = json.loads((RUNTIME_MODEL.parent / "spec.json").read_text())
        return RUNTIME_MODEL, f"bench_runtime model (random weights, {spec})"
    if not SMALL_MODEL.is_file():
        SMALL_DIR.mkdir(parents=True, exist_ok=True)
        print(f"building {SMALL_MODEL} ...", file=sys.stderr, flush=True)
        subprocess.run(
            [sys.executable, "-c", _BUILD_CODE, json.dumps(SMALL_SPEC), str(SMALL_MODEL)],
            env={**__import__("os").environ, **C.edgerope_env()},
            check=True,
        )
    return SMALL_MODEL, f"small random f16 model ({SMALL_SPEC})"


def prompts(rt: Any) -> dict[str, np.ndarray]:
    """Two 2048-token prompts: random ids (seeded) and the start of pydoc_data.topics."""
    from pydoc_data.topics import topics

    rand = np.random.default_rng(SEED).integers(100, rt.n_vocab, size=N_TOKENS, dtype=np.int32)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = rt.tokenize(text[: 40 * N_TOKENS])
    if len(ids) < N_TOKENS:
        ids = rt.tokenize(text)
    doc = np.asarray(ids[:N_TOKENS], dtype=np.int32)
    assert len(doc) == N_TOKENS, len(doc)
    return {"random_ids": rand, "pydoc_topics": doc}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(test: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Per bucket: KL(ref || test) mean/max per position, top-1 agreement, relative L2 of the logits."""
    out: dict[str, Any] = {}
    for lo, hi in ((0, N_TOKENS), *BUCKETS):
        t, r = test[lo:hi], ref[lo:hi]  # (n, n_vocab)
        lp_t, lp_r = _log_softmax(t), _log_softmax(r)
        kl = (np.exp(lp_r) * (lp_r - lp_t)).sum(axis=-1)  # (n,)
        out[f"{lo}-{hi - 1}"] = {
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "top1_agree": float((t.argmax(-1) == r.argmax(-1)).mean()),
            "rel_l2": float(np.linalg.norm(t - r) / np.linalg.norm(r)),
        }
    return out


def run_prompt(model: Path, tokens: np.ndarray, kv_types: list[str]) -> dict[str, Any]:
    from edgerope.runtime.runtime import Runtime

    logits: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {}
    for kv, fa in CASES:
        if kv not in kv_types:
            continue
        t0 = time.perf_counter()
        with Runtime.open(model, n_ctx=N_CTX, type_k=kv, type_v=kv, flash_attn=fa, n_threads=THREADS) as rt:
            logits[kv] = rt.logits(tokens)  # (N_TOKENS, n_vocab)
            info[kv] = {"flash_attn": rt.info.flash_attn, "type_k": rt.info.type_k, "s": time.perf_counter() - t0}
        print(f"  {kv}: {info[kv]['s']:.1f} s", file=sys.stderr, flush=True)
    res: dict[str, Any] = {"runs": info, "vs_f32": {}, "vs_f16": {}}
    for kv in logits:
        if kv != "f32" and "f32" in logits:
            res["vs_f32"][kv] = compare(logits[kv], logits["f32"])
        if kv not in ("f32", "f16") and "f16" in logits:
            res["vs_f16"][kv] = compare(logits[kv], logits["f16"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", nargs="+", default=[kv for kv, _ in CASES])
    args = ap.parse_args()
    from edgerope.runtime.runtime import Runtime

    model, model_desc = pick_model()
    with Runtime.open(model, n_ctx=N_CTX, n_threads=THREADS) as rt:
        ps = prompts(rt)
    load_before = C.load_average()
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for name, toks in ps.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = run_prompt(model, toks, args.kv)

    headers = ["prompt", "KV", "vs", "positions", "KL mean", "KL max", "top-1 agree", "rel L2"]
    rows = []
    for name, res in results.items():
        for ref in ("f32", "f16"):
            for kv, buckets in res[f"vs_{ref}"].items():
                for pos, m in buckets.items():
                    rows.append(
                        [name, kv, ref, pos, f"{m['kl_mean']:.2e}", f"{m['kl_max']:.2e}",
                         f"{100 * m['top1_agree']:.2f}%", f"{m['rel_l2']:.2e}"]
                    )  # fmt: skip
    table = C.format_table(headers, rows)
    print(table)
    C.write_json(
        RESULT,
        {
            "benchmark": "kv_quality",
            "date_utc": C.now_utc(),
            "machine": C.machine_info(),
            "load_average_before": load_before,
            "load_average_after": C.load_average(),
            "total_s": time.perf_counter() - t_start,
            "model": {"path": str(model.relative_to(C.REPO_ROOT)), "bytes": model.stat().st_size, "desc": model_desc},
            "caveat": "random weights: the numbers measure how much cache quantization perturbs this network, not "
            "a trained model's quality loss; passkey accuracy needs a trained model (issue 3)",
            "settings": {
                "n_tokens": N_TOKENS,
                "n_ctx": N_CTX,
                "threads": THREADS,
                "seed": SEED,
                "cases": [{"kv": kv, "flash_attn": fa} for kv, fa in CASES if kv in args.kv],
                "kl": "KL(reference || test) of the next-token distributions, nats, per position",
                "rel_l2": "||test - ref||_F / ||ref||_F over the bucket's logits",
            },
            "results": results,
            "table": table,
        },
    )
    print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()
