"""The built-in tiny model's recipe: a short run of it learns, is deterministic, and writes a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from edgerope.builtin import check_model_dir, write_manifest  # noqa: E402
from edgerope.config import ModelConfig  # noqa: E402
from edgerope.errors import CheckpointError  # noqa: E402
from edgerope.model import LlamaModel  # noqa: E402
from edgerope.pretrain import TinyRecipe, pretrain  # noqa: E402

SMALL = TinyRecipe(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, steps=40, batch_size=4, warmup=5)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(tmp_path_factory.mktemp("pre") / "a", SMALL)


def test_short_run_learns_and_writes_a_checkpoint(trained: Path) -> None:
    info = json.loads((trained / "recipe.json").read_text())
    curve = info["loss_every_50_steps"]
    assert info["recipe"]["steps"] == 40 and info["tokens"] == 40 * 4 * 256
    losses = info["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, curve  # starts near ln(1000) ~ 6.9
    cfg = ModelConfig.load(trained)
    assert cfg.max_position_embeddings == 256 and cfg.torch_dtype == "bfloat16" and cfg.tie_word_embeddings
    model = LlamaModel.from_pretrained(trained)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok_cfg = json.loads((trained / "tokenizer_config.json").read_text())
    assert "chat_template" not in tok_cfg  # the model was never trained to chat
    assert json.loads((trained / "generation_config.json").read_text())["eos_token_id"] == cfg.eos_token_id


def test_same_recipe_same_weights(trained: Path, tmp_path: Path) -> None:
    again = pretrain(tmp_path / "b", SMALL)
    assert (again / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    other = pretrain(tmp_path / "c", TinyRecipe(**{**SMALL.to_dict(), "seed": 1, "mixture": SMALL.mixture}))
    assert (other / "model.safetensors").read_bytes() != (trained / "model.safetensors").read_bytes()


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
