"""``edgerope finetune``: fine-tune a checkpoint at a scaled rope, or at its own (``--rope keep``), full length or
PoSE, every weight or LoRA; DDP under torchrun."""

from __future__ import annotations

import os
from typing import Any

import click

from edgerope.cli._common import echo_json, handle_errors, step_progress
from edgerope.rope import FINETUNE_CHOICES
from edgerope.train.mix import DEFAULT_RETRIEVAL_MIX


@click.command("finetune")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option(
    "--rope",
    type=click.Choice(FINETUNE_CHOICES),
    default="yarn",
    show_default=True,
    help="The scaling to train for; keep: the checkpoint's own rope as its config.json declares it (LongRoPE, "
    "llama3, ...), no --factor/--target-context.",
)
@click.option("--factor", type=float, default=None, help="Context multiplier (default: target / original).")
@click.option("--target-context", type=int, default=None, help="Target context (default: factor x original).")
@click.option(
    "--data", "data", multiple=True, required=True, type=click.Path(), help="Text/markdown files, folders, JSONL."
)
@click.option("--text-field", default="text", show_default=True, help="The text field of JSONL lines.")
@click.option(
    "--retrieval-mix",
    type=float,
    default=DEFAULT_RETRIEVAL_MIX,
    show_default=True,
    help="Share of training rows that are retrieval samples built from your text (passkey, multi-key, document "
    "Q&A, recall); 0: your text alone.",
)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--pose", is_flag=True, help="PoSE: train in the original window with skipped position ids.")
@click.option("--pose-chunks", type=int, default=2, show_default=True)
@click.option(
    "--whole-documents",
    is_flag=True,
    help="Never cut a document shorter than a row: pad the row instead (padding is not trained on).",
)
@click.option("--lora", "use_lora", is_flag=True, help="Train LoRA adapters (peft) instead of every weight.")
@click.option("--lora-rank", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank).")
@click.option(
    "--lora-targets",
    default=None,
    help="Comma-separated projections to adapt (default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).",
)
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True, help="Rows per micro-step per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: YaRN's, scaled to the model).")
@click.option("--schedule", type=click.Choice(["cosine", "linear"]), default="cosine", show_default=True)
@click.option(
    "--seq-len",
    type=int,
    default=None,
    help="Training row length (default: target, or original with PoSE; keep: the checkpoint's context, at most 32768).",
)
@click.option("--grad-checkpointing", is_flag=True, help="Recompute layers in backward (less memory).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option(
    "--holdout",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of the text held out for a loss: whole documents, or chunks of one long file.",
)
@click.option("--save-every", type=int, default=None, help="Save a resumable checkpoint every N steps.")
@click.option("--eval-every", type=int, default=None, help="Held-out loss every N steps (always at the end).")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the output folder.")
@click.option("--force", is_flag=True, help="Start over in an output folder that holds another run.")
@click.option("--rescale", is_flag=True, help="Allow scaling an already scaled checkpoint again.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--gguf",
    "gguf_type",
    default=None,
    metavar="OUTTYPE",
    help="Also write OUTPUT/model.OUTTYPE.gguf (f16, q8_0, Q4_K_M, ...) with the fine-tuned rope, ready for ask.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def finetune(
    checkpoint: str,
    data: tuple[str, ...],
    out_dir: str,
    as_json: bool,
    use_lora: bool,
    lora_rank: int,
    lora_alpha: float | None,
    lora_targets: str | None,
    gguf_type: str | None,
    **options: Any,
) -> None:
    """Fine-tune CHECKPOINT (an HF folder) with a scaled rope, or its own (--rope keep); the output's config carries
    the rope."""
    from edgerope.train.finetune import finetune as run_finetune
    from edgerope.train.lora import LoraSettings

    lora = None
    if use_lora:
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip()) if lora_targets else None
        lora = LoraSettings(lora_rank, lora_alpha, **({"targets": targets} if targets else {}))
    with step_progress("finetune", enabled=not as_json) as progress:
        report = run_finetune(
            checkpoint, out_dir, data=list(data), lora=lora, gguf=gguf_type, progress=progress, **options
        )
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    if as_json:
        echo_json(report.to_dict())
        return
    _summary(report)


def _summary(report: Any) -> None:
    held = report.heldout_losses[-1][1] if report.heldout_losses else None
    d = report.data
    click.echo(f"rope:        {report.rope}, context {report.original_context} -> {report.target_context}")
    click.echo(
        f"data:        {d['files']} file(s), {d['documents']} document(s), {d['tokens']} tokens; "
        f"held out: {d['heldout_text']}"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in d.get("retrieval_rows_by_first_sample", {}).items() if v)
    click.echo(
        f"rows:        {d['rows']['text']} of your text, {d['rows']['retrieval']} of retrieval samples built from it"
        + (f" (first samples: {kinds})" if kinds else " (--retrieval-mix 0)")
    )
    trained = (
        f"LoRA rank {report.lora['rank']}, {report.trainable_params} parameters" if report.lora else "every weight"
    )
    click.echo(
        f"trained:     {report.steps} steps, seq_len {report.seq_len}{' (PoSE)' if report.pose else ''}, "
        f"{report.tokens} tokens, {trained}, {report.seconds:.1f} s, {report.tokens_per_s:.0f} tok/s"
    )
    click.echo(
        f"loss:        {report.losses[0]:.4f} -> {report.losses[-1]:.4f}"
        + (f", held-out {held:.4f}" if held is not None else ", held-out: none (--holdout 0)")
    )
    click.echo(
        f"memory:      peak {report.peak_memory_bytes / 2**20:.0f} MiB "
        f"(estimate {report.memory_estimate_bytes / 2**20:.0f} MiB), {report.device}, {report.precision}"
    )
    click.echo(f"output:      {report.output_dir}{' (LoRA adapter)' if report.lora else ''}")
    if report.gguf:
        g = report.gguf
        click.echo(
            f"gguf:        {g['path']} ({g['outtype']}, {g['bytes'] / 1e6:.1f} MB, context {g['context_length']})"
        )
        click.echo(f'next:        edgerope ask {g["path"]} --doc FILE --question "..."')
