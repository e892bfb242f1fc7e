"""Benchmark: requests/s and time to first token of ``edgerope serve`` vs llama-cpp-python's own server.

What it measures, on the built-in tiny model converted to an f32 GGUF (cached in ``bench/.work``), each server in
its own process with ``--threads`` llama.cpp threads (default 1: on a shared 2-core machine two spinning threads
stall each other), n_ctx 256, CPU, greedy, no document cache:

  edgerope           ``edgerope serve MODEL --ctx 256 --threads T --backend cpu --no-cache --max-queue 64``
                     (uvicorn/h11 in front, the model in a supervised worker process)
  llama-cpp-python   ``python -m llama_cpp.server --model MODEL --n_ctx 256 --n_threads T --interrupt_requests
                     False`` (FastAPI/uvicorn, the model in the server process behind a lock; its default of
                     interrupting a stream when another request arrives would cut answers short), run with its
                     server extras installed into ``bench/.work/lcpp_server_deps`` (``pip install --target``),
                     not into the project's venv

Load: 1, 4 and 16 concurrent clients (asyncio + httpx, one connection each) send ``--requests`` short
streaming text completions (prompt "The list", ``max_tokens`` 16, temperature 0) as fast as answers come back,
after 8 untimed warm-up requests.  Both servers run side by side (idle while the other is measured); each
(server, clients) case is measured ``--rounds`` times, interleaved, and the round with the median requests/s
reported.  Reported: completed requests/s over the wall time, time to first token (first SSE event with text,
client side) median and p90, whole-request latency median, streamed text events per request, and any non-200
answers.  The load generator runs on the same cores as the servers, so both pay for it alike.

What it does not do: it is not a test, checks no text (the tiny model's answers differ between engines only by
their own sampling defaults), and measures no GPU, no long prompts and no document cache.

    PYTHONPATH=. .venv/bin/python bench/bench_server.py [--requests 64] [--concurrency 1 4 16]

Writes ``bench/results/server.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import httpx

MODEL = C.WORK_DIR / "server_model" / "tiny-f32.gguf"
DEPS = C.WORK_DIR / "lcpp_server_deps"
RESULT = C.RESULTS_DIR / "server.json"
BODY = {"prompt": "The list", "max_tokens": 16, "temperature": 0, "stream": True}
WARMUP = 8


def build_model() -> Path:
    if not MODEL.exists():
        from edgerope.convert.export import convert
        from edgerope.models.builtin import tiny_model

        MODEL.parent.mkdir(parents=True, exist_ok=True)
        convert(tiny_model(), MODEL, outtype="f32")
    return MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(name: str, port: int, threads: int) -> tuple[list[str], dict[str, str]]:
    t = str(threads)
    if name == "edgerope":
        cmd = [*C.edgerope_command(), "serve", str(MODEL), "--port", str(port), "--ctx", "256", "--threads", t]
        cmd += ["--backend", "cpu", "--no-cache", "--max-queue", "64", "--model-id", "tiny"]
        return cmd, {**os.environ, **C.edgerope_env(), "EDGEROPE_NO_GUARD": "1"}
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(MODEL), "--port", str(port)]
    cmd += ["--n_ctx", "256", "--n_threads", t, "--n_threads_batch", t, "--model_alias", "tiny"]
    cmd += ["--interrupt_requests", "False"]
    path = os.pathsep.join([str(DEPS), os.environ.get("PYTHONPATH", "")])
    return cmd, {**os.environ, "PYTHONPATH": path}


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not come up")


async def one(client: httpx.AsyncClient) -> tuple[int, float | None, float, int]:
    """(status, time to first token, latency, text events) of one streaming request."""
    t0 = time.perf_counter()
    first, events = None, 0
    async with client.stream("POST", "/v1/completions", json=BODY) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"text": ""' not in line and '"text":""' not in line:
                events += 1
                if first is None:
                    first = time.perf_counter() - t0
        status = resp.status_code
    return status, first, time.perf_counter() - t0, events


async def load(url: str, concurrency: int, n_requests: int) -> dict[str, Any]:
    results: list[tuple[int, float | None, float, int]] = []
    remaining = n_requests

    async def client_loop() -> None:
        nonlocal remaining
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1)) as client:
            while remaining > 0:
                remaining -= 1
                results.append(await one(client))

    async with httpx.AsyncClient(base_url=url, timeout=120) as warm:
        for _ in range(WARMUP):
            await one(warm)
    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == 200]
    ttft = sorted(r[1] for r in ok if r[1] is not None)
    latency = sorted(r[2] for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "non_200": {str(s): sum(1 for r in results if r[0] == s) for s in {r[0] for r in results if r[0] != 200}},
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 2),
        "ttft_median_ms": round(1000 * statistics.median(ttft), 1) if ttft else None,
        "ttft_p90_ms": round(1000 * ttft[int(0.9 * (len(ttft) - 1))], 1) if ttft else None,
        "latency_median_ms": round(1000 * statistics.median(latency), 1) if latency else None,
        "text_events_per_request": round(statistics.mean(r[3] for r in ok), 1) if ok else None,
    }


def start_server(name: str, threads: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd, env = server_command(name, port, threads)
    with open(C.WORK_DIR / f"server-{name}.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc)
    return url, proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(levels: list[int], n_requests: int, rounds: int, threads: int) -> list[dict[str, Any]]:
    servers = {}
    try:
        for name in ("edgerope", "llama-cpp-python"):
            servers[name] = start_server(name, threads)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in range(rounds):
            for c in levels:
                for name, (url, _) in servers.items():
                    row = asyncio.run(load(url, c, n_requests))
                    runs.setdefault((name, c), []).append(row)
                    print(
                        f"round {r + 1} {name:17s} c={c:<3d} {row['requests_per_s']:7.2f} req/s  ttft {row['ttft_median_ms']} ms",
                        flush=True,
                    )
    finally:
        for _, proc in servers.values():
            stop(proc)
    out = []
    for (name, _clients), rows in runs.items():
        rows = sorted(rows, key=lambda x: x["requests_per_s"])
        out.append(
            {"server": name, **rows[len(rows) // 2], "requests_per_s_all_rounds": [x["requests_per_s"] for x in rows]}
        )
    return sorted(out, key=lambda x: (x["server"] != "edgerope", x["concurrency"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    build_model()
    load_before = C.load_average()
    rows = measure(args.concurrency, args.requests, args.rounds, args.threads)
    headers = [
        "server",
        "clients",
        "req/s",
        "TTFT median ms",
        "TTFT p90 ms",
        "latency median ms",
        "events/req",
        "non-200",
    ]
    table = [
        [
            r["server"],
            r["concurrency"],
            r["requests_per_s"],
            r["ttft_median_ms"],
            r["ttft_p90_ms"],
            r["latency_median_ms"],
            r["text_events_per_request"],
            sum(r["non_200"].values()),
        ]
        for r in rows
    ]
    print(C.format_table(headers, table))
    C.write_json(
        RESULT,
        {
            "benchmark": "server",
            "date_utc": C.now_utc(),
            "machine": C.machine_info(),
            "load_average_before": load_before,
            "load_average_after": C.load_average(),
            "model": {
                "path": str(MODEL.relative_to(C.REPO_ROOT)),
                "what": "built-in tiny model, f32 GGUF",
                "n_ctx": 256,
            },
            "request": BODY,
            "requests_per_level": args.requests,
            "rounds": args.rounds,
            "threads": args.threads,
            "warmup_requests": WARMUP,
            "results": rows,
        },
    )
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
