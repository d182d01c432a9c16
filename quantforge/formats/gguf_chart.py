"""The card's quality-per-byte chart: every published file's mean KL divergence from the source against its size,
with the stock frontier the variants are gated against (gguf_frontier.py), as a PNG in the repo.

Drawn with matplotlib's object API on its Agg canvas: no pyplot, no display, no global backend state; the PNG
carries no date or version, so the same figures give the same bytes (and a republish uploads nothing new).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from .gguf_frontier import Point, frontier

CHART_FILE = "kld-vs-size.png"
_STOCK, _VARIANT, _LINE = "#4c72b0", "#dd8452", "#8c8c8c"


def render_chart(stock: Sequence[Point], variants: Sequence[Point], path: Path, title: str) -> Path:
    """Mean KLD (log scale) against size in MB: stock files as dots on their frontier, variants as diamonds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    front = frontier(stock)
    if len(front) > 1:
        # straight in (size, KLD), as the gate interpolates: sampled, since the KLD axis is logarithmic
        xs, ys = [], []
        for a, b in pairwise(front):
            for i in range(33):
                t = i / 32
                xs.append((a.size + (b.size - a.size) * t) / 1e6)
                ys.append(a.kld + (b.kld - a.kld) * t)
        axes.plot(xs, ys, color=_LINE, linewidth=1, linestyle="--", label="stock frontier", zorder=1)
    for points, color, marker, label in ((stock, _STOCK, "o", "stock type"), (variants, _VARIANT, "D", "variant")):
        shown = [p for p in points if p.kld > 0]
        if not shown:
            continue
        axes.scatter([p.size / 1e6 for p in shown], [p.kld for p in shown], color=color, marker=marker, s=36,
                     label=label, zorder=2)
        for p in shown:
            axes.annotate(p.name, (p.size / 1e6, p.kld), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set_yscale("log")
    axes.set_xlabel("file size (MB)")
    axes.set_ylabel("mean KL divergence from the source")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", linewidth=0.3, alpha=0.5)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    return path
