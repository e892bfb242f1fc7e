"""Reporting the context-extension experiment (``edgerope.recipes.extend``): its results as a text table and a plot.

What it does not do: run or measure anything; it reads an ``ExtensionReport``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgerope.recipes.extend import DATA

if TYPE_CHECKING:
    from edgerope.recipes.extend import ExtensionReport


def _lengths(report: ExtensionReport) -> list[int]:
    return sorted({n for r in report.results for n in r.passkey_by_length})


def format_table(report: ExtensionReport) -> str:
    """The results as a text table: passkey accuracy per length (EVAL.md's format, and the independent format when
    measured), perplexity per length, fine-tuning cost; then which data each fine-tuned variant used."""
    lengths = _lengths(report)
    ind = sorted({n for r in report.results for n in r.independent_by_length})
    ppl = sorted({n for r in report.results for n in r.perplexity})
    head = f"{'variant':<26}{'ctx':>6}" + "".join(f"{'pk@' + str(n):>9}" for n in lengths)
    head += "".join(f"{'ipk@' + str(n):>9}" for n in ind)
    head += "".join(f"{'ppl@' + str(n):>10}" for n in ppl) + f"{'train tok/s':>13}{'train MiB':>11}{'train s':>9}"
    rows = [head]
    for r in report.results:
        cells = "".join(
            f"{100 * r.passkey_by_length[n]:>8.0f}%" if n in r.passkey_by_length else f"{'-':>9}" for n in lengths
        )
        cells += "".join(
            f"{100 * r.independent_by_length[n]:>8.0f}%" if n in r.independent_by_length else f"{'-':>9}" for n in ind
        )
        cells += "".join(f"{r.perplexity[n]:>10.2f}" if n in r.perplexity else f"{'-':>10}" for n in ppl)
        ft = r.finetune
        if ft:
            cells += f"{ft['tokens_per_s']:>13.0f}{ft['training_memory_bytes'] / 2**20:>11.0f}{ft['seconds']:>9.1f}"
        else:
            cells += f"{'-':>13}{'-':>11}{'-':>9}"
        rows.append(f"{r.name:<26}{r.context_length:>6}{cells}")
    trials = report.settings["trials"] * len(report.settings["depths"])
    depths = ", ".join(f"{d:g}" for d in report.settings["depths"])
    n_max = max(ppl) if ppl else 0
    fmt = " in EVAL.md's format" if ind else ""
    rows.append(
        f"\npk@N: passkey accuracy{fmt}, prompt and answer within N tokens ({trials} trials per length, key at depths "
        f"{depths})."
        + (
            "\nipk@N: the same in the independent format (its own intro, filler, needle, question and key range; no "
            "training data holds it)."
            if ind
            else ""
        )
        + f"\nppl@N: perplexity of the first {n_max} tokens of held-out documentation (never trained on), "
        f"read through a window of N tokens (ppl@{n_max}: one pass).\nGGUF {report.settings['weights']} weights, "
        f"KV cache {report.settings['kv']}, llama.cpp.  train MiB: memory growth while fine-tuning (peak RSS)."
    )
    recipes = {r.name: r.data for r in report.results if r.data}
    if ind or set(recipes.values()) - {DATA["jsonl"]}:
        rows.append("fine-tuning data:\n" + "\n".join(f"  {n}: {d}" for n, d in recipes.items()))
    return "\n".join(rows)


def save_plot(report: ExtensionReport, out: str | Path, *, title: str = "") -> Path:
    """Two panels: passkey accuracy by prompt length and perplexity by length, one line per variant."""
    from edgerope.evaluation.plots import Line, Panel, save_panels

    acc = [
        Line(
            r.name,
            [float(n) for n in sorted(r.passkey_by_length)],
            [r.passkey_by_length[n] for n in sorted(r.passkey_by_length)],
        )
        for r in report.results
    ]
    ppl = [
        Line(r.name, [float(n) for n in sorted(r.perplexity)], [r.perplexity[n] for n in sorted(r.perplexity)])
        for r in report.results
        if r.perplexity
    ]
    panels = [Panel("passkey retrieval in llama.cpp", "prompt length (tokens)", "accuracy", acc, log_x=True)]
    if ppl:
        panels.append(
            Panel("held-out perplexity", "context window (tokens)", "perplexity", ppl, log_x=True, log_y=True)
        )
    return save_panels(out, panels, title=title).path
