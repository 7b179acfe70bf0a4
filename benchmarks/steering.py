"""Steering by heads, measured on the shapes world: cost, polysemy, neglect, editing, strengthening.

    python benchmarks/steering.py --tiny                    # smoke run on a tiny random pipeline
    python benchmarks/steering.py                           # the embedded shapes model and its HRV
    python benchmarks/steering.py --n-prompts 10 --tasks polysemy neglect

Tasks (each prompt with its own fixed seed, 1000 + prompt number; every image is read back by the
shapes annotator, `headscope.shapes.annotate`):
  overhead      head-scale steering time / plain generation time: the same prompt and seed, runs
                interleaved (order alternating), medians after a warm-up of each; also a trace with no
                hook, to tell the processors' own cost from the steering's.
  polysemy      "a large rose square in the center" (colour sense of rose / orange): rate the unwanted
                sense (the rose / orange glyph) is drawn and the wanted one (a rose-coloured square),
                baseline vs the word adjusted by +color,-shape (a=2, b=1). Then the other way round, as a
                check that the heads control the sense at all: colour-sense prompts pushed to +shape,-color
                and object-sense prompts ("a large rose on the left") pushed to +color,-shape.
  neglect       "a red circle and a blue square": rate that both objects appear (and with the right
                colours), plain vs (a) Attend-and-Excite, (b) A&E-HRV, (c) HRV head reweighting,
                diffusers' StableDiffusionAttendAndExcitePipeline; seconds per image each.
  crowded       neglect with three objects ("a red circle and a blue square and a green triangle";
                training had at most two different objects): rate all three shapes appear, mean number
                present, for plain, ae, ae-hrv and heads.
  editing       colour edits (red circle -> blue circle) and shape edits (red circle -> red square):
                success = the target attribute is on the largest object; preservation = IoU of the
                source and edited object masks, and the share of background pixels left unchanged;
                P2P vs P2P-HRV (swapped word strengthened by its concept's HRV).
  strengthening single objects at low guidance: colour and shape accuracy without and with the colour
                and shape words strengthened by their concepts' HRVs.
Results are printed as a table and written atomically to benchmarks/results/steering.json.
"""
from __future__ import annotations

import argparse
import warnings
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headscope.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "steering.json"
TASKS = ("overhead", "polysemy", "neglect", "crowded", "editing", "strengthening", "binding")
NEGLECT_METHODS = ("plain", "ae", "ae-hrv", "heads", "diffusers-ae")
CROWDED_METHODS = ("plain", "ae", "ae-hrv", "heads")
PLAIN_COLORS = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUND_TOLERANCE = 16  # a background pixel is unchanged when no channel moved by more than this (0-255)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet()
    pipe, hrv = load(args)
    steps, guidance = settings(pipe, args)
    context = Context(pipe, hrv, args, steps, guidance)
    result = {"model": "tiny random pipeline" if args.tiny else (args.model or "embedded shapes model"),
              "hrv": args.hrv or ("random (tiny)" if args.tiny else "model default"), "device": str(pipe.device),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "steps": steps, "guidance": guidance, "n_prompts": args.n_prompts, "tasks": {}}
    for task in args.tasks:
        started = time.perf_counter()
        print(f"[steering] {task}...", file=sys.stderr, flush=True)
        result["tasks"][task] = RUNNERS[task](context)
        result["tasks"][task]["wall_seconds"] = round(time.perf_counter() - started, 2)
    print(table(result))
    print(f"wrote {write_json(Path(args.out), result)}", file=sys.stderr)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tiny", action="store_true", help="tiny random-weight pipeline and random HRV (smoke run)")
    source.add_argument("--model", default=None, help="pipeline folder or hub id (default: the embedded model)")
    parser.add_argument("--hrv", default=None, help="HRV file (default: the model's own HRV)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--n-prompts", type=int, default=None, help="prompts per task (default 50; --tiny: 4)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; --tiny: 4)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--low-guidance", type=float, default=2.0, help="guidance of the strengthening task")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind for the overhead task")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.n_prompts is None:
        args.n_prompts = 4 if args.tiny else 50
    if args.n_prompts < 1:
        parser.error("--n-prompts must be at least 1")
    return args


def _quiet() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # inside diffusers' A&E pipeline


def load(args):
    """(pipeline, HRV)."""
    if args.tiny:
        from headscope.testing import build_tiny_sd, random_hrv

        pipe = build_tiny_sd(Path(tempfile.mkdtemp(prefix="headscope-steering-")))
        return pipe, random_hrv(pipe)
    from headscope import load_pipeline
    from headscope.steer import resolve_hrv

    pipe = load_pipeline(args.model, args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, resolve_hrv(pipe, args.hrv)


def settings(pipe, args) -> tuple[int, float]:
    from headscope.hrv import generation_defaults

    steps, guidance = (4, 5.0) if args.tiny else generation_defaults(pipe)
    return args.steps or steps, args.guidance if args.guidance is not None else guidance


class Context:
    """What every task needs: pipeline, HRV, options, generation settings; one generation helper."""

    def __init__(self, pipe, hrv, args, steps: int, guidance: float):
        self.pipe, self.hrv, self.args, self.steps, self.guidance = pipe, hrv, args, steps, guidance
        from headscope.steer import max_length

        self.max_tokens = max_length(pipe)

    def fits(self, prompt: str) -> bool:
        """Whether the prompt fits the text encoder (the tiny tokenizer spells unknown words letter by letter)."""
        return len(self.pipe.tokenizer(prompt).input_ids) <= self.max_tokens

    def call(self, seed: int, guidance: float | None = None) -> dict:
        return dict(num_inference_steps=self.steps, guidance_scale=self.guidance if guidance is None else guidance,
                    generator=torch.Generator("cpu").manual_seed(seed))

    def generate(self, prompt: str, seed: int, hooks=None, guidance: float | None = None):
        """(PIL image, seconds): plain with hooks=None, else inside a steering-only trace with `hooks`."""
        from headscope.steer import steering

        started = time.perf_counter()
        if hooks is not None:
            with steering(self.pipe, hooks):
                image = self.pipe(prompt, **self.call(seed, guidance)).images[0]
        else:
            image = self.pipe(prompt, **self.call(seed, guidance)).images[0]
        return image, time.perf_counter() - started


# -- prompts --------------------------------------------------------------------------------------

def single_scene(shape: str, color: str, size: str, position: str):
    """A one-object scene whose caption names size, colour, shape and position."""
    from headscope.shapes.world import POSITION_PHRASES, POSITIONS, ObjectSpec, Scene, noun_phrase

    center = tuple(float(coordinate) for coordinate in POSITIONS[position])
    obj = ObjectSpec(shape=shape, color=color, size=size, position=position, center=center)
    caption = noun_phrase(obj, say_size=True, say_color=True, say_fill=True) + " " + POSITION_PHRASES[position]
    return Scene([obj], caption, "single", {"size": True, "color": True, "fill": True, "position": True})


def pair_scene(first: tuple[str, str], second: tuple[str, str]):
    """'a red circle and a blue square' (no sizes or positions said)."""
    from headscope.shapes.world import ObjectSpec, Scene, article

    objects = [ObjectSpec(shape=shape, color=color, size="large", position="center")
               for color, shape in (first, second)]
    caption = " and ".join(f"{article(color)} {color} {shape}" for color, shape in (first, second))
    return Scene(objects, caption, "pair", {"size": False, "color": True, "fill": True, "position": False})


def pick(context: Context, candidates: list, salt: int) -> list:
    """n_prompts of the candidates (a fixed shuffle), skipping captions the text encoder cannot take."""
    shuffled = list(candidates)
    random.Random(salt).shuffle(shuffled)
    fitting = [item for item in shuffled if context.fits(_caption(item))]
    return fitting[:context.args.n_prompts]


def _caption(item) -> str:
    return item.caption if hasattr(item, "caption") else item[0].caption


def polysemy_scenes(context: Context) -> list:
    from headscope.shapes.world import GEOMETRIC, POLYSEMOUS, POSITIONS, SIZES

    candidates = [single_scene(shape, word, size, position) for word in POLYSEMOUS for shape in GEOMETRIC
                  for size in SIZES for position in POSITIONS]
    return pick(context, candidates, 1)


def pair_scenes(context: Context) -> list:
    from headscope.shapes.world import GEOMETRIC

    candidates = [pair_scene((c1, s1), (c2, s2)) for c1 in PLAIN_COLORS for s1 in GEOMETRIC for c2 in PLAIN_COLORS
                  for s2 in GEOMETRIC if s1 != s2 and c1 != c2]
    return pick(context, candidates, 2)


def single_scenes(context: Context, salt: int) -> list:
    from headscope.shapes.world import GEOMETRIC, HELD_OUT, POSITIONS, SIZES

    candidates = [single_scene(shape, color, size, position) for color in PLAIN_COLORS for shape in GEOMETRIC
                  for size in SIZES for position in POSITIONS if (color, shape) not in HELD_OUT]
    return pick(context, candidates, salt)


def edit_pairs(context: Context) -> list:
    """(source scene, target scene, kind): colour edits and shape edits, half each."""
    from headscope.shapes.world import GEOMETRIC

    rng = random.Random(3)
    pairs = []
    for source in single_scenes(context, 3):
        obj = source.objects[0]
        if len(pairs) % 2 == 0:
            kind, color, shape = "color", rng.choice([c for c in PLAIN_COLORS if c != obj.color]), obj.shape
        else:
            kind, color, shape = "shape", obj.color, rng.choice([s for s in GEOMETRIC if s != obj.shape])
        target = single_scene(shape, color, obj.size, obj.position)
        if context.fits(target.caption):
            pairs.append((source, target, kind))
    return pairs


# -- tasks ----------------------------------------------------------------------------------------

def task_overhead(context: Context) -> dict:
    """Median time of plain and head-scale-steered generation, interleaved in one process."""
    from headscope.steer import strengthen_hook

    prompt = "a red circle and a blue square"
    hook = strengthen_hook(context.pipe, prompt, {"red": ("color", 1.0), "circle": ("shape", 1.0)}, hrv=context.hrv)
    hooks = {"plain": None, "steered": [hook], "traced": []}  # traced: headscope's processors, no steering
    for kind in hooks:
        context.generate(prompt, 0, hooks[kind])
    times = {kind: [] for kind in hooks}
    for repeat in range(context.args.repeats):
        order = list(hooks) if repeat % 2 == 0 else list(reversed(hooks))
        for kind in order:
            times[kind].append(context.generate(prompt, 0, hooks[kind])[1])
    median = {kind: statistics.median(values) for kind, values in times.items()}
    pairwise = statistics.median(s / p for s, p in zip(times["steered"], times["plain"]))
    return {"prompt": prompt, "repeats": context.args.repeats, "plain_s": round(median["plain"], 4),
            "steered_s": round(median["steered"], 4), "traced_no_steering_s": round(median["traced"], 4),
            "ratio": round(median["steered"] / median["plain"], 4), "pairwise_ratio_median": round(pairwise, 4)}


def task_polysemy(context: Context) -> dict:
    from headscope.shapes.annotate import annotate, score_scene
    from headscope.shapes.world import POLYSEMOUS
    from headscope.steer import adjust_hook

    def run(scenes, desired, undesired, salt, baseline=True):
        rates = {"baseline": [], "adjusted": []} if baseline else {"adjusted": []}
        for number, scene in enumerate(scenes):
            word = scene.objects[0].color if scene.objects[0].shape not in POLYSEMOUS else scene.objects[0].shape
            hook = adjust_hook(context.pipe, scene.caption, {word: (desired, undesired)}, hrv=context.hrv)
            for kind, hooks in (("baseline", None), ("adjusted", [hook])):
                if kind in rates:
                    image, _ = context.generate(scene.caption, salt + number, hooks)
                    rates[kind].append(score_scene(scene, annotate(image))["polysemy"])
        return {kind: {"unwanted_sense": _rate(p["unwanted_sense"] for p in records),
                       "wanted_sense": _rate(p["wanted_sense"] for p in records), "n": len(records)}
                for kind, records in rates.items()}

    scenes = polysemy_scenes(context)
    result = {"n": len(scenes), "adjust": "+color,-shape a=2 b=1", **run(scenes, "color", "shape", 1000)}
    # The other way round: does pushing the word's heads towards the other concept flip the sense drawn?
    pushed = run(scenes, "shape", "color", 1000, baseline=False)  # same prompts and seeds: same baseline
    result["colour_sense_pushed_to_shape"] = {"glyph_drawn": pushed["adjusted"]["unwanted_sense"],
                                              "glyph_drawn_baseline": result["baseline"]["unwanted_sense"],
                                              "n": pushed["adjusted"]["n"]}
    pulled = run(object_sense_scenes(context), "color", "shape", 3000)
    result["object_sense_pushed_to_color"] = {"glyph_missing": pulled["adjusted"]["unwanted_sense"],
                                              "glyph_missing_baseline": pulled["baseline"]["unwanted_sense"],
                                              "n": pulled["adjusted"]["n"]}
    return result


def object_sense_scenes(context: Context) -> list:
    """'a large rose on the left': the drawn object (glyph) sense of each polysemous word."""
    from headscope.shapes.world import POLYSEMOUS, POSITION_PHRASES, POSITIONS, SIZES, ObjectSpec, Scene, article

    candidates = []
    for word in POLYSEMOUS:
        for size in SIZES:
            for position in POSITIONS:
                obj = ObjectSpec(shape=word, color="orange" if word == "orange" else "red", size=size,
                                 position=position, center=tuple(float(c) for c in POSITIONS[position]))
                caption = f"{article(size)} {size} {word} {POSITION_PHRASES[position]}"
                candidates.append(Scene([obj], caption, "single",
                                        {"size": True, "color": False, "fill": True, "position": True}))
    return pick(context, candidates, 6)


def _neglect_image(context: Context, method: str, caption: str, subjects: dict, seed: int):
    from headscope.neglect import AttendAndExcite, diffusers_attend_and_excite, heads_hook

    if method == "plain":
        return context.generate(caption, seed)[0]
    if method == "heads":
        return context.generate(caption, seed, [heads_hook(context.pipe, caption, subjects, hrv=context.hrv)])[0]
    if method == "diffusers-ae":
        call = {**context.call(seed), "subjects": list(subjects)}
        return diffusers_attend_and_excite(context.pipe, caption, **call).images[0]
    excite = AttendAndExcite(context.pipe, caption, subjects, weighted=method == "ae-hrv", hrv=context.hrv)
    return excite.generate(**context.call(seed)).images[0]


def task_neglect(context: Context) -> dict:
    from headscope.shapes.annotate import annotate, score_scene

    records = {method: [] for method in NEGLECT_METHODS}
    seconds = {method: [] for method in NEGLECT_METHODS}
    for number, scene in enumerate(pair_scenes(context)):
        subjects = {obj.shape: "shape" for obj in scene.objects}
        for method in NEGLECT_METHODS:
            started = time.perf_counter()
            image = _neglect_image(context, method, scene.caption, subjects, 1000 + number)
            seconds[method].append(time.perf_counter() - started)
            records[method].append(score_scene(scene, annotate(image)))
    return {"n": len(records["plain"]), **{method: {
        "both_present": _rate(r["both_present"] for r in records[method]),
        "both_correct": _rate(r["both_correct"] for r in records[method]),
        "seconds_per_image": round(statistics.mean(seconds[method]), 4)} for method in NEGLECT_METHODS}}


def crowded_prompts(context: Context) -> list[tuple[str, list[str]]]:
    """(caption, its three shapes): three different colours and shapes, a fixed shuffle."""
    from headscope.shapes.world import GEOMETRIC, article

    rng = random.Random(5)
    prompts = []
    for _ in range(50 * context.args.n_prompts):
        colors, shapes = rng.sample(PLAIN_COLORS, 3), rng.sample(GEOMETRIC, 3)
        caption = " and ".join(f"{article(color)} {color} {shape}" for color, shape in zip(colors, shapes))
        if context.fits(caption):
            prompts.append((caption, shapes))
        if len(prompts) == context.args.n_prompts:
            break
    return prompts


def task_crowded(context: Context) -> dict:
    from headscope.shapes.annotate import annotate

    present = {method: [] for method in CROWDED_METHODS}
    seconds = {method: [] for method in CROWDED_METHODS}
    for number, (caption, shapes) in enumerate(crowded_prompts(context)):
        subjects = {shape: "shape" for shape in shapes}
        for method in CROWDED_METHODS:
            started = time.perf_counter()
            image = _neglect_image(context, method, caption, subjects, 2000 + number)
            seconds[method].append(time.perf_counter() - started)
            found = {obj.shape for obj in annotate(image)}
            present[method].append(sum(shape in found for shape in shapes))
    return {"n": len(present["plain"]), **{method: {
        "all_three_present": _rate(count == 3 for count in present[method]),
        "mean_present": _rate(present[method]),
        "seconds_per_image": round(statistics.mean(seconds[method]), 4)} for method in CROWDED_METHODS}}


def task_editing(context: Context) -> dict:
    from headscope.editing import edit
    from headscope.shapes.annotate import annotate, score_scene

    results = {}
    for number, (source, target, kind) in enumerate(edit_pairs(context)):
        for method, concept in (("p2p", None), ("p2p-hrv", kind)):
            outcome = edit(context.pipe, source.caption, target.caption, seed=1000 + number, concept=concept,
                           hrv=context.hrv if concept else None, num_inference_steps=context.steps,
                           guidance_scale=context.guidance)
            source_image, edited_image = outcome.source[0], outcome.edited[0]
            source_objects, edited_objects = annotate(source_image), annotate(edited_image)
            score = score_scene(target, edited_objects)
            results.setdefault(f"{method}/{kind}", []).append({
                "success": bool(score[kind]),
                "mask_iou": _mask_iou(source_objects, edited_objects),
                "background_unchanged": _background_unchanged(source_image, edited_image, source_objects,
                                                              edited_objects)})
    return {key: {"n": len(rows), "success": _rate(r["success"] for r in rows),
                  "mask_iou": _rate(r["mask_iou"] for r in rows),
                  "background_unchanged": _rate(r["background_unchanged"] for r in rows)}
            for key, rows in sorted(results.items())}


def task_strengthening(context: Context) -> dict:
    from headscope.shapes.annotate import annotate, score_scene
    from headscope.steer import strengthen_hook

    rows = {"baseline": [], "strengthened": []}
    for number, scene in enumerate(single_scenes(context, 4)):
        obj = scene.objects[0]
        hook = strengthen_hook(context.pipe, scene.caption, {obj.color: "color", obj.shape: "shape"}, hrv=context.hrv)
        for kind, hooks in (("baseline", None), ("strengthened", [hook])):
            image, _ = context.generate(scene.caption, 1000 + number, hooks, guidance=context.args.low_guidance)
            rows[kind].append(score_scene(scene, annotate(image)))
    return {"n": len(rows["baseline"]), "guidance": context.args.low_guidance,
            **{kind: {"color": _rate(r["color"] for r in records), "shape": _rate(r["shape"] for r in records)}
               for kind, records in rows.items()}}


def task_binding(context: Context) -> dict:
    """Strengthening where the model is weak: both colour words of a two-object prompt x HRV_color."""
    from headscope.shapes.annotate import annotate, score_scene
    from headscope.steer import strengthen_hook

    rows = {"baseline": [], "strengthened": []}
    for number, scene in enumerate(pair_scenes(context)):
        hook = strengthen_hook(context.pipe, scene.caption, {obj.color: "color" for obj in scene.objects},
                               hrv=context.hrv)
        for kind, hooks in (("baseline", None), ("strengthened", [hook])):
            image, _ = context.generate(scene.caption, 1000 + number, hooks)
            rows[kind].append(score_scene(scene, annotate(image)))
    return {"n": len(rows["baseline"]), **{kind: {
        "both_present": _rate(r["both_present"] for r in records),
        "both_correct": _rate(r["both_correct"] for r in records)} for kind, records in rows.items()}}


RUNNERS = {"overhead": task_overhead, "polysemy": task_polysemy, "neglect": task_neglect, "crowded": task_crowded,
           "editing": task_editing, "strengthening": task_strengthening, "binding": task_binding}


# -- scoring helpers ------------------------------------------------------------------------------

def _rate(values) -> float | None:
    values = [float(value) for value in values if value is not None]
    return round(float(np.mean(values)), 4) if values else None


def _mask_iou(source_objects, edited_objects) -> float | None:
    """IoU of the largest object's mask in the source and in the edited image (0 when one has none)."""
    if not source_objects and not edited_objects:
        return None
    if not source_objects or not edited_objects:
        return 0.0
    first, second = source_objects[0].mask, edited_objects[0].mask
    return float(np.logical_and(first, second).sum() / max(1, np.logical_or(first, second).sum()))


def _background_unchanged(source_image, edited_image, source_objects, edited_objects) -> float:
    """Share of pixels outside every detected object of both images whose colour moved <= BACKGROUND_TOLERANCE."""
    source, edited = (np.asarray(image.convert("RGB"), dtype=np.int16) for image in (source_image, edited_image))
    objects = np.zeros(source.shape[:2], dtype=bool)
    for detected in [*source_objects, *edited_objects]:
        objects |= detected.mask
    background = ~objects
    if not background.any():
        return 0.0
    unchanged = np.abs(source - edited).max(axis=-1) <= BACKGROUND_TOLERANCE
    return float(unchanged[background].mean())


# -- output ---------------------------------------------------------------------------------------

def table(result: dict) -> str:
    lines = [f"steering benchmark — {result['model']}, HRV {result['hrv']}, {result['steps']} steps, guidance "
             f"{result['guidance']}, device {result['device']}, {result['threads']} threads",
             f"{'task':<14}{'variant':<30}{'metric':<26}{'value':>10}{'n':>6}"]
    for task, values in result["tasks"].items():
        n = values.get("n", "")
        for variant, metrics in values.items():
            if isinstance(metrics, dict):
                for metric, value in metrics.items():
                    if metric != "n":
                        lines.append(f"{task:<14}{variant:<30}{metric:<26}{_show(value):>10}{metrics.get('n', n):>6}")
            elif variant not in ("n", "prompt", "adjust", "guidance", "repeats"):
                lines.append(f"{task:<14}{'':<30}{variant:<26}{_show(metrics):>10}{n:>6}")
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
