"""``edgerope ask``: answer a question about a long document; the document's KV state is cached on disk."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import click

from edgerope.cli._common import echo_json, handle_errors, progress_enabled


@contextlib.contextmanager
def _token_progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar of prompt tokens on stderr (tty only), fed by ``progress(done, total)``."""
    if not enabled or not progress_enabled():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="tok", desc="document", file=click.get_text_stream("stderr"))

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        bar.close()


@click.command("ask")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--doc", "doc", required=True, type=click.Path(dir_okay=False), help="UTF-8 text/markdown document.")
@click.option("--question", "-q", required=True, help="The question about the document.")
@click.option("--ctx", "n_ctx", type=int, default=None, help="Context length (default: the model's, capped at 4096).")
@click.option("--kv", "kv", default="f16", show_default=True, help="Cache type for K and V (f16, q8_0, q4_0, ...).")
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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def ask(
    model: str,
    doc: str,
    question: str,
    n_ctx: int | None,
    kv: str,
    cache_dir: str | None,
    no_cache: bool,
    max_tokens: int,
    n_threads: int | None,
    prompt_format: str,
    as_json: bool,
) -> None:
    """Answer QUESTION about the document DOC with MODEL (a GGUF); a second question on the same document
    restores its cached state instead of evaluating it again."""
    from edgerope.ask import ask as run_ask
    from edgerope.ask import read_document

    text = read_document(doc)
    with _token_progress(not as_json) as progress:
        a = run_ask(
            model,
            text,
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
        )
    if as_json:
        echo_json(a.to_dict())
        return
    click.echo(a.text.strip())
    t = a.timings
    source = "restored from cache" if a.cached else "evaluated"
    click.echo(
        f"[document {a.document_tokens} tokens {source} in {t.prefill_s:.2f}s; question {a.question_tokens} tokens; "
        f"first token after {t.time_to_first_token_s:.2f}s; {len(a.tokens)} tokens at {t.decode_tokens_per_s:.1f}/s; "
        f"n_ctx {a.n_ctx}, KV {a.type_k}/{a.type_v}]",
        err=True,
    )
