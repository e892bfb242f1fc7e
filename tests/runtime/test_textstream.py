"""edgerope.runtime.textstream: the pieces join to the detokenized answer (spaces, multi-byte characters split over
byte-fallback tokens, invalid UTF-8), stop strings cut exactly where the whole text would be cut, and the work per
token is bounded (linear in the answer, where detokenizing the whole answer each token is quadratic)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edgerope.runtime.runtime import Runtime
from edgerope.runtime.textstream import MAX_PENDING, TextStream

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Iterator[Runtime]:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("textstream")
    gguf = convert(
        make_tiny_checkpoint(root / "t", tokenizer_dir=tiny_tokenizer_dir), root / "t.gguf", outtype="f32"
    ).path
    with Runtime.open(gguf, n_ctx=256, n_threads=1, backend="cpu") as runtime:
        yield runtime


def texts() -> list[str]:
    rng = random.Random(3)
    words = ["the", " list", " of", "中文", "é", "\n", "  ", "x.y", "🙂", "ab,", "\u2581", "Ω"]
    return ["".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(150)]


def stream_all(rt: Runtime, tokens: Sequence[int], stops: Sequence[str] = ()) -> tuple[list[str], TextStream]:
    s = TextStream(rt.detokenize, stops=stops)
    pieces = []
    for t in tokens:
        p = s.push(t)
        if p:
            pieces.append(p)
        if s.stopped:
            break
    if rest := s.finish():
        pieces.append(rest)
    return pieces, s


def test_pieces_join_to_the_whole_text(rt: Runtime) -> None:
    for text in texts():
        tokens = rt.tokenize(text, add_bos=False)
        pieces, s = stream_all(rt, tokens)
        assert "".join(pieces) == rt.detokenize(tokens) == s.text, text
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in rt.detokenize(tokens)


def test_invalid_utf8_is_emitted_after_a_bounded_wait(rt: Runtime) -> None:
    byte_tokens = rt.tokenize("中", add_bos=False)  # byte-fallback: three tokens for one character
    assert len(byte_tokens) >= 3
    lone = [byte_tokens[0]] * (MAX_PENDING + 3)  # lead bytes that never complete a character
    pieces, s = stream_all(rt, lone)
    assert "".join(pieces) == rt.detokenize(lone) and pieces  # emitted, as U+FFFD, not held forever


def test_stop_strings_cut_where_the_whole_text_would(rt: Runtime) -> None:
    rng = random.Random(5)
    for text in texts():
        tokens = rt.tokenize(text, add_bos=False)
        whole = rt.detokenize(tokens)
        if len(whole) < 4:
            continue
        i = rng.randrange(len(whole) - 2)
        stop = whole[i : i + rng.randint(1, 3)]
        pieces, s = stream_all(rt, tokens, stops=[stop, "never-there"])
        assert s.stopped == stop and "".join(pieces) == whole[: whole.find(stop)] == s.text


def test_work_per_token_is_bounded(rt: Runtime) -> None:
    tokens = rt.tokenize("the list of words and more words " * 60, add_bos=False)  # ~400 tokens
    work: list[int] = []

    def counting(ids: Sequence[int]) -> str:
        work.append(len(ids))
        return rt.detokenize(ids)

    s = TextStream(counting)
    for t in tokens:
        s.push(t)
    s.finish()
    assert max(work) <= 2 * MAX_PENDING and sum(work) <= 4 * len(tokens), (max(work), sum(work))
