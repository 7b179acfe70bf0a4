"""Steering by heads, measured on the shapes world: cost, polysemy, neglect, editing, strengthening.

    python benchmarks/steering.py --tiny                    # smoke run on a tiny random pipeline
    python benchmarks/steering.py                           # the embedded shapes model and its HRV
    python benchmarks/steering.py --n-prompts 10 --tasks polysemy neglect
    # both embedded models side by side, in one process (issue #16; 50 prompts per task):
    python benchmarks/steering.py --models shapes,shapes-mmdit --tasks polysemy neglect \
        --out benchmarks/results/steering_models.json

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

--models NAME,NAME runs the tasks on each embedded model in turn ("shapes": the UNet; "shapes-mmdit":
the SD3-style joint-attention model, called with its shipped call defaults), each with its own HRV,
steps and guidance, on the same prompts and seeds: those every model's text encoders take (the mmdit's
T5 knows only the training captions' words, so beside it the end-word set is its 12 "in rose"
captions, without "colored" and "painted"). The first model's results keep the one-model keys;
each other's go under "models": {NAME: {...}} with the same layout; the table has a value and an n
column per model. With --tiny the names stand for tiny random pipelines of their families (SD, SD3).
What a joint-attention model lacks is reported as n/a with the reason ("unsupported" in the JSON):
editing (prompt-to-prompt injects a UNet's cross- and self-attention maps) and diffusers' A&E pipeline
(SD 1.x / 2.x only). Every other task and variant runs unchanged: head scaling acts on the image
queries' text keys, A&E and A&E-HRV on the joint-attention maps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import harness
from headscope.errors import HeadscopeError
from steering_prompts import (crowded_prompts, edit_pairs, end_word_scenes, object_sense_scenes, pair_scenes,
                              polysemy_scenes, single_scenes)
from steering_table import table

TASKS = ("overhead", "polysemy", "neglect", "crowded", "editing", "strengthening", "binding")
NEGLECT_METHODS = ("plain", "ae", "ae-hrv", "heads", "diffusers-ae")
CROWDED_METHODS = ("plain", "ae", "ae-hrv", "heads")
UNET_ONLY = {"editing": "P2P edits UNet cross/self-attention",  # task or method -> why joint models lack it
             "diffusers-ae": "diffusers' A&E pipeline is SD 1.x/2.x only"}
TINY_SD3 = "tiny random SD3 pipeline (headscope.testing_joint.build_tiny_sd3)"
SHEET_ROWS = 8  # prompts per contact sheet (--images)
BACKGROUND_TOLERANCE = 16  # a background pixel is unchanged when no channel moved by more than this (0-255)


def options():
    parser = harness.parser(__doc__, "steering", tiny="sd")
    parser.add_argument("--models", type=_models, default=None, metavar="shapes,shapes-mmdit",
                        help="embedded models to run side by side in this process (default: --model, or the "
                             "embedded shapes model; with --tiny, tiny random pipelines of their families)")
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


def _models(value: str) -> list[str]:
    from headscope.models import EMBEDDED

    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names or len(set(names)) < len(names) or any(name not in EMBEDDED for name in names):
        raise argparse.ArgumentTypeError(f"{value!r}: give embedded models once each, of {', '.join(EMBEDDED)}")
    return names


def measure(args) -> dict:
    if args.n_prompts is None:
        args.n_prompts = 4 if args.tiny else 50
    if args.n_prompts < 1:
        raise HeadscopeError(f"--n-prompts must be at least 1, not {args.n_prompts}")
    names = model_names(args)
    _quiet()
    loaded = {name: load(args, name) for name in names}
    checks = [prompt_check(pipe) for pipe, _ in loaded.values()]  # every model gets the same prompts
    results = {name: measure_model(args, name, *loaded[name], checks, sheet_prefix=f"{name}-" if number else "")
               for number, name in enumerate(names)}
    print(table(results))
    first, *others = results.values()
    if others:
        first["models"] = {name: results[name] for name in names[1:]}
    return first


def model_names(args) -> list[str | None]:
    """The models to run: the names of --models, or [None] for the one model of --model, --tiny or the default."""
    if not args.models:
        return [None]
    if args.model:
        raise HeadscopeError("--models names embedded models; give --model or --models, not both")
    if args.hrv and len(args.models) > 1:
        raise HeadscopeError("--hrv is one model's HRV; give it with one model (each of --models uses its own)")
    return args.models


def measure_model(args, name: str | None, pipe, model: str, checks: list, sheet_prefix: str = "") -> dict:
    """The tasks on one model (`name` of --models; None: --model), a task its family lacks as unsupported, on the
    prompts every `checks` takes; its contact sheets (--images) go to files named with `sheet_prefix` first."""
    hrv = load_hrv(pipe, args)
    steps, guidance = settings(pipe, args)
    context = Context(pipe, hrv, args, steps, guidance, checks)
    result = {"model": model, "hrv": args.hrv or ("random (tiny)" if args.tiny else "model default"),
              **harness.machine(pipe), "steps": steps, "guidance": guidance, "n_prompts": args.n_prompts, "tasks": {}}
    for task in args.tasks:
        started = time.perf_counter()
        print(f"[steering] {name + ': ' if name else ''}{task}...", file=sys.stderr, flush=True)
        why = context.lacks(task)
        if why:
            result["tasks"][task] = {"unsupported": why}
            continue
        result["tasks"][task] = RUNNERS[task](context)
        result["tasks"][task]["wall_seconds"] = round(time.perf_counter() - started, 2)
    for sheet, rows in context.sheets.items():
        path = Path(args.images) / (sheet_prefix + sheet.replace("/", "-") + ".png")
        print(f"wrote {save_sheet(contact_sheet(sheet_prefix + sheet, rows), path)}", file=sys.stderr)
    return result


def load(args, name: str | None):
    """(pipeline, what it is): embedded model `name` (with --tiny, a tiny random pipeline of its family), or
    for None the one pipeline of --model / --tiny."""
    if args.tiny and name == "shapes-mmdit":
        from headscope.testing_joint import build_tiny_sd3

        return build_tiny_sd3(Path(tempfile.mkdtemp(prefix="headscope-bench-"))), TINY_SD3
    return harness.load(argparse.Namespace(**{**vars(args), "model": name or args.model}))


def prompt_check(pipe):
    """Whether a prompt fits the text encoders of `pipe` whose tokens are keys: CLIP's token limit, and SD3's
    T5 at the model's max_sequence_length, in words its tokenizer knows (the shapes-mmdit's T5 vocabulary is
    the training captions' words). The tiny tokenizers spell unknown words letter by letter."""
    from headscope.models import call_defaults
    from headscope.prompts import prompt_tokens
    from headscope.steer import key_encoders, max_length

    limit, defaults = max_length(pipe), call_defaults(pipe)
    others = [encoder for encoder in key_encoders(pipe) if encoder != "clip"]

    def fits(prompt: str) -> bool:
        if len(pipe.tokenizer(prompt).input_ids) > limit:
            return False
        try:
            for encoder in others:
                prompt_tokens(pipe, prompt, encoder, **defaults)
        except HeadscopeError:
            return False
        return True

    return fits


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

    def __init__(self, pipe, hrv, args, steps: int, guidance: float, checks: list):
        self.pipe, self.hrv, self.args, self.steps, self.guidance = pipe, hrv, args, steps, guidance
        from headscope.backbones import backbone_for
        from headscope.models import call_defaults

        self.checks = checks  # prompt_check of every model of the run
        self.family = backbone_for(pipe).family
        self.defaults = call_defaults(pipe)  # the mmdit's max_sequence_length
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
        """Whether every model of the run takes the prompt (`prompt_check`), so all get the same prompt sets."""
        return all(check(prompt) for check in self.checks)

    def lacks(self, name: str) -> str | None:
        """Why this model's family has no task or method `name` (UNET_ONLY on joint models); None when it has."""
        return UNET_ONLY.get(name) if self.family != "unet" else None

    def call(self, seed: int, guidance: float | None = None) -> dict:
        return dict(num_inference_steps=self.steps, guidance_scale=self.guidance if guidance is None else guidance,
                    generator=torch.Generator("cpu").manual_seed(seed), **self.defaults)

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

    methods = [method for method in NEGLECT_METHODS if not context.lacks(method)]
    records, seconds = [], {method: [] for method in methods}
    for number, scene in enumerate(pair_scenes(context)):
        subjects = {obj.shape: "shape" for obj in scene.objects}
        row = {"caption": scene.caption, "seed": 1000 + number}
        for method in methods:
            started = time.perf_counter()
            image = _neglect_image(context, method, scene.caption, subjects, 1000 + number)
            seconds[method].append(time.perf_counter() - started)
            context.keep("neglect", f"{scene.caption} (seed {1000 + number})", method, image)
            score = score_scene(scene, annotate(image))
            row[method] = {"both_present": bool(score["both_present"]), "both_correct": bool(score["both_correct"])}
        records.append(row)
    result = {"n": len(records), **_summarise("neglect", records, methods, ("both_present", "both_correct"))}
    for method in methods:
        result[f"neglect/{method}"]["seconds_per_image"] = round(statistics.mean(seconds[method]), 4)
    lacking = {f"neglect/{method}": {"unsupported": context.lacks(method)}
               for method in NEGLECT_METHODS if method not in methods}
    return {**result, **lacking, "records": records}


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


if __name__ == "__main__":
    sys.exit(main())
