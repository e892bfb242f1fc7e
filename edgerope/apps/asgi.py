"""The server's HTTP application (ASGI, with Starlette's request and response objects): limits, routes, queue,
streaming.  uvicorn runs it (``edgerope.apps.server``); the model runs in the worker (``edgerope.apps.supervisor``).

Routes: ``GET /health`` (no key needed: the worker's state, 200 when ready else 503), ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``; anything else is a JSON 404 (405 for a wrong method).

Each request, cheapest checks first:

1. the API key (``Authorization: Bearer``), before anything else;
2. the head: at most ``MAX_HEAD_BYTES``, HTTP/1.0 or 1.1, never both ``Content-Length`` and
   ``Transfer-Encoding``; ``Content-Type`` (JSON or none) and ``Content-Length`` against ``max_body_bytes`` before reading; then the body
   is read with the limit enforced as it arrives (chunked bodies too) and a deadline for all of it
   (``body_timeout_s``, 408).  An error answered before the body was read closes the connection
   (``Connection: close``), so an unread body is never parsed as a next request;
3. strict JSON and field checks (``edgerope.apps.openai_api``): 400 naming the field;
4. a text prompt whose bytes alone prove it cannot fit the context: 400 without involving the worker;
5. the queue: one request runs, ``max_queue`` wait, more get 429 (with ``Retry-After``); a waiting request whose
   client goes away leaves the queue;
6. the worker renders, tokenizes and checks the prompt; its refusals (too long, a template that fails) come back
   as 400s before any 200 is sent, for streaming requests too.

Streaming (server-sent events) never waits on a client while holding the model: the worker's text goes to a
per-request buffer; a client that has not taken ``max_buffer_bytes`` of it, or does not accept an event within
``send_timeout_s``, is dropped (the connection is aborted) and its generation cancelled.  A client that
disconnects cancels its generation.  A worker that dies mid-request answers it with a 500 JSON error (or an error
event in a stream) saying so.

What it does not do: the HTTP protocol itself (uvicorn with h11: strict parsing, the request-head deadline and
the connection limit are set up in ``edgerope.apps.server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from edgerope.apps.openai_api import (
    Job,
    RequestError,
    chunk,
    completion_body,
    error_body,
    job_from_request,
    new_ident,
    parse_json,
)
from edgerope.apps.supervisor import Supervisor, Ticket, WorkerUnavailable
from edgerope.runtime.tokenizing import VocabFacts

logger = logging.getLogger("edgerope.apps.server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ABORT_KEY = "edgerope.abort"  # scope["extensions"][ABORT_KEY]: drop the connection (set by the server's protocol)
PARSE_IN_THREAD_BYTES = 64 << 10  # bodies larger than this are parsed off the event loop
MAX_HEAD_BYTES = 16 << 10  # request line and headers


@dataclass(frozen=True)
class Limits:
    """What the HTTP layer enforces (README, "Serving")."""

    max_body_bytes: int = 4 << 20
    body_timeout_s: float = 30.0  # the whole body must arrive within this
    max_queue: int = 8  # requests waiting for the model; more get 429
    send_timeout_s: float = 30.0  # a streaming client must take each event within this
    max_buffer_bytes: int = 1 << 20  # streamed text a client may leave untaken


class _Closing(Exception):
    """An error answered before the request's body was read: the response closes the connection."""


class ServerApp:
    """The ASGI application (see the module docstring)."""

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        model_id: str,
        facts: VocabFacts,
        api_key: str | None = None,
        limits: Limits = Limits(),
    ) -> None:
        self.supervisor = supervisor
        self.model_id = model_id
        self.facts = facts
        self.api_key = api_key
        self.limits = limits
        self.waiting = 0  # requests admitted: running or waiting for the model
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.supervisor.attach(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routing -----------------------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        request = Request(scope, receive)
        method, path = request.method, scope["path"].rstrip("/") or "/"
        status, usage = 500, None
        try:
            _check_head(scope)
            if path == "/health":
                status = await self._health(method, scope, receive, send)
                return
            self._authorise(request)
            if path == "/v1/models":
                status = await self._models(method, scope, receive, send)
            elif path in ("/v1/chat/completions", "/v1/completions"):
                if method != "POST":
                    raise _Closing(RequestError(f"{path} takes POST, not {method}", status=405))
                status, usage = await self._complete(request, send, chat=path.endswith("chat/completions"))
            else:
                raise _Closing(RequestError(f"no route {method} {scope['path']}", status=404))
        except ClientDisconnect:  # gone while sending its body: nothing to answer
            status = 499
        except _Closing as exc:
            err = exc.args[0]
            status = err.status
            await _json(scope, receive, send, err.status, err.body(), close=True)
        except RequestError as err:
            status = err.status
            await _json(scope, receive, send, err.status, err.body(), headers=_retry(err))
        except Exception:  # a bug: answer 500 and keep serving
            logger.exception("error while answering %s %s", method, path)
            status = 500
            with contextlib.suppress(Exception):
                await _json(
                    scope, receive, send, 500, error_body("internal error; see the server log", status=500), close=True
                )
        finally:
            fields = {
                "method": method,
                "path": path,
                "status": status,
                "usage": usage,
                "seconds": round(time.perf_counter() - t0, 4),
            }
            logger.info("%s %s %d", method, path, status, extra={"request": fields})

    def _authorise(self, request: Request) -> None:
        key = self.api_key
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            raise _Closing(RequestError("missing or wrong API key", status=401))

    async def _health(self, method: str, scope: Scope, receive: Receive, send: Send) -> int:
        if method not in ("GET", "HEAD"):
            raise _Closing(RequestError(f"/health takes GET, not {method}", status=405))
        worker = self.supervisor.health()
        status = 200 if worker["state"] == "ready" else 503
        body = {
            "status": "ok" if status == 200 else "unavailable",
            "worker": worker,
            "queue": {"admitted": self.waiting, "max_waiting": self.limits.max_queue},
        }
        await _json(scope, receive, send, status, body, close=_has_body(scope))
        return status

    async def _models(self, method: str, scope: Scope, receive: Receive, send: Send) -> int:
        if method != "GET":
            raise _Closing(RequestError(f"/v1/models takes GET, not {method}", status=405))
        model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "edgerope"}
        model["n_ctx"] = self.supervisor.info.get("n_ctx")
        await _json(scope, receive, send, 200, {"object": "list", "data": [model]}, close=_has_body(scope))
        return 200

    # -- completions ---------------------------------------------------------------------------------------------
    async def _complete(self, request: Request, send: Send, *, chat: bool) -> tuple[int, Any]:
        raw = await self._body(request)
        loop = asyncio.get_running_loop()
        job_id = next(self._ids)

        def build() -> Job:
            return job_from_request(parse_json(raw), chat=chat, job_id=job_id)

        job = await loop.run_in_executor(None, build) if len(raw) > PARSE_IN_THREAD_BYTES else build()
        if not chat:
            self._check_bytes(job.prompt)
        if self.waiting >= self.limits.max_queue + 1:
            raise RequestError("the server is busy; too many requests are waiting", status=429)
        self.waiting += 1
        try:
            handler = asyncio.ensure_future(self._answer(job, request.scope, send))
            watcher = asyncio.ensure_future(_disconnected(request.receive))
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():  # the client went away: leave the queue, or cancel the generation
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                return 499, None
            watcher.cancel()
            return handler.result()
        finally:
            self.waiting -= 1

    async def _body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            raise _Closing(RequestError(f"the body must be application/json, not {ctype!r}", status=415))
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):  # h11 has checked it already
            raise _Closing(RequestError(f"the request body is {length} bytes, above {limit}", status=413))
        parts, size = [], 0
        deadline = time.monotonic() + self.limits.body_timeout_s
        stream = request.stream().__aiter__()
        while True:
            left = deadline - time.monotonic()
            try:
                part = await asyncio.wait_for(stream.__anext__(), max(left, 0.0))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise _Closing(
                    RequestError(f"the request body did not arrive within {self.limits.body_timeout_s:g} s", status=408)
                ) from None
            size += len(part)
            if size > limit:
                raise _Closing(RequestError(f"the request body is more than {limit} bytes", status=413))
            parts.append(part)
        return b"".join(parts)

    def _check_bytes(self, prompt: str) -> None:
        n_ctx = self.supervisor.info.get("n_ctx")
        at_least = self.facts.min_tokens(len(prompt.encode("utf-8")))
        if n_ctx and at_least >= n_ctx:
            raise RequestError(
                f"the prompt has at least {at_least} tokens ({len(prompt.encode('utf-8'))} bytes, at most "
                f"{self.facts.max_token_bytes} bytes per token); the context is {n_ctx} tokens; nothing was "
                "tokenized or truncated",
                param="prompt",
                fix="send a shorter prompt, or start the server with a larger --ctx",
            )

    async def _answer(self, job: Job, scope: Scope, send: Send) -> tuple[int, Any]:
        ident = new_ident(job.chat)
        try:
            async with self.supervisor.job(job) as ticket:
                msg = await ticket.next()
                if msg[0] != "start":  # refused by the worker before generating: an error status, not 200
                    return await self._refused(msg, scope, send)
                if job.stream:
                    return await self._stream(job, ticket, ident, scope, send)
                while msg[0] not in ("done", "error", "crashed", "cancelled"):
                    msg = await ticket.next()
                if msg[0] != "done":
                    return await self._refused(msg, scope, send)
                body = completion_body(job, ident, self.model_id, msg[2])
                await _json(scope, None, send, 200, body)
                return 200, body["usage"]
        except WorkerUnavailable as exc:
            raise RequestError(f"{exc}; try again later", status=503) from None

    async def _refused(self, msg: tuple[Any, ...], scope: Scope, send: Send) -> tuple[int, Any]:
        if msg[0] == "error":
            status, body = int(msg[2]), msg[3]
        elif msg[0] == "crashed":
            status, body = 500, error_body(str(msg[2]), status=500)
        else:
            status, body = 500, error_body(f"unexpected message from the model worker: {msg[0]}", status=500)
        await _json(scope, None, send, status, body)
        return status, None

    async def _stream(self, job: Job, ticket: Ticket, ident: str, scope: Scope, send: Send) -> tuple[int, Any]:
        limits = self.limits
        abort = scope.get("extensions", {}).get(ABORT_KEY)
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"connection", b"close")]

        async def event(payload: Any, *, more: bool = True) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await asyncio.wait_for(
                send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": more}),
                limits.send_timeout_s,
            )

        try:
            await asyncio.wait_for(
                send({"type": "http.response.start", "status": 200, "headers": headers}), limits.send_timeout_s
            )
            if job.chat:
                await event(chunk(job, ident, self.model_id, None, first=True))
            while True:
                if ticket.overflow:
                    raise asyncio.TimeoutError
                msg = await ticket.next()
                if msg[0] == "piece":
                    await event(chunk(job, ident, self.model_id, msg[2]))
                    continue
                if msg[0] == "done":
                    done = msg[2]
                    final = chunk(
                        job, ident, self.model_id, None if job.chat else "", finish=done["finish_reason"], done=done
                    )
                    await event(final)
                    await event("[DONE]", more=False)
                    return 200, final["usage"]
                body = msg[3] if msg[0] == "error" else error_body(str(msg[2]), status=500)
                await event(body)
                await event("[DONE]", more=False)
                return 200, {"error": body["error"]["message"]}
        except asyncio.TimeoutError:  # the client does not read: drop it, do not wait for it
            self.supervisor.cancel(ticket)
            logger.warning("dropped a streaming client that stopped reading (job %d)", job.id)
            if abort is not None:
                abort()
            return 499, None


def _check_head(scope: Scope) -> None:
    """What h11 lets through but a strict server refuses: a head larger than ``MAX_HEAD_BYTES`` (h11 bounds only
    heads that arrive in pieces), both ``Content-Length`` and ``Transfer-Encoding`` (a request-smuggling vector),
    an HTTP version other than 1.0/1.1."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        raise _Closing(RequestError(f"HTTP/{scope.get('http_version')} is not supported", status=505))
    headers = scope.get("headers", [])
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    size += sum(len(k) + len(v) + 4 for k, v in headers)
    if size > MAX_HEAD_BYTES:
        raise _Closing(RequestError(f"the request head is {size} bytes, above {MAX_HEAD_BYTES}", status=431))
    names = [k for k, _ in headers]
    if b"transfer-encoding" in names and b"content-length" in names:
        raise _Closing(RequestError("the request has both Content-Length and Transfer-Encoding", status=400))


def _has_body(scope: Scope) -> bool:
    """Whether the request announced a body (which a GET route does not read: the connection is closed after)."""
    for k, v in scope.get("headers", []):
        if k == b"transfer-encoding" or (k == b"content-length" and v.strip() not in (b"", b"0")):
            return True
    return False


def _retry(err: RequestError) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", b"1")] if err.status in (429, 503) else []


async def _json(
    scope: Scope,
    receive: Receive | None,
    send: Send,
    status: int,
    body: Any,
    *,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    extra = {k.decode(): v.decode() for k, v in headers or []}
    if close:
        extra["connection"] = "close"
    response = JSONResponse(body, status_code=status, headers=extra)
    await response(scope, receive or _no_receive, send)


async def _no_receive() -> MutableMapping[str, Any]:
    return {"type": "http.disconnect"}


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone away (after the body has been read)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
