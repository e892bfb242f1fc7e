"""Tiny random-weight GGUFs of llama.cpp architectures other than llama: qwen3, gemma2, gemma3, phi3, stablelm.

What it does: ``write_arch_gguf(path, arch)`` writes a *loadable* F32 GGUF of ``arch`` with
``gguf.GGUFWriter``, shaped like the real models of that family at a tiny size (hidden 64, 2 layers, head
dim 32), with the metadata the real converter writes for that family and the tensors llama.cpp's loader
requires.  Key names, tensor names and enums come from the ``gguf`` package; every tensor written is
checked against ``gguf.MODEL_TENSORS[arch]``.  The vocab is edgerope's tiny SentencePiece tokenizer
(``edgerope.models.tiny_random`` + ``edgerope.convert.vocab``) or, for the families that use byte-level BPE, a small BPE
vocab built here (the 256 byte symbols, a few merges, special tokens).

Facts read from llama.cpp (the copy in llama-cpp-python 0.3.36, ``src/models/<arch>.cpp`` load_arch_hparams /
load_arch_tensors and ``src/llama-model.cpp``), per family:

* qwen3: separate Q/K/V, per-head RMS ``attn_q_norm``/``attn_k_norm`` (head_dim elements), head_dim from
  ``attention.key_length`` (n_head x head_dim != hidden, as in the real models), n_rot must equal head_dim;
  written with YaRN x4 over an original context of 256 (as Qwen3 long-context GGUFs are);
* gemma2: tied embeddings (no ``output``), post-attention and post-FFN norms, attention and final logit
  soft-capping, sliding window (default pattern 2: even layers slide), SWA rope base = global base;
* gemma3: like gemma2 plus Q/K norms; ``rope.freq_base_swa`` for the sliding layers (which are never
  rope-scaled), linear rope scaling x8 on the global layers; the sliding pattern as a per-layer bool array;
* phi3: fused ``attn_qkv``, fused gate+up ``ffn_up`` (2 x n_ff rows), LongRoPE ``rope_factors_long`` /
  ``rope_factors_short`` (F32, n_rot/2) chosen by the allocated context against
  ``rope.scaling.original_context_length``, ``rope.scaling.attn_factor``; a ``sliding_window`` key that
  llama.cpp reads and then disables (as in real Phi-3 files);
* stablelm: LayerNorm with biases, Q/K/V biases, partial rotary (``rope.dimension_count`` 8 of head dim 32).

What it does not do: produce meaningful weights, or a tokenizer that matches any real model.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES, RopeScalingType, TokenType

from edgerope.convert.vocab import GGUFVocab, byte_level_alphabet, load_sentencepiece

ARCHS = ("qwen3", "gemma2", "gemma3", "phi3", "stablelm")
HIDDEN = 64
N_LAYER = 2
HEAD_DIM = 32
N_FF = 128
WEIGHT_STD = 0.15

BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Phi-3's added tokens; llama.cpp's vocab loader looks "<|endoftext|>" up in any model named like phi3
# (general.name containing "phi3"/"phi-3") and fails to load the model without it.
PHI3_SPECIALS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>")
BPE_WORDS = ("the", "and", "of", "to", "in", "is", "document", "question", "answer", "read", "code", "red", "blue")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ArchSpec:
    """One family's tiny shape and the facts the tests compare llama.cpp against."""

    arch: str
    n_head: int
    n_head_kv: int
    context_length: int
    n_rot: int = HEAD_DIM
    vocab: str = "spm"  # "spm" (edgerope's tiny SentencePiece) or "bpe" (built here)
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()  # per layer: a sliding-window layer in llama.cpp

    @property
    def arch_enum(self) -> MODEL_ARCH:
        return next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == self.arch)


SPECS: dict[str, ArchSpec] = {
    "qwen3": ArchSpec("qwen3", n_head=4, n_head_kv=2, context_length=1024, vocab="bpe"),
    "gemma2": ArchSpec(
        "gemma2", n_head=2, n_head_kv=1, context_length=1024, sliding_window=128, swa_layers=(True, False)
    ),
    "gemma3": ArchSpec(
        "gemma3", n_head=4, n_head_kv=2, context_length=2048, sliding_window=128, swa_layers=(True, False)
    ),
    "phi3": ArchSpec("phi3", n_head=2, n_head_kv=2, context_length=1024, sliding_window=2047),  # llama.cpp disables it
    "stablelm": ArchSpec("stablelm", n_head=2, n_head_kv=2, context_length=512, n_rot=8, vocab="bpe"),
}
PHI3_ORIGINAL_CONTEXT = 256
QWEN3_YARN = (4.0, 256)  # factor, original context
GEMMA3_LINEAR = 8.0


# --------------------------------------------------------------------------------------------------------------
# vocabularies


def spm_vocab() -> GGUFVocab:
    """edgerope's tiny SentencePiece vocab (1,000 pieces, byte fallback), as ``edgerope.convert.vocab`` writes it."""
    from edgerope.models.tiny_random import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(tmp)
        return load_sentencepiece(Path(tmp))


def with_control_tokens(vocab: GGUFVocab, texts: tuple[str, ...]) -> GGUFVocab:
    """``vocab`` with ``texts`` appended as CONTROL tokens (how HF added special tokens are converted)."""
    for text in texts:
        vocab.tokens.append(text)
        vocab.types.append(int(TokenType.CONTROL))
        if vocab.scores is not None:
            vocab.scores.append(0.0)
    return vocab


def bpe_vocab(pre: str) -> GGUFVocab:
    """A small byte-level BPE vocab: the 256 byte symbols, merges spelling a few words (with and without the
    leading-space symbol), then the special tokens (CONTROL)."""
    alphabet = byte_level_alphabet()
    space = alphabet[ord(" ")]
    tokens = list(alphabet)
    merges: list[str] = []
    for word in BPE_WORDS:
        for spelled in (space + word, word):
            left = spelled[0]
            for ch in spelled[1:]:
                if f"{left} {ch}" not in merges:
                    merges.append(f"{left} {ch}")
                left += ch
                if left not in tokens:
                    tokens.append(left)
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens += list(BPE_SPECIALS)
    types += [int(TokenType.CONTROL)] * len(BPE_SPECIALS)
    return GGUFVocab(kind="bpe", model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)


def _write_bpe_specials(w: gguf.GGUFWriter, vocab: GGUFVocab, *, chat_template: bool) -> None:
    eos = vocab.tokens.index(BPE_SPECIALS[0])
    w.add_eos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(CHATML)


# --------------------------------------------------------------------------------------------------------------
# tensors


def tensor_name(t: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    return TENSOR_NAMES[t].format(bid=bid) + "." + suffix


def _tensors(spec: ArchSpec, n_vocab: int) -> list[tuple[MODEL_TENSOR, int | None, str, tuple[int, ...]]]:
    """(tensor, block, suffix, numpy shape) for every tensor ``spec.arch``'s loader takes, in file order.

    numpy shape (rows, cols) is ggml ne (cols, rows).
    """
    T = MODEL_TENSOR
    h, hd, ff = HIDDEN, HEAD_DIM, N_FF
    q, kv = spec.n_head * hd, spec.n_head_kv * hd
    a = spec.arch
    out: list[tuple[MODEL_TENSOR, int | None, str, tuple[int, ...]]] = [(T.TOKEN_EMBD, None, "weight", (n_vocab, h))]
    for i in range(N_LAYER):
        layer: list[tuple[MODEL_TENSOR, str, tuple[int, ...]]] = [(T.ATTN_NORM, "weight", (h,))]
        if a == "stablelm":
            layer.append((T.ATTN_NORM, "bias", (h,)))
        if a == "phi3":
            layer.append((T.ATTN_QKV, "weight", (q + 2 * kv, h)))
        else:
            layer += [(T.ATTN_Q, "weight", (q, h)), (T.ATTN_K, "weight", (kv, h)), (T.ATTN_V, "weight", (kv, h))]
        if a == "stablelm":
            layer += [(T.ATTN_Q, "bias", (q,)), (T.ATTN_K, "bias", (kv,)), (T.ATTN_V, "bias", (kv,))]
        if a in ("qwen3", "gemma3"):
            layer += [(T.ATTN_Q_NORM, "weight", (hd,)), (T.ATTN_K_NORM, "weight", (hd,))]
        layer.append((T.ATTN_OUT, "weight", (h, q)))
        if a in ("gemma2", "gemma3"):
            layer.append((T.ATTN_POST_NORM, "weight", (h,)))
            layer.append((T.FFN_PRE_NORM, "weight", (h,)))
        else:
            layer.append((T.FFN_NORM, "weight", (h,)))
        if a == "stablelm":
            layer.append((T.FFN_NORM, "bias", (h,)))
        if a == "phi3":
            layer.append((T.FFN_UP, "weight", (2 * ff, h)))  # gate and up, fused
        else:
            layer += [(T.FFN_GATE, "weight", (ff, h)), (T.FFN_UP, "weight", (ff, h))]
        layer.append((T.FFN_DOWN, "weight", (h, ff)))
        if a in ("gemma2", "gemma3"):
            layer.append((T.FFN_POST_NORM, "weight", (h,)))
        out += [(t, i, suffix, shape) for t, suffix, shape in layer]
    out.append((T.OUTPUT_NORM, None, "weight", (h,)))
    if a == "stablelm":
        out.append((T.OUTPUT_NORM, None, "bias", (h,)))
    if a not in ("gemma2", "gemma3"):  # gemma ties the output to the embedding
        out.append((T.OUTPUT, None, "weight", (n_vocab, h)))
    return out


def _values(rng: np.random.Generator, t: MODEL_TENSOR, suffix: str, shape: tuple[int, ...]) -> np.ndarray:
    if suffix == "weight" and len(shape) == 1:  # norm weights ~ 1 (not exactly: a mixed-up norm shows)
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (rng.standard_normal(shape) * WEIGHT_STD).astype(np.float32)


def phi3_rope_factors(n_rot: int) -> dict[str, np.ndarray]:
    """LongRoPE per-pair divisors (n_rot/2 each, F32): short ones near 1, long ones rising to 8."""
    pairs = n_rot // 2
    short = np.linspace(1.0, 1.5, pairs, dtype=np.float32)
    long = np.geomspace(1.0, 8.0, pairs).astype(np.float32)
    return {tensor_name(MODEL_TENSOR.ROPE_FACTORS_LONG): long, tensor_name(MODEL_TENSOR.ROPE_FACTORS_SHORT): short}


# --------------------------------------------------------------------------------------------------------------
# the file


def _add_hparams(w: gguf.GGUFWriter, spec: ArchSpec) -> None:
    w.add_context_length(spec.context_length)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    if spec.n_head * HEAD_DIM != HIDDEN:
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(spec.n_rot)
    if spec.arch == "stablelm":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-6)
    if spec.sliding_window is not None:
        w.add_sliding_window(spec.sliding_window)
    if spec.arch == "qwen3":
        factor, orig = QWEN3_YARN
        w.add_rope_freq_base(1_000_000.0)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig)
    elif spec.arch == "gemma2":
        w.add_rope_freq_base(10000.0)
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    elif spec.arch == "gemma3":
        w.add_rope_freq_base(1_000_000.0)
        w.add_rope_freq_base_swa(10000.0)
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(GEMMA3_LINEAR)
        w.add_sliding_window_pattern(list(spec.swa_layers))
    elif spec.arch == "phi3":
        w.add_rope_freq_base(10000.0)
        w.add_rope_scaling_orig_ctx_len(PHI3_ORIGINAL_CONTEXT)
        scale = spec.context_length / PHI3_ORIGINAL_CONTEXT  # Phi-3's LongRoPE magnitude sqrt(1 + ln s / ln L0)
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(PHI3_ORIGINAL_CONTEXT))))
    elif spec.arch == "stablelm":
        w.add_rope_freq_base(10000.0)


def write_arch_gguf(path: str | Path, arch: str, *, seed: int = 0, vocab: GGUFVocab | None = None) -> Path:
    """Write the tiny random ``arch`` GGUF (one of ``ARCHS``) at ``path`` and return it.

    ``vocab`` defaults to the family's kind (``SPECS[arch].vocab``); qwen3 gets a ChatML chat template.
    """
    spec = SPECS[arch]
    if vocab is None:
        vocab = spm_vocab() if spec.vocab == "spm" else bpe_vocab("qwen2" if arch == "qwen3" else "gpt-2")
        if arch == "phi3":
            vocab = with_control_tokens(vocab, PHI3_SPECIALS)
    allowed = set(gguf.MODEL_TENSORS[spec.arch_enum])
    rng = np.random.default_rng(seed)
    path = Path(path)
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_name(f"edgerope-test-{arch}")
    _add_hparams(w, spec)
    w.add_vocab_size(len(vocab))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab.write(w)
    if vocab.kind == "bpe":
        _write_bpe_specials(w, vocab, chat_template=arch == "qwen3")
    layout = _tensors(spec, len(vocab))
    for t, bid, suffix, shape in layout:
        if t not in allowed:
            raise ValueError(f"{t.name} is not a {arch} tensor in gguf.MODEL_TENSORS")
        w.add_tensor(tensor_name(t, bid, suffix), _values(rng, t, suffix, shape))
    if arch == "phi3":
        for name, values in phi3_rope_factors(spec.n_rot).items():
            w.add_tensor(name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
