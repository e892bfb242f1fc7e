"""``edgerope pretrain``: rebuild the built-in tiny model from its recipe (``edgerope.recipes.pretrain``)."""

from __future__ import annotations

from pathlib import Path

import click

from edgerope.cli._common import echo_json, handle_errors, step_progress


@click.command("pretrain")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: the recipe's).")
@click.option("--seed", type=int, default=None, help="Seed (default: the recipe's).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--force", is_flag=True, help="Write into a folder that already holds files.")
@click.option("--json", "as_json", is_flag=True, help="Print recipe.json as JSON.")
@handle_errors
def pretrain(out_dir: Path, steps: int | None, seed: int | None, device: str, force: bool, as_json: bool) -> None:
    """Pretrain the built-in tiny model (a small Llama at context 256) into OUT_DIR, deterministically.

    The recipe, loss curve and machine are written to OUT_DIR/recipe.json.  About 45 minutes on 2 CPU cores,
    3 on a GPU; the same seed gives the same weights on the same device.
    """
    from dataclasses import replace

    from edgerope.errors import OutputError
    from edgerope.models.builtin import recipe, write_manifest
    from edgerope.recipes.pretrain import TinyRecipe
    from edgerope.recipes.pretrain import pretrain as run_pretrain

    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputError("the output folder is not empty", where=str(out_dir), fix="pass --force or a new folder")
    r = TinyRecipe()
    r = replace(r, steps=steps if steps is not None else r.steps, seed=seed if seed is not None else r.seed)
    with step_progress("pretrain", enabled=not as_json) as progress:
        run_pretrain(out_dir, r, device=device, progress=progress)
    write_manifest(out_dir)
    info = recipe(out_dir)
    if as_json:
        echo_json(info)
        return
    click.echo(
        f"{info['parameters']:,} parameters, {info['tokens']:,} tokens in {info['seconds']:.0f} s; "
        f"final loss {info['final_loss']:.3f}; written to {out_dir}"
    )
