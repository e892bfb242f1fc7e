"""``edgerope eval``: passkey, multi-key or perplexity on a checkpoint or a GGUF; table, JSON and PNG plot."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgerope.cli._common import cpu_repack_option, echo_json, handle_errors, progress_enabled
from edgerope.errors import EvalError, OutputError

if TYPE_CHECKING:
    from edgerope.evaluation.report import EvalReport


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise EvalError(f"{what} must be comma-separated integers, got {text!r}", fix="e.g. 256,1024,2048") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise EvalError(f"depths must be comma-separated fractions, got {text!r}", fix="e.g. 0,0.5,1") from None


@contextlib.contextmanager
def _bars(enabled: bool) -> Iterator[Callable[[str], Callable[[int, int], None] | None]]:
    """Per-model tqdm bars of trials/passes on stderr (tty only)."""
    bars = []

    def make(label: str) -> Callable[[int, int], None] | None:
        if not enabled or not progress_enabled():
            return None
        from tqdm import tqdm

        bar = tqdm(total=0, desc=label, unit="it", file=click.get_text_stream("stderr"))
        bars.append(bar)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return progress

    try:
        yield make
    finally:
        for bar in bars:
            bar.close()


def _write_json(out: Path, data: dict) -> None:
    from edgerope.system.files import partial_path

    tmp = partial_path(out, "json")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        if json.loads(tmp.read_text(encoding="utf-8")) != json.loads(json.dumps(data, default=str)):
            raise OutputError("the JSON written does not read back", where=str(out))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


@click.command("eval")
@click.argument("model", type=click.Path())
@click.option("--task", default="passkey", show_default=True, help="passkey, multikey or perplexity.")
@click.option("--lengths", required=True, help="Comma-separated increasing prompt lengths in tokens.")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Passkey depths (fractions).")
@click.option("--trials", type=int, default=50, show_default=True, help="Trials per cell (passkey) or length.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the keys (recorded in the JSON).")
@click.option("--max-new-tokens", type=int, default=10, show_default=True, help="Greedy answer tokens.")
@click.option("--keys", "n_keys", type=int, default=4, show_default=True, help="Needles per multi-key prompt.")
@click.option("--data", default=None, type=click.Path(), help="Perplexity documents (default: pydoc_data text).")
@click.option("--max-docs", type=int, default=16, show_default=True, help="Most documents scored for perplexity.")
@click.option("--mode", default="truncated", show_default=True, help="Perplexity: truncated or sliding.")
@click.option("--window", type=int, default=None, help="Sliding window W (tokens).")
@click.option("--stride", type=int, default=None, help="Sliding stride S (tokens).")
@click.option("--bucket", "bucket_size", type=int, default=None, help="Position bucket size (default max/8).")
@click.option("--ctx", "n_ctx", type=int, default=None, help="llama.cpp n_ctx (default: needed, rounded to 256).")
@click.option("--kv", default=None, help="GGUF KV cache type for K and V (default f16).")
@click.option("--threads", "n_threads", type=int, default=None, help="llama.cpp CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="PyTorch checkpoints: cpu, cuda, cuda:N or auto.")
@click.option("--allow-extrapolation", is_flag=True, help="Allow lengths beyond the model's context length.")
@click.option("--compare", default=None, type=click.Path(), help="Second model: same grid, answer agreement.")
@click.option("--plot", "plot_out", default=None, type=click.Path(), help="Write a PNG plot here.")
@click.option("--json", "as_json", is_flag=False, flag_value="-", default=None, help="JSON to stdout, or to a file.")
@click.option("--force", is_flag=True, help="Overwrite existing --plot/--json files.")
@cpu_repack_option
@handle_errors
def eval_(
    model: str,
    task: str,
    lengths: str,
    depths: str,
    trials: int,
    seed: int,
    max_new_tokens: int,
    n_keys: int,
    data: str | None,
    max_docs: int,
    mode: str,
    window: int | None,
    stride: int | None,
    bucket_size: int | None,
    n_ctx: int | None,
    kv: str | None,
    n_threads: int | None,
    device: str,
    allow_extrapolation: bool,
    compare: str | None,
    plot_out: str | None,
    as_json: str | None,
    force: bool,
) -> None:
    """Evaluate MODEL (a Hugging Face checkpoint folder or a .gguf file) on long-context retrieval or
    perplexity per EVAL.md, with the same code for PyTorch and llama.cpp."""
    from edgerope.evaluation.report import EvalRequest, run_eval

    req = EvalRequest(
        task=task,
        lengths=_ints(lengths, "lengths"),
        depths=_floats(depths),
        trials=trials,
        seed=seed,
        mode=mode,
        window=window,
        stride=stride,
        n_keys=n_keys,
        max_new_tokens=max_new_tokens,
        bucket_size=bucket_size,
        max_docs=max_docs,
    )
    inputs = [Path(p) for p in (model, compare, data) if p]
    _check_outputs(inputs=inputs, plot_out=plot_out, as_json=as_json, force=force)
    with _bars(as_json != "-") as bars:
        report = run_eval(
            model,
            req,
            compare=compare,
            data=data,
            n_ctx=n_ctx,
            kv=kv,
            allow_extrapolation=allow_extrapolation,
            n_threads=n_threads,
            device=device,
            progress=bars,
        )
    _emit(report, plot_out=plot_out, as_json=as_json)


def _check_outputs(*, inputs: list[Path], plot_out: str | None, as_json: str | None, force: bool) -> None:
    """Before the run: refuse --plot/--json files that exist (unless --force) or overwrite an input, and a
    missing plotting library."""
    from edgerope.system.files import check_output

    outs = [Path(p) for p in (plot_out, None if as_json in (None, "-") else as_json) if p]
    for out in outs:
        check_output(out, force=force, inputs=inputs)
    if plot_out:  # fail before the run, not after it, when plotting is impossible
        from edgerope.evaluation.plots import _pyplot

        _pyplot()


def _emit(report: EvalReport, *, plot_out: str | None, as_json: str | None) -> None:
    """Write the plot and the JSON file; then print the JSON (``--json -``), or the table and the files written."""
    result = report.to_dict()
    if plot_out:
        info = report.plot(plot_out)
        result["plot"] = {"path": str(info.path), "bytes": info.bytes, "cells": info.cells, "lines": info.lines}
    if as_json == "-":
        echo_json(result)
        return
    if as_json:
        _write_json(Path(as_json), result)
    click.echo(report.table())
    if plot_out:
        click.echo(f"plot: {plot_out}")
    if as_json:
        click.echo(f"json: {as_json}")
