"""Benchmark: HF safetensors checkpoint -> GGUF, edgerope vs llama.cpp's own converter.

What it measures, all on the same synthetic Llama checkpoint (bf16, two shards, > 1 GB, built once and
cached in ``bench/.work``), each case in a fresh child process, several rounds, cases interleaved:

  llama.cpp f16   vendored ``convert_hf_to_gguf.py --outtype f16`` (from the llama-cpp-python sdist)
  edgerope f16    ``edgerope convert --outtype f16``
  edgerope bf16   ``edgerope convert --outtype bf16``
  copy            ``shutil.copyfile`` of the two shards (the I/O floor)
  numpy cast      single-threaded numpy bf16 -> f16 cast of every element, nothing written (compute floor)

For each: wall time, MB/s (checkpoint input bytes / wall time) and the child's peak RSS (``wait4``).
The page cache is warm for every run (the shards are read once before the first run); outputs are
deleted and ``sync`` is called, untimed, between runs.  An untimed warm-up round runs every case first;
its outputs are checked: the two f16 files must hold the same tensors bit for bit, and edgerope's bf16
file must equal them after a bf16 -> f16 cast.

What it does not do: it is not a test, it does not measure quantized output types, and it does not
drop the page cache (cold-cache numbers depend on the disk, not on the converter).

    PYTHONPATH=. .venv/bin/python bench/bench_convert.py [--runs 5]

Writes ``bench/results/convert.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import _common as C

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_DIR = C.WORK_DIR / "sdist"
CKPT_DIR = C.WORK_DIR / "ckpt_llama_1g"
OUT_DIR = C.WORK_DIR / "out_convert"
RESULT = C.RESULTS_DIR / "convert.json"

# Llama shape (TinyLlama-like widths, fewer layers): 10 layers -> 1.16 GB of bf16 weights.
SPEC: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_hidden_layers": 10,
    "vocab_size": 32000,  # embedding rows; the tokenizer has fewer pieces, converters pad the vocab
    "tokenizer_pieces": 1000,
    "max_position_embeddings": 16384,
    "rope_parameters": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    },
    "seed": 1234,
    "shards": 2,
}

TARGET_F16_TIME_RATIO = 0.5  # edgerope f16 time <= 0.5x llama.cpp f16 time
TARGET_F16_RSS_RATIO = 1.0  # edgerope f16 peak RSS <= llama.cpp's
TARGET_BF16_COPY_RATIO = 2.0  # edgerope bf16 -> bf16 time <= 2x a plain copy


# ----------------------------------------------------------------------------------------------------------------------
# the synthetic checkpoint


def _train_tokenizer(out_dir: Path, *, pieces: int) -> None:
    """SentencePiece BPE with byte fallback, trained on CPython's pydoc topics (no download)."""
    import pydoc_data.topics

    import sentencepiece as spm

    text_path = out_dir / "tokenizer_corpus.txt"
    text_path.write_text("\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)))
    spm.SentencePieceTrainer.train(
        input=str(text_path),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=pieces,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    text_path.unlink()
    (out_dir / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": SPEC["max_position_embeddings"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama state-dict names and [out, in] shapes, in model order."""
    d, f, v = SPEC["hidden_size"], SPEC["intermediate_size"], SPEC["vocab_size"]
    q, kv = SPEC["num_attention_heads"] * SPEC["head_dim"], SPEC["num_key_value_heads"] * SPEC["head_dim"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, d))]
    for i in range(SPEC["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (q, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, q)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return shapes


def checkpoint_cached(out_dir: Path) -> bool:
    spec_file = out_dir / "spec.json"
    return spec_file.is_file() and json.loads(spec_file.read_text()) == SPEC


def make_checkpoint(out_dir: Path) -> Path:
    """Build the checkpoint once; reuse it while ``spec.json`` matches SPEC."""
    if checkpoint_cached(out_dir):
        return out_dir
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    print(f"building synthetic checkpoint in {out_dir} ...", file=sys.stderr)
    t0 = time.perf_counter()

    shapes = _tensor_shapes()
    nbytes = [2 * int(torch.Size(s).numel()) for _, s in shapes]
    half = sum(nbytes) / SPEC["shards"]
    shard_of: list[int] = []
    acc = 0
    for n in nbytes:  # contiguous split, each shard about the same size
        shard_of.append(min(int(acc // half), SPEC["shards"] - 1))
        acc += n
    weight_map: dict[str, str] = {}
    for shard in range(SPEC["shards"]):
        fname = f"model-{shard + 1:05d}-of-{SPEC['shards']:05d}.safetensors"
        tensors = {}
        for idx, ((name, shape), s) in enumerate(zip(shapes, shard_of, strict=True)):
            if s != shard:
                continue
            g = torch.Generator().manual_seed(SPEC["seed"] * 100_003 + idx)
            w = torch.randn(shape, generator=g, dtype=torch.float32) * 0.02
            if len(shape) == 1:  # RMSNorm gains around 1
                w += 1.0
            tensors[name] = w.to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    cfg_kwargs = {k: SPEC[k] for k in SPEC if k not in ("tokenizer_pieces", "seed", "shards")}
    LlamaConfig(
        architectures=["LlamaForCausalLM"],
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
        **cfg_kwargs,
    ).save_pretrained(out_dir)
    _train_tokenizer(out_dir, pieces=SPEC["tokenizer_pieces"])
    (out_dir / "spec.json").write_text(json.dumps(SPEC, indent=2) + "\n")  # written last: marks the cache complete
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out_dir


def shard_paths(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("model-*.safetensors"))


# ----------------------------------------------------------------------------------------------------------------------
# llama.cpp's converter, from the llama-cpp-python source distribution (never copied into the repo)


def llama_cpp_converter() -> Path:
    root = SDIST_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    SDIST_DIR.mkdir(parents=True, exist_ok=True)
    tarball = SDIST_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not tarball.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            + [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(SDIST_DIR)],
            check=True,
        )
    with tarfile.open(tarball) as tar:
        tar.extractall(SDIST_DIR, filter="data")
    return script


# ----------------------------------------------------------------------------------------------------------------------
# child-process baselines (this script re-invoked with a private sub-command)


def _child_cast(srcs: list[Path]) -> None:
    """Cast every bf16 element of the shards to f16 with numpy, one thread, fixed-size buffers.

    The bytes are read with ``readinto`` (not mmap) so the peak RSS is the working set, not the file.
    """
    import numpy as np

    chunk = 1 << 23  # elements per step: 16 MiB of bf16
    raw = np.empty(chunk, dtype=np.uint16)
    wide = np.empty(chunk, dtype=np.uint32)
    half = np.empty(chunk, dtype=np.float16)
    for src in srcs:
        with open(src, "rb", buffering=0) as f:
            header_len = int.from_bytes(f.read(8), "little")
            f.seek(8 + header_len)
            while nbytes := f.readinto(memoryview(raw).cast("B")):
                n = nbytes // 2
                np.left_shift(raw[:n], 16, out=wide[:n], dtype=np.uint32)  # bf16 bits -> high half of f32
                np.copyto(half[:n], wide[:n].view(np.float32), casting="same_kind")


# ----------------------------------------------------------------------------------------------------------------------
# correctness of the first round's outputs


def check_outputs(llama_f16: Path, er_f16: Path, er_bf16: Path) -> dict[str, Any]:
    """Compare tensors and metadata of the three GGUFs; returns findings (does not raise)."""
    import numpy as np
    from gguf import GGUFReader, Keys

    a, b, c = GGUFReader(llama_f16), GGUFReader(er_f16), GGUFReader(er_bf16)
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    tc = {t.name: t for t in c.tensors}
    out: dict[str, Any] = {
        "tensor_names_equal": sorted(ta) == sorted(tb) == sorted(tc),
        "only_in_llama_cpp": sorted(set(ta) - set(tb)),
        "only_in_edgerope": sorted(set(tb) - set(ta)),
        "f16_tensors_bitwise_equal": [],
        "f16_tensors_differ": [],
        "bf16_cast_equals_llama_cpp_f16": [],
        "bf16_cast_differs": [],
        "tensor_types": {},
    }
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        out["tensor_types"][name] = [x.tensor_type.name, y.tensor_type.name]
        if x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape) and np.array_equal(x.data, y.data):
            out["f16_tensors_bitwise_equal"].append(name)
        else:
            out["f16_tensors_differ"].append(name)
        if name in tc:
            z = tc[name]
            if z.tensor_type.name == "BF16":
                cast = (z.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(x.data.dtype)
            else:
                cast = np.asarray(z.data).astype(x.data.dtype)
            same = cast.reshape(-1).view(np.uint8).tobytes() == np.asarray(x.data).reshape(-1).view(np.uint8).tobytes()
            (out["bf16_cast_equals_llama_cpp_f16"] if same else out["bf16_cast_differs"]).append(name)
            out["tensor_types"][name].append(z.tensor_type.name)
    # summarize the long lists
    for key in ("f16_tensors_bitwise_equal", "bf16_cast_equals_llama_cpp_f16"):
        out[key] = len(out[key])

    def kv(reader: GGUFReader) -> dict[str, Any]:
        values = {}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            try:
                values[name] = field.contents()
            except Exception:  # noqa: BLE001 - unreadable fields are reported as such
                values[name] = "<unreadable>"
        return values

    def show(v: Any) -> Any:
        return f"<array of {len(v)}>" if isinstance(v, list) and len(v) > 8 else v

    def differ(x: Any, y: Any) -> Any:
        if isinstance(x, list) and isinstance(y, list):
            first = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
            return {
                "len": [len(x), len(y)],
                "first_difference": first,
                "values": [x[first], y[first]] if first is not None else None,
            }
        return [x, y]

    ka, kb = kv(a), kv(b)
    out["metadata_only_in_llama_cpp"] = {k: show(ka[k]) for k in sorted(set(ka) - set(kb))}
    out["metadata_only_in_edgerope"] = {k: show(kb[k]) for k in sorted(set(kb) - set(ka))}
    out["metadata_differs"] = {k: differ(ka[k], kb[k]) for k in sorted(set(ka) & set(kb)) if ka[k] != kb[k]}
    out["metadata_equal"] = sorted(k for k in set(ka) & set(kb) if ka[k] == kb[k])
    out["rope_metadata_edgerope"] = {k: v for k, v in kb.items() if ".rope." in k or k.endswith("context_length")}
    tokens_key = Keys.Tokenizer.LIST
    out["n_tokens"] = {
        "llama_cpp": len(a.fields[tokens_key].data) if tokens_key in a.fields else None,
        "edgerope_f16": len(b.fields[tokens_key].data) if tokens_key in b.fields else None,
    }
    return out


def _check_in_child(*paths: Path) -> dict[str, Any]:
    """Run check_outputs in a child: reading the GGUFs here would grow this process, and a child's
    ru_maxrss starts from its parent's RSS at fork time."""
    report = OUT_DIR / "check.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    subprocess.run(me + ["_check", str(report), *(str(p) for p in paths)], check=True)
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# the benchmark


def cases(ckpt: Path, shards: list[Path]) -> dict[str, tuple[list[str], dict[str, str], Path]]:
    """case -> (command, extra env, output path to delete afterwards)"""
    conv = llama_cpp_converter()
    er = C.edgerope_command()
    me = [sys.executable, str(Path(__file__).resolve())]
    return {
        "llama.cpp f16": (
            [
                sys.executable,
                str(conv),
                str(ckpt),
                "--outtype",
                "f16",
                "--outfile",
                str(OUT_DIR / "llama_cpp_f16.gguf"),
            ],
            {"PYTHONPATH": str(conv.parent / "gguf-py")},
            OUT_DIR / "llama_cpp_f16.gguf",
        ),
        "edgerope f16": (
            er + ["convert", str(ckpt), "-o", str(OUT_DIR / "edgerope_f16.gguf"), "--outtype", "f16"],
            C.edgerope_env(),
            OUT_DIR / "edgerope_f16.gguf",
        ),
        "edgerope bf16": (
            er + ["convert", str(ckpt), "-o", str(OUT_DIR / "edgerope_bf16.gguf"), "--outtype", "bf16"],
            C.edgerope_env(),
            OUT_DIR / "edgerope_bf16.gguf",
        ),
        "copy": (C.copy_command(shards, OUT_DIR / "copy"), {}, OUT_DIR / "copy"),
        "numpy cast": (
            me + ["_cast"] + [str(s) for s in shards],
            {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
            OUT_DIR / "nothing",
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (default 5)")
    ap.add_argument("--only", nargs="*", help="run only these cases (by name)")
    ap.add_argument("--clean", action="store_true", help="delete the cached checkpoint afterwards")
    args = ap.parse_args(argv)

    if not checkpoint_cached(CKPT_DIR):  # built in a child: torch would bloat this process (see _check_in_child)
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "_build"], check=True)
    ckpt = CKPT_DIR
    shards = shard_paths(ckpt)
    input_bytes = sum(p.stat().st_size for p in shards)
    n_elements = sum(math.prod(s) for _, s in _tensor_shapes())  # bf16 elements in the checkpoint
    all_cases = cases(ckpt, shards)
    names = [n for n in all_cases if not args.only or n in args.only]
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)

    load_before = C.load_average()
    C.warm_read(shards)  # every run below is warm-cache
    runs: dict[str, list[C.Run]] = {n: [] for n in names}
    warmup: dict[str, C.Run] = {}
    checks: dict[str, Any] | None = None
    converters = ("llama.cpp f16", "edgerope f16", "edgerope bf16")
    t_start = time.perf_counter()
    # Round 0 is an untimed warm-up; its converter outputs are kept for the correctness check.
    for r in range(args.runs + 1):
        for name in names:  # interleaved, so load drift on the shared machine hits every case alike
            cmd, env, output = all_cases[name]
            log = OUT_DIR / f"{name.replace(' ', '_').replace('.', '')}.log"
            run = C.run_measured(cmd, env=env, log_path=log)
            run = dataclasses.replace(run, fsync_s=C.fsync_tree(output))
            if r == 0:
                warmup[name] = run
            else:
                runs[name].append(run)
            label = "warm-up" if r == 0 else f"run {r}/{args.runs}"
            print(
                f"  {label:9s} {name:14s} {run.wall_s:7.2f} s (+fsync {run.fsync_s:5.2f} s) "
                f"{C.fmt_mib(run.peak_rss_bytes):>6s} MiB",
                file=sys.stderr,
            )
            if not (r == 0 and name in converters):
                C.settle(output)
        if r == 0:
            if set(converters) <= set(names):
                checks = _check_in_child(*(all_cases[n][2] for n in converters))
                checks["output_bytes"] = {p.name: p.stat().st_size for p in sorted(OUT_DIR.glob("*.gguf"))}
            C.settle(*OUT_DIR.glob("*.gguf"))
    elapsed = time.perf_counter() - t_start
    probe = C.page_touch_probe(shards, OUT_DIR / "probe")
    load_after = C.load_average()

    results = {n: C.summarize(runs[n], input_bytes=input_bytes) for n in names}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results and results[a][key] and results[b][key]:
            return results[a][key] / results[b][key]
        return None

    er16, er_bf16, lc16 = "edgerope f16", "edgerope bf16", "llama.cpp f16"
    ratios = {
        "edgerope_f16_over_llama_cpp_f16_time": ratio(er16, lc16, "median_wall_s"),
        "edgerope_f16_over_llama_cpp_f16_time_both_fsynced": ratio(er16, lc16, "median_durable_s"),
        "edgerope_f16_over_llama_cpp_f16_peak_rss": ratio(er16, lc16, "peak_rss_bytes"),
        "edgerope_f16_over_llama_cpp_f16_sampled_anon_rss": ratio(er16, lc16, "sampled_peak_rss_anon_bytes"),
        "edgerope_bf16_over_copy_time": ratio(er_bf16, "copy", "median_wall_s"),
        "edgerope_bf16_over_copy_time_both_fsynced": ratio(er_bf16, "copy", "median_durable_s"),
        "edgerope_f16_over_numpy_cast_time": ratio(er16, "numpy cast", "median_wall_s"),
    }
    targets = {
        "f16 time": (
            f"<= {TARGET_F16_TIME_RATIO}x llama.cpp f16",
            ratios["edgerope_f16_over_llama_cpp_f16_time"],
            TARGET_F16_TIME_RATIO,
        ),
        "f16 time, both fsynced": (
            f"<= {TARGET_F16_TIME_RATIO}x llama.cpp f16",
            ratios["edgerope_f16_over_llama_cpp_f16_time_both_fsynced"],
            TARGET_F16_TIME_RATIO,
        ),
        "f16 peak RSS": (
            f"<= {TARGET_F16_RSS_RATIO}x llama.cpp f16",
            ratios["edgerope_f16_over_llama_cpp_f16_peak_rss"],
            TARGET_F16_RSS_RATIO,
        ),
        "bf16 time": (
            f"<= {TARGET_BF16_COPY_RATIO}x copy",
            ratios["edgerope_bf16_over_copy_time"],
            TARGET_BF16_COPY_RATIO,
        ),
        "bf16 time, both fsynced": (
            f"<= {TARGET_BF16_COPY_RATIO}x copy",
            ratios["edgerope_bf16_over_copy_time_both_fsynced"],
            TARGET_BF16_COPY_RATIO,
        ),
    }
    targets_json = {
        k: {"target": t, "ratio": v, "met": None if v is None else bool(v <= lim)} for k, (t, v, lim) in targets.items()
    }

    headers = [
        "case",
        "median s",
        "min s",
        "max s",
        "+ fsync s",
        "MB/s",
        "peak RSS MiB",
        "anon MiB",
        "file MiB",
        "x llama.cpp f16",
        "x copy",
    ]
    rows = []
    for n in names:
        res = results[n]
        rows.append(
            [
                n,
                f"{res['median_wall_s']:.2f}",
                f"{res['min_wall_s']:.2f}",
                f"{res['max_wall_s']:.2f}",
                f"{res['median_durable_s']:.2f}",
                f"{res['median_mb_per_s']:.0f}",
                C.fmt_mib(res["peak_rss_bytes"]),
                _fmt_opt_mib(res["sampled_peak_rss_anon_bytes"]),
                _fmt_opt_mib(res["sampled_peak_rss_file_bytes"]),
                _fmt_ratio(ratio(n, lc16, "median_wall_s")),
                _fmt_ratio(ratio(n, "copy", "median_wall_s")),
            ]
        )
    table = C.format_table(headers, rows)
    target_rows = [
        [k, t["target"], _fmt_ratio(t["ratio"]), {True: "met", False: "NOT met", None: "n/a"}[t["met"]]]
        for k, t in targets_json.items()
    ]
    target_table = C.format_table(["target", "wanted", "measured", "status"], target_rows)
    machine = C.machine_info()
    header = (
        f"convert a {input_bytes / 1e9:.2f} GB bf16 checkpoint ({n_elements:,} elements, {len(shards)} shards), "
        f"warm page cache, {args.runs} runs per case after a warm-up round, median\n"
        f"machine: {machine['cpu_model']}, {machine['cpus_usable']} cores, {machine['ram_gib']} GiB RAM, "
        f"Python {machine['python']}, numpy {machine['numpy']}; load avg before {load_before}, after {load_after}"
    )
    print("\n" + header + "\n")
    print(table)
    print()
    print(target_table)
    print(
        f"\nVM fresh-page probe: copy after a pause {probe['first_pass_s']:.2f} s, "
        f"immediately again {probe['second_pass_s']:.2f} s (see bench/README.md)"
    )
    if checks is not None:
        print(
            f"output check: tensor names equal: {checks['tensor_names_equal']}; f16 tensors bitwise equal to "
            f"llama.cpp: {checks['f16_tensors_bitwise_equal']}, differ: {len(checks['f16_tensors_differ'])}; "
            f"bf16 output cast to f16 equals llama.cpp f16: {checks['bf16_cast_equals_llama_cpp_f16']}, "
            f"differs: {len(checks['bf16_cast_differs'])}"
        )

    C.write_json(
        RESULT,
        {
            "benchmark": "convert",
            "date_utc": C.now_utc(),
            "machine": machine,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "conditions": "warm page cache (shards read once before the first run); one untimed warm-up round; "
            "each run a fresh child process; cases interleaved per round; after each run the bench fsyncs the "
            "output (timed separately: durable_s = wall_s + fsync_s; edgerope fsyncs inside its own run), then "
            "deletes it and calls sync(), untimed",
            "input": {
                "checkpoint": "synthetic Llama, random bf16 weights",
                "spec": SPEC,
                "input_bytes": input_bytes,
                "bf16_elements": n_elements,
                "shards": [p.name for p in shards],
            },
            "commands": {n: all_cases[n][0] for n in names},
            "runs_per_case": args.runs,
            "elapsed_s": elapsed,
            "bench_process_peak_rss_bytes": C.own_peak_rss(),
            "results": results,
            "ratios": ratios,
            "targets": targets_json,
            "warmup_runs": {n: w.to_json() for n, w in warmup.items()},
            "vm_fresh_page_probe": probe,
            "output_check": checks,
            "header": header,
            "table_markdown": table,
            "targets_markdown": target_table,
        },
    )
    print(f"\nwrote {RESULT.relative_to(C.REPO_ROOT)}", file=sys.stderr)
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    if args.clean:
        shutil.rmtree(CKPT_DIR, ignore_errors=True)
    else:
        print(f"checkpoint kept in {CKPT_DIR} for reruns (--clean deletes it)", file=sys.stderr)


def _fmt_opt_mib(n: int | None) -> str:
    return "-" if n is None else C.fmt_mib(n)


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_cast":
        _child_cast([Path(p) for p in sys.argv[2:]])
    elif len(sys.argv) > 1 and sys.argv[1] == "_build":
        make_checkpoint(CKPT_DIR)
    elif len(sys.argv) > 1 and sys.argv[1] == "_check":
        C.write_json(Path(sys.argv[2]), check_outputs(*(Path(p) for p in sys.argv[3:6])))
    else:
        main()
