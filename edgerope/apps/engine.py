"""Running one completion request on a ``Runtime``: the prompt, cheap checks before expensive ones, generation
with stop strings, text streamed as it becomes final.  It runs inside the model worker process
(``edgerope.apps.worker``), one request at a time.

What ``Engine.run(job, emit, cancelled)`` does, in order of cost:

1. the prompt text: the GGUF's chat template rendered in the sandbox with its time and memory budgets
   (``edgerope.apps.chat_template``; any failure is a 400), the plain chat format when the GGUF has none, or the
   text-completion prompt as given;
2. a lower bound on its tokens from its bytes (``VocabFacts.min_tokens``): a prompt that cannot fit the context
   is refused before it is tokenized;
3. tokens, in chunks linear in the text (``edgerope.runtime.tokenizing``), then the exact check against the context
   and ``max_tokens`` (default ``DEFAULT_MAX_TOKENS``, or what is left of the context if less); nothing is ever
   truncated;
4. ``emit("start", ...)`` with the prompt's token counts: the caller may now answer 200;
5. a long first system message restored from (or saved to) the document cache (``edgerope.runtime.prefix``);
6. generation, greedy or sampled, through a ``TextStream`` (incremental detokenization, the request's stop
   strings, and for the plain chat format the next role marker, ``PLAIN_STOPS``); ``emit("piece", text)`` for
   text no stop string can still cut; ``cancelled()`` is polled between tokens and between prefill chunks.

What it does not do: HTTP or JSON (``edgerope.apps.asgi``), queueing (one request at a time is the worker's loop),
or reuse any KV state between requests beyond the cached system prefix.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from edgerope.apps.chat_template import PLAIN_FORMAT, PLAIN_STOPS, ChatTemplate, TemplateError, plain_prompt
from edgerope.apps.openai_api import Job, RequestError
from edgerope.runtime.doccache import DocCache
from edgerope.runtime.prefix import load_prefix
from edgerope.runtime.runtime import Runtime
from edgerope.runtime.textstream import TextStream
from edgerope.runtime.tokenizing import LinearTokenizer

logger = logging.getLogger(__name__)

MIN_PREFIX_TOKENS = 512  # a system message at least this long has its KV state kept in the document cache
DEFAULT_MAX_TOKENS = 512  # a request without max_tokens gets at most this many (or what the context has left)

Emit = Callable[[str, Any], None]


class Cancelled(Exception):
    """The caller withdrew the request (the client went away)."""


class _Stop(Exception):
    """Ends a generation from inside ``on_token``."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    cached_tokens: int = 0  # prompt tokens whose KV state came from the document cache

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    """One runtime serving requests one after the other (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        template: ChatTemplate | None,
        tokenizer: LinearTokenizer,
        cache: DocCache | None = None,
        model_identity: Any = None,
        min_prefix_tokens: int = MIN_PREFIX_TOKENS,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.runtime = runtime
        self.template = template
        self.tokenizer = tokenizer
        self.cache = cache
        self.model_identity = model_identity
        self.min_prefix_tokens = min_prefix_tokens
        self.default_max_tokens = default_max_tokens
        source = template.source if template is not None else PLAIN_FORMAT
        self.prompt_format = f"server-{hashlib.sha256(source.encode()).hexdigest()[:16]}"

    # prompt
    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            return plain_prompt(messages, add_generation_prompt=add_generation_prompt)
        try:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise RequestError(
                f"the chat template could not render these messages: {exc.what}", param="messages"
            ) from None

    def _tokens(self, text: str, *, special: bool, add_bos: bool | None = None) -> list[int]:
        """Tokens of a prompt part, refused first from its bytes when it cannot fit the context."""
        n_ctx = self.runtime.n_ctx
        at_least = self.tokenizer.min_tokens(text)
        if at_least >= n_ctx:
            raise RequestError(
                f"the prompt has at least {at_least} tokens ({len(text.encode('utf-8'))} bytes, at most "
                f"{self.tokenizer.facts.max_token_bytes} bytes per token); the context is {n_ctx} tokens; nothing "
                "was tokenized or truncated",
                param="messages",
                fix="send a shorter prompt, or start the server with a larger --ctx",
            )
        if add_bos is None and special and self.template is not None and self.template.bos_token:
            add_bos = False if text.startswith(self.template.bos_token) else None  # the template wrote BOS
        return self.tokenizer(text, add_bos=add_bos, special=special)

    def prompt_tokens(self, job: Job) -> tuple[list[int], int]:
        """The request's prompt tokens and how many of them are a cacheable prefix (0: none).

        With a document cache, a first system message of at least ``min_prefix_tokens`` tokens whose rendering
        is a prefix of the whole prompt is tokenized apart from the rest (for every such request, cached or not),
        so its KV state can be saved and restored."""
        if not job.chat:
            return self._tokens(job.prompt, special=False), 0
        messages = [{"role": r, "content": c} for r, c in job.messages]
        prompt = self.chat_prompt(messages)
        if self.cache is not None and len(messages) > 1 and messages[0]["role"] == "system":
            try:
                head = self.chat_prompt(messages[:1], add_generation_prompt=False)
            except RequestError:  # a template that refuses a lone system message
                head = ""
            if head and prompt.startswith(head) and len(head) < len(prompt):
                prefix = self._tokens(head, special=True)
                if len(prefix) >= self.min_prefix_tokens:
                    rest = self._tokens(prompt[len(head) :], special=True, add_bos=False)
                    return prefix + rest, len(prefix)
        return self._tokens(prompt, special=True), 0

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """How many tokens to generate at most; ``RequestError`` when the prompt or max_tokens do not fit."""
        n_ctx = self.runtime.n_ctx
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if n_prompt >= n_ctx:
            raise RequestError(
                f"the prompt has {n_prompt} tokens; the context is {n_ctx} tokens and must hold the prompt and at "
                "least one new token; nothing was truncated",
                param="messages",
                fix="send a shorter prompt, or start the server with a larger --ctx",
            )
        room = n_ctx - n_prompt
        if max_tokens is None:
            return min(self.default_max_tokens, room)
        if max_tokens < 1:
            raise RequestError("'max_tokens' must be >= 1", param="max_tokens")
        if max_tokens > room:
            raise RequestError(
                f"max_tokens {max_tokens} does not fit: the prompt has {n_prompt} tokens and the context is {n_ctx}",
                param="max_tokens",
                fix=f"ask for at most {room} tokens",
            )
        return max_tokens

    # running
    def run(self, job: Job, *, emit: Emit, cancelled: Callable[[], bool] = lambda: False) -> Completion:
        """Answer ``job``: ``emit("start", {"prompt_tokens": n})`` once the prompt is accepted, then
        ``emit("piece", text)`` for each final piece of text (streaming jobs only).  Raises ``RequestError``
        for a request that cannot be served and ``Cancelled`` when ``cancelled()`` turned true."""
        tokens, n_prefix = self.prompt_tokens(job)
        budget = self.budget(len(tokens), job.max_tokens)
        emit("start", {"prompt_tokens": len(tokens)})
        rt = self.runtime
        stops = list(job.stops)
        if job.chat and self.template is None:
            stops += [s for s in PLAIN_STOPS if s not in stops]
        stream = TextStream(rt.detokenize, stops=stops)

        def on_token(tok: int) -> None:
            piece = stream.push(tok)
            if piece and job.stream:
                emit("piece", piece)
            if stream.stopped is not None:
                raise _Stop
            if cancelled():
                raise Cancelled

        cached, todo, clear = 0, tokens, True
        if n_prefix and self.cache is not None:
            cached = self._load_prefix(tokens[:n_prefix], cancelled)
            todo, clear = tokens[n_prefix:], False
        if clear and len(todo) > 2 * rt.info.n_batch:  # a long prompt: in chunks, so a cancel is seen
            rt.prefill(todo[:-1], progress=lambda done, total: _check(cancelled))
            todo, clear = todo[-1:], False
        try:
            gen = rt.generate(todo, max_tokens=budget, on_token=on_token, sampling=job.sampling, clear=clear)
            n_out = len(gen.tokens)
            reason = "stop" if gen.stop_reason in ("eog", "stop") else "length"
        except _Stop:
            n_out, reason = len(stream.tokens), "stop"
        rest = stream.finish()
        if rest and job.stream:
            emit("piece", rest)
        return Completion(stream.text, len(tokens), n_out, reason, cached)

    def _load_prefix(self, prefix: list[int], cancelled: Callable[[], bool]) -> int:
        """Restore the prefix's KV state from the document cache (returns its length), else evaluate and save it
        (returns 0), checking ``cancelled()`` between chunks."""

        loaded = load_prefix(
            self.runtime,
            prefix,
            cache=self.cache,
            model=self.model_identity,
            prompt_format=self.prompt_format,
            progress=lambda done, total: _check(cancelled),
        )
        return len(prefix) if loaded.cached else 0


def _check(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise Cancelled
