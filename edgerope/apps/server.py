"""An OpenAI-compatible HTTP server for one GGUF: uvicorn (h11) in front, the model in a supervised worker process.

``open_server(model, ...)`` does everything that can fail before listening, cheapest first: reads the GGUF's
header once (the chat template, compiled and rendered once on a probe conversation, so a bad template is a
clean error at start-up; the vocab facts for cheap prompt checks; the document cache's model key), starts the
model worker and waits for it to load the model (``edgerope.apps.supervisor``; a refused model or setting raises
its typed error), then binds the listening socket.  ``server.serve_forever()`` runs uvicorn on that socket in
the calling thread; ``server.close()`` stops it and the worker.

The pieces: ``edgerope.apps.openai_api`` (request and response shapes), ``edgerope.apps.asgi`` (limits, routes,
queue, streaming), ``edgerope.apps.supervisor`` and ``edgerope.apps.worker`` (the model process),
``edgerope.apps.engine`` (one request on the runtime).  This module adds the HTTP protocol settings:

* uvicorn with h11, a strict HTTP/1.1 parser (a malformed request line or header, a bad or negative
  ``Content-Length``, both ``Content-Length`` and ``Transfer-Encoding``: 400 and the connection closed), request
  heads limited to ``MAX_HEAD_BYTES``;
* a listen backlog of ``BACKLOG`` (a burst of connections waits in the kernel instead of being reset), at most
  ``max_connections`` open connections (more get 503);
* a deadline for a request's head (``head_timeout_s`` from its first byte, or from the connection's start),
  idle keep-alive connections closed after ``keepalive_s``;
* a kernel send buffer of ``send_buffer_bytes`` per connection (instead of autotuning up to megabytes), so a
  client that stops reading fills it, and the application's ``max_buffer_bytes``, quickly; the application can
  drop such a connection (an abort handle in the request scope);
* SIGINT/SIGTERM stop the server gracefully (the CLI exits 0).

What it does not do: TLS, HTTP/2, batching several requests into one llama.cpp context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgerope.apps.asgi import ABORT_KEY, MAX_HEAD_BYTES, Limits, ServerApp
from edgerope.apps.chat_template import ChatTemplate, from_gguf
from edgerope.apps.engine import DEFAULT_MAX_TOKENS, MIN_PREFIX_TOKENS
from edgerope.apps.supervisor import Supervisor
from edgerope.apps.worker import WorkerConfig
from edgerope.errors import RuntimeConfigError
from edgerope.gguf.reader import using_gguf
from edgerope.runtime.doccache import model_identity
from edgerope.runtime.tokenizing import VocabFacts

logger = logging.getLogger("edgerope.apps.server")

DEFAULT_HOST = "127.0.0.1"
BACKLOG = 2048
WRITE_BUFFER_BYTES = 16 << 10  # a connection's user-space write buffer before the application waits
PROBE = [{"role": "user", "content": "Hello"}]


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request head and an abort handle in the request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)  # then send() waits: a stalled client shows
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._head_timer is None and not self.transport.is_closing():
            self._arm()  # the first bytes of a next request: its head has head_timeout_s to arrive

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None:  # a request head arrived
            self._disarm()
            self.scope.setdefault("extensions", {})[ABORT_KEY] = self.transport.abort  # type: ignore[typeddict-unknown-key]

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # uvicorn's keep-alive timer takes over

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(getattr(self.config, "head_timeout_s", 10.0), self._head_timeout)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.abort()  # a request head that never completes: slow or stalled client


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the server gracefully and are not re-raised afterwards (uvicorn re-raises them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


class EdgeropeServer:
    """The bound server: ``serve_forever()`` in some thread, ``close()`` to stop it and the worker."""

    def __init__(
        self,
        app: ServerApp,
        supervisor: Supervisor,
        sock: socket.socket,
        *,
        max_connections: int,
        head_timeout_s: float,
        keepalive_s: float,
    ) -> None:
        self.app = app
        self.supervisor = supervisor
        self.sock = sock
        config = uvicorn.Config(
            app,
            http=_Protocol,
            lifespan="on",
            log_config=None,
            access_log=False,
            backlog=BACKLOG,
            limit_concurrency=max_connections,
            timeout_keep_alive=max(1, round(keepalive_s)),
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )
        config.head_timeout_s = head_timeout_s  # type: ignore[attr-defined]  # read by _Protocol
        self._uvicorn = _Uvicorn(config)
        self._serving = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{host}:{port}"

    @property
    def model_id(self) -> str:
        return self.app.model_id

    def serve_forever(self) -> None:
        """Serve until ``shutdown()``/``close()`` or SIGINT/SIGTERM (in the main thread)."""
        self._stopped.clear()
        self._serving.set()
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.sock]))
        finally:
            self._serving.clear()
            self._stopped.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop ``serve_forever`` (running in another thread) and wait for it."""
        self._uvicorn.should_exit = True
        self._stopped.wait(timeout)

    def close(self) -> None:
        """Stop serving, stop the model worker, close the socket.  Safe to call twice."""
        if self._serving.is_set():
            self.shutdown()
        self.supervisor.close()
        with contextlib.suppress(OSError):
            self.sock.close()


def _listen(host: str, port: int, *, send_buffer_bytes: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)  # inherited by each connection
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise RuntimeConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}", fix="choose another --port (0: any free one)"
        ) from None
    sock.setblocking(False)
    return sock


def _checked_template(template: ChatTemplate | None) -> None:
    """Render a probe conversation once, so a template that cannot render anything fails at start-up."""
    if template is not None:
        template.render(PROBE)


def open_server(
    model_path: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = 8080,
    api_key: str | None = None,
    max_queue: int | None = None,
    model_id: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    min_prefix_tokens: int = MIN_PREFIX_TOKENS,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    limits: Limits | None = None,
    max_connections: int = 512,
    head_timeout_s: float = 10.0,
    keepalive_s: float = 5.0,
    send_buffer_bytes: int = 256 << 10,
    supervisor_options: dict[str, Any] | None = None,
    log_format: str | None = None,
    **runtime_request: Any,
) -> EdgeropeServer:
    """Check the model and settings, start the model worker, bind the socket (``port`` 0: any free port; see
    ``server.url``).  ``runtime_request`` are ``Runtime.open``'s keyword arguments (n_ctx, type_k, ...);
    ``max_queue`` (default: ``limits.max_queue``, 8) requests may wait for the model; ``cache_dir``/``use_cache``
    as in ``edgerope.apps.ask``: a long system message's KV state
    (``min_prefix_tokens`` or more) is kept in the document cache.  ``default_max_tokens`` bounds a request that
    gives none; ``limits`` are the HTTP layer's (``edgerope.apps.asgi.Limits``).  Raises ``TemplateError`` for a template that does not compile or render, the runtime's errors
    for a bad model or request, ``RuntimeConfigError`` for a port it cannot bind; nothing is left running."""
    base = limits or Limits()
    limits = Limits(**{**base.__dict__, "max_queue": base.max_queue if max_queue is None else max_queue})
    if limits.max_queue < 0:
        raise RuntimeConfigError(f"max_queue must be >= 0, got {limits.max_queue}", fix="use --max-queue 0 or more")
    if default_max_tokens < 1:
        raise RuntimeConfigError(f"the default max_tokens must be >= 1, got {default_max_tokens}")
    with using_gguf(model_path) as f:
        _checked_template(from_gguf(f))
        facts = VocabFacts.from_gguf(f)
        identity = model_identity(f, cache_dir=cache_dir) if use_cache else None
        path = str(f.path)
    config = WorkerConfig(
        model_path=path,
        runtime_request=dict(runtime_request),
        model_identity=identity,
        cache_dir=None if cache_dir is None else str(cache_dir),
        use_cache=use_cache,
        min_prefix_tokens=min_prefix_tokens,
        default_max_tokens=default_max_tokens,
        log_format=log_format,
    )
    supervisor = Supervisor(config, max_buffer_bytes=limits.max_buffer_bytes, **(supervisor_options or {}))
    supervisor.start()
    try:
        sock = _listen(host, port, send_buffer_bytes=send_buffer_bytes)
        app = ServerApp(
            supervisor, model_id=model_id or Path(model_path).stem, facts=facts, api_key=api_key, limits=limits
        )
        return EdgeropeServer(
            app,
            supervisor,
            sock,
            max_connections=max_connections,
            head_timeout_s=head_timeout_s,
            keepalive_s=keepalive_s,
        )
    except BaseException:
        supervisor.close()
        raise
