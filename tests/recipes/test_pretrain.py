"""The built-in tiny model's recipe: a short run of it learns, is deterministic, and writes a loadable checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgerope.errors import CheckpointError  # noqa: E402
from edgerope.models.builtin import check_model_dir, write_manifest  # noqa: E402
from edgerope.models.config import ModelConfig  # noqa: E402
from edgerope.models.llama import LlamaModel  # noqa: E402
from edgerope.recipes.pretrain import TinyRecipe, pretrain  # noqa: E402

SMALL = TinyRecipe(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, steps=30, batch_size=4, warmup=5, dense=True)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(tmp_path_factory.mktemp("pre") / "a", SMALL)


def test_short_run_learns_and_writes_a_checkpoint(trained: Path) -> None:
    info = json.loads((trained / "recipe.json").read_text())
    curve = info["loss_every_50_steps"]
    assert info["recipe"]["steps"] == 30 and info["tokens"] == 30 * 4 * 256
    losses = info["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, curve  # starts near ln(1000) ~ 6.9
    cfg = ModelConfig.load(trained)
    assert cfg.max_position_embeddings == 256 and cfg.torch_dtype == "bfloat16" and cfg.tie_word_embeddings
    model = LlamaModel.from_pretrained(trained)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok_cfg = json.loads((trained / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_cfg  # the model was never trained to chat
    assert json.loads((trained / "generation_config.json").read_text())["eos_token_id"] == cfg.eos_token_id


def test_same_recipe_same_weights(tmp_path: Path) -> None:
    short = replace(SMALL, steps=3)
    a, b = pretrain(tmp_path / "a", short), pretrain(tmp_path / "b", short)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    other = pretrain(tmp_path / "c", replace(short, seed=1))
    assert (other / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_manifest_catches_a_changed_or_missing_file(trained: Path, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    d.mkdir()
    for f in trained.iterdir():
        if f.is_file():
            (d / f.name).write_bytes(f.read_bytes())
    write_manifest(d)
    assert check_model_dir(d) == d
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        check_model_dir(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        check_model_dir(d)
    (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        check_model_dir(d)


def test_cli_rebuilds_the_builtin_recipe_and_refuses_a_full_folder(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgerope.cli import cli
    from edgerope.models.builtin import TINY_DIR, recipe

    out = tmp_path / "tiny"
    r = CliRunner().invoke(cli, ["pretrain", "-o", str(out), "--steps", "2", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    shipped = recipe(TINY_DIR)["recipe"]
    assert info["recipe"] == {**shipped, "steps": 2}  # the shipped model's recipe, shortened
    assert shipped == TinyRecipe().to_dict()  # `edgerope pretrain` with no options rebuilds the shipped model
    assert check_model_dir(out) == out
    assert ModelConfig.load(out) == ModelConfig.load(TINY_DIR)
    assert (out / "tokenizer.model").read_bytes() == (TINY_DIR / "tokenizer.model").read_bytes()
    again = CliRunner().invoke(cli, ["pretrain", "-o", str(out), "--steps", "2"])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = CliRunner().invoke(cli, ["pretrain", "-o", str(tmp_path / "other"), "--device", "tpu"])
    assert bad.exit_code == 2 and "unknown device" in bad.output and not (tmp_path / "other").exists()
