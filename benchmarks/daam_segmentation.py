"""DAAM map quality on the shapes model: pointing game and mIoU against the annotator's object masks.

For every evaluation prompt and seed the image is generated inside a trace, the annotator reads its
objects back, and each word's DAAM map is compared with the mask of the object the word describes:
  pointing game  the map's maximum lies inside that object's mask;
  mIoU           the map thresholded at tau (DAAM: normalised >= tau) against the union of the masks
                 of the objects the word names, averaged over images, for tau in {0.3, 0.4, 0.5}.
Words are grouped by role: shape nouns, colour, size and position words. An image whose annotation
lacks the described object is skipped (and counted). Chance levels are reported beside each score:
the pointing game of a random pixel (mean mask area / image area) and the mIoU of a full-image mask.

Per head: the pointing game of every head's own map (`tc.head_maps`), of each resolution level's
heads summed, and of the k best heads summed, with the heads ranked on half of the prompts and scored
on the other half (two folds, averaged), so a choice is never scored on the prompts it was made on.

Usage:
  python benchmarks/daam_segmentation.py                 # embedded model, 2 seeds
  python benchmarks/daam_segmentation.py --tiny          # smoke run on a tiny random pipeline
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import numpy as np
import torch

import harness
import headscope
from headscope.maps.daam import threshold
from headscope.shapes.annotate import annotate
from headscope.shapes.evaluate import eval_scenes
from headscope.shapes.world import COLORS, PLURALS, POSITIONS, SIZES, Scene

TAUS = (0.3, 0.4, 0.5)


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


def evaluate_maps(pipe, scenes, seeds, *, steps: int, guidance: float, batch: int, upsample: str):
    """Records (one per content word and image); scored records keep their per-head maps in `_heads`."""
    records = []
    jobs = [(scene, seed) for seed in seeds for scene in scenes]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start: start + batch]
        generators = [torch.Generator().manual_seed(seed) for _, seed in chunk]
        with headscope.trace(pipe) as tc:
            images = pipe([s.caption for s, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=generators).images
        for i, ((scene, seed), image) in enumerate(zip(chunk, images)):
            objects = annotate(image)
            for word, role, occurrence, matching in word_targets(scene, objects):
                record = {"prompt": scene.caption, "seed": seed, "word": word, "role": role,
                          "context": _context(scene, word, occurrence), "found": bool(matching)}
                if matching:
                    target = np.logical_or.reduce([o.mask for o in matching])
                    heat = tc.word_map(word, occurrence=occurrence, image=i, upsample=upsample)
                    peak = np.unravel_index(int(torch.argmax(heat)), heat.shape)
                    record["pointing"] = bool(target[peak])
                    record["chance_pointing"] = float(target.mean())
                    for tau in TAUS:
                        mask = threshold(heat, tau).numpy()
                        record[f"iou@{tau}"] = float((mask & target).sum() / max(1, (mask | target).sum()))
                    record["chance_iou"] = float(target.mean())
                    record["_heads"] = tc.head_maps(word, occurrence=occurrence, image=i)  # [heads, h, w] latent size
                    record["_target"] = target
                    record["head_pointing"] = _pointing(_to_image(record["_heads"], target.shape, upsample), target)
                records.append(record)
        print(f"  {min(start + batch, len(jobs))}/{len(jobs)} images", file=sys.stderr)
    return records


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


def options():
    parser = harness.parser(__doc__, "daam_segmentation", tiny="shapes", device=False)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--upsample", default="bicubic", choices=("bicubic", "box"))
    parser.add_argument("--n-single", type=int, default=48)
    parser.add_argument("--n-pair", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    return parser


def measure(args) -> dict:
    from headscope.heads import HeadIndex
    from headscope.models import model_defaults

    pipe, model_name = harness.load(args)
    guidance = args.guidance if args.guidance is not None else model_defaults(pipe).get("guidance_scale", 5.0)
    scenes = [s for s in eval_scenes(n_single=args.n_single, n_pair=args.n_pair, n_count=0, n_polysemy=0)]
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    records = evaluate_maps(pipe, scenes, seeds, steps=args.steps, guidance=guidance, batch=args.batch,
                            upsample=args.upsample)
    table = summarize(records)
    heads = head_analysis(records, HeadIndex.from_unet(pipe.unet), args.upsample)
    for record in records:
        record.pop("_heads", None), record.pop("_target", None)
    print(f"DAAM vs annotator masks — {model_name}, {len(scenes)} prompts x {len(seeds)} seeds, "
          f"{args.steps} steps, guidance {guidance}, upsample {args.upsample}")
    print(format_table(table))
    print(format_heads(heads))
    return {"model": model_name, "prompts": len(scenes), "seeds": seeds, "steps": args.steps,
            "guidance": guidance, "upsample": args.upsample, "seconds": time.perf_counter() - started,
            "summary": table, "heads": heads, "records": records}


def main(argv=None) -> int:
    return harness.run(measure, options(), argv, indent=1)


if __name__ == "__main__":
    sys.exit(main())
