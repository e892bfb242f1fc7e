"""config.json and tokenizer files with wrongly typed fields: one clean error naming every field, no traceback.

References: what transformers' strict config classes accept (``"4"``, ``1.9`` and ``2.0`` are not integers,
``"false"`` and ``0`` are not booleans); the family defaults are transformers 5.24's config-class defaults,
checked here against the classes themselves.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers.families import BY_ID

from edgerope.cli import cli
from edgerope.convert.export import convert
from edgerope.convert.vocab import load_vocab
from edgerope.errors import ConfigError, TokenizerError
from edgerope.models.config import FAMILIES, ModelConfig

BASE = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("num_key_value_heads", "abc", "'num_key_value_heads' must be a positive integer, got 'abc'"),
        ("num_key_value_heads", 1.9, "'num_key_value_heads' must be a positive integer, got 1.9"),
        ("num_key_value_heads", 2.0, "got 2.0"),  # no silent truncation or float ids
        ("hidden_size", True, "'hidden_size' must be a positive integer, got True"),
        ("vocab_size", -3, "'vocab_size' must be a positive integer, got -3"),
        ("rms_norm_eps", "1e-6", "'rms_norm_eps' must be a positive number, got '1e-6'"),
        ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false, got 'false'"),
        ("tie_word_embeddings", 0, "must be true or false, got 0"),
        ("bos_token_id", 1.5, "'bos_token_id' must be a token id"),
        ("eos_token_id", ["2"], "'eos_token_id' must be a token id (integer >= 0) or a list of them"),
        ("hidden_act", "gelu", "'hidden_act' 'gelu' is not supported"),
        ("hidden_act", 7, "'hidden_act' must be a string, got 7"),
        ("edgerope", {"rope_finetuned": "yes"}, "'edgerope.rope_finetuned' must be true or false"),
        ("dtype", ["float32"], "'dtype' must be a string"),
        ("architectures", "LlamaForCausalLM", None),  # model_type decides; a bad list with it is not read
    ],
)
def test_wrongly_typed_fields_name_the_field(field, value, words):
    raw = {**BASE, field: value}
    if words is None:
        assert ModelConfig.from_hf(raw).model_type == "llama"
        return
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(raw, where="cfg.json")
    assert words in info.value.what and info.value.where == "cfg.json"


def test_every_problem_is_reported_at_once():
    raw = {**BASE, "num_key_value_heads": "abc", "rms_norm_eps": "x", "max_position_embeddings": 0.5}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(raw)
    for name in ("num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
        assert f"'{name}'" in info.value.what


@pytest.mark.parametrize(
    "model_type,extra,words",
    [
        ("gemma3_text", {"query_pre_attn_scalar": 22.5}, "'query_pre_attn_scalar' must be a positive integer"),
        ("gemma3_text", {"layer_types": ["sliding_attention"]}, "'layer_types' has 1 entries for 2 layers"),
        ("gemma3_text", {"layer_types": ["sliding", "full"]}, "'layer_types' must be a list of"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
        ("gemma3_text", {"rope_parameters": {"rope_type": "linear", "factor": 8.0}}, "exactly the layer types"),
        ("gemma3_text", {"rope_scaling": {"type": "linear", "factor": 8.0}}, "legacy key 'type'"),
        ("smollm3", {"no_rope_layers": [1, 2]}, "'no_rope_layers' must be a list of 0 / 1"),
        ("smollm3", {"no_rope_layers": [1]}, "'no_rope_layers' has 1 entries for 2 layers"),
        ("phi3", {"partial_rotary_factor": 1.5}, "partial_rotary_factor must be in (0, 1]"),
        ("phi3", {"partial_rotary_factor": 0.1}, "must be a positive even number"),
        ("qwen3", {"use_sliding_window": "yes"}, "'use_sliding_window' must be true or false"),
        ("llama", {"partial_rotary_factor": 0.5}, "partial rotary embeddings"),
        ("gemma3", {}, "multimodal Gemma 3"),
    ],
)
def test_family_fields_are_typed(model_type, extra, words):
    raw = {**BASE, "model_type": model_type, "architectures": [], **extra}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(raw)
    assert words in info.value.message


def test_family_defaults_are_transformers_defaults():
    transformers = pytest.importorskip("transformers")
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
        "smollm3": transformers.SmolLM3Config,
    }
    for model_type, cls in classes.items():
        hf = cls(**{k: v for k, v in BASE.items() if k != "model_type"}, pad_token_id=0)
        ours = ModelConfig.from_hf({**BASE, "model_type": model_type})
        fam = FAMILIES[model_type]
        assert ours.tie_word_embeddings == hf.tie_word_embeddings, model_type
        assert ours.rms_norm_eps == hf.rms_norm_eps, model_type
        assert ours.head_dim == (getattr(hf, "head_dim", None) or 64 // 4), model_type
        rope = hf.rope_parameters.get("full_attention", hf.rope_parameters)
        assert ours.rope.theta == rope["rope_theta"] == fam.default_theta, model_type
        if model_type == "gemma3_text":
            assert ours.rope_local.theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
            assert list(ours.layer_types) == hf.layer_types and ours.sliding_window == hf.sliding_window
            assert ours.query_pre_attn_scalar == hf.query_pre_attn_scalar
        if model_type == "smollm3":
            assert list(ours.no_rope_layers) == hf.no_rope_layers
        assert ours.to_hf()["model_type"] == model_type and ModelConfig.from_hf(ours.to_hf()) == ours


# --------------------------------------------------------------------------- tokenizer files


@pytest.mark.parametrize(
    "name,content,words",
    [
        ("tokenizer_config.json", [1, 2], "tokenizer_config.json must hold an object, got list"),
        ("tokenizer_config.json", {"add_bos_token": "yes"}, "'add_bos_token' must be true or false"),
        ("tokenizer_config.json", {"bos_token": 5}, "'bos_token' must be a string"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"12.5": {"content": "<x>"}}}, "decimal token ids"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"1000": {"content": 3}}}, "'added_tokens_decoder.1000'"),
        ("tokenizer_config.json", {"added_tokens_decoder": {"1000": {"content": "<x>", "special": "y"}}}, ".special'"),
        ("tokenizer_config.json", {"chat_template": {"a": 1}}, "'chat_template' must be a string or a list"),
        ("added_tokens.json", {"<x>": "1000"}, "'<x>' must be a token id"),
        ("added_tokens.json", ["<x>"], "added_tokens.json must hold an object"),
        ("special_tokens_map.json", "bos", "special_tokens_map.json must hold an object"),
        ("chat_template.json", {"chat_template": 3}, "chat_template"),
    ],
)
def test_wrongly_typed_tokenizer_files_name_the_field(make_tiny, name, content, words):
    hf = make_tiny(hidden_size=64, num_hidden_layers=1, intermediate_size=64)
    (hf / name).write_text(json.dumps(content))
    with pytest.raises(TokenizerError) as info:
        load_vocab(hf, n_embd_rows=1000)
    assert words in info.value.what and name in info.value.where
    code, out = _cli_convert(hf)
    assert code == 2 and "Traceback" not in out and words in out


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t["model"].update(vocab={"a": "1"}), "'model.vocab['a']' must be a token id"),
        (lambda t: t["model"].update(merges=[["a", "b", "c"]]), "'model.merges' must be"),
        (lambda t: t.update(added_tokens=[{"id": "7", "content": "<x>"}]), "'added_tokens[0]'"),
        (lambda t: t.update(model=[]), "'model' must be an object"),
        (lambda t: t.update(post_processor=["x"]), "'post_processor'"),
    ],
)
def test_wrongly_typed_tokenizer_json(make_tiny, tmp_path, edit, words):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello world"] * 10, trainer=trainer)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    data = json.loads((d / "tokenizer.json").read_text())
    edit(data)
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError) as info:
        load_vocab(d, n_embd_rows=400)
    assert words in info.value.what


def test_bad_config_through_convert_is_a_clean_exit_2(tmp_path, tiny_tokenizer_dir):
    hf = BY_ID["qwen3-default"].make(tmp_path / "q", tiny_tokenizer_dir)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(num_key_value_heads="abc", head_dim=47.5)
    (hf / "config.json").write_text(json.dumps(cfg))
    code, out = _cli_convert(hf)
    assert code == 2 and "Traceback" not in out
    assert "'num_key_value_heads' must be a positive integer, got 'abc'" in out and "'head_dim'" in out
    with pytest.raises(ConfigError):
        convert(hf, tmp_path / "m.gguf")


def _cli_convert(hf) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["convert", str(hf), "-o", str(hf / "out.gguf")])
    return result.exit_code, result.output
