"""The contract: PyTorch and llama.cpp compute the same function, for every rope method, at 8x context.

Each case makes a tiny random Llama-family checkpoint (trained context 256,
weights spread wide so rope bugs move the logits), converts it to an f32 GGUF
with ``edgerope.convert.export``, and compares logits at all 2048 positions between
edgerope's PyTorch model (itself checked against transformers in
test_model.py) and the real llama.cpp runtime.  f32 KV cache: relative L2
<= 1e-4 (docs/llama_cpp.md §8.1 measured ~1e-5 max abs error at f32 noise).
f16 and q8_0 (+flash attention) caches are measured with their own, looser
bounds (section 8.2: ~5e-4 and ~1e-2 max abs).  Failure messages print the
error per position bucket.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from edgerope.convert.export import convert  # noqa: E402
from edgerope.evaluation import parity  # noqa: E402

L0 = 256
N_POS = 8 * L0
F32_TOL = 1e-4
KV_TOL = {("f16", False): 3e-3, ("q8_0", True): 5e-2}

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": L0}
CASES = {
    "none": ({"rope_type": "default", "rope_theta": 10000.0}, "llama", L0),
    "linear": ({"rope_type": "linear", "factor": 8.0}, "llama", N_POS),
    "ntk": ({"rope_type": "ntk", "alpha": 8.0}, "llama", N_POS),
    "yarn": (YARN, "llama", N_POS),
    "yarn-attention-factor": ({**YARN, "attention_factor": 1.0}, "llama", N_POS),
    "yarn-mscale": ({**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}, "llama", N_POS),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": L0,
        },
        "llama",
        N_POS,
    ),
    "longrope-long": (
        {
            "rope_type": "longrope",
            "factor": 8.0,
            "original_max_position_embeddings": L0,
            "short_factor": np.linspace(1.0, 1.5, 32).tolist(),
            "long_factor": np.linspace(1.0, 12.0, 32).tolist(),
        },
        "llama",
        N_POS,
    ),
    "mistral-yarn": (YARN, "mistral", N_POS),
    "qwen2-yarn": (YARN, "qwen2", N_POS),
    "qwen2-linear": ({"rope_type": "linear", "factor": 8.0}, "qwen2", N_POS),
}


def _tokens(vocab: int, n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, vocab, size=n - 1).tolist()


def _make(make_tiny, rope_parameters, model_type, max_pos):
    return make_tiny(
        model_type=model_type,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
        max_position_embeddings=max_pos,
    )


def _vocab(hf_dir) -> int:
    return json.loads((hf_dir / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_llama_cpp_at_8x_context(case, make_tiny, tmp_path):
    rope_parameters, model_type, max_pos = CASES[case]
    hf_dir = _make(make_tiny, rope_parameters, model_type, max_pos)
    gguf_path = convert(hf_dir, tmp_path / f"{case}.gguf", outtype="f32").path
    tokens = _tokens(_vocab(hf_dir), N_POS)
    settings = (("f32", "f32", False), ("f16", "f16", False), ("q8_0", "q8_0", True))
    results = parity.check_parity(
        hf_dir, gguf_path, tokens=tokens, original_context=L0, kv_settings=settings, n_ctx=N_POS
    )
    report = "\n".join(r.table() for r in results)
    f32 = results[0]
    assert f32.rel_l2 <= F32_TOL, f"{case}\n{report}"
    # per bucket, float32 angle rounding (HF: one product; ggml: iterated theta_scale) grows with position
    # (docs/llama_cpp.md §4.5), so the last bucket gets twice the budget; a rope bug is >= 1e-2 (negative control)
    assert all(b.rel_l2 <= 2 * F32_TOL for b in f32.buckets), f"{case}\n{report}"
    for r in results[1:]:
        tol = KV_TOL[(r.type_k, r.flash_attn)]
        assert r.rel_l2 <= tol, f"{case}: KV {r.kv} error above {tol:g}\n{report}"
    # the f16 cache's rounding must be visible: this pins that the KV setting reached llama.cpp
    assert results[1].rel_l2 > f32.rel_l2


def test_longrope_short_prompt_matches_when_context_within_original(make_tiny, tmp_path):
    """LongRoPE picks factors from the allocated n_ctx (docs/llama_cpp.md pitfall 8): with n_ctx <= L0 short prompts match HF."""
    rope_parameters, model_type, max_pos = CASES["longrope-long"]
    hf_dir = _make(make_tiny, rope_parameters, model_type, max_pos)
    gguf_path = convert(hf_dir, tmp_path / "longrope.gguf", outtype="f32").path
    tokens = _tokens(_vocab(hf_dir), 200)
    (res,) = parity.check_parity(hf_dir, gguf_path, tokens=tokens, original_context=L0, n_ctx=L0)
    assert res.rel_l2 <= F32_TOL, res.table()
    # and the documented divergence is real: the same prompt with a long allocated context differs
    (wide,) = parity.check_parity(hf_dir, gguf_path, tokens=tokens, original_context=L0, n_ctx=N_POS)
    assert wide.rel_l2 > 1e-2, wide.table()


def test_yarn_non_default_betas_match_through_runtime_overrides(make_tiny, tmp_path):
    """Betas llama.cpp's llama arch ignores in GGUF are recorded and applied by edgerope's runtime."""
    hf_dir = _make(make_tiny, {**YARN, "beta_fast": 8.0, "beta_slow": 2.0}, "llama", N_POS)
    gguf_path = convert(hf_dir, tmp_path / "betas.gguf", outtype="f32", allow_runtime_rope=True).path
    (res,) = parity.check_parity(hf_dir, gguf_path, tokens=_tokens(_vocab(hf_dir), N_POS), original_context=L0)
    assert res.rel_l2 <= F32_TOL, res.table()


def test_parity_detects_the_ignored_attention_factor(make_tiny, tmp_path):
    """Negative control: a GGUF that drops an explicit YaRN attention factor (what llama.cpp's converter
    effectively does, docs/llama_cpp.md §8.1) must fail the same bound by orders of magnitude."""
    hf_dir = _make(make_tiny, {**YARN, "attention_factor": 1.0}, "llama", N_POS)
    plain_dir = _make(make_tiny, YARN, "llama", N_POS)  # same seed: same weights, default attention factor
    wrong = convert(plain_dir, tmp_path / "wrong.gguf", outtype="f32").path
    (res,) = parity.check_parity(hf_dir, wrong, tokens=_tokens(_vocab(hf_dir), 512), original_context=L0)
    assert res.rel_l2 > 100 * F32_TOL, res.table()


def test_quantized_weights_stay_close(make_tiny, tmp_path):
    """q8_0 weights (the gguf package's quantizer) with an f32 cache: the error is weight rounding amplified by
    the deliberately wide random weights (~8%), and it must not grow with position (rope stays exact)."""
    hf_dir = _make(make_tiny, YARN, "llama", N_POS)
    gguf_path = convert(hf_dir, tmp_path / "q8.gguf", outtype="q8_0").path
    (res,) = parity.check_parity(hf_dir, gguf_path, tokens=_tokens(_vocab(hf_dir), N_POS), original_context=L0)
    assert res.rel_l2 <= 0.15, res.table()
    within, beyond = res.buckets[0].rel_l2, max(b.rel_l2 for b in res.buckets[1:])
    assert beyond <= 1.5 * within, res.table()
