"""Benchmark: ``edgerope set-rope`` on large GGUFs vs a plain copy of the same file.

What it measures: synthetic llama-arch GGUFs (random F16 weights, a real SentencePiece vocab padded to
32000 rows, context 4096, no rope scaling; built once with ``gguf.GGUFWriter`` and cached in
``bench/.work``) of two sizes, 443 MB (2 layers) and 1.16 GB (10 layers), each rewritten to YaRN x4 over
4096 by

  edgerope set-rope    ``edgerope set-rope IN -o OUT --type yarn --factor 4 --original-context 4096``
  copy                 ``shutil.copyfile`` of the same file (the floor: the tensor bytes must be written)
  import edgerope      ``python -c "import edgerope.gguf.set_rope"`` (reference: the fixed start-up cost)
  GGUFReader open      ``gguf.GGUFReader(IN)`` alone (reference: what parsing the header costs gguf-py tools)

each in a fresh child process, several rounds, cases interleaved, warm page cache.  After each run the
bench fsyncs the output (timed separately, so tools that fsync and tools that do not can be compared),
deletes it and calls ``sync``, untimed.  Reported: median wall time, MB/s (input bytes / s), peak RSS,
and the ratio set-rope / copy (target <= 1.5x).  An untimed warm-up round comes first; its output is
checked: every tensor byte-identical to the input, and the metadata differences listed.

What it does not do: it is not a test of set-rope's rope math (tests/ does that); it only times the
rewrite and confirms that tensors were carried over verbatim.

    PYTHONPATH=. .venv/bin/python bench/bench_set_rope.py [--runs 5] [--layers 2 10]

Writes ``bench/results/set_rope.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

OUT_DIR = C.WORK_DIR / "out_set_rope"
RESULT = C.RESULTS_DIR / "set_rope.json"

SPEC: dict[str, Any] = {  # num_hidden_layers comes from --layers
    "arch": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 32000,
    "tokenizer_pieces": 1000,
    "context_length": 4096,
    "rope_theta": 10000.0,
    "seed": 4321,
}
DEFAULT_LAYERS = (2, 10)
SET_ROPE_ARGS = ["--type", "yarn", "--factor", "4", "--original-context", "4096"]
TARGET_RATIO = 1.5  # set-rope time <= 1.5x a plain copy


def spec_for(layers: int) -> dict[str, Any]:
    return {**SPEC, "num_hidden_layers": layers}


def gguf_path(layers: int) -> Path:
    return C.WORK_DIR / f"set_rope_input_{layers}L.gguf"


def gguf_cached(layers: int) -> bool:
    path, spec_path = gguf_path(layers), gguf_path(layers).with_suffix(".spec.json")
    return path.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == spec_for(layers)


def make_gguf(layers: int) -> Path:
    """Write the input GGUF once; reuse it while its spec file matches."""
    path, spec = gguf_path(layers), spec_for(layers)
    if gguf_cached(layers):
        return path
    import gguf
    import numpy as np
    import sentencepiece as spm
    from bench_convert import _train_tokenizer

    print(f"building {path} ...", file=sys.stderr)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        _train_tokenizer(Path(tmp), pieces=spec["tokenizer_pieces"])
        sp = spm.SentencePieceProcessor(model_file=str(Path(tmp) / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    for i in range(sp.vocab_size(), spec["vocab_size"]):  # pad to the embedding rows
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)

    d, f, v, hd = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"], spec["head_dim"]
    nh, nkv = spec["num_attention_heads"], spec["num_key_value_heads"]
    tmp_path = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp_path, spec["arch"])
    w.add_name("edgerope bench set-rope input")
    w.add_context_length(spec["context_length"])
    w.add_embedding_length(d)
    w.add_block_count(spec["num_hidden_layers"])
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(v)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())

    rng = np.random.default_rng(spec["seed"])
    T = gguf.MODEL_TENSOR

    def tname(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=bid) if bid is not None else base) + ".weight"

    def weight(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return (1.0 + 0.02 * rng.standard_normal(d, dtype=np.float32)).astype(np.float32)

    # numpy shapes are [rows = out_features, cols = in_features]; GGUF stores them reversed
    w.add_tensor(tname(T.TOKEN_EMBD), weight(v, d))
    for i in range(spec["num_hidden_layers"]):
        w.add_tensor(tname(T.ATTN_NORM, i), norm())
        w.add_tensor(tname(T.ATTN_Q, i), weight(nh * hd, d))
        w.add_tensor(tname(T.ATTN_K, i), weight(nkv * hd, d))
        w.add_tensor(tname(T.ATTN_V, i), weight(nkv * hd, d))
        w.add_tensor(tname(T.ATTN_OUT, i), weight(d, nh * hd))
        w.add_tensor(tname(T.FFN_NORM, i), norm())
        w.add_tensor(tname(T.FFN_GATE, i), weight(f, d))
        w.add_tensor(tname(T.FFN_UP, i), weight(f, d))
        w.add_tensor(tname(T.FFN_DOWN, i), weight(d, f))
    w.add_tensor(tname(T.OUTPUT_NORM), norm())
    w.add_tensor(tname(T.OUTPUT), weight(v, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp_path.replace(path)
    path.with_suffix(".spec.json").write_text(
        json.dumps(spec, indent=2) + "\n"
    )  # written last: marks the cache complete
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return path


def check_output(src: Path, out: Path) -> dict[str, Any]:
    """Tensor bytes must be identical; list the metadata that changed."""
    import numpy as np
    from gguf import GGUFReader

    a, b = GGUFReader(src), GGUFReader(out)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    same, differ = 0, []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape) and np.array_equal(x.data, y.data):
            same += 1
        else:
            differ.append(name)

    def kv(r: GGUFReader) -> dict[str, Any]:
        out_kv = {}
        for name, field in r.fields.items():
            if name.startswith("GGUF."):
                continue
            v = field.contents()
            out_kv[name] = f"<array of {len(v)}>" if isinstance(v, list) and len(v) > 8 else v
        return out_kv

    ka, kb = kv(a), kv(b)
    return {
        "tensors_identical": same,
        "tensors_differ": differ,
        "tensors_only_in_input": sorted(set(ta) - set(tb)),
        "tensors_only_in_output": sorted(set(tb) - set(ta)),
        "metadata_added": {k: kb[k] for k in sorted(set(kb) - set(ka))},
        "metadata_removed": {k: ka[k] for k in sorted(set(ka) - set(kb))},
        "metadata_changed": {k: [ka[k], kb[k]] for k in sorted(set(ka) & set(kb)) if ka[k] != kb[k]},
        "input_bytes": src.stat().st_size,
        "output_bytes": out.stat().st_size,
    }


def measure(layers: int, runs_per_case: int, me: list[str]) -> dict[str, Any]:
    """All cases on the GGUF with ``layers`` layers; returns the JSON block for that size."""
    src = gguf_path(layers)
    input_bytes = src.stat().st_size
    out_dir = OUT_DIR / f"{layers}L"
    out_dir.mkdir(parents=True)
    out_gguf = out_dir / "set_rope_yarn4.gguf"
    cases = {
        "edgerope set-rope": (
            C.edgerope_command() + ["set-rope", str(src), "-o", str(out_gguf), *SET_ROPE_ARGS],
            C.edgerope_env(),
            out_gguf,
        ),
        "copy": (C.copy_command([src], out_dir / "copy"), {}, out_dir / "copy"),
        "import edgerope": (
            [sys.executable, "-c", "import edgerope.gguf.set_rope"],
            C.edgerope_env(),
            out_dir / "nothing",
        ),
        "GGUFReader open": (
            [sys.executable, "-c", "import sys, gguf; gguf.GGUFReader(sys.argv[1])", str(src)],
            {},
            out_dir / "nothing",
        ),
    }
    C.warm_read([src])
    runs: dict[str, list[C.Run]] = {n: [] for n in cases}
    warmup: dict[str, C.Run] = {}
    check: dict[str, Any] | None = None
    for r in range(runs_per_case + 1):  # round 0: untimed warm-up, its output is checked
        for name, (cmd, env, output) in cases.items():
            run = C.run_measured(cmd, env=env, log_path=out_dir / f"{name.replace(' ', '_')}.log")
            run = dataclasses.replace(run, fsync_s=C.fsync_tree(output))
            if r == 0:
                warmup[name] = run
            else:
                runs[name].append(run)
            label = "warm-up" if r == 0 else f"run {r}/{runs_per_case}"
            print(
                f"  {layers:2d}L {label:9s} {name:18s} {run.wall_s:6.2f} s (+fsync {run.fsync_s:4.2f} s) "
                f"{C.fmt_mib(run.peak_rss_bytes):>5s} MiB",
                file=sys.stderr,
            )
            if r == 0 and name == "edgerope set-rope":
                subprocess.run(me + ["_check", str(out_dir / "check.json"), str(src), str(out_gguf)], check=True)
                check = json.loads((out_dir / "check.json").read_text())
            C.settle(output)
    probe = C.page_touch_probe([src], out_dir / "probe")
    results = {n: C.summarize(runs[n], input_bytes=input_bytes) for n in cases}
    er, cp = results["edgerope set-rope"], results["copy"]
    ratio = er["median_wall_s"] / cp["median_wall_s"]
    ratio_durable = er["median_durable_s"] / cp["median_durable_s"]
    return {
        "layers": layers,
        "input_bytes": input_bytes,
        "spec": spec_for(layers),
        "commands": {n: c[0] for n, c in cases.items()},
        "results": results,
        "ratios": {
            "set_rope_over_copy_time": ratio,
            "set_rope_over_copy_time_both_fsynced": ratio_durable,
            "set_rope_minus_import_over_copy_time": (er["median_wall_s"] - results["import edgerope"]["median_wall_s"])
            / cp["median_wall_s"],
        },
        "targets": {
            "set-rope time": {"target": f"<= {TARGET_RATIO}x copy", "ratio": ratio, "met": ratio <= TARGET_RATIO},
            "set-rope time, both fsynced": {
                "target": f"<= {TARGET_RATIO}x copy",
                "ratio": ratio_durable,
                "met": ratio_durable <= TARGET_RATIO,
            },
        },
        "warmup_runs": {n: w.to_json() for n, w in warmup.items()},
        "vm_fresh_page_probe": probe,
        "output_check": check,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    ap.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS), help="GGUF sizes, in layers")
    ap.add_argument("--clean", action="store_true", help="delete the cached input GGUFs afterwards")
    args = ap.parse_args(argv)

    me = [sys.executable, str(Path(__file__).resolve())]
    # heavy work (numpy, gguf) runs in children: a child's ru_maxrss starts from this process's RSS at fork
    for layers in args.layers:
        if not gguf_cached(layers):
            subprocess.run(me + ["_build", str(layers)], check=True)
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)

    load_before = C.load_average()
    t0 = time.perf_counter()
    sizes = [measure(layers, args.runs, me) for layers in args.layers]
    elapsed = time.perf_counter() - t0
    load_after = C.load_average()

    headers = ["GGUF", "case", "median s", "min s", "max s", "+ fsync s", "MB/s", "peak RSS MiB", "x copy"]
    rows = []
    for size in sizes:
        copy_s = size["results"]["copy"]["median_wall_s"]
        for name, res in size["results"].items():
            rows.append(
                [
                    f"{size['input_bytes'] / 1e6:,.0f} MB",
                    name,
                    f"{res['median_wall_s']:.2f}",
                    f"{res['min_wall_s']:.2f}",
                    f"{res['max_wall_s']:.2f}",
                    f"{res['median_durable_s']:.2f}",
                    f"{res['median_mb_per_s']:.0f}",
                    C.fmt_mib(res["peak_rss_bytes"]),
                    f"{res['median_wall_s'] / copy_s:.2f}x",
                ]
            )
    table = C.format_table(headers, rows)
    target_rows = []
    for size in sizes:
        for key, t in size["targets"].items():
            status = "met" if t["met"] else "NOT met"
            target_rows.append([f"{size['input_bytes'] / 1e6:,.0f} MB", key, t["target"], f"{t['ratio']:.2f}x", status])
    target_table = C.format_table(["GGUF", "target", "wanted", "measured", "status"], target_rows)
    machine = C.machine_info()
    header = (
        f"set-rope (yarn x4 over 4096) on F16 GGUFs, warm page cache, {args.runs} runs per case after a "
        f"warm-up round, median\n"
        f"machine: {machine['cpu_model']}, {machine['cpus_usable']} cores, {machine['ram_gib']} GiB RAM, "
        f"Python {machine['python']}, numpy {machine['numpy']}; load avg before {load_before}, after {load_after}"
    )
    print("\n" + header + "\n")
    print(table)
    print()
    print(target_table)
    for size in sizes:
        probe, check = size["vm_fresh_page_probe"], size["output_check"]
        print(
            f"\n{size['layers']} layers: VM fresh-page probe: copy after a pause {probe['first_pass_s']:.2f} s, "
            f"immediately again {probe['second_pass_s']:.2f} s"
        )
        if check is not None:
            print(
                f"  output check: {check['tensors_identical']} tensors byte-identical, "
                f"{len(check['tensors_differ'])} differ; metadata changed {sorted(check['metadata_changed'])}, "
                f"added {sorted(check['metadata_added'])}, removed {sorted(check['metadata_removed'])}"
            )

    C.write_json(
        RESULT,
        {
            "benchmark": "set_rope",
            "date_utc": C.now_utc(),
            "machine": machine,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "conditions": "warm page cache (input read once before its first run); one untimed warm-up round; "
            "each run a fresh child process; cases interleaved per round; after each run the bench fsyncs the "
            "output (timed separately: durable_s = wall_s + fsync_s; a tool that fsyncs itself shows ~0), then "
            "deletes it and calls sync(), untimed",
            "set_rope_args": SET_ROPE_ARGS,
            "runs_per_case": args.runs,
            "elapsed_s": elapsed,
            "bench_process_peak_rss_bytes": C.own_peak_rss(),
            "sizes": sizes,
            "header": header,
            "table_markdown": table,
            "targets_markdown": target_table,
        },
    )
    print(f"\nwrote {RESULT.relative_to(C.REPO_ROOT)}", file=sys.stderr)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    if args.clean:
        for layers in args.layers:
            gguf_path(layers).unlink(missing_ok=True)
            gguf_path(layers).with_suffix(".spec.json").unlink(missing_ok=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        make_gguf(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_check":
        C.write_json(Path(sys.argv[2]), check_output(Path(sys.argv[3]), Path(sys.argv[4])))
    else:
        main()
