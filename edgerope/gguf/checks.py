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
  that is not the head size are refused by llama.cpp's loader, with a message about a tensor shape.

What it does not do: check a run request (context, caches: ``edgerope.runtime.preflight``).
"""

from __future__ import annotations

import math
from typing import Any

from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, Keys, TokenType

from edgerope.errors import GGUFError
from edgerope.gguf.reader import GGUFFile
from edgerope.rope.ggml import ROPE_TENSORS

SUPPORTED_ARCHS = frozenset(MODEL_ARCH_NAMES.values())


MAX_LAYERS = 4096  # bounds that keep a corrupt header from allocating gigabytes before llama.cpp refuses it
MAX_HEADS = 65536
MAX_DIM = 1 << 20


def _number(f: GGUFFile, template: str) -> Any:
    return f.arch_get(template)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ints(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
