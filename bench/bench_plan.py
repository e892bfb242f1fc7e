"""Memory planner vs measured memory: ``plan_memory`` totals against llama.cpp's reported buffers and RSS.

For a random ~180 MB GGUF (a synthetic checkpoint made with ``edgerope.models.tiny_random`` at a larger hidden size) and
a few contexts and cache types, one fresh child process per case: record its RSS after llama.cpp is
initialised, open the model through ``edgerope.runtime.runtime.Runtime``, evaluate one full batch of logits (so
weights, KV cache, compute and output buffers are all touched), record the RSS again and parse the buffer
sizes llama.cpp logged.  Prints a table and writes ``bench/results/plan.json``.  About 3 minutes on 2 cores.

It is not a test and is never imported by ``edgerope``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, WORK_DIR, edgerope_env, format_table, load_average, machine_info, now_utc, write_json  # noqa: E402

MiB = 2**20
SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=2816,
    max_position_embeddings=16384,
)
CASES = [  # (n_ctx, type_k, type_v, flash_attn, tokens evaluated)
    (1024, "f16", "f16", "off", 1024),
    (2048, "f16", "f16", "off", 2048),
    (4096, "f16", "f16", "off", 4096),
    (4096, "f16", "f16", "on", 4096),
    (4096, "q8_0", "q8_0", "on", 4096),
    (4096, "q4_0", "q4_0", "on", 4096),
    (16384, "q8_0", "q8_0", "on", 512),
]

CHILD = r"""
import json, logging, re, sys
from pathlib import Path
n_ctx, tk, tv, fa, path, n_eval = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
lines = []
class H(logging.Handler):
    def emit(self, r): lines.append(r.getMessage())
lg = logging.getLogger("edgerope.llama_cpp"); lg.setLevel(logging.DEBUG); lg.addHandler(H()); lg.propagate = False
from edgerope.runtime import native
from edgerope.runtime.runtime import Runtime
native._llama()
base = rss()
with Runtime.open(path, n_ctx=n_ctx, type_k=tk, type_v=tv, flash_attn=fa, n_threads=2) as rt:
    rt.logits([(7 * i) % 900 + 3 for i in range(n_eval)])
    after = rss()
text = "\n".join(lines)
def mib(pattern):
    return [float(m) * 2**20 for m in re.findall(pattern, text)]
print(json.dumps({
    "rss_base": base, "rss_after": after,
    "weights": sum(mib(r"model buffer size = +([\d.]+) MiB")),
    "kv": sum(mib(r"llama_kv_cache: size = +([\d.]+) MiB")),
    "compute": max(mib(r"compute buffer size is +([\d.]+) MiB") or [0]),
}))
"""


def make_gguf() -> Path:
    out = WORK_DIR / "plan" / "model.gguf"
    if out.exists():
        return out
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    ck = make_tiny_checkpoint(WORK_DIR / "plan" / "hf", **SHAPE)
    convert(ck, out, outtype="f16")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    from edgerope.runtime.plan import plan_memory

    gguf = make_gguf()
    rows, results = [], []
    for n_ctx, tk, tv, fa, n_eval in CASES:
        p = plan_memory(gguf, n_ctx=n_ctx, type_k=tk, type_v=tv, memory_budget="64GiB", flash_attn=fa == "on")
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(n_ctx), tk, tv, fa, str(gguf), str(n_eval)],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, **edgerope_env()},
            check=True,
        )
        m = json.loads(child.stdout.strip().splitlines()[-1])
        reported = m["weights"] + m["kv"] + m["compute"]  # the output buffer grows silently: not in the log
        rss_delta = m["rss_after"] - m["rss_base"]
        planned_buffers = p.weights_bytes + p.kv_bytes + p.compute_bytes
        case = {
            "n_ctx": n_ctx,
            "tokens_evaluated": n_eval,
            "type_k": tk,
            "type_v": tv,
            "flash_attn": fa,
            "plan": p.to_dict(),
            "measured": m,
            "reported_buffers_bytes": reported,
            "rss_delta_bytes": rss_delta,
            "ratio_kv": p.kv_bytes / m["kv"],
            "ratio_compute": p.compute_bytes / m["compute"],
            "ratio_buffers": planned_buffers / reported,
            "ratio_total_vs_rss": p.total_bytes / rss_delta,
        }
        results.append(case)
        rows.append(
            [
                n_ctx,
                n_eval,
                f"{tk}/{tv}",
                fa,
                f"{p.total_bytes / MiB:,.1f}",
                f"{reported / MiB:,.1f}",
                f"{rss_delta / MiB:,.1f}",
                f"{case['ratio_kv']:.4f}",
                f"{case['ratio_compute']:.3f}",
                f"{case['ratio_buffers']:.3f}",
                f"{case['ratio_total_vs_rss']:.3f}",
            ]
        )
        print(rows[-1], flush=True)
    table = format_table(
        [
            "n_ctx",
            "evaluated",
            "K/V",
            "FA",
            "planned MiB",
            "llama.cpp weights+KV+compute MiB",
            "RSS delta MiB",
            "KV ratio",
            "compute ratio",
            "w+KV+compute ratio",
            "total/RSS",
        ],
        rows,
    )
    print(table)
    write_json(
        RESULTS_DIR / "plan.json",
        {
            "when": now_utc(),
            "machine": machine_info(),
            "load_average": load_average(),
            "model_shape": SHAPE,
            "gguf_bytes": gguf.stat().st_size,
            "target": "planned total within 10% of measured",
            "cases": results,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
