"""Figures the studies share: example rows (image, then word maps) and labelled bar charts.

All figures use matplotlib's object-oriented API (no pyplot state), like `headscope.viz`.
"""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from headscope.viz import HEAT_ALPHA, HEAT_CMAP, _as_pixels, _wrap

PAPER_COLOR = "#bbbbbb"
OURS_COLOR = "#3b6fb6"
OTHER_COLOR = "#d9822b"


def example_figure(rows: list[dict], title: str, note: str = "", max_columns: int = 8) -> Figure:
    """One row per example prompt: its image, then one panel per word map (long prompts wrap).

    rows: [{"image": PIL | [H, W, 3], "prompt": str, "panels": [(label, map [H, W] or None), ...]}];
    maps are drawn min-max normalised over the image, with the tau contour when "tau" is in the row.
    """
    lines = []  # (row, panels of this line, first line of the row?)
    for row in rows:
        panels = list(row["panels"])
        chunks = [panels[start:start + max_columns] for start in range(0, max(len(panels), 1), max_columns)]
        lines += [(row, chunk, number == 0) for number, chunk in enumerate(chunks)]
    columns = 1 + max((len(chunk) for _, chunk, _ in lines), default=0)
    figure = Figure(figsize=(2.1 * columns + 0.4, 2.35 * len(lines) + 0.9), layout="constrained")
    grid = figure.subplots(len(lines), columns, squeeze=False)
    for axes_row, (row, chunk, first) in zip(grid, lines):
        pixels = _as_pixels(row["image"])
        if first:
            axes_row[0].imshow(pixels)
            axes_row[0].set_title(_wrap(f'"{row["prompt"]}"', 28), fontsize=8)
        for axes, (label, heat) in zip(axes_row[1:], chunk):
            axes.imshow(pixels)
            if heat is not None:
                heat = _normalised(heat)
                axes.imshow(heat, cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0,
                            extent=(-0.5, pixels.shape[1] - 0.5, pixels.shape[0] - 0.5, -0.5))
                if "tau" in row:
                    axes.contour(np.linspace(0, pixels.shape[1] - 1, heat.shape[1]),
                                 np.linspace(0, pixels.shape[0] - 1, heat.shape[0]), heat,
                                 levels=[row["tau"]], colors="white", linewidths=0.8)
            axes.set_title(label, fontsize=8)
        for axes in axes_row:
            axes.set_axis_off()
        for axes in axes_row[1 + len(chunk):]:
            axes.set_visible(False)
    figure.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return figure


def bars(axes, labels: list[str], values: list, *, errors=None, counts=None, color=OURS_COLOR,
         offset: float = 0.0, width: float = 0.8, label: str | None = None):
    """Bars at x = 0..n-1 (+ offset); None values are left out and marked 'n/a'; counts printed as n=."""
    xs = np.arange(len(labels)) + offset
    shown = [value if value is not None else 0.0 for value in values]
    yerr = None if errors is None else [error or 0.0 for error in errors]
    drawn = axes.bar(xs, shown, width=width, color=color, label=label, yerr=yerr, capsize=2 if yerr else 0)
    for x, value, count, error in zip(xs, values, counts or [None] * len(values), yerr or [0.0] * len(values)):
        text = "n/a" if value is None else f"{value:.2f}"
        if count is not None:
            text += f"\nn={count}"
        axes.text(x, (value or 0.0) + error + 0.01, text, ha="center", va="bottom", fontsize=6.5)
    axes.set_xticks(np.arange(len(labels)))
    axes.set_xticklabels(labels, fontsize=8)
    return drawn


def standard_error(values) -> float | None:
    values = [float(value) for value in values if value is not None]
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def _normalised(heat) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    low, high = float(heat.min()), float(heat.max())
    return np.zeros_like(heat) if high <= low else (heat - low) / (high - low)
