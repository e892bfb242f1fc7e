"""``edgerope ask``: answer a question about a long document; the document's KV state is cached on disk.

The answer streams to stdout as it is generated (``--json`` prints one object at the end instead); the
document's prefill shows a progress bar with an ETA on stderr (tty only).  A document that is not a regular file
(a FIFO, a device) or is larger than the model's context can hold is refused before it is read (exit 2).
"""

from __future__ import annotations

from typing import Any

import click

from edgerope.cli._common import cpu_repack_option, echo_json, gpu_options, handle_errors, progress_bar


class _Stream:
    """Prints the answer's text to stdout piece by piece as it is generated (leading whitespace dropped)."""

    def __init__(self) -> None:
        self.started = False
        self.trailing = ""  # whitespace held back, so the answer ends without it

    def __call__(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.trailing + piece
        body = text.rstrip()
        self.trailing = text[len(body) :]
        if body:
            click.echo(body, nl=False)

    def finish(self) -> None:
        click.echo()


def _ctx(value: str | None) -> int | None:
    if value is None or value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number of tokens", param_hint="--ctx") from None
    if n < 1:
        raise click.BadParameter(f"{n} is not a positive number of tokens", param_hint="--ctx")
    return n


@click.command("ask")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--doc", "doc", required=True, type=click.Path(dir_okay=False), help="UTF-8 text/markdown document.")
@click.option("--question", "-q", required=True, help="The question about the document.")
@click.option(
    "--ctx",
    "ctx",
    default="auto",
    show_default=True,
    help="Context length in tokens, or auto: the largest that fits --memory, capped at the model's context_length.",
)
@click.option("--memory", default=None, help="Memory budget, e.g. 8GiB (default: available memory less 10%).")
@click.option("--kv", "kv", default="f16", show_default=True, help="Cache type for K and V (f16, q8_0, q4_0, ...).")
@click.option(
    "--truncate",
    is_flag=True,
    help="When the document does not fit, cut its tail (reported) instead of refusing.",
)
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False), help="Document cache folder.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the document cache.")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Longest answer in tokens.")
@click.option("--threads", "n_threads", type=int, default=None, help="CPU threads (default: all usable).")
@click.option(
    "--prompt-format",
    type=click.Choice(["auto", "chat", "plain"]),
    default="auto",
    show_default=True,
    help="auto: the GGUF's chat template when it has one, else a plain prompt.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (no streaming).")
@gpu_options
@cpu_repack_option
@handle_errors
def ask(
    model: str,
    doc: str,
    question: str,
    ctx: str | None,
    memory: str | None,
    kv: str,
    truncate: bool,
    cache_dir: str | None,
    no_cache: bool,
    max_tokens: int,
    n_threads: int | None,
    prompt_format: str,
    as_json: bool,
    gpu: dict[str, Any] | None = None,
) -> None:
    """Answer QUESTION about the document DOC with MODEL (a GGUF); a second question on the same document
    restores its cached state instead of evaluating it again."""
    from edgerope.apps.ask import ask_file

    n_ctx = _ctx(ctx)
    stream = None if as_json else _Stream()
    request: dict[str, Any] = {"memory_budget": memory} if memory is not None else {}
    request.update(gpu or {})
    with progress_bar("document", unit="tok", enabled=not as_json) as progress:
        a = ask_file(
            model,
            doc,
            question,
            n_ctx=n_ctx,
            type_k=kv,
            type_v=kv,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            max_tokens=max_tokens,
            progress=progress,
            n_threads=n_threads,
            prompt_format=prompt_format,
            truncate=truncate,
            on_text=stream,
            **request,
        )
    if as_json:
        echo_json(a.to_dict())
        return
    assert stream is not None
    stream.finish()
    t = a.timings
    source = "restored from cache" if a.cached else "evaluated"
    if a.truncation is not None:
        click.echo(f"[document truncated: {a.truncation.describe()}]", err=True)
    click.echo(
        f"[document {a.document_tokens} tokens {source} in {t.prefill_s:.2f}s; question {a.question_tokens} tokens; "
        f"first token after {t.time_to_first_token_s:.2f}s; {len(a.tokens)} tokens at {t.decode_tokens_per_s:.1f}/s; "
        f"n_ctx {a.n_ctx} ({a.n_ctx_source}), KV {a.type_k}/{a.type_v}]",
        err=True,
    )
