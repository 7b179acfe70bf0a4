"""Ordered weakening on the shapes world, for every concept: do the HRV's heads carry their concept?

    python benchmarks/weakening.py --tiny                  # smoke run: tiny random pipeline, HRV built on the spot
    python benchmarks/weakening.py                         # the embedded model with its shipped HRV
    python benchmarks/weakening.py --hrv FILE --n-prompts 48 --seeds 0,1,2

For each scorable concept c of the HRV (color, shape, size, position, fill, count), one-object scenes
whose captions name every attribute are generated with no head weakened, with the top quarter of heads
by relevance to c weakened (MoRHF), with the bottom quarter weakened (LeRHF) and with a random quarter
(--share: another share of the heads).
Reported per concept: the annotator's accuracy on c without weakening, its drop under each order, the
mean drop of the other concepts under each order, and two specificity numbers (a good HRV hits c harder
than the rest, and harder with its top heads than with its bottom ones): MoRHF drop of c minus the
others' mean MoRHF drop, and MoRHF drop minus LeRHF drop.
Printed as a table and written atomically to benchmarks/results/weakening.json.

HRV variants, side by side in one process, on one model or both (`--models shapes,shapes-mmdit`):
`--variants` takes BASE[:VIEW...] items. BASE: "argmax" (the shipped HRV, or --hrv), "soft" (soft votes:
--hrv-soft, or a twin built on the spot with --soft-prompts N from the argmax HRV's first N prompts, its
seed and steps), or a name given to --hrv-extra (e.g. an HRV built with other concept word sets). VIEW:
"early" / "middle" / "late" (the votes of the first / middle / last third of the HRV's steps, rounded up:
`HRV.window`; the heads are still weakened at every step) and "head-share" (each head's relevance as its
share over the concepts: `HRV.head_shares`). Files given to --hrv, --hrv-soft and --hrv-extra go to the
model whose head layout they fit. Each model's generations are shared by all its variants and concepts
(the unweakened images and the random quarter are generated once). The full-size comparison (issue #16),
with the soft twins of the shipped HRVs (same prompts, seed and steps) built first:

    headscope hrv build --concepts shapes --n-prompts 256 --seed 0 --soft --out out/hrv/shapes_soft.hrv
    headscope hrv build --model shapes-mmdit --concepts shapes --n-prompts 16 --seed 0 --soft \\
        --out out/hrv/shapes_mmdit_soft.hrv
    python benchmarks/weakening.py --models shapes,shapes-mmdit --n-prompts 24 --seeds 0,1 \\
        --variants argmax,soft,argmax:early,argmax:late,soft:early,soft:late,argmax:head-share,soft:head-share \\
        --hrv-soft out/hrv/shapes_soft.hrv --hrv-soft out/hrv/shapes_mmdit_soft.hrv \\
        --out benchmarks/results/weakening_variants.json

(--n-prompts of each build: that of the model's shipped HRV, `headscope hrv show`; or replace the two builds
and --hrv-soft by `--soft-prompts 256`, which takes at most the prompts the argmax HRV has.)
JSON: the keys of a plain run (model, hrv, n_heads, k, rows) describe the first model's first variant;
"comparison" holds every model x variant with its HRV's provenance, rows and mean specificities, and
"generations" the images generated per model.
"""
from __future__ import annotations

import math
import sys

import harness
from headscope.errors import HeadscopeError

ORDERS = ("morhf", "lerhf", "random")
WINDOWS = ("early", "middle", "late")  # thirds of an HRV's steps
VIEWS = (*WINDOWS, "head-share")
BASES = ("argmax", "soft")
TINY_MMDIT = "tiny random pipeline of the shapes-mmdit architecture (headscope.shapes.mmdit.random_mmdit_pipeline)"
EMBEDDED_NAMES = ("shapes", "shapes-mmdit")


def options():
    parser = harness.parser(__doc__, "weakening", tiny="shapes", model=False)
    parser.add_argument("--models", default=None, type=_names,
                        help="comma-separated models: embedded names (shapes, shapes-mmdit) or pipeline folders "
                             "(default: the embedded shapes model; with --tiny, the tiny pipelines of those names)")
    parser.add_argument("--hrv", action="append", default=[], metavar="FILE",
                        help="argmax HRV file, repeatable: one per model (default: each model's shipped HRV)")
    parser.add_argument("--variants", default=["argmax"], type=_names,
                        help="comma-separated BASE[:VIEW...], e.g. argmax,soft,argmax:early,soft:head-share "
                             "(default: argmax)")
    parser.add_argument("--hrv-soft", action="append", default=[], metavar="FILE",
                        help="soft-vote HRV file (`headscope hrv build --soft`), repeatable: one per model")
    parser.add_argument("--soft-prompts", type=int, default=None, metavar="N",
                        help="build each model's soft-vote HRV on the spot from its argmax HRV's first N prompts")
    parser.add_argument("--hrv-extra", action="append", default=[], metavar="NAME=FILE",
                        help="a further HRV base NAME for --variants (e.g. built with other concept words), "
                             "repeatable: one file per model")
    parser.add_argument("--n-prompts", type=int, default=24)
    parser.add_argument("--seeds", default="0,1", type=lambda text: [int(part) for part in text.split(",")])
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the random order")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--factor", type=float, default=-2.0)
    parser.add_argument("--share", type=float, default=0.25,
                        help="share of the heads each order weakens (default: a quarter, the HRV paper's)")
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def measure(args) -> dict:
    from headscope.weaken import weakening_scenes

    sources = hrv_sources(args)
    models = [load_model(args, name) for name in (args.models or ["shapes"])]
    picked = {model["name"]: pick_files(model["pipe"], sources) for model in models}
    for base, files in sources.items():
        for path, hrv in files:
            if not any(chosen.get(base) == path for chosen in picked.values()):
                refuse_unfit(base, path, hrv, models)
    scenes = weakening_scenes(args.n_prompts, seed=args.seed)
    comparison, generations = [], {}
    for model in models:
        variants = model_variants(args, model, sources, picked[model["name"]])
        entries, generations[model["name"]] = weaken_variants(args, model, variants, scenes)
        comparison += entries
    first, pipe = comparison[0], models[0]["pipe"]
    result = {"model": first["description"], "hrv": first["hrv"]["model"], **harness.machine(pipe),
              "n_heads": first["n_heads"], "k": first["k"], "factor": args.factor, "share": args.share, "n_prompts": len(scenes),
              "seeds": args.seeds, "steps": args.steps, "rows": first["rows"],
              "comparison": comparison, "generations": generations}
    print(table(result))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


# -- models and their HRVs ---------------------------------------------------------------------------

def hrv_sources(args) -> dict[str, list]:
    """BASE -> [(path, HRV)] of the files given, after checking --variants names only known bases and views."""
    from headscope.hrv import HRV

    extra: dict[str, list[str]] = {}
    for item in args.hrv_extra:
        name, _, path = item.partition("=")
        if not name or not path or name in BASES or ":" in name:
            raise HeadscopeError(f"--hrv-extra {item!r}: give NAME=FILE with a NAME other than {', '.join(BASES)}")
        extra.setdefault(name, []).append(path)
    given = {"argmax": args.hrv, "soft": args.hrv_soft, **extra}
    for variant in args.variants:
        base, *views = variant.split(":")
        if base not in given or [view for view in views if view not in VIEWS]:
            raise HeadscopeError(f"unknown HRV variant {variant!r}: give BASE[:VIEW...] with BASE one of "
                                 f"{', '.join(given)} and VIEW one of {', '.join(VIEWS)}")
        if base == "soft" and not args.hrv_soft and not args.soft_prompts:
            raise HeadscopeError("the soft variant needs --hrv-soft FILE (`headscope hrv build --soft`) or "
                                 "--soft-prompts N (built on the spot)")
    if not 0 < args.share <= 1:
        raise HeadscopeError(f"--share {args.share}: give the share of the heads to weaken, above 0 and at most 1")
    if args.soft_prompts is not None and args.soft_prompts < 1:
        raise HeadscopeError(f"--soft-prompts {args.soft_prompts}: give a positive number of prompts")
    if args.tiny and args.hrv:
        raise HeadscopeError("--tiny builds its argmax HRV on the spot; leave out --hrv")
    sources = {base: [(path, HRV.load(path)) for path in paths] for base, paths in given.items()}
    for path, hrv in sources["soft"]:
        if not hrv.meta.get("soft"):
            raise HeadscopeError(f"--hrv-soft {path} holds argmax votes; build it with `headscope hrv build --soft`")
    return sources


def load_model(args, name: str) -> dict:
    """One --models entry: its pipeline, the words for it, and the call options every generation passes."""
    from headscope.models import call_defaults

    if args.tiny:
        if name not in EMBEDDED_NAMES:
            raise HeadscopeError(f"--tiny builds tiny pipelines of {' and '.join(EMBEDDED_NAMES)} only, not {name!r}")
        if name == "shapes-mmdit":
            from headscope.shapes.mmdit import TINY_MMDIT as CONFIG, random_mmdit_pipeline

            return {"name": name, "pipe": random_mmdit_pipeline(), "description": TINY_MMDIT,
                    "call": {"max_sequence_length": CONFIG.max_sequence_length}}
        pipe, description = harness.load(args)
        return {"name": name, "pipe": pipe, "description": description, "call": {}}
    from headscope import load_pipeline

    pipe = load_pipeline(name, args.device)
    pipe.set_progress_bar_config(disable=True)
    description = harness.EMBEDDED if args.models is None else name
    return {"name": name, "pipe": pipe, "description": description, "call": call_defaults(pipe)}


def fits(hrv, pipe) -> bool:

    try:
        hrv.check_compatible(pipe)
    except HeadscopeError:
        return False
    return True


def pick_files(pipe, sources: dict[str, list]) -> dict[str, str]:
    """BASE -> the path of the one file of that base whose head layout `pipe` has (bases without one are left out)."""

    picked = {}
    for base, files in sources.items():
        fitting = [path for path, hrv in files if fits(hrv, pipe)]
        if len(fitting) > 1:
            raise HeadscopeError(f"{len(fitting)} {base} HRV files fit one model ({', '.join(fitting)}); give one per model")
        if fitting:
            picked[base] = fitting[0]
    return picked


def refuse_unfit(base: str, path: str, hrv, models) -> None:
    """HeadscopeError for a file that fits none of the models, with why it does not fit the last one."""
    try:
        hrv.check_compatible(models[-1]["pipe"])
    except HeadscopeError as error:
        raise HeadscopeError(f"the {base} HRV {path} fits none of the models "
                             f"({', '.join(model['name'] for model in models)}): {error}") from None


def model_variants(args, model: dict, sources: dict, picked: dict[str, str]) -> list[tuple[str, object, dict]]:
    """(variant, HRV, provenance) of every --variants item for one model; each base is loaded or built once."""
    from headscope.hrv import HRV

    pipe, bases = model["pipe"], {}

    def base_hrv(base: str):
        if base in bases:
            return bases[base]
        if base in picked:
            bases[base] = (dict(sources[base])[picked[base]], picked[base])
        elif base == "argmax":
            bases[base] = (tiny_hrv(pipe, args, model["call"]), "built on the spot (--tiny)") if args.tiny else \
                (HRV.for_pipeline(pipe), "shipped")
        elif base == "soft" and args.soft_prompts:
            argmax, _ = base_hrv("argmax")
            bases[base] = (soft_twin(pipe, argmax, args.soft_prompts, model["call"]),
                           f"built on the spot from the argmax HRV's first {args.soft_prompts} prompts")
        else:
            raise HeadscopeError(f"no {base} HRV file fits the model {model['name']}; give one for its head layout")
        return bases[base]

    variants = []
    for variant in args.variants:
        base, *views = variant.split(":")
        hrv, source = base_hrv(base)
        for view in views:
            hrv = hrv.head_shares() if view == "head-share" else hrv.window(*third(hrv, view))
        variants.append((variant, hrv, provenance(hrv, source)))
    return variants


def third(hrv, window: str) -> tuple[int, int]:
    """(start, stop) of the first, middle or last third of the HRV's steps, a third rounded up (0, 0 without steps)."""
    n_steps = 0 if hrv.step_votes is None else int(hrv.step_votes.shape[0])
    size = math.ceil(n_steps / 3)
    start = {"early": 0, "middle": (n_steps - size) // 2, "late": n_steps - size}[window]
    return start, start + size


def provenance(hrv, source: str) -> dict:
    meta = hrv.meta
    return {"source": source, "model": (meta.get("model") or {}).get("name_or_path"), "soft": bool(meta.get("soft")),
            "n_prompts": meta.get("n_prompts"), "steps": meta.get("steps"), "step_window": meta.get("step_window"),
            "relevance": meta.get("relevance", "votes"), "concept_set": (meta.get("concept_set") or {}).get("name")}


def tiny_hrv(pipe, args, call: dict):
    """--tiny: a throwaway argmax HRV built on 8 captions."""
    from headscope.concepts import ConceptSet
    from headscope.hrv import HRVBuilder
    from headscope.shapes.world import SceneSampler

    sampler = SceneSampler(seed=1)
    prompts = [sampler.sample().caption for _ in range(8)]
    return HRVBuilder(ConceptSet.load("shapes"), steps=args.steps or 5, call_options=call).fit(pipe, prompts).hrv_


def soft_twin(pipe, hrv, n_prompts: int, call: dict):
    """The soft-vote HRV of the first `n_prompts` prompts `hrv` was built from, with its concept set, seed, steps
    and guidance."""
    from headscope.concepts import ConceptSet
    from headscope.hrv import HRVBuilder

    meta = hrv.meta
    prompts = list(meta.get("prompts") or [])[:n_prompts]
    if not prompts or not hrv.concept_words:
        raise HeadscopeError("--soft-prompts builds on the argmax HRV's prompts and concept words, and this HRV "
                             "stores none; pass --hrv-soft FILE")
    concepts = ConceptSet((meta.get("concept_set") or {}).get("name") or "stored", hrv.concept_words)
    builder = HRVBuilder(concepts, soft=True, seed=meta.get("seed") or 0, steps=meta.get("steps"),
                         guidance=meta.get("guidance"), batch_size=meta.get("batch_size") or 4, progress=True,
                         call_options=call)
    return builder.fit(pipe, prompts).hrv_


# -- weakening ---------------------------------------------------------------------------------------

def weaken_variants(args, model: dict, variants, scenes) -> tuple[list[dict], int]:
    """One comparison entry per variant of one model, and the images generated for them all (shared)."""
    from headscope.weaken import SHAPES_METRICS, OrderedWeakening

    cache, entries, generations = {}, [], 0
    for variant, hrv, source in variants:
        k = max(1, min(hrv.n_heads, round(args.share * hrv.n_heads)))
        rows = []
        for concept in [name for name in hrv.concepts if name.lower() in SHAPES_METRICS]:
            sweep = OrderedWeakening(concept, hrv, ks=[0, k], factor=args.factor, orders=ORDERS,
                                     seeds=args.seeds, random_seed=args.seed, steps=args.steps,
                                     guidance=args.guidance, batch_size=args.batch_size, progress=True,
                                     call_options=model["call"], cache=cache).fit(model["pipe"], scenes)
            rows.append(concept_row(concept, sweep.summary_, k))
            generations += sweep.settings_["generations"]
        entries.append({"model": model["name"], "description": model["description"], "variant": variant,
                        "hrv": source, "n_heads": hrv.n_heads, "k": k, "rows": rows,
                        **{f"mean_{key}": mean(row[key] for row in rows)
                           for key in ("morhf_minus_others", "morhf_minus_lerhf")}})
    return entries, generations


def mean(values) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def concept_row(concept: str, summary: list[dict], k: int) -> dict:
    """Accuracy of the weakened concept at k=0 and its drops; the other concepts' mean drop per order; specificity."""
    mean_of = {(row["order"], row["k"], row["concept"]): row["mean"] for row in summary}
    others = sorted({row["concept"] for row in summary if row["role"] == "control"})

    def drop(order, name):
        return mean_of[("morhf", 0, name)] - mean_of[(order, k, name)]

    row = {"concept": concept, "accuracy": mean_of[("morhf", 0, concept)]}
    for order in ORDERS:
        row[f"drop_{order}"] = drop(order, concept)
        row[f"others_drop_{order}"] = sum(drop(order, name) for name in others) / len(others) if others else None
    row["morhf_minus_others"] = None if not others else row["drop_morhf"] - row["others_drop_morhf"]
    row["morhf_minus_lerhf"] = row["drop_morhf"] - row["drop_lerhf"]
    return row


def table(result: dict) -> str:
    """One row per model x variant x concept (the model and variant columns only when there are several)."""
    keys = ("accuracy", "drop_morhf", "drop_lerhf", "drop_random", "others_drop_morhf", "others_drop_lerhf",
            "morhf_minus_others", "morhf_minus_lerhf")
    columns = ("concept", "accuracy", "MoRHF drop", "LeRHF drop", "random drop", "others, MoRHF", "others, LeRHF",
               "MoRHF - others", "MoRHF - LeRHF")
    comparison = result["comparison"]
    several = len(comparison) > 1
    rows = [[*((entry["model"], entry["variant"]) if several else ()), row["concept"], *(row[key] for key in keys)]
            for entry in comparison for row in entry["rows"]]
    models = ", ".join(dict.fromkeys(entry["description"] for entry in comparison))
    heads = ", ".join(dict.fromkeys(f"{entry['k']} of {entry['n_heads']}" for entry in comparison))
    return (f"ordered weakening, k = {heads} heads, factor {result['factor']}, "
            f"{result['n_prompts']} prompts x {len(result['seeds'])} seeds — {models}\n"
            + harness.table(rows, (*(("model", "variant") if several else ()), *columns), left=3 if several else 1))


if __name__ == "__main__":
    sys.exit(main())
