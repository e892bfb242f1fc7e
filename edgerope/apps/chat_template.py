"""Render a GGUF's chat template (``tokenizer.chat_template``, Jinja) safely, with Hugging Face's conventions.

What it does:

* ``ChatTemplate(source)`` compiles the template in jinja2's ``ImmutableSandboxedEnvironment`` with the
  settings Hugging Face uses for chat templates (``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols``
  extension, autoescape off) and the names templates expect: ``messages``, ``add_generation_prompt``,
  ``bos_token``/``eos_token``, ``raise_exception(msg)``, ``strftime_now(fmt)`` and a ``tojson`` filter that
  writes plain JSON (no HTML escaping);
* limits so that a hostile template can neither read files, import modules nor run away: the sandbox
  refuses ``__class__``/``__globals__``-style attributes and mutation; there are no file loaders (``include``
  and ``import`` fail); template size, output size, render time (a deadline checked on every line the
  compiled template executes in this thread), ``*``/``**`` results and the numeric arguments of filters
  are bounded; macro recursion ends at Python's recursion limit;
* every failure -- syntax, a sandbox violation, ``raise_exception``, a limit -- is a ``TemplateError`` naming
  the template line where jinja2 reports one;
* ``plain_prompt(messages)`` is the documented fallback when a GGUF has no template (``PLAIN_FORMAT``).

What it does not do: tokenize (the rendered text is tokenized by the runtime with special tokens parsed),
run templates that use tools/documents extensions beyond passing them through as variables, or guarantee
that an arbitrary template renders what its author meant.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import FrameType, TracebackType
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgerope.errors import EdgeropeError
from edgerope.gguf.reader import GGUFFile, using_gguf

TEMPLATE_NAME = "<template>"  # the filename jinja2 gives compiled template code
MAX_TEMPLATE_CHARS = 256 * 1024
MAX_OUTPUT_CHARS = 1 << 20  # 1 MiB of rendered text
RENDER_TIMEOUT_S = 2.0
ROLES_PLAIN = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_FORMAT = (
    "plain-chat-v1: one block per message, '<Role>: <content>' followed by a blank line (System, User, "
    "Assistant, or the role name capitalised), then 'Assistant:' when a reply is wanted"
)


class TemplateError(EdgeropeError):
    """A chat template cannot be compiled or rendered (syntax, sandbox violation, limit, raise_exception)."""


class _Limit(Exception):
    """Raised inside a render when a limit is hit (turned into TemplateError)."""


def _plain_json(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _guard_size(value: Any, limit: int) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > limit:
        raise _Limit(f"a value of {len(value)} items/characters exceeds the output limit {limit}")
    return value


def _guarded_filter(func: Any, limit: int) -> Any:
    """A filter that refuses numeric arguments above ``limit`` (widths, counts) and oversized results."""

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marker
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
                raise _Limit(f"filter {func.__name__!r} got the number {a}, above the limit {limit}")
        return _guard_size(func(*args, **kwargs), limit)

    return wrapper


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox plus bounds on ``*``/``**`` and on every call's result."""

    intercepted_binops = frozenset(["*", "**"])

    def __init__(self, *, max_output_chars: int) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            extensions=[jinja2.ext.loopcontrols],
            loader=None,
        )
        self.max_output_chars = max_output_chars
        self.filters = {name: _guarded_filter(f, max_output_chars) for name, f in self.filters.items()}
        self.filters["tojson"] = _guarded_filter(_plain_json, max_output_chars)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        limit = self.max_output_chars
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise _Limit(f"exponent {right} is above 64")
            if isinstance(left, int) and abs(left).bit_length() * abs(right) > 1 << 16:
                raise _Limit("the power is too large")
            return _guard_size(operator.pow(left, right), limit)
        if operator_ == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * max(b, 0) > limit:
                    raise _Limit(f"repeating a sequence {b} times exceeds the output limit {limit}")
            return operator.mul(left, right)
        return super().call_binop(context, operator_, left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        return _guard_size(super().call(__context, __obj, *args, **kwargs), self.max_output_chars)


def _template_line(tb: TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_NAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A compiled chat template; ``render(messages, ...)`` returns the prompt text.

    ``source`` is the Jinja text (a GGUF's ``tokenizer.chat_template``).  ``bos_token``/``eos_token`` are the
    special tokens' text.  Raises ``TemplateError`` for a template that is too large or does not compile.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        max_template_chars: int = MAX_TEMPLATE_CHARS,
        max_output_chars: int = MAX_OUTPUT_CHARS,
        timeout_s: float = RENDER_TIMEOUT_S,
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise TemplateError("the chat template is empty", where=TEMPLATE_NAME)
        if len(source) > max_template_chars:
            raise TemplateError(
                f"the chat template has {len(source)} characters, above the limit {max_template_chars}",
                where=TEMPLATE_NAME,
                fix="use a smaller template or raise max_template_chars",
            )
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.max_output_chars = max_output_chars
        self.timeout_s = timeout_s
        self._env = _Environment(max_output_chars=max_output_chars)
        try:
            self._template = self._env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise TemplateError(
                f"the chat template does not compile: {exc.message}",
                where=f"{TEMPLATE_NAME} line {exc.lineno}",
                fix="fix the template's Jinja syntax",
            ) from None

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for ``messages`` (a list of ``{"role": ..., "content": ...}``); ``extra`` are more template
        variables (e.g. ``tools``).  Raises ``TemplateError``; output and time are bounded."""
        variables = {
            **extra,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        deadline = time.monotonic() + self.timeout_s

        def local_trace(frame: FrameType, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise _Limit(f"rendering took longer than {self.timeout_s:g} s")
            return local_trace

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            return local_trace(frame, event, arg)

        parts: list[str] = []
        size = 0
        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise _Limit(f"the rendered prompt exceeds {self.max_output_chars} characters")
                parts.append(chunk)
        except (_Limit, jinja2.exceptions.TemplateError, RecursionError, TypeError, ValueError) as exc:
            line = _template_line(exc.__traceback__)
            kind = {
                jinja2.exceptions.SecurityError: "the sandbox refused an operation",
                jinja2.exceptions.UndefinedError: "an undefined value was used",
                RecursionError: "the template recursed too deeply",
            }.get(type(exc), "the chat template failed")
            if isinstance(exc, _Limit):
                kind = "the chat template hit a limit"
            raise TemplateError(
                f"{kind}: {exc}",
                where=TEMPLATE_NAME + (f" line {line}" if line else ""),
                fix="check the template and the messages (roles, content) it expects",
            ) from None
        finally:
            sys.settrace(previous)
        return "".join(parts)


def from_gguf(src: str | os.PathLike[str] | GGUFFile, **limits: Any) -> ChatTemplate | None:
    """The GGUF's chat template with its BOS/EOS token text, or None when it has none (``src``: a path, or the
    file already open; ``limits``: see ``ChatTemplate``).  Raises ``TemplateError`` when the template does not
    compile."""
    from gguf import Keys

    with using_gguf(src) as f:
        source = f.get(Keys.Tokenizer.CHAT_TEMPLATE)
        tokens = f.get(Keys.Tokenizer.LIST) or []
        bos, eos = f.get(Keys.Tokenizer.BOS_ID), f.get(Keys.Tokenizer.EOS_ID)
    if not source:
        return None

    def text(i: Any) -> str:
        return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else ""

    return ChatTemplate(str(source), bos_token=text(bos), eos_token=text(eos), **limits)


def plain_prompt(messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """The fallback prompt when a model has no chat template (``PLAIN_FORMAT``)."""
    blocks = []
    for m in messages:
        role = str(m.get("role", "user"))
        blocks.append(f"{ROLES_PLAIN.get(role, role.capitalize())}: {m.get('content') or ''}\n\n")
    return "".join(blocks) + ("Assistant:" if add_generation_prompt else "")
