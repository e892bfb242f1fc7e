"""A small OpenAI-compatible HTTP server around one ``Runtime`` (stdlib ``http.server``, no web framework).

What it does:

* ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, non-streaming or streaming
  (server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``);
* chat prompts come from the GGUF's chat template rendered in the sandbox (``edgerope.apps.chat_template``), or
  the documented plain format when the GGUF has none; the prompt is tokenized with special tokens parsed;
* ``max_tokens`` (default: the rest of the context), ``stop`` (a string or up to 4 strings; the text is cut
  before the first match), ``usage`` token counts; ``temperature`` 0 or absent decodes greedily, above 0
  samples with llama.cpp's chain (``top_p``, then temperature, then a draw seeded by ``seed``, random when
  absent); ``n`` must be 1;
* a prompt that does not fit the context, or whose ``max_tokens`` would not fit after it, is a 400 error
  saying the numbers -- never truncated; malformed JSON, missing or mistyped fields are 400 JSON errors;
* one request runs at a time (a lock around the runtime); at most ``max_queue`` wait, more are answered 429;
  an optional API key (``Authorization: Bearer``) is checked before anything else;
* a client that disconnects mid-stream stops its generation; the server keeps serving;
* a long first system message (a document, say) has its KV state saved in the document cache
  (``edgerope.runtime.doccache``, the same keys as ``edgerope.apps.ask``) and restored by later requests that start with it;
  ``usage.prompt_tokens_details.cached_tokens`` says how many prompt tokens were restored;
* ``close()`` stops accepting, lets the running request end, and closes the runtime.

The request logic (tokens, limits, the lock, stop strings, the cached prefix) is ``edgerope.apps.engine``; this
module is the HTTP and JSON layer.

What it does not do: penalties, logit bias, batch requests, tool calls, logprobs, or reuse any other part of
the KV cache between requests.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgerope.apps.chat_template import from_gguf
from edgerope.apps.engine import MIN_PREFIX_TOKENS, Completion, Engine, RequestError
from edgerope.errors import EdgeropeError, RuntimeConfigError
from edgerope.runtime.doccache import DocCache, model_identity
from edgerope.runtime.runtime import Runtime, Sampling

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
MAX_STOP_STRINGS = 4
DEFAULT_HOST = "127.0.0.1"


# --------------------------------------------------------------------------------------------------------------
# request parsing


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(f"the request has no {name!r} field", param=name)
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise RequestError(f"{name!r} must not be a boolean", param=name)
    if not isinstance(value, kind):
        raise RequestError(f"{name!r} has the wrong type ({type(value).__name__})", param=name)
    return value


def _stops(body: Mapping[str, Any]) -> list[str]:
    stop = _field(body, "stop", (str, list))
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", param="stop")
    return list(stops)


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
    except RuntimeConfigError as exc:
        raise RequestError(exc.what, param="temperature/top_p/seed") from None


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = _field(body, "messages", list, required=True)
    if not messages:
        raise RequestError("'messages' is empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role' string", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError(f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content or ""})
    return out


# --------------------------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    server: EdgeropeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (http.server's signature)
        logger.debug("%s " + format, self.address_string(), *args)

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._send_json(401, RequestError("missing or wrong API key", status=401).body())
        return False

    def do_GET(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        route = self.path.rstrip("/")
        if route == "/v1/models":
            info = self.server.engine.runtime.info
            model = {"id": self.server.engine.model_id, "object": "model", "created": 0, "owned_by": "edgerope"}
            model["n_ctx"] = info.n_ctx  # type: ignore[assignment]
            status, payload = 200, {"object": "list", "data": [model]}
        else:
            status, payload = 404, RequestError(f"no route {self.path}", status=404).body()
        self._send_json(status, payload)
        self._log(route, status, None, 0.0)

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return
        route = self.path.rstrip("/")
        t0 = time.perf_counter()
        status, usage = 200, None
        try:
            body = self._body()
            if route == "/v1/chat/completions":
                usage = self._complete(body, chat=True)
            elif route == "/v1/completions":
                usage = self._complete(body, chat=False)
            else:
                raise RequestError(f"no route {self.path}", status=404)
        except RequestError as exc:
            status = exc.status
            self._send_json(exc.status, exc.body())
        except (ConnectionError, TimeoutError):
            status = 499  # the client went away (broken pipe, reset): its generation has stopped
            self.close_connection = True
        except EdgeropeError as exc:
            status = 400
            self._send_json(400, RequestError(exc.message).body())
        except Exception:  # a bug: answer 500 and keep serving
            logger.exception("error while answering %s %s", self.command, route)
            status = 500
            self.close_connection = True
            try:
                self._send_json(500, RequestError("internal error; see the server log", status=500).body())
            except OSError:
                pass
        self._log(route, status, usage, time.perf_counter() - t0)

    def _log(self, route: str, status: int, usage: dict[str, Any] | None, seconds: float) -> None:
        fields = {"method": self.command, "path": route, "status": status, "usage": usage, "seconds": round(seconds, 4)}
        logger.info("%s %s %d", self.command, route, status, extra={"request": fields})

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("the request needs a Content-Length header", status=411) from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the request body is {length} bytes, above {MAX_BODY_BYTES}", status=413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _complete(self, body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
        engine = self.server.engine
        sampling = _sampling(body)
        stops = _stops(body)
        max_tokens = _field(body, "max_tokens", int)
        if chat and max_tokens is None:
            max_tokens = _field(body, "max_completion_tokens", int)
        stream = bool(_field(body, "stream", bool))
        n_prefix = 0
        if chat:
            tokens, n_prefix = engine.chat_tokens(_messages(body))
        else:
            prompt = _field(body, "prompt", (str, list), required=True)
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise RequestError("'prompt' must be a string (or a list of one string)", param="prompt")
                prompt = prompt[0]
            tokens = engine.tokens(prompt, special=False)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        base = {"id": ident, "created": created, "model": engine.model_id}
        if not stream:
            c = engine.run(tokens, max_tokens=max_tokens, stops=stops, sampling=sampling, n_prefix=n_prefix)
            usage = _usage(c)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": c.text}}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": c.text, "logprobs": None}
                obj = "text_completion"
            choice["finish_reason"] = c.finish_reason
            self._send_json(200, {**base, "object": obj, "choices": [choice], "usage": usage})
            return usage
        return self._stream(
            tokens, base, chat=chat, max_tokens=max_tokens, stops=stops, sampling=sampling, n_prefix=n_prefix
        )

    def _stream(
        self,
        tokens: list[int],
        base: dict[str, Any],
        *,
        chat: bool,
        max_tokens: int | None,
        stops: list[str],
        sampling: Sampling | None,
        n_prefix: int,
    ) -> dict[str, Any]:
        engine = self.server.engine
        engine.check(tokens, max_tokens)  # refuse before the 200 header goes out
        with engine.admit():  # a full queue is a 429, also before the header
            return self._stream_admitted(
                tokens, base, chat=chat, max_tokens=max_tokens, stops=stops, sampling=sampling, n_prefix=n_prefix
            )

    def _stream_admitted(
        self,
        tokens: list[int],
        base: dict[str, Any],
        *,
        chat: bool,
        max_tokens: int | None,
        stops: list[str],
        sampling: Sampling | None,
        n_prefix: int,
    ) -> dict[str, Any]:
        engine = self.server.engine
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def event(payload: Mapping[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def choice(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            event({**base, "object": obj, "choices": [choice(None, None, first=True)]})
        try:
            c = engine.run(
                tokens,
                max_tokens=max_tokens,
                stops=stops,
                sampling=sampling,
                n_prefix=n_prefix,
                admitted=True,
                emit=lambda piece: event({**base, "object": obj, "choices": [choice(piece, None)]}),
            )
        except EdgeropeError as exc:  # after the 200 header: the error goes in the stream
            body = exc.body() if isinstance(exc, RequestError) else RequestError(exc.message).body()
            event(body)
            event("[DONE]")
            return {"error": body["error"]["message"]}
        usage = _usage(c)
        event({**base, "object": obj, "choices": [choice(None if chat else "", c.finish_reason)], "usage": usage})
        event("[DONE]")
        return usage


def _usage(c: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }


class EdgeropeServer(ThreadingHTTPServer):
    """The HTTP server; ``serve_forever()`` in some thread, ``close()`` to stop and free the runtime."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, engine: Engine, *, host: str = DEFAULT_HOST, port: int = 8080, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._running = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self._running = False

    def close(self) -> None:
        """Stop ``serve_forever`` (running in another thread), stop listening, let the running request end, close
        the runtime.  Safe to call twice."""
        if getattr(self, "_running", False):
            self.shutdown()
        self.server_close()
        with self.engine._lock:
            self.engine.runtime.close()


def open_server(
    model_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = 8080,
    api_key: str | None = None,
    max_queue: int = 8,
    model_id: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    min_prefix_tokens: int = MIN_PREFIX_TOKENS,
    **runtime_request: Any,
) -> EdgeropeServer:
    """Open the GGUF (``Runtime.open(model_path, **runtime_request)``, validated) and its chat template, and bind
    the server (``port`` 0: any free port; see ``server.url``).  ``cache_dir``/``use_cache`` as in ``edgerope.apps.ask``:
    a long system message's KV state (``min_prefix_tokens`` or more) is kept in the document cache.  Raises ``TemplateError`` for a template that does
    not compile and the runtime's errors for a bad model or request; the runtime is closed on failure."""
    if max_queue < 0:
        raise RuntimeConfigError(f"max_queue must be >= 0, got {max_queue}")
    template = from_gguf(model_path)
    identity = model_identity(model_path) if use_cache else None  # before loading: the file as it is now
    rt = Runtime.open(model_path, **runtime_request)
    try:
        engine = Engine(
            rt,
            template=template,
            model_id=model_id or Path(model_path).stem,
            max_queue=max_queue,
            cache=DocCache(cache_dir) if use_cache else None,
            model_identity=identity,
            min_prefix_tokens=min_prefix_tokens,
        )
        return EdgeropeServer(engine, host=host, port=port, api_key=api_key)
    except OSError as exc:
        rt.close()
        raise RuntimeConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", fix="choose another --port (0: any free one)"
        ) from None
    except BaseException:
        rt.close()
        raise
