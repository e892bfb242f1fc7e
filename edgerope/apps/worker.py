"""The model worker: the process that owns llama.cpp for the server, one request at a time.

``python -m edgerope.apps.worker FD`` is the child process ``edgerope.apps.supervisor`` starts, FD its end of a
socket pair; the first message on it is the ``WorkerConfig``.  ``worker_main(conn, config)`` opens the GGUF
once (chat template, vocab facts, runtime), reports ``("ready", info)`` or ``("failed", error)``, then serves jobs
from its end of a pipe until told to stop or the pipe closes.

Messages, parent to worker: ``("job", Job)``, ``("cancel", job_id)``, ``("stop",)``.  Worker to parent, per job:
``("start", id, {"prompt_tokens": n})`` once the prompt is accepted, ``("piece", id, text)`` for streamed text,
then exactly one of ``("done", id, completion)``, ``("error", id, status, body)``, ``("cancelled", id)``.

A native crash (SIGSEGV, an abort in llama.cpp), an OOM kill or SIGKILL ends this process, not the server: the
supervisor sees the pipe close, answers the request in flight with a 5xx and starts a new worker.  The worker
ignores SIGINT (Ctrl-C reaches the whole process group; the server stops it), dies with its parent
(``PR_SET_PDEATHSIG`` on Linux, and a closed pipe everywhere), and writes the Python stack of a crash to stderr
(``faulthandler``).

What it does not do: HTTP, queueing or restarts (``edgerope.apps.supervisor``).
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from edgerope.apps.openai_api import Job, RequestError, error_body
from edgerope.errors import EdgeropeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to open the model (picklable; the supervisor logs it with a crash)."""

    model_path: str
    runtime_request: dict[str, Any] = field(default_factory=dict)  # Runtime.open's keyword arguments
    model_identity: Any = None  # the document cache's model key (computed once by the server)
    cache_dir: str | None = None
    use_cache: bool = True
    min_prefix_tokens: int = 512
    default_max_tokens: int = 512
    log_format: str | None = None  # "json" or "text": log as the server does (None: Python's default)

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in sorted(self.runtime_request.items()) if v is not None)
        return f"model {self.model_path} ({settings or 'defaults'})"


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _error(exc: EdgeropeError) -> dict[str, Any]:
    return {"error": type(exc).__name__, "what": exc.what, "where": exc.where, "fix": exc.fix}


def _open_engine(config: WorkerConfig) -> Any:
    from edgerope.apps.chat_template import from_gguf
    from edgerope.apps.engine import Engine
    from edgerope.gguf.reader import using_gguf
    from edgerope.runtime.doccache import DocCache
    from edgerope.runtime.runtime import Runtime
    from edgerope.runtime.tokenizing import LinearTokenizer, VocabFacts

    with using_gguf(config.model_path) as f:
        template = from_gguf(f)
        facts = VocabFacts.from_gguf(f)
        rt = Runtime.open(f, **config.runtime_request)
    try:
        return Engine(
            rt,
            template=template,
            tokenizer=LinearTokenizer(rt, facts),
            cache=DocCache(config.cache_dir) if config.use_cache else None,
            model_identity=config.model_identity,
            min_prefix_tokens=config.min_prefix_tokens,
            default_max_tokens=config.default_max_tokens,
        )
    except BaseException:
        rt.close()
        raise


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """The worker process's entry point (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if config.log_format is not None:
        from edgerope.apps.logs import configure

        configure(config.log_format, logging.WARNING)
    try:
        engine = _open_engine(config)
    except EdgeropeError as exc:
        conn.send(("failed", _error(exc)))
        return
    info = engine.runtime.info
    conn.send(
        (
            "ready",
            {
                "pid": os.getpid(),
                "n_ctx": info.n_ctx,
                "n_ctx_train": info.n_ctx_train,
                "type_k": info.type_k,
                "type_v": info.type_v,
                "backend": info.backend,
                "n_threads": info.n_threads,
                "chat_template": engine.template is not None,
                "max_token_bytes": engine.tokenizer.facts.max_token_bytes,
                "min_tokens_valid": engine.tokenizer.facts.min_tokens(1) > 0,
            },
        )
    )
    try:
        _serve(conn, engine)
    except (EOFError, OSError):  # the server went away
        pass
    finally:
        engine.runtime.close()


def _serve(conn: Connection, engine: Any) -> None:
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        if msg[0] == "job":
            if _run(conn, engine, msg[1]):
                return
        # a "cancel" for a job that already ended: nothing to do


def _run(conn: Connection, engine: Any, job: Job) -> bool:
    """Run one job, answering on ``conn``; True when a stop arrived meanwhile."""
    from edgerope.apps.engine import Cancelled

    flags = {"cancel": False, "stop": False}

    def cancelled() -> bool:
        while conn.poll(0):
            m = conn.recv()
            if m[0] == "stop":
                flags["stop"] = flags["cancel"] = True
            elif m[0] == "cancel" and m[1] == job.id:
                flags["cancel"] = True
        return flags["cancel"]

    def emit(kind: str, data: Any) -> None:
        conn.send((kind, job.id, data))

    try:
        done = engine.run(job, emit=emit, cancelled=cancelled)
        conn.send(("done", job.id, done.to_dict()))
    except Cancelled:
        conn.send(("cancelled", job.id))
    except RequestError as exc:
        conn.send(("error", job.id, exc.status, exc.body()))
    except EdgeropeError as exc:
        conn.send(("error", job.id, 400, error_body(exc.message, status=400)))
    except (EOFError, OSError):
        raise
    except Exception:  # a bug: answer 500, log it, keep serving
        sys.stderr.write(f"edgerope worker: error while answering job {job.id}:\n{traceback.format_exc()}")
        conn.send(
            ("error", job.id, 500, error_body("internal error in the model worker; see the server log", status=500))
        )
    return flags["stop"]


def main(argv: list[str]) -> None:
    """``python -m edgerope.apps.worker FD``: serve on the inherited socket FD."""
    conn = Connection(int(argv[0]))
    try:
        config = conn.recv()
    except (EOFError, OSError):
        return
    worker_main(conn, config)


if __name__ == "__main__":
    main(sys.argv[1:])
