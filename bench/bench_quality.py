"""Long-context quality of the built-in tiny model: rope scaling with and without fine-tuning, in llama.cpp.

From the built-in tiny model (trained at 256 tokens) ``edgerope.recipes.extend.run_extension`` makes: no scaling,
linear x8 and YaRN x8 without training (``set-rope``), YaRN x8 fine-tuned at 2048 tokens, YaRN x8 with PoSE
inside the 256 window, YaRN x16 with PoSE (4096), and README's user-text command (one .txt file, finetune's
default retrieval mix, 2400 steps; the others train on the demo's JSONL).  Every variant is a Q8_0 GGUF evaluated in llama.cpp
with a q8_0 KV cache (flash attention): passkey accuracy per length x depth (50 trials per length) in
EVAL.md's format and in the independent format (``edgerope.recipes.extend_eval``; no training data holds it),
multi-key accuracy, and the perplexity of held-out documentation text cut to each length.  Fine-tuning runs
in its own process (tokens/s, peak memory growth).  Then the YaRN x8 fine-tune is run in PyTorch (fp32) and in
llama.cpp (f32 weights, f16 KV) on the same passkey grid: the fraction of equal answers; and the same
GGUF with f16, q8_0 and q4_0 KV caches: passkey accuracy and next-token KL divergence against f16 (issue 4).

Targets (issue 3): YaRN x8 + fine-tune passkey >= 95% at 2048 and perplexity at 2048 <= at 256; YaRN x16 +
PoSE >= 90% at 4096 (the mean over fine-tuning seeds 0, 1, 2: in tuning runs the same settings gave 80%, 94%
and 98% at 4096 with these three seeds, so one seed does not measure it); PoSE within 5% of the full fine-tune
at <= 1/4 of its peak memory; the unscaled model collapses past 256; PyTorch and llama.cpp agree on >= 98% of
answers.

Writes ``bench/results/quality.json`` and two plots beside it; prints the table.
Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_quality.py`` (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO_ROOT))

from edgerope.evaluation.protocols import Cell, GridResult  # noqa: E402
from edgerope.models.builtin import recipe, tiny_model  # noqa: E402
from edgerope.recipes.extend import Settings, Variant, run_extension  # noqa: E402
from edgerope.recipes.extend_eval import kv_comparison  # noqa: E402
from edgerope.recipes.extend_report import format_table, save_plot  # noqa: E402

RESULT = C.RESULTS_DIR / "quality.json"
PLOT = C.RESULTS_DIR / "quality.png"
HEATMAPS = C.RESULTS_DIR / "quality_heatmaps.png"
WORK = C.WORK_DIR / "quality"

VARIANTS = (
    Variant("no scaling", "none"),
    Variant("linear x8", "linear", 8),
    Variant("yarn x8", "yarn", 8),
    Variant("yarn x8 + fine-tune", "yarn", 8, "full"),
    Variant("yarn x8 + PoSE", "yarn", 8, "pose"),
    Variant("yarn x16 + PoSE", "yarn", 16, "pose"),
    Variant("yarn x8 + fine-tune, text", "yarn", 8, "full", data="text"),  # README's user-text command
)
SETTINGS = Settings(
    lengths=(256, 512, 1024, 2048),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    trials=10,
    multikey_trials=20,
    ppl_lengths=(256, 512, 1024, 2048),
    ft_steps=300,
    text_steps=2400,  # README's user-text command
    independent=True,  # passkey in a format no training data holds, beside EVAL.md's (the one trained on)
)


def _targets(report, x16_seeds: dict[int, float]) -> dict[str, dict]:  # noqa: ANN001
    r = {x.name: x for x in report.results}
    ft, pose, base = r["yarn x8 + fine-tune"], r["yarn x8 + PoSE"], r["no scaling"]
    x16 = sum(x16_seeds.values()) / len(x16_seeds)
    mem = pose.finetune["training_memory_bytes"] / ft.finetune["training_memory_bytes"]
    pk_gap = ft.passkey_by_length[2048] - pose.passkey_by_length[2048]
    ppl_gap = pose.perplexity[2048] / ft.perplexity[2048] - 1
    out = {
        "yarn x8 + fine-tune passkey@2048 >= 95%": (ft.passkey_by_length[2048], ft.passkey_by_length[2048] >= 0.95),
        "yarn x8 + fine-tune ppl@2048 <= ppl@256": (
            [ft.perplexity[2048], ft.perplexity[256]],
            ft.perplexity[2048] <= ft.perplexity[256],
        ),
        f"yarn x16 + PoSE passkey@4096 >= 90% (mean of fine-tuning seeds {sorted(x16_seeds)})": (
            [x16, x16_seeds],
            x16 >= 0.90,
        ),
        "PoSE passkey@2048 within 5 points of full": (pk_gap, pk_gap <= 0.05),
        "PoSE ppl@2048 within 5% of full": (ppl_gap, ppl_gap <= 0.05),
        "PoSE training memory <= 1/4 of full": (mem, mem <= 0.25),
        "no scaling collapses past 256 (passkey@2048 <= 10%)": (
            base.passkey_by_length[2048],
            base.passkey_by_length[2048] <= 0.10,
        ),
    }
    if report.agreement:
        a = report.agreement["agreement"]
        out["PyTorch vs llama.cpp same answer >= 98% (f16 KV)"] = (a, a >= 0.98)
    return {k: {"value": v, "met": bool(ok)} for k, (v, ok) in out.items()}


def _heatmaps(report, out: Path) -> None:  # noqa: ANN001
    from edgerope.evaluation.plots import heatmap_data, save_heatmaps

    panels = []
    for r in report.results:
        cells = [Cell(c["length"], c["depth"], c["seed"], c["trials"], c["correct"]) for c in r.passkey["cells"]]
        grid = GridResult(r.passkey["task"], r.passkey["seed"], r.passkey["trials"], cells)
        panels.append(heatmap_data(grid, title=r.name))
    save_heatmaps(out, panels, title="passkey accuracy in llama.cpp (Q8_0 weights, q8_0 KV), length x depth")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=SETTINGS.trials, help="passkey trials per (length, depth) cell")
    ap.add_argument(
        "--steps", type=int, default=SETTINGS.ft_steps, help="full fine-tuning steps (PoSE: the same number of tokens)"
    )
    ap.add_argument("--no-agreement", action="store_true", help="skip the PyTorch vs llama.cpp comparison")
    ap.add_argument("--no-kv", action="store_true", help="skip the f16 / q8_0 / q4_0 KV cache comparison")
    ap.add_argument(
        "--x16-seeds", default="1,2", help="more fine-tuning seeds for YaRN x16 + PoSE, evaluated at 4096 ('' for none)"
    )
    args = ap.parse_args()
    from dataclasses import replace

    s = replace(SETTINGS, trials=args.trials, ft_steps=args.steps)
    t0 = time.perf_counter()
    load = C.load_average()
    report = run_extension(
        tiny_model(),
        WORK,
        variants=VARIANTS,
        settings=s,
        agreement_for=None if args.no_agreement else "yarn x8 + fine-tune",
        agreement_lengths=(256, 1024, 2048),
        on_step=lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True),
    )
    x16_seeds = {s.seed: report.result("yarn x16 + PoSE").passkey_by_length[4096]}
    x16_runs = {}
    for seed in (int(x) for x in args.x16_seeds.split(",") if x.strip()):
        again = run_extension(
            tiny_model(),
            WORK / f"x16_seed{seed}",
            variants=[v for v in VARIANTS if v.name == "yarn x16 + PoSE"],
            settings=replace(s, seed=seed, lengths=(4096,), multikey_trials=0, ppl_lengths=()),
            on_step=lambda m, seed=seed: print(f"[{time.perf_counter() - t0:6.0f} s] seed {seed}: {m}", flush=True),
        )
        x16_runs[seed] = again.to_dict()
        x16_seeds[seed] = again.results[0].passkey_by_length[4096]
    print()
    print(format_table(report))
    if len(x16_seeds) > 1:
        per = ", ".join(f"seed {k}: {100 * v:.0f}%" for k, v in x16_seeds.items())
        print(f"yarn x16 + PoSE passkey@4096 by fine-tuning seed (data and training): {per}")
    targets = _targets(report, x16_seeds)
    print()
    for name, t in targets.items():
        print(f"{'met ' if t['met'] else 'MISS'}  {name}: {t['value']}")
    if report.agreement:
        a = report.agreement
        print(f"\nPyTorch vs llama.cpp (f16 KV): {a['agreement']:.1%} same answer over {a['trials']} trials")
    kv = None
    if not args.no_kv:
        print("\nKV cache types on the YaRN x8 fine-tune (passkey per length; KL vs the f16 cache on held-out text)")
        kv = kv_comparison(report.result("yarn x8 + fine-tune").gguf, s)
        for name, row in kv["kv"].items():
            pk = ", ".join(f"{n}: {100 * a:.0f}%" for n, a in row["passkey_by_length"].items())
            extra = f"; KL {row['kl_mean']:.2e}, top-1 {row['top1_agreement']:.1%}" if "kl_mean" in row else ""
            print(f"  {name:<5} passkey {pk}{extra}")
    save_plot(report, PLOT, title="built-in tiny model (trained at 256 tokens) in llama.cpp")
    _heatmaps(report, HEATMAPS)
    C.write_json(
        RESULT,
        {
            "benchmark": "quality",
            "machine": C.machine_info(),
            "load_average_before": load,
            "model": {"path": "models/tiny", "recipe": recipe()["recipe"]},
            "targets": targets,
            "report": report.to_dict(),
            "x16_pose_seeds": {"passkey_at_4096": x16_seeds, "runs": x16_runs},
            "kv_cache_types": kv,
            "plots": [str(PLOT.relative_to(C.REPO_ROOT)), str(HEATMAPS.relative_to(C.REPO_ROOT))],
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    print(
        f"\nwrote {RESULT.relative_to(C.REPO_ROOT)}, {PLOT.name}, {HEATMAPS.name} in {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
