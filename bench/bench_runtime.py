"""Benchmark: prefill and decode tokens/s of ``edgerope.runtime.runtime.Runtime`` vs llama-cpp-python vs llama-bench.

What it measures, on one synthetic Llama-shaped Q4_K_M GGUF (about 245M parameters, random weights, built
once with ``edgerope.models.tiny_random.make_tiny_checkpoint`` -> ``edgerope.convert.export.convert`` f16 ->
``edgerope.convert.quantize.quantize`` Q4_K_M and cached in ``bench/.work``), 2 threads, flash attention on,
n_batch = n_ubatch = 512, for every KV cache type (f16, q8_0, q4_0) and prompt length (512, 2048):

  edgerope          ``Runtime.open(...)``; ``rt.prefill(prompt)`` timed (prefill); then
                    ``rt.generate([tok], 64, clear=False, stop_at_eog=False)`` timed (decode: 64 single-token
                    decodes after the prompt, greedy with llama.cpp's sampler chain)
  llama-cpp-python  ``llama_cpp.Llama(..., flash_attn=True, logits_all=False)``; ``llm.eval(prompt)`` timed;
                    then ``llm.generate([tok], temp=0, reset=False)`` for 64 tokens timed
  llama-bench       llama.cpp's own tool built from the llama-cpp-python 0.3.36 sdist (``-o json``):
                    ``-p N -n 0`` (prefill) and ``-p 0 -n 64 -d N`` (decode after N cached positions)

The prompt is N random token ids (fixed seed), like llama-bench's.  Each (engine, cache type, length) case
runs in a fresh child process: one untimed warm-up, then ``--runs`` timed repetitions (median reported).
Cases are interleaved by cache type and length.

What it does not do: it is not a test, checks no output text (random weights), and measures no GPU.

    PYTHONPATH=. .venv/bin/python bench/bench_runtime.py [--runs 3] [--lengths 512 2048] [--no-llama-bench]

Writes ``bench/results/runtime.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

MODEL_DIR = C.WORK_DIR / "runtime_model"
MODEL = MODEL_DIR / "model-q4_k_m.gguf"
LLAMA_BENCH = (
    C.WORK_DIR / "lcbuild" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-bench"
)
LLAMA_BENCH_CMAKE = (
    "cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON && "
    "cmake --build build --target llama-bench -j2  (in vendor/llama.cpp of the unpacked sdist)"
)
RESULT = C.RESULTS_DIR / "runtime.json"
KV_TYPES = ("f16", "q8_0", "q4_0")
N_GEN = 64
THREADS = 2
N_BATCH = 512

SPEC: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_hidden_layers": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "qtype": "Q4_K_M",
}

_BUILD_CODE = """
import json, sys, tempfile
from pathlib import Path
from edgerope.models.tiny_random import make_tiny_checkpoint
from edgerope.convert.export import convert
from edgerope.convert.quantize import quantize
spec = json.loads(sys.argv[1]); out = Path(sys.argv[2])
cfg = {k: v for k, v in spec.items() if k not in ("qtype", "vocab_size")}
with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", vocab_size=spec["vocab_size"], weight_std=0.02, **cfg)
    f16 = Path(tmp) / "f16.gguf"
    convert(ckpt, f16)
    quantize(f16, out, qtype=spec["qtype"], force=True)
"""

# One child per case: warm-up + timed repetitions; prints one JSON line.
_EDGEROPE_CODE = """
import json, sys, time
import numpy as np
from edgerope.runtime.runtime import Runtime
model, n, n_gen, kv, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rt = Runtime.open(model, n_ctx=n + n_gen + 8, type_k=kv, type_v=kv, n_threads=2, n_batch=512, flash_attn="on")
info = rt.info
prompt = np.random.default_rng(0).integers(100, rt.n_vocab, size=n, dtype=np.int32)
pre, dec = [], []
for i in range(runs + 1):
    t0 = time.perf_counter(); rt.prefill(prompt); t1 = time.perf_counter()
    g = rt.generate([int(prompt[-1])], n_gen, clear=False, stop_at_eog=False); t2 = time.perf_counter()
    assert len(g.tokens) == n_gen, (len(g.tokens), g.stop_reason)
    if i:
        pre.append(n / (t1 - t0)); dec.append(n_gen / (t2 - t1))
print(json.dumps({"prefill_tps": pre, "decode_tps": dec, "flash_attn": info.flash_attn, "type_k": info.type_k}))
"""

_LCP_CODE = """
import json, sys, time
import numpy as np
import llama_cpp
model, n, n_gen, kv, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
gtype = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[kv]
llm = llama_cpp.Llama(model_path=model, n_ctx=n + n_gen + 8, n_batch=512, n_ubatch=512, n_threads=2,
                      n_threads_batch=2, type_k=gtype, type_v=gtype, flash_attn=True, logits_all=False,
                      n_gpu_layers=0, verbose=False)
prompt = np.random.default_rng(0).integers(100, llm.n_vocab(), size=n).tolist()
pre, dec = [], []
for i in range(runs + 1):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(prompt); t1 = time.perf_counter()
    got = 0
    for _tok in llm.generate([prompt[-1]], temp=0.0, top_k=1, reset=False):
        got += 1
        if got == n_gen:
            break
    t2 = time.perf_counter()
    if i:
        pre.append(n / (t1 - t0)); dec.append(n_gen / (t2 - t1))
print(json.dumps({"prefill_tps": pre, "decode_tps": dec}))
"""


_TTFT_CODE = """
import json, shutil, sys, tempfile, time
from pathlib import Path
from pydoc_data.topics import topics
from edgerope.apps.ask import ask
from edgerope.runtime.runtime import Runtime
model, n_doc, runs, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
rt = Runtime.open(model, n_ctx=4096, n_threads=2, flash_attn="on")
text = "\\n\\n".join(topics[k] for k in sorted(topics))
lo, hi = 0, len(text)  # cut the text to about n_doc tokens
while hi - lo > 200:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if len(rt.tokenize(text[:mid])) < n_doc else (lo, mid)
doc = text[:lo]
first, second, doc_tokens = [], [], 0
for i in range(runs + 1):
    cache = Path(tempfile.mkdtemp(dir=work))
    a = ask(model, doc, "What does the document say about loops?", runtime=rt, cache_dir=cache, max_tokens=4)
    b = ask(model, doc, "Which keywords are mentioned first?", runtime=rt, cache_dir=cache, max_tokens=4)
    shutil.rmtree(cache)
    assert not a.cached and b.cached, (a.cached, b.cached)
    doc_tokens = a.document_tokens
    if i:
        first.append(a.timings.time_to_first_token_s); second.append(b.timings.time_to_first_token_s)
print(json.dumps({"document_tokens": doc_tokens, "first_ttft_s": first, "cached_ttft_s": second}))
"""


def run_ttft(runs: int, n_doc: int = 3000) -> dict[str, Any]:
    log = C.WORK_DIR / "runtime_ttft.log"
    cmd = [sys.executable, "-c", _TTFT_CODE, str(MODEL), str(n_doc), str(runs), str(C.WORK_DIR)]
    data, _ = _child_json(cmd, log)
    data["median_first_ttft_s"] = statistics.median(data["first_ttft_s"])
    data["median_cached_ttft_s"] = statistics.median(data["cached_ttft_s"])
    data["speedup"] = data["median_first_ttft_s"] / data["median_cached_ttft_s"]
    return data


def build_model() -> None:
    spec_file = MODEL_DIR / "spec.json"
    if MODEL.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == SPEC:
        return
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    print(f"building {MODEL} ...", file=sys.stderr, flush=True)
    subprocess.run(
        [sys.executable, "-c", _BUILD_CODE, json.dumps(SPEC), str(MODEL)],
        env={**__import__("os").environ, **C.edgerope_env()},
        check=True,
    )
    spec_file.write_text(json.dumps(SPEC))


def _child_json(cmd: list[str], log: Path) -> tuple[dict[str, Any], C.Run]:
    run = C.run_measured(cmd, env=C.edgerope_env(), log_path=log)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith(("{", "["))]
    return json.loads(lines[-1]), run


def run_python_engine(engine: str, n: int, kv: str, runs: int) -> dict[str, Any]:
    code = _EDGEROPE_CODE if engine == "edgerope" else _LCP_CODE
    log = C.WORK_DIR / f"runtime_{engine}_{kv}_{n}.log"
    data, run = _child_json([sys.executable, "-c", code, str(MODEL), str(n), str(N_GEN), kv, str(runs)], log)
    data["child_wall_s"] = run.wall_s
    data["peak_rss_bytes"] = run.peak_rss_bytes
    return data


def _llama_bench(args: list[str], kv: str, runs: int, log: Path) -> tuple[list[float], dict[str, Any]]:
    cmd = [str(LLAMA_BENCH), "-m", str(MODEL), "-t", str(THREADS), "-fa", "1", "-ctk", kv, "-ctv", kv]
    cmd += ["-b", str(N_BATCH), "-ub", str(N_BATCH), "-ngl", "0", "-r", str(runs), "-o", "json", *args]
    C.run_measured(cmd, log_path=log)
    text = log.read_text()
    data = json.loads(text[text.index("[") : text.rindex("]") + 1])
    rec = data[0]
    samples = rec.get("samples_ns") or [rec["avg_ns"]]
    return [1e9 * (rec["n_prompt"] + rec["n_gen"]) / ns for ns in samples], rec


def run_llama_bench(n: int, kv: str, runs: int) -> dict[str, Any]:
    pre, rec = _llama_bench(["-p", str(n), "-n", "0"], kv, runs, C.WORK_DIR / f"runtime_lb_pp_{kv}_{n}.log")
    dec, _ = _llama_bench(
        ["-p", "0", "-n", str(N_GEN), "-d", str(n)], kv, runs, C.WORK_DIR / f"runtime_lb_tg_{kv}_{n}.log"
    )
    keep = ("build_commit", "build_number", "cpu_info", "backends", "type_k", "type_v", "flash_attn", "n_batch")
    return {"prefill_tps": pre, "decode_tps": dec, "llama_bench": {k: rec.get(k) for k in keep}}


def _med(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _fmt(x: float | None) -> str:
    return f"{x:.1f}" if x else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--kv", nargs="+", default=list(KV_TYPES))
    ap.add_argument("--no-llama-bench", action="store_true")
    ap.add_argument("--no-ttft", action="store_true")
    ap.add_argument("--only-ttft", action="store_true")
    args = ap.parse_args()

    build_model()
    use_lb = not args.no_llama_bench and LLAMA_BENCH.is_file()
    engines = ["edgerope", "llama-cpp-python"] + (["llama-bench"] if use_lb else [])
    load_before = C.load_average()
    t_start = time.perf_counter()
    cases: dict[str, dict[str, Any]] = {}
    for n in [] if args.only_ttft else args.lengths:
        for kv in args.kv:
            key = f"{kv}/{n}"
            cases[key] = {"kv": kv, "n_prompt": n, "n_gen": N_GEN}
            for engine in engines:
                print(f"{key} {engine} ...", file=sys.stderr, flush=True)
                try:
                    if engine == "llama-bench":
                        res = run_llama_bench(n, kv, args.runs)
                    else:
                        res = run_python_engine(engine, n, kv, args.runs)
                except (C.CommandFailed, ValueError, KeyError, IndexError) as e:
                    res = {"error": str(e)[-2000:]}
                    print(f"  failed: {str(e)[-500:]}", file=sys.stderr)
                res["median_prefill_tps"] = _med(res.get("prefill_tps"))
                res["median_decode_tps"] = _med(res.get("decode_tps"))
                cases[key][engine] = res

    headers = ["KV", "prompt", "edgerope pp", "lcp pp", "llama-bench pp", "er/lb pp", "lcp/lb pp"]
    headers += ["edgerope tg", "lcp tg", "llama-bench tg", "er/lb tg", "lcp/lb tg"]
    rows = []
    for c in cases.values():
        er, lcp, lb = (c.get(e, {}) for e in ("edgerope", "llama-cpp-python", "llama-bench"))
        row: list[Any] = [c["kv"], c["n_prompt"]]
        for what in ("median_prefill_tps", "median_decode_tps"):
            a, b, ref = er.get(what), lcp.get(what), lb.get(what)
            row += [_fmt(a), _fmt(b), _fmt(ref), _ratio(a, ref), _ratio(b, ref)]
        rows.append(row)
    table = C.format_table(headers, rows)
    print(table)
    ttft = None
    if not args.no_ttft:
        print("time to first token, ask ...", file=sys.stderr, flush=True)
        try:
            ttft = run_ttft(args.runs)
            print(
                f"ask TTFT, {ttft['document_tokens']}-token document (f16 KV): first {ttft['median_first_ttft_s']:.2f} s,"
                f" cached {ttft['median_cached_ttft_s']:.3f} s, {ttft['speedup']:.1f}x"
            )
        except (C.CommandFailed, ValueError, KeyError, IndexError) as e:
            ttft = {"error": str(e)[-2000:]}
            print(f"  failed: {str(e)[-500:]}", file=sys.stderr)

    C.write_json(
        RESULT,
        {
            "benchmark": "runtime",
            "date_utc": C.now_utc(),
            "machine": C.machine_info(),
            "load_average_before": load_before,
            "load_average_after": C.load_average(),
            "total_s": time.perf_counter() - t_start,
            "model": {"path": str(MODEL.relative_to(C.REPO_ROOT)), "bytes": MODEL.stat().st_size, "spec": SPEC},
            "settings": {
                "threads": THREADS,
                "flash_attn": True,
                "n_batch": N_BATCH,
                "n_ubatch": N_BATCH,
                "n_gen": N_GEN,
                "runs": args.runs,
                "llama_bench": str(LLAMA_BENCH.relative_to(C.REPO_ROOT)) if use_lb else None,
                "llama_bench_build": LLAMA_BENCH_CMAKE,
            },
            "targets": {"prefill_vs_llama_bench": 0.97, "decode_vs_llama_bench": 0.95},
            "units": "tokens/s; pp = prefill of n_prompt tokens from an empty cache, tg = 64 single-token "
            "decodes after n_prompt cached positions",
            "cases": cases,
            "table": table,
            "ask_time_to_first_token": ttft,
        },
    )
    print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()
