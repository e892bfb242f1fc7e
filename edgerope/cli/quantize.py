"""``edgerope quantize``: GGUF -> quantized GGUF (maps options to ``edgerope.convert.quantize.quantize``)."""

from __future__ import annotations

import click

from edgerope.cli._common import echo_json, handle_errors


@click.command("quantize")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False, path_type=str))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Output .gguf file."
)
@click.option(
    "--type",
    "qtype",
    default="Q4_K_M",
    show_default=True,
    metavar="TYPE",
    help="llama.cpp quantization type: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, "
    "IQ3_S, IQ3_M, IQ4_NL, IQ4_XS, F16, BF16, F32.",
)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def quantize(in_path: str, output: str, qtype: str, force: bool, threads: int | None, as_json: bool) -> None:
    """Quantize the GGUF file IN with llama.cpp's quantizer; rope metadata and rope tensors are verified intact."""
    from edgerope.convert.quantize import quantize as run_quantize

    report = run_quantize(in_path, output, qtype=qtype, force=force, n_threads=threads)
    if as_json:
        echo_json(report.to_dict())
        return
    types = ", ".join(f"{n} {t}" for t, n in report.tensor_types.items())
    click.echo(
        f"wrote {report.path} ({report.bytes_out / 1e6:.1f} MB from {report.bytes_in / 1e6:.1f} MB, {report.qtype})"
    )
    click.echo(f"  tensor types: {types}")
    if report.rope_tensors:
        click.echo(f"  rope tensors kept F32 and byte-identical: {', '.join(report.rope_tensors)}")
    click.echo("  metadata: identical except general.file_type / general.quantization_version")
    for name, ggml_type in report.demoted.items():
        click.echo(f"  {name}: {ggml_type} (rows not divisible by the block size)")
    for note in report.notes:
        click.echo(f"  note: {note}")
