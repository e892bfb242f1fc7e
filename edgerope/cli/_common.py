"""Shared plumbing for CLI commands: error mapping and signals, JSON output, progress bars."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from edgerope.errors import EdgeropeError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_BAD_INPUT = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every ``finally``
    and ``atomic_output`` on the way out removes its temporary files exactly as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Terminated`` (a ``KeyboardInterrupt``) in the main thread;
    the previous handlers are restored after.  A no-op outside the main thread.  A command that installs its own
    handlers inside (``serve``) overrides these for its duration."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def handle_errors(func: F) -> F:
    """Turn ``EdgeropeError`` into a clean message and exit code 2, never a traceback; Ctrl-C, SIGTERM and SIGHUP
    stop the command the same way (temporary outputs removed on the way out) with exit code 128 + the signal."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with stop_signals_as_interrupt():
                return func(*args, **kwargs)
        except EdgeropeError as exc:
            if kwargs.get("as_json"):
                click.echo(json.dumps(exc.to_dict(), indent=2))
            else:
                click.secho(f"error: {exc.message}", fg="red", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            click.secho(f"{what}; temporary outputs were removed", fg="yellow", err=True)
            sys.exit(128 + signum)

    return wrapper  # type: ignore[return-value]


def _set_cpu_repack(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:  # every runtime this command opens (and its children) takes it as the default
        os.environ["EDGEROPE_CPU_REPACK"] = value


def cpu_repack_option(func: F) -> F:
    """``--cpu-repack auto|on|off`` for a command that runs a model (``edgerope.runtime.cpu_repack``)."""
    return click.option(
        "--cpu-repack",
        type=click.Choice(["auto", "on", "off"]),
        default=None,
        envvar="EDGEROPE_CPU_REPACK",
        expose_value=False,
        callback=_set_cpu_repack,
        help="CPU weight layout: auto (llama.cpp's repacking, minus layouts known to crash, e.g. AMX), on "
        "(llama.cpp's default), off (none).  [default: auto]",
    )(func)


def gpu_options(func: F) -> F:
    """``--backend``, ``--gpu-layers`` and ``--gpu-memory`` for a command that runs a model; the command receives
    them as ``gpu`` (keyword arguments for the runtime, empty when all are left at their defaults)."""

    def collect(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        gpu = ctx.params.setdefault("gpu", {})
        if value is not None and not (param.name == "backend" and value == "auto"):
            gpu[{"backend": "backend", "gpu_layers": "n_gpu_layers", "gpu_memory": "gpu_memory_budget"}[param.name]] = (
                value
            )
        return value

    options = (
        click.option(
            "--backend",
            type=click.Choice(["auto", "cpu", "gpu"]),
            default="auto",
            show_default=True,
            expose_value=False,
            callback=collect,
            help="auto: offload to the GPU when this llama.cpp build has one and a layer fits, else the CPU.",
        ),
        click.option(
            "--gpu-layers",
            type=click.IntRange(min=-1),
            default=None,
            expose_value=False,
            callback=collect,
            help="Layers offloaded to the GPU: -1 all (default: as many as fit, planned from free GPU memory).",
        ),
        click.option(
            "--gpu-memory",
            default=None,
            expose_value=False,
            callback=collect,
            help="GPU memory budget per device, e.g. 6GiB (default: free memory less 1 GiB).",
        ),
    )
    for option in reversed(options):
        func = option(func)
    return func


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def progress_enabled() -> bool:
    """Progress bars only on an interactive terminal."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(desc: str, *, unit: str = "B", enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A tqdm bar on stderr fed by ``progress(done, total)`` calls, created with its total on the first call (so
    it shows rate and ETA from the start); closed on exit. ``unit`` "B" scales to kB/MB.

    Yields None (no bar) when ``enabled`` is false (e.g. with --json) or stderr is not a terminal.
    """
    if not enabled or not progress_enabled():
        yield None
        return
    from tqdm import tqdm

    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, file=click.get_text_stream("stderr"))
            )
        bar = bars[0]
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


@contextlib.contextmanager
def step_progress(desc: str, *, enabled: bool = True) -> Iterator[Callable[[Any], None] | None]:
    """A tqdm bar of training steps on stderr (tty only), fed with progress records that have ``step``,
    ``steps``, ``loss`` and ``tokens_per_s`` (finetune's and pretrain's); shows loss, tokens/s and the ETA."""
    if not enabled or not progress_enabled():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc=desc, file=click.get_text_stream("stderr"))

    def progress(p: Any) -> None:
        bar.total = p.steps
        bar.set_postfix(loss=f"{p.loss:.4f}", tok_s=f"{p.tokens_per_s:.0f}", refresh=False)
        bar.update(p.step - bar.n)

    try:
        yield progress
    finally:
        bar.close()
