"""LoRA adapters from ``finetune --lora`` to llama.cpp: merged into the base, and as llama.cpp's adapter GGUF.

References, independent of the code under test: peft's own ``PeftModel`` on transformers' ``LlamaForCausalLM``
(the adapter folder must be a standard PEFT adapter, and the merged weights must compute what it computes);
llama.cpp itself running the adapter GGUF on the base GGUF, compared with the merged GGUF (the two paths share
no code past the adapter file); the adapter GGUF's keys read back with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers.training import small

from edgerope.cli import cli
from edgerope.convert.export import convert
from edgerope.convert.lora import (
    ADAPTER_CONFIG,
    convert_merged,
    merge_adapter,
    read_adapter_folder,
    write_adapter_gguf,
)
from edgerope.errors import CheckpointError, ConfigError, GGUFError, RuntimeConfigError
from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel
from edgerope.train.finetune import finetune
from edgerope.train.lora import LoraSettings, add_lora, load_adapter_state, read_adapter

pytest.importorskip("peft")
N_TOKENS = 1000  # > 4 x 256: positions the base never saw, at the adapter's scaled rope


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer_dir, corpus) -> dict[str, Path]:
    """One llama and one qwen2 base (f32, random), each LoRA-fine-tuned for 3 steps at YaRN x4."""
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for model_type in ("llama", "qwen2"):
        base = make_tiny_checkpoint(
            root / f"base-{model_type}", model_type=model_type, tokenizer_dir=tiny_tokenizer_dir
        )
        run = root / f"adapter-{model_type}"
        finetune(base, run, data=[corpus], **small(factor=4, steps=3, lr=3e-2), lora=LoraSettings(rank=4, alpha=8))
        out[model_type], out[f"{model_type}-base"] = run, base
    return out


def _torch_adapted(base: Path, adapter: Path) -> LlamaModel:
    """The base in PyTorch at the adapter's config, with the adapter's LoRA layers loaded (peft)."""
    info = json.loads((adapter / "edgerope_adapter.json").read_text())
    model = LlamaModel.from_pretrained(base, dtype=torch.float32)
    model.set_config(ModelConfig.from_hf(info["config"]))
    add_lora(model, LoraSettings(rank=info["lora"]["rank"], alpha=info["lora"]["alpha"]))
    load_adapter_state(model, read_adapter(adapter), where=str(adapter))
    return model.eval()


def _ids(n: int = N_TOKENS) -> list[int]:
    return [1, *np.random.default_rng(0).integers(3, 1000, n - 1).tolist()]


def test_the_run_writes_an_adapter_folder_and_trains_only_the_adapter(trained) -> None:
    run = trained["llama"]
    names = {p.name for p in run.iterdir()}
    assert {"adapter_model.safetensors", ADAPTER_CONFIG, "edgerope_adapter.json", "tokenizer.model"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    peft_cfg = json.loads((run / ADAPTER_CONFIG).read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8
    assert set(peft_cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    ad = read_adapter_folder(run)
    assert len(ad.pairs) == 2 * 7  # 2 layers x 7 projections
    assert all(np.abs(b).max() > 0 for _, b in ad.pairs.values())  # B moved off its zero start
    cfg = ad.config
    assert cfg.rope_finetuned and cfg.max_position_embeddings == 1024 and cfg.rope.name == "yarn"


def test_merged_checkpoint_computes_the_adapted_model(trained, tmp_path) -> None:
    run, base = trained["llama"], trained["llama-base"]
    merged = merge_adapter(read_adapter_folder(run), tmp_path / "merged")
    x = torch.tensor([_ids(600)])
    with torch.no_grad():
        ref = _torch_adapted(base, run)(x)[0].numpy()
        got = LlamaModel.from_pretrained(merged, dtype=torch.float32)(x)[0].numpy()
        plain = LlamaModel.from_pretrained(base, dtype=torch.float32)
        plain.set_config(ModelConfig.load(merged))
        without = plain(x)[0].numpy()
    assert rel_l2(got, ref) < 1e-5, rel_l2(got, ref)
    assert rel_l2(without, ref) > 1e-2  # the adapter matters: a merge that dropped it would fail above
    assert ModelConfig.load(merged) == read_adapter_folder(run).config.replace(torch_dtype="float32")


def test_peft_and_transformers_read_the_adapter_as_edgerope_merged_it(trained, tmp_path) -> None:
    """The adapter folder loads in PEFT on transformers' Llama (given the fine-tuned config), and computes what the
    merged checkpoint computes in edgerope's model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    run, base = trained["llama"], trained["llama-base"]
    scaled = tmp_path / "scaled-base"
    shutil.copytree(base, scaled)
    info = json.loads((run / "edgerope_adapter.json").read_text())
    (scaled / "config.json").write_text(json.dumps(info["config"]))
    hf = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(scaled, dtype=torch.float32), run).eval()
    merged = merge_adapter(read_adapter_folder(run), tmp_path / "merged")
    x = torch.tensor([_ids(600)])
    with torch.no_grad():
        ref = hf(x).logits[0].numpy()
        got = LlamaModel.from_pretrained(merged, dtype=torch.float32)(x)[0].numpy()
    assert rel_l2(got, ref) < 1e-5, rel_l2(got, ref)


@pytest.mark.llama
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_adapter_gguf_in_llama_cpp_matches_the_merged_gguf(trained, tmp_path, model_type) -> None:
    """llama.cpp: the base GGUF (at the adapter's rope) + the adapter GGUF == the merged GGUF, at every position.

    llama's Q/K rows are permuted in GGUF (the adapter's B rows with them); qwen2's are not.  A negative control
    (the adapter at scale 0) must differ by orders of magnitude more than the tolerance."""
    from edgerope.runtime.runtime import Runtime

    run = trained[model_type]
    merged_gguf = tmp_path / "merged.gguf"
    convert_merged(run, merged_gguf, outtype="f32")
    rep = write_adapter_gguf(run, tmp_path / "adapter.gguf", outtype="f32")
    scaled_base = tmp_path / "scaled-base"  # the base's weights with the adapter's config: its rope, no merge
    shutil.copytree(trained[f"{model_type}-base"], scaled_base)
    (scaled_base / "config.json").write_text(json.dumps(read_adapter_folder(run).config.to_hf()))
    base_gguf = tmp_path / "base.gguf"
    convert(scaled_base, base_gguf, outtype="f32")
    opts = dict(n_ctx=1024, type_k="f32", type_v="f32", flash_attn="off", n_threads=2)
    ids = _ids()
    with Runtime.open(merged_gguf, **opts) as rt:
        ref = rt.logits(ids)
    with Runtime.open(base_gguf, lora=rep.path, **opts) as rt:
        got = rt.logits(ids)
        assert rt.info.lora[0]["rank"] == 4 and rt.info.lora[0]["n_pairs"] == 14
    with Runtime.open(base_gguf, lora=rep.path, lora_scale=0.0, **opts) as rt:
        off = rt.logits(ids)
    assert rel_l2(got, ref) < 1e-5, rel_l2(got, ref)
    assert rel_l2(off, ref) > 1e-3 * 100


def test_adapter_gguf_keys_and_shapes(trained, tmp_path) -> None:
    rep = write_adapter_gguf(trained["llama"], tmp_path / "a.gguf", outtype="f16")
    r = gguf.GGUFReader(rep.path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.type"] == "adapter" and kv["general.architecture"] == "llama"
    assert kv["adapter.type"] == "lora" and kv["adapter.lora.alpha"] == 8.0
    rope = json.loads(kv["edgerope.adapter.rope"])
    assert rope["context_length"] == 1024 and rope["rope_parameters"]["rope_type"] == "yarn"
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (128, 4)  # GGML order: ne0 = in, ne1 = rank
    assert shapes["blk.0.attn_q.weight.lora_b"] == (4, 128)  # ne0 = rank, ne1 = out
    assert shapes["blk.1.ffn_down.weight.lora_a"] == (256, 4)
    assert {t.tensor_type for t in r.tensors} == {gguf.GGMLQuantizationType.F16}
    assert len(shapes) == 28


@pytest.mark.llama
def test_runtime_refuses_an_adapter_it_would_misapply(trained, tmp_path) -> None:
    from edgerope.runtime.runtime import Runtime

    run = trained["llama"]
    adapter = write_adapter_gguf(run, tmp_path / "a.gguf").path
    unscaled = tmp_path / "unscaled.gguf"  # the base as it is: no rope scaling
    convert(trained["llama-base"], unscaled, outtype="f32")
    with pytest.raises(RuntimeConfigError, match="trained at yarn x4.*another rope"):
        Runtime.open(unscaled, n_ctx=256, lora=adapter)
    with pytest.raises(GGUFError, match="not a LoRA adapter"):
        Runtime.open(unscaled, n_ctx=256, lora=unscaled)
    other = tmp_path / "qwen.gguf"
    convert(trained["qwen2-base"], other, outtype="f32")
    with pytest.raises(GGUFError, match="is for 'llama'"):
        Runtime.open(other, n_ctx=256, lora=adapter)


def test_cli_converts_an_adapter_folder_both_ways(trained, tmp_path) -> None:
    run = trained["llama"]
    r = CliRunner().invoke(cli, ["convert", str(run), "-o", str(tmp_path / "m.gguf"), "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    kv = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert kv["llama.rope.scaling.type"] == "yarn" and kv["llama.context_length"] == 1024
    assert kv["general.file_type"] == 7 and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    r = CliRunner().invoke(
        cli, ["convert", str(run), "--lora-gguf", "-o", str(tmp_path / "a.gguf"), "--outtype", "f32"]
    )
    assert r.exit_code == 0, r.output
    assert "LoRA adapter, 14 pairs, rank 4" in r.output and "yarn x4" in r.output
    r = CliRunner().invoke(cli, ["convert", str(trained["llama-base"]), "--lora-gguf", "-o", str(tmp_path / "b.gguf")])
    assert r.exit_code != 0 and "not a LoRA adapter folder" in r.output


def test_adapters_edgerope_cannot_carry_are_refused(trained, tmp_path) -> None:
    run = tmp_path / "dora"
    shutil.copytree(trained["llama"], run)
    cfg = json.loads((run / ADAPTER_CONFIG).read_text())
    (run / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True, "bias": "all"}))
    with pytest.raises(ConfigError, match="(?s)use_dora.*bias is 'all'"):
        read_adapter_folder(run)
    (run / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="another shape"):
        read_adapter_folder(run, base=trained["qwen2-base"])
    meta = json.loads((run / "edgerope_adapter.json").read_text())
    (run / "edgerope_adapter.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match="--base"):
        read_adapter_folder(run)
    assert read_adapter_folder(run, base=trained["llama-base"]).rank == 4
