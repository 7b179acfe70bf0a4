"""Ordered weakening on the shapes world, for every concept: do the HRV's heads carry their concept?

    python benchmarks/weakening.py --tiny                  # smoke run: tiny random pipeline, HRV built on the spot
    python benchmarks/weakening.py                         # the embedded model with its shipped HRV
    python benchmarks/weakening.py --hrv FILE --n-prompts 48 --seeds 0,1,2

For each scorable concept c of the HRV (color, shape, size, position, fill, count), one-object scenes
whose captions name every attribute are generated with no head weakened, with the top quarter of heads
by relevance to c weakened (MoRHF), with the bottom quarter weakened (LeRHF) and with a random quarter.
Reported per concept: the annotator's accuracy on c without weakening, its drop under each order, and
the mean drop of the other concepts under MoRHF (specificity: a good HRV hits c harder than the rest).
Printed as a table and written atomically to benchmarks/results/weakening.json.
"""
from __future__ import annotations

import sys

import harness

ORDERS = ("morhf", "lerhf", "random")


def options():
    parser = harness.parser(__doc__, "weakening", tiny="shapes", model=False)
    parser.add_argument("--hrv", default=None, help="HRV file (default: the embedded model's shipped HRV)")
    parser.add_argument("--n-prompts", type=int, default=24)
    parser.add_argument("--seeds", default="0,1", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the random order")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--factor", type=float, default=-2.0)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def measure(args) -> dict:
    from headscope.weaken import SHAPES_METRICS, OrderedWeakening, weakening_scenes

    pipe, model = harness.load(args)
    hrv = load_hrv(pipe, args)
    scenes = weakening_scenes(args.n_prompts, seed=args.seed)
    quarter = hrv.n_heads // 4
    rows = []
    for concept in [name for name in hrv.concepts if name.lower() in SHAPES_METRICS]:
        sweep = OrderedWeakening(concept, hrv, ks=[0, quarter], factor=args.factor, orders=ORDERS,
                                 seeds=args.seeds, steps=args.steps, guidance=args.guidance,
                                 batch_size=args.batch_size, progress=True).fit(pipe, scenes)
        rows.append(concept_row(concept, sweep.summary_, quarter))
    result = {"model": model, "hrv": (hrv.meta.get("model") or {}).get("name_or_path"), **harness.machine(pipe),
              "n_heads": hrv.n_heads, "k": quarter, "factor": args.factor, "n_prompts": len(scenes),
              "seeds": args.seeds, "steps": args.steps, "rows": rows}
    print(table(result))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


def load_hrv(pipe, args):
    """--tiny: a throwaway HRV built on 8 captions; else --hrv, or the embedded model's shipped HRV."""
    from headscope.hrv import HRV

    if args.tiny:
        from headscope.concepts import ConceptSet
        from headscope.hrv import HRVBuilder
        from headscope.shapes.world import SceneSampler

        sampler = SceneSampler(seed=1)
        prompts = [sampler.sample().caption for _ in range(8)]
        return HRVBuilder(ConceptSet.load("shapes"), steps=args.steps or 5).fit(pipe, prompts).hrv_
    hrv = HRV.load(args.hrv) if args.hrv else HRV.for_pipeline(pipe)
    hrv.check_compatible(pipe)
    return hrv


def concept_row(concept: str, summary: list[dict], quarter: int) -> dict:
    """Accuracy of the weakened concept at k=0 and its drops; the other concepts' mean drop per order."""
    mean = {(row["order"], row["k"], row["concept"]): row["mean"] for row in summary}
    others = sorted({row["concept"] for row in summary if row["role"] == "control"})

    def drop(order, name):
        return mean[("morhf", 0, name)] - mean[(order, quarter, name)]

    row = {"concept": concept, "accuracy": mean[("morhf", 0, concept)]}
    for order in ORDERS:
        row[f"drop_{order}"] = drop(order, concept)
        row[f"others_drop_{order}"] = sum(drop(order, name) for name in others) / len(others) if others else None
    return row


def table(result: dict) -> str:
    keys = ("accuracy", "drop_morhf", "drop_lerhf", "drop_random", "others_drop_morhf", "others_drop_lerhf")
    return (f"ordered weakening, k = {result['k']} of {result['n_heads']} heads (a quarter), "
            f"factor {result['factor']}, {result['n_prompts']} prompts x {len(result['seeds'])} seeds — "
            f"{result['model']}\n"
            + harness.table([[row["concept"], *(row[key] for key in keys)] for row in result["rows"]],
                            ("concept", "accuracy", "MoRHF drop", "LeRHF drop", "random drop", "others, MoRHF",
                             "others, LeRHF")))


if __name__ == "__main__":
    sys.exit(main())
