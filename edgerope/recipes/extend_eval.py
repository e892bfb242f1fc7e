"""Measuring one GGUF for the context-extension experiment (``edgerope.recipes.extend``), all in llama.cpp.

What it does, through ``edgerope.evaluation.protocols``:

* ``evaluate_gguf``: the passkey grid per length x depth (a prompt "at length L" leaves room for the answer
  inside L), multi-key accuracy, and the perplexity of the same held-out documentation tokens read through a
  context window of each length (sliding, stride half the window; the longest is one pass);
* ``independent_passkey_grid``: a passkey test in a wording and filler of its own (``INDEPENDENT_*``), never in
  any training data: edgerope's training samples (``edgerope.train``) cannot import this module, the layer
  below never sees it, and a test checks that no generated sample holds its phrases.  It tells whether a
  fine-tune learned to retrieve or only learned EVAL.md's template;
* ``passkey_agreement``: the same passkey grid in PyTorch and in llama.cpp, the fraction of equal answers;
* ``kv_comparison``: passkey accuracy and next-token KL divergence per KV cache type against a reference type.

What it does not do: make, fine-tune or convert the variants (``edgerope.recipes.extend``), print, or plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgerope.errors import ConfigError
from edgerope.evaluation import protocols
from edgerope.train.synthetic import heldout_documents

if TYPE_CHECKING:
    from edgerope.recipes.extend import Settings

ANSWER_ROOM = 16  # a passkey prompt "at length L" has L - ANSWER_ROOM tokens, so prompt + answer fit in L

# The independent passkey format: every part differs from EVAL.md's (intro, filler, needle, question, key range),
# joined by spaces, not newlines, and the filler is whole sentences of a text about a village, drawn at random.
INDEPENDENT_INTRO = "Below is a long passage. Somewhere inside it is a number you will be asked to recall at the end."
INDEPENDENT_SENTENCES = (
    "The old mill stands beside the river.", "Children play in the square after school.",
    "A baker sells warm bread every morning.", "Fishing boats return to the harbour at dusk.",
    "The library closes early on Sundays.", "Snow covers the hills in the winter months.",
    "A narrow road winds up to the chapel.", "Farmers bring apples and cheese to the market.",
    "The clock on the town hall runs a little slow.", "Swallows nest under the bridge each spring.",
    "An old dog sleeps in the sun by the door.", "The teacher reads a story to the class.",
)  # fmt: skip
INDEPENDENT_NEEDLE = "Remember this: the access code is {k}."
INDEPENDENT_QUESTION = "Now recall the number given in the passage. The access code is"
INDEPENDENT_KEYS = (10000, 99999)  # five digits (EVAL.md's range is 1..50000)


def _heldout_ids(b: protocols.Backend, n: int) -> list[list[int]]:
    """The first ``n`` tokens of each held-out documentation topic that has ``n`` (perplexity and KL text)."""
    return [ids[:n] for ids in (b.tokenize(d.text) for d in heldout_documents()) if len(ids) >= n]


def _passkey(b: protocols.Backend, s: Settings, lengths: Sequence[int]) -> protocols.GridResult:
    """The passkey grid with prompts of L - ANSWER_ROOM tokens for each length L (reported under L)."""
    grid = protocols.passkey_grid(
        b.generate, b.tokenize, [n - ANSWER_ROOM for n in lengths], s.depths, s.trials, s.eval_seed
    )
    for c in grid.cells:
        c.length += ANSWER_ROOM
    return grid


def independent_passkey_text(key: int, *, depth: float, n_chars: int, seed: Sequence[int]) -> str:
    """The independent format's prompt: intro, up to ``n_chars`` of whole filler sentences (drawn with ``seed``)
    with the needle between two of them at ``depth``, the question; joined by spaces."""
    rng = np.random.default_rng(list(seed))
    sentences: list[str] = []
    size = 0
    while True:
        s = INDEPENDENT_SENTENCES[int(rng.integers(len(INDEPENDENT_SENTENCES)))]
        if size + len(s) + 1 > n_chars:
            break
        sentences.append(s)
        size += len(s) + 1
    cut = round(depth * len(sentences))
    parts = [INDEPENDENT_INTRO, *sentences[:cut], INDEPENDENT_NEEDLE.format(k=key), *sentences[cut:]]
    return " ".join([*parts, INDEPENDENT_QUESTION])


def _fit_independent(tokenize: protocols.TokenizeFn, length: int, build: Any) -> list[int]:
    """The tokens of the longest ``build(n_chars)`` within ``length`` tokens (binary search on n_chars)."""
    lo, hi, best = 0, 8 * length, None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = tokenize(build(mid))
        if len(ids) <= length:
            best, lo = ids, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ConfigError(f"the independent passkey prompt does not fit {length} tokens", fix="use longer lengths")
    return best


def independent_passkey_grid(
    b: protocols.Backend, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int
) -> protocols.GridResult:
    """Passkey accuracy per (length, depth) in the independent format: prompts of L - ANSWER_ROOM tokens,
    reported under L; keys and filler from the RNG seeded [seed, L, depth index, trial]; greedy, 10 tokens,
    scored as EVAL.md scores (the first integer of the output)."""
    cells = []
    for length in lengths:
        for j, depth in enumerate(depths):
            cell = protocols.Cell(int(length), float(depth), [seed, int(length), j])
            for t in range(trials):
                s = [seed, int(length), j, t]
                key = int(np.random.default_rng(s).integers(INDEPENDENT_KEYS[0], INDEPENDENT_KEYS[1], endpoint=True))
                ids = _fit_independent(
                    b.tokenize,
                    length - ANSWER_ROOM,
                    lambda n, key=key, s=s, d=depth: independent_passkey_text(key, depth=d, n_chars=n, seed=s),
                )
                cell.record(b.generate(ids, protocols.MAX_NEW_TOKENS), key, key=key, n_tokens=len(ids))
            cells.append(cell)
    return protocols.GridResult("passkey-independent", seed, trials, cells)


def evaluate_gguf(gguf: Path, s: Settings, *, lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Passkey grid, multi-key and held-out perplexity of one GGUF in llama.cpp (``s.kv`` cache)."""
    from edgerope.evaluation.report import model_context

    lengths = tuple(lengths or s.lengths)
    ctx = model_context(gguf)
    longest = max(max(lengths), *s.ppl_lengths) if s.ppl_lengths else max(lengths)
    options = dict(n_ctx=longest, type_k=s.kv, type_v=s.kv, n_threads=s.n_threads)  # prompt + answer fit in L
    with protocols.llama_backend(gguf, allow_extrapolation=longest > ctx, **options) as b:
        grid = _passkey(b, s, lengths)
        out: dict[str, Any] = {"context_length": ctx, "passkey": grid.to_dict(), "passkey_by_length": grid.by_length()}
        if s.independent:
            ind = independent_passkey_grid(b, lengths, s.depths, s.trials, s.eval_seed)
            out["independent"], out["independent_by_length"] = ind.to_dict(), ind.by_length()
        if s.multikey_trials:
            mk = protocols.multikey_grid(
                b.generate, b.tokenize, [n - ANSWER_ROOM for n in lengths], s.multikey_trials, s.eval_seed
            )
            out["multikey_by_length"] = {n + ANSWER_ROOM: a for n, a in mk.by_length().items()}
        if s.ppl_lengths:
            n_max = max(s.ppl_lengths)
            docs = _heldout_ids(b, n_max)
            if not docs or b.bos_id is None:
                raise ConfigError(f"no held-out document has {n_max} tokens (or no BOS)", fix="use shorter ppl_lengths")
            # the same n_max tokens of each document read through a window of n (stride n / 2; n_max: one pass)
            ppl = {
                n: protocols.perplexity_sliding(
                    b.logits, docs, window=n, stride=n // 2, bos_id=b.bos_id, bucket_size=256
                )
                for n in s.ppl_lengths
            }
            out["perplexity"] = {n: p.perplexity for n, p in ppl.items()}
            out["perplexity_detail"] = {n: p.to_dict() for n, p in ppl.items()}
    return out


def passkey_agreement(checkpoint: Path, gguf: Path, s: Settings, *, lengths: Sequence[int]) -> dict[str, Any]:
    """The same passkey grid in PyTorch (fp32) and in llama.cpp (f16 KV): the fraction of equal answers."""
    with protocols.torch_backend(checkpoint) as tb:
        a = _passkey(tb, s, lengths)
    n_ctx = max(lengths)
    with protocols.llama_backend(gguf, n_ctx=n_ctx, type_k="f16", type_v="f16", n_threads=s.n_threads) as lb:
        b = _passkey(lb, s, lengths)
    return {
        "checkpoint": str(checkpoint),
        "gguf": str(gguf),
        "kv": "f16",
        "trials": a.total,
        "agreement": protocols.agreement(a, b),
        "torch_accuracy": a.accuracy,
        "llama_cpp_accuracy": b.accuracy,
    }


# ---------------------------------------------------------------------------------------------------- KV cache types


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kv_comparison(
    gguf: str | Path, s: Settings, *, kvs: Sequence[str] = ("f16", "q8_0", "q4_0"), reference: str = "f16"
) -> dict[str, Any]:
    """Passkey accuracy per length and next-token KL divergence against the ``reference`` cache, per KV type.

    The KL is measured on the held-out documents cut to the longest length (mean over every position, and
    top-1 agreement with the reference): EVAL.md's point that retrieval can pass while quality drops.
    """
    longest = max(s.lengths)
    out: dict[str, Any] = {"gguf": str(gguf), "reference": reference, "kv": {}}
    ref_logp: list[np.ndarray] = []
    for kv in [reference, *[k for k in kvs if k != reference]]:
        with protocols.llama_backend(gguf, n_ctx=longest, type_k=kv, type_v=kv, n_threads=s.n_threads) as b:
            grid = _passkey(b, s, s.lengths)
            docs = _heldout_ids(b, longest)
            logp = [_log_softmax(b.logits(ids).astype(np.float64)) for ids in docs]  # (T, V) each
        row: dict[str, Any] = {"passkey_by_length": grid.by_length(), "passkey_accuracy": grid.accuracy}
        if kv == reference:
            ref_logp = logp
        else:
            kl = [float((np.exp(r) * (r - q)).sum(-1).mean()) for r, q in zip(ref_logp, logp, strict=True)]
            top1 = [float((r.argmax(-1) == q.argmax(-1)).mean()) for r, q in zip(ref_logp, logp, strict=True)]
            row.update(kl_mean=float(np.mean(kl)), top1_agreement=float(np.mean(top1)), kl_tokens=longest * len(docs))
        out["kv"][kv] = row
    return out
