"""``edgerope demo``: the built-in tiny model stretched from 256 to 2048 tokens (and ``--parity``: PyTorch vs llama.cpp)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import click

from edgerope.cli._common import cpu_repack_option, echo_json, handle_errors


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the models and GGUFs here (default: a temporary folder, removed afterwards).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("edgerope-demo.png"),
    show_default=True,
    help="Where to save the plot (passkey accuracy and perplexity by length).",
)
@click.option("--trials", type=int, default=4, show_default=True, help="Passkey trials per (length, depth) cell.")
@click.option(
    "--steps",
    type=int,
    default=300,
    show_default=True,
    help="Full fine-tuning steps of 2048 tokens; PoSE trains on as many tokens, in steps of 2 x 256.",
)
@click.option(
    "--parity", is_flag=True, help="Instead: every rope method, logits in PyTorch vs llama.cpp at 8x context."
)
@click.option("--positions", type=int, default=2048, show_default=True, help="--parity: positions compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@cpu_repack_option
@handle_errors
def demo(
    workdir: Path | None, plot: Path, trials: int, steps: int, parity: bool, positions: int, as_json: bool
) -> None:
    """The built-in tiny model (trained at 256 tokens) read at up to 2048: no scaling, linear x8, YaRN x8,
    YaRN x8 + fine-tune and YaRN x8 + PoSE, each a Q8_0 GGUF run in llama.cpp with a q8_0 KV cache;
    a table, a plot, and a question about a long document."""

    def step(msg: str) -> None:
        if not as_json:
            click.secho(f"- {msg}", fg="cyan", err=True)

    with tempfile.TemporaryDirectory(prefix="edgerope-demo-") as tmp:
        if parity:
            from edgerope.recipes.parity_demo import run_demo as run_parity

            _print_parity(run_parity(workdir or tmp, n_positions=positions, on_step=step), as_json, workdir)
            return
        from dataclasses import replace

        from edgerope.recipes.demo import DEMO_SETTINGS, run_demo
        from edgerope.recipes.extend_report import format_table

        settings = replace(DEMO_SETTINGS, trials=trials, ft_steps=steps)
        report = run_demo(workdir or tmp, settings=settings, plot=plot, on_step=step)
    if as_json:
        echo_json(report.to_dict())
        return
    ext = report.extension
    click.echo(
        f"\n{Path(ext.base).name}: trained at {ext.original_context} tokens, read at up to {max(ext.settings['lengths'])}\n"
    )
    click.echo(format_table(ext))
    click.echo(f'\nlong document, then "{report.question}" (the key is {report.expected}):')
    for a in report.answers:
        mark = "correct" if a.correct else "wrong"
        click.echo(
            f"  {a.variant:<24} {a.answer!r:<16} {mark}  ({a.document_tokens} document tokens, prefill {a.prefill_s:.2f} s)"
        )
    if report.plot:
        click.echo(f"\nplot: {report.plot}")
    click.echo(f"done in {report.seconds:.0f} s" + (f"; files in {workdir}" if workdir else ""))


def _print_parity(report: Any, as_json: bool, workdir: Path | None) -> None:
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(
        f"\n{report.model}; trained context {report.original_context}, compared at {report.n_positions} positions"
    )
    kvs = list(report.rows[0].errors)
    head = f"{'rope scaling':<30}" + "".join(f"{kv + ' <=256':>16}{kv + ' >256':>16}" for kv in kvs)
    click.echo("relative L2 error of llama.cpp logits vs PyTorch (fp32)\n" + head)
    for row in report.rows:
        cells = "".join(f"{row.errors[kv]['within']:>16.2e}{row.errors[kv]['beyond']:>16.2e}" for kv in kvs)
        click.echo(f"{row.variant:<30}{cells}")
    q = report.quantized
    if q:
        click.echo(
            f"\nyarn x8 quantized to Q8_0 by llama.cpp: {q['bytes'] / 1e6:.2f} MB (f32 {q['f32_bytes'] / 1e6:.2f} MB), "
            f"rel L2 with q8_0 KV {q['rel_l2_q8_0_kv']:.2e}"
        )
    click.echo("\nGGUF rope metadata written:")
    for row in report.rows:
        keys = ", ".join(
            f"{k.split('.', 1)[1] if '.rope.' in k else k}={v}"
            for k, v in row.gguf_rope_keys.items()
            if not k.endswith((".context_length", ".dimension_count")) or ".scaling." in k
        )
        click.echo(f"  {row.variant:<30} {keys}")
    click.echo(f"\ndone in {report.seconds:.1f} s" + (f"; files in {workdir}" if workdir else ""))
