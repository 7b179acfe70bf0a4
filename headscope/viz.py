"""Figures: a word's map over its image, a grid of every word, a layer x head grid of per-head maps.

Built on matplotlib's object-oriented API (`matplotlib.figure.Figure`, rendered by Agg), so nothing
here changes the user's pyplot backend. `save_figure` writes atomically (temporary file, then
`os.replace`).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from headscope.maps.daam import normalize
from headscope.io import atomic_path

HEAT_CMAP = "jet"
HEAT_ALPHA = 0.45
HEAT_LABEL = "attention to the word\n(normalised: 0 = least, 1 = most)"
SHARE_LABEL = "the concept's share of the pixel\n(softmax over the concepts; all sum to 1)"


def overlay_figure(image, heat_map: torch.Tensor, *, word: str, prompt: str, method: str = "DAAM heat map",
                   shares: bool = False) -> Figure:
    """One word's heat map [H, W] over its image, with a title ("<method> of <word>") and a colour bar.
    `shares`: the map is a share in [0, 1] (concept maps, a softmax over concepts), shown as it is, not
    normalised."""
    figure = Figure(figsize=(5.6, 5.0), layout="constrained")
    axes = figure.add_subplot()
    pixels = _as_pixels(image)
    shown = _draw_overlay(axes, pixels, heat_map, normalised=not shares)
    axes.set_title(f'{method} of "{word}"\n' + _wrap(f'prompt: "{prompt}"', 60), fontsize=10)
    figure.colorbar(shown, ax=axes, shrink=0.8, label=SHARE_LABEL if shares else HEAT_LABEL)
    return figure


def word_grid_figure(image, word_maps: dict[str, torch.Tensor], *, prompt: str,
                     question: str = "Which pixels attend to each word", shares: bool = False) -> Figure:
    """The image, then one panel per word with its heat map [H, W] overlaid (each map normalised; with
    `shares`, maps of shares in [0, 1] on one scale, as they are)."""
    n_panels = 1 + len(word_maps)
    columns = min(4, n_panels)
    rows = -(-n_panels // columns)
    figure = Figure(figsize=(2.8 * columns + 0.9, 2.8 * rows + 0.7), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    pixels = _as_pixels(image)
    grid[0][0].imshow(pixels)
    grid[0][0].set_title("generated image", fontsize=10)
    shown = None
    for panel, (word, heat_map) in enumerate(word_maps.items(), start=1):
        axes = grid[panel // columns][panel % columns]
        shown = _draw_overlay(axes, pixels, heat_map, normalised=not shares)
        axes.set_title(f'"{word}"', fontsize=11)
    for panel in range(n_panels, rows * columns):
        grid[panel // columns][panel % columns].set_visible(False)
    for axes in grid.flat:
        axes.set_axis_off()
    figure.suptitle(_wrap(f'{question} — prompt: "{prompt}"', 90), fontsize=11)
    if shown is not None:
        figure.colorbar(shown, ax=grid.ravel().tolist(), shrink=0.6, label=SHARE_LABEL if shares else HEAT_LABEL)
    return figure


def head_grid_figure(head_maps: torch.Tensor, index, *, word: str, prompt: str, layers=None) -> Figure:
    """Per-head maps [n_heads, h, w] as a grid: one row per layer (execution order), one column per head.

    All panels share one colour scale (mean attention probability), so strong and weak heads can be
    compared at a glance. `layers` (execution indices) picks rows; default all.
    """
    chosen = [index.layers[layer] for layer in layers] if layers is not None else list(index.layers)
    columns = max(layer.heads for layer in chosen)
    maps = head_maps.detach().float().cpu()
    vmax = max(float(maps[list(layer.head_ids)].max()) for layer in chosen) or 1.0
    figure = Figure(figsize=(1.05 * columns + 3.6, 1.05 * len(chosen) + 1.3), layout="constrained")
    # column 0 holds the layer labels, columns 1.. the heads
    grid = figure.subplots(len(chosen), columns + 1, squeeze=False, width_ratios=[2.4] + [1] * columns)
    shown, titled = None, set()
    for row, layer in enumerate(chosen):
        grid[row][0].set_axis_off()
        grid[row][0].text(1.0, 0.5, f"layer {layer.index}\n{layer.label}", transform=grid[row][0].transAxes,
                          fontsize=8, ha="right", va="center")
        for head in range(columns):
            axes = grid[row][head + 1]
            axes.set_xticks([])
            axes.set_yticks([])
            if head >= layer.heads:
                axes.set_visible(False)
                continue
            shown = axes.imshow(maps[layer.offset + head].numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            axes.text(0.03, 0.97, f"#{layer.offset + head}", transform=axes.transAxes, fontsize=6,
                      color="white", va="top")
            if head not in titled:
                titled.add(head)
                axes.set_title(f"head {head}", fontsize=8)
    figure.suptitle(_wrap(f'Per-head attention to "{word}" (rows: layers in execution order; '
                          f'#n = flat head id) — prompt: "{prompt}"', 110), fontsize=10)
    figure.colorbar(shown, ax=grid[:, 1:].ravel().tolist(), shrink=0.5, label="mean attention probability")
    return figure


def comparison_figure(source, edited, source_prompt: str, target_prompt: str) -> Figure:
    """Source and edited images side by side, each titled with its prompt (prompt-to-prompt edits)."""
    figure = Figure(figsize=(8.4, 4.6), layout="constrained")
    for axes, image, title in zip(figure.subplots(1, 2), (source, edited),
                                  (f'source: "{source_prompt}"', f'edited: "{target_prompt}"')):
        axes.imshow(_as_pixels(image))
        axes.set_title(_wrap(title, 48), fontsize=10)
        axes.set_axis_off()
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `figure` to `path` atomically (format from the suffix, e.g. .png)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path


def _draw_overlay(axes, pixels: np.ndarray, heat_map: torch.Tensor, normalised: bool = True):
    """Image with the map on top (normalised to [0, 1], or clipped to it as it is), resized to the image if
    needed; returns the heat artist."""
    heat = heat_map.detach().float().cpu()
    heat = normalize(heat) if normalised else heat.clamp(0.0, 1.0)
    if tuple(heat.shape) != pixels.shape[:2]:
        heat = F.interpolate(heat[None, None], size=pixels.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    axes.imshow(pixels)
    shown = axes.imshow(heat.numpy(), cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0.0, vmax=1.0)
    axes.set_axis_off()
    return shown


def _as_pixels(image) -> np.ndarray:
    """PIL image, HWC array or CHW tensor in [0, 1] -> float array [H, W, 3] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        return (image.permute(1, 2, 0) if image.shape[0] in (1, 3) else image).clamp(0, 1).numpy()
    pixels = np.asarray(image)
    return pixels.astype(np.float32) / 255.0 if pixels.dtype == np.uint8 else pixels


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def hrv_heatmap_figure(hrv, concept: str, *, top: int = 0) -> Figure:
    """One concept's HRV as a layers x heads grid (rows: layers in execution order); top-k heads outlined."""
    index = hrv.index
    vector = hrv.vector(concept).numpy()
    columns = max(layer.heads for layer in index.layers)
    grid = np.full((index.n_layers, columns), np.nan)
    for layer in index.layers:
        grid[layer.index, :layer.heads] = vector[layer.offset:layer.offset + layer.heads]
    height = max(3.0, 0.22 * index.n_layers + 1.6)
    figure = Figure(figsize=(min(14.0, 0.42 * columns + 5.2), height), layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(grid, cmap="viridis", aspect="auto", vmin=0.0, interpolation="nearest")
    axes.set_yticks(range(index.n_layers))
    axes.set_yticklabels([f"{layer.index}: {layer.label}" for layer in index.layers],
                         fontsize=max(4, min(8, int(400 / index.n_layers))))
    axes.set_xticks(range(columns))
    axes.set_xticklabels([str(head) for head in range(columns)], fontsize=7)
    axes.set_xlabel("head within layer")
    axes.set_ylabel("cross-attention layer (execution order)")
    for head_id in hrv.top_heads(concept, min(top, hrv.n_heads)).tolist():
        layer, head = index.unflat(head_id)
        axes.add_patch(_outline(head, layer))
    if index.n_heads <= 160:
        for layer in index.layers:
            for head in range(layer.heads):
                value = grid[layer.index, head]
                axes.text(head, layer.index, f"{value:.1f}", ha="center", va="center", fontsize=6,
                          color="white" if value < np.nanmax(grid) * 0.6 else "black")
    name = hrv.concept(concept)
    subtitle = f"{hrv.n_heads} heads; mean 1 per concept; higher = more relevant"
    if top:
        subtitle += f"; red boxes: top {top}"
    axes.set_title(f'Head relevance to "{name}"\n{subtitle}', fontsize=10)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="relevance (share of votes x number of heads)")
    return figure


def hrv_similarity_figure(hrv) -> Figure:
    """Cosine similarity between the concepts' HRVs: [concepts, concepts] matrix with labels."""
    similarity = hrv.similarity().numpy()
    n_concepts = len(hrv.concepts)
    side = max(4.5, 0.32 * n_concepts + 3.0)
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(similarity, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    fontsize = max(5, min(9, int(300 / n_concepts)))
    axes.set_xticks(range(n_concepts))
    axes.set_xticklabels(hrv.concepts, rotation=60, ha="right", fontsize=fontsize)
    axes.set_yticks(range(n_concepts))
    axes.set_yticklabels(hrv.concepts, fontsize=fontsize)
    if n_concepts <= 12:
        for row in range(n_concepts):
            for column in range(n_concepts):
                value = similarity[row, column]
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="black" if value > 0.6 else "white")
    axes.set_title("How alike are the concepts' head relevance vectors?\n"
                   "cosine similarity of HRV rows (1 = same heads, 0 = disjoint heads)", fontsize=10)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="cosine similarity")
    return figure


def _outline(head: int, layer: int):
    from matplotlib.patches import Rectangle

    return Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.6)


METHOD_HEADERS = {"daam": "daam\n(all heads summed)", "selective": "selective\n(HRV's top-k heads)",
                  "weighted": "weighted\n(heads x HRV relevance)", "fitted": "fitted heads\n(best k on calibration)",
                  "concept": "concept map\n(output space)"}


def method_comparison_figure(rows: list[dict], methods, *, tau: float = 0.4) -> Figure:
    """One row per word: its image, each method's map over it, the true mask.

    rows: {"image", "word", "prompt", "source" (e.g. "generated"), "maps": {method: [H, W]},
    "scores": {method: IoU at tau}, "truth": bool [H, W]}. Each map is normalised on its own; the white
    line is its mask at `tau` (DAAM's threshold), whose IoU with the truth the panel title gives.
    """
    methods = [method for method in methods if any(method in row["maps"] for row in rows)]
    columns = 2 + len(methods)
    figure = Figure(figsize=(1.9 * columns + 1.6, 2.05 * len(rows) + 1.1), layout="constrained")
    grid = figure.subplots(len(rows), columns, squeeze=False)
    shown = None
    for number, row in enumerate(rows):
        pixels = _as_pixels(row["image"])
        panels = grid[number]
        panels[0].imshow(pixels)
        panels[0].set_title(f'{row["source"]}: "{row["word"]}"\n' + _wrap(row["prompt"], 30), fontsize=7)
        for axes, method in zip(panels[1:], methods):
            if method not in row["maps"]:
                axes.set_visible(False)
                continue
            shown = _draw_overlay(axes, pixels, row["maps"][method])
            mask = normalize(row["maps"][method].detach().float().cpu()).numpy() >= tau
            if mask.any() and not mask.all():
                axes.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
            axes.set_title(f'IoU {row["scores"][method]:.2f}', fontsize=8)
        panels[-1].imshow(np.asarray(row["truth"], bool), cmap="gray", vmin=0, vmax=1)
        panels[-1].set_title("the word's object", fontsize=8)
        for axes in panels:
            axes.set_axis_off()
    for axes, header in zip(grid[0], ["image", *(METHOD_HEADERS.get(m, m) for m in methods), "ground truth"]):
        axes.set_title(f"{header}\n\n{axes.get_title()}", fontsize=8)
    figure.suptitle(f"Word maps by method (held-out prompts and seeds); white line: the map's mask at tau = {tau}, "
                    "IoU against the object mask", fontsize=9)
    if shown is not None:
        figure.colorbar(shown, ax=grid.ravel().tolist(), location="bottom", shrink=0.35, aspect=40,
                        label="attention to the word, normalised per map (0 = least, 1 = most)")
    return figure
