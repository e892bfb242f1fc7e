"""The server's side of the model worker: start it, hand it one job at a time, restart it when it dies.

``Supervisor(config).start()`` starts ``python -m edgerope.apps.worker`` (a fresh interpreter: nothing of the
server's threads or sockets is inherited, and the caller's ``__main__`` is not imported again) connected by a
socket pair, and waits until the model is loaded; a model or settings the worker refuses raise the worker's own error (exit code 2 in the CLI).  Then a
monitor thread reads the worker's messages and hands each to the job it belongs to.

* ``async with supervisor.job(job) as ticket``: waits its turn (one job at a time, first come first served) and for
  a ready worker (``ready_timeout_s``, else ``WorkerUnavailable``, a 503), sends the job, and gives its messages
  through ``await ticket.next()``.  Leaving the block before the job ended (the client went away) cancels it and
  waits for the worker to confirm; a worker that does not within ``cancel_grace_s`` is killed and restarted.
* When the worker dies (a native crash, an abort, an OOM kill, SIGKILL), the job in flight gets
  ``("crashed", id, what)``, the death is logged with the worker's settings and exit status, and a new worker is
  started after a backoff (``backoff_s`` doubling up to ``max_backoff_s`` while deaths follow each other within
  ``stable_s``).  Jobs waiting their turn wait for the new worker.  The listening socket is the server's: it
  never goes away.
* ``health()`` is the worker's state for ``/health``: starting, ready, restarting, stopped; its pid, restarts and
  last exit.

What it does not do: HTTP (``edgerope.apps.asgi``) or run any model code in the server's process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

from edgerope import errors
from edgerope.apps.openai_api import Job
from edgerope.apps.worker import WorkerConfig
from edgerope.errors import EdgeropeError, RuntimeConfigError

logger = logging.getLogger("edgerope.apps.server")

TERMINAL = frozenset({"done", "error", "cancelled", "crashed"})


class WorkerUnavailable(Exception):
    """No worker became ready in time (it keeps crashing, or is still loading)."""


def exit_description(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Ticket:
    """One job's messages from the worker, in order; ``buffered`` counts streamed text not yet taken."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, *, max_buffer: int) -> None:
        self.job = job
        self.loop = loop
        self.max_buffer = max_buffer
        self.queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.buffered = 0
        self.overflow = False
        self.ended = asyncio.Event()
        self.cancel_requested = False

    def deliver(self, msg: tuple[Any, ...]) -> None:  # in the loop's thread
        if self.ended.is_set():
            return
        if msg[0] == "piece":
            self.buffered += len(msg[2])
            if self.buffered > self.max_buffer:
                self.overflow = True
        if msg[0] in TERMINAL:
            self.ended.set()
        self.queue.put_nowait(msg)

    async def next(self) -> tuple[Any, ...]:
        msg = await self.queue.get()
        if msg[0] == "piece":
            self.buffered -= len(msg[2])
        return msg


class Supervisor:
    """Owns the model worker process (see the module docstring)."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        start_timeout_s: float = 600.0,
        ready_timeout_s: float = 120.0,
        cancel_grace_s: float = 30.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
        max_buffer_bytes: int = 1 << 20,
    ) -> None:
        self.config = config
        self.start_timeout_s = start_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.cancel_grace_s = cancel_grace_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_s = stable_s
        self.max_buffer_bytes = max_buffer_bytes
        self.state = "stopped"
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.last_exit: str | None = None
        self.last_error: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._started_at = 0.0
        self._failures = 0  # deaths in a row, each within stable_s of its start
        self._send_lock = threading.Lock()
        self._tickets: dict[int, Ticket] = {}
        self._tickets_lock = threading.Lock()
        self._closing = False
        self._monitor: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn: asyncio.Lock | None = None
        self._ready: asyncio.Event | None = None

    # lifetime
    def start(self) -> dict[str, Any]:
        """Start the worker and wait until the model is loaded; raise the worker's error if it refuses."""
        self.state = "starting"
        try:
            self._proc, self._conn, self.info = self._spawn()
        except BaseException:
            self.state = "stopped"
            raise
        self._set_state("ready")
        self._monitor = threading.Thread(target=self._watch, name="edgerope-worker-monitor", daemon=True)
        self._monitor.start()
        return self.info

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Bind to the server's event loop (at its start-up)."""
        self._loop = loop
        self._turn = asyncio.Lock()
        self._ready = asyncio.Event()
        if self.state == "ready":
            self._ready.set()

    def close(self) -> None:
        """Stop the worker (politely, then by force).  Safe to call twice."""
        self._closing = True
        self.state = "stopped"
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if conn is not None:
            conn.close()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5)
        self._proc = None

    def health(self) -> dict[str, Any]:
        proc = self._proc
        return {
            "state": self.state,
            "pid": proc.pid if proc is not None and self.state == "ready" else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_error": self.last_error,
            "uptime_s": round(time.monotonic() - self._started_at, 1) if self.state == "ready" else 0.0,
            "busy": bool(self._tickets),
        }

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # the worker process
    def _spawn(self) -> tuple[subprocess.Popen[bytes], Connection, dict[str, Any]]:
        ours, theirs = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgerope.apps.worker", str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env
        )
        theirs.close()
        parent = Connection(ours.detach())
        try:
            parent.send(self.config)
            if not parent.poll(self.start_timeout_s):
                raise RuntimeConfigError(
                    f"the model worker did not load the model within {self.start_timeout_s:g} s",
                    where=self.config.model_path,
                )
            msg = parent.recv()
        except (EOFError, OSError):
            proc.wait()
            parent.close()
            raise RuntimeConfigError(
                f"the model worker {exit_description(proc.returncode)} while loading the model",
                where=self.config.describe(),
                fix="run `edgerope ask` or `edgerope inspect` on the model to see what fails",
            ) from None
        except BaseException:
            proc.kill()
            proc.wait()
            parent.close()
            raise
        if msg[0] == "failed":
            proc.wait()
            parent.close()
            raise _rebuild_error(msg[1])
        self._started_at = time.monotonic()
        return proc, parent, msg[1]

    def _send(self, msg: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("no worker")
        with self._send_lock:
            conn.send(msg)

    def _set_state(self, state: str) -> None:
        self.state = state
        loop, ready = self._loop, self._ready
        if loop is not None and ready is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(ready.set if state == "ready" else ready.clear)

    def _watch(self) -> None:
        """The monitor thread: deliver messages; on a death, fail the job in flight and restart."""
        while not self._closing:
            conn = self._conn
            try:
                assert conn is not None
                msg = conn.recv()
            except (EOFError, OSError, AssertionError):
                if self._closing:
                    return
                self._died()
                self._restart()
                continue
            with self._tickets_lock:
                ticket = self._tickets.get(msg[1]) if len(msg) > 1 else None
            if ticket is not None:
                _call_in(ticket.loop, ticket.deliver, msg)

    def _died(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # closed its end but lives on: end it
            proc.kill()
            proc.wait()
        self.last_exit = exit_description(proc.returncode)
        lived = time.monotonic() - self._started_at
        self._failures = self._failures + 1 if lived < self.stable_s else 1
        self._set_state("restarting")
        with self._tickets_lock:
            tickets = list(self._tickets.values())
        what = f"the model worker (pid {proc.pid}) {self.last_exit} while answering this request; it is being restarted"
        logger.error(
            "model worker pid %d %s after %.1f s (%s); %s in flight; restarting",
            proc.pid,
            self.last_exit,
            lived,
            self.config.describe(),
            f"job {tickets[0].job.id}" if tickets else "no request",
            extra={
                "request": {
                    "event": "worker-died",
                    "pid": proc.pid,
                    "exit": self.last_exit,
                    "settings": self.config.describe(),
                }
            },
        )
        for t in tickets:
            _call_in(t.loop, t.deliver, ("crashed", t.job.id, what))
        if self._conn is not None:
            self._conn.close()

    def _restart(self) -> None:
        while not self._closing:
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, self._failures - 1))
            logger.info(
                "restarting the model worker in %.1f s",
                delay,
                extra={"request": {"event": "worker-restart", "delay_s": delay}},
            )
            time.sleep(delay)
            if self._closing:
                return
            self.state = "starting"
            try:
                self._proc, self._conn, self.info = self._spawn()
            except EdgeropeError as exc:
                self.last_error = exc.what
                self._failures += 1
                self._set_state("restarting")
                logger.error("the model worker failed to start: %s", exc.what)
                continue
            self.restarts += 1
            self._set_state("ready")
            logger.info(
                "model worker restarted (pid %d)",
                self._proc.pid,
                extra={"request": {"event": "worker-ready", "pid": self._proc.pid}},
            )
            return

    def kill(self) -> None:
        """Kill the worker now (it will be restarted); for a worker that does not answer a cancel."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    # jobs
    @contextlib.asynccontextmanager
    async def job(self, job: Job) -> AsyncIterator[Ticket]:
        """Run ``job`` on the worker when it is its turn (see the module docstring)."""
        assert self._turn is not None and self._ready is not None and self._loop is not None, "attach() first"
        async with self._turn:
            try:
                await asyncio.wait_for(self._ready.wait(), self.ready_timeout_s)
            except asyncio.TimeoutError:
                raise WorkerUnavailable(
                    f"the model worker is not ready ({self.state}; last exit: {self.last_exit or 'none'})"
                ) from None
            ticket = Ticket(job, self._loop, max_buffer=self.max_buffer_bytes)
            with self._tickets_lock:
                self._tickets[job.id] = ticket
            try:
                try:
                    await self._loop.run_in_executor(None, self._send, ("job", job))
                except (OSError, ValueError):
                    pass  # the worker is gone: the monitor delivers "crashed"
                yield ticket
            finally:
                interrupted = False
                if not ticket.ended.is_set():  # the worker must be done before the next job is sent
                    waiter = asyncio.ensure_future(self._cancel_and_wait(ticket))
                    while not waiter.done():
                        try:
                            await asyncio.shield(waiter)
                        except asyncio.CancelledError:
                            interrupted = True
                with self._tickets_lock:
                    self._tickets.pop(job.id, None)
                if interrupted:
                    raise asyncio.CancelledError

    def cancel(self, ticket: Ticket) -> None:
        """Ask the worker to stop ``ticket``'s job (idempotent)."""
        if ticket.cancel_requested or ticket.ended.is_set():
            return
        ticket.cancel_requested = True
        assert self._loop is not None
        self._loop.run_in_executor(None, self._send_quietly, ("cancel", ticket.job.id))

    def _send_quietly(self, msg: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._send(msg)

    async def _cancel_and_wait(self, ticket: Ticket) -> None:
        self.cancel(ticket)
        try:
            await asyncio.wait_for(asyncio.shield(ticket.ended.wait()), self.cancel_grace_s)
        except asyncio.TimeoutError:
            logger.error(
                "the model worker did not stop job %d within %g s; killing it", ticket.job.id, self.cancel_grace_s
            )
            self.kill()
            await ticket.ended.wait()


def _call_in(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed
        loop.call_soon_threadsafe(fn, *args)


def _rebuild_error(data: dict[str, Any]) -> EdgeropeError:
    """The worker's start-up error as the same class, for the CLI's exit code 2 and message."""
    cls = getattr(errors, str(data.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, EdgeropeError)):
        cls = EdgeropeError
    if cls.__module__ != errors.__name__:
        cls = EdgeropeError
    return cls(str(data.get("what")), where=data.get("where"), fix=data.get("fix"))
