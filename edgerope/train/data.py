"""Training data for fine-tuning: load text, tokenize with the checkpoint's tokenizer, pack, split, PoSE positions.

What it does:

* ``load_documents`` reads text files, folders and JSONL.  Include rule for
  folders: every file below it (recursively, sorted by relative path) whose
  suffix is in ``TEXT_SUFFIXES`` (one document per file) or ``.jsonl`` (one
  document per line), skipping hidden files and folders (names starting with
  ``.``).  A file named explicitly must have one of those suffixes.  JSONL
  lines are objects with a text field (``text`` unless told otherwise); a bad
  line is an error naming its line number.  Blank documents are dropped.
* ``load_tokenizer`` opens the checkpoint's tokenizer: SentencePiece
  ``tokenizer.model`` or Hugging Face ``tokenizer.json`` (``tokenizers``
  package), with BOS/EOS ids from ``config.json`` when it names them.
* ``split_documents`` holds out a deterministic fraction of documents;
  ``tokenize_documents`` gives each document ``[BOS] + ids + [EOS]``;
  ``split_heldout`` holds out whole documents when there are enough of them
  (at least one whole document's worth of the fraction), else chunks of one
  row cut from the token stream -- so one long text file gets a held-out
  loss too; ``HoldoutInfo`` says which it did;
  ``pack`` concatenates them (document order shuffled by a seed) and cuts
  fixed-length rows, so document boundaries stay marked by EOS/BOS.
* ``pose_position_ids`` / ``PoseSampler``: PoSE position ids for a training
  window of W tokens that reach a target length L (chunks with random,
  non-decreasing skips), always W long whatever L is.

What it does not do: batching for a framework (arrays are numpy; the trainer
wraps them), streaming corpora larger than memory, chat templates.
No torch import.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgerope.errors import ConfigError, DataError, TokenizerError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".java", ".go", ".rs")
JSONL_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Document:
    """One training document and where it came from (``path`` or ``path:line``; ``file``: the file it is in)."""

    text: str
    source: str
    file: str = ""


# ---------------------------------------------------------------------------------------------------- loading


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not UTF-8 text (byte {exc.start})", where=str(path), fix="convert the file to UTF-8 or leave it out"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror}", where=str(path)) from None


def _read_jsonl(path: Path, text_field: str) -> list[Document]:
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"line {n} is not valid JSON ({exc.msg})", where=where, fix="one JSON object per line"
            ) from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(
                f"line {n} has no {text_field!r} field",
                where=where,
                fix=f"give every line a {text_field!r} string, or name the field with --text-field (text_field=)",
            )
        if not isinstance(obj[text_field], str):
            raise DataError(f"line {n}: {text_field!r} is {type(obj[text_field]).__name__}, not a string", where=where)
        docs.append(Document(obj[text_field], where, str(path)))
    return docs


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _load_path(path: Path, text_field: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == JSONL_SUFFIX:
        return _read_jsonl(path, text_field)
    if suffix in TEXT_SUFFIXES:
        return [Document(_read_text(path), str(path), str(path))]
    raise DataError(
        f"unknown data file type {path.suffix or '(no suffix)'!r}",
        where=str(path),
        fix=f"use text files ({', '.join(TEXT_SUFFIXES)}) or JSONL ({JSONL_SUFFIX}) with --data, or rename the file",
    )


def load_documents(paths: str | Path | Iterable[str | Path], *, text_field: str = "text") -> list[Document]:
    """Documents of the files and folders in ``paths`` (see the module docstring for the include rule).

    Raises ``DataError`` for a missing path, an explicitly named file of unknown type, a bad JSONL
    line (with its number), or when no non-blank document is found.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    docs: list[Document] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not _is_hidden(f, p)
                and (f.suffix.lower() in TEXT_SUFFIXES or f.suffix.lower() == JSONL_SUFFIX)
            )
            for f in files:
                docs.extend(_load_path(f, text_field))
        elif p.is_file():
            docs.extend(_load_path(p, text_field))
        else:
            raise DataError("no such file or folder", where=str(p), fix="check the --data path (data=)")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(
            "no training text found",
            where=", ".join(str(i) for i in items) or "(no paths)",
            fix=f"give --data non-empty text files ({', '.join(TEXT_SUFFIXES)}), folders of them, or JSONL with a "
            f"{text_field!r} field (--text-field names another)",
        )
    return docs


# ---------------------------------------------------------------------------------------------------- tokenizer


@dataclass
class TextTokenizer:
    """A checkpoint's tokenizer: ``encode`` (no special tokens), ``decode``, and the BOS/EOS ids."""

    encode_fn: Callable[[str], Sequence[int]]
    decode_fn: Callable[[list[int]], str]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    source: str

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return list(self.encode_fn(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""
        return str(self.decode_fn([int(i) for i in ids if i not in (self.bos_id, self.eos_id)]))

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the model sees a prompt: BOS first when the tokenizer config adds it."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"cannot read {path.name}: {exc}", where=str(path)) from None


def load_tokenizer(model_dir: str | Path) -> TextTokenizer:
    """The tokenizer of the HF checkpoint folder ``model_dir`` (``tokenizer.model`` preferred over ``tokenizer.json``)."""
    d = Path(model_dir)
    cfg, tok_cfg = _json(d / "config.json"), _json(d / "tokenizer_config.json")
    add_bos = bool(tok_cfg.get("add_bos_token", True))
    if (d / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        bos = cfg.get("bos_token_id", sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = cfg.get("eos_token_id", sp.eos_id() if sp.eos_id() >= 0 else None)
        return TextTokenizer(sp.encode, sp.decode, bos, eos, add_bos, str(d / "tokenizer.model"))
    if (d / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(
                "tokenizer.json needs the 'tokenizers' package", where=str(d), fix="pip install tokenizers"
            ) from None
        tk = Tokenizer.from_file(str(d / "tokenizer.json"))

        def special(name: str) -> int | None:
            if cfg.get(f"{name}_token_id") is not None:
                return int(cfg[f"{name}_token_id"])
            tok = tok_cfg.get(f"{name}_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return tk.token_to_id(tok) if tok else None

        add_bos = bool(tok_cfg.get("add_bos_token", False))
        return TextTokenizer(
            lambda s: tk.encode(s, add_special_tokens=False).ids,
            tk.decode,
            special("bos"),
            special("eos"),
            add_bos,
            str(d / "tokenizer.json"),
        )
    raise TokenizerError(
        "no tokenizer.model or tokenizer.json", where=str(d), fix="copy the checkpoint's tokenizer files beside it"
    )


# ---------------------------------------------------------------------------------------------------- split, pack


def split_documents(
    docs: Sequence[Document], *, holdout: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, held-out): a seeded random ``holdout`` fraction of whole documents (at least one when > 0).

    The order inside each part follows the input.  Raises ``DataError`` when nothing would remain to train on.
    """
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}", fix="use --holdout 0.05 (holdout=), or 0")
    n_hold = 0 if holdout == 0 else max(1, round(len(docs) * holdout))
    if n_hold >= len(docs):
        raise DataError(
            f"{len(docs)} document(s) cannot be split with holdout {holdout}: nothing would remain to train on",
            fix="add documents, or lower --holdout (holdout=; 0 holds nothing out)",
        )
    held = set(np.random.default_rng(seed).permutation(len(docs))[:n_hold].tolist())
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def tokenize_documents(docs: Sequence[Document], tokenizer: TextTokenizer) -> list[np.ndarray]:
    """Each document as int32 ``[BOS] + ids + [EOS]`` (BOS/EOS left out when the tokenizer has none)."""
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [np.asarray(head + tokenizer.encode(d.text) + tail, dtype=np.int32) for d in docs]


def pack(token_docs: Sequence[np.ndarray], *, seq_len: int, seed: int | None = 0) -> np.ndarray:
    """Rows of ``seq_len`` tokens (N, seq_len) int32: documents concatenated and cut, the tail dropped.

    The document order is shuffled with ``seed`` (None keeps it).  Boundaries stay where they are, marked
    by each document's EOS/BOS.  Raises ``DataError`` when there is not one full row.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    total = sum(len(t) for t in token_docs)
    if total < seq_len:
        raise DataError(
            f"the data has {total} tokens, fewer than one sequence of {seq_len}",
            fix="add more text, or lower the row length with --seq-len (seq_len=)",
        )
    order = np.arange(len(token_docs)) if seed is None else np.random.default_rng(seed).permutation(len(token_docs))
    flat = np.concatenate([np.asarray(token_docs[i], dtype=np.int32) for i in order])  # (total,)
    n = total // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)  # (total,) -> (N, seq_len)


PAD = -1  # marks padding in rows packed with whole=True: never a label, replaced by EOS as an input


def pack_whole(token_docs: Sequence[np.ndarray], *, seq_len: int, seed: int | None = 0) -> np.ndarray:
    """Rows of ``seq_len`` (N, seq_len) int32 that never cut a document shorter than a row.

    Documents (shuffled with ``seed``) go into the current row while they fit; one that does not fit starts a
    new row and the rest of the old one is ``PAD``.  A document longer than a row is cut into rows of its own
    (its last piece starts a row).  For data whose documents must stay whole, e.g. a question and the
    passage it asks about: ``pack`` would cut some of them at row boundaries and train the model to answer
    questions whose passage it cannot see.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    order = np.arange(len(token_docs)) if seed is None else np.random.default_rng(seed).permutation(len(token_docs))
    rows: list[np.ndarray] = []
    row: list[np.ndarray] = []
    used = 0

    def flush() -> None:
        nonlocal row, used
        if used:
            rows.append(np.concatenate([*row, np.full(seq_len - used, PAD, dtype=np.int32)]))
        row, used = [], 0

    for i in order:
        doc = np.asarray(token_docs[i], dtype=np.int32)
        while len(doc) > seq_len:  # long documents: full rows of their own
            flush()
            rows.append(doc[:seq_len])
            doc = doc[seq_len:]
        if used + len(doc) > seq_len:
            flush()
        row.append(doc)
        used += len(doc)
    flush()
    if not rows or all((r == PAD).sum() > seq_len - 2 for r in rows):
        raise DataError("the data has no document of 2 or more tokens", fix="add more text")
    return np.stack(rows)


def epoch_order(n_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the packed rows for one epoch, fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


@dataclass(frozen=True)
class HoldoutInfo:
    """How the held-out text was chosen: ``by`` "documents", "chunks" (rows cut from the token stream) or "none"."""

    by: str
    documents: int  # whole documents held out (by documents)
    chunks: int  # rows of ``chunk_tokens`` held out (by chunks)
    chunk_tokens: int
    tokens: int  # held-out tokens
    total_tokens: int  # tokens of all documents, before the split

    @property
    def fraction(self) -> float:
        return self.tokens / self.total_tokens if self.total_tokens else 0.0

    def describe(self) -> str:
        """One line for a run summary."""
        if self.by == "none":
            return "none (--holdout 0)"
        what = f"{self.documents} whole document(s)" if self.by == "documents" else (
            f"{self.chunks} chunk(s) of {self.chunk_tokens} tokens cut from the text"
        )  # fmt: skip
        return f"{what}: {self.tokens} of {self.total_tokens} tokens ({100 * self.fraction:.1f}%)"


def split_heldout(
    token_docs: Sequence[np.ndarray], *, holdout: float, chunk: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray], HoldoutInfo]:
    """(training pieces, held-out pieces, what was done) for tokenized documents.

    Whole documents when there are enough of them: ``holdout x documents >= 1`` and the held-out documents fill
    at least one row of ``chunk`` tokens (``split_documents``' seeded choice).  Otherwise -- one long file, a few
    documents -- chunks: the documents' tokens joined in order and cut into rows of ``chunk``, a seeded
    ``holdout`` fraction of those rows (at least one) held out, and the text between them kept for training as
    separate pieces.  Raises ``DataError`` when not even one row can be held out with a row left to train on.
    """
    total = int(sum(len(t) for t in token_docs))
    if holdout == 0:
        return list(token_docs), [], HoldoutInfo("none", 0, 0, chunk, 0, total)
    docs = [Document("", str(i)) for i in range(len(token_docs))]  # split_documents' choice, by index
    if len(token_docs) * holdout >= 1:
        train_idx, held_idx = split_documents(docs, holdout=holdout, seed=seed)
        held = [token_docs[int(d.source)] for d in held_idx]
        if sum(len(t) for t in held) >= chunk:
            info = HoldoutInfo("documents", len(held), 0, chunk, int(sum(len(t) for t in held)), total)
            return [token_docs[int(d.source)] for d in train_idx], held, info
    flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in token_docs]) if token_docs else np.zeros(0, np.int32)
    n_chunks = total // chunk
    n_hold = max(1, round(n_chunks * holdout))
    if n_chunks < 2 or n_hold >= n_chunks:
        raise DataError(
            f"the data has {total} tokens: too few to hold out {n_hold} row(s) of {chunk} tokens "
            f"(holdout {holdout}) and train on the rest",
            fix="add text, lower --holdout (holdout=; 0 holds nothing out), or lower --seq-len (seq_len=)",
        )
    chosen = np.sort(np.random.default_rng(seed).choice(n_chunks, size=n_hold, replace=False))
    train: list[np.ndarray] = []
    prev = 0
    for c in chosen:
        if c * chunk > prev:
            train.append(flat[prev : c * chunk])
        prev = (c + 1) * chunk
    if prev < total:
        train.append(flat[prev:])
    held = [flat[c * chunk : (c + 1) * chunk] for c in chosen]
    return train, held, HoldoutInfo("chunks", 0, n_hold, chunk, n_hold * chunk, total)


@dataclass(frozen=True)
class PackedData:
    """Packed training rows, held-out pieces (and rows when they fill one), with counts."""

    train: np.ndarray  # (N, seq_len) int32
    heldout: np.ndarray  # (M, seq_len) int32, M may be 0
    heldout_docs: list[np.ndarray]
    n_documents: int
    n_train_tokens: int
    holdout: HoldoutInfo
    sources: int  # files the documents came from
    train_pieces: list[np.ndarray]  # the training text, tokenized (documents or the pieces between held-out chunks)

    def summary(self) -> dict[str, Any]:
        """What the run reads, for its report (JSON-able)."""
        return {
            "files": self.sources,
            "documents": self.n_documents,
            "tokens": self.holdout.total_tokens,
            "train_rows": int(self.train.shape[0]),
            "train_tokens": self.n_train_tokens,
            "heldout": {**asdict(self.holdout), "fraction": self.holdout.fraction},
            "heldout_rows": int(self.heldout.shape[0]),
            "heldout_text": self.holdout.describe(),
        }


def build_dataset(
    paths: str | Path | Iterable[str | Path],
    model_dir: str | Path,
    *,
    seq_len: int,
    holdout: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    whole: bool = False,
) -> PackedData:
    """Load, tokenize, split (``split_heldout``) and pack ``paths`` with the tokenizer of the checkpoint
    ``model_dir`` into rows of ``seq_len`` (``whole=True``: training rows by ``pack_whole``, documents kept whole,
    padding marked ``PAD``)."""
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}", fix="use --holdout 0.05 (holdout=), or 0")
    docs = load_documents(paths, text_field=text_field)
    tok = load_tokenizer(model_dir)
    token_docs = tokenize_documents(docs, tok)
    total = sum(len(t) for t in token_docs)
    if total < seq_len:
        raise DataError(
            f"the data has {total} tokens, fewer than one sequence of {seq_len}",
            where=", ".join(sorted({d.file or d.source for d in docs}))[:300],
            fix="add more text, or lower the row length with --seq-len (seq_len=)",
        )
    train_tok, held_tok, info = split_heldout(token_docs, holdout=holdout, chunk=seq_len, seed=seed)
    train = pack_whole(train_tok, seq_len=seq_len, seed=seed) if whole else pack(train_tok, seq_len=seq_len, seed=seed)
    held_total = sum(len(t) for t in held_tok)
    heldout = pack(held_tok, seq_len=seq_len, seed=None) if held_total >= seq_len else np.zeros((0, seq_len), np.int32)
    sources = len({d.file or d.source for d in docs})
    return PackedData(train, heldout, held_tok, len(docs), int((train != PAD).sum()), info, sources, train_tok)


# ---------------------------------------------------------------------------------------------------- PoSE


def _check_pose(window: int, target: int, chunks: int) -> None:
    if target <= window:
        raise ConfigError(
            f"PoSE target length {target} must exceed the training window {window}",
            fix="PoSE is for reaching a context longer than the window trained on; raise the target",
        )
    if not 1 <= chunks <= window:
        raise ConfigError(f"PoSE chunks must be in 1..{window}, got {chunks}")


def pose_position_ids(window: int, target: int, *, chunks: int = 2, rng: np.random.Generator) -> np.ndarray:
    """Position ids (window,) int64 for one PoSE sample.

    The window is cut into ``chunks`` non-empty pieces at random points.  The first piece keeps ids 0.. (no
    skip); piece i > 1 is shifted by a skip u_i, with u_2 <= ... <= u_k drawn uniformly from [0, target - window]
    and sorted.  So ids strictly increase, the largest is window - 1 + u_k < target, and the distance between
    the first and last piece reaches up to target - 1.  Pinning the first skip at 0 (the PoSE authors' revised
    sampler) makes the gap between two pieces uniform; drawing every skip and sorting would make it triangular:
    the top quarter of the range would get 6% of the samples and the bottom quarter 44%.
    """
    _check_pose(window, target, chunks)
    cuts = np.sort(rng.choice(np.arange(1, window), size=chunks - 1, replace=False)) if chunks > 1 else np.array([])
    skips = np.concatenate([[0], np.sort(rng.integers(0, target - window, size=chunks - 1, endpoint=True))])
    piece = np.searchsorted(cuts, np.arange(window), side="right")  # (window,) piece index of each position
    return np.arange(window, dtype=np.int64) + skips[piece]


class PoseSampler:
    """Seeded source of PoSE position ids: ``sample(batch)`` -> (batch, window) int64, memory independent of target."""

    def __init__(self, window: int, target: int, *, chunks: int = 2, seed: int = 0) -> None:
        _check_pose(window, target, chunks)
        self.window, self.target, self.chunks = window, target, chunks
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int = 1) -> np.ndarray:
        return np.stack(
            [pose_position_ids(self.window, self.target, chunks=self.chunks, rng=self.rng) for _ in range(batch)]
        )  # (batch, window)
