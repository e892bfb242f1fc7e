"""Prefill A/B in one process: ``Runtime.prefill`` vs llama-cpp-python's ``Llama.eval`` vs edgerope's raw decode.

Why: ``bench_runtime.py`` runs each engine in its own child process, and on the shared 2-core VM it measured
edgerope's f16-cache prefill at 0.82-0.87x llama-bench while plain llama-cpp-python reached 0.93-0.96x.  This
script asks whether edgerope's prefill path itself costs anything: one process loads the same GGUF into an
edgerope ``Runtime`` and a ``llama_cpp.Llama`` with identical settings (2 threads, n_batch = n_ubatch = 512,
flash attention, the given cache type), and times, round after round, three ways to fill the cache with the
same random prompt: ``Runtime.prefill`` (clears the cache, then decodes in n_batch chunks with no outputs),
``Llama.eval`` (after ``reset()``; its last token's logits computed), and ``NativeContext.decode`` called directly.
The order of the three rotates every round (all 6 permutations), so neither warm caches nor load drift favour one.

Input: the random 246M-parameter Q4_K_M GGUF that ``bench_runtime.py`` builds in ``bench/.work/runtime_model``.
Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_prefill_ab.py [--tokens 2048] [--kv f16] [--rounds 6]``
Writes ``bench/results/prefill_ab.json``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import _common as C

MODEL = C.WORK_DIR / "runtime_model" / "model-q4_k_m.gguf"
RESULT = C.RESULTS_DIR / "prefill_ab.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--kv", default="f16", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    if not MODEL.is_file():
        raise SystemExit(f"{MODEL} is missing: run bench/bench_runtime.py once to build it")
    import llama_cpp
    import numpy as np

    from edgerope.runtime.runtime import Runtime

    n, kv = args.tokens, args.kv
    gtype = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}[kv]
    rt = Runtime.open(MODEL, n_ctx=n + 72, type_k=kv, type_v=kv, n_threads=2, n_batch=512, flash_attn="on")
    llm = llama_cpp.Llama(model_path=str(MODEL), n_ctx=n + 72, n_batch=512, n_ubatch=512, n_threads=2,
                          n_threads_batch=2, type_k=gtype, type_v=gtype, flash_attn=True, logits_all=False,
                          n_gpu_layers=0, verbose=False)  # fmt: skip
    prompt = np.random.default_rng(0).integers(100, rt.n_vocab, size=n, dtype=np.int32)
    ctx = rt._open()[1]

    def timed(fn) -> float:  # noqa: ANN001
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)

    def run_lcp() -> float:
        llm.reset()
        return timed(lambda: llm.eval(prompt.tolist()))

    def run_direct() -> float:
        ctx.clear()
        return timed(lambda: ctx.decode(prompt, outputs="none"))

    cases = {"edgerope Runtime.prefill": lambda: timed(lambda: rt.prefill(prompt)),
             "llama-cpp-python Llama.eval": run_lcp, "edgerope NativeContext.decode": run_direct}  # fmt: skip
    orders = list(itertools.permutations(cases))
    load = C.load_average()
    res: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in orders[r % len(orders)]:
            tps = cases[name]()
            if r:
                res[name].append(tps)
    ref = statistics.median(res["llama-cpp-python Llama.eval"])
    rows = [[k, f"{statistics.median(v):.1f}", f"{min(v):.0f}", f"{max(v):.0f}", f"{statistics.median(v) / ref:.3f}x"]
            for k, v in res.items()]  # fmt: skip
    print(f"prefill of {n} tokens, {kv} KV, 2 threads, flash attention, {args.rounds} rounds (order rotated)")
    print(C.format_table(["case", "median tok/s", "min", "max", "x llama-cpp-python"], rows))
    C.write_json(RESULT, {"benchmark": "prefill_ab", "machine": C.machine_info(), "load_average_before": load,
                          "tokens": n, "kv": kv, "rounds": args.rounds, "tokens_per_s": res})  # fmt: skip


if __name__ == "__main__":
    main()
