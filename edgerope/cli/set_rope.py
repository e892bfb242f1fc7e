"""``edgerope set-rope``: rewrite the rope scaling metadata of a GGUF (maps options to ``edgerope.gguf.set_rope``)."""

from __future__ import annotations

from typing import Any

import click

from edgerope.cli._common import echo_json, handle_errors, progress_bar
from edgerope.rope import SCALING_CHOICES


@click.command("set-rope")
@click.argument("input_file", metavar="IN.gguf", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", type=click.Path(path_type=str), default=None, help="Output .gguf file.")
@click.option("--type", "rope_type", required=True, type=click.Choice(SCALING_CHOICES), help="Rope scaling to write.")
@click.option("--factor", type=float, default=None, help="Scale factor (YaRN, linear) or NTK alpha.")
@click.option(
    "--original-context",
    type=click.IntRange(min=1),
    default=None,
    help="Pre-training context (default: the file's original_context_length, or its context if unscaled).",
)
@click.option(
    "--context-length", type=click.IntRange(min=1), default=None, help="New context_length (default factor x original)."
)
@click.option("--freq-base", type=float, default=None, help="Rope base theta (default: the file's).")
@click.option("--attn-factor", type=float, default=None, help="YaRN attention factor (the cos/sin magnitude).")
@click.option("--beta-fast", type=float, default=None, help="YaRN beta_fast (only arches that read it).")
@click.option("--beta-slow", type=float, default=None, help="YaRN beta_slow (only arches that read it).")
@click.option("--in-place", is_flag=True, help="Replace IN.gguf (only after the new file is verified).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option(
    "--full-verify",
    is_flag=True,
    help="Read back every tensor byte and compare (default: head, tail and spaced blocks of every tensor run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def set_rope(input_file: str, output: str | None, as_json: bool, **options: Any) -> None:
    """Rewrite the rope scaling of IN.gguf (any llama.cpp architecture); tensor data is copied byte for byte.

    Example: edgerope set-rope qwen2.5-7b.gguf -o qwen-128k.gguf --type yarn --factor 4 --original-context 32768
    """
    from edgerope.gguf.set_rope import set_rope as run_set_rope

    with progress_bar("copying", enabled=not as_json) as progress:
        # the option names are edgerope.gguf.set_rope.set_rope's keyword arguments; an unknown one raises TypeError
        report = run_set_rope(input_file, output, progress=progress, **options)
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(f"wrote {report.output} ({report.bytes / 1e6:.1f} MB, verified) in {report.seconds:.2f} s")
    click.echo(f"  arch:    {report.architecture}, context_length {report.context_length}")
    click.echo(f"  rope:    {report.rope}")
    for k, v in report.changed_keys.items():
        click.echo(f"  set:     {k} = {v}")
    for k in report.removed_keys:
        click.echo(f"  removed: {k}")
    for name in report.removed_tensors:
        click.secho(f"  removed: tensor {name}", fg="yellow")
    if report.runtime:
        params = ", ".join(f"{k}={v:g}" for k, v in report.runtime.items())
        click.secho(f"  runtime: llama.cpp must be run with {params}", fg="yellow")
    for note in report.notes:
        click.secho(f"  note:    {note}", fg="yellow")
