"""The retrieval mix of finetune: each kind's sample answers its own question, rows are exact and reproducible,
fillers come from the training text only, and the independent evaluation format never appears in training.

References: answers are recomputed from the sample text with regular expressions written here, not with the
generator's own code; held-out text is marked with unique tokens and searched for in the generated rows.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from edgerope import prompts
from edgerope.errors import ConfigError, DataError
from edgerope.train.data import Document, load_tokenizer, split_heldout, tokenize_documents
from edgerope.train.mix import (
    FACTS,
    KINDS,
    MIN_ROW,
    NAMES,
    RetrievalMix,
    RetrievalRows,
    multikey_sample,
    passkey_sample,
    qa_sample,
    recall_sample,
)

TEXT = (
    "The parser reads each line of the file and builds a tree of nodes. Every node keeps its children in order, "
    "and the printer walks the tree to write the program back. Errors carry the line number where they were found. "
)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _text(sample: list[tuple[str, str]]) -> str:
    return "".join(prompt + answer for prompt, answer in sample)


def test_passkey_samples_answer_each_question_with_the_number_its_fact_states() -> None:
    rng = np.random.default_rng(0)
    names = ("secret number", "room number", "lucky number", "old quiet river")
    landmark, counts, asks = 0, [], set()
    for _ in range(300):
        sample = passkey_sample(rng, TEXT * 3, names)
        text = _text(sample)
        answers = [int(re.fullmatch(r" (\d+)\.", a).group(1)) for _, a in sample]
        if text.startswith(prompts.INTRO):  # EVAL.md's template, word for word, with its own filler
            landmark += 1
            (k,) = answers
            assert prompts.NEEDLE.format(k=k) in text and text.endswith(f"{prompts.QUESTION} {k}.")
            assert prompts.FILLER[:40] in text and "parser" not in text
            continue
        counts.append(len(sample))
        assert "parser reads" in text  # the filler is the given text
        body = sample[0][0]  # the text with the facts in it, then the first question
        stated_names = set()
        for prompt, k in zip([p for p, _ in sample], answers, strict=True):
            asked = re.search(r"The ([a-z ]+) is$", prompt).group(1)  # each turn ends "The X is" for a named fact
            assert asked in names
            fact = rf"the {asked}(?: you will need later)? is (\d+)|(\d+) is the {asked}|the {asked}: (\d+)"
            stated = re.findall(fact, body, re.I)
            assert {int(x or y or z) for x, y, z in stated} == {k}, (text, asked)  # the fact named so holds this answer
            stated_names.add(asked)
        assert len(stated_names) == len(sample)  # each fact asked for once
        asks.update(re.sub(r"\b(" + "|".join(names) + r")\b", "X", p.strip()) for p, _ in sample[1:])
        assert sum(bool(re.search(rf"\b{m}\b", body, re.I)) for m in names) == len(sample)  # and no other stated
    assert 50 <= landmark <= 110  # LANDMARK_SHARE of 300
    assert set(counts) == {1, 2, 3, 4}  # 1 to len(names) facts, each asked for
    assert len(asks) > 25 and "The X is" in asks  # questions in many wordings, some the answer's start alone


def test_numbers_have_every_length_and_most_often_a_passkeys() -> None:
    rng = np.random.default_rng(1)
    lengths = []
    for _ in range(400):
        sample = passkey_sample(rng, TEXT * 3, ("secret number", "room number", "lucky number"))
        if not _text(sample).startswith(prompts.INTRO):
            lengths += [len(re.fullmatch(r" (\d+)\.", a).group(1)) for _, a in sample]
    share = {d: lengths.count(d) / len(lengths) for d in range(1, 10)}
    assert len(lengths) > 500 and all(share[d] > 0.02 for d in share)  # 1 to 9 digits, each copied whole
    assert share[4] + share[5] + share[6] + share[7] > 0.6  # mostly the lengths of passkeys, codes and PINs


def _answers_per_sample(ids: np.ndarray, target: np.ndarray, eos: int) -> list[int]:
    """How many answers (runs of targets) each sample of a row has."""
    counts, n, prev = [], 0, False
    for t, is_target in zip(ids.tolist(), target.tolist(), strict=True):
        n += is_target and not prev
        prev = is_target
        if t == eos:
            counts, n = [*counts, n], 0
    return counts


def test_long_samples_ask_for_more_facts_and_the_shortest_rows_still_fit(tok) -> None:
    pieces = tokenize_documents([Document(TEXT * 200, "t")], tok)
    only_passkey = RetrievalMix(1.0, (("passkey", 1.0),))
    short = RetrievalRows(tok, pieces, seq_len=MIN_ROW, n_rows=60, mix=only_passkey, seed=0)
    per_short = [c for i in range(60) for c in _answers_per_sample(*short.row(i), tok.eos_id)]
    assert len(per_short) >= 60 and set(per_short) == {1}  # a sample of MIN_ROW tokens has room for one fact
    long = RetrievalRows(tok, pieces, seq_len=2048, n_rows=30, mix=only_passkey, seed=0)
    firsts = [_answers_per_sample(*long.row(i), tok.eos_id)[0] for i in range(30)]
    assert max(firsts) == FACTS and np.mean(firsts) > 2.5  # long first samples: several answers from far away


def test_multikey_asks_for_some_of_several_facts() -> None:
    rng = np.random.default_rng(1)
    asked_counts = []
    for _ in range(100):
        sample = multikey_sample(rng, TEXT * 3, ("room number",))
        text = _text(sample)
        facts = [ln for ln in text.splitlines() if re.search(r"\d+\.$", ln) and ln not in TEXT and "?" not in ln]
        assert len(facts) >= 2
        asked_counts.append(len(sample))
        for prompt, answer in sample:
            answer = int(re.fullmatch(r" (\d+)\.", answer).group(1))
            question = prompt.strip().splitlines()[-1]
            key = re.search(r"(?:key|for|item|Item) (\w+)", question).group(1)
            holding = [f for f in facts if re.search(rf"\b{re.escape(key)}\b", f)]
            assert holding and all(f.rstrip(".").endswith(str(answer)) for f in holding), (text, key)
    assert min(asked_counts) == 1 and max(asked_counts) >= 3


def test_qa_and_recall_use_the_ask_prompt() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        qa = _text(qa_sample(rng, TEXT * 3, ("ticket number",)))
        assert qa.startswith(prompts.DOC_TEMPLATE.split("{document}")[0])
        k = int(re.search(r"Answer: (\d+)\.$", qa).group(1))
        doc = qa.split("Document:\n", 1)[1].split("\nQuestion:", 1)[0]
        fact = r"ticket number(?: you will need later)? is (\d+)|(\d+) is the ticket number|ticket number: (\d+)"
        assert {int(x or y or z) for x, y, z in re.findall(fact, doc)} == {k}
        rec = recall_sample(rng, TEXT * 2 + "A closing line holds words never repeated anywhere.")
        if rec is None:
            continue
        rec = _text(rec)
        doc = rec.split("Document:\n", 1)[1].split("\nQuestion:", 1)[0]
        quote = re.search(r'after "(.+)" in the document\?', rec).group(1)
        answer = rec.rsplit("Answer: ", 1)[1]
        assert doc.count(quote) == 1  # unique, so the answer is defined
        after = doc.split(quote, 1)[1].split()
        assert answer.split() == after[: len(answer.split())]
    assert recall_sample(rng, "too short") is None


def test_rows_are_exact_reproducible_and_mixed(tok) -> None:
    pieces = tokenize_documents([Document(TEXT * 60, "t")], tok)
    rr = RetrievalRows(tok, pieces, seq_len=300, n_rows=60, mix=RetrievalMix(0.5), seed=3)
    made = [rr.row(i) for i in range(60)]
    rows, targets = [r for r, _ in made], [t for _, t in made]
    assert all(r.shape == t.shape == (300,) and r.dtype == np.int32 and t.dtype == bool for r, t in made)
    assert all(r[0] == tok.bos_id for r in rows)  # each row starts with a sample
    for r, t in made:  # targets: each sample's answer and its EOS, nothing else
        eos = np.flatnonzero(r == tok.eos_id)
        assert len(eos) >= 1 and t[eos].all() and t.sum() < 0.2 * len(r)
        runs = np.split(np.flatnonzero(t), np.flatnonzero(np.diff(np.flatnonzero(t)) > 1) + 1)
        for run in runs:  # each run of targets: one answer of a few words (a sample's last one, then its EOS)
            words = tok.decode(r[run].tolist()).split()
            assert 1 <= len(words) <= 6 and (r[run[-1]] == tok.eos_id or re.fullmatch(r"\d+\.", words[-1]))
        for run, nxt in zip(runs, runs[1:], strict=False):  # an answer not ending its sample: another follows in it
            assert r[run[-1]] == tok.eos_id or tok.eos_id not in r[run[-1] : nxt[0]]
        assert sum(r[run[-1]] == tok.eos_id for run in runs) == len(eos)  # every sample's EOS ends its last answer
    again = RetrievalRows(tok, pieces, seq_len=300, n_rows=60, mix=RetrievalMix(0.5), seed=3).row(7)
    np.testing.assert_array_equal(rows[7], again[0])
    np.testing.assert_array_equal(targets[7], again[1])
    other = RetrievalRows(tok, pieces, seq_len=300, n_rows=60, mix=RetrievalMix(0.5), seed=4).row(7)
    assert not np.array_equal(rows[7], other[0])
    every = RetrievalRows(tok, pieces, seq_len=300, n_rows=60, mix=RetrievalMix(0.5, answers_only=False), seed=3)
    ids, all_targets = every.row(7)
    np.testing.assert_array_equal(ids, rows[7])  # the same row; every sample token a target
    assert all_targets.sum() > 3 * targets[7].sum() and (all_targets | ~targets[7]).all()
    counts = rr.counts()
    assert sum(counts.values()) == 60 and set(counts) == set(KINDS) and counts["passkey"] > counts["multikey"]
    lengths = [list(r).index(tok.eos_id) + 1 for r in rows]  # first samples' lengths: spread over the row
    assert min(lengths) < 200 and max(lengths) > 250
    assert np.mean([(r == tok.bos_id).sum() for r in rows]) > 1.3  # rows hold several samples
    assert {rr.name(np.random.default_rng(i)) for i in range(50)} <= set(NAMES)  # too few words of its own


def test_facts_are_named_by_words_of_the_users_text(tok) -> None:
    from edgerope.train.synthetic import corpus_text

    text = corpus_text()[:100_000]
    rr = RetrievalRows(
        tok, tokenize_documents([Document(text, "t")], tok), seq_len=300, n_rows=4, mix=RetrievalMix(), seed=0
    )
    names = [rr.name(np.random.default_rng(i)) for i in range(300)]
    own = [n for n in names if n not in NAMES]
    assert 150 < len(own) < 270  # 1 - NAMED_SHARE of them
    assert all(len(n.split()) == 2 and all(re.search(rf"\b{w}\b", text) for w in n.split()) for n in own)
    assert len(set(own)) > 0.9 * len(own)  # hardly ever the same name twice


def _samples(tok, ids: np.ndarray) -> list[str]:
    """A row's samples decoded one by one (decoding across an EOS would join two samples' digits)."""
    cuts = [i for i, t in enumerate(ids.tolist()) if t in (tok.bos_id, tok.eos_id)]
    return [tok.decode(ids[a + 1 : b].tolist()) for a, b in zip([-1, *cuts], [*cuts, len(ids)], strict=True)]


def test_fillers_never_come_from_held_out_text(tok) -> None:
    marked = " ".join(f"Line {i} says marker{i:04d} here." for i in range(3000))
    token_docs = tokenize_documents([Document(marked, "one.txt")], tok)
    train, held, info = split_heldout(token_docs, holdout=0.1, chunk=257, seed=0)
    assert info.by == "chunks" and held
    held_marks = {m for h in held for m in re.findall(r"marker\d{4}", tok.decode(h.tolist()))}
    rr = RetrievalRows(tok, train, seq_len=257, n_rows=300, mix=RetrievalMix(1.0), seed=0)
    seen = {m for i in range(300) for part in _samples(tok, rr.row(i)[0]) for m in re.findall(r"marker\d{4}", part)}
    assert len(held_marks) > 100 and len(seen) > 1000
    # a marker cut at a held-out chunk's edge may show up whole in a training piece; no other one may
    edges = {m for h in held for m in re.findall(r"marker\d{4}", tok.decode(h[:12].tolist() + h[-12:].tolist()))}
    assert not (seen & (held_marks - edges))


def test_the_independent_evaluation_format_is_never_generated(tok) -> None:
    from edgerope.recipes.extend_eval import (
        INDEPENDENT_INTRO,
        INDEPENDENT_NEEDLE,
        INDEPENDENT_QUESTION,
        INDEPENDENT_SENTENCES,
    )
    from edgerope.train.synthetic import corpus_text

    pieces = tokenize_documents([Document(corpus_text()[:200_000], "pydoc")], tok)
    rr = RetrievalRows(tok, pieces, seq_len=1025, n_rows=400, mix=RetrievalMix(1.0), seed=0)
    banned = [INDEPENDENT_INTRO, INDEPENDENT_NEEDLE.split("{k}")[0], INDEPENDENT_QUESTION, "access code"]
    banned += list(INDEPENDENT_SENTENCES)
    for i in range(400):
        text = rr.sample_text(i)
        assert not any(b in text for b in banned), i


def test_bad_mixes_are_refused(tok) -> None:
    with pytest.raises(ConfigError, match="--retrieval-mix"):
        RetrievalMix(1.5)
    with pytest.raises(ConfigError, match="unknown retrieval sample kinds"):
        RetrievalMix(0.5, (("passkey", 1.0), ("poems", 1.0)))
    pieces = tokenize_documents([Document(TEXT * 10, "t")], tok)
    with pytest.raises(ConfigError, match=f"(?s)at least {MIN_ROW} tokens.*--retrieval-mix 0"):
        RetrievalRows(tok, pieces, seq_len=64, n_rows=4, mix=RetrievalMix(), seed=0)
    with pytest.raises(DataError, match="--retrieval-mix 0"):
        RetrievalRows(
            tok, tokenize_documents([Document("tiny", "t")], tok), seq_len=200, n_rows=4, mix=RetrievalMix(), seed=0
        )
