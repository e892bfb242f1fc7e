"""Render a GGUF's chat template (``tokenizer.chat_template``, Jinja) safely, with Hugging Face's conventions.

What it does:

* ``ChatTemplate(source)`` compiles the template in jinja2's ``ImmutableSandboxedEnvironment`` with the
  settings Hugging Face uses for chat templates (``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols``
  extension, autoescape off) and the names templates expect: ``messages``, ``add_generation_prompt``,
  ``bos_token``/``eos_token``, ``raise_exception(msg)``, ``strftime_now(fmt)`` and a ``tojson`` filter that
  writes plain JSON (no HTML escaping);
* limits so that a hostile template can neither read files, import modules nor run away: the sandbox
  refuses ``__class__``/``__globals__``-style attributes and mutation; there are no file loaders (``include``
  and ``import`` fail); template size, output size, time and memory are bounded, for compiling as for
  rendering:

  - time: a deadline checked on every line the template's code (and the Python it calls) executes in this
    thread (``sys.settrace``);
  - memory: a budget (``memory_bytes`` plus ``MEMORY_PER_INPUT_CHAR`` per character of the messages).  On Linux,
    when this is the process's only Python thread, the operating system enforces it (``RLIMIT_DATA`` lowered to
    the current data size plus the budget for the call, so any allocation beyond it fails with MemoryError);
    otherwise ``tracemalloc`` measures what the render allocated on every traced line;
  - single operations that could allocate much from little are checked before they run: ``*``, ``**``,
    ``+``, printf ``%`` and ``str.format`` widths, integer arguments of every call and filter (widths, counts),
    ``replace``/``join``/``indent`` results; every call's result and the output are bounded in characters
    (``max_output_chars`` plus twice the messages' characters, so long documents still render);

* every failure -- syntax, nesting too deep to parse, a sandbox violation, ``raise_exception``, a limit, any
  exception a template can provoke (OverflowError, RecursionError, MemoryError, ...) -- is a ``TemplateError``
  naming the template line where one is known;
* ``plain_prompt(messages)`` is the documented fallback when a GGUF has no template (``PLAIN_FORMAT``); a reply
  in that format ends at the next role marker (``PLAIN_STOPS``), which the server uses as stop strings.

What it does not do: tokenize (the rendered text is tokenized by the runtime with special tokens parsed),
run templates that use tools/documents extensions beyond passing them through as variables, or guarantee
that an arbitrary template renders what its author meant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import re
import string
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
MAX_OUTPUT_CHARS = 1 << 20  # 1 MiB of rendered text beyond the messages' own size (see ChatTemplate)
RENDER_TIMEOUT_S = 2.0
MEMORY_BYTES = 64 << 20  # a render's memory budget beyond its inputs ...
MEMORY_PER_INPUT_CHAR = 8  # ... plus this many bytes per character of the messages
MAX_JSON_INDENT = 16
ROLES_PLAIN = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_FORMAT = (
    "plain-chat-v1: one block per message, '<Role>: <content>' followed by a blank line (System, User, "
    "Assistant, or the role name capitalised), then 'Assistant:' when a reply is wanted"
)
PLAIN_STOPS = ("\nUser:", "\nSystem:", "\nAssistant:")  # a reply in the plain format ends where the next block starts
_PRINTF_WIDTH = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\d+|\*)?(?:\.(\d+|\*))?")


class TemplateError(EdgeropeError):
    """A chat template cannot be compiled or rendered (syntax, sandbox violation, limit, raise_exception)."""


class _Limit(Exception):
    """Raised inside a render when a limit is hit (turned into TemplateError)."""


def _plain_json(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    if indent is not None and (not isinstance(indent, int) or not 0 <= indent <= MAX_JSON_INDENT):
        raise _Limit(f"tojson indent must be an integer in [0, {MAX_JSON_INDENT}], got {indent!r}")
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:256])


_LIMIT = threading.local()  # the size limit of the render running in this thread


def _limit() -> int:
    return int(getattr(_LIMIT, "chars", MAX_OUTPUT_CHARS))


def _guard_size(value: Any) -> Any:
    limit = _limit()
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        raise _Limit(f"a value of {len(value)} items/characters exceeds the limit {limit}")
    return value


def _check_numbers(name: str, args: Iterable[Any]) -> None:
    limit = _limit()
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _Limit(f"{name} got the number {a}, above the limit {limit}")


def _check_printf(fmt: Any, values: Any) -> None:
    """Refuse a printf-style format whose widths or precisions exceed the size limit."""
    if not isinstance(fmt, str):
        return
    limit = _limit()
    for m in _PRINTF_WIDTH.finditer(fmt):
        for g in m.groups():
            if g and g != "*" and int(g) > limit:
                raise _Limit(f"the format width {g} is above the limit {limit}")
    _check_numbers("a '*' width", values if isinstance(values, tuple) else (values,))


def _check_brace_format(fmt: str) -> None:
    limit = _limit()
    for _, _, spec, _ in string.Formatter().parse(fmt):
        for digits in re.findall(r"\d+", spec or ""):
            if int(digits) > limit:
                raise _Limit(f"the format width {digits} is above the limit {limit}")


def _estimate(name: str, obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The size a str method or filter would produce, computed before it runs (0 when it cannot grow much)."""
    if name == "replace" and isinstance(obj, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[0], args[1]
        return len(obj) + (obj.count(old) if old else len(obj) + 1) * max(0, len(new) - len(old))
    if name == "join" and isinstance(obj, str) and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        return len(obj) * len(items) + sum(len(x) if isinstance(x, str) else 16 for x in items)
    if name == "indent" and isinstance(obj, str):
        width = args[0] if args else kwargs.get("width", 4)
        pad = len(width) if isinstance(width, str) else (width if isinstance(width, int) else 0)
        return len(obj) + (obj.count("\n") + 1) * max(0, pad)
    return 0


def _guarded_filter(func: Any) -> Any:
    """A filter that refuses numeric arguments above the limit (widths, counts), outputs it can tell in advance
    would be too large, and oversized results."""
    name = func.__name__

    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marker
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_numbers(f"filter {name!r}", (*args, *kwargs.values()))
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment))]
        if name in ("do_replace", "do_join", "do_indent") and values:
            obj = values[0] if name != "do_join" else (values[1] if len(values) > 1 else "")
            rest = tuple(values[1:]) if name != "do_join" else (list(values[0]) if _sized(values[0]) else [],)
            size = _estimate(name.removeprefix("do_"), obj, rest, kwargs)
            if size > _limit():
                raise _Limit(f"filter {name.removeprefix('do_')!r} would produce {size} characters, above {_limit()}")
        if name == "do_format" and values:
            _check_printf(values[0], tuple(values[1:]))
        return _guard_size(func(*args, **kwargs))

    return wrapper


def _sized(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) <= _limit()


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox plus bounds on operators, calls and their results."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
            extensions=[jinja2.ext.loopcontrols],
            loader=None,
        )
        self.filters = {name: _guarded_filter(f) for name, f in self.filters.items()}
        self.filters["tojson"] = _guarded_filter(_plain_json)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        limit = _limit()
        if operator_ == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise _Limit(f"exponent {right} is above 64")
            if (
                isinstance(left, int)
                and isinstance(right, (int, float))
                and abs(left).bit_length() * abs(right) > 1 << 16
            ):
                raise _Limit("the power is too large")
            return _guard_size(operator.pow(left, right))
        if operator_ == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * max(b, 0) > limit:
                    raise _Limit(f"repeating a sequence {b} times exceeds the limit {limit}")
            return operator.mul(left, right)
        if operator_ == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                if len(left) + len(right) > limit:
                    raise _Limit(f"joining {len(left)} and {len(right)} items/characters exceeds the limit {limit}")
            return operator.add(left, right)
        if operator_ == "%":
            _check_printf(left, right)
            return _guard_size(operator.mod(left, right))
        return super().call_binop(context, operator_, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_brace_format(value.__self__)
        return wrapped

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(__obj, "__name__", "")
        _check_numbers(f"{name or 'a call'}()", (*args, *kwargs.values()))
        size = _estimate(name, getattr(__obj, "__self__", None), args, kwargs)
        if size > _limit():
            raise _Limit(f"{name}() would produce {size} characters, above the limit {_limit()}")
        return _guard_size(super().call(__context, __obj, *args, **kwargs))


def _template_line(tb: TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_NAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _vm_data_bytes() -> int | None:
    """This process's private data size (Linux ``VmData``), or None where it cannot be read."""
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextlib.contextmanager
def _os_memory_limit(budget: int) -> Iterator[bool]:
    """Lower RLIMIT_DATA to the current data size plus ``budget`` for the block (Linux, only Python thread);
    yields whether it did."""
    used = _vm_data_bytes() if sys.platform.startswith("linux") and threading.active_count() == 1 else None
    if used is None:
        yield False
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = used + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY and soft <= limit:
        yield True  # already stricter
        return
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@contextlib.contextmanager
def _budget(*, timeout_s: float, memory_bytes: int, size_limit: int, what: str) -> Iterator[None]:
    """Time, memory and size limits for compiling or rendering, in this thread; every failure inside becomes
    ``TemplateError``."""
    deadline = time.monotonic() + timeout_s
    previous_limit = getattr(_LIMIT, "chars", None)
    _LIMIT.chars = size_limit
    started_tracing = False
    with _os_memory_limit(memory_bytes) as os_limited:
        base = 0
        if not os_limited:
            started_tracing = not tracemalloc.is_tracing()
            if started_tracing:
                tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]

        def local_trace(frame: FrameType, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise _Limit(f"{what} took longer than {timeout_s:g} s")
            if not os_limited and tracemalloc.get_traced_memory()[0] - base > memory_bytes:
                raise MemoryError
            return local_trace

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            return local_trace(frame, event, arg)

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            yield
        except TemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 -- whatever a template provokes is the template's failure
            raise _template_error(exc, what=what, memory_bytes=memory_bytes) from None
        finally:
            sys.settrace(previous)
            if started_tracing:
                tracemalloc.stop()
            _LIMIT.chars = previous_limit if previous_limit is not None else MAX_OUTPUT_CHARS


def _template_error(exc: BaseException, *, what: str, memory_bytes: int) -> TemplateError:
    line = _template_line(exc.__traceback__)
    where = TEMPLATE_NAME + (f" line {line}" if line else "")
    fix = "check the template and the messages (roles, content) it expects"
    if isinstance(exc, jinja2.exceptions.TemplateSyntaxError):
        return TemplateError(
            f"the chat template does not compile: {exc.message}",
            where=f"{TEMPLATE_NAME} line {exc.lineno}",
            fix="fix the template's Jinja syntax",
        )
    if isinstance(exc, MemoryError):
        return TemplateError(f"{what} exceeded its memory budget of {memory_bytes >> 20} MiB", where=where, fix=fix)
    if isinstance(exc, RecursionError):
        return TemplateError(f"{what}: the template nests or recurses too deeply", where=where, fix=fix)
    if isinstance(exc, _Limit):
        return TemplateError(f"the chat template hit a limit: {exc}", where=where, fix=fix)
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return TemplateError(f"the sandbox refused an operation: {exc}", where=where, fix=fix)
    if isinstance(exc, jinja2.exceptions.UndefinedError):
        return TemplateError(f"an undefined value was used: {exc}", where=where, fix=fix)
    if isinstance(exc, jinja2.exceptions.TemplateError):
        return TemplateError(f"the chat template failed: {exc}", where=where, fix=fix)
    return TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}", where=where, fix=fix)


def _input_chars(value: Any, budget: int = 1 << 16) -> int:
    """Characters of the strings inside the render's variables (a bounded walk)."""
    total, stack = 0, [value]
    while stack and budget > 0:
        budget -= 1
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


class ChatTemplate:
    """A compiled chat template; ``render(messages, ...)`` returns the prompt text.

    ``source`` is the Jinja text (a GGUF's ``tokenizer.chat_template``).  ``bos_token``/``eos_token`` are the
    special tokens' text.  Raises ``TemplateError`` for a template that is too large or does not compile.
    Limits: ``max_output_chars`` (plus twice the messages' characters), ``timeout_s`` and ``memory_bytes``
    (plus ``MEMORY_PER_INPUT_CHAR`` per character of the messages) for each render and for the compilation.
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
        memory_bytes: int = MEMORY_BYTES,
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
        self.memory_bytes = memory_bytes
        self._env = _Environment()
        with _budget(
            timeout_s=timeout_s, memory_bytes=memory_bytes, size_limit=max_output_chars, what="compiling the template"
        ):
            self._template = self._env.from_string(source)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt for ``messages`` (a list of ``{"role": ..., "content": ...}``); ``extra`` are more template
        variables (e.g. ``tools``).  Raises ``TemplateError``; output, time and memory are bounded."""
        variables = {
            **extra,
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        n_in = _input_chars(variables)
        limit = self.max_output_chars + 2 * n_in
        parts: list[str] = []
        size = 0
        with _budget(
            timeout_s=self.timeout_s,
            memory_bytes=self.memory_bytes + MEMORY_PER_INPUT_CHAR * n_in,
            size_limit=limit,
            what="rendering the template",
        ):
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > limit:
                    raise _Limit(f"the rendered prompt exceeds {limit} characters")
                parts.append(chunk)
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
