"""``edgerope inspect``: what llama.cpp will compute from a GGUF, and lint findings (formats ``inspect_gguf``)."""

from __future__ import annotations

from typing import Any

import click

from edgerope.cli._common import echo_json, handle_errors

COLORS = {"error": "red", "warning": "yellow", "info": "cyan"}


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _section(title: str) -> None:
    click.secho(title, bold=True)


def _row(label: str, value: Any) -> None:
    click.echo(f"  {label:<22} {value}")


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=True, path_type=str))
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=None, help="Context llama.cpp would allocate.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def inspect(file: str, n_ctx: int | None, as_json: bool) -> None:
    """Show what llama.cpp will compute from FILE (any GGUF) and lint it.

    Exit code 0 even with findings; 2 when FILE cannot be read as a GGUF.
    """
    from edgerope.gguf.inspect import inspect_gguf

    r = inspect_gguf(file, n_ctx=n_ctx)
    if as_json:
        echo_json(r.to_dict())
        return
    _section("File")
    _row("path", r.path)
    _row("size", f"{_bytes(r.file_size)} (GGUF v{r.gguf_version}, {r.n_tensors} tensors)")
    _section("Model")
    _row("architecture", r.architecture)
    if r.name:
        _row("name", r.name)
    _row("parameters", _count(r.n_parameters))
    types = ", ".join(f"{t} x{v['count']} ({_bytes(v['bytes'])})" for t, v in r.tensor_types.items())
    _row("tensor types", types or "none")
    if r.hparams:
        h = r.hparams
        _row("layers / width", f"{h['n_layers']} / {h['n_embd']}")
        _row("heads (q / kv)", f"{h['n_head']} / {h['n_head_kv']}")
        _row("head dim (k / v)", f"{h['head_dim_k']} / {h['head_dim_v']}")
        _row("vocab", h["n_vocab"])
    _section("Context")
    _row("trained", r.context_trained)
    _row("original", r.context_original)
    _row("effective (allocated)", f"{r.context_effective}" + ("" if n_ctx else " (n_ctx=0: the trained context)"))
    if r.rope:
        p = r.rope
        _section("RoPE (as llama.cpp computes it)")
        click.echo(f"  {p.summary}")
        key_note = "" if p.scaling_type_key_present else " (key absent: llama.cpp's default)"
        _row("rotation", f"{p.rotation} over {p.n_rot} dims")
        _row("scaling type", p.scaling_type + key_note)
        _row("freq_base", f"{p.freq_base:g}")
        _row("factor / freq_scale", f"{p.factor:g} / {p.freq_scale:.6g}")
        _row("ext_factor", f"{p.ext_factor:g}")
        _row("magnitude m", f"{p.magnitude:.6g} (kernel attn_factor {p.attn_factor:.6g})")
        _row("beta fast / slow", f"{p.beta_fast:g} / {p.beta_slow:g}")
        _row("n_ctx_orig", p.n_ctx_orig)
        if p.freq_factors:
            ff = p.freq_factors
            _row("frequency factors", f"{ff['tensor']}: {ff['min']:.4g}..{ff['max']:.4g}, {ff['pairs_not_1']} != 1")
        _row("wavelengths", f"{p.wavelength_min:.4g} .. {p.wavelength_max:.4g} positions")
        slow = p.pairs["beyond_original_context"]
        _row("slow pairs", f"{slow} of {p.pairs['count']} turn less than once within {p.n_ctx_orig} positions")
    if r.kv:
        k = r.kv
        _section("KV cache (K and V of the same type)")
        _row("per token", ", ".join(f"{t} {_bytes(b)}" for t, b in k.bytes_per_token.items()))
        for ctx, by_type in k.bytes_at_context.items():
            _row(f"at n_ctx {ctx}", ", ".join(f"{t} {_bytes(b)}" for t, b in by_type.items()))
        for note in k.notes:
            click.echo(f"  note: {note}")
    counts = ", ".join(f"{r.count(s)} {s}" for s in COLORS)
    _section(f"Findings ({counts})")
    if not r.findings:
        click.echo("  none")
    for fnd in r.findings:
        click.secho(f"  {fnd.severity.upper():<7} [{fnd.code}] {fnd.message}", fg=COLORS[fnd.severity])
        if fnd.fix:
            click.echo(f"          fix: {fnd.fix}")
