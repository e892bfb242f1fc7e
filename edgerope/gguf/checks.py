"""What llama.cpp refuses, aborts on or silently computes garbage from in a GGUF, checked before any native call.

``check_runnable`` is used by the runtime's preflight (every ``ask``/``serve``/``eval`` of a GGUF) and by
``edgerope quantize``; ``edgerope inspect`` reports the same problems as errors (``value_problems``).

Measured on the llama.cpp this project pins, with a tiny llama GGUF whose one value was changed:

* ``GGML_ASSERT(eps >= 0.0f)`` aborts the process at the first decode for a NaN or negative
  ``attention.layer_norm_rms_epsilon`` (an infinite one gives NaN logits);
* a NaN, zero, negative or infinite ``rope.freq_base``, a NaN or negative ``rope.scaling.factor``, a NaN
  ``rope.scaling.attn_factor``, or YaRN with ``original_context_length`` 0 load and run, and every logit is NaN
  or the output degenerate -- the model silently computes something else;
* ``block_count`` 0 has no layers to run; zero heads, a head count that does not divide, or a rotary dimension
  that is not the head size are refused by llama.cpp's loader, with a message about a tensor shape;
* found by the hostile-input suite (tests/gguf/test_hostile_mutations.py), each an abort at context creation:
  a K head size other than the V head size (``GGML_ASSERT(n_embd_head == hparams.n_embd_head_k())`` in the graph
  of most architectures), a rotary dimension other than the head size (``GGML_ASSERT(n_embd_head == n_rot)``),
  a Q/K/V projection whose rows are not heads x head size (e.g. qwen2 with ``head_count`` 3 on a 64-wide model:
  ``GGML_ASSERT(ggml_nelements(a) == ne0*ne1*ne2)`` in the reshape; qwen2's loader does not check these rows),
  and a norm weight or bias that is not F32 (``binary_op: unsupported types`` on the CPU).

What it does not do: check a run request (context, caches: ``edgerope.runtime.preflight``).
"""

from __future__ import annotations

import math
from typing import Any

from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, Keys, TokenType

from edgerope.errors import GGUFError
from edgerope.gguf.hparams import MAX_DIM, MAX_HEADS, MAX_LAYERS, ModelHparams, model_hparams
from edgerope.gguf.reader import GGUFFile
from edgerope.rope.ggml import ROPE_TENSORS

SUPPORTED_ARCHS = frozenset(MODEL_ARCH_NAMES.values())

# Architectures whose graph asserts K head size == V head size, and those asserting rotary dimension == head size
# (GGML_ASSERTs in the vendored llama.cpp's src/models/*.cpp, found through each arch's build_arch_graph; an
# abort at context creation when they do not hold)
ARCHS_ASSERTING_KV_HEAD_DIMS = frozenset(
    "afmoe apertus arcee arctic baichuan bailingmoe2 bert bitnet bloom chameleon chatglm codeshell cogvlm cohere2 "
    "cohere2moe command-r dbrx deci deepseek dflash dots1 dream eagle3 ernie4_5 ernie4_5-moe eurobert exaone falcon "
    "glm4 glm4moe gpt2 gptneox granite granite_swa granitehybrid graniteswitch grok grovemoe hunyuan-moe hunyuan_vl "
    "hy_v3 internlm2 jais jais2 laguna llada llada-moe llama llama4 maincoder mellum minimax-01 minimax-m2 minimax-m3 "
    "mistral3 modern-bert mpt muse-glimmer nanbeige nemotron nemotron_h nemotron_h_moe neo-bert olmo olmo2 olmoe "
    "openelm orion paddleocr pangu-embedded phi2 phi3 plamo pockettts qwen qwen2 qwen2moe qwen2vl qwen3 qwen35 "
    "qwen35moe qwen3moe qwen3next qwen3vl qwen3vlmoe qwen4exp refact rnd1 seed_oss smallthinker smollm3 spark2_5 "
    "stablelm starcoder starcoder2 t5 xverse".split()
)
ARCHS_ASSERTING_FULL_ROTARY = frozenset(
    "apertus arcee arctic baichuan chameleon codeshell cogvlm cohere2moe dbrx deci deepseek dots1 dream ernie4_5 "
    "ernie4_5-moe exaone exaone-moe exaone4 falcon granite granite_swa graniteswitch grok grovemoe hunyuan-moe "
    "hunyuan_vl hy_v3 internlm2 jais2 llada llada-moe llama llama4 maincoder mellum minimax-01 minimax-m2 minimax-m3 "
    "mistral3 nemotron olmo olmo2 olmoe orion paddleocr pangu-embedded plamo pockettts qwen2 qwen2moe qwen2vl qwen3 "
    "qwen3moe qwen3vl qwen3vlmoe rnd1 seed_oss smallthinker smollm3 starcoder2 talkie xverse".split()
)


def _number(f: GGUFFile, template: str) -> Any:
    return f.arch_get(template)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ints(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def shape_problems(f: GGUFFile, hp: ModelHparams) -> list[str]:
    """Head sizes and tensor shapes the architecture's graph asserts on (the module docstring), each in words."""
    arch, problems = f.architecture, []
    if arch in ARCHS_ASSERTING_KV_HEAD_DIMS and hp.head_dim_k != hp.head_dim_v:
        problems.append(
            f"the K head size {hp.head_dim_k} differs from the V head size {hp.head_dim_v}: llama.cpp's {arch} graph "
            "aborts on it (GGML_ASSERT)"
        )
    if arch in ARCHS_ASSERTING_FULL_ROTARY and max(hp.n_head_layers) and hp.n_rot != hp.head_dim_v:
        problems.append(
            f"rope.dimension_count {hp.n_rot} differs from the head size {hp.head_dim_v}: llama.cpp's {arch} graph "
            "aborts on it (GGML_ASSERT)"
        )
    if arch in ARCHS_ASSERTING_KV_HEAD_DIMS:
        problems += _projection_problems(f, hp)
    for t in f.tensors:
        if len(t.shape) == 1 and t.name.endswith(("norm.weight", ".bias")) and t.ggml_type != GGMLQuantizationType.F32:
            problems.append(
                f"{t.name} is {t.ggml_type.name}: llama.cpp's CPU backend aborts on a norm weight or bias that is "
                "not F32 ('binary_op: unsupported types')"
            )
            break
    return problems


def _projection_problems(f: GGUFFile, hp: ModelHparams) -> list[str]:
    """The attention projections' rows against heads x head size, per layer (the graph reshapes them so)."""
    heads, kv_heads = hp.n_head_layers, hp.n_head_kv_layers
    for i in range(hp.n_layers):
        want = {
            "attn_q": (heads[i] * hp.head_dim_k, 2 * heads[i] * hp.head_dim_k),  # gated attention doubles Q
            "attn_k": (kv_heads[i] * hp.head_dim_k,),
            "attn_v": (kv_heads[i] * hp.head_dim_v,),
            "attn_qkv": ((heads[i] + 2 * kv_heads[i]) * hp.head_dim_k,),
        }
        for kind, rows in want.items():
            t = f.tensor(f"blk.{i}.{kind}.weight")
            if t is not None and heads[i] and len(t.shape) == 2 and t.shape[1] not in rows:
                return [
                    f"{t.name} has {t.shape[1]} rows, but {heads[i]} heads (KV {kv_heads[i]}) of size {hp.head_dim_k} "
                    f"need {rows[0]}: llama.cpp's attention reshape aborts on it (GGML_ASSERT)"
                ]
    return []


def value_problems(f: GGUFFile) -> list[str]:
    """Metadata values llama.cpp aborts on or computes garbage from (the module docstring), each in words."""
    problems: list[str] = []
    n_layer = _number(f, Keys.LLM.BLOCK_COUNT)
    if not isinstance(n_layer, int) or not 1 <= n_layer <= MAX_LAYERS:
        problems.append(f"block_count is {n_layer!r}: a model needs 1..{MAX_LAYERS} layers")
    n_embd = _number(f, Keys.LLM.EMBEDDING_LENGTH)
    if not isinstance(n_embd, int) or not 1 <= n_embd <= MAX_DIM:
        problems.append(f"embedding_length is {n_embd!r}, not 1..{MAX_DIM}")
    ctx = _number(f, Keys.LLM.CONTEXT_LENGTH)
    if not isinstance(ctx, int) or ctx < 1:
        problems.append(f"context_length is {ctx!r}, not a positive number of tokens")
    heads = _ints(_number(f, Keys.Attention.HEAD_COUNT))
    kv_heads = (
        _ints(_number(f, Keys.Attention.HEAD_COUNT_KV)) if _number(f, Keys.Attention.HEAD_COUNT_KV) is not None else []
    )
    if not all(isinstance(h, int) and 0 <= h <= MAX_HEADS for h in heads + kv_heads) or not any(heads):
        problems.append(f"head counts {heads} / kv {kv_heads or '(= heads)'} are not 1..{MAX_HEADS}")
    for name, template in (
        ("attention.layer_norm_rms_epsilon", Keys.Attention.LAYERNORM_RMS_EPS),
        ("attention.layer_norm_epsilon", Keys.Attention.LAYERNORM_EPS),
    ):
        eps = _number(f, template)
        if eps is not None and not (_is_real(eps) and eps >= 0):
            problems.append(
                f"{name} is {eps!r}: llama.cpp aborts on a NaN or negative epsilon (GGML_ASSERT), and an infinite "
                "one makes every logit NaN"
            )
    for name, template, low in (
        ("rope.freq_base", Keys.Rope.FREQ_BASE, "positive"),
        ("rope.freq_base_swa", Keys.Rope.FREQ_BASE_SWA, "positive"),
        ("rope.scaling.factor", Keys.Rope.SCALING_FACTOR, "non-negative"),
        ("rope.scaling.attn_factor", Keys.Rope.SCALING_ATTN_FACTOR, "positive"),
        ("rope.scaling.yarn_beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST, "positive"),
        ("rope.scaling.yarn_beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW, "positive"),
    ):
        v = _number(f, template)
        if v is not None and not (_is_real(v) and (v > 0 if low == "positive" else v >= 0)):
            problems.append(f"{name} is {v!r}, not a finite {low} number: every logit would be NaN or meaningless")
    rot = _number(f, Keys.Rope.DIMENSION_COUNT)
    if rot is not None and (not isinstance(rot, int) or not 0 < rot <= MAX_DIM or rot % 2):
        problems.append(
            f"rope.dimension_count is {rot!r}: it must be an even number of channels, at most the head size"
        )
    stype = _number(f, Keys.Rope.SCALING_TYPE)
    orig = _number(f, Keys.Rope.SCALING_ORIG_CTX_LEN)
    if stype in ("yarn", "longrope") and orig is not None and (not isinstance(orig, int) or orig < 1):
        problems.append(f"rope.scaling.original_context_length is {orig!r} with {stype} scaling: it must be >= 1")
    if not problems:
        try:
            problems += shape_problems(f, model_hparams(f))
        except GGUFError:
            pass  # counts out of bounds: model_hparams' own error is reported by its callers
    return problems


def check_runnable(f: GGUFFile) -> str:
    """Return the architecture; refuse what makes llama.cpp abort, refuse or compute garbage from a GGUF."""
    where = str(f.path)
    arch = f.architecture
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"architecture {arch!r} is not one llama.cpp knows",
            where=where,
            fix="only GGUFs of llama.cpp architectures can run (llama, qwen2, ...)",
        )
    for name in ROPE_TENSORS:
        t = f.tensor(name)
        if t is not None and t.ggml_type != GGMLQuantizationType.F32:
            raise GGUFError(
                f"rope frequency-factor tensor {name} is {t.ggml_type.name}; llama.cpp aborts the process unless it "
                "is F32 (docs/llama_cpp.md pitfall 13)",
                where=where,
                fix="re-convert with edgerope convert (it keeps these tensors F32), or rewrite the rope with "
                "edgerope set-rope",
            )
    if f.get(Keys.Tokenizer.MODEL) == "llama":  # SentencePiece: unseen characters need the 256 byte pieces
        types = f.get(Keys.Tokenizer.TOKEN_TYPE) or []
        n_bytes = sum(1 for t in types if t == TokenType.BYTE)
        if n_bytes < 256:
            raise GGUFError(
                f"the SentencePiece vocab has {n_bytes} of the 256 byte pieces (<0x00>..<0xFF>); llama.cpp aborts "
                "the process on the first character outside the vocab (docs/llama_cpp.md pitfall 19)",
                where=where,
                fix="re-train the tokenizer with byte_fallback=True and convert again",
            )
    problems = value_problems(f)
    if problems:
        raise GGUFError(
            "the GGUF's metadata holds values llama.cpp cannot run: " + "; ".join(problems),
            where=where,
            fix="re-convert the model from its checkpoint, or correct the rope keys with edgerope set-rope",
        )
    return arch
