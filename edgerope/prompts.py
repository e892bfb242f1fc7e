"""The prompt texts edgerope writes, in one place: the evaluation protocols' and the plain Q&A format.

Training data (``edgerope.train.synthetic``), evaluation (``edgerope.evaluation``) and the apps
(``edgerope.apps``) all build these texts; keeping them here lets each of those layers import them without
importing the others.

* Passkey retrieval (EVAL.md, the Landmark Attention template): ``INTRO``, ``FILLER``, ``NEEDLE``,
  ``QUESTION``; ``passkey_text`` joins the five parts with the key at a depth of the filler.
* Multi-key retrieval: ``MULTI_NEEDLE`` / ``MULTI_QUESTION``; ``multikey_text``.
* The plain document Q&A format of ``edgerope ask`` and the server (``PLAIN_QA_FORMAT``): ``DOC_TEMPLATE`` then
  ``QUESTION_TEMPLATE``, tokenized separately so the document prefix can be cached.

What it does not do: tokenize, fit a prompt to a token length (``edgerope.evaluation.protocols``), or render
chat templates (``edgerope.apps.chat_template``).
"""

from __future__ import annotations

from collections.abc import Sequence

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {k}. Remember it. {k} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MULTI_NEEDLE = "The value of key {k} is {v}."
MULTI_QUESTION = "What is the value of key {k}? The value of key {k} is"
KEY_RANGE = (1, 50000)

PLAIN_QA_FORMAT = "plain-v1"  # recorded with cached document states: a change of the texts below invalidates them
DOC_TEMPLATE = "Read the document and answer the question.\n\nDocument:\n{document}\n"
QUESTION_TEMPLATE = "\nQuestion: {question}\nAnswer:"


def filler_text(n_chars: int) -> str:
    """The filler sentence repeated (joined by spaces) and cut to ``n_chars`` characters."""
    reps = n_chars // (len(FILLER) + 1) + 1
    return " ".join([FILLER] * reps)[:n_chars]


def passkey_text(key: int, *, depth: float, filler_chars: int) -> str:
    """The five parts of the passkey prompt joined by newlines, ``filler_chars`` of filler split at ``depth``."""
    before = round(depth * filler_chars)
    filler = filler_text(filler_chars)
    return "\n".join([INTRO, filler[:before], NEEDLE.format(k=key), filler[before:], QUESTION])


def multikey_text(keys: Sequence[int], values: Sequence[int], depths: Sequence[float], asked: int, n: int) -> str:
    """Intro, filler of ``n`` characters with each needle at its depth, then the question for key ``asked``."""
    filler = filler_text(n)
    cuts = [round(d * n) for d in depths]
    parts, prev = [INTRO], 0
    for k, v, c in zip(keys, values, cuts, strict=True):
        parts += [filler[prev:c], MULTI_NEEDLE.format(k=k, v=v)]
        prev = c
    parts += [filler[prev:], MULTI_QUESTION.format(k=keys[asked])]
    return "\n".join(parts)


def plain_document(document: str) -> str:
    """The document block of the plain Q&A format."""
    return DOC_TEMPLATE.format(document=document)


def plain_question(question: str) -> str:
    """The question block of the plain Q&A format (the answer follows it)."""
    return QUESTION_TEMPLATE.format(question=question)
