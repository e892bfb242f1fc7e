"""Serving one ``Runtime``: requests run one at a time, prompts checked against the context, greedy or sampled
generation with stop strings, and a long system prefix's KV state kept in the document cache.

What it does: ``Engine`` turns chat messages into tokens (the GGUF's chat template in the sandbox, or the plain
format), refuses prompts and ``max_tokens`` that do not fit the context (``RequestError``, never truncating),
serialises requests with a lock and bounds how many wait (429), and streams text pieces that no stop string can
still cut (whole UTF-8 characters only) to an ``emit`` callback.

What it does not do: HTTP (``edgerope.apps.server``), batching, or any KV reuse beyond the cached system prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edgerope.apps.chat_template import PLAIN_FORMAT, ChatTemplate, TemplateError, plain_prompt
from edgerope.errors import EdgeropeError
from edgerope.runtime.doccache import DocCache
from edgerope.runtime.prefix import load_prefix
from edgerope.runtime.runtime import Runtime, Sampling

logger = logging.getLogger(__name__)

MIN_PREFIX_TOKENS = 512  # a system message at least this long has its KV state kept in the document cache


class RequestError(EdgeropeError):
    """A request the server refuses (answered with ``status``)."""

    def __init__(self, what: str, *, status: int = 400, param: str | None = None, fix: str | None = None) -> None:
        super().__init__(what, where=param, fix=fix)
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class _Stop(Exception):
    """Ends a generation from inside ``on_token`` (a stop string matched, or the client went away)."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    cached_tokens: int = 0  # prompt tokens whose KV state came from the document cache


# --------------------------------------------------------------------------------------------------------------
# the engine: one runtime, one request at a time


class Engine:
    """Prompts to tokens, token counts checked against the context, one request at a time (a bounded queue),
    greedy or sampled generation with stop strings, a long system prefix restored from the document cache."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        template: ChatTemplate | None,
        model_id: str,
        max_queue: int = 8,
        cache: DocCache | None = None,
        model_identity: Any = None,
        min_prefix_tokens: int = MIN_PREFIX_TOKENS,
    ):
        self.runtime = runtime
        self.template = template
        self.model_id = model_id
        self.max_queue = max_queue
        self.cache = cache
        self.model_identity = model_identity
        self.min_prefix_tokens = min_prefix_tokens
        source = template.source if template is not None else PLAIN_FORMAT
        self.prompt_format = f"server-{hashlib.sha256(source.encode()).hexdigest()[:16]}"
        self._lock = threading.Lock()
        self._waiting = 0
        self._count_lock = threading.Lock()

    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            return plain_prompt(messages, add_generation_prompt=add_generation_prompt)
        try:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise RequestError(f"the chat template could not render these messages: {exc.what}") from None

    def chat_tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """The chat prompt's tokens and how many of them are a cacheable prefix (0: none).

        With a document cache, a first system message of at least ``min_prefix_tokens`` tokens whose rendering
        is a prefix of the whole prompt is tokenized apart from the rest (for every such request, cached or not),
        so its KV state can be saved and restored."""
        prompt = self.chat_prompt(messages)
        if self.cache is not None and len(messages) > 1 and messages[0]["role"] == "system":
            try:
                head = self.chat_prompt(messages[:1], add_generation_prompt=False)
            except RequestError:  # a template that refuses a lone system message
                head = ""
            if head and prompt.startswith(head) and len(head) < len(prompt):
                prefix = self.tokens(head, special=True)
                if len(prefix) >= self.min_prefix_tokens:
                    rest = self.runtime.tokenize(prompt[len(head) :], add_bos=False, special=True)
                    return prefix + rest, len(prefix)
        return self.tokens(prompt, special=True), 0

    def tokens(self, prompt: str, *, special: bool) -> list[int]:
        rt = self.runtime
        bos = self.template.bos_token if self.template is not None else ""
        add_bos = False if special and bos and prompt.startswith(bos) else None  # the template wrote BOS
        return rt.tokenize(prompt, add_bos=add_bos, special=special)

    def _budget(self, n_prompt: int, max_tokens: int | None) -> int:
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
            return room
        if max_tokens < 1:
            raise RequestError("'max_tokens' must be >= 1", param="max_tokens")
        if max_tokens > room:
            raise RequestError(
                f"max_tokens {max_tokens} does not fit: the prompt has {n_prompt} tokens and the context is {n_ctx}",
                param="max_tokens",
                fix=f"ask for at most {room} tokens",
            )
        return max_tokens

    def _enter(self) -> None:
        with self._count_lock:
            if self._waiting >= self.max_queue + 1:
                raise RequestError("the server is busy; too many requests are waiting", status=429)
            self._waiting += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._waiting -= 1

    def run(
        self,
        tokens: list[int],
        *,
        max_tokens: int | None,
        stops: list[str],
        sampling: Sampling | None = None,
        emit: Callable[[str], None] | None = None,
        n_prefix: int = 0,
        admitted: bool = False,
    ) -> Completion:
        """Generate after ``tokens``; ``emit(text)`` gets each new piece of text that can no longer be cut by a
        stop string (an exception it raises ends the generation and propagates).  ``admitted``: the caller
        already holds a place in the queue (``admit()``)."""
        budget = self.check(tokens, max_tokens)
        with contextlib.nullcontext() if admitted else self.admit(), self._lock:
            return self._generate(tokens, budget, stops, sampling, emit, n_prefix)

    def check(self, tokens: list[int], max_tokens: int | None) -> int:
        """The number of tokens to generate at most; ``RequestError`` when the prompt or max_tokens do not fit."""
        return self._budget(len(tokens), max_tokens)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """A place in the bounded queue, held while waiting and running; ``RequestError`` 429 when full."""
        self._enter()
        try:
            yield
        finally:
            self._leave()

    def _generate(
        self,
        tokens: list[int],
        budget: int,
        stops: list[str],
        sampling: Sampling | None,
        emit: Callable[[str], None] | None,
        n_prefix: int,
    ) -> Completion:
        rt = self.runtime
        out: list[int] = []
        state = {"sent": 0, "text": "", "stopped": False}
        hold = max((len(s) for s in stops), default=1) - 1

        def on_token(tok: int) -> None:
            out.append(tok)
            text = rt.detokenize(out)
            state["text"] = text
            cut = _first_stop(text, stops)
            if cut is not None:
                state["text"], state["stopped"] = text[:cut], True
                raise _Stop
            if emit is not None:
                safe = len(text) - hold
                while safe > state["sent"] and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
                    safe -= 1
                if safe > state["sent"]:
                    emit(text[state["sent"] : safe])
                    state["sent"] = safe

        cached, todo, clear = 0, tokens, True
        if n_prefix and self.cache is not None:
            cached = self._load_prefix(tokens[:n_prefix])
            todo, clear = tokens[n_prefix:], False
        try:
            gen = rt.generate(todo, max_tokens=budget, on_token=on_token, sampling=sampling, clear=clear)
            text = rt.detokenize(gen.tokens)
            n_out = len(gen.tokens)
            reason = "stop" if gen.stop_reason in ("eog", "stop") else "length"
        except _Stop:
            text, n_out, reason = str(state["text"]), len(out), "stop"
        if emit is not None and len(text) > int(state["sent"]):
            emit(text[int(state["sent"]) :])
        return Completion(text, len(tokens), n_out, reason, cached)

    def _load_prefix(self, prefix: list[int]) -> int:
        """Restore the prefix's KV state from the document cache (returns its length), else evaluate and save it
        (returns 0)."""
        loaded = load_prefix(
            self.runtime, prefix, cache=self.cache, model=self.model_identity, prompt_format=self.prompt_format
        )
        return len(prefix) if loaded.cached else 0


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
