"""Benchmark: prefill and decode tokens/s under the CPU weight-layout policy (``cpu_repack`` auto / off / on).

What it measures, on the synthetic Llama-shaped model of ``bench_runtime.py`` (its ``SPEC``: about 245M
parameters, random weights) quantized Q4_0 and Q8_0 (``make_tiny_checkpoint`` -> ``convert`` f16 -> ``quantize``,
cached in ``bench/.work/repack_model``), 2 threads, n_batch = n_ubatch = 512, f16 KV, flash attention on:

  edgerope auto/off/on  ``Runtime.open(model, cpu_repack=P, ...)``; ``rt.prefill(prompt)`` timed (prefill), then
                        ``rt.generate([tok], 64, clear=False, stop_at_eog=False)`` timed (decode after N cached
                        positions); what the policy decided (``RuntimeInfo.cpu_repack``) and llama.cpp's
                        "<buffer> model buffer size" log lines (where the weights really went) are recorded
  llama-bench repack 0/1  llama.cpp's own tool built from the llama-cpp-python 0.3.36 sdist (as in
                        ``bench_runtime.py``): ``--repack 0|1`` with ``-p N -n 0`` and ``-p 0 -n 64 -d N``
  llama-bench steered   ``--repack 0 -ot <auto's patterns>=CPU_REPACK``, only if llama-bench accepts that buffer
                        name (it is probed once; the 0.3.36 tool lists only the devices' default buffer types)

Every case is a fresh child process (untimed warm-up, then one timed repetition; llama-bench: its warm-up and
``-r 1``), run once per round; rounds interleave all cases of one prompt length; medians over rounds.  A child that
dies by a signal is a result, "crashed (SIGSEGV)" -- what llama.cpp's AMX repacking does on an AMX Xeon with
``on`` / ``--repack 1`` (SIGILL, too) -- not an error of the bench.  Ratios are against ``off`` / ``--repack 0``.

A shared machine: two threads on two vCPUs lose a time slice at every barrier when a third process runs (decode
fell up to 40x).  The bench records the share of the CPUs others used during each child (``others_busy``:
/proc/stat minus the child's CPU time), waits up to ``--quiet-wait`` s for quiet before it, retries a run with
``others_busy`` >= 10% (``--retries``) and leaves such runs out of the medians (kept in the JSON).  ``--nice -20``
(root) runs each child in its own session (scheduler autogroup) at that niceness, so others get ~1% meanwhile.

What it does not do: it is not a test, checks no output (random weights), times no model load or repacking
at load, and says nothing about GPUs, other thread counts or other quantization types.

    PYTHONPATH=. .venv/bin/python bench/bench_repack.py [--runs 3] [--retries 2] [--lengths 512 2048] [--nice -20]

Writes ``bench/results/repack.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common as C
import bench_runtime as R

MODEL_DIR = C.WORK_DIR / "repack_model"
SPEC = {k: v for k, v in R.SPEC.items() if k != "qtype"}  # the model bench_runtime.py times, unquantized
QTYPES = ("Q4_0", "Q8_0")
POLICIES = ("auto", "off", "on")
RESULT = C.RESULTS_DIR / "repack.json"
N_GEN = 64
THREADS = 2
N_BATCH = 512
CHILD_TIMEOUT_S = 600
SETTINGS = {"quiet_wait_s": 90.0, "nice": 0}  # --quiet-wait, --nice
CONTENDED = 0.10  # a run during which other processes used >= 10% of the CPUs is retried, then left out

_BUILD_CODE = """
import json, sys, tempfile
from pathlib import Path
from edgerope.models.tiny_random import make_tiny_checkpoint
from edgerope.convert.export import convert
from edgerope.convert.quantize import quantize
spec, f16 = json.loads(sys.argv[1]), Path(sys.argv[2])
if not f16.is_file():
    cfg = {k: v for k, v in spec.items() if k != "vocab_size"}
    with tempfile.TemporaryDirectory(dir=f16.parent) as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "ckpt", vocab_size=spec["vocab_size"], weight_std=0.02, **cfg)
        convert(ckpt, f16, force=True)
for arg in sys.argv[3:]:
    qtype, out = arg.split("=", 1)
    quantize(f16, out, qtype=qtype, force=True)
"""

# One child per case: warm-up + timed repetitions; prints one JSON line (stdout), llama.cpp's load log on stderr.
_EDGEROPE_CODE = """
import json, logging, sys, time
import numpy as np
from edgerope.runtime.runtime import Runtime
model, n, n_gen, policy, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
log = logging.getLogger("edgerope.llama_cpp")  # llama.cpp's log, on only while loading (no per-graph flood)
h = logging.StreamHandler(sys.stderr); h.addFilter(lambda r: "buffer size" in r.getMessage())
log.addHandler(h); log.setLevel(logging.DEBUG)
rt = Runtime.open(model, n_ctx=n + n_gen + 8, type_k="f16", type_v="f16", n_threads=2, n_batch=512,
                  flash_attn="on", cpu_repack=policy)
log.setLevel(logging.WARNING)
info = rt.info
print(json.dumps({"cpu_repack": info.cpu_repack, "flash_attn": info.flash_attn}), flush=True)
prompt = np.random.default_rng(0).integers(100, rt.n_vocab, size=n, dtype=np.int32)
pre, dec = [], []
for i in range(runs + 1):
    t0 = time.perf_counter(); rt.prefill(prompt); t1 = time.perf_counter()
    g = rt.generate([int(prompt[-1])], n_gen, clear=False, stop_at_eog=False); t2 = time.perf_counter()
    assert len(g.tokens) == n_gen, (len(g.tokens), g.stop_reason)
    if i:
        pre.append(n / (t1 - t0)); dec.append(n_gen / (t2 - t1))
print(json.dumps({"prefill_tps": pre, "decode_tps": dec}))
"""

_STEER_CODE = """
import json, sys
from edgerope.gguf.reader import open_gguf
from edgerope.runtime import native
from edgerope.runtime.cpu_repack import CpuBackend, plan_layout
bufts, feats = native.cpu_backend()
with open_gguf(sys.argv[1]) as g:
    tensors = list(g.tensors)
lay = plan_layout("auto", CpuBackend(bufts, feats), tensors)
print(json.dumps({"layout": lay.to_dict(), "tensor_types": sorted({t.ggml_type.name for t in tensors}),
                  "system_info": native.system_info(), "extra_buffer_types": list(bufts), "features": feats}))
"""

_BUF_LINE = re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB")


def _model(qtype: str) -> Path:
    return MODEL_DIR / f"model-{qtype.lower()}.gguf"


def build_models() -> None:
    spec_file = MODEL_DIR / "spec.json"
    f16 = MODEL_DIR / "model-f16.gguf"
    if not (spec_file.is_file() and json.loads(spec_file.read_text()) == SPEC):
        for p in (f16, *map(_model, QTYPES)):
            p.unlink(missing_ok=True)
    missing = [q for q in QTYPES if not _model(q).is_file()]
    if not missing:
        return
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    print(f"building {', '.join(map(str, map(_model, missing)))} ...", file=sys.stderr, flush=True)
    args = [f"{q}={_model(q)}" for q in missing]
    subprocess.run([sys.executable, "-c", _BUILD_CODE, json.dumps(SPEC), str(f16), *args],
                   env={**os.environ, **C.edgerope_env()}, check=True)  # fmt: skip
    spec_file.write_text(json.dumps(SPEC))


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def wait_quiet(max_wait_s: float) -> dict[str, float]:
    """Wait (up to ``max_wait_s``) until other processes use < 15% of the CPUs over a 1 s window."""
    t0 = time.perf_counter()
    while True:
        b0, a0 = _cpu_jiffies()
        time.sleep(1.0)
        b1, a1 = _cpu_jiffies()
        busy = (b1 - b0) / max(1, a1 - a0)
        if busy < 0.15 or time.perf_counter() - t0 > max_wait_s:
            return {"waited_s": round(time.perf_counter() - t0, 1), "others_busy_before": round(busy, 3)}
        time.sleep(4.0)


def _prioritize() -> None:
    """In the child before exec: its own session, so its own scheduler autogroup (Linux gives every autogroup an
    equal share whatever the niceness inside), then that autogroup's and the process's niceness."""
    os.setsid()
    nice = int(SETTINGS["nice"])
    if os.path.exists("/proc/self/autogroup"):
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    os.nice(nice)


def run_child(cmd: list[str], log: Path) -> dict[str, Any]:
    """One fresh child; stdout and stderr to ``log`` (+ .err).  A death by signal is returned, not raised.
    Also records the share of the CPUs other processes used while it ran (``others_busy``)."""
    out, err = log, log.with_suffix(".err")
    res: dict[str, Any] = wait_quiet(SETTINGS["quiet_wait_s"])
    b0, a0 = _cpu_jiffies()
    t0 = time.perf_counter()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env={**os.environ, **C.edgerope_env()},
                                preexec_fn=_prioritize if SETTINGS["nice"] else None)  # fmt: skip
        timer = threading.Timer(CHILD_TIMEOUT_S, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
    wall = time.perf_counter() - t0
    b1, a1 = _cpu_jiffies()
    rc = os.waitstatus_to_exitcode(status)
    others = (b1 - b0) / os.sysconf("SC_CLK_TCK") - usage.ru_utime - usage.ru_stime
    res.update(returncode=rc, child_wall_s=wall, child_cpu_s=usage.ru_utime + usage.ru_stime)
    res["others_busy"] = round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)
    res["buffers_mib"] = {m[1]: float(m[2]) for m in _BUF_LINE.finditer(err.read_text(errors="replace"))}
    if rc < 0:
        res["crashed"] = signal.Signals(-rc).name
    elif rc != 0:
        res["error"] = (out.read_text(errors="replace") + err.read_text(errors="replace"))[-1500:]
    return res


def _edgerope(model: Path, n: int, policy: str, tag: str) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _EDGEROPE_CODE, str(model), str(n), str(N_GEN), policy, "1"]
    res = run_child(cmd, C.WORK_DIR / f"repack_{tag}.log")
    lines = [json.loads(ln) for ln in (C.WORK_DIR / f"repack_{tag}.log").read_text().splitlines() if ln[:1] == "{"]
    for d in lines:
        res.update(d)
    return res


def _lb_cmd(model: Path, extra: list[str]) -> list[str]:
    cmd = [str(R.LLAMA_BENCH), "-m", str(model), "-t", str(THREADS), "-fa", "1", "-ctk", "f16", "-ctv", "f16"]
    return cmd + ["-b", str(N_BATCH), "-ub", str(N_BATCH), "-ngl", "0", "-r", "1", "-o", "json", "-v", *extra]


def _llama_bench(model: Path, n: int, flags: list[str], tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for what, args in (
        ("prefill_tps", ["-p", str(n), "-n", "0"]),
        ("decode_tps", ["-p", "0", "-n", str(N_GEN), "-d", str(n)]),
    ):
        log = C.WORK_DIR / f"repack_{tag}_{what[:2]}.log"
        res = run_child(_lb_cmd(model, [*flags, *args]), log)
        out.setdefault("buffers_mib", res["buffers_mib"])
        out.setdefault("children", []).append({k: v for k, v in res.items() if k != "buffers_mib"})
        if "crashed" in res or "error" in res:
            return {**out, **{k: res[k] for k in ("crashed", "error") if k in res}}
        text = log.read_text()
        rec = json.loads(text[text.index("[") : text.rindex("]") + 1])[0]
        out[what] = [1e9 * (rec["n_prompt"] + rec["n_gen"]) / ns for ns in rec.get("samples_ns") or [rec["avg_ns"]]]
        out[f"{what}_others_busy"] = res["others_busy"]
        out["llama_bench"] = {k: rec.get(k) for k in ("build_commit", "cpu_info", "backends", "repack", "flash_attn")}
    return out


def probe_steering(model: Path, patterns: list[str]) -> dict[str, Any]:
    """Does llama-bench's ``-ot`` accept ``CPU_REPACK``?  Tried with auto's real patterns on a 1-token run."""
    ot = ";".join(f"{p}=CPU_REPACK" for p in patterns)
    res = run_child(_lb_cmd(model, ["--repack", "0", "-ot", ot, "-p", "1", "-n", "0"]), C.WORK_DIR / "repack_probe.log")
    text = (C.WORK_DIR / "repack_probe.log").read_text(errors="replace")
    if res["returncode"] == 0 and res["buffers_mib"].get("CPU_REPACK"):
        return {"accepted": True, "override": ot}
    lines = [ln.strip() for ln in text.splitlines()]
    said = [ln for ln in lines if ln.startswith("error:") or ln == "Available buffer types:"]
    if "Available buffer types:" in lines:  # followed by one name per line
        for ln in lines[lines.index("Available buffer types:") + 1 :]:
            if not ln or " " in ln or ln.startswith("-"):
                break
            said.append(ln)
    return {"accepted": False, "override": ot, "returncode": res["returncode"], "llama_bench_said": said}


def _med(xs: list[float] | None) -> float | None:
    return statistics.median(xs) if xs else None


def _busy(res: dict[str, Any]) -> float:
    """The largest share of the CPUs other processes used while this run's children ran."""
    return max(ch.get("others_busy", 0.0) for ch in res.get("children", [res]))


def summarize(c: dict[str, Any]) -> None:
    """Medians over a case's clean runs (others used < CONTENDED of the CPUs); every run stays in ``rounds``."""
    rs = c["rounds"]
    c["n_runs"] = len(rs)
    c["signals"] = sorted({r["crashed"] for r in rs if "crashed" in r})
    c["crashed_runs"] = sum("crashed" in r for r in rs)
    c["errors"] = sum("error" in r for r in rs)
    for what in ("prefill_tps", "decode_tps"):  # llama-bench times each in its own child
        clean = [r for r in rs if r.get(f"{what}_others_busy", r.get("others_busy", 1.0)) < CONTENDED]
        c[f"n_clean_{what[:-4]}"] = len(clean)
        c[what] = [x for r in clean for x in r.get(what, [])]
        c[f"median_{what}"] = _med(c[what])
    c["buffers_mib"] = next((r["buffers_mib"] for r in rs if r.get("buffers_mib")), {})
    c["cpu_repack"] = next((r["cpu_repack"] for r in rs if "cpu_repack" in r), None)


def _cell(c: dict[str, Any], what: str) -> str:
    if c["crashed_runs"]:
        n, sig = c["crashed_runs"], "/".join(c["signals"])
        return f"crashed ({sig})" if n == c["n_runs"] else f"{n}/{c['n_runs']} crashed ({sig})"
    v = c.get(f"median_{what}")
    return f"{v:.1f}" if v else ("error" if c["errors"] else "n/a (contended)")


def make_table(cases: dict[str, dict[str, Any]]) -> str:
    headers = ["model", "prompt", "engine", "weight buffers (MiB)", "pp tok/s", "x off pp", "tg tok/s", "x off tg"]
    rows = []
    for c in cases.values():
        base = "edgerope off" if c["engine"].startswith("edgerope") else "llama-bench repack 0"
        ref = cases.get(f"{c['qtype']}/{c['n_prompt']}/{base}", {})
        bufs = ", ".join(f"{k} {v:.0f}" for k, v in c["buffers_mib"].items()) or "-"
        row: list[Any] = [c["qtype"], c["n_prompt"], c["engine"], bufs]
        for what in ("prefill_tps", "decode_tps"):
            a, b = c.get(f"median_{what}"), ref.get(f"median_{what}")
            row += [_cell(c, what), f"{a / b:.2f}x" if a and b else "-"]
        clean = f"{c['n_clean_prefill']}+{c['n_clean_decode']}/{c['n_runs']}"
        rows.append(row + ["-" if c["crashed_runs"] == c["n_runs"] else clean])
    return C.format_table(headers + ["clean pp+tg"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds; every case runs once per round")
    ap.add_argument("--retries", type=int, default=2, help="extra tries of a run other processes contended")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--no-llama-bench", action="store_true")
    ap.add_argument("--quiet-wait", type=float, default=90.0, help="max seconds to wait for others before a child")
    ap.add_argument("--nice", type=int, default=0, help="niceness of the children (< 0 needs root)")
    args = ap.parse_args()
    SETTINGS.update(quiet_wait_s=args.quiet_wait, nice=args.nice)

    build_models()
    env = {**os.environ, **C.edgerope_env()}
    flags = Path("/proc/cpuinfo").read_text().split("\nflags", 1)[1].split("\n", 1)[0].split()
    cpu_flags = sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx", "avx_vnni")))
    steer: dict[str, Any] = {}
    for q in QTYPES:
        out = subprocess.run([sys.executable, "-c", _STEER_CODE, str(_model(q))], capture_output=True, text=True,
                             check=True, env=env).stdout  # fmt: skip
        steer[q] = json.loads(out.splitlines()[-1])
    info = {k: steer[QTYPES[0]].pop(k) for k in ("system_info", "extra_buffer_types", "features")}

    lb_status = "not used (--no-llama-bench)"
    engines: list[tuple[str, Any]] = [(f"edgerope {p}", p) for p in POLICIES]
    if not args.no_llama_bench and R.LLAMA_BENCH.is_file():
        lb_status = str(R.LLAMA_BENCH.relative_to(C.REPO_ROOT))
        engines += [("llama-bench repack 0", ["--repack", "0"]), ("llama-bench repack 1", ["--repack", "1"])]
        pats = [p for p, _ in steer["Q4_0"]["layout"]["overrides"]]
        steer["llama_bench_probe"] = probe_steering(_model("Q4_0"), pats) if pats else {"accepted": False}
        if steer["llama_bench_probe"]["accepted"]:
            engines.append(("llama-bench steered", "steer"))
    elif not args.no_llama_bench:
        lb_status = f"not built ({R.LLAMA_BENCH.relative_to(C.REPO_ROOT)} missing; see bench_runtime.py's build line)"

    def run_case(q: str, n: int, how: Any, tag: str) -> dict[str, Any]:
        if how in POLICIES:
            return _edgerope(_model(q), n, how, tag)
        if how == "steer":
            pats = [p for p, _ in steer[q]["layout"]["overrides"]]
            how = ["--repack", "0"] + (["-ot", ";".join(f"{p}=CPU_REPACK" for p in pats)] if pats else [])
        return _llama_bench(_model(q), n, how, tag)

    load_before = C.load_average()
    t_start = time.perf_counter()
    cases: dict[str, dict[str, Any]] = {}
    for n in args.lengths:  # all rounds of one length, then the next: a cut-short run keeps whole lengths
        for rnd in range(args.runs):
            for q in QTYPES:
                for name, how in engines:
                    key = f"{q}/{n}/{name}"
                    c = cases.setdefault(key, {"qtype": q, "n_prompt": n, "engine": name, "rounds": [], "retried": []})
                    for attempt in range(args.retries + 1):
                        print(f"round {rnd + 1}: {key} ...", file=sys.stderr, flush=True)
                        res = run_case(q, n, how, re.sub(r"\W+", "_", key))
                        if "crashed" in res or "error" in res or _busy(res) < CONTENDED or attempt == args.retries:
                            break
                        print(f"  contended ({_busy(res):.0%} others), again", file=sys.stderr)
                        c["retried"].append(res)
                    c["rounds"].append(res)
                    if "crashed" in res or "error" in res:
                        print(f"  {res.get('crashed') or 'error: ' + res['error'][-300:]}", file=sys.stderr)
            for c in cases.values():
                summarize(c)
            table = make_table(cases)
            C.write_json(RESULT, {
                "benchmark": "repack",
                "date_utc": C.now_utc(),
                "machine": {**C.machine_info(), "cpu_flags": cpu_flags, "llama_cpp": info},
                "load_average_before": load_before,
                "load_average_after": C.load_average(),
                "total_s": time.perf_counter() - t_start,
                "models": {q: {"path": str(_model(q).relative_to(C.REPO_ROOT)), "bytes": _model(q).stat().st_size,
                               "tensor_types": steer[q]["tensor_types"]} for q in QTYPES},
                "spec": SPEC,
                "auto_layout": {q: steer[q]["layout"] for q in QTYPES},
                "llama_bench_steering": steer.get("llama_bench_probe"),
                "settings": {"threads": THREADS, "flash_attn": True, "n_batch": N_BATCH, "n_ubatch": N_BATCH,
                             "kv": "f16", "n_gen": N_GEN, "rounds": args.runs, "retries": args.retries,
                             "contended_if_others_busy_ge": CONTENDED, **SETTINGS, "llama_bench": lb_status,
                             "llama_bench_build": R.LLAMA_BENCH_CMAKE},
                "units": "tokens/s; pp = prefill of n_prompt tokens from an empty cache, tg = 64 single-token decodes "
                         "after n_prompt cached positions; weight buffers from llama.cpp's 'model buffer size' log "
                         "lines; medians over clean runs only (others_busy < contended_if_others_busy_ge)",
                "complete": n == args.lengths[-1] and rnd == args.runs - 1,
                "cases": cases,
                "table": table,
            })  # fmt: skip
    print(table)
    print(f"wrote {RESULT}", file=sys.stderr)


if __name__ == "__main__":
    main()
