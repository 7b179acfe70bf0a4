"""Figures of the guidance study: a summary over scales, the images per scale, where the direction acts."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure

from headscope.viz import _as_pixels, _wrap

MAX_PROMPTS = 6


def summary_figure(summary: dict) -> Figure:
    """Four panels: accuracy and map concentration per scale; direction size and share on objects per step."""
    table = summary["table"]
    scales = [row["scale"] for row in table]
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(scales)))
    figure = Figure(figsize=(11.0, 7.6), layout="constrained")
    (accuracy, concentration), (size, where) = figure.subplots(2, 2)

    lines = (("one_object", "o", "one object: colour, shape, size, position (mean)"),
             ("color", "s", "one object: colour"), ("shape", "^", "one object: shape"),
             ("position", "D", "one object: position"),
             ("two_objects", "P", "two objects: both drawn with the right colour"),
             ("both_present", "X", "two objects: both drawn"))
    for name, marker, label in lines:
        values = [row.get(name) for row in table]
        if any(value is not None for value in values):
            accuracy.plot(scales, [np.nan if v is None else v for v in values], marker=marker, label=label,
                          linewidth=2.2 if name in ("one_object", "two_objects") else 1.0,
                          linestyle="--" if name.startswith(("two", "both")) else "-")
    if not accuracy.lines:
        accuracy.text(0.5, 0.5, "no annotator for this model\n(attribute accuracy needs the shapes world)",
                      ha="center", va="center", transform=accuracy.transAxes, fontsize=9)
    else:
        accuracy.legend(fontsize=7)
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_xlabel("guidance scale")
    accuracy.set_ylabel("share of images read back right")
    accuracy.set_title("Does the image follow the prompt? (annotator)", fontsize=9)

    concentration.plot(scales, [_nan(row["noun_coverage"]) for row in table], marker="o",
                       label="share of the image the nouns' maps cover (>= tau)")
    concentration.plot(scales, [_nan(row["noun_entropy"]) for row in table], marker="s",
                       label="normalised entropy of the nouns' maps (1 = flat)")
    concentration.set_ylim(0, 1.05)
    concentration.set_xlabel("guidance scale")
    concentration.set_ylabel("lower = more concentrated")
    concentration.legend(fontsize=7)
    concentration.set_title("How concentrated are the word maps?", fontsize=9)

    for color, scale in zip(colors, scales):
        curve = summary["per_step"][str(scale)]["direction_relative"]
        if curve:
            size.plot(range(len(curve)), curve, color=color, label=f"scale {scale:g}")
    size.set_xlabel("denoising step (0 = pure noise)")
    size.set_ylabel("RMS(prompted - unprompted)\n/ RMS(unprompted)")
    size.set_title("How large is the guidance direction, step by step?", fontsize=9)
    if size.lines:
        size.legend(fontsize=7)
    else:
        size.text(0.5, 0.5, "no scale above 1: no unprompted pass", ha="center", va="center",
                  transform=size.transAxes)

    area = [row["object_area"] for row in table if row["object_area"] is not None]
    for color, scale in zip(colors, scales):
        curve = summary["per_step"][str(scale)]["direction_on_objects"]
        if curve:
            where.plot(range(len(curve)), curve, color=color, label=f"scale {scale:g}")
    if area:
        where.axhline(float(np.mean(area)), color="black", linestyle="--", linewidth=0.8)
        where.text(0, float(np.mean(area)) + 0.01, "objects' share of the image (a flat direction's share)",
                   fontsize=7, va="bottom")
        where.set_ylim(0, 1.05)
        where.legend(fontsize=7, loc="upper right")
    else:
        where.text(0.5, 0.5, "needs the shapes annotator's object masks", ha="center", va="center",
                   transform=where.transAxes, fontsize=9)
    where.set_xlabel("denoising step (0 = pure noise)")
    where.set_ylabel("share of the direction's norm on the objects")
    where.set_title("Where does the guidance direction act?", fontsize=9)
    figure.suptitle("Classifier-free guidance: prediction = unprompted + scale x (prompted - unprompted)",
                    fontsize=11)
    return figure


def image_grid_figure(records: list[dict], store, scales: list[float]) -> Figure:
    """Images of the first prompts (rows) at every scale (columns), same starting noise per row."""
    by_prompt = _by_prompt(records)
    figure = Figure(figsize=(1.7 * len(scales) + 2.4, 1.8 * len(by_prompt) + 0.8), layout="constrained")
    grid = figure.subplots(len(by_prompt), len(scales), squeeze=False)
    for axes_row, (prompt, row_records) in zip(grid, by_prompt.items()):
        for axes, scale in zip(axes_row, scales):
            record = row_records.get(scale)
            image = store.image(record["key"]) if record else None
            if image is not None:
                axes.imshow(image)
            verdict = "" if not record or record["accuracy"] is None else f"  ({record['accuracy']:.0%} right)"
            axes.set_title(f"scale {scale:g}{verdict}", fontsize=7)
            axes.set_axis_off()
        axes_row[0].text(-0.08, 0.5, _wrap(prompt, 22), transform=axes_row[0].transAxes, ha="right", va="center",
                         fontsize=7)
    figure.suptitle("The same prompt and starting noise at each guidance scale", fontsize=10)
    return figure


def direction_maps_figure(records: list[dict], store, scales: list[float]) -> Figure | None:
    """Per prompt and scale, the image with the step-averaged guidance-direction norm on top."""
    by_prompt = _by_prompt(records, limit=4)
    guided = [scale for scale in scales if any(store.arrays(r["key"]).get("direction") is not None
                                               for rows in by_prompt.values() for s, r in rows.items() if s == scale)]
    if not guided:
        return None
    figure = Figure(figsize=(1.9 * len(guided) + 2.4, 1.95 * len(by_prompt) + 1.0), layout="constrained")
    grid = figure.subplots(len(by_prompt), len(guided), squeeze=False)
    shown = None
    for axes_row, (prompt, row_records) in zip(grid, by_prompt.items()):
        for axes, scale in zip(axes_row, guided):
            record = row_records.get(scale)
            image = store.image(record["key"]) if record else None
            direction = store.arrays(record["key"]).get("direction") if record else None
            axes.set_axis_off()
            if image is None or direction is None:
                continue
            pixels = _as_pixels(image)
            heat = torch.from_numpy(direction.astype(np.float32))
            heat = F.interpolate(heat[None, None], size=pixels.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            heat = (heat / heat.max().clamp_min(1e-12)).numpy()
            axes.imshow(pixels)
            shown = axes.imshow(heat, cmap="magma", alpha=0.6, vmin=0, vmax=1)
            axes.set_title(f"scale {scale:g}", fontsize=7)
        axes_row[0].text(-0.08, 0.5, _wrap(prompt, 22), transform=axes_row[0].transAxes, ha="right", va="center",
                         fontsize=7)
    if shown is not None:
        figure.colorbar(shown, ax=grid.ravel().tolist(), shrink=0.6,
                        label="|prompted - unprompted| per pixel,\naveraged over steps (1 = its maximum)")
    figure.suptitle("Where the guidance direction acts (bright = large)", fontsize=10)
    return figure


def _by_prompt(records: list[dict], limit: int = MAX_PROMPTS) -> dict:
    """{prompt: {scale: record}} for the first `limit` prompts, in prompt order."""
    rows: dict = {}
    for record in sorted(records, key=lambda r: r["prompt_index"]):
        if record["prompt_index"] < limit:
            rows.setdefault(record["prompt"], {})[record["scale"]] = record
    return rows


def _nan(value):
    return np.nan if value is None else value
