"""Steering by heads, measured on the shapes world: cost, polysemy, neglect, editing, strengthening.

    python benchmarks/steering.py --tiny                    # smoke run on a tiny random pipeline
    python benchmarks/steering.py                           # the embedded shapes model and its HRV
    python benchmarks/steering.py --n-prompts 10 --tasks polysemy neglect

Tasks (each prompt with its own fixed seed, 1000 + prompt number; every image is read back by the
shapes annotator, `headscope.shapes.annotate`):
  overhead      head-scale steering time / plain generation time: the same prompt and seed, runs
                interleaved (order alternating), medians after a warm-up of each; also a trace with no
                hook, to tell the processors' own cost from the steering's.
  polysemy      colour sense of rose / orange: rate the unwanted sense (the rose / orange glyph) is drawn
                and the wanted one (a rose-coloured square), baseline vs the word adjusted by +color,-shape
                (a=2, b=1), on two prompt sets:
                  trained   "a large rose square in the center": the phrasing of the training captions;
                  end-word  "a square in rose", "a star painted rose": the colour word ends the prompt, a
                            phrasing training never used, where the model often draws the rose glyph
                            (24 captions, each with several seeds; chosen on a pilot with other seeds).
                On the end-word set also a=3, and two controls: the same adjusting with the heads'
                factors shuffled (a fixed random permutation per prompt) and the word pushed the other way
                (+shape,-color). Object-sense prompts ("a large rose on the left") pushed to +color,-shape
                check the other direction.
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
  strengthening (1) single objects at low guidance: colour and shape accuracy without and with the
                colour and shape words strengthened by their concepts' HRVs; (2) where the model is weak,
                the end-word polysemy prompts ("a square in rose"): colour accuracy (the shape drawn in
                the colour) with the colour word x HRV_color at s = 1 (the paper) and s = 2, against two
                controls at s = 2: the colour HRV's factors shuffled over heads, and the shape HRV.
Every task keeps its per-prompt records; differences from the baseline on the same prompts and seeds come
with an exact McNemar test (two-sided binomial test on the discordant pairs).
Results are printed as a table and written atomically to benchmarks/results/steering.json; with
--images DIR, a contact sheet per prompt set (its first prompts, one column per variant) goes to DIR.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import harness
from headscope.errors import HeadscopeError

TASKS = ("overhead", "polysemy", "neglect", "crowded", "editing", "strengthening", "binding")
NEGLECT_METHODS = ("plain", "ae", "ae-hrv", "heads", "diffusers-ae")
CROWDED_METHODS = ("plain", "ae", "ae-hrv", "heads")
PLAIN_COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SHEET_ROWS = 8  # prompts per contact sheet (--images)
BACKGROUND_TOLERANCE = 16  # a background pixel is unchanged when no channel moved by more than this (0-255)


def options():
    parser = harness.parser(__doc__, "steering", tiny="sd")
    parser.add_argument("--hrv", default=None, help="HRV file (default: the model's own HRV; --tiny: a random one)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--n-prompts", type=int, default=None, help="prompts per task (default 50; --tiny: 4)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's; --tiny: 4)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--low-guidance", type=float, default=2.0, help="guidance of the strengthening task")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind for the overhead task")
    parser.add_argument("--images", default=None, metavar="DIR",
                        help=f"also write a contact sheet of each prompt set's first {SHEET_ROWS} prompts here")
    return parser


def measure(args) -> dict:
    if args.n_prompts is None:
        args.n_prompts = 4 if args.tiny else 50
    if args.n_prompts < 1:
        raise HeadscopeError(f"--n-prompts must be at least 1, not {args.n_prompts}")
    _quiet()
    pipe, model = harness.load(args)
    hrv = load_hrv(pipe, args)
    steps, guidance = settings(pipe, args)
    context = Context(pipe, hrv, args, steps, guidance)
    result = {"model": model, "hrv": args.hrv or ("random (tiny)" if args.tiny else "model default"),
              **harness.machine(pipe), "steps": steps, "guidance": guidance, "n_prompts": args.n_prompts, "tasks": {}}
    for task in args.tasks:
        started = time.perf_counter()
        print(f"[steering] {task}...", file=sys.stderr, flush=True)
        result["tasks"][task] = RUNNERS[task](context)
        result["tasks"][task]["wall_seconds"] = round(time.perf_counter() - started, 2)
    print(table(result))
    for name, rows in context.sheets.items():
        path = Path(args.images) / (name.replace("/", "-") + ".png")
        print(f"wrote {save_sheet(contact_sheet(name, rows), path)}", file=sys.stderr)
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


def _quiet() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # inside diffusers' A&E pipeline


def load_hrv(pipe, args):
    """A random HRV for the tiny pipeline; else --hrv, or the model's own."""
    if args.tiny:
        from headscope.testing import random_hrv

        return random_hrv(pipe)
    from headscope.steer import resolve_hrv

    return resolve_hrv(pipe, args.hrv)


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
        self._plain: dict = {}
        self.sheets: dict[str, dict[str, dict]] = {}  # prompt set -> row label -> variant -> image

    def keep(self, sheet: str, row: str, variant: str, image) -> None:
        """Remember an image for the contact sheet of `sheet` (with --images; its first SHEET_ROWS rows)."""
        if not self.args.images:
            return
        rows = self.sheets.setdefault(sheet, {})
        if row in rows or len(rows) < SHEET_ROWS:
            rows.setdefault(row, {})[variant] = image

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

    def plain(self, prompt: str, seed: int, guidance: float | None = None):
        """The plain image of (prompt, seed, guidance), generated once per run (tasks share baselines)."""
        key = (prompt, seed, self.guidance if guidance is None else guidance)
        if key not in self._plain:
            self._plain[key] = self.generate(prompt, seed, None, guidance)[0]
        return self._plain[key]


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


END_WORD_TEMPLATES = ("{a} {shape} in rose", "{a} {shape} colored rose", "{a} {shape} painted rose", "one {shape} in rose")


def end_word_scenes(context: Context) -> list:
    """'a square in rose', 'a star painted rose': the colour word 'rose' ends the prompt.

    The set was chosen on a pilot with other seeds (7000-7003): with the colour word last the model drew
    the rose glyph in 0.33 of the images for 'rose' but 0.02 for 'orange', and 0.00-0.11 with 'in the
    color rose', 'that is rose' or 'the ... in rose' (a size word before the shape also lowers it).
    There are 24 captions; each comes back with another seed until the set has n_prompts prompts.
    """
    from headscope.shapes.world import GEOMETRIC, ObjectSpec, Scene, article

    captions = [template.format(a=article(shape), shape=shape) for template in END_WORD_TEMPLATES
                for shape in GEOMETRIC]
    scenes = [Scene([ObjectSpec(shape=caption.split()[1], color="rose", size="large", position="center")], caption,
                    "single", {"size": False, "color": True, "fill": True, "position": False}) for caption in captions]
    fitting, chosen = [scene for scene in scenes if context.fits(scene.caption)], []
    for repeat in range(-(-context.args.n_prompts // max(1, len(fitting)))):  # every caption once per round
        block = list(fitting)
        random.Random(7 + repeat).shuffle(block)
        chosen += block
    return chosen[:context.args.n_prompts]


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
    pairwise = [s / p for s, p in zip(times["steered"], times["plain"])]
    quartiles = np.percentile(pairwise, [25, 75])
    return {"prompt": prompt, "repeats": context.args.repeats, "plain_s": round(median["plain"], 4),
            "steered_s": round(median["steered"], 4), "traced_no_steering_s": round(median["traced"], 4),
            "ratio": round(median["steered"] / median["plain"], 4),
            "traced_no_steering_ratio": round(median["traced"] / median["plain"], 4),
            "pairwise_ratio_median": round(statistics.median(pairwise), 4),
            "pairwise_ratio_quartiles": [round(float(q), 4) for q in quartiles]}


def task_polysemy(context: Context) -> dict:
    from headscope.steer import adjust_factors

    color, shape = context.hrv.vector("color"), context.hrv.vector("shape")
    adjusted, pushed = adjust_factors(color, shape), adjust_factors(shape, color)
    result, records = {"adjust": "+color,-shape a=2 b=1"}, {}
    trained = {"baseline": None, "adjusted": adjusted, "pushed_to_shape": pushed}
    end_word = {**trained, "adjusted_a3": adjust_factors(color, shape, a=3.0),
                "adjusted_shuffled_heads": lambda number: adjusted[_permutation(len(adjusted), number)]}
    object_sense = {"baseline": None, "adjusted": adjusted}  # the object sense, pushed towards the colour
    for name, scenes, variants, salt in (("trained", polysemy_scenes(context), trained, 1000),
                                         ("end_word", end_word_scenes(context), end_word, 5000),
                                         ("object_sense", object_sense_scenes(context), object_sense, 3000)):
        records[name] = _sense_records(context, scenes, variants, salt, f"polysemy/{name}")
        result.update(_summarise(name, records[name], variants, ("unwanted_sense", "wanted_sense")))
    result["records"] = records
    return result


def _permutation(n: int, number: int) -> torch.Tensor:
    """A fixed random order of n heads for prompt `number` (the shuffled-heads controls)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(number))


def _sense_records(context: Context, scenes: list, variants: dict, salt: int, sheet: str,
                   names: tuple[str, str] = ("unwanted_sense", "wanted_sense")) -> list[dict]:
    """Per prompt: whether each variant drew the unwanted and the wanted sense of its polysemous word.

    `variants` maps a name to None (plain generation), to per-head factors for the word, or to a function
    of the prompt number returning them. `names`: the record keys of the unwanted and the wanted sense.
    """
    from headscope.shapes.annotate import annotate, score_scene
    from headscope.shapes.world import POLYSEMOUS
    from headscope.steer import HeadScale

    records = []
    for number, scene in enumerate(scenes):
        obj, seed = scene.objects[0], salt + number
        word = obj.shape if obj.shape in POLYSEMOUS else obj.color
        row = {"caption": scene.caption, "seed": seed, "word": word}
        for name, factors in variants.items():
            if factors is None:
                image = context.plain(scene.caption, seed)
            else:
                factors = factors(number) if callable(factors) else factors
                hook = HeadScale.for_words(context.pipe, scene.caption, {word: factors})
                image = context.generate(scene.caption, seed, [hook])[0]
            context.keep(sheet, f"{scene.caption} (seed {seed})", name, image)
            sense = score_scene(scene, annotate(image))["polysemy"]
            row[name] = {names[0]: bool(sense["unwanted_sense"]), names[1]: bool(sense["wanted_sense"])}
        records.append(row)
    return records


def _summarise(name: str, records: list[dict], variants, metrics) -> dict:
    """{'name/variant': rates of each metric, n, and McNemar against the first variant (the baseline)}."""
    variants = list(variants)
    summary = {}
    for variant in variants:
        values = {metric: [row[variant][metric] for row in records] for metric in metrics}
        summary[f"{name}/{variant}"] = {**{metric: _rate(v) for metric, v in values.items()}, "n": len(records)}
        if variant != variants[0]:
            for metric in metrics:
                summary[f"{name}/{variant}"][f"{metric} vs {variants[0]}"] = _paired(
                    [row[variants[0]][metric] for row in records], values[metric])
    return summary


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
    from headscope.steer import AttendAndExcite, diffusers_attend_and_excite, heads_hook

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

    records, seconds = [], {method: [] for method in NEGLECT_METHODS}
    for number, scene in enumerate(pair_scenes(context)):
        subjects = {obj.shape: "shape" for obj in scene.objects}
        row = {"caption": scene.caption, "seed": 1000 + number}
        for method in NEGLECT_METHODS:
            started = time.perf_counter()
            image = _neglect_image(context, method, scene.caption, subjects, 1000 + number)
            seconds[method].append(time.perf_counter() - started)
            context.keep("neglect", f"{scene.caption} (seed {1000 + number})", method, image)
            score = score_scene(scene, annotate(image))
            row[method] = {"both_present": bool(score["both_present"]), "both_correct": bool(score["both_correct"])}
        records.append(row)
    result = {"n": len(records), **_summarise("neglect", records, NEGLECT_METHODS, ("both_present", "both_correct"))}
    for method in NEGLECT_METHODS:
        result[f"neglect/{method}"]["seconds_per_image"] = round(statistics.mean(seconds[method]), 4)
    return {**result, "records": records}


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

    records, seconds = [], {method: [] for method in CROWDED_METHODS}
    for number, (caption, shapes) in enumerate(crowded_prompts(context)):
        subjects = {shape: "shape" for shape in shapes}
        row = {"caption": caption, "seed": 2000 + number}
        for method in CROWDED_METHODS:
            started = time.perf_counter()
            image = _neglect_image(context, method, caption, subjects, 2000 + number)
            seconds[method].append(time.perf_counter() - started)
            context.keep("crowded", f"{caption} (seed {2000 + number})", method, image)
            found = {obj.shape for obj in annotate(image)}
            count = sum(shape in found for shape in shapes)
            row[method] = {"present": count, "all_three_present": count == 3}
        records.append(row)
    result = {"n": len(records), **_summarise("crowded", records, CROWDED_METHODS, ("all_three_present",))}
    for method in CROWDED_METHODS:
        result[f"crowded/{method}"]["mean_present"] = _rate(row[method]["present"] for row in records)
        result[f"crowded/{method}"]["seconds_per_image"] = round(statistics.mean(seconds[method]), 4)
    return {**result, "records": records}


def task_editing(context: Context) -> dict:
    from headscope.steer.edit import edit
    from headscope.shapes.annotate import annotate, score_scene

    results = {}
    for number, (source, target, kind) in enumerate(edit_pairs(context)):
        for method, concept in (("p2p", None), ("p2p-hrv", kind)):
            outcome = edit(context.pipe, source.caption, target.caption, seed=1000 + number, concept=concept,
                           hrv=context.hrv if concept else None, num_inference_steps=context.steps,
                           guidance_scale=context.guidance)
            source_image, edited_image = outcome.source[0], outcome.edited[0]
            source_objects, edited_objects = annotate(source_image), annotate(edited_image)
            label = f"{source.caption} -> {target.caption} (seed {1000 + number})"
            context.keep(f"editing/{kind}", label, "source", source_image)
            context.keep(f"editing/{kind}", label, method, edited_image)
            score = score_scene(target, edited_objects)
            results.setdefault(f"{method}/{kind}", []).append({
                "caption": source.caption, "target": target.caption, "seed": 1000 + number,
                "success": bool(score[kind]),
                "mask_iou": _mask_iou(source_objects, edited_objects),
                "background_unchanged": _background_unchanged(source_image, edited_image, source_objects,
                                                              edited_objects)})
    summary = {key: {"n": len(rows), "success": _rate(r["success"] for r in rows),
                     "mask_iou": _rate(r["mask_iou"] for r in rows),
                     "background_unchanged": _rate(r["background_unchanged"] for r in rows)}
               for key, rows in sorted(results.items())}
    for kind in ("color", "shape"):
        if f"p2p-hrv/{kind}" in results:
            summary[f"p2p-hrv/{kind}"]["success vs p2p"] = _paired(
                [r["success"] for r in results[f"p2p/{kind}"]], [r["success"] for r in results[f"p2p-hrv/{kind}"]])
    return {**summary, "records": results}


def task_strengthening(context: Context) -> dict:
    from headscope.shapes.annotate import annotate, score_scene
    from headscope.steer import strengthen_factors, strengthen_hook

    # (1) one object at low guidance: is any one-object setting weak enough to need help?
    records = []
    for number, scene in enumerate(single_scenes(context, 4)):
        obj = scene.objects[0]
        hook = strengthen_hook(context.pipe, scene.caption, {obj.color: "color", obj.shape: "shape"}, hrv=context.hrv)
        row = {"caption": scene.caption, "seed": 1000 + number}
        for kind, hooks in (("baseline", None), ("strengthened", [hook])):
            image, _ = context.generate(scene.caption, 1000 + number, hooks, guidance=context.args.low_guidance)
            context.keep("strengthening/low_guidance", f"{scene.caption} (seed {1000 + number})", kind, image)
            score = score_scene(scene, annotate(image))
            row[kind] = {"color": bool(score["color"]), "shape": bool(score["shape"])}
        records.append(row)
    result = {"guidance": context.args.low_guidance,
              **_summarise("low_guidance", records, ("baseline", "strengthened"), ("color", "shape"))}
    # (2) where the model is weak: the colour sense of a polysemous word that ends the prompt
    color, shape = context.hrv.vector("color"), context.hrv.vector("shape")
    variants = {"baseline": None, "color_s1": strengthen_factors(color, 1.0), "color_s2": strengthen_factors(color, 2.0),
                "color_s2_shuffled_heads": lambda number: strengthen_factors(color, 2.0)[
                    _permutation(len(color), number)],
                "shape_hrv_s2": strengthen_factors(shape, 2.0)}
    weak = _sense_records(context, end_word_scenes(context), variants, 5000, "strengthening/end_word",
                          names=("glyph_drawn", "colour_right"))
    result.update(_summarise("end_word", weak, variants, ("colour_right", "glyph_drawn")))
    return {**result, "records": {"low_guidance": records, "end_word": weak}}


def task_binding(context: Context) -> dict:
    """Strengthening where the model is weak: both colour words of a two-object prompt x HRV_color."""
    from headscope.shapes.annotate import annotate, score_scene
    from headscope.steer import strengthen_hook

    records = []
    for number, scene in enumerate(pair_scenes(context)):
        hook = strengthen_hook(context.pipe, scene.caption, {obj.color: "color" for obj in scene.objects},
                               hrv=context.hrv)
        row = {"caption": scene.caption, "seed": 1000 + number}
        for kind, hooks in (("baseline", None), ("strengthened", [hook])):
            image = context.plain(scene.caption, 1000 + number) if hooks is None else \
                context.generate(scene.caption, 1000 + number, hooks)[0]
            context.keep("binding", f"{scene.caption} (seed {1000 + number})", kind, image)
            score = score_scene(scene, annotate(image))
            row[kind] = {"both_present": bool(score["both_present"]), "both_correct": bool(score["both_correct"])}
        records.append(row)
    return {**_summarise("binding", records, ("baseline", "strengthened"), ("both_present", "both_correct")),
            "records": records}


RUNNERS = {"overhead": task_overhead, "polysemy": task_polysemy, "neglect": task_neglect, "crowded": task_crowded,
           "editing": task_editing, "strengthening": task_strengthening, "binding": task_binding}


def save_sheet(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from headscope.viz import save_figure

    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)


def contact_sheet(name: str, rows: dict[str, dict]):
    """A figure: one row per prompt (its caption and seed on the left), one column per variant."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(variant for images in rows.values() for variant in images))
    figure, axes = plt.subplots(len(rows), len(variants), figsize=(1.6 * len(variants) + 2.2, 1.6 * len(rows)),
                                squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, variant in enumerate(variants):
            axis = axes[r][c]
            axis.set_xticks([]), axis.set_yticks([])
            if variant in images:
                axis.imshow(images[variant])
            if r == 0:
                axis.set_title(variant, fontsize=8)
        axes[r][0].set_ylabel(label.replace(" (seed", "\n(seed").replace(" -> ", "\n-> "), fontsize=7,
                              rotation=0, ha="right", va="center")
    figure.suptitle(f"steering benchmark: {name}", fontsize=9)
    figure.tight_layout()
    return figure


# -- scoring helpers ------------------------------------------------------------------------------

def _rate(values) -> float | None:
    values = [float(value) for value in values if value is not None]
    return round(float(np.mean(values)), 4) if values else None


def _paired(baseline, variant) -> dict:
    """Exact McNemar test of two paired lists of booleans (same prompts and seeds).

    baseline_only / variant_only count the prompts where only one of the two is true; p is the two-sided
    binomial test of those discordant pairs against 1/2 (1.0 when there are none).
    """
    from scipy.stats import binomtest

    baseline_only = sum(bool(b) and not bool(v) for b, v in zip(baseline, variant))
    variant_only = sum(bool(v) and not bool(b) for b, v in zip(baseline, variant))
    discordant = baseline_only + variant_only
    p = binomtest(variant_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"baseline_only": baseline_only, "variant_only": variant_only, "p": round(float(p), 4)}


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
    rows = []
    for task, values in result["tasks"].items():
        n = values.get("n", "")
        for variant, metrics in values.items():
            if variant == "records":
                continue
            if isinstance(metrics, dict):
                rows += [(task, variant, metric, _show(value), metrics.get("n", n))
                         for metric, value in metrics.items() if metric != "n"]
            elif variant not in ("n", "prompt", "adjust", "guidance", "repeats"):
                rows.append((task, "", variant, _show(metrics), n))
    return (f"steering benchmark — {result['model']}, HRV {result['hrv']}, {result['steps']} steps, guidance "
            f"{result['guidance']}, device {result['device']}, {result['threads']} threads\n"
            + harness.table(rows, ("task", "variant", "metric", "value", "n"), digits=4, left=3))


def _show(value):
    """A paired test as prompts only the baseline had : only the variant had, p; any other value as it is."""
    if isinstance(value, dict):
        return f"{value['baseline_only']}:{value['variant_only']} p={value['p']:.3f}"
    return value


if __name__ == "__main__":
    sys.exit(main())
