"""PNG plots of evaluation results: passkey accuracy heatmaps and curves by position or length.

What it does:

* ``heatmap_data`` / ``perplexity_lines`` / ``accuracy_lines`` turn results
  (``edgerope.evaluation.protocols.GridResult`` / ``Perplexity``) into plain plot data
  (``Heatmap``, ``Line``), so what a plot shows can be checked without pixels;
* ``save_heatmaps`` (one panel per model, length x depth) and ``save_lines``
  (one line per series) draw that data with matplotlib's Agg backend, write
  the PNG to a temp file beside the output, check it and rename it.

What it does not do: decide file names, overwrite checks (``edgerope.system.files``
does, in the caller), or import matplotlib before a plot is drawn: without
matplotlib ``PlottingUnavailable`` says how to install it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerope.errors import EdgeropeError, OutputError
from edgerope.evaluation.protocols import GridResult, Perplexity
from edgerope.system.files import partial_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PlottingUnavailable(EdgeropeError):
    """matplotlib is not installed, so no PNG can be drawn."""


@dataclass(frozen=True)
class Heatmap:
    """One panel: accuracy[i_length, i_depth] in [0, 1] with the trials behind each cell."""

    title: str
    lengths: list[int]
    depths: list[float]
    accuracy: np.ndarray  # (n_lengths, n_depths)
    trials: np.ndarray  # (n_lengths, n_depths)


@dataclass(frozen=True)
class Line:
    """One curve: ``x`` against ``y`` with a legend label."""

    label: str
    x: list[float]
    y: list[float]


@dataclass(frozen=True)
class PlotInfo:
    """What was written: the PNG, its size, and how many panels/cells/lines it draws."""

    path: Path
    bytes: int
    panels: int
    cells: int
    lines: int


def heatmap_data(grid: GridResult, *, title: str) -> Heatmap:
    """The (length x depth) accuracy matrix of a passkey grid."""
    lengths = sorted({c.length for c in grid.cells})
    depths = sorted({float(c.depth) for c in grid.cells if c.depth is not None})
    if not depths:
        raise OutputError("a heatmap needs a grid with depths (the passkey task)")
    acc = np.full((len(lengths), len(depths)), np.nan)
    n = np.zeros((len(lengths), len(depths)), dtype=int)
    for c in grid.cells:
        i, j = lengths.index(c.length), depths.index(float(c.depth))
        acc[i, j], n[i, j] = c.accuracy, c.trials
    return Heatmap(title, lengths, depths, acc, n)


def perplexity_lines(results: dict[int, Perplexity], *, label: str = "") -> list[Line]:
    """Perplexity (exp of the bucket's mean NLL) by target position bucket, one line per length."""
    out = []
    for length, r in sorted(results.items()):
        keys = sorted(r.bucket_nll)
        name = f"{label} L={length}" if label else f"L={length}"
        out.append(Line(name, [float(k) for k in keys], [float(np.exp(r.bucket_nll[k])) for k in keys]))
    return out


def accuracy_lines(grid: GridResult, *, label: str) -> list[Line]:
    """Retrieval accuracy by length (one line)."""
    by = grid.by_length()
    return [Line(label, [float(k) for k in sorted(by)], [by[k] for k in sorted(by)])]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlottingUnavailable(
            "matplotlib is not installed, so no plot can be drawn", fix="pip install 'matplotlib>=3.7'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> int:
    """Write ``fig`` to ``out`` atomically (temp + rename) after checking the PNG signature; its size."""
    plt = _pyplot()
    tmp = partial_path(out, "png")
    try:
        try:
            fig.savefig(tmp, format="png", dpi=100)
        except OSError as exc:
            raise OutputError(f"cannot write the plot: {exc.strerror}", where=str(out)) from None
        with open(tmp, "rb") as f:
            head = f.read(len(PNG_MAGIC))
        size = tmp.stat().st_size
        if head != PNG_MAGIC or size < 1000:
            raise OutputError("the plot written is not a valid PNG", where=str(out))
        os.replace(tmp, out)
        return size
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def save_heatmaps(out: str | Path, panels: Sequence[Heatmap], *, title: str) -> PlotInfo:
    """A PNG with one length x depth heatmap per panel, each cell labelled with its accuracy in percent."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 4.2 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        im = ax.imshow(p.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(p.depths)), [f"{d:g}" for d in p.depths])
        ax.set_yticks(range(len(p.lengths)), [str(n) for n in p.lengths])
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("prompt length (tokens)")
        ax.set_title(p.title, fontsize=9)
        for i in range(len(p.lengths)):
            for j in range(len(p.depths)):
                ax.text(j, i, f"{100 * p.accuracy[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(title, fontsize=10)
    size = _save(fig, Path(out))
    cells = sum(p.accuracy.size for p in panels)
    return PlotInfo(Path(out), size, len(panels), cells, 0)


@dataclass(frozen=True)
class Panel:
    """One axes of a multi-panel figure: its lines, labels and log axes."""

    title: str
    xlabel: str
    ylabel: str
    lines: Sequence[Line]
    log_x: bool = False
    log_y: bool = False


def save_panels(out: str | Path, panels: Sequence[Panel], *, title: str = "") -> PlotInfo:
    """A PNG with the panels side by side, one marked line per ``Line`` (log axes in base 2 / 10)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(0.4 + 5.6 * len(panels), 4.0), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        for line in p.lines:
            ax.plot(line.x, line.y, marker="o", markersize=3, label=line.label)
        if p.log_x:
            ax.set_xscale("log", base=2)
        if p.log_y:
            ax.set_yscale("log")
        ax.set_xlabel(p.xlabel)
        ax.set_ylabel(p.ylabel)
        ax.set_title(p.title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    size = _save(fig, Path(out))
    return PlotInfo(Path(out), size, len(panels), 0, sum(len(p.lines) for p in panels))


def save_lines(out: str | Path, lines: Sequence[Line], *, title: str, xlabel: str, ylabel: str) -> PlotInfo:
    """A PNG with one marked line per ``Line``."""
    return save_panels(out, [Panel(title, xlabel, ylabel, lines)])
