"""inspect: what llama.cpp computes from synthetic GGUFs of several architectures, KV bytes, and every lint finding.

Expected rope numbers come from docs/llama_cpp.md §3.2's worked YaRN example, section 2's magnitude)
and the KV formula of section 7, written out here independently of edgerope.gguf.kv.
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType as VT
from gguf import Keys
from helpers.any_gguf import spm_vocab, write_gguf

from edgerope.cli import cli
from edgerope.errors import GGUFError
from edgerope.gguf.inspect import inspect_gguf
from edgerope.gguf.lint import LINTS

U32, F32, STR = VT.UINT32, VT.FLOAT32, VT.STRING
T, FACTOR, ORIG = Keys.Rope.SCALING_TYPE, Keys.Rope.SCALING_FACTOR, Keys.Rope.SCALING_ORIG_CTX_LEN


def yarn_kv(factor: float = 8.0, orig: int = 256) -> dict:
    return {T: ("yarn", STR), FACTOR: (factor, F32), ORIG: (orig, U32)}


def codes(report) -> set[str]:
    return {f.code for f in report.findings}


# --------------------------------------------------------------------------- the rope function


def test_llama_yarn_matches_the_worked_example(tmp_path):
    # docs/llama_cpp.md §3.2: d=64, b=1e4, L0=256, betas 32/1 -> low 0, high 13
    p = write_gguf(tmp_path / "y.gguf", ctx=2048, n_embd=128, n_head=2, kv=yarn_kv(8.0, 256))
    r = inspect_gguf(p)
    d, b, L0 = 64, 1e4, 256
    low = math.floor(d * math.log(L0 / (2 * math.pi * 32)) / (2 * math.log(b)))
    high = math.ceil(d * math.log(L0 / (2 * math.pi * 1)) / (2 * math.log(b)))
    assert (low, high) == (0, 13)
    rope = r.rope
    assert rope.rotation == "NORM" and rope.n_rot == 64 and rope.scaling_type == "yarn"
    assert (
        rope.pairs["extrapolated"] == "0" and rope.pairs["blended"] == "1-12" and rope.pairs["interpolated"] == "13-31"
    )
    assert rope.factor == pytest.approx(8.0) and rope.ext_factor == 1.0 and rope.n_ctx_orig == 256
    assert rope.magnitude == pytest.approx(1 + 0.1 * math.log(8))  # section 2: m = 1 + 0.1 ln F
    assert (rope.beta_fast, rope.beta_slow) == (32.0, 1.0)
    assert rope.wavelength_min == pytest.approx(2 * math.pi)  # pair 0 keeps theta_0 = p
    # slowest pair: base^(-62/64) interpolated by 1/8
    assert rope.wavelength_max == pytest.approx(2 * math.pi * 8 * b ** (62 / 64))
    assert "YaRN x8 from 256" in rope.summary
    assert (r.context_trained, r.context_original, r.context_effective) == (2048, 256, 2048)
    assert codes(r) == {"kv_shift_magnitude"}


def test_qwen2_plain_is_neox_and_clean(tmp_path):
    p = write_gguf(tmp_path / "q.gguf", "qwen2", ctx=32768, vocab="gpt2", n_vocab=200)
    r = inspect_gguf(p)
    assert r.architecture == "qwen2" and r.rope.rotation == "NEOX"
    assert r.rope.summary.startswith("plain RoPE") and r.rope.magnitude == 1.0 and r.rope.ext_factor == 0.0
    assert r.rope.scaling_type == "linear" and not r.rope.scaling_type_key_present
    assert r.findings == []
    ref = gguf.GGUFReader(p)
    assert r.n_parameters == sum(int(t.n_elements) for t in ref.tensors) and r.n_tensors == len(ref.tensors)
    assert sum(v["bytes"] for v in r.tensor_types.values()) == sum(int(t.n_bytes) for t in ref.tensors)
    assert r.tensor_types["Q8_0"]["count"] == 2 and r.tensor_types["F16"]["count"] == 2


def test_llama3_rope_freqs(tmp_path):
    ff = np.array([1.0] * 10 + [3.0] * 4 + [8.0] * 18, np.float32)  # 32 pairs for head_dim 64
    p = write_gguf(tmp_path / "l3.gguf", ctx=131072, n_embd=128, n_head=2, tensors={"rope_freqs.weight": ff})
    r = inspect_gguf(p)
    assert r.rope.freq_factors == {"tensor": "rope_freqs.weight", "min": 1.0, "max": 8.0, "pairs_not_1": 22}
    assert r.rope.pairs["unchanged"] == "0-9" and r.rope.pairs["scaled"] == "10-31"
    assert r.rope.pairs["angle_scale_min"] == pytest.approx(1 / 8)
    assert "rope_freqs.weight" in r.rope.summary and r.rope.magnitude == 1.0
    assert r.findings == []


def test_longrope_uses_the_allocated_context(tmp_path):
    attn = math.sqrt(1 + math.log(4) / math.log(2048))
    kv = {T: ("longrope", STR), ORIG: (2048, U32), Keys.Rope.SCALING_ATTN_FACTOR: (attn, F32)}
    tensors = {
        "rope_factors_long.weight": np.full(32, 4.0, np.float32),
        "rope_factors_short.weight": np.full(32, 1.5, np.float32),
    }
    p = write_gguf(tmp_path / "lr.gguf", ctx=8192, kv=kv, tensors=tensors)
    long = inspect_gguf(p)  # n_ctx = trained 8192 > 2048
    short = inspect_gguf(p, n_ctx=2048)
    assert long.rope.freq_factors["tensor"] == "rope_factors_long.weight"
    assert short.rope.freq_factors["tensor"] == "rope_factors_short.weight"
    assert long.rope.magnitude == pytest.approx(attn, rel=1e-6)
    switch = {f.code: f for f in long.findings}["longrope_switch"]
    assert "uses the long factors" in switch.message and switch.severity == "info"
    assert "uses the short factors" in {f.code: f for f in short.findings}["longrope_switch"].message
    assert codes(long) == {"longrope_switch", "kv_shift_magnitude"}


def test_grok_reads_the_yarn_keys_llama_ignores(tmp_path):
    kv = {
        **yarn_kv(4.0, 4096),
        Keys.Rope.SCALING_YARN_BETA_FAST: (16.0, F32),
        Keys.Rope.SCALING_YARN_BETA_SLOW: (2.0, F32),
        Keys.Rope.SCALING_YARN_EXT_FACTOR: (0.5, F32),
    }
    grok = inspect_gguf(write_gguf(tmp_path / "grok.gguf", "grok", ctx=16384, kv=kv))
    assert (grok.rope.beta_fast, grok.rope.beta_slow, grok.rope.ext_factor) == (16.0, 2.0, 0.5)
    assert "ignored_yarn_key" not in codes(grok)
    assert "llama_cpp_python_betas" in codes(grok)
    llama = inspect_gguf(write_gguf(tmp_path / "llama.gguf", "llama", ctx=16384, kv=kv))
    assert (llama.rope.beta_fast, llama.rope.beta_slow, llama.rope.ext_factor) == (32.0, 1.0, 1.0)
    ignored = [f for f in llama.findings if f.code == "ignored_yarn_key"]
    assert len(ignored) == 3 and all(f.severity == "warning" for f in ignored)
    assert any("yarn_beta_fast=16" in f.fix for f in ignored)


def test_ignored_key_with_the_value_llama_cpp_uses_anyway_is_info(tmp_path):
    kv = {**yarn_kv(4.0, 4096), Keys.Rope.SCALING_YARN_BETA_FAST: (32.0, F32)}
    r = inspect_gguf(write_gguf(tmp_path / "y.gguf", ctx=16384, kv=kv))
    (f,) = [f for f in r.findings if f.code == "ignored_yarn_key"]
    assert f.severity == "info" and f.fix is None


def test_metadata_only_shapes_of_other_arches(tmp_path):
    gemma = {
        Keys.Attention.KEY_LENGTH: (256, U32),
        Keys.Attention.VALUE_LENGTH: (256, U32),
        Keys.Attention.SLIDING_WINDOW: (512, U32),
    }
    g = inspect_gguf(
        write_gguf(tmp_path / "g.gguf", "gemma3", n_embd=640, n_head=4, n_head_kv=[2, 1], kv=gemma, weights=False)
    )
    assert g.rope.rotation == "NEOX" and g.rope.n_rot == 256 and g.kv.n_head_kv == [2, 1]
    assert any("sliding-window" in n for n in g.kv.notes)
    assert g.findings == []

    phi = {ORIG: (4096, U32)}  # phi3 always loads long/short, without a scaling type
    tensors = {"rope_factors_long.weight": np.full(16, 2.0, np.float32)}
    tensors["rope_factors_short.weight"] = np.ones(16, np.float32)
    ph = inspect_gguf(
        write_gguf(tmp_path / "p.gguf", "phi3", ctx=131072, n_embd=96, n_head=3, kv=phi, tensors=tensors, weights=False)
    )
    assert ph.rope.freq_factors["tensor"] == "rope_factors_long.weight" and "longrope_switch" in codes(ph)

    m3 = {
        **yarn_kv(4.0, 4096),
        Keys.Rope.SCALING_YARN_BETA_FAST: (8.0, F32),
        Keys.Rope.SCALING_YARN_LOG_MUL: (1.0, F32),
    }
    mi = inspect_gguf(write_gguf(tmp_path / "m.gguf", "mistral3", ctx=16384, kv=m3, weights=False))
    assert mi.rope.beta_fast == 8.0 and "ignored_yarn_key" not in codes(mi)
    assert mi.rope.magnitude == pytest.approx(1.0)  # g(F,1)/g(F,log_mul=1) = 1


# --------------------------------------------------------------------------- KV cache


BPE = {  # bytes per element, docs/llama_cpp.md §7
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}


def expected_kv(n_ctx: int, kv_heads: list[int], hd_k: int, hd_v: int, t: str) -> float:
    padded = -(-n_ctx // 256) * 256
    return sum(padded * h * (hd_k + hd_v) * BPE[t] for h in kv_heads)


@pytest.mark.parametrize(("n_head_kv", "layers"), [(2, [2, 2, 2]), ([4, 0, 1], [4, 0, 1])])
def test_kv_bytes_formula(tmp_path, n_head_kv, layers):
    p = write_gguf(tmp_path / "k.gguf", ctx=4000, n_layers=3, n_embd=256, n_head=4, n_head_kv=n_head_kv, weights=False)
    r = inspect_gguf(p, n_ctx=1000)
    assert sorted(r.kv.bytes_at_context) == [1000, 4000]
    assert set(r.kv.bytes_per_token) == set(BPE)
    for t in BPE:
        assert r.kv.bytes_per_token[t] == pytest.approx(expected_kv(1, layers, 64, 64, t) / 256)
        assert r.kv.bytes_at_context[1000][t] == round(expected_kv(1000, layers, 64, 64, t))
        assert r.kv.bytes_at_context[4000][t] == round(expected_kv(4000, layers, 64, 64, t))
    assert r.context_effective == 1024


def test_kv_bytes_with_distinct_k_and_v_head_dims(tmp_path):
    kv = {Keys.Attention.KEY_LENGTH: (192, U32), Keys.Attention.VALUE_LENGTH: (128, U32)}
    r = inspect_gguf(write_gguf(tmp_path / "k.gguf", "qwen2", n_embd=256, n_head=2, n_head_kv=1, kv=kv, weights=False))
    assert r.kv.bytes_at_context[4096]["q8_0"] == round(expected_kv(4096, [1, 1], 192, 128, "q8_0"))


# --------------------------------------------------------------------------- lint: one crafted file per finding

ROPE_FREQS = "rope_freqs.weight"
BAD_SPM = [t if t != "<0x41>" else "x41" for t in spm_vocab(300)]
LONG = {"rope_factors_long.weight": np.full(32, 2.0, np.float32), "rope_factors_short.weight": np.ones(32, np.float32)}
CASES: dict[str, tuple[dict, int | None]] = {
    "wrong_key_type": ({"kv": {Keys.LLM.CONTEXT_LENGTH: (4096, VT.INT32)}}, None),
    "no_tokenizer": ({"vocab": None}, None),
    "unknown_tokenizer": ({"kv": {Keys.Tokenizer.MODEL: ("sentencepiece", STR)}}, None),
    "spm_missing_byte_tokens": ({"kv": {Keys.Tokenizer.LIST: (BAD_SPM, STR)}}, None),
    "bpe_no_merges": ({"vocab": "gpt2", "drop": (Keys.Tokenizer.MERGES,)}, None),
    "bpe_pre_missing": ({"vocab": "gpt2", "drop": (Keys.Tokenizer.PRE,)}, None),
    "bpe_pre_unknown": ({"vocab": "gpt2", "kv": {Keys.Tokenizer.PRE: ("my-own-pre", STR)}}, None),
    "vocab_size_mismatch": ({"tensors": {"token_embd.weight": np.zeros((320, 128), np.float32)}}, None),
    "yarn_no_original_context": ({"ctx": 16384, "kv": {T: ("yarn", STR), FACTOR: (4.0, F32)}}, None),
    "scaling_type_none": ({"kv": {T: ("none", STR)}}, None),
    "context_inconsistent": ({"kv": yarn_kv(4.0, 4096)}, None),
    "factor_with_freq_factors": ({"kv": {FACTOR: (8.0, F32)}, "tensors": {ROPE_FREQS: np.ones(32, np.float32)}}, None),
    "longrope_no_factors": ({"ctx": 8192, "kv": {T: ("longrope", STR), ORIG: (2048, U32)}}, None),
    "freq_factors_not_f32": ({"tensors": {ROPE_FREQS: np.ones(32, np.float16)}}, None),
    "freq_factors_length": ({"tensors": {ROPE_FREQS: np.ones(16, np.float32)}}, None),
    "n_rot_not_head_dim": ({"kv": {Keys.Rope.DIMENSION_COUNT: (32, U32)}}, None),
    "ignored_yarn_key": (
        {"ctx": 32768, "kv": {**yarn_kv(4.0, 8192), Keys.Rope.SCALING_YARN_BETA_FAST: (8.0, F32)}},
        None,
    ),
    "llama_cpp_python_betas": (
        {"arch": "grok", "ctx": 32768, "kv": {**yarn_kv(4.0, 8192), Keys.Rope.SCALING_YARN_BETA_FAST: (8.0, F32)}},
        None,
    ),
    "kv_shift_magnitude": ({"ctx": 32768, "kv": yarn_kv(4.0, 8192)}, None),
    "longrope_switch": ({"ctx": 8192, "kv": {T: ("longrope", STR), ORIG: (2048, U32)}, "tensors": LONG}, None),
    "ctx_beyond_trained": ({}, 8192),
    "rope_unreadable": ({"kv": {T: ("dynamic", STR)}}, None),
    "not_a_model": ({"drop": (Keys.LLM.BLOCK_COUNT,)}, None),
    "bad_value": ({"kv": {Keys.Attention.LAYERNORM_RMS_EPS: (float("nan"), F32)}}, None),
}


def test_clean_file_has_no_findings(tmp_path):
    assert inspect_gguf(write_gguf(tmp_path / "clean.gguf")).findings == []


def test_every_lint_in_the_catalogue_has_a_crafted_case():
    assert set(LINTS) <= set(CASES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_each_finding_is_triggered_by_its_crafted_file(tmp_path, code):
    kwargs, n_ctx = CASES[code]
    kwargs = dict(kwargs)
    p = write_gguf(tmp_path / f"{code}.gguf", kwargs.pop("arch", "llama"), **kwargs)
    r = inspect_gguf(p, n_ctx=n_ctx)
    assert code in codes(r), [f"{f.code}: {f.message}" for f in r.findings]
    f = next(f for f in r.findings if f.code == code)
    assert f.severity in ("error", "warning", "info") and f.message
    severities = [x.severity for x in r.findings]
    assert severities == sorted(severities, key=["error", "warning", "info"].index)


def test_severities_of_fatal_findings(tmp_path):
    p = write_gguf(tmp_path / "f16.gguf", tensors={ROPE_FREQS: np.ones(32, np.float16)})
    f = {x.code: x for x in inspect_gguf(p).findings}
    assert f["freq_factors_not_f32"].severity == "error" and "aborts" in f["freq_factors_not_f32"].message


def test_unreadable_file_raises(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"<html>not a model</html>")
    with pytest.raises(GGUFError, match="HTML"):
        inspect_gguf(p)


# --------------------------------------------------------------------------- CLI


def test_cli_text_json_and_exit_codes(tmp_path):
    p = write_gguf(tmp_path / "y.gguf", ctx=4096, kv=yarn_kv(4.0, 4096))  # context_inconsistent + magnitude
    runner = CliRunner()
    res = runner.invoke(cli, ["inspect", str(p)])
    assert res.exit_code == 0, res.output
    for section in ("File", "Model", "Context", "RoPE (as llama.cpp computes it)", "KV cache", "Findings"):
        assert section in res.output
    assert "WARNING [context_inconsistent]" in res.output and "INFO    [kv_shift_magnitude]" in res.output
    res = runner.invoke(cli, ["inspect", str(p), "--json", "--ctx", "1000"])
    assert res.exit_code == 0
    data = json.loads(res.output)
    assert data["context_effective"] == 1024 and data["rope"]["rotation"] == "NORM"
    assert {f["code"] for f in data["findings"]} == {"context_inconsistent", "kv_shift_magnitude"}
    assert set(data["kv"]["bytes_at_context"]) == {"1000", "4096"}
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    res = runner.invoke(cli, ["inspect", str(bad)])
    assert res.exit_code == 2 and "cut off inside the GGUF header" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["inspect", str(bad), "--json"])
    assert res.exit_code == 2 and json.loads(res.output)["error"] == "GGUFError"
