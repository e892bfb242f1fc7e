"""Training text for in-context retrieval: passkey and multi-key samples mixed with plain documentation text.

What it does:

* ``retrieval_text`` writes one passkey or multi-key sample (EVAL.md's
  templates from ``edgerope.evaluation.protocols``, the answer appended) whose filler is
  either the Landmark filler or a span of CPython's documentation text, with
  roughly a requested number of characters;
* ``training_rows`` builds a batch of token rows of exactly ``seq_len``
  tokens for pretraining or fine-tuning: each row is plain documentation
  text, or one retrieval sample sized to fit the row followed by documentation
  text, deterministically from ``(seed, step)``;
* ``write_jsonl`` writes such samples as a JSONL data file that
  ``edgerope finetune --data`` reads.

The model learns *how* to retrieve from these samples; the evaluation uses
its own seeds, so no evaluation prompt is a training sample (keys may repeat:
they are drawn from the same 1..50000 range).

What it does not do: import torch, tokenize for a model other than through
the ``TextTokenizer`` it is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerope.errors import ConfigError
from edgerope.prompts import (
    DOC_TEMPLATE,
    INTRO,
    KEY_RANGE,
    MULTI_NEEDLE,
    MULTI_QUESTION,
    NEEDLE,
    QUESTION,
    QUESTION_TEMPLATE,
    filler_text,
)
from edgerope.system.files import check_output, partial_path
from edgerope.train.data import Document, TextTokenizer

KINDS = ("text", "passkey", "multikey", "qa")


@dataclass(frozen=True)
class Mixture:
    """Fractions of rows that are plain text, passkey, multi-key and document-question samples (normalized)."""

    text: float = 0.3
    passkey: float = 0.3
    multikey: float = 0.2
    qa: float = 0.2

    def probabilities(self) -> np.ndarray:
        p = np.array([self.text, self.passkey, self.multikey, self.qa], dtype=np.float64)
        if (p < 0).any() or p.sum() <= 0:
            raise ConfigError(f"mixture fractions must be >= 0 and not all 0, got {p.tolist()}")
        return p / p.sum()


# documentation topics never trained on, the perplexity documents: each >= 8,800 characters, and (unlike
# e.g. "attribute-access", repeated inside "specialnames") no 200-character span of them appears in another topic
HELDOUT_TOPICS = ("debugger", "import", "strings", "typesmapping")


def corpus_text() -> str:
    """CPython's documentation topics (``pydoc_data``) minus ``HELDOUT_TOPICS``, in a fixed order, one string."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics) if name not in HELDOUT_TOPICS)


def heldout_documents() -> list[Document]:
    """The held-out documentation topics, one document each (perplexity text the models never trained on)."""
    from pydoc_data.topics import topics

    return [Document(topics[name], f"pydoc_data.topics:{name}") for name in HELDOUT_TOPICS if name in topics]


def _filler(rng: np.random.Generator, corpus: str, n_chars: int) -> str:
    """The Landmark filler (half the time) or a random span of documentation text, ``n_chars`` long."""
    if rng.random() < 0.5 or len(corpus) <= n_chars:
        return filler_text(n_chars)
    start = int(rng.integers(0, len(corpus) - n_chars))
    return corpus[start : start + n_chars]


def _key(rng: np.random.Generator) -> int:
    return int(rng.integers(KEY_RANGE[0], KEY_RANGE[1], endpoint=True))


def retrieval_text(rng: np.random.Generator, kind: str, *, n_chars: int, corpus: str) -> str:
    """One ``kind`` ('passkey', 'multikey' or 'qa') sample with about ``n_chars`` of filler, answer included."""
    filler = _filler(rng, corpus, max(0, n_chars))
    if kind == "passkey":
        k = _key(rng)
        cut = int(rng.integers(0, len(filler) + 1))
        return "\n".join([INTRO, filler[:cut], NEEDLE.format(k=k), filler[cut:], QUESTION]) + f" {k}."
    if kind == "multikey":
        n_keys = int(rng.integers(2, 5 if n_chars >= 1000 else 4))
        pool = rng.choice(np.arange(KEY_RANGE[0], KEY_RANGE[1] + 1), size=2 * n_keys, replace=False).tolist()
        keys, values = pool[:n_keys], pool[n_keys:]
        cuts = sorted(int(c) for c in rng.integers(0, len(filler) + 1, size=n_keys))
        parts, prev = [INTRO], 0
        for k, v, c in zip(keys, values, cuts, strict=True):
            parts += [filler[prev:c], MULTI_NEEDLE.format(k=k, v=v)]
            prev = c
        asked = int(rng.integers(n_keys))
        parts += [filler[prev:], MULTI_QUESTION.format(k=keys[asked])]
        return "\n".join(parts) + f" {values[asked]}."
    if kind == "qa":  # edgerope ask's plain prompt: a document holding one fact, then a question about it
        k = _key(rng)
        if rng.random() < 0.5:
            fact, question, answer = NEEDLE.format(k=k), "What is the pass key?", k
        else:
            v = _key(rng)
            fact, question, answer = MULTI_NEEDLE.format(k=k, v=v), f"What is the value of key {k}?", v
        cut = int(rng.integers(0, len(filler) + 1))
        document = " ".join(part for part in (filler[:cut], fact, filler[cut:]) if part)
        return DOC_TEMPLATE.format(document=document) + QUESTION_TEMPLATE.format(question=question) + f" {answer}."
    raise ConfigError(f"unknown sample kind {kind!r}", fix="use 'passkey', 'multikey' or 'qa'")


class RowBuilder:
    """Token rows of ``seq_len`` for a tokenizer: retrieval samples sized to fit, the rest documentation text."""

    def __init__(
        self, tokenizer: TextTokenizer, *, seq_len: int, mixture: Mixture | None = None, dense: bool = False
    ) -> None:
        if seq_len < 64:
            raise ConfigError(f"seq_len must be >= 64 for retrieval samples, got {seq_len}")
        self.tok, self.seq_len, self.dense = tokenizer, seq_len, dense
        self.min_sample = 96
        self.mixture = mixture or Mixture()
        self.corpus = corpus_text()
        self.corpus_ids = np.asarray(tokenizer.encode(self.corpus), dtype=np.int32)  # (N,)
        self.head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self.chars_per_token = len(self.corpus) / max(1, len(self.corpus_ids))

    def _text_ids(self, rng: np.random.Generator, n: int) -> list[int]:
        start = int(rng.integers(0, len(self.corpus_ids) - n))
        return self.corpus_ids[start : start + n].tolist()

    def _sample_ids(self, rng: np.random.Generator, kind: str, budget: int) -> list[int]:
        """A retrieval sample of at most ``budget`` tokens (BOS and EOS included): at least half of it, or (dense
        rows) at least ``min_sample``."""
        low = min(budget, self.min_sample) if self.dense else budget // 2
        want = int(rng.integers(low, budget + 1))
        n_chars = int(want * self.chars_per_token)
        for _ in range(8):
            ids = (
                self.head + self.tok.encode(retrieval_text(rng, kind, n_chars=n_chars, corpus=self.corpus)) + self.tail
            )
            if len(ids) <= budget:
                return ids
            n_chars = max(0, n_chars - int((len(ids) - budget + 8) * self.chars_per_token * 1.5))
        raise ConfigError(f"cannot fit a {kind} sample into {budget} tokens", fix="use a longer seq_len")

    def row(self, rng: np.random.Generator) -> np.ndarray:
        """One row (seq_len,) int32: documentation text, or retrieval samples back to back (each sized at random
        between ``min_sample`` tokens and what is left of the row) with documentation text after the last."""
        p = self.mixture.probabilities()
        kind = KINDS[int(rng.choice(len(KINDS), p=p))]
        ids: list[int] = []
        if kind != "text":
            retrieval = p[1:] / p[1:].sum()
            while self.seq_len - len(ids) >= self.min_sample:
                try:
                    ids += self._sample_ids(rng, kind, self.seq_len - len(ids))
                except ConfigError:  # this kind's fixed text does not fit what is left of the row
                    break
                kind = KINDS[1 + int(rng.choice(len(retrieval), p=retrieval))]
                if not self.dense:
                    break
        ids += self._text_ids(rng, self.seq_len - len(ids))
        return np.asarray(ids, dtype=np.int32)

    def rows(self, n: int, *, seed: int | Sequence[int]) -> np.ndarray:
        """``n`` rows (n, seq_len) int32 from the RNG seeded ``seed`` (e.g. ``[recipe_seed, step]``)."""
        rng = np.random.default_rng(seed)
        return np.stack([self.row(rng) for _ in range(n)])


def write_jsonl(
    path: str | Path,
    *,
    n_samples: int,
    max_chars: int,
    seed: int,
    mixture: Mixture | None = None,
    min_fraction: int = 8,
    force: bool = False,
) -> Path:
    """A JSONL file (``{"text": ...}`` per line): retrieval samples (filler up to ``max_chars``, plus the
    template) and documentation spans up to ``max_chars``.

    Sample sizes are uniform in [max_chars / min_fraction, max_chars] characters, so a run packing them at the target
    length sees needles at every distance.  For ``edgerope finetune --data``.
    """
    if n_samples < 1 or max_chars < 64:
        raise ConfigError(f"need n_samples >= 1 and max_chars >= 64, got {n_samples} and {max_chars}")
    rng = np.random.default_rng(seed)
    corpus = corpus_text()
    p = (mixture or Mixture()).probabilities()
    lines = []
    for _ in range(n_samples):
        kind = KINDS[int(rng.choice(len(KINDS), p=p))]
        n = int(rng.integers(max_chars // min_fraction, max_chars + 1))
        text = _filler(rng, corpus, n) if kind == "text" else retrieval_text(rng, kind, n_chars=n, corpus=corpus)
        lines.append(json.dumps({"text": text}, ensure_ascii=False))
    out = Path(path)
    check_output(out, force=force)
    tmp = partial_path(out)
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
