"""Classifier-free guidance: what does the difference between the prompted and unprompted prediction do?

Every prompt is generated at every guidance scale from the same starting noise. Per scale: the images,
the annotator's accuracy (shapes world: colour, shape, size and position of one-object scenes; both
objects with the right colour in two-object scenes, where the embedded model is weakest) and how concentrated the nouns' word maps are (coverage at tau, lower = tighter; normalised entropy of
the map, 1 = spread evenly). Per step: the size of the guidance direction, the prompted minus the
unprompted model output (RMS over latent channels and pixels, and relative to the unprompted output's
RMS), and where it acts: its per-pixel L2 norm over channels, averaged over steps, and on the shapes
world the share of it that falls on the objects.

The direction is read by a forward hook on the UNet output, whose rows diffusers' SD / SDXL pipelines
lay out as [unprompted; prompted]. At scale <= 1 diffusers skips the unprompted pass: no direction.
(Joint-attention transformers, SD3 / Flux, need their backbone adapter's row layout; not yet.)
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from headscope.errors import HeadscopeError
from headscope.studies.runner import Sample, Study, mean

DEFAULT_SCALES = (1.0, 3.0, 5.0, 7.5, 10.0)
MAX_SCALE = 100.0
ATTRIBUTES = ("color", "shape", "size", "position")


class GuidanceDirection:
    """Per UNet forward with guidance: rms [images], relative [images], spatial [images, h, w] of cond - uncond."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.rms, self.relative, self.spatial = [], [], []

    def __call__(self, module, args, kwargs, output) -> None:
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return  # scale <= 1: diffusers runs the prompted rows only
        prediction = (output[0] if isinstance(output, tuple) else output.sample).detach().float()
        uncond, cond = prediction.chunk(2)  # diffusers' layout: torch.cat([uncond, cond])
        direction = cond - uncond  # [images, channels, h, w]
        rms = direction.pow(2).mean(dim=(1, 2, 3)).sqrt()
        self.rms.append(rms.cpu())
        self.relative.append((rms / uncond.pow(2).mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-12)).cpu())
        self.spatial.append(direction.pow(2).sum(dim=1).sqrt().cpu())


class GuidanceStudy(Study):
    """Images, accuracy, map concentration and the guidance direction per guidance scale."""

    name = "guidance"
    title = "What does classifier-free guidance do?"
    captions = {"guidance.png": "per scale: attribute accuracy and word-map concentration; per step: the size of "
                                "the guidance direction (prompted - unprompted output) and its share on the objects",
                "guidance-images.png": "the same prompts and starting noise at every scale",
                "guidance-where.png": "where the guidance direction acts: its per-pixel size, averaged over steps"}

    def __init__(self, scales=DEFAULT_SCALES):
        scales = [float(scale) for scale in scales]
        if not scales:
            raise HeadscopeError("give at least one guidance scale")
        for scale in scales:
            if not 0.0 <= scale <= MAX_SCALE:
                raise HeadscopeError(f"guidance scale {scale:g} is out of range; use scales in [0, {MAX_SCALE:g}]")
        self.scales = list(dict.fromkeys(scales))

    def settings(self) -> dict:
        return {"scales": self.scales}

    def variants(self) -> list[dict]:
        return [{"guidance_scale": scale} for scale in self.scales]

    def variant_label(self, variant: int) -> str:
        return f"guidance {self.scales[variant]:g}"

    def shapes_scenes(self, sampler, n: int) -> list:
        from headscope.shapes.world import POSITION_PHRASES, Scene, noun_phrase

        scenes = []
        for number in range(n):
            if number % 2:  # two objects: colour binding, where guidance has something to fix
                scenes.append(sampler.pair(*(sampler.sample_object(allow_glyphs=False, fill="solid")
                                             for _ in range(2)), say_position=False))
                continue
            obj = sampler.single(allow_glyphs=False, fill="solid").objects[0]  # every attribute named
            caption = noun_phrase(obj, say_size=True, say_color=True, say_fill=True) + " " + \
                POSITION_PHRASES[obj.position]
            scenes.append(Scene([obj], caption, "single", {"size": True, "color": True, "fill": True,
                                                           "position": True}))
        return scenes

    @contextmanager
    def recording(self, pipe):
        if getattr(pipe, "unet", None) is None:
            raise HeadscopeError("the guidance study reads the UNet's output rows; joint-attention transformers "
                                 "(SD3, Flux) are not supported yet")
        reader = GuidanceDirection(pipe)
        handle = pipe.unet.register_forward_hook(reader, with_kwargs=True)
        try:
            yield reader
        finally:
            handle.remove()

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        from headscope.language import NOT_SUBJECTS

        record = {"scale": self.scales[sample.job.variant], "attributes": None, "accuracy": None}
        nouns = [t for t in sample.parse if t.pos in ("NOUN", "PROPN") and t.word.lower() not in NOT_SUBJECTS]
        maps = [sample.word_map(t.word, t.occurrence) for t in nouns]
        record["noun_coverage"] = mean(float(sample.mask(t.word, t.occurrence).float().mean()) for t in nouns)
        record["noun_entropy"] = mean(normalised_entropy(heat) for heat in maps)
        objects_mask = None
        if sample.scene is not None:
            from headscope.shapes.annotate import score_scene

            scored = score_scene(sample.scene, sample.objects)
            if sample.scene.kind == "pair":
                record["attributes"] = {"both_present": scored["both_present"], "both_correct": scored["both_correct"]}
                record["accuracy"] = float(scored["both_correct"])
            else:
                record["attributes"] = {name: scored.get(name) for name in ATTRIBUTES if scored.get(name) is not None}
                record["accuracy"] = mean(record["attributes"].values())
            record["kind"] = sample.scene.kind
            objects_mask = _scene_mask(sample)
        reader = sample.batch
        arrays = {}
        if reader.rms:
            row = sample.image_index
            spatial = torch.stack([step[row] for step in reader.spatial])  # [steps, h, w]
            record["direction_rms"] = [float(step[row]) for step in reader.rms]
            record["direction_relative"] = [float(step[row]) for step in reader.relative]
            if objects_mask is not None:
                size = objects_mask.shape
                upsampled = F.interpolate(spatial[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                energy = upsampled.flatten(1).sum(dim=1).clamp_min(1e-12)
                record["direction_on_objects"] = (upsampled[:, objects_mask].sum(dim=1) / energy).tolist()
                record["object_area"] = float(objects_mask.float().mean())
            arrays = {"direction": spatial.mean(dim=0).numpy().astype(np.float16)}
        else:
            record["direction_rms"] = record["direction_relative"] = None
        return record, arrays

    def summarize(self, records: list[dict]) -> dict:
        by_scale = defaultdict(list)
        for record in records:
            by_scale[record["scale"]].append(record)
        table, curves = [], {}
        for scale in self.scales:
            group = by_scale.get(scale, [])
            row = {"scale": scale, "n": len(group), "accuracy": mean(r["accuracy"] for r in group),
                   "one_object": mean(r["accuracy"] for r in group if r.get("kind") == "single"),
                   "two_objects": mean(r["accuracy"] for r in group if r.get("kind") == "pair")}
            for name in ATTRIBUTES + ("both_present",):
                row[name] = mean((r["attributes"] or {}).get(name) for r in group)
            row.update(noun_coverage=mean(r["noun_coverage"] for r in group),
                       noun_entropy=mean(r["noun_entropy"] for r in group),
                       direction_rms=mean(v for r in group for v in (r["direction_rms"] or [])),
                       direction_relative=mean(v for r in group for v in (r["direction_relative"] or [])),
                       direction_on_objects=mean(v for r in group for v in (r.get("direction_on_objects") or [])),
                       object_area=mean(r.get("object_area") for r in group))
            table.append(row)
            curves[str(scale)] = {key: _mean_curve([r.get(key) for r in group])
                                  for key in ("direction_rms", "direction_relative", "direction_on_objects")}
        return {"table": table, "per_step": curves}

    def figures(self, summary: dict, records: list[dict], store) -> dict:
        from headscope.studies.guidance_plots import direction_maps_figure, image_grid_figure, summary_figure

        files = {"guidance.png": summary_figure(summary), "guidance-images.png": image_grid_figure(records, store,
                                                                                                    self.scales)}
        where = direction_maps_figure(records, store, self.scales)
        if where is not None:
            files["guidance-where.png"] = where
        return files

    def headline(self, summary: dict) -> list[str]:
        lines = [f"{'scale':>6}{'n':>5}{'1 object':>10}{'2 objects':>10}{'noun cover':>12}{'dir RMS':>9}"
                 f"{'dir / uncond':>14}{'on objects':>12}"]
        for row in summary["table"]:
            lines.append(f"{row['scale']:>6g}{row['n']:>5}{_fmt(row['one_object']):>10}{_fmt(row['two_objects']):>10}"
                         f"{_fmt(row['noun_coverage']):>12}"
                         f"{_fmt(row['direction_rms']):>9}{_fmt(row['direction_relative']):>14}"
                         f"{_fmt(row['direction_on_objects']):>12}")
        return lines


def normalised_entropy(heat_map: torch.Tensor) -> float | None:
    """Entropy of the map as a distribution over pixels / log(pixels): 1 = flat, 0 = one pixel."""
    mass = heat_map.clamp_min(0).flatten().double()
    total = float(mass.sum())
    if total <= 0 or mass.numel() < 2:
        return None
    share = mass / total
    share = share[share > 0]
    return float(-(share * share.log()).sum() / np.log(mass.numel()))


def _scene_mask(sample: Sample) -> torch.Tensor:
    """Union of the annotator's objects, holes filled: bool [H, W]."""
    from scipy import ndimage

    height, width = np.asarray(sample.image).shape[:2]
    union = np.zeros((height, width), bool)
    for obj in sample.objects:
        union |= ndimage.binary_fill_holes(obj.mask)
    return torch.from_numpy(union)


def _mean_curve(curves: list) -> list | None:
    curves = [curve for curve in curves if curve]
    if not curves:
        return None
    length = min(len(curve) for curve in curves)
    return np.mean([curve[:length] for curve in curves], axis=0).tolist()


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"

