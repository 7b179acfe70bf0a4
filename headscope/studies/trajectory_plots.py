"""A trajectory as a figure (chosen steps), an animated GIF (every recorded step), a distance plot and a table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from headscope.io import atomic_path
from headscope.studies.runner import coverage
from headscope.viz import HEAT_ALPHA, HEAT_CMAP, _wrap

PANEL = 160  # pixels per GIF panel


def trajectory_figure(trajectory, chosen: list[int], tau: float) -> Figure:
    """Columns: the chosen steps, then the final image. Rows: x0, rapid x0 (if any), one row per word."""
    rows = ["x0"] + (["rapid"] if trajectory.rapid_images else []) + list(trajectory.words)
    columns = len(chosen) + 1
    figure = Figure(figsize=(1.9 * columns + 1.6, 1.95 * len(rows) + 1.2), layout="constrained")
    grid = figure.subplots(len(rows), columns, squeeze=False)
    labels = {"x0": "clean-image\nestimate x0", "rapid": f"rapid: {trajectory.rapid_steps} large\nsteps to the end"}
    for axes_row, row in zip(grid, rows):
        for axes, step in zip(axes_row, chosen + [None]):
            axes.set_xticks([])
            axes.set_yticks([])
            if step is None:
                axes.imshow(trajectory.image)
                if row == rows[0]:
                    axes.set_title("final image", fontsize=8)
                elif row == "rapid":
                    axes.set_visible(False)
                else:
                    heat = trajectory.run_maps[row]
                    axes.imshow(_normalised(heat.numpy()), cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1)
                    axes.set_xlabel(f"all steps (DAAM): {coverage(heat, tau):.0%}", fontsize=7)
                continue
            if row == "x0":
                axes.imshow(trajectory.x0_images[step])
                axes.set_title(f"step {step + 1}/{trajectory.n_steps}\n(t = {trajectory.timesteps[step]})", fontsize=8)
            elif row == "rapid":
                axes.imshow(trajectory.rapid_images[step])
            else:
                heat = trajectory.maps[row][step]
                axes.imshow(trajectory.x0_images[step])
                axes.imshow(_normalised(heat.numpy()), cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1)
                axes.set_xlabel(f"covers {coverage(heat, tau):.0%}", fontsize=7)
        axes_row[0].set_ylabel(labels.get(row, f'map of\n"{row}"'), fontsize=8)
    figure.suptitle(_wrap(f'What the model predicts along the way: "{trajectory.prompt}"', 90) +
                    "\n(word maps of one step each, over that step's x0; normalised per panel)", fontsize=10)
    return figure


def distance_figure(trajectory) -> Figure:
    """Mean absolute pixel difference to the final image, per step: x0 (and rapid x0)."""
    figure = Figure(figsize=(6.4, 3.8), layout="constrained")
    axes = figure.add_subplot()
    steps = sorted(trajectory.x0_images)
    axes.plot([s + 1 for s in steps], [_distance(trajectory.x0_images[s], trajectory.image) for s in steps],
              marker="o", markersize=3, label="x0 estimate of the step")
    if trajectory.rapid_images:
        axes.plot([s + 1 for s in steps], [_distance(trajectory.rapid_images[s], trajectory.image) for s in steps],
                  marker="s", markersize=3, label=f"rapid: {trajectory.rapid_steps} large steps from there")
    axes.set_xlabel(f"denoising step (of {trajectory.n_steps})")
    axes.set_ylabel("mean |estimate - final image|\n(pixels in [0, 1])")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    axes.set_title("How early does the estimate show the final image?", fontsize=10)
    return figure


def trajectory_table(trajectory, tau: float) -> list[dict]:
    """One row per decoded step: timestep, distances to the final image, each word's map coverage."""
    rows = []
    for step in sorted(trajectory.x0_images):
        row = {"step": step, "timestep": trajectory.timesteps[step],
               "x0_distance_to_final": _distance(trajectory.x0_images[step], trajectory.image)}
        if trajectory.rapid_images:
            row["rapid_distance_to_final"] = _distance(trajectory.rapid_images[step], trajectory.image)
        for word in trajectory.words:
            row[f"coverage_{word}"] = coverage(trajectory.maps[word][step], tau)
        rows.append(row)
    return rows


def write_gif(trajectory, path: Path, duration_ms: int = 180) -> Path:
    """Every decoded step as one frame: x0, rapid x0, then each word's map over x0; the final image last."""
    frames = [_frame(trajectory, step) for step in sorted(trajectory.x0_images)]
    frames.append(_frame(trajectory, None))
    with atomic_path(path) as temporary:
        frames[0].save(temporary, format="GIF", save_all=True, append_images=frames[1:],
                       duration=[duration_ms] * (len(frames) - 1) + [1500], loop=0)
    return Path(path)


def _frame(trajectory, step) -> Image.Image:
    panels = []
    if step is None:
        panels.append(("final image", trajectory.image))
    else:
        panels.append(("x0 estimate", trajectory.x0_images[step]))
        if trajectory.rapid_images:
            panels.append((f"rapid ({trajectory.rapid_steps} steps)", trajectory.rapid_images[step]))
        for word in trajectory.words:
            panels.append((f'"{word}"', _overlay(trajectory.x0_images[step], trajectory.maps[word][step].numpy())))
    header = 34
    frame = Image.new("RGB", (PANEL * len(panels) + 8 * (len(panels) - 1), PANEL + header + 16), "white")
    draw = ImageDraw.Draw(frame)
    title = "final image" if step is None else \
        f"step {step + 1}/{trajectory.n_steps} (t = {trajectory.timesteps[step]})"
    draw.text((4, 2), title, fill="black")
    draw.text((4, 16), trajectory.prompt[:80], fill="#555555")
    for number, (label, pixels) in enumerate(panels):
        x = number * (PANEL + 8)
        tile = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).resize((PANEL, PANEL), Image.NEAREST)
        frame.paste(tile, (x, header))
        draw.text((x + 2, header + PANEL + 2), label, fill="black")
    return frame


def _overlay(pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Image [H, W, 3] with the normalised map in the heat colour map on top (alpha HEAT_ALPHA)."""
    heat = _normalised(heat)
    if heat.shape != pixels.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize(pixels.shape[1::-1], Image.BILINEAR))
    colored = colormaps[HEAT_CMAP](heat)[..., :3]
    return (1 - HEAT_ALPHA) * pixels + HEAT_ALPHA * colored


def _normalised(heat: np.ndarray) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    low, high = float(heat.min()), float(heat.max())
    return np.zeros_like(heat) if high <= low else (heat - low) / (high - low)


def _distance(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(np.asarray(first, np.float32) - np.asarray(second, np.float32)).mean())
