"""The long-context data recipe of ``edgerope finetune``: retrieval samples built from the user's own text.

A run with ``retrieval_mix`` f > 0 trains on two kinds of rows, interleaved by a seeded schedule: a share f
are *retrieval rows* made here, the rest are rows of the user's text packed as always.  A retrieval row holds
samples (BOS ... EOS) back to back: the first of ``MIN_SAMPLE`` tokens up to the whole row (uniform; in a
``LONG_FIRST`` share of rows, most of them, at least half the row), so the distance between a fact and the
question about it covers every length up to the row, and the long ones the target context needs are not rare;
the next ones fill what is left (log-uniform lengths: many short ones).
The loss of a retrieval row counts the answers and their EOS only (``answers_only``; the row's mean, so a row of
a few answers weighs as much as a row of text): the text rows teach the user's text, the retrieval rows teach
finding things in it.  The kinds (``KIND_WEIGHTS``, normalized, drawn per sample):

* ``passkey`` (4): numbers stated inside a span of the user's text, asked for at the end.  A quarter use
  EVAL.md's Landmark template word for word (its intro, filler, needle and question; what ``edgerope eval``
  measures).  The rest state 1 to ``FACTS`` facts (at most one per ``FACT_TOKENS`` of the sample) at random
  places, each phrased with one of ``NEEDLES`` about its own name: one of ``NAMES`` ("secret number", ...) or,
  mostly, two words of the user's text ("the method attribute"); then every fact is asked for (``question``:
  many wordings, in a random order) and answered.  The model learns to find the fact a question names, not a
  phrase, and each fact placed anywhere in the span is one more answer from far away (the distance x8 must
  learn; a sample of one question has few);
* ``multikey`` (1): several facts of one form ("The value of key K is V.", "The {name} for Anna is V.", ...),
  one or more of them asked for: the others are distractors;
* ``qa`` (2): ``edgerope ask``'s plain prompt (``edgerope.prompts.DOC_TEMPLATE`` / ``QUESTION_TEMPLATE``): a
  document of the user's text holding one fact, a question about it, the answer;
* ``recall`` (2): the same prompt over the user's text alone: a few words quoted from the document, the question
  asks for the words that follow them, the answer is those words.

Every filler (but the Landmark template's) is a span of the user's *training* text, never of the held-out
text; in a ``REPEATED_SHARE`` of the passkey, multi-key and Q&A samples it is 2-12 sentences of such a span
repeated in a random order, the haystack many needle tests use.  The varied wordings' numbers have 1-9 digits, so
an answer of any length is copied whole; the count is drawn with ``DIGIT_WEIGHTS``, most often 4-7 digits, the
lengths of passkeys, codes and PINs (with every count equally likely a model learned that a number may end after
any digit, and cut 5-digit keys short when the fact was far away).  README's Quality section has the
numbers behind these choices and the default share of 0.85.  Rows are made on demand from ``(seed, row index)``,
so a run holds none in memory and a resumed run sees the same rows.

What it does not do: tokenize other than through the ``TextTokenizer`` given, build rows for pretraining
(``edgerope.train.synthetic.RowBuilder``), evaluate (any evaluation wording lives outside the training layer).
No torch import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgerope.errors import ConfigError, DataError
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
from edgerope.train.data import TextTokenizer

DEFAULT_RETRIEVAL_MIX = 0.85  # finetune's default share of retrieval rows (README, Quality: the numbers behind it)
KINDS = ("passkey", "multikey", "qa", "recall")
KIND_WEIGHTS = {"passkey": 4.0, "multikey": 1.0, "qa": 2.0, "recall": 2.0}
LANDMARK_SHARE = 0.25  # passkey samples in EVAL.md's exact template (Landmark filler included)
MIN_SAMPLE = 128  # tokens: the shortest sample (a row holds at least this many)
MIN_ROW = MIN_SAMPLE
# The varied wordings' numbers: a digit count (1-9) drawn with these weights, then a number of that many digits.
DIGIT_WEIGHTS = (1, 1, 2, 3, 4, 4, 3, 2, 1)
_DIGIT_P = np.asarray(DIGIT_WEIGHTS, dtype=np.float64) / sum(DIGIT_WEIGHTS)
LONG_FIRST = 0.8  # share of rows whose first sample spans at least half the row (distance is what x8 must learn)
NAMED_SHARE = 0.3  # facts named from NAMES; the rest by two words of the user's text
MIN_WORDS = 50  # distinct words needed to name facts from the user's text
FACTS = 6  # a varied-wording passkey sample states 1 to FACTS facts, each named differently, and asks for all
FACT_TOKENS = 128  # ... and at most one fact per FACT_TOKENS tokens of the sample
REPEATED_SHARE = 0.35  # passkey, multi-key and Q&A fillers made of a few of the text's sentences, repeated

NAMES = (
    "pass key", "secret number", "magic number", "lucky number", "hidden number", "special number", "secret key",
    "ticket number", "serial number", "reference number", "room number", "PIN", "password", "order number",
    "account number", "lock combination", "winning number", "ID number", "house number", "phone extension",
)  # fmt: skip
INTROS = (
    "",
    "Read the following text carefully. It contains a {name} that you will be asked for.",
    "A {name} is hidden in the text below. Find it and remember it.",
    "The text below mentions a {name}. Pay attention to it.",
    "There is a {name} somewhere in this text.",
    "Look out for the {name} in what follows; a question about it comes last.",
)
NEEDLES = (
    "The {name} is {k}.",
    "The {name} is {k}. Remember it. {k} is the {name}.",
    "Keep in mind that the {name} is {k}.",
    "Please note: the {name} is {k}.",
    "{k} is the {name}.",
    "Important: the {name} is {k}. Do not forget it.",
    "For the record, the {name} is {k}.",
    "Here is the {name}: {k}.",
    "Make a note: the {name} is {k}.",
    "The {name} you will need later is {k}.",
)
# A question is a lead, an ask and the answer's start "The {name} is"; or (QUESTION_BARE) the answer's start alone.
# Asks that do not say the name (GENERIC_ASKS) are used when a sample states one fact.
QUESTION_LEADS = ("", "", "", "So ", "Finally, ", "Then ", "Please ", "One more thing: ", "Question: ")
ASKS = (
    "what is the {name}?", "which number is the {name}?", "tell me the {name}.", "what was the {name} given above?",
    "recall the {name}.", "state the {name} from the text.", "repeat the {name} you read.",
    "write down the {name}.", "look back and find the {name}.", "what did the text say the {name} is?",
    "give the {name} mentioned earlier.", "do you remember the {name}?", "answer with the {name}.",
)  # fmt: skip
GENERIC_ASKS = (
    "what number was stated in the text?", "which number appeared above?", "repeat the number from the text above.",
    "give the number that was hidden in the text.", "tell me the number mentioned earlier.",
    "what was the number in the document?", "which number did you read?",
)  # fmt: skip
PLAIN_NEEDLE = 0.35  # facts stated in the plainest form, NEEDLES[0] ("The {name} is {k}."), the one most tests use
QUESTION_BARE = 0.15  # questions that are the answer's start alone ("The {name} is")
PEOPLE = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam")
MULTI_FORMS = (  # (fact, question) with {k}: the key, {v}: the value, {name}
    (MULTI_NEEDLE, MULTI_QUESTION),
    ("The {name} for {k} is {v}.", "What is the {name} for {k}? The {name} for {k} is"),
    ("Item {k} has the {name} {v}.", "Which {name} does item {k} have? Item {k} has the {name}"),
)


@dataclass(frozen=True)
class RetrievalMix:
    """How much of a run is retrieval rows (``fraction`` of the rows) and which kinds (relative ``weights``)."""

    fraction: float = DEFAULT_RETRIEVAL_MIX
    weights: tuple[tuple[str, float], ...] = tuple(KIND_WEIGHTS.items())
    answers_only: bool = True  # the loss of a retrieval row counts its answers only (False: every sample token)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(
                f"the retrieval mix must be a fraction in [0, 1], got {self.fraction}",
                fix=f"use --retrieval-mix {DEFAULT_RETRIEVAL_MIX} (retrieval_mix=), or 0 for the plain text alone",
            )
        w = dict(self.weights)
        if unknown := sorted(set(w) - set(KINDS)):
            raise ConfigError(f"unknown retrieval sample kinds {unknown}", fix=f"use {', '.join(KINDS)}")
        if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
            raise ConfigError(f"retrieval kind weights must be >= 0 and not all 0, got {w}")

    def probabilities(self) -> np.ndarray:
        w = dict(self.weights)
        p = np.array([w.get(k, 0.0) for k in KINDS], dtype=np.float64)
        return p / p.sum()

    def to_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "kinds": dict(zip(KINDS, self.probabilities().round(4).tolist(), strict=True)),
        }


# ---------------------------------------------------------------------------------------------------- samples


def _number(rng: np.random.Generator, landmark: bool = False) -> int:
    if landmark:
        return int(rng.integers(KEY_RANGE[0], KEY_RANGE[1], endpoint=True))
    digits = 1 + int(rng.choice(len(_DIGIT_P), p=_DIGIT_P))
    return int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _word_cut(text: str, at: int) -> int:
    """The first whitespace at or after ``at`` (a fact never lands inside a word of the user's text)."""
    m = re.compile(r"\s").search(text, at)
    return m.start() if m else len(text)


def repeated_sentences(rng: np.random.Generator, filler: str) -> str:
    """A haystack as many needle tests build one: 2-12 sentences of ``filler`` drawn again and again (in a random
    order) to about its length.  ``filler`` itself when it has fewer than 2 sentences."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", filler) if len(s.strip()) >= 8]
    if len(sentences) < 2:
        return filler
    pool = [
        sentences[int(i)]
        for i in rng.choice(len(sentences), size=min(len(sentences), int(rng.integers(2, 13))), replace=False)
    ]
    sep = " " if rng.random() < 0.5 else "\n"
    out: list[str] = []
    size = 0
    while size < len(filler):
        out.append(pool[int(rng.integers(len(pool)))])
        size += len(out[-1]) + 1
    return sep.join(out)[: len(filler)].rsplit(" ", 1)[0]


def _with_fact(filler: str, fact: str, rng: np.random.Generator) -> str:
    cut = _word_cut(filler, int(rng.integers(0, len(filler) + 1)))
    return " ".join(part for part in (filler[:cut].rstrip(), fact, filler[cut:].lstrip()) if part)


Turn = tuple[str, str]  # (text, answer): the model reads both; with the answers-only loss it learns the answer
Sample = list[Turn]  # a sample's turns: its text and first answer, then (several facts) each next question and answer


def question(rng: np.random.Generator, name: str, *, generic: bool = False) -> str:
    """A question about the fact named ``name``, ending with the answer's start "The {name} is"."""
    answer_start = f"The {name} is"
    if rng.random() < QUESTION_BARE:
        return answer_start
    ask = _pick(rng, GENERIC_ASKS if generic and rng.random() < 0.5 else ASKS).format(name=name)
    lead = _pick(rng, QUESTION_LEADS)
    if not lead or lead.endswith(": "):
        ask = ask[0].upper() + ask[1:]
    return f"{lead}{ask} {answer_start}"


def _scatter(rng: np.random.Generator, filler: str, n: int, fact: Callable[[int], str]) -> list[str]:
    """``filler`` cut at ``n`` random word boundaries (drawn first), ``fact(i)`` after the i-th piece: the parts
    of a text stating ``n`` facts at random places, empty pieces included."""
    cuts = sorted(_word_cut(filler, int(c)) for c in rng.integers(0, len(filler) + 1, size=n))
    parts, prev = [], 0
    for i, c in enumerate(cuts):
        parts += [filler[prev:c].strip(), fact(i)]
        prev = c
    return [*parts, filler[prev:].strip()]


def needle(rng: np.random.Generator, name: str, k: int) -> str:
    """A fact: ``NEEDLES[0]`` in a ``PLAIN_NEEDLE`` share, else any of ``NEEDLES``."""
    return (NEEDLES[0] if rng.random() < PLAIN_NEEDLE else _pick(rng, NEEDLES)).format(name=name, k=k)


def _asked(rng: np.random.Generator, questions: Sequence[str], answers: Sequence[str]) -> list[Turn]:
    """Every (question, answer) in a random order, each question on a new line or after a space."""
    order = rng.permutation(len(questions))
    return [(("\n" if rng.random() < 0.5 else " ") + questions[i], answers[i]) for i in order]


def passkey_sample(rng: np.random.Generator, filler: str, names: Sequence[str] = ("pass key",)) -> Sample:
    """A passkey sample: EVAL.md's template (a ``LANDMARK_SHARE`` of them, with the Landmark filler of
    ``len(filler)`` characters), or 1 to ``len(names)`` facts in varied wordings at random places of the user's
    ``filler``, each named by one of ``names`` and each asked for at the end (in a random order)."""
    if rng.random() < LANDMARK_SHARE:
        k = _number(rng, landmark=True)
        text = filler_text(len(filler))
        cut = int(rng.integers(0, len(text) + 1))
        return [("\n".join([INTRO, text[:cut], NEEDLE.format(k=k), text[cut:], QUESTION]), f" {k}.")]
    n = int(rng.integers(1, len(names) + 1))
    keys = [_number(rng) for _ in range(n)]
    parts = _scatter(rng, filler, n, lambda i: needle(rng, names[i], keys[i]))
    intro = _pick(rng, INTROS).format(name=names[0]) if n == 1 else ""
    sep = "\n" if rng.random() < 0.5 else " "
    turns = _asked(rng, [question(rng, m, generic=n == 1) for m in names[:n]], [f" {k}." for k in keys])
    body = " ".join(p for p in parts if p)
    return [(sep.join(p for p in (intro, body) if p) + turns[0][0], turns[0][1]), *turns[1:]]


def multikey_sample(rng: np.random.Generator, filler: str, names: Sequence[str] = ("value",)) -> Sample:
    """2-4 facts of one form about ``names[0]`` at random places in ``filler``, 1 to all of them asked for (in a
    random order), each with its answer."""
    name = names[0]
    form = int(rng.integers(len(MULTI_FORMS)))
    fact, question = MULTI_FORMS[form]
    n = int(rng.integers(2, 5))
    if form == 0:  # EVAL.md's multi-key form: keys and values from its range
        keys = rng.choice(np.arange(KEY_RANGE[0], KEY_RANGE[1] + 1), size=n, replace=False).tolist()
    elif form == 1 and rng.random() < 0.5:
        keys = rng.choice(PEOPLE, size=n, replace=False).tolist()
    else:
        keys = rng.choice(np.arange(1, 1000), size=n, replace=False).tolist()
    values = [_number(rng, landmark=form == 0) for _ in range(n)]
    parts = _scatter(rng, filler, n, lambda i: fact.format(k=keys[i], v=values[i], name=name))
    asked = rng.permutation(n)[: int(rng.integers(1, n + 1))]
    turns = _asked(rng, [question.format(k=keys[i], name=name) for i in asked], [f" {values[i]}." for i in asked])
    turns[0] = ("\n".join(p for p in parts if p) + "\n" + turns[0][0].lstrip(), turns[0][1])
    return turns


def qa_sample(rng: np.random.Generator, filler: str, names: Sequence[str] = ("pass key",)) -> Sample:
    """``edgerope ask``'s plain prompt: the user's text with one fact in it, a question about it, the answer."""
    name, k = names[0], _number(rng)
    document = _with_fact(filler, needle(rng, name, k), rng)
    question = _pick(rng, (f"What is the {name}?", f"What does the document say the {name} is?"))
    return [(DOC_TEMPLATE.format(document=document) + QUESTION_TEMPLATE.format(question=question), f" {k}.")]


def recall_sample(
    rng: np.random.Generator, filler: str, names: Sequence[str] = (), *, quote: int = 4, answer: int = 4
) -> Sample | None:
    """``edgerope ask``'s plain prompt over the user's text alone: which words follow a quoted phrase.

    The phrase is ``quote`` consecutive words of ``filler`` on one line, at least 12 characters, that occur
    nowhere else in it (so the answer is unique); the answer is the ``answer`` words after it.  None when no
    such phrase turns up in 8 draws.
    """
    spans = [m.span() for m in re.finditer(r"\S+", filler)]  # (start, end) of each word
    if len(spans) < quote + answer + 1:
        return None
    for _ in range(8):
        i = int(rng.integers(quote, len(spans) - answer + 1))
        phrase = filler[spans[i - quote][0] : spans[i - 1][1]]
        if "\n" in phrase or len(phrase) < 12 or filler.count(phrase) != 1:
            continue
        question = f'Which words come right after "{phrase}" in the document?'
        words = " ".join(filler[a:b] for a, b in spans[i : i + answer])
        return [(DOC_TEMPLATE.format(document=filler) + QUESTION_TEMPLATE.format(question=question), " " + words)]
    return None


SAMPLERS = {"passkey": passkey_sample, "multikey": multikey_sample, "qa": qa_sample, "recall": recall_sample}


# ---------------------------------------------------------------------------------------------------- rows


def check_row_length(seq_len: int) -> None:
    """Refuse rows too short for a retrieval sample (``ConfigError`` naming the flags to change)."""
    if seq_len < MIN_ROW:
        raise ConfigError(
            f"retrieval samples need rows of at least {MIN_ROW} tokens, the run's rows have {seq_len}",
            fix="raise --seq-len (seq_len=), or train on the text alone with --retrieval-mix 0 (retrieval_mix=0)",
        )


class RetrievalRows:
    """Retrieval rows of ``seq_len`` tokens made on demand from the user's training text.

    ``pieces`` are the tokenized training text (documents, or the pieces between held-out chunks); fillers are
    spans of them, decoded.  ``row(i)`` is a function of ``(seed, i)`` alone; ``kinds`` holds the kind of each
    of the first ``n_rows`` rows (drawn up front, so a report can count them without making any).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        pieces: Sequence[np.ndarray],
        *,
        seq_len: int,
        n_rows: int,
        mix: RetrievalMix,
        seed: int,
    ) -> None:
        check_row_length(seq_len)
        self.tok, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.stream = np.concatenate([np.asarray(p, dtype=np.int32) for p in pieces]) if pieces else np.zeros(0)
        special = {t for t in (tokenizer.bos_id, tokenizer.eos_id) if t is not None}
        self.stream = self.stream[~np.isin(self.stream, list(special))] if special else self.stream  # (N,)
        if len(self.stream) < MIN_ROW:
            raise DataError(
                f"the training text has {len(self.stream)} tokens, too few to build retrieval samples from",
                fix="add text, or train without them: --retrieval-mix 0 (retrieval_mix=0)",
            )
        self.head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        p = mix.probabilities()
        self.kinds = np.random.default_rng([seed, 0x6D6978]).choice(len(KINDS), size=n_rows, p=p)  # (n_rows,)
        self.probabilities, self.answers_only = p, mix.answers_only
        self.words = self._words(np.random.default_rng([seed, 0x776F7264]))

    def _words(self, rng: np.random.Generator) -> list[str]:
        """Lower-case words of 3-12 letters from up to 64 spans of the training text (names for the facts)."""
        found: set[str] = set()
        for _ in range(64):
            span = self.tok.decode(self._span(rng, min(512, len(self.stream))).tolist())
            words = span.split()[1:-1]  # the first and last may be cut
            found.update(w for w in words if re.fullmatch(r"[a-z]{3,12}", w))
        return sorted(found)

    def name(self, rng: np.random.Generator) -> str:
        """What a fact is about: one of ``NAMES`` (a ``NAMED_SHARE``), else two words of the user's text ("the
        method attribute"), so the question must be matched to its fact, not to a few learned names."""
        if rng.random() < NAMED_SHARE or len(self.words) < MIN_WORDS:
            return str(_pick(rng, NAMES))
        return f"{_pick(rng, self.words)} {_pick(rng, self.words)}"

    def names(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` distinct names (``name``), for the facts of one sample."""
        out: list[str] = []
        for _ in range(8 * n):
            if (m := self.name(rng)) not in out:
                out.append(m)
            if len(out) == n:
                break
        return out

    def counts(self) -> dict[str, int]:
        """Rows of each kind (the kind of a row's first sample) among the first ``n_rows``."""
        return {k: int((self.kinds == i).sum()) for i, k in enumerate(KINDS)}

    def _span(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` consecutive tokens of the training text (its whole length, repeated, when shorter)."""
        if n >= len(self.stream):
            reps = n // len(self.stream) + 1
            return np.tile(self.stream, reps)[:n]
        start = int(rng.integers(0, len(self.stream) - n + 1))
        return self.stream[start : start + n]

    def _sample_ids(self, rng: np.random.Generator, kind: str, want: int) -> tuple[list[int], list[bool]]:
        """(ids, target) of a ``kind`` sample of at most ``want`` tokens, BOS and EOS included, its filler shrunk
        until it fits; ``target`` marks the answers' tokens and the EOS."""
        overhead = 48 if kind in ("passkey", "multikey") else 64
        n_fill = max(8, want - overhead)
        for _ in range(12):
            filler = self.tok.decode(self._span(rng, n_fill).tolist())
            if kind != "recall" and rng.random() < REPEATED_SHARE:
                filler = repeated_sentences(rng, filler)
            names = self.names(rng, max(1, min(FACTS, want // FACT_TOKENS)))
            sample = SAMPLERS[kind](rng, filler, names)
            if sample is None:  # recall: no unique phrase in this span; a passkey sample instead
                sample = passkey_sample(rng, filler, names)
            ids, target = self._encode(sample)
            if len(ids) <= want:
                return ids, target
            n_fill = max(1, n_fill - (len(ids) - want) - 4)
        raise ConfigError(f"cannot fit a {kind} sample into {want} tokens", fix="raise --seq-len (seq_len=)")

    def _encode(self, sample: Sample) -> tuple[list[int], list[bool]]:
        """The sample's ids (BOS, text, EOS) and which of them are answers (the EOS counted with the last one).

        An answer's tokens are those of the whole text that differ from the tokens of the text before it, up to
        where the whole text's tokens stop matching the tokens of the text through it.
        """
        text, spans = "", []
        for prompt, answer in sample:
            text += prompt
            spans.append((len(text), len(text) + len(answer)))
            text += answer
        ids = self.head + self.tok.encode(text) + self.tail
        target = [False] * len(ids)
        for a, b in spans:
            start = _common_prefix(ids, self.head + self.tok.encode(text[:a]))
            end = len(ids) if b == len(text) else _common_prefix(ids, self.head + self.tok.encode(text[:b]))
            target[start:end] = [True] * (end - start)
        return ids, target

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``: (ids (seq_len,) int32, target (seq_len,) bool).  Samples back to back: the first
        ``MIN_SAMPLE`` tokens to the whole row (uniform), each next one ``MIN_SAMPLE`` to what is left
        (log-uniform), then the user's text in the rest; ``target`` marks the tokens a loss counts: the answers
        and their EOS (``answers_only``), or every sample token."""
        rng = np.random.default_rng([self.seed, int(i)])
        first = KINDS[int(self.kinds[i % len(self.kinds)])] if len(self.kinds) else "passkey"
        p = self.probabilities
        ids: list[int] = []
        target: list[bool] = []
        kind = first
        while self.seq_len - len(ids) >= MIN_SAMPLE:
            room = self.seq_len - len(ids)
            if ids:  # the others fill the rest: log-uniform, so short ones are many
                want = int(round(np.exp(rng.uniform(np.log(MIN_SAMPLE), np.log(room)))))
            else:  # the first: uniform up to the whole row; in a LONG_FIRST share at least half of it
                low = max(MIN_SAMPLE, room // 2) if rng.random() < LONG_FIRST else MIN_SAMPLE
                want = int(rng.integers(low, room + 1))
            sample, answers = self._sample_ids(rng, kind, min(room, max(MIN_SAMPLE, want)))
            ids += sample
            target += answers if self.answers_only else [True] * len(sample)
            kind = KINDS[int(rng.choice(len(KINDS), p=p))]
        rest = self.seq_len - len(ids)
        ids += self._span(rng, rest).tolist()
        target += [False] * rest
        return np.asarray(ids, dtype=np.int32), np.asarray(target, dtype=bool)

    def sample_text(self, i: int) -> str:
        """The text of row ``i``'s first sample (what the model reads and the answer), for reports and tests."""
        row = self.row(i)[0].tolist()
        end = row.index(self.tail[0]) if self.tail and self.tail[0] in row else len(row)
        return self.tok.decode(row[:end])
