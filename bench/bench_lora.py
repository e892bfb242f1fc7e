"""LoRA against full fine-tuning: training memory and speed on two model sizes, passkey quality at x8.

1. Memory and tokens/s.  Each (model, mode) is one ``python -m edgerope finetune ... --json`` child process
   (YaRN x8, the same rows, fp32 on the CPU, 2 threads): its tokens/s, its peak RSS and the growth of RSS while
   training (peak minus the RSS when the loop started: weights, gradients, optimizer states, activations), and
   edgerope's own estimate (``edgerope.train.recipe.estimate_memory``).  Models: the built-in tiny model
   (0.92M parameters, rows of 2048 tokens) and a random Llama of about 100M parameters (hidden 768, 14 layers,
   12 heads, MLP 2048, the tiny model's 1000-token vocabulary; rows of 512 tokens, so that a step takes
   seconds on 2 cores: memory and speed per token, not quality).  LoRA: rank 16, alpha 32, the seven projections.
2. Quality.  The built-in model fine-tuned with README's command (CPython's documentation as one .txt file,
   finetune's default retrieval mix, YaRN x8, 2400 steps of 2048 tokens) with every weight and with ``--lora``
   (merged when converted), each a Q8_0 GGUF evaluated in llama.cpp with a q8_0 KV cache on EVAL.md's passkey
   format and on the independent format (``edgerope.recipes.extend_eval``), 10 trials x 5 depths per length;
   then the full fine-tune twice more with fine-tuning seeds 1 and 2 (``--seeds``), at 2048: one run does not
   measure it (in tuning runs outside bench/, one setting gave results tens of points apart with other seeds).

Writes ``bench/results/lora.json`` and prints the tables.
Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_lora.py`` (about 27 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO_ROOT))

from edgerope.models.builtin import tiny_model  # noqa: E402
from edgerope.recipes.extend import Settings, Variant, run_extension  # noqa: E402
from edgerope.recipes.extend_report import format_table  # noqa: E402

RESULT = C.RESULTS_DIR / "lora.json"
WORK = C.WORK_DIR / "lora"
RANK, ALPHA = 16, 32
BIG = dict(
    hidden_size=768, num_hidden_layers=14, num_attention_heads=12, num_key_value_heads=12, intermediate_size=2048
)
QUALITY = Settings(lengths=(256, 512, 1024, 2048), trials=10, ppl_lengths=(256, 2048), ft_steps=2400, independent=True)


def _text_file() -> Path:
    from edgerope.train.synthetic import corpus_text

    path = WORK / "pydoc_topics.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def _big_model() -> Path:
    """The random ~100M-parameter Llama (seed 0), with the tiny model's tokenizer; cached in bench/.work."""
    from edgerope.models.tiny_random import make_tiny_checkpoint

    out = WORK / "llama_100m"
    if not (out / "model.safetensors").is_file():
        make_tiny_checkpoint(out, tokenizer_dir=tiny_model(), weight_std=0.02, seed=0, **BIG)
    return out


def _finetune(model: Path, data: Path, out: Path, *, lora: bool, seq_len: int, steps: int) -> dict:
    cmd = [
        sys.executable, "-m", "edgerope", "finetune", str(model), "--rope", "yarn", "--factor", "8",
        "--data", str(data), "-o", str(out), "--steps", str(steps), "--seq-len", str(seq_len),
        "--precision", "fp32", "--device", "cpu", "--force", "--json",
    ]  # fmt: skip
    if lora:
        cmd += ["--lora", "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(C.REPO_ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:8])} failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout)
    return {
        "mode": "lora" if lora else "full",
        "command": ["edgerope", *cmd[3:]],
        "steps": r["steps"],
        "seq_len": r["seq_len"],
        "tokens_per_s": r["tokens_per_s"],
        "seconds": r["seconds"],
        "peak_rss_bytes": r["peak_memory_bytes"],
        "training_memory_bytes": r["peak_memory_bytes"] - r["memory_before_training_bytes"],
        "estimate_bytes": r["memory_estimate_bytes"],
        "trainable_params": r["trainable_params"],
        "final_loss": sum(r["losses"][-5:]) / len(r["losses"][-5:]),
    }


def measure_speed_memory(steps_tiny: int, steps_big: int) -> list[dict]:
    data = _text_file()
    rows = []
    for name, model, seq_len, steps in (
        ("built-in tiny (0.92M)", tiny_model(), 2048, steps_tiny),
        ("random Llama (~100M)", _big_model(), 512, steps_big),
    ):
        from edgerope.models.config import ModelConfig

        n_params = ModelConfig.load(model).n_params
        for lora in (False, True):
            r = _finetune(model, data, WORK / f"speed-{'lora' if lora else 'full'}", lora=lora, seq_len=seq_len,
                          steps=steps)  # fmt: skip
            rows.append({"model": name, "params": n_params, **r})
            print(
                f"  {name:<24}{r['mode']:<6}{r['tokens_per_s']:>10.0f} tok/s{r['training_memory_bytes'] / 2**20:>10.0f} "
                f"MiB training{r['peak_rss_bytes'] / 2**20:>9.0f} MiB peak{r['estimate_bytes'] / 2**20:>9.0f} MiB est.",
                flush=True,
            )
    return rows


FULL = Variant("yarn x8 + fine-tune, text", "yarn", 8, "full", data="text")
LORA = Variant("yarn x8 + LoRA, text", "yarn", 8, "full", data="text", lora=True)


def measure_quality(steps: int, trials: int, seeds: list[int], t0: float) -> dict:
    """Both variants with fine-tuning seed 0 at every length; the full fine-tune again with each of ``seeds`` at
    2048 (the seed draws the held-out chunks, the rows and their order; runs of one setting can differ a lot)."""
    s = replace(QUALITY, ft_steps=steps, trials=trials)
    report = run_extension(
        tiny_model(),
        WORK / "quality",
        variants=[FULL, LORA],
        settings=s,
        on_step=lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True),
    )
    full = report.result(FULL.name)
    by_seed = {s.seed: {"eval": full.passkey_by_length[2048], "independent": full.independent_by_length[2048]}}
    runs = {}
    for seed in seeds:
        again = run_extension(
            tiny_model(),
            WORK / f"quality_seed{seed}",
            variants=[FULL],
            settings=replace(s, seed=seed, lengths=(2048,), ppl_lengths=()),
            on_step=lambda m, seed=seed: print(f"[{time.perf_counter() - t0:6.0f} s] seed {seed}: {m}", flush=True),
        )
        runs[seed] = again.to_dict()
        r = again.results[0]
        by_seed[seed] = {"eval": r.passkey_by_length[2048], "independent": r.independent_by_length[2048]}
    print()
    print(format_table(report))
    mean = {k: sum(v[k] for v in by_seed.values()) / len(by_seed) for k in ("eval", "independent")}
    per = ", ".join(f"seed {k}: {100 * v['eval']:.0f}% / {100 * v['independent']:.0f}%" for k, v in by_seed.items())
    print(f"{FULL.name}, passkey@2048 by fine-tuning seed (EVAL.md's format / independent): {per}")
    print(f"  mean {100 * mean['eval']:.0f}% / {100 * mean['independent']:.0f}% (target: independent >= 90%)")
    return {**report.to_dict(), "full_by_seed_at_2048": {"by_seed": by_seed, "mean": mean, "runs": runs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps-tiny", type=int, default=20, help="steps per speed/memory run on the tiny model")
    ap.add_argument("--steps-big", type=int, default=4, help="steps per speed/memory run on the 100M model")
    ap.add_argument("--quality-steps", type=int, default=QUALITY.ft_steps)
    ap.add_argument("--trials", type=int, default=QUALITY.trials, help="passkey trials per (length, depth)")
    ap.add_argument(
        "--seeds", default="1,2", help="more fine-tuning seeds for the full fine-tune, at 2048 ('' for none)"
    )
    ap.add_argument("--no-quality", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    load = C.load_average()
    print("memory and speed, full vs LoRA (fp32, CPU, 2 threads)")
    speed = measure_speed_memory(args.steps_tiny, args.steps_big)
    quality = (
        None
        if args.no_quality
        else measure_quality(args.quality_steps, args.trials, [int(x) for x in args.seeds.split(",") if x.strip()], t0)
    )
    C.write_json(
        RESULT,
        {
            "benchmark": "lora",
            "machine": C.machine_info(),
            "load_average_before": load,
            "load_average_after": C.load_average(),
            "lora": {"rank": RANK, "alpha": ALPHA, "targets": "q,k,v,o,gate,up,down projections"},
            "speed_memory": speed,
            "quality": quality,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    print(f"\nwrote {RESULT.relative_to(C.REPO_ROOT)} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
