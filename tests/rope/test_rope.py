"""edgerope.rope.scaling against transformers 5.24.0, and edgerope.rope.ggml's GGUF plans and llama.cpp resolution.

The oracle for inverse frequencies and attention factors is transformers'
own ``ROPE_INIT_FUNCTIONS`` (and ``LlamaRotaryEmbedding.compute_default_rope_parameters``
for the default type), fed a ``LlamaConfig`` built from the same config dict
edgerope parses, so parsing and math are checked together.  References for
the GGUF side are docs/llama_cpp.md §1-§3 (llama.cpp's resolution and kernel)
and section 9 (what to write per variant).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGUFValueType, Keys

from edgerope.errors import GGUFError, RopeConfigError, UnsupportedRopeError
from edgerope.rope.ggml import (
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    LlamaCppRope,
)
from edgerope.rope.gguf_plan import plan_gguf_rope
from edgerope.rope.hf import parse_hf_rope, to_hf_rope
from edgerope.rope.scaling import (
    Default,
    DynamicNtk,
    Linear,
    Llama3,
    LongRope,
    NtkAware,
    RopeScaling,
    Yarn,
    attention_factor,
    describe,
    inv_freq,
    llama3_freq_factors,
    longrope_factors,
)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

RTOL = 1e-6
HD = 64  # head_dim of most cases
SHORT = [1.0 + 0.05 * i for i in range(HD // 2)]  # LongRoPE factor sets, distinct per pair
LONG = [1.0 + 0.4 * i for i in range(HD // 2)]


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # HF warns about e.g. factor vs max_pos ratios; not our concern
    yield
    transformers.logging.set_verbosity(level)


def hf_config(raw: dict, *, head_dim: int = HD) -> LlamaConfig:
    """A LlamaConfig from a config.json-like dict (rope keys plus max_position_embeddings etc.)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}  # HF mutates rope dicts
    return LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, **raw)


def hf_rope(raw: dict, *, head_dim: int = HD, seq_len=None) -> tuple[np.ndarray, float]:
    """(inv_freq float64, attention factor) as transformers computes them for ``raw``."""
    cfg = hf_config(raw, head_dim=head_dim)
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        inv, att = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, att = ROPE_INIT_FUNCTIONS[rope_type](cfg, seq_len=seq_len)
    return inv.double().numpy(), float(att)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got) - want) / np.abs(want)))


def assert_matches_hf(raw: dict, *, head_dim: int = HD, seq_len=None, hf_raw: dict | None = None) -> RopeScaling:
    rope = parse_hf_rope(raw)
    want_inv, want_att = hf_rope(hf_raw or raw, head_dim=head_dim, seq_len=seq_len)
    got_inv = inv_freq(rope, head_dim, seq_len=seq_len)
    assert got_inv.shape == want_inv.shape
    assert rel_err(got_inv, want_inv) <= RTOL, f"{rope}: inv_freq rel err {rel_err(got_inv, want_inv):.2e}"
    got_att = attention_factor(rope)
    assert abs(got_att - want_att) / want_att <= RTOL, f"{rope}: attention factor {got_att} vs HF {want_att}"
    return rope


def params(rope_type: str, **keys) -> dict:
    return {"rope_type": rope_type, "rope_theta": keys.pop("rope_theta", 10000.0), **keys}


YARN = params("yarn", factor=8.0, original_max_position_embeddings=64)
LLAMA3 = params("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
LONGROPE = params("longrope", short_factor=SHORT, long_factor=LONG, original_max_position_embeddings=64)

# (id, config dict, head_dim): every length-independent case, compared with HF at init.
STATIC_CASES = [
    ("default", {"rope_parameters": params("default")}, HD),
    ("default-theta5e5-d128", {"rope_parameters": params("default", rope_theta=500000.0)}, 128),
    ("linear", {"rope_parameters": params("linear", factor=4.0)}, HD),
    ("yarn", {"rope_parameters": YARN}, HD),
    (
        "yarn-qwen2.5",
        {"rope_parameters": params("yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768)},
        128,
    ),
    ("yarn-attention-factor", {"rope_parameters": {**YARN, "attention_factor": 1.5}}, HD),
    ("yarn-mscale-pair", {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}}, HD),
    ("yarn-mscale-alone", {"rope_parameters": {**YARN, "mscale": 0.707}}, HD),  # one of the pair: paper formula
    ("yarn-betas", {"rope_parameters": {**YARN, "beta_fast": 16.0, "beta_slow": 2.0}}, HD),
    ("yarn-untruncated", {"rope_parameters": {**YARN, "truncate": False}}, HD),
    ("yarn-factor-from-lengths", {"max_position_embeddings": 512, "rope_parameters": {**YARN, "factor": None}}, HD),
    ("llama3", {"rope_parameters": LLAMA3}, HD),
    (
        "llama3.1-8b",
        {
            "rope_parameters": params(
                "llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            )
        },
        128,
    ),
]


@pytest.mark.parametrize("raw,head_dim", [c[1:] for c in STATIC_CASES], ids=[c[0] for c in STATIC_CASES])
def test_static_variants_match_transformers(raw, head_dim):
    """inv_freq and attention factor equal HF's ROPE_INIT_FUNCTIONS (docs/llama_cpp.md §4.3) to 1e-6 relative."""
    assert_matches_hf({"max_position_embeddings": 512, **raw}, head_dim=head_dim)


def test_llama3_case_covers_all_three_bands():
    """The llama3 case above exercises kept, smoothed and divided bands (otherwise it proves little)."""
    ff = llama3_freq_factors(parse_hf_rope({"rope_parameters": LLAMA3}), HD)
    assert np.any(ff == 1.0) and np.any(ff == 8.0) and np.any((ff > 1.0) & (ff < 8.0))


@pytest.mark.parametrize("alpha", [2.0, 8.0])
def test_ntk_aware_is_hf_default_with_new_base(alpha):
    """Static NTK: HF default type with rope_theta = b * alpha^(d/(d-2)) (docs/llama_cpp.md §4.6)."""
    raw = {"rope_parameters": params("ntk", alpha=alpha)}
    hf_raw = {"rope_parameters": params("default", rope_theta=10000.0 * alpha ** (HD / (HD - 2)))}
    rope = assert_matches_hf(raw, hf_raw=hf_raw)
    assert rope == NtkAware(theta=10000.0, alpha=alpha)


@pytest.mark.parametrize("seq_len", [None, 32, 64, 65, 200, 512])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_dynamic_ntk_matches_transformers_per_length(seq_len, as_tensor):
    """HF dynamic: base * (F L / max_pos - (F - 1))^(d/(d-2)), L = max(seq_len, max_pos) (docs/llama_cpp.md §4.3).

    The forward pass hands HF a tensor seq_len; init an int (or None)."""
    raw = {"max_position_embeddings": 64, "rope_parameters": params("dynamic", factor=4.0)}
    hf_len = torch.tensor(seq_len) if as_tensor and seq_len is not None else seq_len
    rope = parse_hf_rope(raw)
    want_inv, want_att = hf_rope(raw, seq_len=hf_len)
    assert rel_err(inv_freq(rope, HD, seq_len=seq_len), want_inv) <= RTOL
    assert attention_factor(rope) == want_att == 1.0


LONGROPE_CASES = [
    ("derived-factor", {"max_position_embeddings": 512, "rope_parameters": LONGROPE}),
    ("explicit-attention", {"max_position_embeddings": 512, "rope_parameters": {**LONGROPE, "attention_factor": 1.3}}),
    ("explicit-factor", {"max_position_embeddings": 512, "rope_parameters": {**LONGROPE, "factor": 4.0}}),
]


@pytest.mark.parametrize("seq_len", [None, 64, 65, 512], ids=["init", "short-64", "long-65", "long-512"])
@pytest.mark.parametrize("raw", [c[1] for c in LONGROPE_CASES], ids=[c[0] for c in LONGROPE_CASES])
def test_longrope_matches_transformers(raw, seq_len):
    """Short factors up to original length, long past it; A = sqrt(1 + ln F / ln L0) or explicit (docs/llama_cpp.md §4.3)."""
    rope = assert_matches_hf(raw, seq_len=seq_len)
    expect_long = seq_len is not None and seq_len > 64
    factors = longrope_factors(rope, seq_len=seq_len)
    assert np.array_equal(factors, LONG if expect_long else SHORT)


def test_longrope_derived_attention_factor_value():
    """The derived factor uses F = max_pos / L0 = 8 here."""
    rope = parse_hf_rope({"max_position_embeddings": 512, "rope_parameters": LONGROPE})
    assert rope.factor == 8.0
    assert attention_factor(rope) == pytest.approx(math.sqrt(1 + math.log(8) / math.log(64)), rel=1e-12)


# --------------------------------------------------------------------------- parsing


def test_parse_4x_form_with_legacy_type_key_and_top_level_theta():
    """4.x: rope_scaling {"type": ...} + top-level rope_theta (docs/llama_cpp.md §4.1)."""
    raw = {"max_position_embeddings": 512, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert assert_matches_hf(raw) == Linear(theta=500000.0, factor=2.0)


def test_parse_4x_form_with_rope_type_key():
    raw = {
        "max_position_embeddings": 512,
        "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    }
    assert assert_matches_hf(raw) == Yarn(theta=1e6, factor=4.0, original_max_position_embeddings=128)


def test_parse_5x_form():
    raw = {"max_position_embeddings": 512, "rope_parameters": {**LLAMA3, "rope_theta": 5e5}}
    assert assert_matches_hf(raw) == Llama3(
        theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )


def test_parse_both_forms_must_agree():
    """A v5 config.json with rope_scaling added by hand (as model cards instruct): HF 5.x uses rope_scaling
    (dropping rope_parameters' rope_theta), llama.cpp's converter rope_parameters (docs/llama_cpp.md §4.1, §5)."""
    v5 = {"rope_type": "default", "rope_theta": 1e6}
    v4 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    raw = {"max_position_embeddings": 512, "rope_parameters": v5, "rope_scaling": v4}
    with pytest.raises(RopeConfigError, match="disagree"):
        parse_hf_rope(raw)
    assert hf_config(raw).rope_parameters["rope_type"] == "yarn"  # why it cannot be resolved quietly
    same = {"max_position_embeddings": 512, "rope_theta": 1e6, "rope_parameters": {**v4, "rope_theta": 1e6}}
    assert parse_hf_rope({**same, "rope_scaling": v4}) == parse_hf_rope(same)


def test_parse_no_rope_keys_is_default():
    assert parse_hf_rope({"max_position_embeddings": 512}) == Default(theta=10000.0)


def test_yarn_original_context_defaults_to_max_position_embeddings():
    """v5 standardize_rope_params fills L0 = max_position_embeddings (docs/llama_cpp.md §4.1, pitfall 11)."""
    raw = {"max_position_embeddings": 256, "rope_parameters": params("yarn", factor=4.0)}
    assert assert_matches_hf(raw).original_max_position_embeddings == 256


@pytest.mark.parametrize("rope_params", [LONGROPE, YARN, LLAMA3], ids=["longrope", "yarn", "llama3"])
def test_top_level_original_max_position_embeddings_wins(rope_params):
    """A top-level original_max_position_embeddings beats the rope dict's (Phi-3 layout, docs/llama_cpp.md §4.1)."""
    raw = {"max_position_embeddings": 512, "original_max_position_embeddings": 128, "rope_parameters": rope_params}
    assert assert_matches_hf(raw, seq_len=100).original_max_position_embeddings == 128


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"rope_parameters": {"rope_type": "su-perb", "factor": 2.0}}, "unknown rope type"),
        ({"rope_scaling": {"type": "proportional", "factor": 2.0}}, "unknown rope type"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "factr": 3}}, "unknown key"),
        ({"rope_parameters": {**YARN, "beta_fastest": 3}}, "unknown key"),
        ({"rope_parameters": {"rope_type": "linear"}}, "missing 'factor'"),
        ({"rope_parameters": {k: v for k, v in LLAMA3.items() if k != "factor"}}, "missing 'factor'"),
        ({"rope_parameters": {"rope_type": "linear", "factor": -2.0}}, "must be > 0"),
        ({"rope_parameters": {**YARN, "factor": -8.0}}, "must be > 0"),
        ({"rope_parameters": {**LLAMA3, "factor": 0}}, "must be > 0"),
        ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "must be a number"),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial rotary"),
        ({"partial_rotary_factor": 0.25, "rope_theta": 1e4}, "partial rotary"),
        (
            {"rope_parameters": {"full_attention": params("default"), "sliding_attention": params("default")}},
            "per-layer",
        ),
        ({"rope_parameters": {**LLAMA3, "low_freq_factor": None}}, "missing 'low_freq_factor'"),
        ({"rope_parameters": {**LONGROPE, "long_factor": []}}, "long_factor"),
        ({"rope_parameters": ["linear", 2.0]}, "must be an object"),
    ],
)
def test_parse_errors(raw, match):
    """Rope scaling is a closed, validated set (STYLE rule 2): bad configs raise RopeConfigError with a where."""
    with pytest.raises(RopeConfigError, match=match) as info:
        parse_hf_rope({"max_position_embeddings": 512, **raw}, where="cfg.json")
    assert info.value.where and info.value.where.startswith("cfg.json")


def test_longrope_factor_count_must_match_head_dim():
    rope = parse_hf_rope({"max_position_embeddings": 512, "rope_parameters": LONGROPE})
    with pytest.raises(RopeConfigError, match="entries"):
        inv_freq(rope, 128)


ROUND_TRIP = [
    Default(theta=10000.0),
    Linear(theta=10000.0, factor=4.0),
    DynamicNtk(theta=10000.0, factor=4.0, max_position_embeddings=64),
    Yarn(theta=10000.0, factor=8.0, original_max_position_embeddings=64),
    Yarn(theta=1e6, factor=4.0, original_max_position_embeddings=128, attention_factor=1.5),
    Yarn(theta=1e4, factor=8.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5),
    Yarn(theta=1e4, factor=8.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0, truncate=False),
    Llama3(theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64),
    LongRope(
        theta=1e4, short_factor=tuple(SHORT), long_factor=tuple(LONG), original_max_position_embeddings=64, factor=8.0
    ),
    LongRope(
        theta=1e4,
        short_factor=tuple(SHORT),
        long_factor=tuple(LONG),
        original_max_position_embeddings=64,
        factor=4.0,
        attention_factor=1.3,
    ),
]


@pytest.mark.parametrize("rope", ROUND_TRIP, ids=lambda r: describe(r))
def test_to_hf_round_trip(rope):
    """parse(to_hf(x)) == x, and transformers reads to_hf(x) as the same function."""
    max_pos = rope.max_position_embeddings if isinstance(rope, DynamicNtk) else 512
    raw = {"max_position_embeddings": max_pos, "rope_parameters": to_hf_rope(rope, head_dim=HD)}
    assert parse_hf_rope(raw) == rope
    assert_matches_hf(raw, seq_len=512)


def test_to_hf_ntk_becomes_default_with_new_base():
    rope = NtkAware(theta=10000.0, alpha=4.0)
    raw = {"rope_parameters": to_hf_rope(rope, head_dim=HD)}
    back = parse_hf_rope(raw)
    assert back == Default(theta=10000.0 * 4.0 ** (HD / (HD - 2)))
    assert rel_err(inv_freq(back, HD), inv_freq(rope, HD)) <= 1e-12


# --------------------------------------------------------------------------- GGUF plans (docs/llama_cpp.md §9)

ARCH = "llama"
CTX = 512


def k(template: str) -> str:
    return template.format(arch=ARCH)


def plan_for(raw: dict, **kw):
    rope = parse_hf_rope({"max_position_embeddings": CTX, **raw})
    return rope, plan_gguf_rope(rope, arch=ARCH, head_dim=HD, context_length=CTX, **kw)


def llama_cpp_function(plan, *, n_ctx: int | None = None) -> LlamaCppRope:
    return LlamaCppRope.from_gguf(ARCH, plan.kv_values(), tensors=plan.tensors, n_ctx=n_ctx, runtime=plan.runtime)


def assert_llama_cpp_matches_hf(plan, raw: dict, *, n_ctx: int | None = None, seq_len: int | None = None) -> None:
    """llama.cpp's function of the plan (docs/llama_cpp.md §2-§3) equals HF's function of the config."""
    want_inv, want_att = hf_rope({"max_position_embeddings": CTX, **raw}, seq_len=seq_len)
    fn = llama_cpp_function(plan, n_ctx=n_ctx)
    assert rel_err(fn.inv_freq(HD), want_inv) <= RTOL
    assert fn.magnitude == pytest.approx(want_att, rel=RTOL)


def test_plan_always_writes_context_dimension_and_base():
    _, plan = plan_for({"rope_parameters": params("default", rope_theta=5e5)})
    kv = plan.kv
    assert kv[k(Keys.LLM.CONTEXT_LENGTH)] == (CTX, GGUFValueType.UINT32)
    assert kv[k(Keys.Rope.DIMENSION_COUNT)] == (HD, GGUFValueType.UINT32)
    assert kv[k(Keys.Rope.FREQ_BASE)] == (5e5, GGUFValueType.FLOAT32)


def test_plan_default_writes_no_scaling_keys():
    """Default: nothing, not even type "none" (docs/llama_cpp.md pitfall 6)."""
    raw = {"rope_parameters": params("default")}
    _, plan = plan_for(raw)
    assert k(Keys.Rope.SCALING_TYPE) not in plan.kv and k(Keys.Rope.SCALING_FACTOR) not in plan.kv
    assert not plan.tensors and not plan.runtime
    assert k(Keys.Rope.SCALING_TYPE) in plan.remove
    assert_llama_cpp_matches_hf(plan, raw)


def test_plan_ntk_aware_is_a_new_freq_base():
    """Static NTK: rope.freq_base = b * alpha^(d/(d-2)), no type (docs/llama_cpp.md §4.6, §9)."""
    rope, plan = plan_for({"rope_parameters": params("ntk", alpha=4.0)})
    base, vtype = plan.kv[k(Keys.Rope.FREQ_BASE)]
    assert vtype == GGUFValueType.FLOAT32 and base == pytest.approx(10000.0 * 4.0 ** (HD / (HD - 2)), rel=1e-12)
    assert k(Keys.Rope.SCALING_TYPE) not in plan.kv
    hf_raw = {"rope_parameters": params("default", rope_theta=base)}
    assert_llama_cpp_matches_hf(plan, hf_raw)


def test_plan_linear():
    raw = {"rope_parameters": params("linear", factor=4.0)}
    _, plan = plan_for(raw)
    assert plan.kv[k(Keys.Rope.SCALING_TYPE)] == ("linear", GGUFValueType.STRING)
    assert plan.kv[k(Keys.Rope.SCALING_FACTOR)] == (4.0, GGUFValueType.FLOAT32)
    assert_llama_cpp_matches_hf(plan, raw)


def test_plan_yarn_default():
    """YaRN: type, factor, original_context_length; no attn_factor key since m = 1 + 0.1 ln F already."""
    raw = {"rope_parameters": YARN}
    _, plan = plan_for(raw)
    assert plan.kv[k(Keys.Rope.SCALING_TYPE)] == ("yarn", GGUFValueType.STRING)
    assert plan.kv[k(Keys.Rope.SCALING_FACTOR)] == (8.0, GGUFValueType.FLOAT32)
    assert plan.kv[k(Keys.Rope.SCALING_ORIG_CTX_LEN)] == (64, GGUFValueType.UINT32)
    assert k(Keys.Rope.SCALING_ATTN_FACTOR) not in plan.kv
    assert not plan.runtime
    assert_llama_cpp_matches_hf(plan, raw)


@pytest.mark.parametrize(
    "extra,hf_attention",
    [
        ({"attention_factor": 1.5}, 1.5),
        ({"mscale": 1.0, "mscale_all_dim": 0.5}, (1 + 0.1 * math.log(8)) / (1 + 0.05 * math.log(8))),
    ],
    ids=["attention_factor", "mscale-pair"],
)
def test_plan_yarn_attention_factor(extra, hf_attention):
    """Explicit YaRN factor A: rope.scaling.attn_factor = A / (1 + 0.1 ln F) (docs/llama_cpp.md §3.3, §9; pitfall 2)."""
    raw = {"rope_parameters": {**YARN, **extra}}
    _, plan = plan_for(raw)
    value, vtype = plan.kv[k(Keys.Rope.SCALING_ATTN_FACTOR)]
    assert vtype == GGUFValueType.FLOAT32
    assert value == pytest.approx(hf_attention / (1 + 0.1 * math.log(8.0)), rel=1e-12)
    assert k(Keys.Rope.SCALING_YARN_ATTN_FACTOR) not in plan.kv  # ignored on llama; never relied upon
    assert_llama_cpp_matches_hf(plan, raw)


def test_plan_llama3_is_a_rope_freqs_tensor():
    """llama3: F32 rope_freqs[d/2], no scaling type or factor (docs/llama_cpp.md pitfall 7); ff = HF's divisor per pair."""
    raw = {"rope_parameters": LLAMA3}
    _, plan = plan_for(raw)
    assert k(Keys.Rope.SCALING_TYPE) not in plan.kv and k(Keys.Rope.SCALING_FACTOR) not in plan.kv
    ff = plan.tensors[ROPE_FREQS]
    assert ff.dtype == np.float32 and ff.shape == (HD // 2,)
    hf_inv, _ = hf_rope({"max_position_embeddings": CTX, **raw})
    base = 1.0 / 10000.0 ** (np.arange(0, HD, 2) / HD)
    assert rel_err(ff, base / hf_inv) <= RTOL
    assert_llama_cpp_matches_hf(plan, raw)


def test_plan_longrope():
    """longrope: type, L0, attn_factor = A, long/short F32 tensors, no scaling.factor (docs/llama_cpp.md §9, pitfall 7)."""
    raw = {"rope_parameters": LONGROPE}
    rope, plan = plan_for(raw)
    assert plan.kv[k(Keys.Rope.SCALING_TYPE)] == ("longrope", GGUFValueType.STRING)
    assert plan.kv[k(Keys.Rope.SCALING_ORIG_CTX_LEN)] == (64, GGUFValueType.UINT32)
    assert k(Keys.Rope.SCALING_FACTOR) not in plan.kv
    _, hf_att = hf_rope({"max_position_embeddings": CTX, **raw})
    assert plan.kv[k(Keys.Rope.SCALING_ATTN_FACTOR)][0] == pytest.approx(hf_att, rel=1e-12)
    for name, values in ((ROPE_FACTORS_LONG, LONG), (ROPE_FACTORS_SHORT, SHORT)):
        assert plan.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(plan.tensors[name], np.float32(values))
    assert plan.notes  # the n_ctx-vs-prompt-length caveat (docs/llama_cpp.md pitfall 8)
    # llama.cpp picks the set from the allocated n_ctx (512 > 64: long); HF from the forward's length (512: long).
    assert_llama_cpp_matches_hf(plan, raw, n_ctx=CTX, seq_len=CTX)


def test_plan_refuses_dynamic():
    """Dynamic NTK has no GGUF form (docs/llama_cpp.md §9, pitfall 9)."""
    with pytest.raises(UnsupportedRopeError, match="dynamic"):
        plan_for({"max_position_embeddings": 64, "rope_parameters": params("dynamic", factor=4.0)})


def test_plan_yarn_betas_need_runtime_opt_in():
    """llama ignores yarn_beta_* keys (docs/llama_cpp.md pitfall 2): refused unless the runtime will pass them."""
    raw = {"rope_parameters": {**YARN, "beta_fast": 16.0, "beta_slow": 2.0}}
    with pytest.raises(UnsupportedRopeError, match="beta_fast=16"):
        plan_for(raw)
    _, plan = plan_for(raw, allow_runtime_rope=True)
    assert plan.runtime == {"yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0}
    assert plan.notes
    assert_llama_cpp_matches_hf(plan, raw)
    # the same file read by a runtime that does not pass them computes 32/1, a different function
    plain = LlamaCppRope.from_gguf(ARCH, plan.kv_values(), tensors=plan.tensors)
    want, _ = hf_rope({"max_position_embeddings": CTX, **raw})
    assert rel_err(plain.inv_freq(HD), want) > 1e-3


def test_plan_refuses_untruncated_yarn_ramp():
    """llama.cpp always floors/ceils the correction range; truncate=False cannot be stored (docs/llama_cpp.md §9)."""
    with pytest.raises(UnsupportedRopeError):
        plan_for({"rope_parameters": {**YARN, "truncate": False}})


def test_plan_finetuned_flag():
    _, plan = plan_for({"rope_parameters": YARN}, finetuned=True)
    assert plan.kv[k(Keys.Rope.SCALING_FINETUNED)] == (True, GGUFValueType.BOOL)


# --------------------------------------------------------------------------- llama.cpp resolution (docs/llama_cpp.md §1-§2)


def gguf_kv(**rope_keys) -> dict:
    kv = {k(Keys.LLM.CONTEXT_LENGTH): CTX, k(Keys.Rope.FREQ_BASE): 10000.0}
    names = {
        "type": Keys.Rope.SCALING_TYPE,
        "factor": Keys.Rope.SCALING_FACTOR,
        "orig": Keys.Rope.SCALING_ORIG_CTX_LEN,
        "attn": Keys.Rope.SCALING_ATTN_FACTOR,
    }
    kv.update({k(names[n]): v for n, v in rope_keys.items()})
    return kv


def test_absent_scaling_type_means_linear():
    """An absent rope.scaling.type is "linear": a factor alone scales (docs/llama_cpp.md §1)."""
    fn = LlamaCppRope.from_gguf(ARCH, gguf_kv(factor=4.0))
    assert fn.freq_scale == 0.25 and fn.ext_factor == 0.0
    assert rel_err(fn.inv_freq(HD), inv_freq(Linear(theta=10000.0, factor=4.0), HD)) <= 1e-12


def test_scaling_type_none_forces_scale_one_even_with_runtime_freq_scale():
    """type "none" discards a runtime rope_freq_scale unless the type is also overridden (docs/llama_cpp.md §2, pitfall 6)."""
    fn = LlamaCppRope.from_gguf(ARCH, gguf_kv(type="none", factor=4.0), runtime={"rope_freq_scale": 0.5})
    assert fn.freq_scale == 1.0
    fn = LlamaCppRope.from_gguf(ARCH, gguf_kv(), runtime={"rope_freq_scale": 0.5})  # absent type: honoured
    assert fn.freq_scale == 0.5
    fn = LlamaCppRope.from_gguf(ARCH, gguf_kv(type="none"), runtime={"rope_freq_scale": 0.5, "rope_scaling_type": 1})
    assert fn.freq_scale == 0.5


def test_runtime_yarn_attn_factor_ignored_under_yarn_but_not_linear():
    """Under YaRN the runtime yarn_attn_factor is overwritten; elsewhere it multiplies m (docs/llama_cpp.md §2, pitfall 3)."""
    yarn = gguf_kv(type="yarn", factor=8.0, orig=64, attn=1.1)
    fn = LlamaCppRope.from_gguf(ARCH, yarn, runtime={"yarn_attn_factor": 3.0})
    assert fn.magnitude == pytest.approx((1 + 0.1 * math.log(8.0)) * 1.1, rel=1e-12)
    fn = LlamaCppRope.from_gguf(ARCH, gguf_kv(type="linear", factor=4.0), runtime={"yarn_attn_factor": 3.0})
    assert fn.magnitude == 3.0


def test_missing_original_context_falls_back_to_context_length():
    """No rope.scaling.original_context_length: n_ctx_orig = context_length (docs/llama_cpp.md §1.2, pitfall 5)."""
    fn = LlamaCppRope.from_gguf(ARCH, gguf_kv(type="yarn", factor=8.0))
    assert fn.n_ctx_orig == CTX
    with_orig = LlamaCppRope.from_gguf(ARCH, gguf_kv(type="yarn", factor=8.0, orig=64))
    assert with_orig.n_ctx_orig == 64
    assert rel_err(fn.inv_freq(HD), with_orig.inv_freq(HD)) > 1e-3  # a different (wrong) function
    rt = LlamaCppRope.from_gguf(ARCH, gguf_kv(type="yarn", factor=8.0), runtime={"yarn_orig_ctx": 64})
    assert rt.n_ctx_orig == 64


def test_yarn_beta_keys_ignored_on_llama_read_on_mistral3():
    """yarn_beta_* keys are read only by grok/mistral3 (docs/llama_cpp.md §1)."""
    kv = {**gguf_kv(type="yarn", factor=8.0, orig=64), k(Keys.Rope.SCALING_YARN_BETA_FAST): 16.0}
    assert LlamaCppRope.from_gguf(ARCH, kv).beta_fast == 32.0
    m3 = {key.replace("llama.", "mistral3."): v for key, v in kv.items()}
    assert LlamaCppRope.from_gguf("mistral3", m3).beta_fast == 16.0


def test_longrope_switch_uses_padded_n_ctx():
    """long factors iff n_ctx padded to 256 (per sequence) > L0 (docs/llama_cpp.md §1.1, pitfall 8)."""
    kv = gguf_kv(type="longrope", orig=256)
    tensors = {ROPE_FACTORS_LONG: np.float32(LONG), ROPE_FACTORS_SHORT: np.float32(SHORT)}
    short, long = (tuple(float(x) for x in tensors[n]) for n in (ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG))
    assert LlamaCppRope.from_gguf(ARCH, kv, tensors=tensors, n_ctx=200).freq_factors == short
    assert LlamaCppRope.from_gguf(ARCH, kv, tensors=tensors, n_ctx=257).freq_factors == long
    assert LlamaCppRope.from_gguf(ARCH, kv, tensors=tensors, n_ctx=512, n_seq_max=2).freq_factors == short


def test_from_gguf_rejects_unknown_type_and_missing_context():
    with pytest.raises(GGUFError, match="dynamic"):
        LlamaCppRope.from_gguf(ARCH, gguf_kv(type="dynamic"))
    with pytest.raises(GGUFError, match="context_length"):
        LlamaCppRope.from_gguf(ARCH, {k(Keys.Rope.FREQ_BASE): 10000.0})


def test_from_gguf_zero_factor_means_no_scaling_even_with_the_legacy_key():
    """docs/llama_cpp.md §1: rope.scale_linear is read only when rope.scaling.factor is absent; factor 0 gives scale 1."""
    from edgerope.rope.ggml import LlamaCppRope

    kv = {"llama.context_length": 2048, "llama.rope.scaling.factor": 0.0, "llama.rope.scale_linear": 4.0}
    assert LlamaCppRope.from_gguf("llama", kv).freq_scale == 1.0
    del kv["llama.rope.scaling.factor"]
    assert LlamaCppRope.from_gguf("llama", kv).freq_scale == 0.25
