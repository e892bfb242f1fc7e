"""Every family's PyTorch model against transformers 5.24 (fp32, eager attention), per rope variant, both config forms.

The cells (tests/helpers/families.py) are tiny random checkpoints written by
``edgerope.models.tiny_random``; transformers loads the same folder with ``AutoModelForCausalLM`` (its own
class for the family), once as written (the 5.x ``rope_parameters`` form) and once rewritten into the 4.x
form (``rope_scaling`` + ``rope_theta``, Gemma 3's ``rope_local_base_freq``, Phi-3's top-level
``partial_rotary_factor``).  Logits must agree to 1e-5 of their largest magnitude at every one of 4x the
original context's positions, and a wrong rope must move them far more than that.  Fine-tuning
(``edgerope.train.finetune``) runs on each family with its own rope extension, and the result still reads
back as the family; with ``rope="keep"`` a Phi-3.5 / Phi-4-mini LongRoPE checkpoint trains at its own rope:
its config, and the GGUF ``edgerope.convert`` writes from it (keys, factor tensors), keep that rope, and
llama.cpp (f32 weights and KV) computes the fine-tuned model like PyTorch at 4x the original context.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers.families import BY_ID, CELLS, L0, Cell, T, to_v4
from helpers.training import small

from edgerope.errors import ConfigError
from edgerope.models.base import CausalLM
from edgerope.models.config import ModelConfig
from edgerope.rope.scaling import Default, Linear, LongRope, Yarn, describe

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_transformers")

REL_TOL = 1e-5


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def tokens(n: int = T, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, n), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def rel_max(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def write_v4(path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(to_v4(cfg)))


HF_CELLS = [c for c in CELLS if c.hf]


@pytest.mark.parametrize("form", ["v5", "v4"])
@pytest.mark.parametrize("cell", HF_CELLS, ids=[c.id for c in HF_CELLS])
def test_logits_match_transformers(cell: Cell, form: str, tmp_path, tiny_tokenizer_dir):
    path = cell.make(tmp_path / cell.id, tiny_tokenizer_dir)
    if form == "v4":
        if cell.id == "gemma3-local-linear":
            pytest.skip("transformers 4.x had no scaled rope for Gemma 3's sliding layers")
        write_v4(path)
        assert "rope_parameters" not in json.loads((path / "config.json").read_text())
    ours = CausalLM.from_pretrained(path).eval()
    assert type(ours).model_types == (cell.model_type,) or cell.model_type == "llama"
    hf = hf_model(path)
    assert type(hf).__name__ == ours.config.architecture
    ids = tokens()
    ref, got = logits(hf, ids), logits(ours, ids)
    assert got.shape == ref.shape == (1, T, ours.config.vocab_size)
    err, l2 = rel_max(ref, got), rel_l2(ref, got)
    print(f"PARITY {cell.id} {form} relmax {err:.2e} relL2 {l2:.2e}")
    assert l2 <= REL_TOL and err <= 10 * REL_TOL, (
        f"{cell.id} ({form}): rel L2 {l2:.2e}, max |d| / max |logit| {err:.2e}"
    )

    # the tolerance means something: the same weights without the family's rope are far off
    wrong = {"rope": Default(theta=3.0e3)} if not isinstance(ours.config.rope, Default) else {"rope": Linear(1e4, 4.0)}
    ours.set_config(ours.config.replace(**wrong, rope_local=Default(theta=777.0) if ours.config.rope_local else None))
    assert rel_max(ref, logits(ours, ids)) > 100 * REL_TOL


def test_transformers_refuses_phi3_yarn_which_edgerope_computes(tmp_path, tiny_tokenizer_dir):
    """transformers 5.24 renames Phi-3's rope_type yarn to longrope and then misses the factor lists; edgerope's
    model computes YaRN on the rotating 75% of each head (llama.cpp agrees: tests/convert/test_families.py)."""
    cell = next(c for c in CELLS if c.id == "phi4-yarn")
    path = cell.make(tmp_path / "p", tiny_tokenizer_dir)
    with pytest.raises(KeyError, match="long_factor"):
        hf_model(path)
    ours = CausalLM.from_pretrained(path)
    assert ours.config.rope == Yarn(theta=1e4, factor=4.0, original_max_position_embeddings=L0)
    assert ours.config.rotary_dim == 24 and ours.rotary.head_dim == 24


def test_family_modules_mirror_hf_names(tmp_path, tiny_tokenizer_dir):
    """LoRA targets and strict loading rely on HF's module names, fused ones included."""
    names = {}
    for cid in ("qwen3-default", "gemma3-default", "phi3-default", "smollm3-default"):
        model = CausalLM.from_pretrained(next(c for c in CELLS if c.id == cid).make(tmp_path / cid, tiny_tokenizer_dir))
        names[cid] = {n.split("layers.0.")[1] for n, _ in model.named_modules() if "layers.0." in n}
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} <= names["qwen3-default"]
    assert {"self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj"} <= names["qwen3-default"]
    assert {"pre_feedforward_layernorm", "post_feedforward_layernorm", "self_attn.q_norm"} <= names["gemma3-default"]
    assert {"self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj", "self_attn.o_proj"} <= names["phi3-default"]
    assert {"self_attn.q_proj", "mlp.down_proj"} <= names["smollm3-default"]


def test_a_family_class_refuses_another_familys_config(tmp_path, tiny_tokenizer_dir):
    from edgerope.models.llama import LlamaModel
    from edgerope.models.qwen3 import Qwen3Model

    path = next(c for c in CELLS if c.id == "gemma3-default").make(tmp_path / "g", tiny_tokenizer_dir)
    with pytest.raises(ConfigError, match="Qwen3Model cannot build a 'gemma3_text' model"):
        Qwen3Model.from_pretrained(path)
    assert type(LlamaModel.from_pretrained(path)).__name__ == "Gemma3Model"  # the Llama-only entry point dispatches
    model = CausalLM.from_pretrained(path)
    with pytest.raises(ConfigError, match="rope, the context length and provenance only"):
        model.set_config(model.config.replace(hidden_size=256))


# --------------------------------------------------------------------------- fine-tuning with the family's rope

FINETUNE = {
    "llama3-default-tied": ("yarn", {}),
    "qwen3-default": ("yarn", {}),
    "gemma3-default": ("linear", {}),  # Gemma 3's own extension: linear on the global layers only
    "phi3-default": ("yarn", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}}),
    "smollm3-default": ("yarn", {}),
}  # fmt: skip


@pytest.mark.parametrize("cid", list(FINETUNE))
def test_finetune_runs_on_each_family(cid, corpus, tmp_path, tiny_tokenizer_dir):
    from edgerope.train.finetune import finetune

    rope, over = FINETUNE[cid]
    cell = next(c for c in CELLS if c.id == cid)
    src = cell.make(tmp_path / "src", tiny_tokenizer_dir, max_position_embeddings=L0, **over)
    before = ModelConfig.load(src)
    rep = finetune(src, tmp_path / "out", data=[corpus], **small(rope=rope, factor=4, steps=3, seq_len=2 * L0))
    assert len(rep.losses) == 3 and all(loss == loss for loss in rep.losses)
    after = ModelConfig.load(tmp_path / "out")
    assert after.model_type == before.model_type and after.rope_finetuned is True
    assert after.max_position_embeddings == 4 * L0
    want = Linear(before.rope.theta, 4.0) if rope == "linear" else Yarn(before.rope.theta, 4.0, L0)
    assert after.rope == want
    assert after.rope_local == before.rope_local  # Gemma 3's sliding layers keep their rope
    assert after.partial_rotary_factor == before.partial_rotary_factor
    assert after.no_rope_layers == before.no_rope_layers
    model = CausalLM.from_pretrained(tmp_path / "out")
    src_model = CausalLM.from_pretrained(src)
    assert any(not torch.equal(v, src_model.state_dict()[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- fine-tuning at the checkpoint's own rope


def as_shipped(path) -> None:
    """Rewrite config.json the way Phi-3.5-mini and Phi-4-mini ship it (transformers 4.x form): ``rope_scaling``
    holding the type and the two factor lists only (no factor: transformers takes max_pos / original),
    ``rope_theta``, ``original_max_position_embeddings`` and ``partial_rotary_factor`` at the top level."""
    cfg = to_v4(json.loads((path / "config.json").read_text()))
    lists = {k: cfg["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    cfg["rope_scaling"] = {"type": "longrope", **lists}
    assert cfg["original_max_position_embeddings"] == L0 and "rope_parameters" not in cfg
    (path / "config.json").write_text(json.dumps(cfg))


KEEP_CASES = [("phi3-longrope", "shipped"), ("phi4-longrope", "shipped"), ("phi4-longrope", "v5")]


@pytest.fixture(scope="module", params=KEEP_CASES, ids=[f"{c}-{f}" for c, f in KEEP_CASES])
def kept(request, corpus, tiny_tokenizer_dir, tmp_path_factory):
    """(source, output, report) of a few steps of ``finetune(rope="keep")`` on a LongRoPE cell whose
    max_position_embeddings is 4x its original context: rows of that length train the long factors."""
    from edgerope.train.finetune import finetune

    cid, form = request.param
    root = tmp_path_factory.mktemp(f"keep-{cid}-{form}")
    src = BY_ID[cid].make(root / "src", tiny_tokenizer_dir)
    if form == "shipped":
        as_shipped(src)
    rep = finetune(src, root / "out", data=[corpus], **small(rope="keep", factor=None, seq_len=None, steps=4))
    return src, root / "out", rep


def test_finetune_keeps_the_checkpoints_longrope(kept):
    src, out, rep = kept
    before = ModelConfig.load(src)
    assert isinstance(before.rope, LongRope) and before.rope.original_max_position_embeddings == L0
    assert rep.seq_len == rep.target_context == T and rep.original_context == L0  # rows past L0: long factors
    assert rep.rope == describe(before.rope)
    assert len(rep.losses) == 4 and all(math.isfinite(loss) for loss in rep.losses)
    model, src_model = CausalLM.from_pretrained(out), CausalLM.from_pretrained(src)
    assert any(not torch.equal(v, src_model.state_dict()[k]) for k, v in model.state_dict().items())

    after = ModelConfig.load(out)
    assert after == before.replace(rope_finetuned=True)  # the rope, context, partial rotary, tying: all kept
    raw_in, raw_out = (json.loads((p / "config.json").read_text()) for p in (src, out))
    rope_in = raw_in.get("rope_parameters") or raw_in["rope_scaling"]
    rope_out = raw_out["rope_parameters"]
    for k in ("short_factor", "long_factor"):
        assert rope_out[k] == rope_in[k]
    if "rope_parameters" in raw_in:
        assert rope_out == rope_in
    for k in ("original_max_position_embeddings", "max_position_embeddings", "tie_word_embeddings"):
        assert raw_out[k] == raw_in[k]
    partial = raw_in.get("partial_rotary_factor", rope_in.get("partial_rotary_factor"))
    assert rope_out.get("partial_rotary_factor") == partial
    assert raw_out["edgerope"]["rope_finetuned"] is True


def _gguf_rope(path):
    """(the rope and context metadata, the rope factor tensors: LongRoPE's, llama3's ``rope_freqs``) of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in reader.fields.items() if ".rope." in k or k.endswith(".context_length")}
    factors = {t.name: np.array(t.data) for t in reader.tensors if t.name.startswith("rope_")}
    return kv, factors


def test_kept_longrope_converts_like_the_original(kept, tmp_path):
    from edgerope.convert.export import convert

    src, out, _ = kept
    kv_in, factors_in = _gguf_rope(convert(src, tmp_path / "src.gguf", outtype="f32").path)
    kv_out, factors_out = _gguf_rope(convert(out, tmp_path / "out.gguf", outtype="f32").path)
    assert kv_out.pop("phi3.rope.scaling.finetuned") is True and "phi3.rope.scaling.finetuned" not in kv_in
    assert kv_out == kv_in
    assert kv_in["phi3.rope.scaling.type"] == "longrope" and kv_in["phi3.rope.scaling.original_context_length"] == L0
    assert kv_in["phi3.context_length"] == T
    assert set(factors_in) == {"rope_factors_long.weight", "rope_factors_short.weight"} == set(factors_out)
    for name, values in factors_in.items():
        np.testing.assert_array_equal(factors_out[name], values)
    rope = ModelConfig.load(src).rope
    np.testing.assert_allclose(factors_out["rope_factors_long.weight"], rope.long_factor, rtol=1e-7)


@pytest.mark.llama
def test_kept_longrope_runs_in_llama_cpp_like_pytorch(kept, tmp_path):
    """The fine-tuned GGUF in llama.cpp (f32 weights and KV) against the fine-tuned PyTorch model at 4x the
    original context, where both pick the long factors; the tolerance of tests/convert/test_export_families.py."""
    pytest.importorskip("llama_cpp")
    from edgerope.convert.export import convert
    from edgerope.evaluation.parity import check_parity, reference_logits

    src, out, _ = kept
    ids = [2] + np.random.default_rng(0).integers(3, 1000, size=T - 1).tolist()
    ref = reference_logits(out, ids)
    path = convert(out, tmp_path / "out.gguf", outtype="f32").path
    (res,) = check_parity(out, path, tokens=ids, original_context=L0, reference=ref)
    print(f"PARITY keep {out.parent.name}\n{res.table()}")
    assert res.n_positions == T == 4 * L0 and res.kv == "f32"
    assert res.rel_l2 <= 1e-4, res.table()
    # the tolerance means something: the checkpoint before fine-tuning is far from the fine-tuned model
    (base,) = check_parity(out, convert(src, tmp_path / "src.gguf", outtype="f32").path, tokens=ids,
                           original_context=L0, reference=ref)  # fmt: skip
    print(f"before fine-tuning: rel L2 {base.rel_l2:.2e}")
    assert base.rel_l2 > 100 * 1e-4, base.table()


@pytest.mark.parametrize("cid", ["llama3-llama3-tied", "qwen3-yarn", "gemma3-linear", "smollm3-yarn"])
def test_finetune_keeps_every_familys_scaled_rope(cid, corpus, tmp_path, tiny_tokenizer_dir):
    """rope="keep" on the other scaled cells: llama3 bands (``rope_freqs``), YaRN, Gemma 3's two ropes, SmolLM3's
    NoPE layers all come out as they went in, config and GGUF."""
    from edgerope.convert.export import convert
    from edgerope.train.finetune import finetune

    src = BY_ID[cid].make(tmp_path / "src", tiny_tokenizer_dir)
    rep = finetune(src, tmp_path / "out", data=[corpus], **small(rope="keep", factor=None, seq_len=2 * L0, steps=2))
    assert all(math.isfinite(loss) for loss in rep.losses) and rep.target_context == T
    assert ModelConfig.load(tmp_path / "out") == ModelConfig.load(src).replace(rope_finetuned=True)
    kv_in, factors_in = _gguf_rope(convert(src, tmp_path / "src.gguf", outtype="f32").path)
    kv_out, factors_out = _gguf_rope(convert(tmp_path / "out", tmp_path / "out.gguf", outtype="f32").path)
    kv_out.pop(next(k for k in kv_out if k.endswith(".rope.scaling.finetuned")))
    assert kv_out == kv_in
    assert factors_out.keys() == factors_in.keys() and (
        cid != "llama3-llama3-tied" or "rope_freqs.weight" in factors_in
    )
    for name, values in factors_in.items():
        np.testing.assert_array_equal(factors_out[name], values)
