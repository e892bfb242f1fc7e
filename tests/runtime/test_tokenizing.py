"""edgerope.runtime.tokenizing: chunked tokenization gives exactly llama.cpp's tokens for one call (random texts with
spaces, CJK byte-fallback characters, special-token text, tiny chunks), is linear where one call is quadratic (CJK on
a Latin vocab), and the bytes bound never exceeds the real token count."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerope.gguf.reader import open_gguf
from edgerope.runtime.runtime import Runtime
from edgerope.runtime.tokenizing import LinearTokenizer, VocabFacts

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Iterator[tuple[Runtime, VocabFacts]]:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tokenizing")
    gguf = convert(
        make_tiny_checkpoint(root / "t", tokenizer_dir=tiny_tokenizer_dir), root / "t.gguf", outtype="f32"
    ).path
    with open_gguf(gguf) as f:
        facts = VocabFacts.from_gguf(f)
    with Runtime.open(gguf, n_ctx=256, n_threads=1, backend="cpu") as rt:
        yield rt, facts


def test_facts(model: tuple[Runtime, VocabFacts]) -> None:
    _, facts = model
    assert facts.model == "llama" and facts.max_token_bytes > 1 and {"<s>", "</s>", "<unk>"} <= set(facts.specials)


def test_chunks_give_the_tokens_of_one_call(model: tuple[Runtime, VocabFacts]) -> None:
    rt, facts = model
    rng = random.Random(1)
    words = [
        "the",
        "cat",
        "list",
        " ",
        "  ",
        "\n",
        "中文",
        "é",
        "<s>",
        "</s>",
        "<|user|>",
        "x.y",
        "ab,",
        "\u2581",
        "\t",
    ]
    for _ in range(250):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 300)))
        tok = LinearTokenizer(rt, facts, chunk=rng.randint(3, 40))
        for special in (False, True):
            for add_bos in (None, False, True):
                assert tok(text, add_bos=add_bos, special=special) == rt.tokenize(
                    text, add_bos=add_bos, special=special
                )


def test_linear_where_one_call_is_quadratic(model: tuple[Runtime, VocabFacts]) -> None:
    rt, facts = model
    rng = random.Random(2)
    cjk = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(160_000))
    tok = LinearTokenizer(rt, facts)
    assert tok(cjk[:20_000]) == rt.tokenize(cjk[:20_000])
    times = {}
    for n in (40_000, 160_000):
        t0 = time.perf_counter()
        tok(cjk[:n])
        times[n] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rt.tokenize(cjk[:40_000])  # one call: already slower than the chunked 160k
    one_call = time.perf_counter() - t0
    assert times[160_000] < 8 * times[40_000] + 0.05, times  # ~4x for 4x the text, not ~16x
    print(
        f"\n40k CJK chars: one call {one_call:.2f}s, chunked {times[40_000]:.3f}s; 160k chunked {times[160_000]:.3f}s"
    )


def test_min_tokens_is_a_lower_bound(model: tuple[Runtime, VocabFacts]) -> None:
    rt, facts = model
    rng = random.Random(4)
    for _ in range(200):
        text = "".join(rng.choice(["the ", "list", "中", "  ", "====", "é", "\n"]) for _ in range(rng.randint(1, 200)))
        assert facts.min_tokens(len(text.encode())) <= len(rt.tokenize(text, add_bos=False)), text
