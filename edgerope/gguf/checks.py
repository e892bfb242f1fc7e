"""What llama.cpp refuses or aborts on while loading and running a GGUF, checked before any native call.

``check_runnable`` is used by the runtime's preflight (every ``ask``/``serve``/``eval`` of a GGUF) and by
``edgerope quantize``; ``edgerope inspect`` reports the same problems as errors.

What it does not do: check a run request (context, caches: ``edgerope.runtime.preflight``).
"""

from __future__ import annotations

from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, Keys, TokenType

from edgerope.errors import GGUFError
from edgerope.gguf.reader import GGUFFile
from edgerope.rope.ggml import ROPE_TENSORS

SUPPORTED_ARCHS = frozenset(MODEL_ARCH_NAMES.values())


def check_runnable(f: GGUFFile) -> str:
    """Return the architecture; refuse what makes llama.cpp abort while loading or running a GGUF."""
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
    return arch
