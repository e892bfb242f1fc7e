"""Tokenizers in GGUF: the real llama.cpp runtime must tokenize like sentencepiece / tokenizers.

References: the sentencepiece library (pieces, scores, types, encode), the
Hugging Face ``tokenizers`` library (byte-level BPE built here), and
llama.cpp itself (``llama_cpp.Llama(vocab_only=True)``) on converted files.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from gguf import TokenType

from edgerope.convert.export import convert
from edgerope.convert.vocab import byte_level_alphabet, load_vocab, parse_spm
from edgerope.errors import TokenizerError
from edgerope.models.tiny_random import CHAT_TEMPLATE

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

PROBES = [
    "def f(x):\n    return x + 1  # comment\n",
    "Hello, World! It's 2024.",
    "double  spaces   and\ttabs\n\n\nnewlines",
    "  leading and trailing  ",
    "héllo wörld naïve café Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 🤖🚀 and ﬁ ligature, ＦＵＬＬ width",
    "1234567 digits 3.14159 and 0xFF",
    "don't we'll they're I'M",
    "",
]
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def vocab_only(path: Path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def small(make_tiny, **kwargs) -> Path:
    """A converted tiny model (narrow, one layer: the vocab is what is tested)."""
    hf = make_tiny(hidden_size=64, num_hidden_layers=1, intermediate_size=64, **kwargs)
    return convert(hf, hf / "m.gguf", outtype="f32").path


# --------------------------------------------------------------------------- SentencePiece


def test_parse_spm_agrees_with_sentencepiece(tiny_tokenizer_dir):
    import sentencepiece as spm

    path = tiny_tokenizer_dir / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    m = parse_spm(path.read_bytes())
    assert len(m.pieces) == sp.get_piece_size() == 1000
    for i in range(sp.get_piece_size()):
        assert m.pieces[i] == sp.id_to_piece(i)
        assert m.scores[i] == sp.get_score(i)
        want = (
            TokenType.BYTE
            if sp.is_byte(i)
            else TokenType.CONTROL
            if sp.is_control(i)
            else TokenType.UNKNOWN
            if sp.is_unknown(i)
            else TokenType.UNUSED
            if sp.is_unused(i)
            else TokenType.NORMAL
        )
        assert m.types[i] == want, (i, m.pieces[i])
    assert (m.model_type, m.byte_fallback, m.normalizer) == (2, True, "identity")
    assert (m.add_dummy_prefix, m.remove_extra_whitespaces) == (True, False)
    assert (m.unk_id, m.bos_id, m.eos_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())


def test_sentencepiece_gguf_metadata(make_tiny, tiny_tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    r = gguf.GGUFReader(small(make_tiny))
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(1000)]
    assert kv["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(1000)])
    assert kv["tokenizer.ggml.token_type"].count(TokenType.BYTE) == 256
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert kv["tokenizer.ggml.unknown_token_id"] == sp.unk_id()
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is True
    assert kv["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert r.get_field("tokenizer.ggml.bos_token_id").types[0] == gguf.GGUFValueType.UINT32


def test_llama_cpp_tokenizes_like_sentencepiece(make_tiny, tiny_tokenizer_dir):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    llm = vocab_only(small(make_tiny))
    for text in PROBES:
        assert llm.tokenize(text.encode(), add_bos=True) == [sp.bos_id(), *sp.encode(text)], repr(text)
    assert llm.detokenize(sp.encode("héllo 🤖")).decode().strip() == "héllo 🤖"
    llm.close()


def test_embedding_larger_than_vocab_is_padded(make_tiny, tiny_tokenizer_dir):
    import sentencepiece as spm

    path = small(make_tiny, vocab_size=1010)
    kv = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert len(kv["tokenizer.ggml.tokens"]) == 1010
    assert kv["tokenizer.ggml.tokens"][1000:] == [f"[PAD{i}]" for i in range(1000, 1010)]
    assert kv["tokenizer.ggml.token_type"][1000:] == [TokenType.UNUSED] * 10
    llm = vocab_only(path)
    assert llm.n_vocab() == 1010
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    assert llm.tokenize(PROBES[0].encode(), add_bos=False) == sp.encode(PROBES[0])
    llm.close()


def _train_spm(out: Path, **options) -> Path:
    from pydoc_data.topics import topics

    import sentencepiece as spm

    out.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(topics[k] for k in sorted(topics)),
        model_prefix=str(out / "tokenizer"),
        vocab_size=1000,
        model_type="bpe",
        minloglevel=2,
        max_sentence_length=100_000,
        **options,
    )
    return out


def test_spm_normalizer_accepted_with_notes(make_tiny, tmp_path):
    tok = _train_spm(tmp_path / "nfkc", byte_fallback=True)  # default: nmt_nfkc, remove extra whitespace
    hf = make_tiny(tokenizer_dir=tok, hidden_size=64, num_hidden_layers=1, intermediate_size=64)
    report = convert(hf, hf / "m.gguf", outtype="f32")
    notes = " ".join(report.notes)
    assert "nmt_nfkc" in notes and "extra whitespace" in notes


def test_spm_without_byte_fallback_is_refused(tmp_path):
    tok = _train_spm(tmp_path / "nobytes", byte_fallback=False)
    with pytest.raises(TokenizerError, match="byte_fallback=True") as info:
        load_vocab(tok, n_embd_rows=1000)
    assert "aborts" in info.value.what


# --------------------------------------------------------------------------- byte-level BPE (tokenizers)


def train_bpe(out: Path, *, pre_tokenizer, ignore_merges: bool = False, full_alphabet: bool = True) -> Path:
    """A byte-level BPE tokenizer folder (tokenizer.json + tokenizer_config.json) trained on CPython's docs."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [],
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        show_progress=False,
    )
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "add_bos_token": True,
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def split_then_bytes(regex: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@pytest.mark.parametrize("style,pre", [("llama3", "llama-bpe"), ("qwen2", "qwen2"), ("gpt2", "gpt-2")])
def test_llama_cpp_tokenizes_like_tokenizers(make_tiny, tmp_path, style, pre):
    from tokenizers import Tokenizer, pre_tokenizers

    pre_tok = {
        "llama3": split_then_bytes(LLAMA3_REGEX),
        "qwen2": split_then_bytes(QWEN2_REGEX),
        "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    }[style]
    tok_dir = train_bpe(tmp_path / "tok", pre_tokenizer=pre_tok, ignore_merges=style == "llama3")
    hf = make_tiny(tokenizer_dir=tok_dir, hidden_size=64, num_hidden_layers=1, intermediate_size=64)
    report = convert(hf, hf / "m.gguf", outtype="f32")
    assert report.tokenizer == f"bpe ({pre})" and report.notes == ()
    kv = {k: f.contents() for k, f in gguf.GGUFReader(report.path).fields.items()}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == pre
    assert kv["tokenizer.ggml.token_type"][:2] == [TokenType.CONTROL, TokenType.CONTROL]
    assert kv["tokenizer.ggml.bos_token_id"] == 0 and kv["tokenizer.ggml.eos_token_id"] == 1
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert len(kv["tokenizer.ggml.merges"]) == len(
        json.loads((tok_dir / "tokenizer.json").read_text())["model"]["merges"]
    )
    llm = vocab_only(report.path)
    for text in PROBES:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ref.encode(text).ids, repr(text)
    assert llm.tokenize(b"hi", add_bos=True)[0] == 0
    llm.close()


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import pre_tokenizers

    tok = train_bpe(tmp_path / "a", pre_tokenizer=split_then_bytes(r"\w+|[^\w\s]+|\s+"))
    with pytest.raises(TokenizerError, match="unknown pre-tokenizer split regex") as info:
        load_vocab(tok, n_embd_rows=1200)
    assert "llama-bpe" in info.value.fix
    tok = train_bpe(
        tmp_path / "b",
        pre_tokenizer=pre_tokenizers.Sequence(
            [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        ),
    )
    with pytest.raises(TokenizerError, match="unsupported pre-tokenizer"):
        load_vocab(tok, n_embd_rows=1200)


def test_bpe_without_the_byte_alphabet_is_refused(tmp_path):
    tok = train_bpe(tmp_path / "a", pre_tokenizer=split_then_bytes(LLAMA3_REGEX), full_alphabet=False)
    with pytest.raises(TokenizerError, match="256 byte symbols"):
        load_vocab(tok, n_embd_rows=1200)


def test_byte_level_alphabet_matches_tokenizers():
    from tokenizers import pre_tokenizers

    assert sorted(byte_level_alphabet()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert byte_level_alphabet()[ord(" ")] == "Ġ" and byte_level_alphabet()[ord("A")] == "A"
