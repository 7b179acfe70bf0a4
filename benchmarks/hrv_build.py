"""What building an HRV costs: prompts per minute, and how much the vote probe slows generation down.

    python benchmarks/hrv_build.py --tiny            # the embedded model's architecture, tiny and random
    python benchmarks/hrv_build.py                   # the embedded shapes model
    python benchmarks/hrv_build.py --model PATH      # any SD 1.x / 2.x / XL pipeline (concepts: hrv34)

Throughput: one `HRVBuilder.fit` over N prompts (text encoding and key projection included).
Overhead: the same prompt and seed generated three ways — plain, traced without hooks, traced with the
concept-vote reader — interleaved (order rotating each repeat) after a warm-up of each, in one process;
the medians are compared. Results are printed as a table and written atomically to
benchmarks/results/hrv_build.json.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import harness

ARMS = ("plain", "traced", "probe")


def options():
    parser = harness.parser(__doc__, "hrv_build", tiny="shapes")
    parser.add_argument("--concepts", default=None, help="concept set (default: shapes; hrv34 with --model)")
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts of the throughput build")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each arm")
    return parser


def measure(args) -> dict:
    pipe, model = harness.load(args)
    concept_set, prompts = concepts_and_prompts(args)
    throughput = time_build(pipe, concept_set, prompts, args)
    overhead = time_arms(pipe, concept_set, prompts[0], args)
    result = {"model": model, **harness.machine(pipe), "concepts": concept_set.name,
              "n_concepts": len(concept_set), "n_words": sum(len(words) for words in concept_set.concepts.values()),
              "steps": args.steps, "batch_size": args.batch_size, **throughput, **overhead}
    print(table(result))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


def concepts_and_prompts(args):
    """The concept set and the prompts of the build: the paper's for --model, else shapes captions."""
    from headscope.concepts import ConceptSet
    from headscope.shapes.world import SceneSampler

    concept_set = ConceptSet.load(args.concepts or ("hrv34" if args.model else "shapes"))
    if args.model:
        from headscope.concepts import shipped_text

        prompts = [line for line in shipped_text("hrv_prompts_2100.txt").splitlines() if line.strip()]
    else:
        sampler = SceneSampler(seed=0)
        prompts = [sampler.sample().caption for _ in range(args.n_prompts)]
    return concept_set, prompts[:args.n_prompts]


def time_build(pipe, concept_set, prompts, args) -> dict:
    from headscope.hrv import HRVBuilder

    start = time.perf_counter()
    HRVBuilder(concept_set, steps=args.steps, batch_size=args.batch_size).fit(pipe, prompts)
    seconds = time.perf_counter() - start
    return {"n_prompts": len(prompts), "build_seconds": round(seconds, 3),
            "prompts_per_minute": round(60.0 * len(prompts) / seconds, 2)}


def time_arms(pipe, concept_set, prompt: str, args) -> dict:
    """Median seconds of one generation per arm, interleaved; the probe's reader is built once."""
    import headscope
    from headscope.heads import HeadIndex
    from headscope.hrv import ConceptVotes, encode_concepts, project_keys

    index = HeadIndex.from_unet(pipe.unet)
    tokens = encode_concepts(pipe, concept_set)
    reader = ConceptVotes(tokens, project_keys(pipe, index, tokens.embeddings), index.n_heads, args.steps)

    def run(arm: str) -> float:
        generator = torch.Generator("cpu").manual_seed(0)
        call = dict(num_inference_steps=args.steps, generator=generator, output_type="latent")
        start = time.perf_counter()
        if arm == "plain":
            pipe(prompt, **call)
        else:
            reader.begin([0])
            with headscope.trace(pipe, hooks=[reader] if arm == "probe" else [], maps=False):
                pipe(prompt, **call)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for arm in ARMS:
        run(arm)
    runs = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        order = ARMS[repeat % 3:] + ARMS[:repeat % 3]
        for arm in order:
            runs[arm].append(run(arm))
    medians = {arm: statistics.median(times) for arm, times in runs.items()}
    return {"median_seconds": {arm: round(value, 4) for arm, value in medians.items()},
            "probe_over_plain": round(medians["probe"] / medians["plain"], 3),
            "traced_over_plain": round(medians["traced"] / medians["plain"], 3),
            "repeats": args.repeats}


def table(result: dict) -> str:
    medians = result["median_seconds"]
    rows = [("model", result["model"]), ("device / threads", f"{result['device']} / {result['threads']}"),
            ("concepts", f"{result['concepts']} ({result['n_concepts']} concepts, {result['n_words']} words)"),
            ("steps, batch", f"{result['steps']}, {result['batch_size']}"),
            ("build", f"{result['n_prompts']} prompts in {result['build_seconds']} s"),
            ("prompts per minute", f"{result['prompts_per_minute']}"),
            ("generation, plain", f"{medians['plain']:.4f} s (median of {result['repeats']})"),
            ("generation, traced (no hook)", f"{medians['traced']:.4f} s  x{result['traced_over_plain']}"),
            ("generation, with vote probe", f"{medians['probe']:.4f} s  x{result['probe_over_plain']}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
