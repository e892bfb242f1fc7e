"""Long-context evaluation shared by PyTorch and llama.cpp: passkey, multi-key retrieval, perplexity (EVAL.md).

What it does:

* ``passkey_prompt`` builds the Landmark Attention passkey prompt (intro,
  filler, needle, filler, question joined by newlines) to a target token
  length with the model's own tokenize function, the key at a depth fraction
  of the filler; ``score_answer`` is "the first integer of the output equals
  the key"; ``passkey_grid`` sweeps length x depth with seeded keys.
* ``multikey_prompt`` / ``multikey_grid``: several ``key -> value`` needles
  in the filler, one asked for (the others are distractors).
* ``perplexity_truncated`` (each document cut to L, one pass) and
  ``perplexity_sliding`` (window W, stride S, BOS at every window start, each
  window scores only its new tokens), with NLL per position bucket.
* Everything takes backend-neutral functions (``tokenize(text) -> ids``,
  ``generate(ids, max_new_tokens) -> text``, ``logits(ids) -> (T, V)``);
  ``torch_backend`` and ``llama_backend`` provide them for a checkpoint and a GGUF.

What it does not do: plots, CLI, sampling other than greedy, batching.
No torch or llama_cpp import at module level.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgerope.errors import ConfigError, EvalError
from edgerope.prompts import (
    KEY_RANGE,
    multikey_text,
    passkey_text,
)

MAX_NEW_TOKENS = 10

TokenizeFn = Callable[[str], list[int]]
GenerateFn = Callable[[list[int], int], str]
LogitsFn = Callable[[list[int]], np.ndarray]


# ---------------------------------------------------------------------------------------------------- prompts


def _fit(build: Callable[[int], str], tokenize: TokenizeFn, length: int, what: str) -> tuple[str, list[int], int]:
    """The longest ``build(n_chars)`` whose tokenization has <= ``length`` tokens (binary search on n_chars)."""
    text = build(0)
    ids = tokenize(text)
    if len(ids) > length:
        raise EvalError(
            f"the {what} prompt needs {len(ids)} tokens without any filler; {length} is too short",
            fix=f"use lengths >= {len(ids)}",
        )
    lo, hi = 0, max(64, 8 * (length - len(ids)))
    while len(tokenize(build(hi))) <= length:  # grow the bracket until it overshoots
        lo, hi = hi, hi * 2
    best = (text, ids, 0)
    while lo <= hi:
        mid = (lo + hi) // 2
        t = build(mid)
        got = tokenize(t)
        if len(got) <= length:
            best, lo = (t, got, mid), mid + 1
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt: its text and tokens, the key, where the needle sits (fraction and filler characters)."""

    text: str
    tokens: list[int]
    key: int
    depth: float
    length: int  # requested total tokens (len(tokens) <= length)
    filler_chars: int


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be a fraction in [0, 1], got {depth}")


def passkey_prompt(tokenize: TokenizeFn, *, length: int, depth: float, key: int) -> PasskeyPrompt:
    """The passkey prompt of at most ``length`` tokens (as ``tokenize`` counts them) with as much filler as fits."""
    _check_depth(depth)
    text, ids, n = _fit(lambda n: passkey_text(key, depth=depth, filler_chars=n), tokenize, length, "passkey")
    return PasskeyPrompt(text, ids, key, depth, length, n)


def random_key(rng: np.random.Generator) -> int:
    """A key uniform in 1..50000 (the reference code's range)."""
    return int(rng.integers(KEY_RANGE[0], KEY_RANGE[1], endpoint=True))


_INT = re.compile(r"\d+")


def first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` as an int, or None."""
    m = _INT.search(text)
    return int(m.group()) if m else None


def score_answer(output: str, expected: int) -> bool:
    """True when the first integer in ``output`` equals ``expected`` (a longer number does not count)."""
    return first_integer(output) == expected


@dataclass(frozen=True)
class MultiKeyPrompt:
    """A multi-key prompt: needles ``key -> value`` at sorted depths, one key asked for."""

    text: str
    tokens: list[int]
    keys: list[int]
    values: list[int]
    depths: list[float]
    asked: int  # index into keys/values
    length: int

    @property
    def answer(self) -> int:
        return self.values[self.asked]


def multikey_prompt(tokenize: TokenizeFn, *, length: int, n_keys: int = 4, rng: np.random.Generator) -> MultiKeyPrompt:
    """A prompt of at most ``length`` tokens with ``n_keys`` distinct keys and values, one asked at random."""
    if n_keys < 1:
        raise ConfigError(f"n_keys must be >= 1, got {n_keys}")
    pool = rng.choice(np.arange(KEY_RANGE[0], KEY_RANGE[1] + 1), size=2 * n_keys, replace=False).tolist()
    keys, values = pool[:n_keys], pool[n_keys:]
    depths = sorted(float(d) for d in rng.uniform(0.0, 1.0, n_keys))
    asked = int(rng.integers(n_keys))
    text, ids, _ = _fit(lambda n: multikey_text(keys, values, depths, asked, n), tokenize, length, "multi-key")
    return MultiKeyPrompt(text, ids, keys, values, depths, asked, length)


# ---------------------------------------------------------------------------------------------------- grids


@dataclass
class Cell:
    """One (length, depth) cell of a retrieval grid: trials, hits and every sample (seed, answer, output)."""

    length: int
    depth: float | None  # None for multi-key (depths are random per trial)
    seed: list[int]
    trials: int = 0
    correct: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    def record(self, output: str, expected: int, **details: Any) -> None:
        """Score one trial's output against the expected integer and keep it as a sample."""
        ok = score_answer(output, expected)
        self.trials += 1
        self.correct += ok
        self.samples.append({**details, "output": output, "correct": ok})


@dataclass
class GridResult:
    """A retrieval sweep: cells in (length, depth) order, overall accuracy, the settings that reproduce it."""

    task: str
    seed: int
    trials: int
    cells: list[Cell]

    @property
    def total(self) -> int:
        return sum(c.trials for c in self.cells)

    @property
    def accuracy(self) -> float:
        return sum(c.correct for c in self.cells) / self.total if self.total else 0.0

    def by_length(self) -> dict[int, float]:
        out: dict[int, list[int]] = {}
        for c in self.cells:
            acc = out.setdefault(c.length, [0, 0])
            acc[0] += c.correct
            acc[1] += c.trials
        return {n: hit / tot for n, (hit, tot) in out.items()}

    def to_dict(self) -> dict[str, Any]:
        cells = [{**asdict(c), "accuracy": c.accuracy} for c in self.cells]
        return {"task": self.task, "seed": self.seed, "trials": self.trials, "accuracy": self.accuracy, "cells": cells}


def passkey_grid(
    generate: GenerateFn,
    tokenize: TokenizeFn,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> GridResult:
    """Passkey accuracy per (length, depth): ``trials`` keys per cell from the RNG seeded [seed, length, i_depth]."""
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    cells = []
    for length in lengths:
        for j, depth in enumerate(depths):
            cell_seed = [seed, int(length), j]
            rng = np.random.default_rng(cell_seed)
            cell = Cell(int(length), float(depth), cell_seed)
            for _ in range(trials):
                p = passkey_prompt(tokenize, length=length, depth=depth, key=random_key(rng))
                cell.record(generate(p.tokens, max_new_tokens), p.key, key=p.key, n_tokens=len(p.tokens))
            cells.append(cell)
    return GridResult("passkey", seed, trials, cells)


def multikey_grid(
    generate: GenerateFn,
    tokenize: TokenizeFn,
    lengths: Sequence[int],
    trials: int,
    seed: int = 0,
    *,
    n_keys: int = 4,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> GridResult:
    """Multi-key accuracy per length: ``trials`` prompts per length from the RNG seeded [seed, length, n_keys]."""
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    cells = []
    for length in lengths:
        cell_seed = [seed, int(length), n_keys]
        rng = np.random.default_rng(cell_seed)
        cell = Cell(int(length), None, cell_seed)
        for _ in range(trials):
            p = multikey_prompt(tokenize, length=length, n_keys=n_keys, rng=rng)
            cell.record(generate(p.tokens, max_new_tokens), p.answer, keys=p.keys, values=p.values, asked=p.asked)
        cells.append(cell)
    return GridResult("multikey", seed, trials, cells)


def agreement(a: GridResult, b: GridResult) -> float:
    """Fraction of trials where two runs of the same grid (same task, lengths, depths, trials, seed) answered with
    the same first integer (or both with none): the PyTorch-vs-llama.cpp agreement measure."""
    sa = [s for c in a.cells for s in c.samples]
    sb = [s for c in b.cells for s in c.samples]
    same_grid = (a.task, a.seed, a.trials) == (b.task, b.seed, b.trials) and [(c.length, c.depth) for c in a.cells] == [
        (c.length, c.depth) for c in b.cells
    ]
    if not same_grid or len(sa) != len(sb) or not sa:
        raise EvalError("the two grids differ (task, seed, trials, lengths or depths)", fix="run the same grid twice")
    return sum(first_integer(x["output"]) == first_integer(y["output"]) for x, y in zip(sa, sb, strict=True)) / len(sa)


# ---------------------------------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class Perplexity:
    """Perplexity over every scored token, and mean NLL per bucket of target positions [start, start + size)."""

    perplexity: float
    nll: float  # mean negative log-likelihood (nats)
    n_tokens: int
    n_documents: int
    bucket_size: int
    bucket_nll: dict[int, float]  # bucket start -> mean NLL
    bucket_count: dict[int, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log p(targets[t] | logits[t]) for each row, float64; ``logits`` (T, V), ``targets`` (T,)."""
    x = np.asarray(logits, dtype=np.float64)  # (T, V)
    m = x.max(axis=1, keepdims=True)  # (T, 1)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))  # (T,)
    return lse - x[np.arange(len(x)), np.asarray(targets)]


class _Acc:
    def __init__(self, bucket_size: int) -> None:
        self.size = bucket_size
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        self.total, self.n, self.docs = 0.0, 0, 0

    def add(self, nll: np.ndarray, positions: np.ndarray) -> None:
        for b in np.unique(positions // self.size):
            sel = positions // self.size == b
            key = int(b) * self.size
            self.sums[key] = self.sums.get(key, 0.0) + float(nll[sel].sum())
            self.counts[key] = self.counts.get(key, 0) + int(sel.sum())
        self.total += float(nll.sum())
        self.n += len(nll)

    def result(self) -> Perplexity:
        if self.n == 0:
            raise EvalError("no tokens were scored", fix="give documents of at least two tokens")
        mean = self.total / self.n
        keys = sorted(self.sums)
        return Perplexity(
            float(np.exp(mean)),
            mean,
            self.n,
            self.docs,
            self.size,
            {k: self.sums[k] / self.counts[k] for k in keys},
            {k: self.counts[k] for k in keys},
        )


def perplexity_truncated(
    logits_fn: LogitsFn, docs: Sequence[Sequence[int]], *, length: int, bucket_size: int = 256
) -> Perplexity:
    """Each document (token ids starting with BOS) of at least ``length`` tokens cut to ``length`` and scored in
    one pass; shorter ones are skipped.  Buckets are by target position in the document."""
    acc = _Acc(bucket_size)
    for doc in docs:
        if len(doc) < length:
            continue
        ids = [int(t) for t in doc[:length]]
        nll = token_nll(logits_fn(ids)[:-1], ids[1:])  # (length-1,)
        acc.add(nll, np.arange(1, length))
        acc.docs += 1
    if acc.docs == 0:
        raise EvalError(f"no document has {length} tokens", fix="use longer documents or a shorter length")
    return acc.result()


def perplexity_sweep(
    logits_fn: LogitsFn, docs: Sequence[Sequence[int]], lengths: Sequence[int], *, bucket_size: int = 256
) -> dict[int, Perplexity]:
    """``perplexity_truncated`` at each length (YaRN's perplexity-versus-length table)."""
    return {int(n): perplexity_truncated(logits_fn, docs, length=int(n), bucket_size=bucket_size) for n in lengths}


def perplexity_sliding(
    logits_fn: LogitsFn,
    docs: Sequence[Sequence[int]],
    *,
    window: int,
    stride: int,
    bos_id: int,
    bucket_size: int = 256,
) -> Perplexity:
    """Sliding-window perplexity of whole documents (token ids starting with ``bos_id``).

    Every window is BOS + up to ``window - 1`` document tokens; windows start ``stride`` tokens apart and each
    scores only the tokens no earlier window scored.  With ``window`` >= a document's length this is one pass.
    """
    if window < 2 or not 1 <= stride <= window - 1:
        raise ConfigError(f"need window >= 2 and 1 <= stride <= window - 1, got window {window}, stride {stride}")
    acc = _Acc(bucket_size)
    for doc in docs:
        ids = [int(t) for t in doc]
        if not ids or ids[0] != bos_id:
            raise EvalError("documents must start with the BOS token", fix="tokenize with BOS")
        body = ids[1:]  # body[i] is document position i + 1
        done = 0  # body tokens scored so far
        for begin in range(0, max(len(body), 1), stride):
            end = min(begin + window - 1, len(body))
            if end <= done:
                continue
            seq = [bos_id, *body[begin:end]]
            nll = token_nll(logits_fn(seq)[:-1], seq[1:])  # (end - begin,): scores body[begin:end]
            new = slice(done - begin, end - begin)
            acc.add(nll[new], np.arange(done, end) + 1)
            done = end
            if end == len(body):
                break
        acc.docs += 1
    return acc.result()


# ---------------------------------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """What the evaluations need from a model: ``tokenize``, ``generate`` (greedy), ``logits``; ``close``."""

    name: str
    tokenize: TokenizeFn
    generate: GenerateFn
    logits: LogitsFn
    bos_id: int | None
    close: Callable[[], None] = lambda: None

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def torch_backend(hf_dir: str | Path, *, dtype: str = "float32", device: str = "cpu") -> Backend:
    """The HF checkpoint ``hf_dir`` in edgerope.models.llama (PyTorch on ``device``: cpu, cuda, cuda:N, or auto).

    Greedy decoding by repeated full forwards (no KV cache: the same computation as ``logits``).
    """
    import torch

    from edgerope.models.llama import LlamaModel
    from edgerope.system.device import pick_device
    from edgerope.train.data import load_tokenizer

    dev = pick_device(device)
    model = LlamaModel.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(dev).eval()
    tok = load_tokenizer(hf_dir)

    def forward(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids], dtype=torch.long, device=dev))[0]  # (1, T, V) -> (T, V)

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return forward(ids).float().cpu().numpy()

    def generate(ids: list[int], max_new_tokens: int) -> str:
        seq, out = list(ids), []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                nxt = int(forward(seq)[-1].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
                seq.append(nxt)
        return tok.decode(out)

    return Backend(f"torch:{hf_dir}", tok.tokenize, generate, logits, tok.bos_id)


def llama_backend(gguf_path: str | Path, **runtime_options: Any) -> Backend:
    """The GGUF ``gguf_path`` in llama.cpp via ``edgerope.runtime.runtime.Runtime.open(gguf_path, **runtime_options)``."""
    from edgerope.runtime.runtime import Runtime

    rt = Runtime.open(gguf_path, **runtime_options)

    def generate(ids: list[int], max_new_tokens: int) -> str:
        return rt.generate(ids, max_new_tokens).text

    bos = rt.tokenize("", add_bos=True)
    return Backend(f"llama.cpp:{gguf_path}", rt.tokenize, generate, rt.logits, bos[0] if bos else None, rt.close)
