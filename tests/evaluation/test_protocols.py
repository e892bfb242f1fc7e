"""edgerope.evaluation.protocols: the passkey prompt against EVAL.md's text, length fitting with the real tiny tokenizer,
depth placement, answer scoring, grids, perplexity identities, and PyTorch vs llama.cpp agreement on the tiny
random model through the two backend adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from edgerope.errors import EvalError
from edgerope.evaluation.protocols import (
    agreement,
    first_integer,
    llama_backend,
    multikey_grid,
    multikey_prompt,
    passkey_grid,
    passkey_prompt,
    perplexity_sliding,
    perplexity_sweep,
    perplexity_truncated,
    score_answer,
    token_nll,
    torch_backend,
)
from edgerope.prompts import FILLER

EVAL_MD = Path(__file__).resolve().parents[2] / "shared" / "docs" / "EVAL.md"
INTRO_MD = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tokenize(sp: spm.SentencePieceProcessor):
    return lambda text: [sp.bos_id(), *sp.encode(text)]


def test_template_parts_match_eval_md(tokenize) -> None:
    p = passkey_prompt(tokenize, length=300, depth=0.5, key=4242)
    parts = p.text.split("\n")
    assert len(parts) == 5
    assert parts[0] == INTRO_MD
    assert parts[2] == "The pass key is 4242. Remember it. 4242 is the pass key."
    assert parts[4] == "What is the pass key? The pass key is"
    filler = parts[1] + parts[3]
    assert filler == (" ".join([FILLER] * 100))[: len(filler)]  # the filler sentence repeated, cut
    if EVAL_MD.is_file():  # the quoted sentences are EVAL.md's own
        md = EVAL_MD.read_text()
        for s in (INTRO_MD, FILLER, "The pass key is {k}. Remember it. {k} is the pass key.", parts[4]):
            assert f"`{s}`" in md


@pytest.mark.parametrize("length", [128, 500, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_length_and_depth(tokenize, length: int, depth: float) -> None:
    p = passkey_prompt(tokenize, length=length, depth=depth, key=31337)
    assert length - 4 <= len(p.tokens) <= length
    assert p.tokens == tokenize(p.text)
    parts = p.text.split("\n")
    assert len(parts[1]) == round(depth * p.filler_chars) and len(parts[1]) + len(parts[3]) == p.filler_chars
    # depth measured in tokens: filler tokens before the needle over all filler tokens
    before, after = len(tokenize(parts[1])) - 1, len(tokenize(parts[3])) - 1
    assert abs(before - depth * (before + after)) <= max(1.0, 0.02 * (before + after))


def test_too_short_and_bad_depth(tokenize) -> None:
    with pytest.raises(EvalError, match="too short"):
        passkey_prompt(tokenize, length=20, depth=0.5, key=1)
    with pytest.raises(Exception, match="depth"):
        passkey_prompt(tokenize, length=200, depth=1.5, key=1)


@pytest.mark.parametrize(
    ("output", "key", "ok"),
    [
        (" 12345. Remember it.", 12345, True),
        ("The pass key is 12345", 12345, True),  # leading text
        (" 123456", 12345, False),  # a longer number is wrong
        (" 1234", 12345, False),
        ("no digits here", 12345, False),
        ("", 7, False),
        (" 7 and 12345", 12345, False),  # only the first integer counts
        ("-42", 42, True),
        ("00042", 42, True),
    ],
)
def test_scoring(output: str, key: int, ok: bool) -> None:
    assert score_answer(output, key) is ok
    assert first_integer("abc") is None


def test_passkey_grid_with_an_oracle(tokenize, sp) -> None:
    """A generate function that reads the needle back gets 100%; one that answers 0 gets 0%; seeds reproduce."""

    def oracle(ids: list[int], n: int) -> str:
        text = sp.decode(ids)
        return " " + text.split("The pass key is ")[1].split(".")[0] + "."

    def wrong(ids: list[int], n: int) -> str:
        return " 0"

    res = passkey_grid(oracle, tokenize, [150, 300], [0.0, 0.5, 1.0], trials=3, seed=7)
    assert [(c.length, c.depth) for c in res.cells] == [(n, d) for n in (150, 300) for d in (0.0, 0.5, 1.0)]
    assert res.accuracy == 1.0 and res.total == 18 and res.by_length() == {150: 1.0, 300: 1.0}
    keys = [s["key"] for c in res.cells for s in c.samples]
    assert all(1 <= k <= 50000 for k in keys) and len(set(keys)) > 10
    again = passkey_grid(wrong, tokenize, [150, 300], [0.0, 0.5, 1.0], trials=3, seed=7)
    assert again.accuracy == 0.0 and [s["key"] for c in again.cells for s in c.samples] == keys
    assert res.to_dict()["cells"][0]["seed"] == [7, 150, 0]
    assert agreement(res, res) == 1.0 and agreement(res, again) == 0.0
    with pytest.raises(EvalError, match="grids differ"):
        agreement(res, passkey_grid(wrong, tokenize, [150], [0.0], trials=3, seed=7))


def test_multikey(tokenize, sp) -> None:
    p = multikey_prompt(tokenize, length=400, n_keys=5, rng=np.random.default_rng(0))
    assert 396 <= len(p.tokens) <= 400
    for k, v in zip(p.keys, p.values, strict=True):
        assert p.text.count(f"The value of key {k} is {v}.") == 1
    assert p.text.endswith(f"What is the value of key {p.keys[p.asked]}? The value of key {p.keys[p.asked]} is")
    assert len(set(p.keys + p.values)) == 10

    def oracle(ids: list[int], n: int) -> str:
        text = sp.decode(ids)
        asked = text.rsplit("What is the value of key ", 1)[1].split("?")[0]
        return " " + text.split(f"The value of key {asked} is ")[1].split(".")[0]

    res = multikey_grid(oracle, tokenize, [300, 600], trials=4, seed=1, n_keys=3)
    assert res.accuracy == 1.0 and res.total == 8


# ---------------------------------------------------------------------------------------------------- perplexity


def _toy_logits(v: int = 17, seed: int = 0):
    """A deterministic causal 'model': logits at t depend on tokens[:t+1] and position t (a hash)."""
    table = np.random.default_rng(seed).normal(size=(v, v))

    def logits(ids: list[int]) -> np.ndarray:
        ids_a = np.asarray(ids)
        csum = np.cumsum(ids_a) % v
        return table[csum] + table[ids_a] * 0.5 + 0.01 * np.arange(len(ids))[:, None]

    return logits


def test_token_nll_matches_log_softmax() -> None:
    x = np.random.default_rng(0).normal(size=(5, 9)) * 30
    t = [0, 3, 8, 2, 2]
    ref = -np.log(np.exp(x - x.max(1, keepdims=True)) / np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
    np.testing.assert_allclose(token_nll(x, t), ref[np.arange(5), t], rtol=1e-12)


def test_sliding_equals_single_pass_when_window_covers() -> None:
    f = _toy_logits()
    docs = [[1, *np.random.default_rng(i).integers(3, 17, 99 + i).tolist()] for i in range(3)]
    single = perplexity_truncated(f, [d[:100] for d in docs], length=100, bucket_size=32)
    slide = perplexity_sliding(f, [d[:100] for d in docs], window=100, stride=50, bos_id=1, bucket_size=32)
    assert slide.n_tokens == single.n_tokens == 3 * 99
    assert slide.perplexity == pytest.approx(single.perplexity, rel=1e-12)
    assert slide.bucket_nll == pytest.approx(single.bucket_nll, rel=1e-12)
    assert sorted(single.bucket_nll) == [0, 32, 64, 96] and single.bucket_count[0] == 3 * 31
    sweep = perplexity_sweep(f, docs, [50, 100], bucket_size=32)
    assert sweep[100].perplexity == single.perplexity and sweep[50].n_tokens == 3 * 49


def test_sliding_scores_every_token_once() -> None:
    calls: list[list[int]] = []
    base = _toy_logits()

    def f(ids: list[int]) -> np.ndarray:
        calls.append(ids)
        return base(ids)

    doc = [1, *(np.arange(57) % 14 + 3).tolist()]  # 58 tokens, 57 targets
    r = perplexity_sliding(f, [doc], window=16, stride=8, bos_id=1, bucket_size=1000)
    assert r.n_tokens == 57
    assert all(c[0] == 1 and len(c) <= 16 for c in calls)
    assert [c[1] for c in calls] == doc[1::8][: len(calls)]
    # reference: each window's new tokens, from the window's logits
    nll, done = [], 0
    body = doc[1:]
    for begin in range(0, len(body), 8):
        end = min(begin + 15, len(body))
        seq = [1, *body[begin:end]]
        nll += token_nll(base(seq)[:-1], seq[1:])[done - begin :].tolist()
        done = end
        if end == len(body):
            break
    assert r.nll == pytest.approx(np.mean(nll), rel=1e-12)
    with pytest.raises(Exception, match="stride"):
        perplexity_sliding(f, [doc], window=16, stride=16, bos_id=1)
    with pytest.raises(EvalError, match="no document has 100"):
        perplexity_truncated(f, [doc], length=100)


# ---------------------------------------------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> tuple[Path, Path]:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("evalpair")
    ckpt = make_tiny_checkpoint(root / "tiny", tokenizer_dir=tiny_tokenizer_dir)
    gguf = convert(ckpt, root / "tiny.gguf", outtype="f32").path
    return ckpt, gguf


@pytest.mark.llama
def test_torch_and_llama_cpp_agree(tiny_pair: tuple[Path, Path]) -> None:
    ckpt, gguf = tiny_pair
    with (
        torch_backend(ckpt) as pt,
        llama_backend(gguf, n_ctx=256, type_k="f32", type_v="f32", backend="cpu", n_threads=1) as cpp,
    ):
        assert pt.bos_id == cpp.bos_id
        p = passkey_prompt(pt.tokenize, length=200, depth=0.5, key=12345)
        assert cpp.tokenize(p.text) == p.tokens
        docs = [passkey_prompt(pt.tokenize, length=n, depth=0.3, key=777).tokens for n in (120, 200)]
        for kw in ({"window": 256, "stride": 128}, {"window": 64, "stride": 32}):
            a = perplexity_sliding(pt.logits, docs, bos_id=pt.bos_id, **kw)
            b = perplexity_sliding(cpp.logits, docs, bos_id=cpp.bos_id, **kw)
            assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4), (a.perplexity, b.perplexity)
        a = perplexity_truncated(pt.logits, docs, length=120)
        b = perplexity_truncated(cpp.logits, docs, length=120)
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)
        ga = passkey_grid(pt.generate, pt.tokenize, [128, 200], [0.0, 1.0], trials=2, seed=3, max_new_tokens=6)
        gb = passkey_grid(cpp.generate, cpp.tokenize, [128, 200], [0.0, 1.0], trials=2, seed=3, max_new_tokens=6)
        outs_a = [s["output"] for c in ga.cells for s in c.samples]
        outs_b = [s["output"] for c in gb.cells for s in c.samples]
        assert outs_a == outs_b and agreement(ga, gb) == 1.0
        assert any(o.strip() for o in outs_a)  # the random model says something


def test_data_and_evaluation_import_neither_torch_nor_llama_cpp() -> None:
    import subprocess
    import sys

    code = (
        "import sys, edgerope.train.data, edgerope.evaluation.protocols; "
        "print(','.join(m for m in ('torch', 'llama_cpp', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
