"""edgerope.models.llama against transformers 5.24.0 (fp32, eager attention) on tiny random models.

Every model here is made by transformers, re-initialised with a wide spread
(normal, std 0.2: the default 0.02 init leaves attention nearly uniform and
hides rope bugs), saved with ``save_pretrained`` and loaded with
``LlamaModel.from_pretrained``.  Logits must agree to 1e-4 (max abs) at every
position up to 8x the original context; each parity test also checks that a
wrong rope moves the logits by far more than that, so the tolerance means
something.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edgerope.errors import CheckpointError, OutputError
from edgerope.evaluation.parity import bucket_edges
from edgerope.models.llama import ROTATION, LlamaModel, RotaryEmbedding, apply_rope
from edgerope.rope.hf import parse_hf_rope
from edgerope.rope.scaling import Default, DynamicNtk, Linear, describe, inv_freq

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_transformers")
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TOL = 1e-4
L0 = 64  # original (pre-training) context of the rope-scaled cases
T = 512  # 8 x L0
HD = 64
VOCAB = 300
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def hf_model(arch: str = "llama", rope: dict | None = None, *, max_pos: int = T, seed: int = 0, heads=(2, 1), **extra):
    """A tiny HF causal LM (hidden 128, 2 layers, 2 heads of 64 sharing 1 KV head) with wide random weights."""
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=2 * HD,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        head_dim=2 * HD // heads[0],
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope or {"rope_type": "default", "rope_theta": 10000.0}),
        **extra,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def our_logits(model: LlamaModel, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw)


def error_report(ref: torch.Tensor, got: torch.Tensor, *, original: int = L0) -> str:
    """Max and mean abs error per position bucket [0, L0), [L0, 2 L0), [2 L0, 4 L0), ..."""
    err = (got - ref).abs().amax(dim=(0, 2)) if ref.dim() == 3 else (got - ref).abs().amax(dim=-1)  # (T,)
    mean = (got - ref).abs().mean(dim=(0, 2)) if ref.dim() == 3 else (got - ref).abs().mean(dim=-1)
    edges = bucket_edges(err.shape[0], original)
    lines = [
        f"  positions {lo:>4}-{hi - 1:<4} max {err[lo:hi].max():.3e}  mean {mean[lo:hi].mean():.3e}"
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    return "\n".join(lines)


def assert_logits_close(ref: torch.Tensor, got: torch.Tensor, *, tol: float = TOL, what: str = "") -> None:
    diff = float((got - ref).abs().max())
    assert diff <= tol, (
        f"{what} logits differ from transformers: max |d| {diff:.3e} > {tol:g}\n{error_report(ref, got)}"
    )


def load_ours(hf, tmp_path, **kw) -> LlamaModel:
    hf.save_pretrained(tmp_path)
    return LlamaModel.from_pretrained(tmp_path, **kw).eval()


def yarn(**extra) -> dict:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": L0, **extra}


LONG_FACTORS = [1.0 + 0.25 * i for i in range(HD // 2)]
SHORT_FACTORS = [1.0 + 0.02 * i for i in range(HD // 2)]
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": SHORT_FACTORS,
    "long_factor": LONG_FACTORS,
    "original_max_position_embeddings": L0,
}

# (id, HF rope_parameters, max_position_embeddings, sequence length)
PARITY_CASES = [
    ("default", {"rope_type": "default", "rope_theta": 10000.0}, T, T),
    ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0}, T, T),
    ("ntk-base", {"rope_type": "default", "rope_theta": 10000.0 * 8.0 ** (HD / (HD - 2))}, T, T),
    ("yarn", yarn(), T, T),
    ("yarn-attention-factor", yarn(attention_factor=1.5), T, T),
    ("yarn-mscale-pair", yarn(mscale=1.0, mscale_all_dim=0.5), T, T),
    ("yarn-betas", yarn(beta_fast=16.0, beta_slow=2.0), T, T),
    (
        "llama3",
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": L0,
        },
        T,
        T,
    ),
    ("longrope-short", LONGROPE, T, L0),
    ("longrope-long", LONGROPE, T, T),
    ("longrope-attention-factor", {**LONGROPE, "attention_factor": 1.3}, T, T),
    ("dynamic-short", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 8.0}, L0, L0 // 2),
    ("dynamic-2x", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 8.0}, L0, 2 * L0),
    ("dynamic-8x", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 8.0}, L0, T),
]


@pytest.mark.parametrize("rope,max_pos,length", [c[1:] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_llama_logits_match_transformers(rope, max_pos, length, tmp_path):
    """Each rope variant, up to 8x the original context (docs/llama_cpp.md §4.2-§4.3 is what HF computes)."""
    hf = hf_model("llama", rope, max_pos=max_pos)
    ours = load_ours(hf, tmp_path)
    ids = tokens(length=length)
    ref = hf_logits(hf, ids)
    got = our_logits(ours, ids)
    assert got.shape == (2, length, VOCAB) and got.dtype == torch.float32
    assert_logits_close(ref, got, what=describe(ours.config.rope))

    # the tolerance is meaningful: the same weights with another rope are far off
    other = Linear(theta=10000.0, factor=2.0) if rope["rope_type"] == "default" else Default(theta=10000.0)
    ours.rotary = RotaryEmbedding(other, head_dim=HD)
    if ours.config.rope != parse_hf_rope({"max_position_embeddings": max_pos, "rope_parameters": rope}):
        pytest.fail("config.json did not round-trip the rope")
    if rope["rope_type"] != "dynamic" or length > max_pos:
        assert float((our_logits(ours, ids) - ref).abs().max()) > 100 * TOL


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("rope", [yarn(), LONGROPE], ids=["yarn", "longrope"])
def test_mistral_and_qwen2_logits_match_transformers(arch, rope, tmp_path):
    """Qwen2 carries q/k/v biases; both use GQA and the HF layout."""
    hf = hf_model(arch, rope)
    ours = load_ours(hf, tmp_path)
    if arch == "qwen2":
        assert ours.model.layers[0].self_attn.q_proj.bias is not None
        assert ours.model.layers[0].self_attn.o_proj.bias is None
    ids = tokens()
    assert_logits_close(hf_logits(hf, ids), our_logits(ours, ids), what=arch)


def test_gqa_head_grouping_matches_transformers(tmp_path):
    """4 query heads on 2 KV heads: query heads 0,1 read KV head 0 and 2,3 read KV head 1 (not 0,1,0,1)."""
    hf = hf_model("llama", {"rope_type": "default", "rope_theta": 10000.0}, heads=(4, 2))
    ours = load_ours(hf, tmp_path)
    ids = tokens(length=128)
    assert_logits_close(hf_logits(hf, ids), our_logits(ours, ids), what="GQA 4/2")


def test_mistral_sliding_window_matches_transformers(tmp_path):
    hf = hf_model("mistral", yarn(), sliding_window=100)
    ours = load_ours(hf, tmp_path)
    assert ours.config.sliding_window == 100
    ids = tokens(length=256)
    assert_logits_close(hf_logits(hf, ids), our_logits(ours, ids), what="sliding window 100")


def test_llama_attention_and_mlp_bias(tmp_path):
    hf = hf_model("llama", yarn(), attention_bias=True, mlp_bias=True)
    ours = load_ours(hf, tmp_path)
    assert ours.model.layers[1].self_attn.o_proj.bias is not None and ours.model.layers[1].mlp.up_proj.bias is not None
    ids = tokens()
    assert_logits_close(hf_logits(hf, ids), our_logits(ours, ids))


def test_tied_embeddings_load_and_save(tmp_path):
    """Tied checkpoints have no lm_head.weight; the loaded head is the embedding; a re-save loads in HF."""
    hf = hf_model("qwen2", yarn(), tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    ours = LlamaModel.from_pretrained(tmp_path / "hf").eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = tokens()
    ref = hf_logits(hf, ids)
    assert_logits_close(ref, our_logits(ours, ids))

    ours.save_pretrained(tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert_logits_close(ref, hf_logits(back, ids), what="HF reloading edgerope's save")


def test_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint loads as bf16 (dtype None) or upcast to f32, then equals HF on the same rounded weights."""
    hf = hf_model("llama", yarn())
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the bf16-rounded weights, still computed in f32
    ids = tokens()
    ref = hf_logits(hf, ids)
    # (not hf.float() after hf.bfloat16(): that also rounds HF's own inv_freq buffer to bf16)
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(iter(load_file(tmp_path / "model.safetensors").values())).dtype == torch.bfloat16
    native = LlamaModel.from_pretrained(tmp_path).eval()
    assert {p.dtype for p in native.parameters()} == {torch.bfloat16}
    f32 = LlamaModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert {p.dtype for p in f32.parameters()} == {torch.float32}
    assert_logits_close(ref, our_logits(f32, ids), what="bf16 checkpoint in f32")
    low = our_logits(native, ids)
    assert low.dtype == torch.float32  # logits are returned in float32
    assert float((low - ref).abs().max()) < 0.1 * float(ref.abs().max())  # bf16 compute: close, not exact


def test_sharded_checkpoint_loads_every_shard(tmp_path):
    hf = hf_model("llama", yarn())
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ours = LlamaModel.from_pretrained(tmp_path).eval()
    ids = tokens()
    assert_logits_close(hf_logits(hf, ids), our_logits(ours, ids))


def test_position_ids_jump_like_pose(tmp_path):
    """Non-contiguous position ids (PoSE) follow HF, including LongRoPE's long set chosen from max(position_ids)+1."""
    hf = hf_model("llama", LONGROPE)
    ours = load_ours(hf, tmp_path)
    ids = tokens(length=48)
    pos = torch.cat([torch.arange(24), torch.arange(300, 324)])[None].expand(2, -1)  # (B, 48), max 323 > L0
    ref = hf_logits(hf, ids, position_ids=pos)
    got = our_logits(ours, ids, position_ids=pos)
    assert_logits_close(ref, got)
    assert float((our_logits(ours, ids) - got).abs().max()) > 100 * TOL  # the ids mattered


def test_left_padding_attention_mask(tmp_path):
    hf = hf_model("llama", yarn())
    ours = load_ours(hf, tmp_path)
    ids = tokens(length=96)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # row 1 is left-padded by 10
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions count real tokens only
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=pos)
    got = our_logits(ours, ids, attention_mask=mask, position_ids=pos)
    keep = mask.bool()
    assert torch.isfinite(got).all()
    assert_logits_close(ref[keep], got[keep])
    unpadded = our_logits(ours, ids[1:, 10:])  # the padded row equals the same tokens without padding
    assert_logits_close(unpadded[0], got[1, 10:], what="padded vs unpadded")


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    ours = load_ours(hf_model("llama", yarn()), tmp_path).train()
    ids = tokens(length=128)
    grads = []
    for flag in (False, True):
        ours.gradient_checkpointing = flag
        ours.zero_grad()
        ours(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rotation_convention_is_neox():
    """Channel i rotates with channel i + d/2 (HF rotate_half), angle p * inv_freq[i] (docs/llama_cpp.md §3.1)."""
    assert ROTATION == "neox"
    rope = Default(theta=10000.0)
    rotary = RotaryEmbedding(rope, head_dim=8)
    p, i = 5, 1
    cos, sin = rotary(torch.tensor([[p]]), dtype=torch.float64)  # (1, 1, 8)
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    x[..., i] = 1.0
    y = apply_rope(x, cos, sin)[0, 0, 0]
    angle = p * inv_freq(rope, 8)[i]
    expect = torch.zeros(8, dtype=torch.float64)
    expect[i], expect[i + 4] = math.cos(angle), math.sin(angle)
    torch.testing.assert_close(y, expect, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- strict loading and saving


@pytest.fixture
def saved(tmp_path):
    hf = hf_model("llama", yarn())
    hf.save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_missing_tensor_raises(saved):
    path, tensors = saved
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.down_proj\.weight"):
        LlamaModel.from_pretrained(path)


def test_untied_model_without_lm_head_raises(saved):
    path, tensors = saved
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: lm_head.weight"):
        LlamaModel.from_pretrained(path)


def test_unexpected_tensor_raises(saved):
    path, tensors = saved
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(HD)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_norm\.weight"):
        LlamaModel.from_pretrained(path)


def test_shape_mismatch_raises(saved):
    path, _ = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"shape mismatches: .*mlp\.down_proj\.weight \(128, 192\) \(config needs \(128, 200\)\)"
    ):
        LlamaModel.from_pretrained(path)


def test_tied_checkpoint_with_lm_head(saved):
    """tie_word_embeddings with an lm_head.weight: fine when it equals the embedding, an error otherwise."""
    path, tensors = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        LlamaModel.from_pretrained(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors")
    ours = LlamaModel.from_pretrained(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_rotary_inv_freq_buffers_are_ignored(saved):
    path, tensors = saved
    tensors["model.rotary_emb.inv_freq"] = torch.ones(HD // 2)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HD // 2)
    save_file(tensors, path / "model.safetensors")
    LlamaModel.from_pretrained(path)


def test_non_float_tensor_raises(saved):
    path, tensors = saved
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unsupported dtypes"):
        LlamaModel.from_pretrained(path)


def test_missing_and_corrupt_files_raise(tmp_path):
    hf = hf_model("llama", yarn())
    hf.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        LlamaModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors"):
        LlamaModel.from_pretrained(tmp_path)


def test_sharded_index_naming_a_missing_shard_raises(tmp_path):
    hf = hf_model("llama", yarn())
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        LlamaModel.from_pretrained(tmp_path)


def test_save_pretrained_round_trip_is_atomic_and_refuses_overwrite(tmp_path):
    hf = hf_model("llama", LONGROPE)
    ours = load_ours(hf, tmp_path / "hf")
    out = ours.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    again = LlamaModel.from_pretrained(out).eval()
    assert again.config == ours.config
    ids = tokens()
    assert torch.equal(our_logits(again, ids), our_logits(ours, ids))
    back = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_logits_close(hf_logits(hf, ids), hf_logits(back, ids), what="HF reloading edgerope's save")

    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        ours.save_pretrained(out)
    assert (out / "model.safetensors").read_bytes() == before
    ours.save_pretrained(out, force=True)


def test_state_dict_names_are_hf_names(tmp_path):
    hf = hf_model("qwen2", yarn())
    ours = load_ours(hf, tmp_path)
    assert set(ours.state_dict()) == set(hf.state_dict())
    for name, tensor in hf.state_dict().items():
        assert tuple(ours.state_dict()[name].shape) == tuple(tensor.shape), name


def test_dynamic_recomputes_per_forward_from_the_largest_position(tmp_path):
    """Dynamic NTK's base follows max(position_ids)+1 of each forward (HF, fresh model; docs/llama_cpp.md §4.3)."""
    rope = DynamicNtk(theta=10000.0, factor=8.0, max_position_embeddings=L0)
    rotary = RotaryEmbedding(rope, head_dim=HD)
    for length in (L0 // 2, L0, 3 * L0, T):
        want = inv_freq(rope, HD, seq_len=length).astype(np.float32)
        assert np.array_equal(rotary.inv_freq(length).numpy(), want)
    assert np.array_equal(rotary.inv_freq(L0 // 2).numpy(), inv_freq(Default(10000.0), HD).astype(np.float32))
