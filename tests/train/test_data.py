"""edgerope.train.data: loading rules, JSONL errors, tokenization with the real tiny SentencePiece model, packing,
held-out split, and PoSE position ids (bounds, monotonicity, coverage of long distances, flat size)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from edgerope.errors import ConfigError
from edgerope.train.data import (
    PAD,
    DataError,
    Document,
    PoseSampler,
    build_dataset,
    epoch_order,
    load_documents,
    load_tokenizer,
    pack,
    pack_whole,
    pose_position_ids,
    split_documents,
    tokenize_documents,
)

WORDS = "the grass is green and the sky is blue while the sun shines on every hill".split()


def text(i: int, n: int = 40) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, n)) + f" doc{i}."


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text(text(0))
    (root / "sub" / "b.md").write_text(text(1))
    (root / "sub" / "c.py").write_text("print('hello')\n")
    (root / "image.png").write_bytes(b"\x89PNG")  # not included: unknown suffix inside a folder
    (root / ".git" / "d.txt").write_text("hidden")  # not included: hidden folder
    (root / ".e.txt").write_text("hidden")  # not included: hidden file
    (root / "blank.txt").write_text("  \n")  # dropped: blank
    (root / "f.jsonl").write_text(json.dumps({"text": text(2)}) + "\n\n" + json.dumps({"text": text(3)}) + "\n")
    return root


def test_folder_include_rule(corpus: Path) -> None:
    docs = load_documents(corpus)
    assert [Path(d.source.split(":")[0]).name for d in docs] == ["a.txt", "f.jsonl", "f.jsonl", "b.md", "c.py"]
    assert docs[1].source.endswith("f.jsonl:1") and docs[2].source.endswith("f.jsonl:3")
    assert docs[0].text == text(0)


def test_explicit_files_and_unknown_type(corpus: Path) -> None:
    assert len(load_documents([corpus / "a.txt", corpus / "f.jsonl"])) == 3
    with pytest.raises(DataError, match="unknown data file type '.png'"):
        load_documents(corpus / "image.png")
    with pytest.raises(DataError, match="no such file"):
        load_documents(corpus / "missing.txt")


def test_empty_data(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no training text"):
        load_documents(tmp_path)
    with pytest.raises(DataError, match="no training text"):
        load_documents(tmp_path / "empty.txt")


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "ok"}', "{not json"], "line 2 is not valid JSON"),
        (['{"text": "ok"}', "", '{"body": "x"}'], "line 3 has no 'text' field"),
        (['{"text": 5}'], "line 1: 'text' is int"),
        (['["text"]'], "line 1 has no 'text' field"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], match: str) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match) as err:
        load_documents(p)
    assert err.value.where == f"{p}:{int(match.split()[1].rstrip(':'))}"


def test_jsonl_text_field(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "hello there"}) + "\n")
    assert load_documents(p, text_field="body")[0].text == "hello there"


def test_tokenizer_matches_sentencepiece(make_tiny, tiny_tokenizer_dir: Path) -> None:
    ckpt = make_tiny()
    tok = load_tokenizer(ckpt)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    s = "The pass key is 12345. Remember it."
    assert tok.encode(s) == sp.encode(s)
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.tokenize(s) == [sp.bos_id(), *sp.encode(s)]
    assert tok.decode(tok.tokenize(s)) == s
    docs = tokenize_documents([Document(s, "x"), Document("hi", "y")], tok)
    assert docs[0].tolist() == [sp.bos_id(), *sp.encode(s), sp.eos_id()]
    assert docs[1][0] == sp.bos_id() and docs[1][-1] == sp.eos_id()


def test_split_is_deterministic_by_document() -> None:
    docs = [Document(text(i), f"d{i}") for i in range(40)]
    train, held = split_documents(docs, holdout=0.1, seed=3)
    assert len(held) == 4 and len(train) == 36
    assert {d.source for d in train}.isdisjoint({d.source for d in held})
    assert split_documents(docs, holdout=0.1, seed=3) == (train, held)
    assert split_documents(docs, holdout=0.1, seed=4)[1] != held
    assert split_documents(docs[:2], holdout=0.01, seed=0)[1].__len__() == 1  # at least one when > 0
    with pytest.raises(DataError, match="nothing would remain"):
        split_documents(docs[:1], holdout=0.5)


def test_pack_boundaries_and_determinism() -> None:
    bos, eos = 1, 2
    docs = [np.array([bos, *range(10 + 7 * i, 10 + 7 * i + 3 + i), eos], np.int32) for i in range(6)]
    rows = pack(docs, seq_len=8, seed=5)
    total = sum(len(d) for d in docs)
    assert rows.shape == (total // 8, 8) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows, pack(docs, seq_len=8, seed=5))
    order = np.random.default_rng(5).permutation(len(docs))
    flat = np.concatenate([docs[i] for i in order])
    np.testing.assert_array_equal(rows.ravel(), flat[: rows.size])  # documents intact, in the seeded order
    assert not np.array_equal(rows, pack(docs, seq_len=8, seed=6))
    # each EOS is followed by the next document's BOS
    f = rows.ravel()
    assert all(f[i + 1] == bos for i in np.flatnonzero(f[:-1] == eos))
    with pytest.raises(DataError, match="fewer than one sequence of 1000"):
        pack(docs, seq_len=1000)
    assert not np.array_equal(epoch_order(50, seed=0, epoch=0), epoch_order(50, seed=0, epoch=1))
    np.testing.assert_array_equal(epoch_order(50, seed=0, epoch=1), epoch_order(50, seed=0, epoch=1))


def test_build_dataset(make_tiny, tmp_path: Path) -> None:
    ckpt = make_tiny()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(30)))
    a = build_dataset(data, ckpt, seq_len=64, holdout=0.1, seed=1)
    b = build_dataset(data, ckpt, seq_len=64, holdout=0.1, seed=1)
    np.testing.assert_array_equal(a.train, b.train)
    assert a.train.shape[1] == 64 and a.n_documents == 30 and len(a.heldout_docs) == 3
    tok = load_tokenizer(ckpt)
    assert (a.train == tok.eos_id).sum() >= 20  # boundaries kept
    with pytest.raises(DataError, match="fewer than one sequence"):
        build_dataset(data, ckpt, seq_len=100_000, holdout=0.1)


# ---------------------------------------------------------------------------------------------------- PoSE


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_pose_ids_increasing_within_target(chunks: int) -> None:
    W, L = 64, 512
    s = PoseSampler(W, L, chunks=chunks, seed=0)
    ids = s.sample(400)
    assert ids.shape == (400, W) and ids.dtype == np.int64
    assert (np.diff(ids, axis=1) >= 1).all()
    assert ids.min() >= 0 and ids.max() < L
    # the number of jumps never exceeds chunks - 1
    assert ((np.diff(ids, axis=1) > 1).sum(axis=1) <= chunks - 1).all()
    np.testing.assert_array_equal(ids, PoseSampler(W, L, chunks=chunks, seed=0).sample(400))


def test_pose_covers_long_distances_with_flat_size() -> None:
    W = 32
    for L in (256, 4096, 65536):
        ids = PoseSampler(W, L, chunks=2, seed=1).sample(2000)
        assert ids.shape == (2000, W)  # W long whatever L is
        span = ids[:, -1] - ids[:, 0]  # largest relative distance seen in each sample
        assert span.max() > 0.97 * (L - 1) and span.min() >= W - 1
        # distances spread over the whole range [W, L): every tenth of it is hit
        hist, _ = np.histogram(span, bins=10, range=(W - 1, L - 1))
        assert (hist > 0).all(), hist


def test_pose_gap_is_uniform_up_to_the_target() -> None:
    """Two chunks: the skip between them is uniform on [0, L - W], so long distances are as common as short ones
    (sorting two uniform skips would make the gap triangular: its top tenth would get 1% of samples)."""
    W, L, n = 64, 4096, 20_000
    ids = PoseSampler(W, L, chunks=2, seed=3).sample(n)
    assert (ids[:, 0] == 0).all()  # the first chunk is not shifted
    gap = (ids[:, 1:] - ids[:, :-1]).max(axis=1) - 1  # the one jump in each row
    hist, _ = np.histogram(gap, bins=10, range=(0, L - W + 1))
    assert (np.abs(hist / n - 0.1) < 0.012).all(), hist / n


def test_pose_refusals() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="must exceed the training window"):
        pose_position_ids(256, 256, rng=rng)
    with pytest.raises(ConfigError, match="must exceed"):
        PoseSampler(256, 128)
    with pytest.raises(ConfigError, match="chunks"):
        PoseSampler(8, 64, chunks=9)


def test_pack_whole_never_cuts_a_document_that_fits() -> None:
    rng = np.random.default_rng(0)
    docs = [np.arange(1000 * i, 1000 * i + n, dtype=np.int32) for i, n in enumerate(rng.integers(3, 40, size=60))]
    docs.append(np.arange(90_000, 90_000 + 130, dtype=np.int32))  # longer than a row: cut into rows
    rows = pack_whole(docs, seq_len=50, seed=1)
    assert rows.shape[1] == 50 and rows.dtype == np.int32
    content = rows[rows != PAD]
    assert sorted(content.tolist()) == sorted(np.concatenate(docs).tolist())  # every token once, nothing lost
    for d in docs[:-1]:  # each short document lies inside one row, in order
        hits = [r for r in rows if d[0] in r]
        assert len(hits) == 1
        start = int(np.flatnonzero(hits[0] == d[0])[0])
        assert np.array_equal(hits[0][start : start + len(d)], d)
    for r in rows:  # padding only at a row's end
        pads = np.flatnonzero(r == PAD)
        assert len(pads) == 0 or pads[-1] == 49 and np.all(np.diff(pads) == 1)
    assert np.array_equal(rows, pack_whole(docs, seq_len=50, seed=1))
    with pytest.raises(ConfigError):
        pack_whole(docs, seq_len=1)
