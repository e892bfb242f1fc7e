"""``edgerope serve``: an OpenAI-compatible HTTP API for one GGUF (``edgerope.apps.server``), on 127.0.0.1 by default."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import click

from edgerope.cli._common import cpu_repack_option, handle_errors

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _JsonLines(logging.Formatter):
    """One JSON object per log record: the request fields when the server attached them, else the message."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name}
        request = getattr(record, "request", None)
        data.update(request if isinstance(request, dict) else {"message": record.getMessage()})
        return json.dumps(data, default=str)


def _log_setup(json_logs: bool) -> None:
    log = logging.getLogger("edgerope.apps.server")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines() if json_logs else logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@click.command("serve")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0: any free port).")
@click.option(
    "--ctx",
    "n_ctx",
    type=int,
    default=None,
    help="Context length (default: the largest that fits memory, capped at the model's).",
)
@click.option("--kv", "kv", default="f16", show_default=True, help="Cache type for K and V (f16, q8_0, q4_0, ...).")
@click.option("--threads", "n_threads", type=int, default=None, help="CPU threads (default: all usable).")
@click.option("--backend", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--api-key", envvar="EDGEROPE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option("--max-queue", type=int, default=8, show_default=True, help="Requests allowed to wait; more get 429.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Document cache folder.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the document cache.")
@click.option(
    "--min-prefix-tokens",
    type=int,
    default=512,
    show_default=True,
    help="A first system message this long keeps its KV state in the document cache.",
)
@click.option("--model-id", default=None, help="Model name reported by /v1/models (default: the file's stem).")
@click.option("--json-logs", is_flag=True, help="Log one JSON object per request on stderr.")
@cpu_repack_option
@handle_errors
def serve(
    model: str,
    host: str,
    port: int,
    n_ctx: int | None,
    kv: str,
    n_threads: int | None,
    backend: str,
    api_key: str | None,
    max_queue: int,
    cache_dir: str | None,
    no_cache: bool,
    min_prefix_tokens: int,
    model_id: str | None,
    json_logs: bool,
) -> None:
    """Serve MODEL (a GGUF) over an OpenAI-compatible HTTP API until Ctrl-C or SIGTERM."""
    from edgerope.apps.server import open_server

    _log_setup(json_logs)
    log = logging.getLogger("edgerope.apps.server")
    if host not in LOOPBACK:
        log.warning("listening on %s: reachable from other machines%s", host, "" if api_key else " without an API key")
    server = open_server(
        model,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        model_id=model_id,
        cache_dir=cache_dir,
        use_cache=not no_cache,
        min_prefix_tokens=min_prefix_tokens,
        n_ctx=n_ctx,
        type_k=kv,
        type_v=kv,
        n_threads=n_threads,
        backend=backend,
    )
    info = server.engine.runtime.info
    template = "chat template from the GGUF" if server.engine.template is not None else "plain chat format"
    log.info(
        "listening on %s (model %s, n_ctx %d, KV %s/%s, %s, backend %s, pid %d)",
        server.url,
        server.engine.model_id,
        info.n_ctx,
        info.type_k,
        info.type_v,
        template,
        info.backend,
        os.getpid(),
        extra={
            "request": {"event": "listening", "url": server.url, "n_ctx": info.n_ctx, "model": server.engine.model_id}
        },
    )

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()
        log.info("stopped", extra={"request": {"event": "stopped"}})
