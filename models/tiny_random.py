"""The project's own tiny models, made offline and deterministically (numpy + safetensors + sentencepiece).

What it does:

* ``train_tokenizer`` trains a small SentencePiece BPE vocab (byte fallback,
  identity normalization, so llama.cpp tokenizes exactly like sentencepiece;
  docs/llama_cpp.md §8.4) on CPython's own documentation strings
  (``pydoc_data.topics``), which every Python installation ships;
* ``make_tiny_checkpoint`` writes a Hugging Face model folder (``config.json``,
  ``model.safetensors`` in float32, tokenizer files, generation config) with
  random weights from a seeded generator, for every family of ``edgerope.models.config.FAMILIES``
  (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Phi-3, SmolLM3), with any rope scaling ``edgerope.rope.scaling``
  parses.

What it does not do: train the weights (they are random, wide enough that a
rope bug visibly moves the logits), import torch, or download anything.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgerope.errors import ConfigError
from edgerope.models.config import MODEL_TYPES, ModelConfig
from edgerope.models.layout import hf_tensor_shapes

TOKENIZER_FILE = "tokenizer.model"
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    + EOS
    + "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus_lines() -> list[str]:
    """CPython's documentation topics, one non-blank line per sentence, in a fixed order."""
    from pydoc_data.topics import topics

    return [line for name in sorted(topics) for line in topics[name].splitlines() if line.strip()]


@functools.lru_cache(maxsize=8)
def _trained_model_bytes(vocab_size: int, seed: int) -> bytes:
    """The serialized SentencePiece model (cached per process: tests ask for it many times)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        max_sentence_length=100_000,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        minloglevel=2,
    )
    return out.getvalue()


def train_tokenizer(out_dir: str | Path, *, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Write ``tokenizer.model`` (SentencePiece BPE, byte fallback) into ``out_dir``; returns its path.

    Deterministic: the same ``vocab_size`` and ``seed`` give byte-identical files.
    """
    if vocab_size < 300:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small",
            fix="use at least 300 (256 byte pieces + specials + some merges)",
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TOKENIZER_FILE
    path.write_bytes(_trained_model_bytes(vocab_size, seed))
    return path


def _spm_vocab_size(model_path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()


def _spm_special_ids(model_path: Path) -> tuple[int | None, int | None]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    return (sp.bos_id() if sp.bos_id() >= 0 else None), (sp.eos_id() if sp.eos_id() >= 0 else None)


def _hf_vocab_size(path: Path) -> int:
    tok = json.loads(path.read_text(encoding="utf-8"))
    ids = list((tok.get("model") or {}).get("vocab", {}).values()) + [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1


def tiny_config(
    *,
    model_type: str = "llama",
    vocab_size: int,
    rope_parameters: dict[str, Any] | None = None,
    max_position_embeddings: int = 256,
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = False,
    head_dim: int | None = None,
    sliding_window: int | None = None,
    name: str | None = None,
    **family_fields: Any,
) -> ModelConfig:
    """A validated ``ModelConfig`` for a tiny model, read from the ``config.json`` dict it stands for.

    ``rope_parameters`` is a 5.x rope dict (Gemma 3: one per layer type); None means plain rope at
    10000 (the family's own default base for Gemma 3 and SmolLM3).  ``family_fields`` are further
    ``config.json`` fields of the family (``layer_types``, ``no_rope_layers``, ``query_pre_attn_scalar``,
    ``original_max_position_embeddings``, ...).
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type {model_type!r}", fix=f"use one of {', '.join(MODEL_TYPES)}")
    if rope_parameters is None and model_type not in ("gemma3_text", "smollm3"):
        rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    raw: dict[str, Any] = {
        "architectures": [MODEL_TYPES[model_type][0]],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim or hidden_size // num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie_word_embeddings,
        "sliding_window": sliding_window,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "dtype": "float32",
        "edgerope": {"name": name or f"edgerope-tiny-{model_type}"},
        **family_fields,
    }
    if rope_parameters is not None:
        raw["rope_parameters"] = rope_parameters
    if model_type == "gemma3_text" and sliding_window is None:
        raw["sliding_window"] = max_position_embeddings  # no window unless asked for
    return ModelConfig.from_hf(raw, where="make_tiny_checkpoint(...)")


def tiny_weights(cfg: ModelConfig, *, weight_std: float = 0.15, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights named and shaped as the Hugging Face state dict, in a fixed order.

    Matrices and biases ~ N(0, weight_std); norms scale by 1 + N(0, 0.1), not exactly 1, so that a mixed-up
    norm shows (Gemma 3 stores the offset from 1: its norms multiply by 1 + weight).
    """

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    offset = 0.0 if cfg.model_type == "gemma3_text" else 1.0
    for name, shape in hf_tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = (offset + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * weight_std).astype(np.float32)
    return out


def write_tokenizer_files(out_dir: Path, *, model_file: Path, chat_template: bool = True) -> None:
    """Copy ``tokenizer.model`` and write tokenizer_config.json / special_tokens_map.json beside it
    (with the tiny chat template unless ``chat_template`` is False)."""
    if model_file.resolve() != (out_dir / TOKENIZER_FILE).resolve():
        shutil.copyfile(model_file, out_dir / TOKENIZER_FILE)
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "model_max_length": 1_000_000,
    }
    if chat_template:
        tok_cfg["chat_template"] = CHAT_TEMPLATE
    write_json(out_dir / "tokenizer_config.json", tok_cfg)
    write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK})


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    weight_std: float = 0.15,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
    **config: Any,
) -> Path:
    """Write a tiny random Hugging Face checkpoint folder and return its path.

    The tokenizer is ``tokenizer_dir``'s ``tokenizer.model`` (SentencePiece) or
    ``tokenizer.json`` (+ its config files); when None the tiny SentencePiece
    vocab is trained (cached per process).  The embedding has one row per
    token unless ``vocab_size`` says otherwise.  ``config`` takes ``tiny_config``'s other keyword
    arguments (model_type, sizes, tie_word_embeddings, sliding_window, ...) with its defaults;
    ``rope_parameters`` is a 5.x-style HF rope dict, e.g. ``{"rope_type": "yarn", "factor": 8.0,
    "original_max_position_embeddings": 256}`` (default: plain RoPE, theta 1e4).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_tokenizer_files(out, model_file=train_tokenizer(tmp))
        n_tokens = _spm_vocab_size(out / TOKENIZER_FILE)
    elif (Path(tokenizer_dir) / TOKENIZER_FILE).is_file():
        if (Path(tokenizer_dir) / "tokenizer_config.json").is_file():  # a tokenizer folder with its own settings
            for name in (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"):
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, out / name)
        else:
            write_tokenizer_files(out, model_file=Path(tokenizer_dir) / TOKENIZER_FILE)
        n_tokens = _spm_vocab_size(out / TOKENIZER_FILE)
        bos_id, eos_id = _spm_special_ids(out / TOKENIZER_FILE)
    elif (Path(tokenizer_dir) / "tokenizer.json").is_file():  # a Hugging Face tokenizer (e.g. byte-level BPE)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, out / name)
        n_tokens = _hf_vocab_size(out / "tokenizer.json")
        bos_id = eos_id = None  # the tokenizer files name them
    else:
        raise ConfigError("no tokenizer.model or tokenizer.json in tokenizer_dir", where=str(tokenizer_dir))
    cfg = tiny_config(vocab_size=vocab_size or n_tokens, **config).replace(bos_token_id=bos_id, eos_token_id=eos_id)
    save_safetensors_f32(out / "model.safetensors", tiny_weights(cfg, weight_std=weight_std, seed=seed))
    write_json(out / "config.json", cfg.to_hf())
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False, "max_new_tokens": 64}
    write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    return out


def save_safetensors_f32(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
