"""What each model family needs in GGUF beyond the shared tensor map: refusals, metadata, tensor changes.

Per family (facts from llama.cpp's ``src/models/<arch>.cpp``; docs/llama_cpp.md §12):

* ``check_carriable`` refuses, all problems listed together, a config whose function llama.cpp's arch does
  not compute: a sliding window the arch has no attention for, an attention output or MLP bias it does not
  load, a SmolLM3 NoPE layout other than every 4th layer, Phi-3 heads that do not tile the hidden size, a
  model name that makes llama.cpp's vocab loader look up Phi-3 tokens the vocab lacks; it returns notes on
  what is carried but worth knowing (Gemma 3's ``attn_logit_softcapping``, which neither transformers nor
  llama.cpp applies);
* ``family_kv``: Gemma 3's sliding window, its per-layer pattern (an array: any layout) and final logit
  soft-capping (its sliding layers' rope base comes with the rope plan, ``rope.freq_base_swa``);
* ``row_order``: the Q/K row permutation of the adjacent-pair arches (``llama``, ``smollm3``; §3.1);
* ``transformed``: Gemma 3's norm weights as llama.cpp multiplies them (1 + w), with
  ``query_pre_attn_scalar`` folded into the q norm -- llama.cpp's gemma3 scales q by 1/sqrt(head_dim)
  (1/sqrt(hidden/heads) for 62-layer models) whatever the config says, and the rope is linear in q, so
  scaling the q norm by sqrt(head_dim / query_pre_attn_scalar) gives exactly transformers' scores.

What it does not do: rope keys (``edgerope.rope.ggml``), the tensor stream, the vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from gguf import GGUFValueType, Keys

from edgerope.errors import CheckpointError, ConfigError
from edgerope.models.config import ModelConfig
from edgerope.rope.ggml import key

# Arches whose rope pairs adjacent channels (2i, 2i+1): HF's rotate-half rows are permuted (docs/llama_cpp.md §3.1)
NORM_ARCHS = frozenset({"llama", "smollm3"})
# Arches with sliding-window attention in llama.cpp (the others attend over the whole context; phi3 reads the
# window key and then disables it)
ARCHS_WITH_SWA = frozenset({"gemma3"})
# Arches whose loader creates no attention-output bias (their graph passes wo_b, but it stays null and an extra
# tensor fails the load); q/k/v biases load everywhere through create_tensor_qkv
ARCHS_WITHOUT_O_BIAS = frozenset({"qwen3", "gemma3", "smollm3", "phi3"})
ARCHS_WITHOUT_MLP_BIAS = frozenset({"qwen3", "gemma3", "smollm3", "phi3", "qwen2"})
SMOLLM3_NOPE_STEP = 4  # llama_model_smollm3: n_no_rope_layer_step = 4, use_rope = (il + 1) % 4 != 0
GEMMA3_27B_LAYERS = 62  # llama_model_gemma3: LLM_TYPE_27B scales q by 1/sqrt(n_embd / n_head)
PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")  # looked up when general.name contains phi3/phi-3


def check_carriable(cfg: ModelConfig, *, context: int, model_name: str, tokens: list[str], where: str) -> list[str]:
    """Refuse what llama.cpp's arch for ``cfg`` would compute differently (``ConfigError`` listing every reason);
    the notes on what is carried."""
    arch, problems = cfg.gguf_arch, []
    window = cfg.sliding_window
    sliding = any(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)) or (
        cfg.model_type == "llama" and window is not None
    )
    if sliding and window is not None and window < context and arch not in ARCHS_WITH_SWA:
        problems.append(
            f"sliding_window {window} is smaller than the context {context}: llama.cpp's {arch} architecture has "
            "no sliding-window attention and would attend over the whole context (set sliding_window to null, or "
            ">= the context, if the model was trained with full attention)"
        )
    if cfg.o_bias and arch in ARCHS_WITHOUT_O_BIAS:
        problems.append(f"attention_bias: llama.cpp's {arch} loads no attention output (o_proj) bias")
    if cfg.mlp_bias and arch in ARCHS_WITHOUT_MLP_BIAS:
        problems.append(f"mlp_bias: llama.cpp's {arch} loads no MLP biases")
    problems += _arch_problems(cfg)
    if ("phi3" in model_name.lower() or "phi-3" in model_name.lower()) and (
        lost := [t for t in PHI3_NAME_TOKENS if t not in set(tokens)]
    ):
        problems.append(
            f"the model name {model_name!r} makes llama.cpp's vocab loader look up the Phi-3 tokens "
            f"{', '.join(lost)}, which this vocab lacks: the load would fail (rename the model, e.g. in "
            "config.json's edgerope.name)"
        )
    if problems:
        raise ConfigError(
            f"llama.cpp's {arch} architecture cannot compute this model:\n    - " + "\n    - ".join(problems),
            where=where,
            fix="change the listed settings, or keep the model in PyTorch",
        )
    notes = []
    if cfg.attn_logit_softcapping is not None:
        notes.append(
            f"attn_logit_softcapping {cfg.attn_logit_softcapping:g} is set, but transformers' Gemma 3 never applies "
            "it and neither does llama.cpp's gemma3: both compute attention without soft-capping"
        )
    return notes


def _arch_problems(cfg: ModelConfig) -> list[str]:
    """The settings only one arch cannot carry."""
    out = []
    if cfg.model_type == "smollm3":
        want = tuple(int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(cfg.num_hidden_layers))
        if cfg.no_rope_layers != want:
            out.append(
                f"no_rope_layers {list(cfg.no_rope_layers or ())}: llama.cpp's smollm3 skips the rope on every "
                f"{SMOLLM3_NOPE_STEP}th layer exactly ({list(want)}) and reads no layout from the file"
            )
    if cfg.model_type == "phi3" and cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        out.append(
            f"num_attention_heads x head_dim = {cfg.num_attention_heads * cfg.head_dim} != hidden_size "
            f"{cfg.hidden_size}: llama.cpp's phi3 assumes the heads tile the hidden size"
        )
    return out


def family_kv(cfg: ModelConfig, *, context: int) -> dict[str, tuple[Any, GGUFValueType]]:
    """Metadata beyond the shared hyperparameters and the rope plan."""
    arch, out = cfg.gguf_arch, {}
    if arch == "gemma3":
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_hidden_layers)]
        if any(sliding):
            assert cfg.sliding_window is not None
            out[key(Keys.Attention.SLIDING_WINDOW, arch)] = (int(cfg.sliding_window), GGUFValueType.UINT32)
            out[key(Keys.Attention.SLIDING_WINDOW_PATTERN, arch)] = (sliding, GGUFValueType.ARRAY)
        if cfg.final_logit_softcapping is not None:
            out[key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, arch)] = (
                float(cfg.final_logit_softcapping),
                GGUFValueType.FLOAT32,
            )
    return out


def neox_to_norm_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half pairs (i, i+d/2) into adjacent pairs (2i, 2i+1) per head.

    Returns ``idx`` with ``new = old[idx]``: within each head new row 2j is old
    row j and new row 2j+1 is old row j + d/2 (docs/llama_cpp.md §3.1).
    """
    if n_rows % (2 * n_head):
        raise CheckpointError(f"cannot split {n_rows} rows into {n_head} heads of rotary pairs")
    half = n_rows // n_head // 2
    # (head, which half, pair) -> (head, pair, which half)
    return np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def row_order(cfg: ModelConfig, hf_name: str, n_rows: int) -> np.ndarray | None:
    """The Q/K row permutation for the adjacent-pair arches, else None."""
    if cfg.gguf_arch not in NORM_ARCHS:
        return None
    if ".self_attn.q_proj." in hf_name:
        return neox_to_norm_rows(n_rows, cfg.num_attention_heads)
    if ".self_attn.k_proj." in hf_name:
        return neox_to_norm_rows(n_rows, cfg.num_key_value_heads)
    return None


def query_scale_fold(cfg: ModelConfig) -> float:
    """The factor Gemma 3's q norm is multiplied by so that llama.cpp's fixed q scale gives transformers' one."""
    assert cfg.query_pre_attn_scalar is not None
    if cfg.num_hidden_layers == GEMMA3_27B_LAYERS:
        llama_cpp_scale = 1.0 / math.sqrt(cfg.hidden_size / cfg.num_attention_heads)
    else:
        llama_cpp_scale = 1.0 / math.sqrt(cfg.head_dim)
    return cfg.query_pre_attn_scalar**-0.5 / llama_cpp_scale


def transformed(cfg: ModelConfig, hf_name: str, load: Callable[[], np.ndarray]) -> np.ndarray | None:
    """The float32 values to store for ``hf_name`` when they differ from the checkpoint's (else None)."""
    if cfg.model_type != "gemma3_text" or not hf_name.endswith("norm.weight"):
        return None
    values = load().astype(np.float64) + 1.0  # Gemma's (1 + w) RMSNorm; llama.cpp multiplies by the stored weight
    if hf_name.endswith("self_attn.q_norm.weight"):
        values *= query_scale_fold(cfg)
    return values.astype(np.float32)
