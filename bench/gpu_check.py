"""GPU check: build llama-cpp-python with CUDA for this machine's GPU only, then check edgerope's GPU path on it.

Prepared for a machine with an NVIDIA GPU; about 10 minutes there (the CUDA build 5-8 min with 16 cores for one
architecture, the checks 1-2 min).  It has not run on a GPU yet: the first run's results are the first numbers.

Steps (every check runs in a child process, so a native crash or a hang is a recorded result, not the end):

1. **machine**: ``nvidia-smi`` (GPU name, compute capability, memory, driver), ``nvcc --version``.
2. **build**: ``CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=<cc>"`` (the detected architecture only,
   e.g. 90 for an H100) ``pip install --no-deps --no-cache-dir --target bench/.work/gpu/site llama-cpp-python
   ==0.3.36`` (or ``--sdist PATH``, e.g. ``bench/.work/sdist/llama_cpp_python-0.3.36.tar.gz``; offline machines
   need ``--no-build-isolation`` with scikit-build-core installed).  The children put that folder first on
   ``PYTHONPATH``; the environment's own CPU build is untouched.  ``--skip-build`` uses an existing one.
3. **models**: the built-in tiny model (models/tiny) converted to f32 and f16 GGUFs, and a random mid-size Llama
   (1024 wide, 12 layers, 8 heads of 128, 2 KV heads, FFN 2816, context 8192, ~137M parameters) as f16.
4. **checks** (each pass/fail with its numbers):
   - ``devices``: llama.cpp lists a CUDA device with memory, offload is supported, ``FA_QUANTS`` is reported,
     and the children import the CUDA build;
   - ``parity``: logits of 512 tokens, GPU (every layer offloaded) vs CPU (same build, same settings), f16 KV,
     flash attention off and on, tiny and mid-size model: relative L2 <= 5e-3 and the same argmax >= 98%;
   - ``kv_types``: mid-size model fully offloaded with f16 / q8_0 / q4_0 K=V caches and flash attention on:
     flash attention really on, every layer offloaded, no f16-conversion warning from llama.cpp, logits vs the
     CPU with the same cache type (relative L2 <= 1e-2 / 3e-2 / 2e-1); the mixed q8_0/q4_0 pair: edgerope warns
     exactly when llama.cpp converts (the build's FA_QUANTS), iq4_nl is refused before loading;
   - ``vram``: the planner's weights / KV / compute per device vs llama.cpp's "CUDA0 model|KV|compute buffer
     size" log lines, at n_ctx 8192 with f16 and q8_0 caches, tiny and mid-size: the planned total within
     10% of llama.cpp's (each part recorded); the device's free memory before and after loading (what really
     went, pool and CUDA context included); the default context with all free memory and with
     ``gpu_memory_budget`` 200 MiB, and that the latter really loads and runs;
   - ``ask``: ``edgerope ask MODEL --doc ... --json`` with the default backend (auto: the GPU) answers, and
     preflight chose the GPU for it;
   - ``serve``: ``edgerope serve MODEL --backend gpu`` answers ``/v1/models`` and one chat completion, and stops
     on SIGTERM.
5. Writes ``bench/results/gpu.json``: machine, GPU, build (command, seconds), every check's numbers and verdict.

    python bench/gpu_check.py [--sdist PATH] [--skip-build] [--no-build-isolation] [--out bench/results/gpu.json]
    python bench/gpu_check.py --self-test     # no GPU: every step on the CPU, to check the script itself

Needs: an NVIDIA GPU and driver, the CUDA toolkit (``nvcc``), cmake and a C++ compiler, edgerope installed in
the running Python (``pip install -e .``: numpy, gguf, click, sentencepiece for the tokenizer), and the
llama-cpp-python source (network, or ``--sdist``).  Not needed: torch, transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "gpu"
SITE = WORK / "site"
RESULTS = ROOT / "bench" / "results" / "gpu.json"
PIN = "0.3.36"
PARITY_TOKENS = 512
MID = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2,
           intermediate_size=2816, max_position_embeddings=8192)  # fmt: skip
BUFFER_LINE = re.compile(r"(\S+) (model|KV|compute) buffer size =\s*([0-9.]+) MiB")
CONVERT_WARNING = "converting K and V to f16"
TOL_REL_L2 = {"f16": 1e-2, "q8_0": 3e-2, "q4_0": 2e-1}
PARITY_REL_L2, PARITY_TOP1, VRAM_TOLERANCE = 5e-3, 0.98, 0.10
BACKEND = os.environ.get("GPU_CHECK_BACKEND", "gpu")  # "cpu" only in --self-test (the script's own plumbing)


# --------------------------------------------------------------------------------------------------------------
# the parent: machine, build, models, children


def sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def gpu_info() -> list[dict[str, str]]:
    fields = "name,compute_cap,memory.total,memory.free,driver_version,pci.bus_id"
    try:
        res = sh(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [{"error": str(exc)}]
    return [dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
            for line in res.stdout.strip().splitlines()]  # fmt: skip


def nvcc_version() -> str | None:
    try:
        out = sh(["nvcc", "--version"], timeout=60).stdout
    except OSError:
        return None
    m = re.search(r"release ([0-9.]+)", out)
    return m.group(1) if m else out.strip()[-80:]


def build(args: argparse.Namespace, arch: str) -> dict[str, Any]:
    """llama-cpp-python with CUDA for ``arch`` only, into SITE."""
    if SITE.exists():
        shutil.rmtree(SITE)
    SITE.mkdir(parents=True)
    cmake_args = f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={arch}"
    source = args.sdist or f"llama-cpp-python=={PIN}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target", str(SITE), source]
    if args.no_build_isolation:
        cmd.insert(4, "--no-build-isolation")
    env = {**os.environ, "CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}
    t0 = time.perf_counter()
    res = sh(cmd, env=env, timeout=args.build_timeout)
    (WORK / "build.log").write_text(res.stdout + res.stderr)
    return {
        "ok": res.returncode == 0,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(cmd),
        "CMAKE_ARGS": cmake_args,
        "log": str(WORK / "build.log"),
        "log_tail": (res.stdout + res.stderr)[-1500:] if res.returncode else "",
    }


def make_models() -> dict[str, str]:
    """The tiny model (f32, f16) and the random mid-size one (f16), converted once into WORK."""
    from edgerope.convert.export import convert
    from edgerope.models.builtin import tiny_model
    from edgerope.models.tiny_random import make_tiny_checkpoint

    out = {}
    tiny = Path(tiny_model())
    for dtype in ("f32", "f16"):
        p = WORK / f"tiny-{dtype}.gguf"
        if not p.exists():
            convert(tiny, p, outtype=dtype)
        out[f"tiny-{dtype}"] = str(p)
    mid = WORK / "mid-f16.gguf"
    if not mid.exists():
        hf = make_tiny_checkpoint(WORK / "mid-hf", tokenizer_dir=tiny, seed=1, weight_std=0.02, **MID)
        convert(hf, mid, outtype="f16")
        shutil.rmtree(WORK / "mid-hf")
    out["mid-f16"] = str(mid)
    return out


def child(name: str, models: dict[str, str], *, timeout: float, skip_build: bool) -> dict[str, Any]:
    """Run check ``name`` in a child with the CUDA build first on the path; its last stdout line is JSON."""
    path = [str(ROOT)] + ([] if skip_build else [str(SITE)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*reversed(path), os.environ.get("PYTHONPATH", "")]),
           "EDGEROPE_NO_GUARD": "1", "GPU_CHECK_MODELS": json.dumps(models), "GPU_CHECK_SITE": str(SITE)}  # fmt: skip
    t0 = time.perf_counter()
    try:
        res = sh([sys.executable, str(Path(__file__).resolve()), "--child", name], env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": round(time.perf_counter() - t0, 1)}
    seconds = round(time.perf_counter() - t0, 1)
    lines = res.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if res.returncode != 0 or not result:
        how = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
        result = {**result, "ok": False, "error": how, "stderr_tail": res.stderr[-2000:]}
    result["seconds"] = seconds
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", help="llama-cpp-python source (tarball or folder); default: llama-cpp-python==" + PIN)
    ap.add_argument("--skip-build", action="store_true", help="use the llama-cpp-python already importable")
    ap.add_argument("--no-build-isolation", action="store_true", help="build with the installed scikit-build-core")
    ap.add_argument("--build-timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--checks", nargs="*", default=list(CHECKS), choices=list(CHECKS))
    ap.add_argument("--self-test", action="store_true", help="run every step on the CPU (no GPU, no build) to "
                    "check the script's own plumbing; its verdicts on GPU properties mean nothing")  # fmt: skip
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return run_child(args.child)
    if args.self_test:
        os.environ["GPU_CHECK_BACKEND"] = "cpu"
        args.skip_build = True
        if args.out == RESULTS:
            args.out = WORK / "self_test.json"
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gpus = gpu_info()
    report: dict[str, Any] = {
        "script": "bench/gpu_check.py" + (" --self-test (CPU only: not a GPU result)" if args.self_test else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "host_cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "gpus": gpus,
            "nvcc": nvcc_version(),
        },  # fmt: skip
    }
    cc = gpus[0].get("compute_cap", "") if gpus and "error" not in gpus[0] else ""
    arch = cc.replace(".", "") if re.fullmatch(r"\d+\.\d+", cc) else ""
    if not arch and not (args.skip_build or args.self_test):
        report["ok"] = False
        report["error"] = "no NVIDIA GPU found (nvidia-smi); this script checks the CUDA path"
        return finish(report, args.out, t0)
    if not args.skip_build:
        print(f"building llama-cpp-python {PIN} with CUDA for sm_{arch} ...", flush=True)
        report["build"] = build(args, arch)
        if not report["build"]["ok"]:
            report["ok"] = False
            return finish(report, args.out, t0)
    print("converting the models ...", flush=True)
    models = make_models()
    report["models"] = models
    report["checks"] = {}
    for name in args.checks:
        print(f"check {name} ...", flush=True)
        report["checks"][name] = child(name, models, timeout=CHECKS[name][1], skip_build=args.skip_build)
        print(f"  {'ok' if report['checks'][name].get('ok') else 'FAILED'} ({report['checks'][name]['seconds']} s)")
    report["ok"] = all(c.get("ok") for c in report["checks"].values())
    return finish(report, args.out, t0)


def finish(report: dict[str, Any], out: Path, t0: float) -> int:
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"{'all checks passed' if report.get('ok') else 'FAILED'}; wrote {out} ({report['seconds']} s)")
    return 0 if report.get("ok") else 1


# --------------------------------------------------------------------------------------------------------------
# the children: each check, printing one JSON line


class LogLines:
    """llama.cpp's log lines, through edgerope's logger (everything at DEBUG and above)."""

    def __init__(self) -> None:
        import logging

        from edgerope.runtime.native import LOGGER_NAME

        self.lines: list[str] = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = lambda record: self.lines.append(record.getMessage())  # type: ignore[method-assign]
        log = logging.getLogger(LOGGER_NAME)
        log.setLevel(logging.DEBUG)
        log.addHandler(handler)

    def mark(self) -> int:
        return len(self.lines)

    def since(self, mark: int) -> list[str]:
        return self.lines[mark:]

    def buffers(self, mark: int) -> dict[str, float]:
        """{"CUDA0 model": MiB, "CUDA0 KV": MiB, "CUDA0 compute": MiB, "CPU_Mapped model": ...} since ``mark``."""
        out: dict[str, float] = {}
        for line in self.since(mark):
            m = BUFFER_LINE.search(line)
            if m:
                out[f"{m.group(1)} {m.group(2)}"] = out.get(f"{m.group(1)} {m.group(2)}", 0.0) + float(m.group(3))
        return out


def _models() -> dict[str, str]:
    return json.loads(os.environ["GPU_CHECK_MODELS"])


def _tokens(n_vocab: int, n: int = PARITY_TOKENS) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [1, *rng.integers(3, n_vocab, n - 1).tolist()]


def _logits(path: str, backend: str, **kw: Any) -> tuple[Any, Any]:
    from edgerope.runtime.runtime import Runtime

    with Runtime.open(path, backend=backend, n_ctx=1024, allow_extrapolation=True, **kw) as rt:
        return rt.logits(_tokens(rt.n_vocab)), rt.info


def _compare(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {
        "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_abs": float(np.abs(a - b).max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def check_devices() -> dict[str, Any]:
    import llama_cpp

    from edgerope.runtime.gpu_devices import offload_devices
    from edgerope.runtime.native import backend_devices, supports_gpu_offload, system_info

    devs = backend_devices()
    gpus = offload_devices(devs)
    cuda = [d for d in gpus if d.cuda]
    from_site = str(Path(llama_cpp.__file__).resolve()).startswith(str(Path(os.environ["GPU_CHECK_SITE"]).resolve()))
    return {
        "ok": bool(cuda) and supports_gpu_offload() and all(d.memory_total > 0 for d in cuda),
        "llama_cpp": llama_cpp.__file__,
        "llama_cpp_from_cuda_build": from_site,
        "system_info": system_info(),
        "devices": devs,
        "fa_quants_reported": [d.features.get("FA_QUANTS") for d in cuda],
    }


def check_parity() -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}}
    ok = True
    for model in ("tiny-f32", "mid-f16"):
        for flash in ("off", "on"):
            cpu, _ = _logits(_models()[model], "cpu", flash_attn=flash)
            gpu, info = _logits(_models()[model], BACKEND, flash_attn=flash)
            r = _compare(gpu, cpu)
            r.update(n_gpu_layers=info.n_gpu_layers, flash_attn=info.flash_attn)
            r["ok"] = r["rel_l2"] <= PARITY_REL_L2 and r["top1_agreement"] >= PARITY_TOP1 and info.backend == "gpu"
            out["cases"][f"{model} flash {flash}"] = r
            ok &= r["ok"]
    out["ok"] = ok
    out["tolerance"] = {"rel_l2": PARITY_REL_L2, "top1_agreement": PARITY_TOP1}
    return out


def check_kv_types() -> dict[str, Any]:
    from edgerope.errors import RuntimeConfigError
    from edgerope.runtime.gpu_devices import cuda_fa_pairs, offload_devices
    from edgerope.runtime.native import backend_devices
    from edgerope.runtime.preflight import plan_runtime

    logs = LogLines()
    mid = _models()["mid-f16"]
    out: dict[str, Any] = {"cases": {}}
    ok = True
    for t in ("f16", "q8_0", "q4_0"):
        cpu, _ = _logits(mid, "cpu", type_k=t, type_v=t, flash_attn="on")
        mark = logs.mark()
        gpu, info = _logits(mid, BACKEND, type_k=t, type_v=t, flash_attn="on")
        said = logs.since(mark)
        r = _compare(gpu, cpu)
        r.update(flash_attn=info.flash_attn, n_gpu_layers=info.n_gpu_layers,
                 converted_to_f16=any(CONVERT_WARNING in ln for ln in said))  # fmt: skip
        r["ok"] = bool(
            info.flash_attn and info.n_gpu_layers == 13 and not r["converted_to_f16"] and r["rel_l2"] <= TOL_REL_L2[t]
        )
        out["cases"][t] = r
        ok &= r["ok"]
    # a mixed pair: edgerope warns exactly when llama.cpp converts
    gpus = offload_devices(backend_devices())
    pairs = cuda_fa_pairs(gpus[0].features if gpus else {})
    plan = plan_runtime(mid, backend=BACKEND, n_ctx=1024, type_k="q8_0", type_v="q4_0")
    warned = any("K q8_0 / V q4_0" in n for n in plan.notes)
    mark = logs.mark()
    _logits(mid, BACKEND, type_k="q8_0", type_v="q4_0", flash_attn="on")
    converted = any(CONVERT_WARNING in ln for ln in logs.since(mark))
    out["mixed_q8_0_q4_0"] = {"warned": warned, "llama_cpp_converted": converted, "compiled": ("q8_0", "q4_0") in pairs}
    ok &= warned == converted
    try:
        plan_runtime(mid, backend=BACKEND, n_ctx=1024, type_k="iq4_nl", type_v="iq4_nl")
        out["iq4_nl_refused"] = False
    except RuntimeConfigError as exc:
        out["iq4_nl_refused"] = exc.what
    ok &= bool(out["iq4_nl_refused"])
    out["ok"] = ok
    return out


def _vram_case(logs: LogLines, path: str, **kw: Any) -> dict[str, Any]:
    from edgerope.runtime.native import backend_devices
    from edgerope.runtime.runtime import Runtime

    free_before = {d["name"]: d["memory_free"] for d in backend_devices()}
    mark = logs.mark()
    with Runtime.open(path, backend=BACKEND, **kw) as rt:
        rt.logits([1, 5, 6, 7])
        free_after = {d["name"]: d["memory_free"] for d in backend_devices()}
        plan = rt.plan.gpu_plan
        n_ctx = rt.n_ctx
    bufs = logs.buffers(mark)
    if plan is None:
        return {"ok": False, "error": "no GPU plan (the runtime did not offload)", "buffers_mib": bufs, "n_ctx": n_ctx}
    dev = plan.devices[0]
    mib = 2**20
    measured = {part: bufs.get(f"{dev.device} {part}", 0.0) * mib for part in ("model", "KV", "compute")}
    planned = {"model": dev.weights_bytes, "KV": dev.kv_bytes, "compute": dev.compute_bytes}
    total_m, total_p = sum(measured.values()), sum(planned.values())
    used = free_before.get(dev.device, 0) - free_after.get(dev.device, 0)
    return {
        "n_ctx": n_ctx,
        "planned_bytes": planned,
        "llama_cpp_buffers_bytes": measured,
        "planned_total": total_p,
        "llama_cpp_total": total_m,
        "error": (total_p - total_m) / total_m if total_m else None,
        "device_memory_used": used,
        "planned_with_pool": dev.buffers_bytes + dev.pool_bytes,
        "host_buffers_mib": {k: v for k, v in bufs.items() if not k.startswith(dev.device)},
        "ok": bool(total_m) and abs(total_p - total_m) <= VRAM_TOLERANCE * total_m,
    }


def check_vram() -> dict[str, Any]:
    from edgerope.runtime.preflight import plan_runtime

    logs = LogLines()
    out: dict[str, Any] = {"cases": {}, "tolerance": VRAM_TOLERANCE}
    for model in ("tiny-f16", "mid-f16"):
        for t in ("f16", "q8_0"):
            out["cases"][f"{model} {t} n_ctx 8192"] = _vram_case(
                logs, _models()[model], n_ctx=8192, type_k=t, type_v=t, allow_extrapolation=True
            )
    mid = _models()["mid-f16"]
    full = plan_runtime(mid, backend=BACKEND)
    small = plan_runtime(mid, backend=BACKEND, gpu_memory_budget="200MiB")
    out["default_context"] = {"all_free_memory": [full.n_ctx, full.n_ctx_source],
                              "budget_200MiB": [small.n_ctx, small.n_gpu_layers, small.n_ctx_source]}  # fmt: skip
    out["cases"]["mid-f16 default context, 200 MiB budget"] = _vram_case(logs, mid, gpu_memory_budget="200MiB")
    out["ok"] = all(c["ok"] for c in out["cases"].values())
    return out


def check_ask() -> dict[str, Any]:
    from edgerope.runtime.preflight import plan_runtime

    model = _models()["tiny-f16"]
    doc = WORK / "doc.txt"
    doc.write_text("The passkey is 7291. Remember it.\n" + "The grass is green. The sky is blue.\n" * 8)  # < 256 tokens
    plan = plan_runtime(model)
    res = sh([sys.executable, "-m", "edgerope", "ask", model, "--doc", str(doc), "-q", "What is the passkey?",
              "--json", "--no-cache", "--max-tokens", "16"], timeout=300, env=os.environ.copy())  # fmt: skip
    if res.returncode:
        res.stderr += res.stdout  # --json puts the error object on stdout
    try:
        answer = json.loads(res.stdout)
    except json.JSONDecodeError:
        answer = {}
    return {
        "ok": res.returncode == 0 and bool(answer.get("tokens")) and plan.n_gpu_layers > 0,
        "n_gpu_layers_planned": plan.n_gpu_layers,
        "returncode": res.returncode,
        "answer": answer.get("text"),
        "timings": answer.get("timings"),
        "stderr_tail": res.stderr[-800:] if res.returncode else "",
    }


def check_serve() -> dict[str, Any]:
    model = _models()["tiny-f16"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (WORK / "serve.log").open("w")
    cmd = [sys.executable, "-m", "edgerope", "serve", model, "--backend", BACKEND, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    base, out = f"http://127.0.0.1:{port}", {"ok": False}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                    out["models"] = json.loads(r.read())
                    break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
        out["reply"] = reply["choices"][0]["message"]["content"]
        out["ok"] = "models" in out
    except (OSError, KeyError, ValueError) as exc:
        out["error"] = repr(exc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        out["returncode_after_sigterm"] = proc.returncode
        out["log_tail"] = (WORK / "serve.log").read_text()[-1200:]
    return out


CHECKS = {  # name: (function, timeout in seconds)
    "devices": (check_devices, 120),
    "parity": (check_parity, 300),
    "kv_types": (check_kv_types, 300),
    "vram": (check_vram, 300),
    "ask": (check_ask, 300),
    "serve": (check_serve, 300),
}


def run_child(name: str) -> int:
    try:
        result = CHECKS[name][0]()
    except Exception as exc:  # noqa: BLE001 -- a failed check is a result
        import traceback

        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
