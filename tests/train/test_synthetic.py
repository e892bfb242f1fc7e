"""Retrieval training samples: templates, answers, row sizes, determinism, held-out text, the JSONL writer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgerope import prompts
from edgerope.errors import ConfigError, OutputError
from edgerope.prompts import DOC_TEMPLATE, QUESTION_TEMPLATE
from edgerope.train.data import load_tokenizer
from edgerope.train.synthetic import (
    HELDOUT_TOPICS,
    Mixture,
    RowBuilder,
    corpus_text,
    heldout_documents,
    retrieval_text,
    write_jsonl,
)


@pytest.fixture(scope="module")
def corpus() -> str:
    return corpus_text()


def test_passkey_sample_holds_the_needle_and_ends_with_its_key(corpus: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = retrieval_text(rng, "passkey", n_chars=400, corpus=corpus)
        key = int(re.search(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", text).group(1))
        assert text.startswith(prompts.INTRO + "\n")
        assert text.endswith(f"{prompts.QUESTION} {key}.")
        assert prompts.KEY_RANGE[0] <= key <= prompts.KEY_RANGE[1]


def test_multikey_sample_answers_the_key_it_asks_for(corpus: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        text = retrieval_text(rng, "multikey", n_chars=1500, corpus=corpus)
        needles = dict(re.findall(r"The value of key (\d+) is (\d+)\.", text.rsplit("\n", 1)[0]))
        asked, answer = re.search(r"What is the value of key (\d+)\? The value of key \1 is (\d+)\.$", text).groups()
        assert 2 <= len(needles) <= 4 and needles[asked] == answer


def test_qa_sample_uses_the_ask_prompt(corpus: str) -> None:
    rng = np.random.default_rng(2)
    text = retrieval_text(rng, "qa", n_chars=300, corpus=corpus)
    prefix = DOC_TEMPLATE.split("{document}")[0]
    assert text.startswith(prefix)
    question = re.search(r"Question: (.*)\nAnswer: (\d+)\.$", text)
    assert question is not None
    assert QUESTION_TEMPLATE.format(question=question.group(1)) in text


def test_unknown_kind_is_refused(corpus: str) -> None:
    with pytest.raises(ConfigError, match="unknown sample kind"):
        retrieval_text(np.random.default_rng(0), "summary", n_chars=10, corpus=corpus)


def test_heldout_topics_are_not_in_the_training_corpus(corpus: str) -> None:
    held = heldout_documents()
    assert [d.source.split(":")[1] for d in held] == list(HELDOUT_TOPICS)
    for d in held:
        assert len(d.text) >= 8800
        assert d.text[1000:1400] not in corpus


def test_rows_are_full_deterministic_and_mixed(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes((tiny_tokenizer_dir / "tokenizer.model").read_bytes())
    tok = load_tokenizer(tmp_path)
    rb = RowBuilder(tok, seq_len=257)
    a, b = rb.rows(24, seed=[0, 5]), rb.rows(24, seed=[0, 5])
    assert a.shape == (24, 257) and a.dtype == np.int32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, rb.rows(24, seed=[0, 6]))
    texts = [tok.decode(r.tolist()) for r in a]
    assert any("The pass key is" in t for t in texts) and any("The value of key" in t for t in texts)
    assert any("Question:" in t for t in texts)
    with pytest.raises(ConfigError, match="seq_len"):
        RowBuilder(tok, seq_len=32)


def test_mixture_must_have_weight() -> None:
    with pytest.raises(ConfigError, match="mixture"):
        Mixture(0, 0, 0, 0).probabilities()


def test_write_jsonl_is_atomic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = write_jsonl(tmp_path / "ft.jsonl", n_samples=30, max_chars=800, seed=3)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 30 and all(100 <= len(r["text"]) <= 800 + 400 for r in rows)  # filler + template
    assert out.read_bytes() == write_jsonl(tmp_path / "again.jsonl", n_samples=30, max_chars=800, seed=3).read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        write_jsonl(out, n_samples=1, max_chars=800, seed=3)
    assert list(tmp_path.glob(".*partial")) == []
