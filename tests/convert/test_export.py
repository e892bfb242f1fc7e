"""HF checkpoint -> GGUF conversion, checked through real files.

References are independent of edgerope.convert.export: the Q/K permutation is the
formula of docs/llama_cpp.md §3.1 applied here, rope keys are the values of
section 9 computed here, GGUF names come from gguf's constants, files are
re-read with gguf.GGUFReader, bf16 checkpoints are written by torch, and the
final check runs llama.cpp against transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import MODEL_TENSOR as MT
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import load_file, save_file

from edgerope.cli import cli
from edgerope.convert.export import convert
from edgerope.convert.safetensors_reader import SafetensorsCheckpoint, read_header
from edgerope.errors import CheckpointError

YARN8 = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}


# --------------------------------------------------------------------------- helpers


def permute_ref(w: np.ndarray, n_head: int) -> np.ndarray:
    """docs/llama_cpp.md §3.1: HF rotate-half rows -> adjacent pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tname(t: MT, suffix: str = "weight", bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[t].format(bid=bid) + "." + suffix


def expected_names(cfg: dict) -> dict[str, str]:
    """HF name -> GGUF name for a Llama-family checkpoint."""
    out = {"model.embed_tokens.weight": tname(MT.TOKEN_EMBD), "model.norm.weight": tname(MT.OUTPUT_NORM)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = tname(MT.OUTPUT)
    per_layer = {
        "input_layernorm.weight": (MT.ATTN_NORM, "weight"),
        "self_attn.q_proj.weight": (MT.ATTN_Q, "weight"),
        "self_attn.k_proj.weight": (MT.ATTN_K, "weight"),
        "self_attn.v_proj.weight": (MT.ATTN_V, "weight"),
        "self_attn.o_proj.weight": (MT.ATTN_OUT, "weight"),
        "post_attention_layernorm.weight": (MT.FFN_NORM, "weight"),
        "mlp.gate_proj.weight": (MT.FFN_GATE, "weight"),
        "mlp.up_proj.weight": (MT.FFN_UP, "weight"),
        "mlp.down_proj.weight": (MT.FFN_DOWN, "weight"),
    }
    if cfg["model_type"] == "qwen2":
        per_layer |= {
            f"self_attn.{p}_proj.bias": (t, "bias") for p, t in (("q", MT.ATTN_Q), ("k", MT.ATTN_K), ("v", MT.ATTN_V))
        }
    for i in range(cfg["num_hidden_layers"]):
        for hf, (t, suffix) in per_layer.items():
            out[f"model.layers.{i}.{hf}"] = tname(t, suffix, i)
    return out


def read_gguf(path: Path) -> tuple[dict, dict, dict]:
    """(kv values, kv types, tensors by name) of a GGUF file."""
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    types = {k: f.types[0] for k, f in r.fields.items()}
    return kv, types, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """Tensor values in numpy (rows, cols) order; bf16 as its uint16 bits."""
    if t.tensor_type == QT.BF16:
        return np.asarray(t.data).view(np.uint16).reshape(tuple(reversed([int(x) for x in t.shape])))
    return np.asarray(t.data)


def bf16_bits_ref(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def folder_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def edit_config(hf: Path, **changes) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(changes)
    (hf / "config.json").write_text(json.dumps(cfg))


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["convert", *args])
    return result.exit_code, result.output


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("mistral", False), ("qwen2", False), ("llama", True)])
def test_f32_round_trip_permutes_only_llama_qk(make_tiny, model_type, tied):
    hf = make_tiny(model_type=model_type, tie_word_embeddings=tied, rope_parameters=YARN8, max_position_embeddings=2048)
    cfg = json.loads((hf / "config.json").read_text())
    report = convert(hf, hf / "out.gguf", outtype="f32")
    kv, types, tensors = read_gguf(report.path)
    arch = "qwen2" if model_type == "qwen2" else "llama"
    assert kv["general.architecture"] == arch == report.arch
    names = expected_names(cfg)
    assert set(tensors) == set(names.values())
    src = load_file(hf / "model.safetensors")
    for hf_name, gguf_name in names.items():
        want = src[hf_name]
        if arch == "llama" and ".q_proj." in hf_name:
            want = permute_ref(want, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in hf_name:
            want = permute_ref(want, cfg["num_key_value_heads"])
        t = tensors[gguf_name]
        assert t.tensor_type == QT.F32
        np.testing.assert_array_equal(values(t), want, err_msg=gguf_name)
    if arch == "llama":  # the permutation really moved rows (K has one head here: rows 1 and 32 swap places)
        k = src["model.layers.0.self_attn.k_proj.weight"]
        np.testing.assert_array_equal(values(tensors["blk.0.attn_k.weight"])[1], k[32])
    assert kv[f"{arch}.block_count"] == cfg["num_hidden_layers"]
    assert kv[f"{arch}.embedding_length"] == cfg["hidden_size"]
    assert kv[f"{arch}.feed_forward_length"] == cfg["intermediate_size"]
    assert kv[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
    assert kv[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert kv[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert types[f"{arch}.context_length"] == gguf.GGUFValueType.UINT32
    assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert kv["general.name"] and kv["general.size_label"]
    assert report.n_tensors == len(names) and report.bytes == report.path.stat().st_size


def test_outtypes_f16_bf16_q8_0(make_tiny):
    hf = make_tiny(
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        max_position_embeddings=2048,
    )
    src = load_file(hf / "model.safetensors")
    q = permute_ref(src["model.layers.0.self_attn.q_proj.weight"], 2)
    norm = src["model.layers.0.input_layernorm.weight"]
    for outtype, qtype, ftype in (
        ("f16", QT.F16, gguf.LlamaFileType.MOSTLY_F16),
        ("bf16", QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        ("q8_0", QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    ):
        kv, _, tensors = read_gguf(convert(hf, hf / f"{outtype}.gguf", outtype=outtype).path)
        assert kv["general.file_type"] == ftype
        for name, t in tensors.items():
            want = QT.F32 if len(t.shape) == 1 else qtype  # norms and the rope factors stay F32
            assert t.tensor_type == want, name
        np.testing.assert_array_equal(values(tensors["blk.0.attn_norm.weight"]), norm)
        got = tensors["blk.0.attn_q.weight"]
        if qtype == QT.F16:
            np.testing.assert_array_equal(values(got), q.astype(np.float16))
        elif qtype == QT.BF16:
            np.testing.assert_array_equal(values(got), bf16_bits_ref(q))
        else:  # q8_0: an f16 scale per 32 values: error <= half a step + 127 x the scale's f16 rounding
            deq = gguf.dequantize(np.asarray(got.data), QT.Q8_0).reshape(q.shape)
            step = np.abs(q).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(deq - q).reshape(-1, 32) <= step * (0.5 + 127 * 2.0**-11))
        assert tensors["rope_freqs.weight"].tensor_type == QT.F32


def test_bf16_checkpoint_written_by_torch(make_tiny):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load
    from safetensors.torch import save_file as torch_save

    hf = make_tiny(model_type="mistral")
    sd = {k: v.to(torch.bfloat16) for k, v in torch_load(hf / "model.safetensors").items()}
    torch_save(sd, hf / "model.safetensors", metadata={"format": "pt"})
    k_bits = sd["model.layers.1.self_attn.k_proj.weight"].view(torch.int16).numpy().view(np.uint16)
    k_f32 = sd["model.layers.1.self_attn.k_proj.weight"].float().numpy()
    norm = sd["model.norm.weight"].float().numpy()
    out = {}
    for outtype in ("bf16", "f16", "f32"):
        _, _, out[outtype] = read_gguf(convert(hf, hf / f"{outtype}.gguf", outtype=outtype).path)
    np.testing.assert_array_equal(values(out["bf16"]["blk.1.attn_k.weight"]), permute_ref(k_bits, 1))
    np.testing.assert_array_equal(values(out["f16"]["blk.1.attn_k.weight"]), permute_ref(k_f32, 1).astype(np.float16))
    np.testing.assert_array_equal(values(out["f32"]["blk.1.attn_k.weight"]), permute_ref(k_f32, 1))
    for tensors in out.values():  # 1-D tensors are widened to F32 exactly
        np.testing.assert_array_equal(values(tensors["output_norm.weight"]), norm)


def test_f16_output_refuses_weights_beyond_the_f16_range(make_tiny, tmp_path):
    """A bf16/f32 weight above 65504 would become inf in f16 (llama.cpp's converter writes it anyway): refused,
    with no output; bf16 and f32 outputs keep the value."""
    hf = make_tiny()
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = 1.0e5
    save_file(tensors, hf / "model.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(CheckpointError, match="float16 range") as err:
        convert(hf, out_dir / "m.f16.gguf", outtype="f16")
    assert "bf16 or f32" in err.value.fix and not list(out_dir.iterdir())
    _, _, out = read_gguf(convert(hf, out_dir / "m.f32.gguf", outtype="f32").path)
    assert np.nanmax(values(out["blk.0.ffn_down.weight"])) == np.float32(1.0e5)


def test_sharded_checkpoint_equals_single_file(make_tiny):
    hf = make_tiny(model_type="qwen2")
    single = convert(hf, hf.parent / "single.gguf", outtype="f16").path
    tensors = load_file(hf / "model.safetensors")
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, hf / fname, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    (hf / "model.safetensors").unlink()
    sharded = convert(hf, hf.parent / "sharded.gguf", outtype="f16").path
    _, _, a = read_gguf(single)
    _, _, b = read_gguf(sharded)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(values(a[name]), values(b[name]), err_msg=name)


# --------------------------------------------------------------------------- rope keys (docs/llama_cpp.md §9)


def g(f: float, m: float = 1.0) -> float:
    return 0.1 * m * math.log(f) + 1.0


def llama3_ff_ref(theta: float, d: int, factor: float, lo: float, hi: float, orig: int) -> np.ndarray:
    out = []
    for i in range(d // 2):
        wavelen = 2 * math.pi * theta ** (2 * i / d)
        if wavelen < orig / hi:
            out.append(1.0)
        elif wavelen > orig / lo:
            out.append(factor)
        else:
            s = (orig / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, dtype=np.float32)


SHORT = [1.0 + 0.01 * i for i in range(32)]
LONG = [2.0 + 0.1 * i for i in range(32)]
ROPE_CASES = {
    # name: (rope_parameters, max_position_embeddings, expected keys (suffix after "llama."), expected tensors)
    "default": (
        {"rope_type": "default", "rope_theta": 500000.0},
        256,
        {"context_length": 256, "rope.freq_base": 500000.0},
        {},
    ),
    "linear": (
        {"rope_type": "linear", "factor": 4.0},
        1024,
        {"context_length": 1024, "rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
        {},
    ),
    "yarn": (
        YARN8,
        2048,
        {
            "context_length": 2048,
            "rope.scaling.type": "yarn",
            "rope.scaling.factor": 8.0,
            "rope.scaling.original_context_length": 256,
        },
        {},
    ),
    "yarn-attention-factor": (
        {**YARN8, "attention_factor": 1.0},
        2048,
        {"rope.scaling.type": "yarn", "rope.scaling.attn_factor": 1.0 / g(8.0)},
        {},
    ),
    "yarn-mscale": (
        {**YARN8, "mscale": 1.0, "mscale_all_dim": 0.5},
        2048,
        {"rope.scaling.attn_factor": g(8.0, 1.0) / g(8.0, 0.5) / g(8.0)},
        {},
    ),
    "yarn-qwen2.5-layout": (
        {**YARN8, "factor": 4.0},
        256,
        {"context_length": 1024, "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 256},
        {},
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        2048,
        {"context_length": 2048},
        {"rope_freqs.weight": llama3_ff_ref(10000.0, 64, 8.0, 1.0, 4.0, 256)},
    ),
    "longrope": (
        {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 256},
        2048,
        {
            "rope.scaling.type": "longrope",
            "rope.scaling.original_context_length": 256,
            "rope.scaling.attn_factor": math.sqrt(1 + math.log(8) / math.log(256)),
        },
        {"rope_factors_long.weight": np.float32(LONG), "rope_factors_short.weight": np.float32(SHORT)},
    ),
}
ABSENT = {
    "default": ["rope.scaling.type", "rope.scaling.factor"],
    "yarn": ["rope.scaling.attn_factor", "rope.scaling.yarn_attn_factor"],
    "llama3": ["rope.scaling.type", "rope.scaling.factor"],
    "longrope": ["rope.scaling.factor"],
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_keys_and_tensors_per_variant(make_tiny, case):
    rope_parameters, max_pos, keys, rope_tensors = ROPE_CASES[case]
    hf = make_tiny(rope_parameters=rope_parameters, max_position_embeddings=max_pos)
    kv, types, tensors = read_gguf(convert(hf, hf / "out.gguf", outtype="q8_0").path)
    assert kv["llama.rope.dimension_count"] == 64
    for suffix, want in keys.items():
        key = f"llama.{suffix}"
        assert key in kv, key
        if isinstance(want, float):
            assert types[key] == gguf.GGUFValueType.FLOAT32
            assert kv[key] == pytest.approx(want, rel=1e-6), key
        else:
            assert kv[key] == want, key
    for suffix in ABSENT.get(case, []):
        assert f"llama.{suffix}" not in kv
    assert {n for n in tensors if n.startswith("rope_")} == set(rope_tensors)
    for name, want in rope_tensors.items():
        assert tensors[name].tensor_type == QT.F32
        np.testing.assert_allclose(values(tensors[name]), want, rtol=1e-6)


def test_verification_catches_a_file_that_differs_from_the_plan(make_tiny):
    """verify_gguf passes the written file against its own plan and names each kind of difference."""
    from dataclasses import replace

    from edgerope.convert.export import extended_context, plan_tensors, verify_gguf
    from edgerope.convert.stream import TensorJob
    from edgerope.errors import OutputError
    from edgerope.models.config import ModelConfig
    from edgerope.rope import gguf_plan

    rope_parameters, max_pos, _, _ = ROPE_CASES["llama3"]
    hf = make_tiny(rope_parameters=rope_parameters, max_position_embeddings=max_pos)
    out = convert(hf, hf / "out.gguf", outtype="f32").path
    cfg = ModelConfig.load(hf)
    plan = gguf_plan.plan_gguf_rope(
        cfg.rope, arch="llama", head_dim=cfg.head_dim, context_length=extended_context(cfg, cfg.rope)
    )
    with SafetensorsCheckpoint(hf) as ckpt:
        jobs = plan_tensors(cfg, ckpt, arch="llama", outtype="f32", notes=[])
    jobs = [TensorJob(n, a.shape, QT.F32, array=a) for n, a in plan.tensors.items()] + jobs
    verify_gguf(out, jobs, plan)  # the file as written matches its plan

    ctx_key = "llama.context_length"
    swapped = [replace(j, shape=tuple(reversed(j.shape))) if j.name.startswith("token_embd") else j for j in jobs]
    cases = {
        "tensors differ from the plan": (swapped, plan),
        "rope tensor rope_freqs.weight differs": (
            jobs,
            replace(plan, tensors={n: a * 2 for n, a in plan.tensors.items()}),
        ),
        f"rope key {ctx_key}: stored": (jobs, replace(plan, kv={**plan.kv, ctx_key: (4096, plan.kv[ctx_key][1])})),
        f"rope key {ctx_key} must not be present": (jobs, replace(plan, remove={ctx_key})),
    }
    for words, (j, p) in cases.items():
        with pytest.raises(OutputError, match="failed verification") as info:
            verify_gguf(out, j, p)
        assert words in info.value.what, info.value.what
    out.write_bytes(out.read_bytes()[:-4096])
    with pytest.raises(OutputError, match="cannot be read back"):
        verify_gguf(out, jobs, plan)


def test_dynamic_ntk_baked_at_a_length(make_tiny):
    hf = make_tiny(rope_parameters={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=256)
    code, out = run_cli(str(hf), "-o", str(hf / "a.gguf"))
    assert code == 2 and "dynamic" in out
    report = convert(hf, hf / "b.gguf", bake_dynamic=1024)
    kv, _, _ = read_gguf(report.path)
    want = 10000.0 * (4.0 * 1024 / 256 - 3.0) ** (64 / 62)
    assert kv["llama.rope.freq_base"] == pytest.approx(want, rel=1e-6)
    assert kv["llama.context_length"] == 1024 and "llama.rope.scaling.type" not in kv
    assert any("1024" in n for n in report.rope_notes)


@pytest.mark.llama
def test_llama_cpp_logits_match_transformers_past_the_original_context(make_tiny):
    """End to end: the permuted (llama) and unpermuted (qwen2) files compute HF's function at 8x context."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    llama_cpp = pytest.importorskip("llama_cpp")
    tokens = [1] + np.random.default_rng(0).integers(3, 1000, size=399).tolist()
    for model_type in ("llama", "qwen2"):
        hf = make_tiny(model_type=model_type, rope_parameters=YARN8, max_position_embeddings=2048, weight_std=0.06)
        path = convert(hf, hf / "m.gguf", outtype="f32").path
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        llm = llama_cpp.Llama(
            str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, type_k=0, type_v=0, verbose=False
        )
        llm.eval(tokens)
        got = np.asarray(llm.scores[: len(tokens)])
        err = np.abs(got - ref)
        assert err[257:].max() < 1e-3, f"{model_type}: max |dlogit| {err.max():.2e} (beyond 256: {err[257:].max():.2e})"
        llm.close()


# --------------------------------------------------------------------------- streaming


def test_peak_memory_is_bounded_by_a_tensor_not_the_model(make_tiny):
    hf = make_tiny(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2
    )
    with SafetensorsCheckpoint(hf) as ckpt:
        model_bytes = ckpt.total_bytes
        largest = max(e.nbytes for e in ckpt.entries.values())
    tracemalloc.start()
    try:
        convert(hf, hf / "out.gguf", outtype="f16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model_bytes > 30e6
    assert peak < 6 * largest + 8e6 < model_bytes / 2, (
        f"peak {peak / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB"
    )


# --------------------------------------------------------------------------- safetensors validation


def test_safetensors_header_validation(tmp_path):
    good = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((4, 4), np.float32), "b": np.ones(3, np.float32)}, good)
    entries, _ = read_header(good)
    assert entries["a"].shape == (4, 4) and entries["b"].nbytes == 12
    blob = good.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])

    def write(h: dict) -> Path:
        text = json.dumps(h).encode()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(len(text).to_bytes(8, "little") + text + blob[8 + n :])
        return bad

    cases = {
        "overlap": {**header, "b": {**header["b"], "data_offsets": [0, 12]}},
        "needs": {**header, "b": {**header["b"], "shape": [4]}},
        "unknown dtype": {**header, "b": {**header["b"], "dtype": "F8_E9"}},
        "beyond": {**header, "b": {**header["b"], "data_offsets": [64, 76 + 1000], "shape": [253]}},
    }
    for message, h in cases.items():
        with pytest.raises(CheckpointError, match=message):
            read_header(write(h))


# --------------------------------------------------------------------------- bad input through the CLI


def _drop_tensor(hf: Path) -> None:
    t = load_file(hf / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, hf / "model.safetensors")


def _extra_tensors(hf: Path) -> None:
    t = load_file(hf / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(128, np.float32)
    t["model.vision_tower.proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(t, hf / "model.safetensors")


def _truncate(hf: Path) -> None:
    p = hf / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])


def _corrupt_header(hf: Path) -> None:
    p = hf / "model.safetensors"
    blob = bytearray(p.read_bytes())
    blob[8:40] = b"#" * 32
    p.write_bytes(bytes(blob))


def _spm_without_byte_fallback(hf: Path) -> None:
    from pydoc_data.topics import topics

    import sentencepiece as spm

    sp_dir = hf.parent / "nobytes"
    sp_dir.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(topics[k] for k in sorted(topics)),
        model_prefix=str(sp_dir / "tokenizer"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=False,
        minloglevel=2,
        max_sentence_length=100_000,
    )
    (hf / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())


BAD_INPUTS = {
    # name: (make_tiny kwargs, edit(hf), words expected in the message)
    "missing tensor": ({}, _drop_tensor, ["missing tensors", "up_proj"]),
    "extra tensors": ({}, _extra_tensors, ["unknown tensors", "vision_tower", "unexpected", "o_proj.bias"]),
    "shape mismatch": ({}, lambda hf: edit_config(hf, intermediate_size=512), ["shape", "gate_proj"]),
    "unknown architecture": (
        {},
        lambda hf: edit_config(hf, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
        ["unsupported architecture"],
    ),
    "malformed rope": (
        {},
        lambda hf: edit_config(hf, rope_parameters={"rope_type": "linear", "factor": "big"}),
        ["factor", "number"],
    ),
    "unknown rope type": (
        {},
        lambda hf: edit_config(hf, rope_parameters={"rope_type": "su-per"}),
        ["unknown rope type"],
    ),
    "dynamic ntk": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, None, ["dynamic", "--bake-dynamic"]),
    "yarn factor 1": ({"rope_parameters": {**YARN8, "factor": 1.0}}, None, ["factor must be > 1"]),
    "yarn factor 0.5": ({"rope_parameters": {**YARN8, "factor": 0.5}}, None, ["factor must be > 1"]),
    "embedding smaller than vocab": ({"vocab_size": 900}, None, ["1000 tokens", "900 rows"]),
    "spm without byte fallback": ({}, _spm_without_byte_fallback, ["byte", "byte_fallback=True"]),
    "truncated safetensors": ({}, _truncate, ["truncated"]),
    "corrupt header": ({}, _corrupt_header, ["corrupt", "model.safetensors"]),
    "sliding window": ({"model_type": "mistral", "sliding_window": 64}, None, ["sliding_window 64"]),
    "llama3 on qwen2": (
        {
            "model_type": "qwen2",
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        },
        None,
        ["qwen2", "factor tensors"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_message_and_no_output(make_tiny, tmp_path, case):
    kwargs, edit, words = BAD_INPUTS[case]
    hf = make_tiny(**kwargs)
    if edit is not None:
        edit(hf)
    before = folder_digest(hf)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, output = run_cli(str(hf), "-o", str(out_dir / "m.gguf"))
    assert code == 2, output
    assert "Traceback" not in output and output.startswith("error: ")
    for word in words:
        assert word in output, f"{word!r} not in:\n{output}"
    assert list(out_dir.iterdir()) == []
    assert folder_digest(hf) == before


def test_existing_output_needs_force(make_tiny):
    hf = make_tiny()
    out = hf.parent / "m.gguf"
    out.write_bytes(b"keep me")
    code, output = run_cli(str(hf), "-o", str(out))
    assert code == 2 and "--force" in output and out.read_bytes() == b"keep me"
    code, output = run_cli(str(hf), "-o", str(out), "--force", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["path"] == str(out) and report["arch"] == "llama" and report["outtype"] == "f16"
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.endswith(".partial")) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder(make_tiny, tmp_path):
    hf = make_tiny()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, output = run_cli(str(hf), "-o", str(locked / "m.gguf"))
    finally:
        locked.chmod(0o700)
    assert code == 2 and "not writable" in output and list(locked.iterdir()) == []


def test_write_failure_midway_leaves_nothing(make_tiny, tmp_path):
    """A write that fails part-way (here: a file-size limit, as on a full disk) -> exit 2, no partial file."""
    hf = make_tiny()
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edgerope.cli import main; main()",
            "convert",
            str(hf),
            "-o",
            str(out_dir / "m.gguf"),
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "file-size limit" in proc.stderr
    assert list(out_dir.iterdir()) == []


def test_fast_array_writer_writes_the_same_bytes_as_gguf(tmp_path):
    from edgerope.gguf.writer import FastArrayWriter

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_token_list([f"tok{i}é" for i in range(3000)] + ["<0x0A>"])
        w.add_token_scores([float(-i) / 7 for i in range(3001)])
        w.add_token_types([gguf.TokenType.NORMAL] * 3000 + [gguf.TokenType.BYTE])
        w.add_token_merges(["a b", "Ġ t"])
        w.add_array("test.ints", [1, -2, 3])
        w.add_array("test.bools", [True, False])
        w.add_array("test.nested", [[1, 2], [3]])
        w.add_key_value("test.u64", [2**40, 5], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)

    blobs = []
    for cls in (gguf.GGUFWriter, FastArrayWriter):
        w = cls(tmp_path / f"{cls.__name__}.gguf", "llama")
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        blobs.append((tmp_path / f"{cls.__name__}.gguf").read_bytes())
    assert blobs[0] == blobs[1]
    w = FastArrayWriter(tmp_path / "bad.gguf", "llama")
    w.add_array("test.mixed", [1, "x"])
    with pytest.raises(ValueError, match="same type"):
        w.write_header_to_file()
        w.write_kv_data_to_file()
    w.close()


def test_bf16_to_f16_table_equals_torch_for_every_bit_pattern():
    torch = pytest.importorskip("torch")
    from edgerope.convert.stream import bf16_to_f16_table

    bits = np.arange(1 << 16, dtype=np.uint16)
    ref = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float16).numpy()
    got = bf16_to_f16_table()
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), ref[~nan].view(np.uint16))


def test_runtime_only_rope_needs_the_flag(make_tiny, tmp_path):
    hf = make_tiny(rope_parameters={**YARN8, "beta_fast": 8.0, "beta_slow": 2.0}, max_position_embeddings=2048)
    code, output = run_cli(str(hf), "-o", str(tmp_path / "a.gguf"))
    assert code == 2 and "--allow-runtime-rope" in output and not (tmp_path / "a.gguf").exists()
    report = convert(hf, tmp_path / "b.gguf", allow_runtime_rope=True)
    assert report.runtime == {"yarn_beta_fast": 8.0, "yarn_beta_slow": 2.0}
    code, output = run_cli(str(hf), "-o", str(tmp_path / "c.gguf"), "--allow-runtime-rope")
    assert code == 0 and "yarn_beta_fast=8" in output


def test_bake_dynamic_refused_for_other_rope_types(make_tiny, tmp_path):
    hf = make_tiny(rope_parameters=YARN8, max_position_embeddings=2048)
    code, output = run_cli(str(hf), "-o", str(tmp_path / "a.gguf"), "--bake-dynamic", "1024")
    assert code == 2 and "dynamic NTK" in output and list(tmp_path.iterdir()) == [hf]
