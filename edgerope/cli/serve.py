"""``edgerope serve``: an OpenAI-compatible HTTP API for one GGUF (``edgerope.apps.server``), on 127.0.0.1 by default."""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from edgerope.cli._common import cpu_repack_option, gpu_options, handle_errors

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
@click.option("--api-key", envvar="EDGEROPE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option("--max-queue", type=int, default=8, show_default=True, help="Requests allowed to wait; more get 429.")
@click.option(
    "--default-max-tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Most tokens generated for a request that gives no max_tokens (less if the context has less room).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Open connections at most; more are answered 503.",
)
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
@gpu_options
@cpu_repack_option
@handle_errors
def serve(
    model: str,
    host: str,
    port: int,
    n_ctx: int | None,
    kv: str,
    n_threads: int | None,
    api_key: str | None,
    max_queue: int,
    default_max_tokens: int,
    max_connections: int,
    cache_dir: str | None,
    no_cache: bool,
    min_prefix_tokens: int,
    model_id: str | None,
    json_logs: bool,
    gpu: dict[str, Any] | None = None,
) -> None:
    """Serve MODEL (a GGUF) over an OpenAI-compatible HTTP API until Ctrl-C or SIGTERM.  The model runs in a
    worker process that is restarted if it crashes; see README, "Serving"."""
    from edgerope.apps.logs import configure
    from edgerope.apps.server import open_server

    fmt = "json" if json_logs else "text"
    configure(fmt)
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
        default_max_tokens=default_max_tokens,
        max_connections=max_connections,
        log_format=fmt,
        n_ctx=n_ctx,
        type_k=kv,
        type_v=kv,
        n_threads=n_threads,
        **(gpu or {}),
    )
    info = server.supervisor.info
    template = "chat template from the GGUF" if info.get("chat_template") else "plain chat format"
    log.info(
        "listening on %s (model %s, n_ctx %d, KV %s/%s, %s, backend %s, pid %d, worker pid %d)",
        server.url,
        server.model_id,
        info["n_ctx"],
        info["type_k"],
        info["type_v"],
        template,
        info["backend"],
        os.getpid(),
        info["pid"],
        extra={"request": {"event": "listening", "url": server.url, "n_ctx": info["n_ctx"], "model": server.model_id}},
    )
    try:
        server.serve_forever()  # SIGINT/SIGTERM end it gracefully
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        log.info("stopped", extra={"request": {"event": "stopped"}})
