"""``edgerope demo``: the built-in tiny model through every rope method, PyTorch vs llama.cpp."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from edgerope.cli._common import echo_json, handle_errors


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the models and GGUFs here (default: a temporary folder, removed afterwards).",
)
@click.option("--positions", type=int, default=2048, show_default=True, help="Positions compared (8x the 256 trained).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def demo(workdir: Path | None, positions: int, as_json: bool) -> None:
    """Make the built-in tiny model (trained context 256) with each rope scaling method, convert it
    to GGUF and compare its logits in PyTorch and in llama.cpp at every position up to 8x its context."""
    from edgerope.demo import run_demo

    def step(msg: str) -> None:
        if not as_json:
            click.secho(f"- {msg}", fg="cyan", err=True)

    with tempfile.TemporaryDirectory(prefix="edgerope-demo-") as tmp:
        report = run_demo(workdir or tmp, n_positions=positions, on_step=step)
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
