"""``edgerope convert``: Hugging Face folder -> GGUF (maps options to ``edgerope.convert.export.convert``)."""

from __future__ import annotations

import click

from edgerope.cli._common import echo_json, handle_errors, progress_bar

# Outtypes written directly by edgerope.convert.export; any other llama.cpp quantization name (Q4_K_M, Q6_K, ...)
# is chained: convert to f16 in a hidden temp file, then llama.cpp's quantizer (edgerope.convert.quantize).
DIRECT_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def _outtype(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value.lower() in DIRECT_OUTTYPES:
        return value.lower()
    from edgerope.runtime.native import QUANT_TYPES

    if value.upper() not in QUANT_TYPES:
        raise click.BadParameter(
            f"use one of {', '.join(DIRECT_OUTTYPES)} or a llama.cpp type: {', '.join(QUANT_TYPES)}"
        )
    return value.upper()


@click.command("convert")
@click.argument("hf_dir", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=str), help="Output .gguf file."
)
@click.option(
    "--outtype",
    default="f16",
    show_default=True,
    callback=_outtype,
    help="f32, f16, bf16, q8_0, or a llama.cpp quantization (Q4_K_M, Q5_K_M, Q6_K, ...; chained through "
    "llama.cpp's quantizer). Norms, biases and rope factors stay F32.",
)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option(
    "--bake-dynamic",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Freeze dynamic-NTK rope scaling at N tokens (exact only for prompts of N tokens).",
)
@click.option(
    "--allow-runtime-rope",
    is_flag=True,
    help="Accept rope settings llama.cpp only takes as runtime parameters (e.g. non-default YaRN betas).",
)
@click.option(
    "--lora-gguf",
    is_flag=True,
    help="HF_DIR is a LoRA adapter folder: write llama.cpp's adapter GGUF (f32 or f16) instead of the merged model.",
)
@click.option("--base", default=None, type=click.Path(file_okay=False), help="A LoRA adapter's base checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def convert(
    hf_dir: str,
    output: str,
    outtype: str,
    force: bool,
    bake_dynamic: int | None,
    allow_runtime_rope: bool,
    lora_gguf: bool,
    base: str | None,
    as_json: bool,
) -> None:
    """Convert the Hugging Face checkpoint folder HF_DIR to a GGUF file with exact rope metadata.

    A LoRA adapter folder (``finetune --lora``) is merged into its base first, or with --lora-gguf written as
    llama.cpp's adapter GGUF for a base GGUF with the adapter's rope."""
    from edgerope.convert.export import convert as run_convert
    from edgerope.convert.lora import convert_merged, is_adapter_folder, write_adapter_gguf

    quant = None
    adapter = is_adapter_folder(hf_dir)
    if lora_gguf or (base and not adapter):
        if not adapter:
            raise click.BadParameter(
                "HF_DIR is not a LoRA adapter folder (no adapter_config.json)", param_hint="HF_DIR"
            )
        rep = write_adapter_gguf(hf_dir, output, outtype=outtype.lower(), base=base, force=force)
        if as_json:
            echo_json(rep.to_dict())
            return
        click.echo(
            f"wrote {rep.path} (LoRA adapter, {rep.n_pairs} pairs, rank {rep.rank}, alpha {rep.alpha:g}, {rep.outtype})"
        )
        click.echo(f"  runs on:   a {rep.arch} base GGUF with {rep.rope}, context {rep.context_length}")
        return
    with progress_bar("writing", enabled=not as_json) as progress:
        options = {"bake_dynamic": bake_dynamic, "allow_runtime_rope": allow_runtime_rope, "progress": progress}
        if adapter:
            report, quant = convert_merged(hf_dir, output, outtype=outtype, base=base, force=force, **options)
        elif outtype in DIRECT_OUTTYPES:
            report = run_convert(hf_dir, output, outtype=outtype, force=force, **options)
        else:
            from edgerope.convert.quantize import convert_quantized

            report, quant = convert_quantized(hf_dir, output, qtype=outtype, force=force, **options)
    if as_json:
        echo_json({**report.to_dict(), "quantized": quant.to_dict() if quant else None})
        return
    if quant is None:
        click.echo(
            f"wrote {report.path} ({report.bytes / 1e6:.1f} MB, {report.n_tensors} tensors, {report.outtype}) "
            f"in {report.seconds:.1f} s"
        )
    else:
        types = ", ".join(f"{k} x{v}" for k, v in quant.tensor_types.items())
        click.echo(
            f"wrote {quant.path} ({quant.bytes_out / 1e6:.1f} MB, {quant.qtype} by llama.cpp's quantizer: {types}) "
            f"in {report.seconds + quant.seconds:.1f} s"
        )
    click.echo(f"  arch:      {report.arch}, context {report.context_length}")
    click.echo(f"  rope:      {report.rope}")
    click.echo(f"  tokenizer: {report.tokenizer}, {report.n_vocab} tokens")
    if report.runtime:
        params = ", ".join(f"{k}={v:g}" for k, v in report.runtime.items())
        click.secho(f"  runtime:   llama.cpp must be run with {params}", fg="yellow")
    for note in (*report.rope_notes, *report.notes):
        click.secho(f"  note:      {note}", fg="yellow")
