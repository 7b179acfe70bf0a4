"""Word-map quality on the shapes models, per map method and word role, on held-out prompts and seeds.

Splits (disjoint in prompts and in seeds):
  calibration  prompts of `eval_scenes(seed=4321)` (--cal-single / --cal-pair, captions that are also
               held-out prompts dropped) x seeds --cal-seeds (2, 3)
  held-out     the evaluation prompts of `eval_scenes()` (--n-single / --n-pair: 71 prompts) x --seeds (0, 1)
Every (prompt, seed) is generated once inside one trace (keep_steps), the annotator reads its objects
back, and every method's map of every content word comes from that one trace. Words are grouped by
role: shape nouns, colour, size and position words; an image whose annotation lacks the described
object is skipped (and counted).

Methods (`map_fit`): daam, selective (the HRV's top-k heads of the role's concept), weighted (every
head x its HRV relevance), fitted (the k heads best on the calibration split, passed as heads=) and an
oracle (the k heads best on the held-out split itself: an upper bound, not a result). Each method's
step window (all steps, the last half, the last quarter), its k and the tau* of DAAM's protocol are
fit per role on the calibration split (highest mean IoU at tau = 0.4) and scored on the held-out one:
  pointing game   the map's maximum lies inside the object's mask;
  DAAM            the map normalised and thresholded at tau in {0.3, 0.4, 0.5} (and tau*), IoU with the
                  union of the masks of the objects the word names; mIoU = mean over word-mask pairs;
  ConceptAttention  mask = map > its mean: pixel accuracy, mIoU (mean of foreground and background IoU,
                  per pair, averaged over pairs) and mAP (sklearn's average precision of the map's pixel
                  scores against the mask, averaged over pairs).

Models (--models): the embedded UNet ("shapes", the default) and the SD3-style joint-attention model
("shapes-mmdit"), one after the other in one process, each with its own shipped HRV and its call
defaults (the joint model's max_sequence_length). On a joint model one more method, "concept":
ConceptAttention's output-space concept maps, the caption's words of the word's role against
"background", made in the same trace as the word maps (`daam_joint`), its step window and tau* fit on
calibration as the others'. With more than one model a side-by-side table (model x method; per role
pointing, mIoU at tau* and CA mIoU) ends the output.

Maps of existing images (`headscope.image_maps`): scenes the renderer draws (no model drew them),
scored against the renderer's own masks, calibration scenes from the calibration prompts (noise
seeds from 100), held-out scenes from the held-out prompts (noise seeds from 0); the noising strength
(--strengths) is one more choice fit on the calibration scenes. UNet only: a joint model has no image
maps, and its figure (daam_methods_NAME.png beside the UNet's) shows its word maps (all heads, fitted
heads) and its concept maps.

The old keys stay: "summary" (plain DAAM, all steps, held-out split), "heads" (every head on its own,
each resolution level, the k best heads ranked on half of the held-out prompts and scored on the
other half) and "records". New: "splits", "methods", "image_maps", "goals"; and a figure
(--figure, default daam_methods.png next to --out): image | each method's map | ground truth. Those keys
hold the UNet's results; every other model's, the same keys and "concept_maps" (how they were made),
are under "models": {"shapes-mmdit": {...}}.

Usage:
  python benchmarks/daam_segmentation.py                 # embedded model (11 minutes on the shared 2 cores)
  python benchmarks/daam_segmentation.py --models shapes,shapes-mmdit   # both embedded models, side by side
  python benchmarks/daam_segmentation.py --tiny          # smoke run on a tiny random pipeline
  python benchmarks/daam_segmentation.py --tiny --models shapes,shapes-mmdit --image-cal 0
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import daam_figure
import daam_joint
import harness
import headscope
import map_fit
from headscope.errors import HeadscopeError
from headscope.maps import metrics
from headscope.models import DEFAULT_MODEL, EMBEDDED
from headscope.shapes.annotate import annotate
from headscope.shapes.evaluate import eval_scenes
from headscope.shapes.world import COLORS, PLURALS, POSITIONS, SIZES, Scene

TAUS = (0.3, 0.4, 0.5)
ROLE_ORDER = ("shape", "color", "size", "position")
WINDOWS = {"all": None, "0.5:1": (0.5, 1.0), "0.75:1": (0.75, 1.0)}  # step windows: every method may pick one
CAL_SCENE_SEED, IMAGE_CAL_SEED = 4321, 100


def word_targets(scene: Scene, objects) -> list[tuple[str, str, int, list]]:
    """(word, role, occurrence, detected objects it describes) for the prompt's content words."""
    words = scene.caption.split()
    seen: dict[str, int] = defaultdict(int)
    targets = []
    for position, word in enumerate(words):
        occurrence = seen[word]
        seen[word] += 1
        owner = _owner(scene, words, position)
        if owner is None:
            continue
        role = ("shape" if word in PLURALS or word in PLURALS.values() else "color" if word in COLORS
                else "size" if word in SIZES else "position" if word in POSITIONS else None)
        if role is None:
            continue
        if role == "shape" and word in COLORS and owner.shape != word:
            role = "color"  # "orange"/"rose" used as a colour
        matching = [o for o in objects if o.shape == owner.shape and o.color == owner.color] or \
                   [o for o in objects if o.shape == owner.shape]
        if scene.kind == "count":
            matching = [o for o in objects if o.shape == owner.shape]
        targets.append((word, role, occurrence, matching))
    return targets


def _owner(scene: Scene, words: list[str], position: int):
    """The scene object a word belongs to: in a pair, words before 'and' describe the first object."""
    if scene.kind != "pair":
        return scene.objects[0]
    split = words.index("and")
    return scene.objects[0] if position < split else scene.objects[1] if position > split else None


def _context(scene: Scene, word: str, occurrence: int) -> str:
    """"one object", or which object of a pair the word describes."""
    if scene.kind != "pair":
        return "one object"
    words = scene.caption.split()
    position = [i for i, w in enumerate(words) if w == word][occurrence]
    return "pair, first" if position < words.index("and") else "pair, second"


def evaluate_maps(pipe, scenes, seeds, *, steps: int, guidance: float, batch: int, upsample: str,
                  windows: dict | None = None, call_options: dict | None = None, concepts: bool = False):
    """Records (one per content word and image). A scored record keeps its target mask (`target`), its
    per-layer native maps per step window (`maps`, see `map_fit.native_maps`), its per-head maps at
    latent size (`_heads`) and its image (`_image`); plain DAAM's scores (all heads, all steps) are in
    the record's own keys (pointing, iou@tau, head_pointing). `concepts` (joint models): also its concept
    map per window (`concept_maps`, see `daam_joint`), one image per trace."""
    windows = windows or {"all": None}
    batch = 1 if concepts else batch  # a trace's concepts are shared by its images: each image gets its own
    records = []
    jobs = [(scene, seed) for seed in seeds for scene in scenes]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start: start + batch]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        stream, roles = daam_joint.concept_stream(pipe, word_targets(chunk[0][0], [])) if concepts else (None, None)
        keep_steps = any(spec is not None for spec in windows.values())
        with headscope.trace(pipe, keep_steps=keep_steps, concepts=stream) as tc:
            images = pipe([s.caption for s, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=generators, **(call_options or {})).images
        for i, ((scene, seed), image) in enumerate(zip(chunk, images)):
            for record in _word_records(scene, annotate(image), seed):
                if record["found"]:
                    _add_maps(record, tc, i, windows)
                    if concepts:
                        daam_joint.add_concept_maps(record, tc, i, windows, roles)
                    _score_daam(record, tc.index.latent_hw, upsample)
                    record["_image"] = np.asarray(image)
                records.append(record)
        print(f"  {min(start + batch, len(jobs))}/{len(jobs)} images", file=sys.stderr)
    return records


def rendered_records(pipe, scenes, *, strengths, samples: int, seed: int, steps: int, windows: dict) -> list[dict]:
    """Records of scenes the renderer drew, scored against the renderer's masks; their maps come from
    `headscope.image_maps` at every strength, as views "s=STRENGTH/WINDOW"."""
    from types import SimpleNamespace

    from PIL import Image

    from headscope.shapes.world import render

    records = []
    for number, scene in enumerate(scenes):
        pixels, masks = render(scene)
        objects = [SimpleNamespace(shape=o.shape, color=o.color, mask=m) for o, m in zip(scene.objects, masks)]
        scene_records = _word_records(scene, objects, seed)
        for strength in strengths:
            tc = headscope.image_maps(pipe, Image.fromarray(pixels), scene.caption, strength=strength,
                                      samples=samples, steps=steps, seed=seed, keep_steps=True)
            for record in scene_records:
                _add_maps(record, tc, 0, windows, prefix=f"s={strength}/")
        for record in scene_records:
            record["_image"] = pixels
        records += scene_records
        print(f"  {number + 1}/{len(scenes)} rendered scenes", file=sys.stderr)
    return records


def _word_records(scene: Scene, objects, seed: int) -> list[dict]:
    """One record per content word of `scene`, with the union of its objects' masks as `target` when found."""
    records = []
    for word, role, occurrence, matching in word_targets(scene, objects):
        record = {"prompt": scene.caption, "seed": seed, "word": word, "role": role,
                  "context": _context(scene, word, occurrence), "found": bool(matching), "_occurrence": occurrence}
        if matching:
            record["target"] = np.logical_or.reduce([o.mask for o in matching])
        records.append(record)
    return records


def _add_maps(record: dict, tc, image: int, windows: dict, prefix: str = "") -> None:
    if record["found"]:
        maps = record.setdefault("maps", {})
        for name, spec in windows.items():
            maps[prefix + name] = map_fit.native_maps(tc, record["word"], record["_occurrence"], image, spec)


def _score_daam(record: dict, latent_hw, upsample: str) -> None:
    """Plain DAAM's scores (all heads, all steps) and the heads' own maps, under the record's old keys."""
    target = record["target"]
    heat = map_fit.head_stack(record["maps"]["all"], target.shape, upsample).sum(dim=0)  # = tc.word_map(word)
    record["pointing"] = metrics.pointing(heat, target)
    record["chance_pointing"] = float(target.mean())
    for tau in TAUS:
        record[f"iou@{tau}"] = metrics.daam_iou(heat, target, tau)
    record["chance_iou"] = float(target.mean())
    record["_heads"] = map_fit.head_stack(record["maps"]["all"], latent_hw, upsample)  # [heads, h, w] latent size
    record["_target"] = target
    record["head_pointing"] = _pointing(_to_image(record["_heads"], target.shape, upsample), target)


def _to_image(maps: torch.Tensor, size, upsample: str) -> torch.Tensor:
    """[n, h, w] maps -> [n, H, W] at image size."""
    mode = "bicubic" if upsample == "bicubic" else "nearest"
    return torch.nn.functional.interpolate(maps[:, None].float(), size=tuple(size), mode=mode)[:, 0]


def _pointing(maps: torch.Tensor, target: np.ndarray) -> list[int]:
    """For each map of [n, H, W]: 1 when its maximum lies inside the target mask."""
    flat = maps.flatten(1).argmax(dim=1)
    width = maps.shape[-1]
    return [int(target[int(index) // width, int(index) % width]) for index in flat]


def head_analysis(records, index, upsample: str, ks=(1, 4, 8)) -> dict:
    """Per role: pointing of each head, of each level's heads summed, and of the k best heads
    (ranked on half of the prompts, scored on the other half; two folds averaged)."""
    levels = sorted({layer.level for layer in index.layers})
    heads_at = {level: [h for layer in index.layers if layer.level == level
                        for h in range(layer.offset, layer.offset + layer.heads)] for level in levels}
    out = {}
    for role in ("shape", "color", "size", "position"):
        scored = [r for r in records if r["role"] == role and r["found"]]
        if not scored:
            continue
        per_head = np.mean([r["head_pointing"] for r in scored], axis=0)
        entry = {"head_pointing": [round(float(v), 3) for v in per_head],
                 "best_head": int(per_head.argmax()), "best_head_pointing": float(per_head.max()),
                 "level_pointing": {}}
        for level in levels:
            hits = [_pointing(_to_image(r["_heads"][heads_at[level]].sum(0, keepdim=True), r["_target"].shape,
                                        upsample), r["_target"])[0] for r in scored]
            entry["level_pointing"][_resolution(index, level)] = float(np.mean(hits))
        # Two folds over the prompts (alternate prompts, both seeds): heads are ranked on one half's
        # images and scored on the other half's, never on the prompts they were chosen with.
        prompts = sorted({r["prompt"] for r in records})
        half = {prompt: i % 2 for i, prompt in enumerate(prompts)}
        for k in ks:
            rates = []
            for choose in (0, 1):
                chosen_records = [r for r in scored if half[r["prompt"]] == choose]
                test = [r for r in scored if half[r["prompt"]] != choose]
                if not chosen_records or not test:
                    continue
                ranking = np.argsort(-np.mean([r["head_pointing"] for r in chosen_records], axis=0))[:k]
                hits = [_pointing(_to_image(r["_heads"][list(ranking)].sum(0, keepdim=True), r["_target"].shape,
                                            upsample), r["_target"])[0] for r in test]
                rates.append(float(np.mean(hits)))
            if rates:
                entry[f"top{k}_heads_heldout_pointing"] = float(np.mean(rates))
        out[role] = entry
    return out


def _resolution(index, level: int) -> str:
    layer = next(layer for layer in index.layers if layer.level == level)
    return f"{layer.resolution[0]}x{layer.resolution[1]}"


def summarize(records) -> dict:
    table = {}
    for role in ("shape", "color", "size", "position"):
        rows = [r for r in records if r["role"] == role]
        scored = [r for r in rows if r["found"]]
        if not rows:
            continue
        entry = {"n_words": len(rows), "n_scored": len(scored)}
        if scored:
            entry["pointing"] = float(np.mean([r["pointing"] for r in scored]))
            entry["chance_pointing"] = float(np.mean([r["chance_pointing"] for r in scored]))
            for tau in TAUS:
                entry[f"miou@{tau}"] = float(np.mean([r[f"iou@{tau}"] for r in scored]))
            entry["chance_miou"] = float(np.mean([r["chance_iou"] for r in scored]))
        contexts = sorted({r["context"] for r in scored})
        if len(contexts) > 1:
            entry["pointing_by_context"] = {c: float(np.mean([r["pointing"] for r in scored if r["context"] == c]))
                                            for c in contexts}
        table[role] = entry
    return table


def format_table(table: dict) -> str:
    keys = ["pointing", "chance_pointing", *(f"miou@{tau}" for tau in TAUS), "chance_miou"]
    columns = ["words", "scored", "pointing", "chance", *(f"mIoU@{tau}" for tau in TAUS), "chance"]
    lines = [harness.table([[role, e["n_scored"], *(e.get(key) for key in keys)] for role, e in table.items()],
                           columns)]  # n/a: no object found
    contexts = [(role, e["pointing_by_context"]) for role, e in table.items() if "pointing_by_context" in e]
    if contexts:
        lines.append("pointing by where the word stands: " + "; ".join(
            f"{role}: " + ", ".join(f"{c} {v:.3f}" for c, v in by.items()) for role, by in contexts))
    return "\n".join(lines)


def format_heads(heads: dict) -> str:
    if not heads:
        return ""
    levels = list(next(iter(heads.values()))["level_pointing"])
    tops = [key for key in next(iter(heads.values())) if key.startswith("top")]
    rows = [[role, f"#{e['best_head']} {e['best_head_pointing']:.3f}",
             *(e["level_pointing"][level] for level in levels), *(e[key] for key in tops)] for role, e in heads.items()]
    return ("pointing by heads (top-k: ranked on half of the prompts, scored on the other half)\n"
            + harness.table(rows, ["words", "best head", *levels, *(key.split("_")[0] for key in tops)]))


def format_methods(table: dict, title: str) -> str:
    """One row per role and method: its choices, then every protocol's held-out numbers."""
    columns = ["words", "method", "view", "k", "n", "pointing", *(f"mIoU@{tau}" for tau in TAUS), "tau*",
               "mIoU@tau*", "CA acc", "CA mIoU", "CA mAP"]
    rows = []
    for role, methods in table.items():
        for method, entry in methods.items():
            held, config = entry["heldout"], entry["config"]
            if not held.get("n"):
                continue
            rows.append([role, method, config["view"], config["k"] or "-", held["n"], held["pointing"],
                         *(held[f"miou@{tau}"] for tau in TAUS), config["tau_fit"], held["miou@fit"],
                         held["mean_threshold_pixel_accuracy"], held["mean_threshold_miou"],
                         held["mean_threshold_ap"]])
    return (f"{title} (CA: ConceptAttention's protocol, mask = map > its mean; oracle: heads, k and view "
            "chosen on the held-out split itself)\n" + harness.table(rows, columns))


def goals(methods: dict, image_methods: dict | None) -> dict:
    """The issue's held-out goals, met or not, by the best non-oracle method."""
    def best(table, role, key):
        entries = {m: e["heldout"][key] for m, e in (table or {}).get(role, {}).items()
                   if m != "oracle" and e["heldout"].get("n")}
        if not entries:
            return {"method": None, "value": None}
        method = max(entries, key=entries.get)
        return {"method": method, "value": entries[method], "daam": entries.get("daam")}

    found = {"noun_miou@0.4": {**best(methods, "shape", "miou@0.4"), "goal": 0.70},
             "color_pointing": {**best(methods, "color", "pointing"), "goal": 0.80}}
    for entry in found.values():
        entry["met"] = entry["value"] is not None and entry["value"] >= entry["goal"]
    if image_methods:
        found["rendered_noun_miou@0.4"] = {**best(image_methods, "shape", "miou@0.4"), "goal": None}
    return found


def ceilings(records, index, hrv, upsample: str) -> dict:
    """Why a map can miss, per role: the IoU@0.4 of the object's own mask average-pooled to each layer
    resolution and upsampled as a head's map is (the best any head of that level could do), and the
    resolutions of the HRV's 8 most relevant heads of the role's concept."""
    import torch.nn.functional as F

    from headscope.maps.daam import _upsample

    levels = sorted({layer.resolution for layer in index.layers}, reverse=True)
    found: dict = {"perfect_map_at_resolution_miou@0.4": {}, "hrv_top8_heads_by_resolution": {}}
    for role in ROLE_ORDER:
        scored = [r for r in records if r["role"] == role and r["found"]]
        if scored:
            found["perfect_map_at_resolution_miou@0.4"][role] = {
                f"{h}x{w}": float(np.mean([metrics.daam_iou(_upsample(F.adaptive_avg_pool2d(
                    torch.from_numpy(r["target"]).float()[None, None], (h, w))[0], r["target"].shape, upsample)[0],
                    r["target"], 0.4) for r in scored])) for h, w in levels}
        if hrv is not None:
            counts: dict = defaultdict(int)
            for head in hrv.top_heads(map_fit.ROLE_CONCEPT[role], min(8, index.n_heads)).tolist():
                layer = index.layers[index.unflat(head)[0]]
                counts[f"{layer.resolution[0]}x{layer.resolution[1]}"] += 1
            found["hrv_top8_heads_by_resolution"][role] = dict(counts)
    return found


def options():
    parser = harness.parser(__doc__, "daam_segmentation", tiny="shapes", device=False)
    parser.add_argument("--seeds", default="0,1", help="held-out seeds")
    parser.add_argument("--cal-seeds", default="2,3", help="calibration seeds")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--upsample", default="bicubic", choices=("bicubic", "box"))
    parser.add_argument("--n-single", type=int, default=48, help="held-out one-object prompts")
    parser.add_argument("--n-pair", type=int, default=24, help="held-out two-object prompts")
    parser.add_argument("--cal-single", type=int, default=32, help="calibration one-object prompts")
    parser.add_argument("--cal-pair", type=int, default=16, help="calibration two-object prompts")
    parser.add_argument("--batch", type=int, default=8, help="images per trace (a joint model: 1, see daam_joint)")
    parser.add_argument("--models", default=DEFAULT_MODEL,
                        help=f"embedded models to run, comma-separated, of {', '.join(EMBEDDED)} (default: "
                             f"{DEFAULT_MODEL}); e.g. shapes,shapes-mmdit")
    parser.add_argument("--hrv", default=None, help=f"HRV file of selective / weighted on {DEFAULT_MODEL} or --model "
                                                    "(default: each model's own; --tiny: a random one)")
    parser.add_argument("--image-cal", type=int, default=16, help="rendered calibration scenes (0: no image maps)")
    parser.add_argument("--image-heldout", type=int, default=24, help="rendered held-out scenes")
    parser.add_argument("--strengths", default="0.3,0.5,0.7", help="noising strengths to choose from")
    parser.add_argument("--samples", type=int, default=4, help="noise samples per image map")
    parser.add_argument("--figure", type=Path, default=None,
                        help="comparison figure (default: daam_methods.png next to --out)")
    # One thread: the embedded model is too small to gain from more, and on shared cores OpenMP's
    # spinning threads made this run several times slower (measured: 74 images in 15 min vs 2 min).
    parser.set_defaults(threads=1)
    return parser


def _numbers(text: str, kind=int) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def _hrv(args, pipe, path):
    """(the HRV of selective / weighted, what it is): `path`, the model's shipped HRV, or with --tiny a random one."""
    from headscope.steer.scale import resolve_hrv

    if args.tiny and path is None:
        from headscope.shapes.world import GEOMETRIC
        from headscope.testing import random_hrv

        words = {"color": [c for c in COLORS if c not in ("rose", "orange")], "shape": list(GEOMETRIC),
                 "size": list(SIZES), "position": list(POSITIONS)}
        return random_hrv(pipe, words, seed=0), "random HRV (--tiny)"
    return resolve_hrv(pipe, path), path or "the model's own HRV"


def _splits(args):
    """(calibration scenes, held-out scenes): disjoint captions; seeds are disjoint by the options."""
    heldout = eval_scenes(n_single=args.n_single, n_pair=args.n_pair, n_count=0, n_polysemy=0)
    held_captions = {s.caption for s in heldout}
    calibration = [s for s in eval_scenes(seed=CAL_SCENE_SEED, n_single=args.cal_single, n_pair=args.cal_pair,
                                          n_count=0, n_polysemy=0) if s.caption not in held_captions]
    return calibration, heldout


def _spread(scenes, n: int):
    """n scenes spread evenly over the list (one-object and two-object prompts alike)."""
    if n >= len(scenes):
        return list(scenes)
    return [scenes[int(i * len(scenes) / n)] for i in range(n)]


def _image_maps(pipe, args, cal_scenes, held_scenes, index, hrv) -> dict | None:
    """Maps of rendered scenes: strength, window and k fit on calibration scenes, scored on held-out ones."""
    if args.image_cal <= 0 or args.image_heldout <= 0:
        return None
    strengths = _numbers(args.strengths, float)
    print(f"maps of rendered scenes: {args.image_cal} calibration scenes x strengths {strengths}", file=sys.stderr)
    calibration = rendered_records(pipe, _spread(cal_scenes, args.image_cal), strengths=strengths,
                                   samples=args.samples, seed=IMAGE_CAL_SEED, steps=args.steps, windows=WINDOWS)
    views = [f"s={s}/{w}" for s in strengths for w in WINDOWS]
    fit = map_fit.Fit(hrv, index.n_heads, views, _image_size(calibration), args.upsample)
    scored_cal = [r for r in calibration if r["found"]]
    fit.rank_heads(scored_cal, [])
    cal_scores = fit.cheap_scores(scored_cal)
    chosen = sorted({float(c["view"].split("/")[0][2:]) for role in map_fit.ROLES for method in map_fit.METHODS
                     if method != "oracle" and (c := fit.choose(cal_scores, role, method)) is not None})
    print(f"  held-out: {args.image_heldout} scenes at the chosen strengths {chosen}", file=sys.stderr)
    heldout = rendered_records(pipe, _spread(held_scenes, args.image_heldout), strengths=chosen or strengths[:1],
                               samples=args.samples, seed=0, steps=args.steps, windows=WINDOWS)
    table = map_fit.fit_and_score(fit, scored_cal, [r for r in heldout if r["found"]])
    return {"calibration_scenes": len(_spread(cal_scenes, args.image_cal)),
            "heldout_scenes": len(_spread(held_scenes, args.image_heldout)), "strengths": strengths,
            "heldout_strengths": chosen, "samples": args.samples, "noise_seeds": {"calibration": IMAGE_CAL_SEED,
                                                                                  "heldout": 0},
            "methods": table, "_fit": fit, "_heldout": heldout}


def _image_size(records) -> tuple[int, int]:
    """(H, W) of the records' masks."""
    return next((r["target"].shape for r in records if r["found"]), (64, 64))


def measure(args) -> dict:
    """The default model's result under the old keys, every other model's under "models"."""
    names = _models(args)
    if set(_numbers(args.seeds)) & set(_numbers(args.cal_seeds)):
        raise HeadscopeError(f"--seeds {args.seeds} and --cal-seeds {args.cal_seeds} overlap; the splits must not share seeds")
    results = {name: measure_model(args, name) for name in names}
    if len(results) > 1:
        print(daam_joint.side_by_side(results))
    primary = results.pop(DEFAULT_MODEL, {})
    return {**primary, "models": results} if results else primary


def _models(args) -> list[str]:
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in EMBEDDED]
    if unknown or not names:
        raise HeadscopeError(f"--models {args.models}: give embedded models, comma-separated, of {', '.join(EMBEDDED)}")
    if args.model is not None and names != [DEFAULT_MODEL]:
        raise HeadscopeError(f"--model {args.model} runs that one pipeline; --models names embedded models: give one "
                             "or the other")
    return list(dict.fromkeys(names))


def measure_model(args, name: str) -> dict:
    """One model's result: its word maps (and on a joint model its concept maps) fit and scored."""
    from headscope.models import model_defaults

    primary = name == DEFAULT_MODEL
    pipe, model_name = harness.load(args) if primary else daam_joint.load(args, name)
    joint = daam_joint.is_joint(pipe)
    guidance = args.guidance if args.guidance is not None else model_defaults(pipe).get("guidance_scale", 5.0)
    hrv, hrv_name = _hrv(args, pipe, args.hrv if primary else None)
    cal_scenes, held_scenes = _splits(args)
    seeds, cal_seeds = _numbers(args.seeds), _numbers(args.cal_seeds)
    generation = {"steps": args.steps, "guidance": guidance, "batch": args.batch, "upsample": args.upsample,
                  "windows": WINDOWS, "call_options": daam_joint.call_options(pipe, bool(args.tiny)),
                  "concepts": joint}
    started = time.perf_counter()
    print(f"{name}: calibration: {len(cal_scenes)} prompts x seeds {cal_seeds}", file=sys.stderr)
    calibration = evaluate_maps(pipe, cal_scenes, cal_seeds, **generation)
    print(f"{name}: held-out: {len(held_scenes)} prompts x seeds {seeds}", file=sys.stderr)
    records = evaluate_maps(pipe, held_scenes, seeds, **generation)
    index = _head_index(pipe)
    size = _image_size(records)
    fit = map_fit.Fit(hrv, index.n_heads, list(WINDOWS), size, args.upsample)
    scored_cal, scored = [r for r in calibration if r["found"]], [r for r in records if r["found"]]
    methods = map_fit.fit_and_score(fit, scored_cal, scored)
    if joint:
        for role, entry in daam_joint.score_concepts(scored_cal, scored, list(WINDOWS), size, args.upsample).items():
            methods.setdefault(role, {}).update(entry)
    table = summarize(records)
    heads = head_analysis(records, index, args.upsample)
    image_maps = None if joint else _image_maps(pipe, args, cal_scenes, held_scenes, index, hrv)
    figure = args.figure or args.out.with_name("daam_methods.png")
    if not joint:
        daam_figure.save(figure, records, fit, methods, image_maps)
    else:  # a joint model's figure beside the UNet's: word maps and concept maps
        daam_figure.save(figure.with_name(f"{figure.stem}_{name}{figure.suffix}"), records, fit, methods, None,
                         shown=daam_figure.JOINT_FIGURE_METHODS,
                         concept_fit=daam_joint.concept_fit(list(WINDOWS), size, args.upsample))
    print(f"DAAM vs annotator masks — {model_name}, held-out {len(held_scenes)} prompts x {len(seeds)} seeds, "
          f"{args.steps} steps, guidance {guidance}, upsample {args.upsample}")
    print(format_table(table))
    print(format_heads(heads))
    print(format_methods(methods, f"map methods on held-out prompts and seeds (fit on {len(cal_scenes)} calibration "
                                  f"prompts x seeds {cal_seeds})"))
    if image_maps:
        print(format_methods(image_maps["methods"], f"maps of {image_maps['heldout_scenes']} rendered held-out scenes "
                                                    "(strength, window, k fit on rendered calibration scenes)"))
    reached = goals(methods, image_maps and image_maps["methods"])
    print("goals: " + "; ".join(f"{goal} {e['value'] if e['value'] is None else round(e['value'], 3)} "
                                f"({e['method']}){'' if e['goal'] is None else ' met' if e['met'] else ' missed'}"
                                for goal, e in reached.items()))
    result = {"model": model_name, "prompts": len(held_scenes), "seeds": seeds, "steps": args.steps,
              "guidance": guidance, "upsample": args.upsample, "seconds": time.perf_counter() - started,
              "summary": table, "heads": heads,
              "splits": {"calibration": {"prompts": len(cal_scenes), "scene_seed": CAL_SCENE_SEED, "seeds": cal_seeds,
                                         "words_scored": len(scored_cal)},
                         "heldout": {"prompts": len(held_scenes), "scene_seed": 1234, "seeds": seeds,
                                     "words_scored": len(scored)},
                         "views": {view: spec for view, spec in WINDOWS.items()}, "hrv": hrv_name,
                         "fit": "per role and method: view (step window; strength for image maps) and k with the "
                                "highest calibration mean IoU at tau=0.4, then tau* on " + str(list(map_fit.TAU_GRID)),
                         "k_grid": fit.ks},
              "methods": methods, "image_maps": image_maps, "goals": reached,
              "ceilings": ceilings(records, index, hrv, args.upsample),
              "records": [_public(record) for record in records]}
    if joint:
        result["call_options"] = generation["call_options"]
        result["concept_maps"] = daam_joint.protocol(index, WINDOWS)
    return result


def _head_index(pipe):
    from headscope.heads import HeadIndex

    return HeadIndex.from_model(pipe)


def _public(record: dict) -> dict:
    hidden = ("maps", "concept_maps", "target")
    return {key: value for key, value in record.items() if not key.startswith("_") and key not in hidden}


def main(argv=None) -> int:
    return harness.run(measure, options(), argv, indent=1)


if __name__ == "__main__":
    sys.exit(main())
