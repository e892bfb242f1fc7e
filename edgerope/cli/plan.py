"""``edgerope plan``: the memory llama.cpp needs for a GGUF and the largest context that fits."""

from __future__ import annotations

import click

from edgerope.cli._common import echo_json, handle_errors


@click.command("plan")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--ctx", "n_ctx", type=int, default=None, help="Context length (default: the largest that fits).")
@click.option("--kv", "kv", default=None, help="Cache type for both K and V (f16, q8_0, q4_0, ...).")
@click.option("--kv-k", "kv_k", default=None, help="K cache type (overrides --kv).")
@click.option("--kv-v", "kv_v", default=None, help="V cache type (overrides --kv).")
@click.option("--memory", default=None, help='Memory budget, e.g. "8GiB", "512MiB" (default: MemAvailable - 10%).')
@click.option("--batch", "n_batch", type=int, default=512, show_default=True, help="n_batch (= n_ubatch).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def plan(
    model: str,
    n_ctx: int | None,
    kv: str | None,
    kv_k: str | None,
    kv_v: str | None,
    memory: str | None,
    n_batch: int,
    as_json: bool,
) -> None:
    """Plan weights + KV cache + compute memory for MODEL (a GGUF) and the largest context per cache type."""
    from edgerope.runtime.plan import plan_memory
    from edgerope.system.memory import format_bytes

    p = plan_memory(
        model,
        n_ctx=n_ctx,
        type_k=kv_k or kv or "f16",
        type_v=kv_v or kv or "f16",
        memory_budget=memory,
        n_batch=n_batch,
        n_ubatch=n_batch,
    )
    if as_json:
        echo_json(p.to_dict())
        return
    fa = "on" if p.flash_attn else "off"
    click.echo(f"{p.path}  ({p.architecture}, context_length {p.n_ctx_train})")
    click.echo(f"n_ctx {p.n_ctx} (allocated {p.n_ctx_allocated}), K {p.type_k}, V {p.type_v}, flash attention {fa}")
    rows = [
        ("weights (mapped)", p.weights_bytes),
        ("KV cache", p.kv_bytes),
        ("compute buffer (est.)", p.compute_bytes),
        ("output buffer", p.output_bytes),
        ("CPU work buffer (est.)", p.work_bytes),
        ("overhead", p.overhead_bytes),
        ("total", p.total_bytes),
    ]
    for name, n in rows:
        click.echo(f"  {name:<22} {format_bytes(n):>12}")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    click.echo(f"budget {format_bytes(p.budget_bytes)} ({p.budget_source}): {verdict}")
    click.echo("largest context per cache type (K = V):")
    for t, r in p.largest_ctx.items():
        why = "model's context_length" if r["limited_by"] == "model" else "memory"
        click.echo(f"  {t:<10} {r['n_ctx']:>9}  (limited by {why})")
    for note in p.notes:
        click.echo(f"note: {note}")
