"""Long-document question answering on llama.cpp, with the document's KV state cached on disk.

What it does:

* ``ask_file`` reads the document with ``edgerope.apps.documents.read_document``: refused by type (a FIFO, a
  device) or by size (more bytes than the model's context can hold) before anything is read;
* ``ask`` builds a plain completion prompt -- ``DOC_TEMPLATE`` with the document, then
  ``QUESTION_TEMPLATE`` with the question, tokenized separately so the document prefix is the same
  token sequence for every question -- checks that it fits the context (truncating only when asked, below), then
  restores the document's saved KV state from ``edgerope.runtime.doccache`` or evaluates it in n_batch chunks
  (reporting ``progress(done, total)``) and saves it, evaluates only the question, and answers greedily
  with llama.cpp's sampler.  Timings: document prefill (or state restore), time to first token, decode
  tokens/s.

With ``prompt_format="auto"`` (the default) a GGUF that carries a chat template gets the same text as one
user message rendered by that template in the sandbox (``edgerope.apps.chat_template``; the rendered text is
split where the question starts, so the document prefix still tokenizes the same for every question, and
special tokens in the template are parsed); ``"plain"`` forces the plain prompt.

A document that does not fit is refused, unless ``truncate=True``: then its **tail** is cut (the beginning is
kept in order, so the answer rests on an unbroken leading part of the document and its cached state is a
prefix of the whole document's), at a word boundary, leaving room for the question and ``max_tokens``
answer tokens (at most half the free context); ``Answer.truncation`` says exactly what was cut (tokens,
character offset, the cut part's first and last words).

Cheap checks come before tokenizing: a document whose bytes alone prove it cannot fit the context
(``VocabFacts.min_tokens``) is refused without tokenizing it, and with ``truncate`` only the part that can fit is
tokenized.  Long documents are tokenized in chunks, linear in their length (``edgerope.runtime.tokenizing``).

The answer streams through ``on_token(token)`` and ``on_text(piece)``: incremental detokenization
(``edgerope.runtime.textstream``), linear in the answer.  In the plain format the answer ends at the next marker
of the format (``PLAIN_QA_STOPS``: a new "Question:" or "Document:" line) as well as at the end-of-generation
token; a chat template ends it with its own end-of-turn token.

What it does not do: summarise a document, cut its middle, or sample other than greedily.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgerope.apps.chat_template import ChatTemplate, from_gguf
from edgerope.apps.documents import check_document, document_byte_limit, read_document
from edgerope.errors import RuntimeConfigError
from edgerope.gguf.reader import GGUFFile, using_gguf
from edgerope.prompts import DOC_TEMPLATE, PLAIN_QA_FORMAT, QUESTION_TEMPLATE
from edgerope.runtime.doccache import DocCache, model_identity
from edgerope.runtime.prefix import load_prefix
from edgerope.runtime.runtime import Runtime
from edgerope.runtime.textstream import TextStream
from edgerope.runtime.tokenizing import LinearTokenizer, VocabFacts

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("auto", "chat", "plain")
_SPLIT = "\ue000edgerope-question\ue000"  # a private-use marker where the question goes
# the plain format's own markers, from its templates: an answer that starts a new question or document has ended
PLAIN_QA_STOPS = ("\nQuestion:", "\nDocument:")


@dataclass(frozen=True)
class Timings:
    prefill_s: float  # document prefill, or restoring its cached state
    question_s: float  # evaluating the question tokens
    time_to_first_token_s: float  # from the start of prefill/restore to the first answer token
    decode_tokens_per_s: float  # answer tokens after the first


@dataclass(frozen=True)
class Truncation:
    """The document's tail cut by ``truncate=True``: ``document[chars_kept:]`` was not used."""

    document_tokens_before: int  # the document prefix's tokens with the whole document
    tokens_cut: int  # how many fewer the kept part has
    chars_kept: int  # character offset where the cut starts
    chars_cut: int  # characters cut (to the document's end)
    first_words: str  # the start of the cut part
    last_words: str  # the end of the cut part (the document's end)

    def describe(self) -> str:
        return (
            f"cut the document's last {self.tokens_cut} of {self.document_tokens_before} tokens (characters "
            f'{self.chars_kept}..{self.chars_kept + self.chars_cut}): from "{self.first_words}" to "{self.last_words}"'
        )


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: list[int]
    prompt_tokens: int  # document + question
    document_tokens: int
    question_tokens: int
    cached: bool  # the document's state came from the cache
    stop_reason: str
    timings: Timings
    n_ctx: int
    type_k: str
    type_v: str
    prompt_format: str = PLAIN_QA_FORMAT
    cache_file: str | None = None
    truncation: Truncation | None = None  # what truncate=True cut; None: the whole document was used
    n_ctx_source: str = ""  # how the runtime chose n_ctx
    cpu_repack: dict[str, Any] = field(default_factory=dict)  # the CPU weight layout used (edgerope.runtime.cpu_repack)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit_error(rt: Runtime, n_doc: int, n_q: int, where: str) -> RuntimeConfigError:
    need = n_doc + n_q + 1
    n_ctx, n_train = rt.plan.n_ctx, rt.plan.hparams.n_ctx_train
    if need <= n_train:
        fix = (
            f"run with --ctx {need} or more (the model's rope supports up to {n_train}), a smaller document, or "
            "--truncate (truncate=True) to cut the document's tail"
        )
    else:
        fix = (
            f"use a smaller document: the model's context_length (rope-extended) is {n_train}, so the "
            f"document and question must stay under {n_train} tokens, or use --truncate (truncate=True) to cut "
            "the document's tail"
        )
    return RuntimeConfigError(
        f"the prompt does not fit: document {n_doc} + question {n_q} tokens (+1 for the answer) = {need}, "
        f"the context is {n_ctx}; nothing was truncated",
        where=where,
        fix=fix,
    )


CUT_WORDS = 8  # words of the cut part shown at each end
_SNAP_CHARS = 200  # how far back a cut may move to land on whitespace


def _truncate(
    text: str, encode: Callable[[str], list[int]], *, target: int, n_before: int, where: str, max_chars: int
) -> tuple[str, Truncation]:
    """The longest leading part of ``text`` (ending at whitespace when one is near) whose prompt prefix
    ``encode(part)`` has at most ``target`` tokens, and what was cut.  Only ``text[:max_chars]`` can fit (a
    token covers at most so many characters), so only that is searched."""
    if len(encode("")) > target:
        raise RuntimeConfigError(
            f"even without the document the prompt needs more than the {target} tokens left for it",
            where=where,
            fix="raise --ctx, or ask a shorter question / fewer --max-tokens",
        )
    lo, hi = 0, min(len(text), max_chars + 1)  # encode(text[:lo]) fits, encode(text[:hi]) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(encode(text[:mid])) <= target:
            lo = mid
        else:
            hi = mid
    cut_at = lo
    space = max(text.rfind(c, max(0, lo - _SNAP_CHARS), lo + 1) for c in (" ", "\n", "\t"))
    if space > 0 and len(encode(text[:space])) <= target:
        cut_at = space
    kept = text[:cut_at].rstrip()
    cut_at = len(kept)
    words = text[cut_at:].split()
    n_kept = len(encode(kept))
    return kept, Truncation(
        document_tokens_before=n_before,
        tokens_cut=n_before - n_kept,
        chars_kept=cut_at,
        chars_cut=len(text) - cut_at,
        first_words=" ".join(words[:CUT_WORDS]),
        last_words=" ".join(words[-CUT_WORDS:]),
    )


def chat_parts(template: ChatTemplate, document: str, question: str) -> tuple[str, str]:
    """The chat-templated prompt for one user message (document block, then question) split into the document
    prefix and the question part; ``RuntimeConfigError`` when the template does not keep the message intact."""
    doc_block = DOC_TEMPLATE.format(document=document)
    q_block = QUESTION_TEMPLATE.format(question=question)
    marked = template.render([{"role": "user", "content": doc_block + _SPLIT}])
    full = template.render([{"role": "user", "content": doc_block + q_block}])
    if marked.count(_SPLIT) != 1:
        raise RuntimeConfigError(
            "the chat template changes the message text, so the document prefix cannot be split from the question",
            fix="use prompt_format='plain'",
        )
    prefix, rest = marked.split(_SPLIT)
    if prefix + q_block + rest != full:
        raise RuntimeConfigError(
            "the chat template renders the question differently from the marker text",
            fix="use prompt_format='plain'",
        )
    return prefix, q_block + rest


def _check_request(question: str, max_tokens: int, prompt_format: str) -> None:
    if not question.strip():
        raise RuntimeConfigError("the question is empty", fix="ask something")
    if max_tokens < 1:
        raise RuntimeConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    if prompt_format not in PROMPT_FORMATS:
        raise RuntimeConfigError(f"unknown prompt_format {prompt_format!r}", fix=f"use one of {PROMPT_FORMATS}")


def _template(f: GGUFFile, prompt_format: str, *, where: str) -> ChatTemplate | None:
    """The chat template to use: the GGUF's unless ``plain``; ``chat`` requires one."""
    template = from_gguf(f) if prompt_format != "plain" else None
    if prompt_format == "chat" and template is None:
        raise RuntimeConfigError(
            "prompt_format 'chat' needs a chat template, and the GGUF has none",
            where=where,
            fix="use 'auto' or 'plain'",
        )
    return template


@dataclass(frozen=True)
class _Prompt:
    """The question's tokens and how a document becomes its prefix tokens, in one prompt format."""

    format: str  # PLAIN_QA_FORMAT, or "chat-<template digest>"
    question: list[int]
    encode: Callable[[str], list[int]]  # document text -> the prefix tokens (the same for every question)
    stops: tuple[str, ...] = ()  # where the answer ends besides the end-of-generation token

    @classmethod
    def build(cls, tok: LinearTokenizer, template: ChatTemplate | None, question: str, document: str) -> _Prompt:
        if template is None:
            q = tok(QUESTION_TEMPLATE.format(question=question), add_bos=False)
            return cls(PLAIN_QA_FORMAT, q, lambda doc_text: tok(DOC_TEMPLATE.format(document=doc_text)), PLAIN_QA_STOPS)
        fmt = f"chat-{hashlib.sha256(template.source.encode()).hexdigest()[:16]}"
        q = tok(chat_parts(template, document, question)[1], add_bos=False, special=True)

        def encode(doc_text: str) -> list[int]:
            prefix = chat_parts(template, doc_text, question)[0]
            has_bos = bool(template.bos_token) and prefix.startswith(template.bos_token)
            return tok(prefix, add_bos=False if has_bos else None, special=True)

        return cls(fmt, q, encode)


def _fit(
    rt: Runtime, prompt: _Prompt, text: str, *, facts: VocabFacts, max_tokens: int, truncate: bool, where: str
) -> tuple[str, list[int], Truncation | None]:
    """(the document text used, its prefix tokens, what was cut): refuses a prompt that does not fit the context,
    or cuts the document's tail when ``truncate``; a document too long by its bytes alone is refused (or cut to
    what can fit) before it is tokenized."""
    q, n_ctx = prompt.question, rt.plan.n_ctx
    if len(q) + 1 > n_ctx:
        raise RuntimeConfigError(
            f"the question alone has {len(q)} tokens, the context is {n_ctx}", where=where, fix="ask a shorter question"
        )
    n_bytes = len(text.encode("utf-8"))
    at_least = facts.min_tokens(n_bytes)
    if at_least + len(q) + 1 > n_ctx and not truncate:
        raise RuntimeConfigError(
            f"the document alone needs at least {at_least} tokens ({n_bytes} bytes, at most {facts.max_token_bytes} "
            f"bytes per token), the context is {n_ctx}; nothing was tokenized or truncated",
            where=where,
            fix="use a smaller document, or --truncate (truncate=True) to cut its tail",
        )
    doc = prompt.encode(text)
    if len(doc) + len(q) + 1 <= n_ctx:
        return text, doc, None
    if not truncate:
        raise _fit_error(rt, len(doc), len(q), where)
    free = n_ctx - len(q)
    target = free - max(1, min(max_tokens, free // 2))
    max_chars = target * facts.max_token_bytes if facts.min_tokens(1) else len(text)
    text, truncation = _truncate(
        text, prompt.encode, target=target, n_before=len(doc), where=where, max_chars=max_chars
    )
    logger.info("document truncated: %s", truncation.describe())
    return text, prompt.encode(text), truncation


@dataclass(frozen=True)
class _Answered:
    tokens: list[int]
    text: str
    stop_reason: str
    t_first: float
    t_end: float


class _Stop(Exception):
    """A stop string ended the answer."""


def _answer(
    rt: Runtime,
    question: list[int],
    max_tokens: int,
    *,
    stops: tuple[str, ...],
    on_token: Callable[[int], None] | None,
    on_text: Callable[[str], None] | None,
) -> _Answered:
    """Evaluate the question after the cached document and answer greedily, streaming text through a
    ``TextStream`` (incremental, linear) that also ends the answer at a stop string."""
    first: list[float] = []
    stream = TextStream(rt.detokenize, stops=stops)

    def seen(tok: int) -> None:
        if not first:
            first.append(time.perf_counter())
        if on_token is not None:
            on_token(tok)
        piece = stream.push(tok)
        if piece and on_text is not None:
            on_text(piece)
        if stream.stopped is not None:
            raise _Stop

    try:
        gen = rt.generate(question, max_tokens=max_tokens, clear=False, on_token=seen)
        tokens, reason = gen.tokens, gen.stop_reason
    except _Stop:
        tokens, reason = stream.tokens, "stop"
    t_end = time.perf_counter()
    rest = stream.finish()
    if rest and on_text is not None:
        on_text(rest)
    return _Answered(tokens, stream.text, reason, first[0] if first else t_end, t_end)


def _answer_record(
    rt: Runtime,
    gen: Any,
    doc: list[int],
    prompt: _Prompt,
    loaded: Any,
    truncation: Truncation | None,
    *,
    t0: float,
    t1: float,
) -> Answer:
    """The ``Answer``: the generation, the prompt's sizes, the cache and runtime facts, timings from ``t0`` (prefill
    start) and ``t1`` (prefill end)."""
    t_first, t2 = gen.t_first, gen.t_end
    n_after = max(len(gen.tokens) - 1, 0)
    timings = Timings(
        prefill_s=t1 - t0,
        question_s=t_first - t1,
        time_to_first_token_s=t_first - t0,
        decode_tokens_per_s=n_after / (t2 - t_first) if n_after and t2 > t_first else 0.0,
    )
    plan = rt.plan
    return Answer(
        text=gen.text,
        tokens=gen.tokens,
        prompt_tokens=len(doc) + len(prompt.question),
        document_tokens=len(doc),
        question_tokens=len(prompt.question),
        cached=loaded.cached,
        stop_reason=gen.stop_reason,
        timings=timings,
        n_ctx=plan.n_ctx,
        type_k=plan.type_k.name,
        type_v=plan.type_v.name,
        prompt_format=prompt.format,
        cache_file=loaded.cache_file,
        truncation=truncation,
        n_ctx_source=rt.info.n_ctx_source,
        cpu_repack=rt.info.cpu_repack,
    )


def ask(
    model_path: str | os.PathLike[str],
    document_text: str,
    question: str,
    *,
    n_ctx: int | None = None,
    type_k: str = "f16",
    type_v: str = "f16",
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    max_tokens: int = 128,
    progress: Callable[[int, int], None] | None = None,
    on_token: Callable[[int], None] | None = None,
    runtime: Runtime | None = None,
    prompt_format: str = "auto",
    truncate: bool = False,
    on_text: Callable[[str], None] | None = None,
    **runtime_request: Any,
) -> Answer:
    """Answer ``question`` about ``document_text`` with the GGUF at ``model_path`` (greedy).

    ``n_ctx``/``type_k``/``type_v`` and ``runtime_request`` (``plan_runtime``'s other keyword arguments)
    open the runtime; an open ``runtime`` for the same model may be passed instead (it is not closed).
    ``cache_dir`` None is ``edgerope.runtime.doccache.default_cache_dir()``; ``use_cache=False`` neither reads nor
    writes it.  Raises ``DocumentError`` for bad documents and ``RuntimeConfigError`` when the prompt does
    not fit the context (nothing is ever truncated).  ``prompt_format`` "auto" uses the GGUF's chat template
    when it has one (``"chat"`` requires one, ``"plain"`` never uses it); ``Answer.prompt_format`` says which.
    ``truncate=True`` cuts the tail of a document that does not fit instead of refusing (module docstring);
    ``Answer.truncation`` reports the cut.  ``on_text(piece)`` is called with each new piece of the answer's text
    as it becomes final (whole characters, never past a stop string); the pieces join to ``Answer.text``.  In the
    plain format the answer ends at ``PLAIN_QA_STOPS`` (``stop_reason`` "stop").  ``n_ctx`` None: the runtime's default
    (the largest context that fits the memory budget, capped at the model's context_length).
    """
    text = check_document(document_text)
    _check_request(question, max_tokens, prompt_format)
    with using_gguf(model_path) as gguf_file:  # the header is parsed once for the template, cache key and plan
        where = str(gguf_file.path)
        template = _template(gguf_file, prompt_format, where=where)
        facts = VocabFacts.from_gguf(gguf_file)
        owned = runtime is None
        rt = runtime or Runtime.open(gguf_file, n_ctx=n_ctx, type_k=type_k, type_v=type_v, **runtime_request)
    try:
        prompt = _Prompt.build(LinearTokenizer(rt, facts), template, question.strip(), text)
        text, doc, truncation = _fit(
            rt, prompt, text, facts=facts, max_tokens=max_tokens, truncate=truncate, where=where
        )
        t0 = time.perf_counter()
        identity = model_identity(rt.plan.path, cache_dir=cache_dir) if use_cache else None  # content digest, recorded
        cache = DocCache(cache_dir) if use_cache else None
        loaded = load_prefix(rt, doc, cache=cache, model=identity, prompt_format=prompt.format, progress=progress)
        t1 = time.perf_counter()
        room = rt.plan.n_ctx - len(doc) - len(prompt.question)
        gen = _answer(
            rt, prompt.question, min(max_tokens, room), stops=prompt.stops, on_token=on_token, on_text=on_text
        )
        return _answer_record(rt, gen, doc, prompt, loaded, truncation, t0=t0, t1=t1)
    finally:
        if owned:
            rt.close()


def ask_file(
    model_path: str | os.PathLike[str],
    document_path: str | os.PathLike[str],
    question: str,
    *,
    n_ctx: int | None = None,
    truncate: bool = False,
    **kwargs: Any,
) -> Answer:
    """``ask`` on a document file: the GGUF is opened once, and the document refused by type or size before it is
    read (``read_document`` with ``document_byte_limit``)."""
    with using_gguf(model_path) as f:
        text = read_document(document_path, max_bytes=document_byte_limit(f, n_ctx=n_ctx, truncate=truncate))
        return ask(f, text, question, n_ctx=n_ctx, truncate=truncate, **kwargs)
