"""The rope forms of the edge families: per-layer-type ropes (Gemma 3), partial rotary (Phi-4-mini), the arches'
factor tensors, and the function llama.cpp computes on sliding-window layers.

References: transformers 5.24's config classes for what a config means (``Gemma3TextConfig.rope_parameters``,
``Phi3Config``); llama.cpp's loaders as read for docs/llama_cpp.md §12 for which tensors each arch loads and
how ``get_rope_freq_base/scale`` treat sliding layers, checked here through ``LlamaCppRope`` in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgerope.errors import RopeConfigError, UnsupportedRopeError
from edgerope.rope.ggml import LlamaCppRope
from edgerope.rope.gguf_plan import plan_gguf_rope
from edgerope.rope.hf import hf_partial_rotary_factor, parse_hf_layer_ropes
from edgerope.rope.scaling import Default, Linear, Yarn, base_inv_freq, inv_freq

D = 64


def gemma(**raw):
    return parse_hf_layer_ropes({"max_position_embeddings": 2048, **raw}, full_theta=1e6, sliding_theta=1e4)


def test_gemma3_layer_ropes_in_both_forms_mean_what_transformers_reads():
    transformers = pytest.importorskip("transformers")
    v5 = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}  # fmt: skip
    v4 = {"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rope_theta": 1e6, "rope_local_base_freq": 1e4}
    want = {"full_attention": Linear(1e6, 8.0), "sliding_attention": Default(1e4)}
    assert gemma(rope_parameters=v5) == gemma(**v4) == want
    hf = transformers.Gemma3TextConfig(num_hidden_layers=2, **v4).rope_parameters
    assert hf["full_attention"]["rope_type"] == "linear" and hf["sliding_attention"]["rope_theta"] == 1e4
    assert gemma() == {"full_attention": Default(1e6), "sliding_attention": Default(1e4)}  # the class defaults
    # a base missing in one layer type's dict comes from the 4.x keys, as transformers' setdefault does
    only_type = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}
    assert gemma(rope_parameters=only_type, rope_theta=5e5)["full_attention"] == Default(5e5)


@pytest.mark.parametrize(
    "raw,words",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 8.0}}, "exactly the layer types"),
        ({"rope_scaling": {"type": "linear", "factor": 8.0}}, "legacy key 'type'"),
        (
            {
                "rope_parameters": {"full_attention": {}, "sliding_attention": {}},
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            },
            "both rope_parameters and rope_scaling",
        ),  # fmt: skip
        ({"rope_parameters": {"full_attention": {"rope_type": "nope"}, "sliding_attention": {}}}, "unknown rope type"),
    ],
)
def test_gemma3_layer_rope_refusals(raw, words):
    """Forms transformers and llama.cpp's converter read differently are refused, never guessed."""
    with pytest.raises(RopeConfigError, match=words):
        gemma(**raw)


def test_partial_rotary_factor_forms():
    assert hf_partial_rotary_factor({}) == 1.0
    assert hf_partial_rotary_factor({"partial_rotary_factor": 0.75}) == 0.75
    assert hf_partial_rotary_factor({"rope_parameters": {"partial_rotary_factor": 0.75}}) == 0.75
    with pytest.raises(RopeConfigError, match="at the top level but"):
        hf_partial_rotary_factor({"partial_rotary_factor": 0.5, "rope_parameters": {"partial_rotary_factor": 0.75}})


def test_sliding_layers_rope_on_their_own_base_unscaled():
    """gemma3: freq_base_swa (default 10000) and freq_scale_swa = 1 whatever the global scaling."""
    kv = {"gemma3.context_length": 8192, "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
          "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}  # fmt: skip
    full = LlamaCppRope.from_gguf("gemma3", kv, layer="full")
    local = LlamaCppRope.from_gguf("gemma3", kv, layer="sliding")
    np.testing.assert_allclose(full.inv_freq(D), base_inv_freq(1e6, D) / 8.0)
    np.testing.assert_allclose(local.inv_freq(D), base_inv_freq(1e4, D))
    kv["gemma3.rope.freq_base_swa"] = 2e4
    np.testing.assert_allclose(LlamaCppRope.from_gguf("gemma3", kv, layer="sliding").inv_freq(D), base_inv_freq(2e4, D))
    # a runtime base or scale override does not reach the sliding layers either
    rt = LlamaCppRope.from_gguf("gemma3", kv, layer="sliding", runtime={"rope_freq_base": 5.0, "rope_freq_scale": 0.1})
    np.testing.assert_allclose(rt.inv_freq(D), base_inv_freq(2e4, D))
    with pytest.raises(Exception, match="no sliding-window layers"):
        LlamaCppRope.from_gguf("qwen3", {"qwen3.context_length": 1024}, layer="sliding")


def test_yarn_magnitude_reaches_gemma3_sliding_layers():
    """YaRN's ext_factor and attention factor apply to every layer: with the default factor the sliding layers
    keep magnitude 1 (exact), with an explicit one they would be scaled too, so the plan refuses it."""
    yarn = Yarn(theta=1e6, factor=8.0, original_max_position_embeddings=1024)
    plan = plan_gguf_rope(yarn, arch="gemma3", head_dim=D, context_length=8192, sliding_rope=Default(1e4))
    kv = {**plan.kv_values(), "gemma3.attention.sliding_window": 512}
    local = LlamaCppRope.from_gguf("gemma3", kv, layer="sliding")
    assert local.magnitude == pytest.approx(1.0) and local.ext_factor == 1.0
    np.testing.assert_allclose(local.inv_freq(D), inv_freq(Default(1e4), D))
    with pytest.raises(UnsupportedRopeError, match="sliding-window layers") as info:
        plan_gguf_rope(
            Yarn(1e6, 8.0, 1024, attention_factor=1.3), arch="gemma3", head_dim=D, context_length=8192,
            sliding_rope=Default(1e4),
        )  # fmt: skip
    assert f"{1.3 / (1 + 0.1 * math.log(8)):.6g}" in info.value.what  # what the sliding layers would get
    with pytest.raises(UnsupportedRopeError, match="freq_scale_swa is fixed at 1"):
        plan_gguf_rope(Default(1e6), arch="gemma3", head_dim=D, context_length=8192, sliding_rope=Linear(1e4, 2.0))


@pytest.mark.parametrize(
    "arch,ok", [("llama", {"llama3", "longrope"}), ("phi3", {"longrope"}), ("qwen3", set()), ("gemma3", set()),
                ("smollm3", set()), ("qwen2", set())],
)  # fmt: skip
def test_factor_tensors_only_where_the_arch_loads_them(arch, ok):
    from edgerope.rope.scaling import Llama3, LongRope

    ropes = {
        "llama3": Llama3(5e5, 8.0, 1.0, 4.0, 1024),
        "longrope": LongRope(1e4, (1.0,) * (D // 2), (2.0,) * (D // 2), 1024, 8.0),
    }
    for name, rope in ropes.items():
        if name in ok:
            assert plan_gguf_rope(rope, arch=arch, head_dim=D, context_length=8192).tensors
        else:
            with pytest.raises(UnsupportedRopeError, match="per-frequency factor tensors"):
                plan_gguf_rope(rope, arch=arch, head_dim=D, context_length=8192)


def test_phi3_partial_rotary_longrope_plan():
    """Phi-4-mini: the rope covers 96 of 128 channels; factors have 48 entries and dimension_count is 96."""
    from edgerope.rope.scaling import LongRope

    rope = LongRope(1e4, (1.0,) * 48, tuple(1.0 + i / 10 for i in range(48)), 4096, 32.0)
    plan = plan_gguf_rope(rope, arch="phi3", head_dim=96, context_length=131072)
    assert plan.kv["phi3.rope.dimension_count"][0] == 96
    assert plan.tensors["rope_factors_long.weight"].shape == (48,)
