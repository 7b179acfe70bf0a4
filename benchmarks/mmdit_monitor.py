"""Score an SD3-style shapes model export with the annotator, as `headscope shapes eval` scores the UNet.

    python benchmarks/mmdit_monitor.py                                   # /work/runs/mmdit/pipeline, quick
    python benchmarks/mmdit_monitor.py --model RUN/pipeline --seeds 0,1 --n-single 48 --n-pair 24

A quick look at a training run's latest export (a few prompts, one seed by default, so it can share
the cores with the training): the same held-out prompt set and scoring as `headscope shapes eval`
(`headscope.shapes.evaluate`), generated with the export's headscope.json defaults, max_sequence_length
included (the transformer was trained on exactly that many T5 tokens; the pipeline's default 256 is
not what it saw). Prints the table; writes summary and per-image records to RUN/monitor-STEP.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from headscope.io import write_json
    from headscope.models import load_pipeline
    from headscope.shapes.evaluate import eval_scenes, evaluate, format_summary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/work/runs/mmdit/pipeline"))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; one image per prompt and seed")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--n-single", type=int, default=16)
    parser.add_argument("--n-pair", type=int, default=8)
    parser.add_argument("--n-count", type=int, default=0)
    parser.add_argument("--n-polysemy", type=int, default=0)
    parser.add_argument("--scene-seed", type=int, default=1234,
                        help="seed of the prompt set (default: shapes eval's; another one for tuning on prompts "
                             "the evaluation does not score)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: RUN/monitor-STEP.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    meta = json.loads((args.model / "headscope.json").read_text())
    defaults = dict(meta.get("defaults", {}))
    steps = args.steps or defaults.pop("num_inference_steps", 25)
    guidance = args.guidance if args.guidance is not None else defaults.pop("guidance_scale", 5.0)
    defaults.pop("num_inference_steps", None), defaults.pop("guidance_scale", None)
    pipe = load_pipeline(str(args.model), device="cpu", dtype="fp32")  # generation passes the call defaults
    scenes = eval_scenes(seed=args.scene_seed, n_single=args.n_single, n_pair=args.n_pair, n_count=args.n_count,
                         n_polysemy=args.n_polysemy)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    result = evaluate(pipe, scenes, seeds=seeds, steps=steps, guidance=guidance, progress=False)
    step = meta.get("steps_trained")
    print(f"{args.model} at step {step}: steps {steps}, guidance {guidance}, {defaults}")
    print(format_summary(result["summary"]))
    out = args.out or args.model.parent / f"monitor-{step}.json"
    write_json(out, {"model": str(args.model), "steps_trained": step, "call_defaults": defaults,
                     "scene_seed": args.scene_seed,
                     "seconds": round(time.perf_counter() - started, 1), **result})
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
