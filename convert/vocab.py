"""Tokenizers in GGUF: a SentencePiece or byte-level BPE vocab written so that llama.cpp tokenizes exactly.

What it does:

* SentencePiece (``tokenizer.model``): pieces, scores and token types read
  from the model file itself (a small protobuf wire reader, no protobuf
  package needed), written as ``tokenizer.ggml.model = "llama"``.  A vocab
  without the 256 ``<0xXX>`` byte pieces is refused: llama.cpp aborts the
  process on the first character it cannot cover (docs/llama_cpp.md §6).
  Normalizers llama.cpp does not apply (nmt_nfkc, extra-whitespace removal)
  and unigram models are accepted with a note;
* Hugging Face byte-level BPE (``tokenizer.json``): tokens, merges, token
  types and a pre-tokenizer name llama.cpp implements, identified from the
  tokenizer's pre-tokenizer regex.  Unknown pre-tokenizers are refused with
  the fix, never guessed;
* special ids, add-bos/eos flags and the chat template via ``gguf.SpecialVocab``;
* padding to the embedding row count with ``[PAD{i}]`` UNUSED tokens.

What it does not do: WordPiece/Unigram(T5) tokenizers, or tokenizing text.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import TokenType

from edgerope.convert.tokenizer_files import TokenizerFiles
from edgerope.errors import TokenizerError

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
PAD_SCORE = -1000.0

# HF pre-tokenizer Split regexes (as in tokenizer.json) -> the llama.cpp pre-tokenizer that implements them.
# Facts from llama.cpp src/llama-vocab.cpp (llm_tokenizer_bpe regex_exprs and the tokenizer_pre names).
_CONTRACTIONS_CI = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CONTRACTIONS_ADAPTED = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# o200k (GPT-4o; Phi-4-mini's tokenizer.json): llama.cpp's "gpt-4o" pre-tokenizer
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
GPT4O_REGEX = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS_CI}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    rf"{_CONTRACTIONS_CI}?|\p{{N}}{{1,3}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_REGEXES: dict[str, str] = {
    _CONTRACTIONS_CI + _LLAMA3_TAIL: "llama-bpe",
    _CONTRACTIONS_ADAPTED + _LLAMA3_TAIL: "llama-bpe",
    _CONTRACTIONS_CI + _QWEN2_TAIL: "qwen2",
    _CONTRACTIONS_ADAPTED + _QWEN2_TAIL: "qwen2",
    GPT4O_REGEX: "gpt-4o",
}
# llama.cpp forces ignore_merges for these pre-tokenizers (a whole word in the vocab is taken as is).
PRE_IGNORING_MERGES = frozenset({"llama-bpe"})


# --------------------------------------------------------------------------- protobuf wire reading


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Decode one protobuf message level into (field number, wire type, value) triples."""
    out: list[tuple[int, int, Any]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos : pos + n], pos + n
        elif wt == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append((num, wt, val))
    return out


@dataclass
class SpmModel:
    """The parts of a SentencePiece ModelProto that decide llama.cpp compatibility."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # SentencePiece piece types, numbered like gguf.TokenType
    model_type: int = 1  # 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool = False
    normalizer: str = "nmt_nfkc"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_spm(data: bytes) -> SpmModel:
    """Read pieces, trainer and normalizer settings from a serialized SentencePiece model."""
    m = SpmModel(pieces=[], scores=[], types=[])
    for num, wt, val in _fields(data):
        if num == 1 and wt == 2:  # SentencePiece piece
            piece, score, ptype = "", 0.0, int(TokenType.NORMAL)
            for n, w, v in _fields(val):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 2 and w == 5:
                    (score,) = struct.unpack("<f", v)
                elif n == 3 and w == 0:
                    ptype = v
            m.pieces.append(piece)
            m.scores.append(float(score))
            m.types.append(ptype)
        elif num == 2 and wt == 2:  # TrainerSpec
            for n, w, v in _fields(val):
                if w != 0:
                    continue
                if n == 3:
                    m.model_type = v
                elif n == 35:
                    m.byte_fallback = bool(v)
                elif n == 40:
                    m.unk_id = _int32(v)
                elif n == 41:
                    m.bos_id = _int32(v)
                elif n == 42:
                    m.eos_id = _int32(v)
                elif n == 43:
                    m.pad_id = _int32(v)
        elif num == 3 and wt == 2:  # NormalizerSpec
            for n, w, v in _fields(val):
                if n == 1 and w == 2:
                    m.normalizer = v.decode("utf-8")
                elif n == 3 and w == 0:
                    m.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    m.remove_extra_whitespaces = bool(v)
    return m


# --------------------------------------------------------------------------- the vocab


@dataclass
class GGUFVocab:
    """A vocab ready to write: ``tokenizer.ggml.*`` arrays, flags and special tokens."""

    kind: str  # "sentencepiece" or "bpe"
    model: str  # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None
    special: gguf.SpecialVocab | None = None
    notes: list[str] = field(default_factory=list)
    n_padding: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def write(self, writer: gguf.GGUFWriter) -> None:
        """Add every ``tokenizer.ggml.*`` key (and the chat template) to ``writer``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.special is not None:
            self.special.merges = []  # written above
            self.special.load_merges = False
            self.special.add_to_gguf(writer, quiet=True)

    def pad_to(self, n_rows: int, *, where: str) -> None:
        """Pad with ``[PAD{i}]`` UNUSED tokens to ``n_rows``; refuse a vocab larger than the embedding."""
        n = len(self.tokens)
        if n > n_rows:
            raise TokenizerError(
                f"the tokenizer has {n} tokens but the embedding has only {n_rows} rows",
                where=where,
                fix="use the tokenizer the model was trained with (or resize the embeddings to the tokenizer)",
            )
        for i in range(n, n_rows):
            self.tokens.append(f"[PAD{i}]")
            self.types.append(int(TokenType.UNUSED))
            if self.scores is not None:
                self.scores.append(PAD_SCORE)
        self.n_padding = n_rows - n
        if self.n_padding:
            self.notes.append(
                f"padded the vocab with {self.n_padding} unused [PAD] tokens to the embedding's {n_rows} rows"
            )


def _special_vocab(model_dir: Path, n_vocab: int, *, load_merges: bool) -> gguf.SpecialVocab:
    """gguf's reading of special ids, add-bos/eos flags and the chat template (files type-checked before)."""
    try:
        return gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read the special tokens: {exc}", where=str(model_dir)) from None
    except (AttributeError, TypeError, KeyError, IndexError) as exc:  # a shape TokenizerFiles does not check
        raise TokenizerError(
            f"cannot read the special tokens: a tokenizer or config file has an unexpected structure ({exc!r})",
            where=str(model_dir),
            fix="compare tokenizer_config.json, tokenizer.json and config.json with the files the model shipped with",
        ) from None


def load_sentencepiece(model_dir: Path) -> GGUFVocab:
    """Read ``tokenizer.model`` (+ HF added tokens and special-token files)."""
    path = model_dir / SPM_FILE
    try:
        spm = parse_spm(path.read_bytes())
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise TokenizerError(f"tokenizer.model is not a SentencePiece model ({exc})", where=str(path)) from None
    if not spm.pieces:
        raise TokenizerError("tokenizer.model holds no pieces", where=str(path))
    byte_pieces = {p for p, t in zip(spm.pieces, spm.types, strict=True) if t == TokenType.BYTE}
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in byte_pieces]
    if missing:
        raise TokenizerError(
            f"the SentencePiece model lacks {len(missing)} of the 256 byte-fallback pieces (e.g. {missing[0]}); "
            "llama.cpp aborts the whole process on the first character such a vocab cannot cover",
            where=str(path),
            fix="retrain the tokenizer with byte_fallback=True (and the model with it)",
        )
    notes: list[str] = []
    if spm.normalizer != "identity":
        notes.append(
            f"the SentencePiece normalizer is {spm.normalizer!r}; llama.cpp does not normalize, so inputs that "
            "normalization changes (e.g. full-width or compatibility characters) tokenize differently"
        )
    if spm.remove_extra_whitespaces:
        notes.append(
            "the SentencePiece model removes extra whitespace; llama.cpp keeps it, so runs of spaces tokenize differently"
        )
    if spm.model_type != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(spm.model_type, str(spm.model_type))
        notes.append(f"the SentencePiece model is {kind}, llama.cpp merges greedily by score, some inputs may differ")
    tokens, scores, types = list(spm.pieces), list(spm.scores), list(spm.types)
    for tid, (content, special) in sorted(TokenizerFiles.read(model_dir).added.items()):
        if tid < len(tokens):
            if tokens[tid] != content:
                raise TokenizerError(
                    f"added token {tid} is {content!r} in tokenizer_config.json but {tokens[tid]!r} in tokenizer.model",
                    where=str(model_dir),
                )
            continue
        if tid != len(tokens):
            raise TokenizerError(
                f"added token ids are not contiguous (id {tid} after {len(tokens) - 1})", where=str(model_dir)
            )
        tokens.append(content)
        scores.append(PAD_SCORE)
        types.append(int(TokenType.CONTROL if special else TokenType.USER_DEFINED))
    special_vocab = _special_vocab(model_dir, len(tokens), load_merges=False)
    for typ, tid in (("unk", spm.unk_id), ("bos", spm.bos_id), ("eos", spm.eos_id), ("pad", spm.pad_id)):
        if 0 <= tid < len(tokens):
            special_vocab.special_token_ids.setdefault(typ, tid)
    return GGUFVocab(
        kind="sentencepiece",
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        add_space_prefix=spm.add_dummy_prefix,
        special=special_vocab,
        notes=notes,
    )


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 byte-level BPE uses for the bytes 0..255 (in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _is_smollm(steps: list[dict[str, Any]]) -> bool:
    """SmolLM / SmolLM2 (StarCoder-style): every digit alone, then GPT-2's byte-level regex (llama.cpp "smollm")."""
    return (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits") is True
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex", True) is True
        and not steps[1].get("add_prefix_space")
    )


def identify_pre_tokenizer(pre_tokenizer: Any, *, where: str) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name implementing a tokenizer.json ``pre_tokenizer``."""
    steps = (
        pre_tokenizer.get("pretokenizers")
        if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence"
        else [pre_tokenizer]
    )
    steps = [s for s in steps or [] if isinstance(s, dict)]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_levels = [s for s in steps if s.get("type") == "ByteLevel"]
    if _is_smollm(steps):
        return "smollm"
    others = [s.get("type") for s in steps if s.get("type") not in ("Split", "ByteLevel")]
    fix = (
        "llama.cpp must implement the same pre-tokenizer; edgerope recognises the llama3 ('llama-bpe'), qwen2, "
        "gpt-4o (o200k) and gpt-2 splitting regexes and SmolLM's digits + gpt-2 ('smollm'). Train the tokenizer with one of them (e.g. a Split with the Llama 3 regex, then "
        "ByteLevel(use_regex=False))"
    )
    if len(byte_levels) != 1 or others:
        raise TokenizerError(
            f"unsupported pre-tokenizer {json.dumps(pre_tokenizer)[:200]}: expected byte-level BPE",
            where=where,
            fix=fix,
        )
    if byte_levels[0].get("add_prefix_space"):
        raise TokenizerError(
            "the ByteLevel pre-tokenizer adds a prefix space; llama.cpp's byte-level BPE never does",
            where=where,
            fix="set add_prefix_space=false in the tokenizer's ByteLevel pre-tokenizer",
        )
    if not splits:
        if byte_levels[0].get("use_regex", True):
            return "gpt-2"
        raise TokenizerError("the byte-level pre-tokenizer does not split words at all", where=where, fix=fix)
    if len(splits) == 1 and not byte_levels[0].get("use_regex", True):
        split = splits[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if split.get("behavior") == "Isolated" and not split.get("invert", False) and regex in KNOWN_PRE_REGEXES:
            return KNOWN_PRE_REGEXES[regex]
        shown = regex if regex is not None else json.dumps(split.get("pattern"))
        raise TokenizerError(
            f"unknown pre-tokenizer split regex {shown!r} (behavior {split.get('behavior')!r}); "
            "llama.cpp would split words differently",
            where=where,
            fix=fix,
        )
    raise TokenizerError(f"unsupported pre-tokenizer layout {json.dumps(pre_tokenizer)[:200]}", where=where, fix=fix)


def load_hf_bpe(model_dir: Path) -> GGUFVocab:
    """Read a Hugging Face byte-level BPE ``tokenizer.json``."""
    path = model_dir / HF_FILE
    where = str(path)
    tok = TokenizerFiles.read(model_dir).tokenizer_json or {}
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"tokenizer.json holds a {model.get('type')!r} model; only BPE (byte-level) or a SentencePiece "
            "tokenizer.model can be converted",
            where=where,
        )
    if model.get("byte_fallback"):
        raise TokenizerError(
            "tokenizer.json is a SentencePiece-style BPE (byte_fallback) without its tokenizer.model",
            where=where,
            fix="put the original tokenizer.model beside tokenizer.json",
        )
    pre = identify_pre_tokenizer(tok.get("pre_tokenizer"), where=f"{where}: pre_tokenizer")
    notes: list[str] = []
    if tok.get("normalizer"):
        notes.append(
            f"tokenizer.json has a {tok['normalizer'].get('type')!r} normalizer that llama.cpp does not apply; "
            "inputs it changes tokenize differently"
        )
    if bool(model.get("ignore_merges", False)) != (pre in PRE_IGNORING_MERGES):
        notes.append(
            f"tokenizer.json sets ignore_merges={bool(model.get('ignore_merges', False))} but llama.cpp's {pre!r} "
            f"pre-tokenizer uses ignore_merges={pre in PRE_IGNORING_MERGES}; rare words may tokenize differently"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(t["id"]): t for t in tok.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    n = max([*vocab.values(), *added.keys(), -1]) + 1
    tokens: list[str | None] = [None] * n
    types = [int(TokenType.UNUSED)] * n
    for text, tid in vocab.items():
        tokens[tid] = text
        types[tid] = int(TokenType.NORMAL)
    for tid, info in added.items():
        tokens[tid] = info["content"]
        types[tid] = int(TokenType.CONTROL if info.get("special") else TokenType.USER_DEFINED)
    gaps = 0
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            gaps += 1
    if gaps:
        notes.append(f"{gaps} unused token ids filled with [PAD] tokens")
    missing = [c for c in byte_level_alphabet() if c not in vocab]
    if missing:
        raise TokenizerError(
            f"the byte-level vocab lacks {len(missing)} of the 256 byte symbols; llama.cpp silently drops "
            "characters it cannot cover",
            where=where,
            fix="train the BPE with the full byte-level initial alphabet (ByteLevel.alphabet())",
        )
    special_vocab = _special_vocab(model_dir, n, load_merges=True)
    if not special_vocab.merges:
        raise TokenizerError("tokenizer.json has no BPE merges (llama.cpp requires them)", where=where)
    out = GGUFVocab(
        kind="bpe", model="gpt2", pre=pre, tokens=list(tokens), types=types, special=special_vocab, notes=notes
    )  # type: ignore[arg-type]
    out.merges = special_vocab.merges
    return out


def load_vocab(model_dir: str | Path, *, n_embd_rows: int) -> GGUFVocab:
    """The vocab of a HF model folder, padded to the embedding's ``n_embd_rows``.

    ``tokenizer.model`` (SentencePiece) wins over ``tokenizer.json``, as in
    Hugging Face's Llama/Mistral tokenizers; ``tokenizer.json`` is read as
    byte-level BPE (Llama 3, Qwen2 style).
    """
    model_dir = Path(model_dir)
    if (model_dir / SPM_FILE).is_file():
        vocab = load_sentencepiece(model_dir)
    elif (model_dir / HF_FILE).is_file():
        vocab = load_hf_bpe(model_dir)
    else:
        raise TokenizerError(
            "no tokenizer found (neither tokenizer.model nor tokenizer.json)",
            where=str(model_dir),
            fix="copy the tokenizer files of the base model into the checkpoint folder",
        )
    vocab.pad_to(n_embd_rows, where=str(model_dir))
    return vocab
