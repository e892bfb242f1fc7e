"""The OpenAI request and response shapes the server speaks: strict JSON in, a ``Job`` for the model worker, JSON
objects and server-sent-event chunks out.

What it does:

* ``parse_json(body)`` decodes a request body strictly: UTF-8 only, RFC 8259 JSON (no NaN/Infinity), an object
  at the top, nesting at most ``MAX_JSON_DEPTH`` deep (a body nested past the interpreter's recursion limit is
  a 400 too, not a RecursionError), no lone surrogates in strings (they cannot be encoded for the tokenizer);
* ``job_from_request(body, chat=...)`` checks every field the server reads (types, ranges, counts) and builds a
  ``Job``; every problem is a ``RequestError`` (400) naming the field;
* ``completion_body`` / ``chunk`` / ``usage`` shape the answers.

What it does not do: HTTP (``edgerope.apps.asgi``), tokenizing or checking a prompt against the context (the
worker does, ``edgerope.apps.engine``).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgerope.errors import EdgeropeError, RuntimeConfigError
from edgerope.runtime.runtime import Sampling

MAX_JSON_DEPTH = 64
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_ROLE_CHARS = 64


class RequestError(EdgeropeError):
    """A request the server refuses (answered with ``status``)."""

    def __init__(self, what: str, *, status: int = 400, param: str | None = None, fix: str | None = None) -> None:
        super().__init__(what, where=param, fix=fix)
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, status=self.status, param=self.param)


def error_body(message: str, *, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class Job:
    """One completion request, as the model worker runs it (picklable)."""

    id: int
    chat: bool
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) for chat
    prompt: str = ""  # for text completions
    max_tokens: int | None = None  # None: the server's default
    stops: tuple[str, ...] = ()
    sampling: Sampling | None = None  # None: greedy
    stream: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def new_ident(chat: bool) -> str:
    """A response id in OpenAI's form."""
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


# --------------------------------------------------------------------------------------------------------------
# JSON


def _no_constant(name: str) -> Any:
    raise RequestError(f"the request body is not valid JSON: {name} is not a JSON value")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (see the module docstring); ``RequestError`` otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # the C decoder stops at the interpreter's recursion limit
        raise RequestError(f"the request body nests too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_values(body)
    return body


def _check_values(value: Any) -> None:
    """Nesting depth and strings, without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(
                        "the request body has a string with a lone surrogate (\\ud800-\\udfff)"
                    ) from None
        elif isinstance(v, dict):
            stack.extend((k, depth) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


# --------------------------------------------------------------------------------------------------------------
# fields


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(f"the request has no {name!r} field", param=name)
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise RequestError(f"{name!r} must not be a boolean", param=name)
    if not isinstance(value, kinds):
        raise RequestError(f"{name!r} has the wrong type ({type(value).__name__})", param=name)
    return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = _field(body, "stop", (str, list))
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise RequestError(
            f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}, each at most "
            f"{MAX_STOP_CHARS} characters",
            param="stop",
        )
    return tuple(stops)


def _sampling(body: Mapping[str, Any]) -> Sampling | None:
    """None (greedy) for temperature 0 or absent, else llama.cpp's chain with ``top_p`` and ``seed`` (random if
    absent)."""
    n = _field(body, "n", int)
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    temperature = _field(body, "temperature", (int, float))
    top_p = _field(body, "top_p", (int, float))
    seed = _field(body, "seed", int)
    if temperature is not None and temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}", param="temperature")
    if not temperature:
        return None
    try:
        return Sampling(
            float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            seed=secrets.randbits(32) if seed is None else seed,
        )
    except (RuntimeConfigError, OverflowError) as exc:
        raise RequestError(getattr(exc, "what", str(exc)), param="temperature/top_p/seed") from None


def _messages(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    messages = _field(body, "messages", list, required=True)
    if not messages:
        raise RequestError("'messages' is empty", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"'messages' has {len(messages)} entries, above {MAX_MESSAGES}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise RequestError(f"messages[{i}] must be an object with a 'role' string", param="messages")
        if len(m["role"]) > MAX_ROLE_CHARS:
            raise RequestError(f"messages[{i}].role is longer than {MAX_ROLE_CHARS} characters", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text", ""), str) for p in content
            ):
                raise RequestError(f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p.get("text", "") for p in content)
        if content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        out.append((m["role"], content or ""))
    return tuple(out)


def job_from_request(body: Mapping[str, Any], *, chat: bool, job_id: int) -> Job:
    """The ``Job`` for a ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` body; ``RequestError`` for
    any field the server cannot honour."""
    sampling = _sampling(body)
    stops = _stops(body)
    max_tokens = _field(body, "max_tokens", int)
    if chat and max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError("'max_tokens' must be >= 1", param="max_tokens")
    stream = bool(_field(body, "stream", bool))
    if chat:
        return Job(
            job_id, True, messages=_messages(body), max_tokens=max_tokens, stops=stops, sampling=sampling, stream=stream
        )
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise RequestError("'prompt' must be a string (or a list of one string)", param="prompt")
        prompt = prompt[0]
    return Job(job_id, False, prompt=prompt, max_tokens=max_tokens, stops=stops, sampling=sampling, stream=stream)


# --------------------------------------------------------------------------------------------------------------
# answers


def usage(done: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": done["prompt_tokens"],
        "completion_tokens": done["completion_tokens"],
        "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": done["cached_tokens"]},
    }


def completion_body(job: Job, ident: str, model: str, done: Mapping[str, Any]) -> dict[str, Any]:
    """The non-streaming answer."""
    if job.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": done["text"]}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": done["text"], "logprobs": None}
        obj = "text_completion"
    choice["finish_reason"] = done["finish_reason"]
    base = {"id": ident, "object": obj, "created": job.created, "model": model}
    return {**base, "choices": [choice], "usage": usage(done)}


def chunk(
    job: Job,
    ident: str,
    model: str,
    text: str | None,
    *,
    finish: str | None = None,
    first: bool = False,
    done: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed event: the role first (chat), then text pieces, then the finish reason with the usage."""
    base = {"id": ident, "created": job.created, "model": model}
    if job.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        out = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    else:
        out = {
            **base,
            "object": "text_completion",
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
        }
    if done is not None:
        out["usage"] = usage(done)
    return out
