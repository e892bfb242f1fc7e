"""Lint a GGUF for the ways llama.cpp silently computes the wrong thing, or fails, on it.

``lint_gguf`` returns ``Finding``s (severity, code, message, fix) from one
catalogue, ``LINTS``: rope keys llama.cpp ignores on the file's architecture,
missing or contradictory scaling keys, frequency-factor tensors of the wrong
type or length, partial rotary on the llama arch, the YaRN/LongRoPE magnitude
that breaks KV shifting, LongRoPE's switch on the allocated context, tokenizer
pieces llama.cpp needs, and key value types its loader rejects (docs/llama_cpp.md §1, §6 and §10).  Severity: "error" = llama.cpp fails, aborts or
computes something else than the file intends; "warning" = very likely not
what was meant; "info" = a caveat of a correct file.

What it does not do: resolve the rope function (``edgerope.rope.ggml``), read
files (``edgerope.gguf.reader``) or format reports (``edgerope.gguf.inspect``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFValueType, Keys

from edgerope.gguf import kv
from edgerope.gguf.checks import value_problems
from edgerope.gguf.hparams import ModelHparams
from edgerope.gguf.reader import GGUFFile
from edgerope.rope.ggml import (
    ARCHS_READING_YARN_BETAS,
    ARCHS_READING_YARN_EXT_ATTN,
    ARCHS_READING_YARN_LOG_MUL,
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    ROPE_TENSORS,
    LlamaCppRope,
    key,
)
from edgerope.rope.scaling import yarn_mscale

ERROR, WARNING, INFO = "error", "warning", "info"
TOKEN_EMBD = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
# arches whose loader rejects rope.dimension_count != head_dim ("invalid n_rot")
ARCHS_FULL_ROTARY = frozenset({"llama", "deci", "falcon", "llama-embed"})
# tokenizer.ggml.model values llama.cpp knows (src/llama-vocab.cpp), and those that are byte-level BPE
TOKENIZER_MODELS = frozenset(
    {"no_vocab", "none", "llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "plamo2", "gemma4"}
)
BPE_MODELS = frozenset({"gpt2", "hybriddna", "whitespace", "gemma4"})
# tokenizer.ggml.pre values the vendored llama.cpp implements (facts from src/llama-vocab.cpp)
KNOWN_PRE = frozenset(
    "default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano deepseek-llm "
    "deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es "
    "jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4 granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code "
    "roberta-bpe whitespace refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe "
    "poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 exaone-moe "
    "chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie granite-embed-multi-97m tiny_aya cohere2moe superbpe "
    "trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm "
    "kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open mellum2".split()
)
U32, I32, F32 = GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.FLOAT32
STR, BOOL = GGUFValueType.STRING, GGUFValueType.BOOL
# keys llama.cpp reads with a strict type check ("key X has wrong type"); True = a per-layer array is also accepted
STRICT_ARCH_KEYS: dict[str, tuple[GGUFValueType, bool]] = {
    Keys.LLM.CONTEXT_LENGTH: (U32, False),
    Keys.LLM.EMBEDDING_LENGTH: (U32, False),
    Keys.LLM.BLOCK_COUNT: (U32, False),
    Keys.LLM.FEED_FORWARD_LENGTH: (U32, True),
    Keys.LLM.VOCAB_SIZE: (U32, False),
    Keys.Attention.HEAD_COUNT: (U32, True),
    Keys.Attention.HEAD_COUNT_KV: (U32, True),
    Keys.Attention.KEY_LENGTH: (U32, False),
    Keys.Attention.VALUE_LENGTH: (U32, False),
    Keys.Attention.LAYERNORM_RMS_EPS: (F32, False),
    Keys.Rope.DIMENSION_COUNT: (U32, False),
    Keys.Rope.FREQ_BASE: (F32, False),
    Keys.Rope.SCALING_TYPE: (STR, False),
    Keys.Rope.SCALING_FACTOR: (F32, False),
    Keys.Rope.SCALING_ATTN_FACTOR: (F32, False),
    Keys.Rope.SCALING_ORIG_CTX_LEN: (U32, False),
    Keys.Rope.SCALING_FINETUNED: (BOOL, False),
}
STRICT_KEYS: dict[str, tuple[GGUFValueType, bool]] = {
    Keys.Tokenizer.MODEL: (STR, False),
    Keys.Tokenizer.PRE: (STR, False),
    Keys.Tokenizer.ADD_BOS: (BOOL, False),
    Keys.Tokenizer.ADD_EOS: (BOOL, False),
    Keys.Tokenizer.ADD_PREFIX: (BOOL, False),
    **{getattr(Keys.Tokenizer, n): (U32, False) for n in ("BOS_ID", "EOS_ID", "UNK_ID", "PAD_ID", "SEP_ID", "EOT_ID")},
}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" (llama.cpp fails or computes the wrong thing), "warning", "info"
    code: str
    message: str
    fix: str | None = None


# code -> (severity, message, fix); the texts are formatted with the values each check supplies
LINTS: dict[str, tuple[str, str, str | None]] = {
    "wrong_key_type": (
        ERROR,
        "{key} is stored as {got}; llama.cpp requires {want} and refuses to load ('key {key} has wrong type')",
        "rewrite it as {want} (gguf.GGUFWriter's add_* helpers write the right types)",
    ),
    "no_tokenizer": (ERROR, "tokenizer.ggml.model is missing; llama.cpp refuses to load the vocab", None),
    "unknown_tokenizer": (ERROR, "tokenizer.ggml.model {model!r} is unknown to llama.cpp", None),
    "spm_missing_byte_tokens": (
        ERROR,
        "SentencePiece vocab lacks {n} of the 256 byte tokens <0x00>..<0xFF>: llama.cpp aborts the process on any "
        "character the vocab cannot spell",
        "train the SentencePiece model with byte_fallback=True and re-convert",
    ),
    "bpe_no_merges": (
        ERROR,
        "byte-level BPE vocab ({model!r}) without tokenizer.ggml.merges: llama.cpp fails with 'cannot find "
        "tokenizer merges'",
        "re-convert with the tokenizer's merges",
    ),
    "bpe_pre_missing": (
        WARNING,
        "BPE vocab without tokenizer.ggml.pre: llama.cpp falls back to 'default' pre-tokenization (it logs "
        "'GENERATION QUALITY WILL BE DEGRADED')",
        "set tokenizer.ggml.pre to the pre-tokenizer the model was trained with (e.g. 'llama-bpe', 'qwen2')",
    ),
    "bpe_pre_unknown": (
        ERROR,
        "tokenizer.ggml.pre {pre!r} is not implemented by this llama.cpp: it fails with 'unknown pre-tokenizer type'",
        "use a pre-tokenizer name llama.cpp implements for this tokenizer",
    ),
    "vocab_size_mismatch": (
        ERROR,
        "{n} tokens but {name} has {rows} rows: llama.cpp refuses to load ('wrong shape')",
        "pad the token list (e.g. [PAD{{i}}] tokens of type UNUSED) to the embedding rows",
    ),
    "yarn_no_original_context": (
        WARNING,
        "YaRN without rope.scaling.original_context_length: llama.cpp computes the correction range from "
        "context_length ({ctx}) instead of the pre-training context",
        "edgerope set-rope FILE --type yarn --factor F --original-context L0",
    ),
    "scaling_type_none": (
        INFO,
        "rope.scaling.type='none' makes llama.cpp discard a runtime rope_freq_scale unless the caller also sets "
        "rope_scaling_type",
        "omit the key for unscaled models (absent means linear with factor 1, the same function)",
    ),
    "context_inconsistent": (
        WARNING,
        "context_length {ctx} but factor {factor:g} x original {orig} = {want}: n_ctx=0 allocates {ctx} and llama.cpp "
        "warns past it",
        "edgerope set-rope FILE --type {stype} --factor {factor:g} --original-context {orig}",
    ),
    "factor_with_freq_factors": (
        WARNING,
        "rope.scaling.factor={factor:g} together with {what}: llama.cpp divides every angle by {factor:g} on top of "
        "the per-pair factors (llama3/longrope conversions must not write it)",
        "remove rope.scaling.factor",
    ),
    "longrope_no_factors": (
        WARNING,
        "rope.scaling.type='longrope' without rope_factors_long/short tensors: llama.cpp runs plain RoPE",
        "re-convert with the LongRoPE factor tensors (edgerope convert writes them)",
    ),
    "freq_factors_not_f32": (
        ERROR,
        "{name} is {type}: llama.cpp's rope op asserts F32 and aborts the process",
        "store frequency-factor tensors as F32 (keep them F32 when quantizing)",
    ),
    "freq_factors_length": (
        ERROR,
        "{name} has {n} values; the rotary dimension {n_rot} needs {half}: llama.cpp refuses to load ('wrong shape')",
        "regenerate the tensor with rope.dimension_count/2 values",
    ),
    "n_rot_not_head_dim": (
        ERROR,
        "rope.dimension_count {n_rot} != head dim {head_dim}: llama.cpp rejects partial rotary on arch {arch!r} "
        "('invalid n_rot')",
        "set {key} to {head_dim}",
    ),
    "ignored_yarn_key": (
        WARNING,
        "{key}={value:g} is ignored on arch {arch!r} (only {readers} read it); llama.cpp uses {used}",
        "{fix}",
    ),
    "llama_cpp_python_betas": (
        INFO,
        "the file's YaRN betas ({fast:g}/{slow:g}) are read by llama.cpp, but llama-cpp-python's Llama() passes "
        "yarn_beta_fast=32, yarn_beta_slow=1 explicitly and overrides them",
        "pass yarn_beta_fast=-1.0, yarn_beta_slow=-1.0 to Llama() to defer to the file",
    ),
    "kv_shift_magnitude": (
        INFO,
        "cos/sin carry a magnitude of {m:.6g}: llama.cpp's context shift (llama_memory_seq_add, llama-server context "
        "shift) re-ropes cached keys with it and scales them a second time",
        "avoid context shifting with this model, or re-evaluate the prompt instead",
    ),
    "longrope_switch": (
        INFO,
        "llama.cpp picks the LongRoPE factor set from the allocated context, not the prompt: at n_ctx {ctx} it uses "
        "the {which} factors for every position (long whenever n_ctx > {orig}); Hugging Face switches per forward",
        "to match Hugging Face on prompts <= {orig} tokens, run with n_ctx <= {orig}",
    ),
    "bad_value": (
        ERROR,
        "{problem}",
        "re-convert the model from its checkpoint, or correct the rope keys with edgerope set-rope",
    ),
    "ctx_beyond_trained": (
        WARNING,
        "n_ctx {n_ctx} exceeds the trained context {ctx}: positions past it extrapolate",
        "scale the rope (edgerope set-rope) and fine-tune at the longer context",
    ),
}


def finding(code: str, severity: str | None = None, **values: Any) -> Finding:
    """A ``Finding`` from the ``LINTS`` catalogue, its texts filled with ``values``."""
    sev, message, fix = LINTS[code]
    return Finding(severity or sev, code, message.format(**values), (fix.format(**values) or None) if fix else None)


def _lint_types(f: GGUFFile, arch: str) -> list[Finding]:
    out = []
    for k, (want, array_ok) in ({key(t, arch): v for t, v in STRICT_ARCH_KEYS.items()} | STRICT_KEYS).items():
        mv = f.metadata.get(k)
        if mv is None or mv.type == want or (array_ok and mv.type == GGUFValueType.ARRAY and mv.sub_type in (U32, I32)):
            continue
        out.append(finding("wrong_key_type", key=k, got=mv.type_name, want=want.name.lower()))
    return out


def _lint_tokenizer(f: GGUFFile) -> list[Finding]:
    model = f.get(Keys.Tokenizer.MODEL)
    if model is None:
        return [finding("no_tokenizer")]
    out = [] if model in TOKENIZER_MODELS else [finding("unknown_tokenizer", model=model)]
    tokens = f.get(Keys.Tokenizer.LIST)
    if model == "llama" and isinstance(tokens, list):
        have = set(tokens)
        missing = sum(f"<0x{i:02X}>" not in have for i in range(256))
        if missing:
            out.append(finding("spm_missing_byte_tokens", n=missing))
    pre = f.get(Keys.Tokenizer.PRE)
    if model in BPE_MODELS and model != "gemma4":  # gemma4 fixes its own pre-tokenizer and demands merges itself
        if f.get(Keys.Tokenizer.MERGES) is None and pre != "kimi-k2":
            out.append(finding("bpe_no_merges", model=model))
        if pre is None:
            out.append(finding("bpe_pre_missing"))
        elif pre not in KNOWN_PRE:
            out.append(finding("bpe_pre_unknown", pre=pre))
    if isinstance(tokens, list):
        for name in (TOKEN_EMBD, OUTPUT):
            t = f.tensor(name)
            if t is not None and len(t.shape) == 2 and t.shape[1] != len(tokens):
                out.append(finding("vocab_size_mismatch", n=len(tokens), name=name, rows=t.shape[1]))
    return out


def _lint_rope(
    f: GGUFFile, hp: ModelHparams | None, rope: LlamaCppRope | None, factors: dict[str, np.ndarray], n_ctx: int | None
) -> list[Finding]:
    arch = f.architecture
    out: list[Finding] = []
    stype = f.arch_get(Keys.Rope.SCALING_TYPE)
    factor = f.arch_get(Keys.Rope.SCALING_FACTOR)
    orig = f.arch_get(Keys.Rope.SCALING_ORIG_CTX_LEN)
    ctx = f.arch_get(Keys.LLM.CONTEXT_LENGTH)
    scaled = isinstance(factor, (int, float)) and factor not in (0, 1)
    if stype == "yarn" and orig is None:
        out.append(finding("yarn_no_original_context", ctx=ctx))
    if stype == "none":
        out.append(finding("scaling_type_none"))
    if scaled and stype in ("yarn", "linear") and isinstance(orig, int) and isinstance(ctx, int):
        if round(factor * orig) != ctx:
            out.append(
                finding(
                    "context_inconsistent", ctx=ctx, factor=factor, orig=orig, want=round(factor * orig), stype=stype
                )
            )
    if scaled and stype != "yarn" and (stype == "longrope" or ROPE_FREQS in factors):
        out.append(
            finding("factor_with_freq_factors", factor=factor, what="longrope" if stype == "longrope" else ROPE_FREQS)
        )
    long_short = {ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT} & set(factors)
    if stype == "longrope" and not long_short:
        out.append(finding("longrope_no_factors"))
    n_rot = hp.n_rot if hp else 0
    for name in ROPE_TENSORS:
        t = f.tensor(name)
        if t is not None and t.ggml_type != GGMLQuantizationType.F32:
            out.append(finding("freq_factors_not_f32", name=name, type=t.ggml_type.name))
        if t is not None and n_rot and t.n_elements != n_rot // 2:
            out.append(finding("freq_factors_length", name=name, n=t.n_elements, n_rot=n_rot, half=n_rot // 2))
    if hp and arch in ARCHS_FULL_ROTARY and hp.n_rot != hp.head_dim_k:
        key_name = key(Keys.Rope.DIMENSION_COUNT, arch)
        out.append(finding("n_rot_not_head_dim", n_rot=hp.n_rot, head_dim=hp.head_dim_k, arch=arch, key=key_name))
    out += _lint_yarn_keys(f, rope)
    if rope is not None and not math.isclose(rope.magnitude, 1.0, rel_tol=1e-6):  # f32 keys
        out.append(finding("kv_shift_magnitude", m=rope.magnitude))
    if long_short and (stype == "longrope" or arch == "phi3") and ROPE_FREQS not in factors and rope is not None:
        alloc = kv.padded_ctx(n_ctx or (ctx if isinstance(ctx, int) else 0))
        which = "long" if alloc > rope.n_ctx_orig else "short"
        out.append(finding("longrope_switch", ctx=alloc, which=which, orig=rope.n_ctx_orig))
    if n_ctx and isinstance(ctx, int) and n_ctx > ctx:
        out.append(finding("ctx_beyond_trained", n_ctx=n_ctx, ctx=ctx))
    return out


def _lint_yarn_keys(f: GGUFFile, rope: LlamaCppRope | None) -> list[Finding]:
    """``rope.scaling.yarn_*`` keys present on an arch that never reads them (docs/llama_cpp.md §1)."""
    arch = f.architecture
    out = []
    big_f = 1.0 / rope.freq_scale if rope else 1.0
    m = rope.magnitude if rope else 1.0
    checks = [  # key, arches reading it, value llama.cpp uses instead, runtime parameter that sets it
        (
            Keys.Rope.SCALING_YARN_BETA_FAST,
            ARCHS_READING_YARN_BETAS,
            rope.beta_fast if rope else 32.0,
            "yarn_beta_fast",
        ),
        (
            Keys.Rope.SCALING_YARN_BETA_SLOW,
            ARCHS_READING_YARN_BETAS,
            rope.beta_slow if rope else 1.0,
            "yarn_beta_slow",
        ),
        (
            Keys.Rope.SCALING_YARN_EXT_FACTOR,
            ARCHS_READING_YARN_EXT_ATTN,
            rope.ext_factor if rope else 0.0,
            "yarn_ext_factor",
        ),
        (Keys.Rope.SCALING_YARN_LOG_MUL, ARCHS_READING_YARN_LOG_MUL, 0.0, None),
        (Keys.Rope.SCALING_YARN_ATTN_FACTOR, ARCHS_READING_YARN_EXT_ATTN, m, None),
    ]
    for template, readers, used, runtime in checks:
        k = key(template, arch)
        value = f.get(k)
        if not isinstance(value, (int, float)) or arch in readers:
            continue
        harmless = math.isclose(value, used, rel_tol=1e-6, abs_tol=1e-12)
        if harmless:
            fix = ""
        elif template == Keys.Rope.SCALING_YARN_ATTN_FACTOR:
            target = value / yarn_mscale(big_f)
            fix = f"if {value:g} is the intended magnitude, write rope.scaling.attn_factor = {target:.6g} (edgerope set-rope --attn-factor {value:g})"
        elif runtime:
            fix = f"pass {runtime}={value:g} at run time, or use an arch that reads the key"
        else:
            fix = "this arch cannot express it; remove the key"
        readers_txt = ", ".join(sorted(readers))
        out.append(
            finding(
                "ignored_yarn_key",
                INFO if harmless else None,
                key=k,
                value=value,
                arch=arch,
                readers=readers_txt,
                used=f"{used:g}",
                fix=fix,
            )
        )
    if arch in ARCHS_READING_YARN_BETAS and rope is not None and (rope.beta_fast, rope.beta_slow) != (32.0, 1.0):
        out.append(finding("llama_cpp_python_betas", fast=rope.beta_fast, slow=rope.beta_slow))
    return out


def lint_gguf(
    f: GGUFFile,
    *,
    hparams: ModelHparams | None,
    rope: LlamaCppRope | None,
    factors: dict[str, np.ndarray],
    n_ctx: int | None = None,
) -> list[Finding]:
    """All findings for ``f``, errors first. ``rope`` is llama.cpp's resolved function (None if unreadable)."""
    out = _lint_types(f, f.architecture) + _lint_rope(f, hparams, rope, factors, n_ctx) + _lint_tokenizer(f)
    out += [finding("bad_value", problem=p) for p in value_problems(f)]
    order = {ERROR: 0, WARNING: 1, INFO: 2}
    return sorted(out, key=lambda x: order[x.severity])
