"""Benchmark: ``edgerope set-rope`` on a large GGUF vs a plain copy of the same file.

What it measures: a synthetic llama-arch GGUF of about 440 MB (random F16 weights, a real SentencePiece
vocab, context 4096, no rope scaling; built once with ``gguf.GGUFWriter`` and cached in ``bench/.work``)
is rewritten to YaRN x4 over 4096 by

  edgerope set-rope   ``edgerope set-rope IN -o OUT --type yarn --factor 4 --original-context 4096``
  copy                ``shutil.copyfile`` of the same file (the floor: the tensor bytes must be written)

each in a fresh child process, several rounds, cases interleaved, warm page cache, output deleted and
``sync`` called, untimed, between runs.  Reported: median wall time, MB/s (input bytes / s), peak RSS,
and the ratio set-rope / copy (target <= 1.5x).  An untimed warm-up round comes first; its output is
checked: every tensor byte-identical to the input, and the metadata differences listed.

What it does not do: it is not a test of set-rope's rope math (tests/ does that); it only times the
rewrite and confirms that tensors were carried over verbatim.

    PYTHONPATH=. .venv/bin/python bench/bench_set_rope.py [--runs 5]

Writes ``bench/results/set_rope.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C

GGUF_PATH = C.WORK_DIR / "set_rope_input.gguf"
SPEC_PATH = C.WORK_DIR / "set_rope_input.spec.json"
OUT_DIR = C.WORK_DIR / "out_set_rope"
RESULT = C.RESULTS_DIR / "set_rope.json"

SPEC: dict[str, Any] = {
    "arch": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_hidden_layers": 2,
    "vocab_size": 32000,
    "tokenizer_pieces": 1000,
    "context_length": 4096,
    "rope_theta": 10000.0,
    "seed": 4321,
}
SET_ROPE_ARGS = ["--type", "yarn", "--factor", "4", "--original-context", "4096"]
TARGET_RATIO = 1.5  # set-rope time <= 1.5x a plain copy


def make_gguf(path: Path) -> Path:
    """Write the input GGUF once; reuse it while the spec file matches SPEC."""
    if path.is_file() and SPEC_PATH.is_file() and json.loads(SPEC_PATH.read_text()) == SPEC:
        return path
    import gguf
    import numpy as np
    import sentencepiece as spm
    from bench_convert import _train_tokenizer

    print(f"building {path} ...", file=sys.stderr)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        _train_tokenizer(Path(tmp), pieces=SPEC["tokenizer_pieces"])
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
    for i in range(sp.vocab_size(), SPEC["vocab_size"]):  # pad to the embedding rows
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)

    d, f, v, hd = SPEC["hidden_size"], SPEC["intermediate_size"], SPEC["vocab_size"], SPEC["head_dim"]
    nh, nkv = SPEC["num_attention_heads"], SPEC["num_key_value_heads"]
    tmp_path = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(tmp_path, SPEC["arch"])
    w.add_name("edgerope bench set-rope input")
    w.add_context_length(SPEC["context_length"])
    w.add_embedding_length(d)
    w.add_block_count(SPEC["num_hidden_layers"])
    w.add_feed_forward_length(f)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(SPEC["rope_theta"])
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

    rng = np.random.default_rng(SPEC["seed"])
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
    for i in range(SPEC["num_hidden_layers"]):
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
    SPEC_PATH.write_text(json.dumps(SPEC, indent=2) + "\n")  # written last: marks the cache complete
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    ap.add_argument("--clean", action="store_true", help="delete the cached input GGUF afterwards")
    args = ap.parse_args(argv)

    src = make_gguf(GGUF_PATH)
    input_bytes = src.stat().st_size
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    out_gguf = OUT_DIR / "set_rope_yarn4.gguf"
    cases = {
        "edgerope set-rope": (
            C.edgerope_command() + ["set-rope", str(src), "-o", str(out_gguf), *SET_ROPE_ARGS],
            C.edgerope_env(),
            out_gguf,
        ),
        "copy": (C.copy_command([src], OUT_DIR / "copy"), {}, OUT_DIR / "copy"),
    }

    load_before = C.load_average()
    C.warm_read([src])
    runs: dict[str, list[C.Run]] = {n: [] for n in cases}
    warmup: dict[str, C.Run] = {}
    check: dict[str, Any] | None = None
    for r in range(args.runs + 1):  # round 0: untimed warm-up, its output is checked
        for name, (cmd, env, output) in cases.items():
            run = C.run_measured(cmd, env=env, log_path=OUT_DIR / f"{name.replace(' ', '_')}.log")
            if r == 0:
                warmup[name] = run
            else:
                runs[name].append(run)
            label = "warm-up" if r == 0 else f"run {r}/{args.runs}"
            print(
                f"  {label:9s} {name:18s} {run.wall_s:6.2f} s  {C.fmt_mib(run.peak_rss_bytes):>5s} MiB", file=sys.stderr
            )
            if r == 0 and name == "edgerope set-rope":
                check = check_output(src, out_gguf)
            C.settle(output)
    probe = C.page_touch_probe([src], OUT_DIR / "probe")
    load_after = C.load_average()

    results = {n: C.summarize(runs[n], input_bytes=input_bytes) for n in cases}
    ratio = results["edgerope set-rope"]["median_wall_s"] / results["copy"]["median_wall_s"]
    rss_ratio = results["edgerope set-rope"]["peak_rss_bytes"] / results["copy"]["peak_rss_bytes"]
    rows = [
        [
            n,
            f"{res['median_wall_s']:.2f}",
            f"{res['min_wall_s']:.2f}",
            f"{res['max_wall_s']:.2f}",
            f"{res['median_mb_per_s']:.0f}",
            C.fmt_mib(res["peak_rss_bytes"]),
            f"{res['median_wall_s'] / results['copy']['median_wall_s']:.2f}x",
        ]
        for n, res in results.items()
    ]
    table = C.format_table(["case", "median s", "min s", "max s", "MB/s", "peak RSS MiB", "x copy time"], rows)
    met = ratio <= TARGET_RATIO
    machine = C.machine_info()
    print(
        f"\nset-rope on a {input_bytes / 1e6:.0f} MB F16 GGUF (yarn x4 over 4096), warm page cache, "
        f"{args.runs} runs per case, median\n"
        f"machine: {machine['cpu_model']}, {machine['cpus_usable']} cores, {machine['ram_gib']} GiB RAM, "
        f"Python {machine['python']}, numpy {machine['numpy']}; load avg before {load_before}, after {load_after}\n"
    )
    print(table)
    print(f"\ntarget: set-rope <= {TARGET_RATIO}x copy time: measured {ratio:.2f}x -> {'met' if met else 'NOT met'}")
    print(
        f"VM fresh-page probe: copy after a pause {probe['first_pass_s']:.2f} s, "
        f"immediately again {probe['second_pass_s']:.2f} s (see bench/README.md)"
    )
    if check is not None:
        print(
            f"output check: {check['tensors_identical']} tensors byte-identical, {len(check['tensors_differ'])} differ; "
            f"metadata changed {sorted(check['metadata_changed'])}, added {sorted(check['metadata_added'])}, "
            f"removed {sorted(check['metadata_removed'])}"
        )

    C.write_json(
        RESULT,
        {
            "benchmark": "set_rope",
            "date_utc": C.now_utc(),
            "machine": machine,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "conditions": "warm page cache (input read once before the first run); each run a fresh child "
            "process; output deleted and sync() between runs, untimed; cases interleaved per round; "
            "one untimed warm-up round",
            "input": {"gguf": "synthetic llama-arch, random F16 weights", "spec": SPEC, "input_bytes": input_bytes},
            "commands": {n: c[0] for n, c in cases.items()},
            "runs_per_case": args.runs,
            "warmup_runs": {n: w.to_json() for n, w in warmup.items()},
            "vm_fresh_page_probe": probe,
            "results": results,
            "ratios": {"set_rope_over_copy_time": ratio, "set_rope_over_copy_peak_rss": rss_ratio},
            "targets": {"set_rope_time": {"target": f"<= {TARGET_RATIO}x copy", "ratio": ratio, "met": met}},
            "output_check": check,
            "table_markdown": table,
        },
    )
    print(f"\nwrote {RESULT.relative_to(C.REPO_ROOT)}", file=sys.stderr)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    if args.clean:
        GGUF_PATH.unlink(missing_ok=True)
        SPEC_PATH.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
