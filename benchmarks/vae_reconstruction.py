"""How much of the shapes world survives the embedded model's VAE: annotator scores of reconstructions.

    python benchmarks/vae_reconstruction.py               # the embedded model's VAE, 600 scenes
    python benchmarks/vae_reconstruction.py --n 200 --model runs/shapes/pipeline

One-object training scenes (seeded sampler, no colour jitter) are rendered, encoded to latents (the
posterior mean) and decoded. The annotator reads the clean render and the reconstruction, and each
reading is scored against the renderer's ground truth: colour, shape, size, position, fill. The clean
column is the annotator's own ceiling; the reconstruction column is what the UNet can at best be
scored at. Per colour and per shape rates show where the VAE loses detail. Printed as a table and
written atomically to benchmarks/results/vae_reconstruction.json.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import numpy as np
import torch

import harness

ATTRIBUTES = ("color", "shape", "size", "position", "fill")


def score(objects, truth) -> dict:
    """Attribute hits of the largest detected object against the ground-truth object (all False if none)."""
    if not objects:
        return {attribute: False for attribute in ATTRIBUTES}
    found = objects[0]
    return {attribute: getattr(found, attribute) == getattr(truth, attribute) for attribute in ATTRIBUTES}


def options():
    parser = harness.parser(__doc__, "vae_reconstruction", device=False)
    parser.add_argument("--n", type=int, default=600, help="scenes")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--batch", type=int, default=50)
    return parser


def measure(args) -> dict:
    from headscope.shapes.annotate import annotate
    from headscope.shapes.world import SceneSampler, render

    started = time.perf_counter()
    pipe, model = harness.load(args)
    vae = pipe.vae
    sampler = SceneSampler(seed=args.seed)
    scenes = [sampler.single() for _ in range(args.n)]
    rows = {"clean": [], "reconstructed": []}
    for start in range(0, len(scenes), args.batch):
        chunk = scenes[start:start + args.batch]
        images = np.stack([render(scene)[0] for scene in chunk])
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        recon = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        for scene, clean, rebuilt in zip(chunk, images, recon):
            truth = scene.objects[0]
            rows["clean"].append({**score(annotate(clean), truth), "_color": truth.color, "_shape": truth.shape})
            rows["reconstructed"].append({**score(annotate(rebuilt), truth), "_color": truth.color,
                                          "_shape": truth.shape})
    summary = {}
    for kind, records in rows.items():
        entry = {attribute: float(np.mean([r[attribute] for r in records])) for attribute in ATTRIBUTES}
        for key in ("_color", "_shape"):
            groups = defaultdict(list)
            for record in records:
                groups[record[key]].append(record["color" if key == "_color" else "shape"])
            entry[f"{key[1:]}_by_{key[1:]}"] = {name: round(float(np.mean(v)), 3) for name, v in sorted(groups.items())}
        summary[kind] = entry
    result = {"model": model, "n": args.n, "seed": args.seed,
              "seconds": round(time.perf_counter() - started, 1), "summary": summary}
    print(f"VAE reconstructions read back by the annotator — {result['model']}, {args.n} one-object scenes")
    print(harness.table([[kind, *(entry[a] for a in ATTRIBUTES)] for kind, entry in summary.items()],
                        ["", *ATTRIBUTES]))
    for key in ("color_by_color", "shape_by_shape"):
        print(f"reconstructed, {key.replace('_', ' ')}: "
              + ", ".join(f"{name} {value:.2f}" for name, value in summary["reconstructed"][key].items()))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


if __name__ == "__main__":
    sys.exit(main())
