"""Scoring a text-to-image model on the shapes world: generate from held-out prompts, annotate, count."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from headscope.shapes.annotate import annotate, score_scene
from headscope.shapes.world import GEOMETRIC, HELD_OUT, POLYSEMOUS, POSITIONS, SIZES, Scene, SceneSampler


def eval_scenes(seed: int = 1234, n_single: int = 48, n_pair: int = 24, n_count: int = 12,
                n_polysemy: int = 24) -> list[Scene]:
    """A fixed evaluation prompt set, disjoint in seed from training.

    One-object prompts name every attribute (size, colour, shape, position) so each can be scored;
    a quarter of them are held-out colour x shape pairs never seen in training. Polysemy prompts
    alternate the colour sense ('a rose square') and the object sense ('a rose').
    """
    sampler = SceneSampler(seed=seed, held_out=())
    held = sorted(HELD_OUT)
    scenes: list[Scene] = []
    for i in range(n_single):
        if i % 4 == 3:
            color, shape = held[(i // 4) % len(held)]
        else:
            obj = _plain_object(sampler)
            color, shape = obj.color, obj.shape
        scene = sampler.single(shape=shape, color=color, size=list(SIZES)[i % 2], fill="solid",
                               position=list(POSITIONS)[i % len(POSITIONS)])
        scenes.append(_spell_out(scene))
    for _ in range(n_pair):
        first, second = (_plain_object(sampler) for _ in range(2))
        while (second.shape, second.color) == (first.shape, first.color):
            second = _plain_object(sampler)
        scenes.append(sampler.pair(first, second, say_position=False))
    for i in range(n_count):
        scenes.append(sampler.count(n=2 + i % 2, fill="solid"))
    for i in range(n_polysemy):
        word = POLYSEMOUS[i % 2]
        size, position = list(SIZES)[(i // 2) % 2], list(POSITIONS)[(i // 4) % len(POSITIONS)]
        if i % 4 < 2:
            shape = GEOMETRIC[(i // 4) % len(GEOMETRIC)]
            scene = sampler.single(shape=shape, color=word, fill="solid", size=size, position=position)
        else:
            scene = sampler.single(shape=word, color="red" if word == "rose" else "orange", size=size,
                                   position=position)
        scenes.append(_spell_out(scene))
    unique = {s.caption: s for s in scenes}
    return list(unique.values())


def _plain_object(sampler: SceneSampler):
    """A solid geometric object of a trained colour x shape pair and a non-polysemous colour."""
    while True:
        obj = sampler.sample_object(allow_glyphs=False, fill="solid")
        if (obj.color, obj.shape) not in HELD_OUT and obj.color not in POLYSEMOUS:
            return obj


def _spell_out(scene: Scene) -> Scene:
    """Rewrite a one-object caption so that it names size, colour and position."""
    from headscope.shapes.world import POSITION_PHRASES, noun_phrase

    obj = scene.objects[0]
    caption = noun_phrase(obj, say_size=True, say_color=True, say_fill=True) + " " + POSITION_PHRASES[obj.position]
    return Scene([obj], caption, "single", {"size": True, "color": True, "fill": True, "position": True})


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], *, steps: int = 25, guidance: float = 5.0,
                    batch_size: int = 16, progress: bool = True):
    """One image per (prompt, seed); the seed alone decides an image's starting noise."""
    from headscope.models import call_defaults

    jobs = [(p, s) for s in seeds for p in prompts]
    options = call_defaults(pipe)
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        chunk = jobs[start: start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(s) for _, s in chunk]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens, **options)
        images += out.images
    return jobs, images


def _rate(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(records: list[dict]) -> dict:
    """Accuracy table from per-image score records."""
    single = [r for r in records if r["kind"] == "single" and "polysemy" not in r]
    table: dict = {}
    for name, subset in (("single", [r for r in single if not r["held_out"]]),
                         ("single_held_out", [r for r in single if r["held_out"]])):
        table[name] = {a: _rate(r[a] for r in subset) for a in ("color", "shape", "size", "position")}
        table[name]["n"] = len(subset)
    pairs = [r for r in records if r["kind"] == "pair"]
    table["pair"] = {"both_present": _rate(r["both_present"] for r in pairs),
                     "both_correct": _rate(r["both_correct"] for r in pairs), "n": len(pairs)}
    counts = [r for r in records if r["kind"] == "count"]
    table["count"] = {"count_ok": _rate(r["count_ok"] for r in counts), "n": len(counts)}
    poly = defaultdict(list)
    for r in records:
        if "polysemy" in r:
            p = r["polysemy"]
            poly[f"{p['word']}/{p['asked']}"].append(p)
    table["polysemy"] = {k: {"wanted_sense": _rate(p["wanted_sense"] for p in v),
                             "unwanted_sense": _rate(p["unwanted_sense"] for p in v), "n": len(v)}
                         for k, v in sorted(poly.items())}
    return table


def evaluate(pipe, scenes: list[Scene] | None = None, seeds=(0, 1), *, steps: int = 25, guidance: float = 5.0,
             progress: bool = True) -> dict:
    """Generate every scene's caption with every seed, annotate and score. Returns {summary, records}."""
    scenes = scenes or eval_scenes()
    by_caption = {s.caption: s for s in scenes}
    jobs, images = generate_images(pipe, list(by_caption), list(seeds), steps=steps, guidance=guidance,
                                   progress=progress)
    records = []
    for (caption, seed), image in zip(jobs, images):
        scene = by_caption[caption]
        record = score_scene(scene, annotate(image))
        record.update(prompt=caption, seed=seed,
                      held_out=any((o.color, o.shape) in HELD_OUT for o in scene.objects))
        records.append(record)
    return {"summary": summarize(records), "records": records,
            "settings": {"steps": steps, "guidance": guidance, "seeds": list(seeds), "n_prompts": len(by_caption)}}


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table."""
    lines = [f"{'group':<18}{'metric':<24}{'value':>8}{'n':>6}"]
    for group, metrics in summary.items():
        if group == "polysemy":
            for key, m in metrics.items():
                lines.append(f"{'polysemy':<18}{key + ' wanted sense':<24}{m['wanted_sense']:>8.2f}{m['n']:>6}")
            continue
        n = metrics.get("n", "")
        for metric, value in metrics.items():
            if metric == "n":
                continue
            shown = "   n/a" if value is None else f"{value:>8.2f}"
            lines.append(f"{group:<18}{metric:<24}{shown:>8}{n:>6}")
    return "\n".join(lines)

