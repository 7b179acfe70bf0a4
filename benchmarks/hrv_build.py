"""What building an HRV costs: prompts per minute, and how much the vote probe slows generation down.

    python benchmarks/hrv_build.py --tiny            # the embedded model's architecture, tiny and random
    python benchmarks/hrv_build.py                   # the embedded shapes model
    python benchmarks/hrv_build.py --model PATH      # any SD 1.x / 2.x / XL, SD3 or Flux pipeline (concepts: hrv34)
    python benchmarks/hrv_build.py --joint sd3,flux  # the embedded model, then small joint-attention models
    python benchmarks/hrv_build.py --real sd3-medium,flux-dev --real-side 512 --steps 1 --repeats 5
                                                     # the embedded model, then real-size SD3 / Flux blocks
    python benchmarks/hrv_build.py --real sd3-medium,flux-dev --real-side 1024 --repeats 0 --flops
                                                     # FLOP ratios only, at the models' own resolution

Throughput: one `HRVBuilder.fit` over N prompts (text encoding and key projection included).
Overhead: the same prompt and seed generated three ways — plain, traced without hooks, traced with the
concept-vote reader (on SD3 / Flux: the concept stream carrying the word drawn for each concept, and
the reader) — interleaved (order rotating each repeat) after a warm-up of each, in one process. Two
ratios: of the arms' medians, and "paired", the median over repeats of an arm's time over plain's in
the same repeat, which drift between repeats (other tenants of a shared machine) does not move;
and the same two for this process's CPU time (`time.process_time`, all its threads: what the run itself
spent, which other tenants' load moves less than the wall time, though threads that wait for a core
still spin); and each arm's median count of minor page faults (fresh pages mapped for the allocator: large
tensors are allocated and freed by the kernel each time, and their first touch costs).
--joint adds, in the same process, small random joint-attention models of the shapes world's
sizes, with the shapes concepts over the shapes tokenizer (23 one-token words):
  sd3   the SD3-style shapes architecture (headscope.shapes.mmdit, MMDiTConfig(): 5 joint blocks x 4
        heads x 32, 16x16 = 256 image tokens, 24 CLIP + 24 T5 text tokens, guidance: an [uncond; cond] batch)
  flux  a Flux transformer of the same widths: 2 double- + 4 single-stream blocks x 4 heads x 32, 128 px
        images = 16x16 packed tokens, 24 T5 tokens, guidance embedded (one row per image)
--real adds real-size joint backbones (`benchmarks/real_layouts.py`'s MODELS: SD3-medium's first 4 of
24 joint blocks, Flux.1-dev's first double- and 2 single-stream blocks, at full width, random weights,
one-layer text-encoder stand-ins of the real widths and the real text lengths: 77 CLIP + 256 T5 tokens
for SD3, 512 T5 for Flux) with the HRV paper's 34 concepts (340 words, each word one token as most
are in the real vocabularies), --real-side pixels (SD3: 2x2 patches of the 8x-down latent; 512 px =
1,024 image tokens), the overhead arms only (a throughput build at this size takes hours on a CPU).
The probe costs per block, so its ratio over the kept blocks is the whole model's at that size.
--stream-budgets 0,4,16 adds probe arms on the joint models whose concept streams' arenas hold at most
that many MiB (0: no arena, every block carried as it runs), interleaved with the others: what the
arena's size does to the probe's cost (the default arena, STREAM_BUDGET_BYTES, holds 128 MiB).
--rows-bound adds, on the joint models, a plain arm whose prompts are padded to as many more text tokens as the
probe carries concepts (`max_sequence_length` + one token per concept): the same ops on that many more
rows, i.e. what carried rows cost at that size with no op of their own. Not a strict floor: they ride on
every row of the batch (SD3's guidance doubles them) and the image attends to them too, so they do more
arithmetic than the probe's (compare the FLOP ratios).
--flops also counts each arm's FLOPs in one generation after the warm-up (torch's FlopCounterMode: matmuls,
convolutions and attention, the CPU flash-attention kernel included): the probe's cost where arithmetic
dominates (an accelerator at real size), free of the machine's noise; --repeats 0 --flops counts only.
Results are printed as a table and written atomically to benchmarks/results/hrv_build.json (the main
model's fields at the top, each small joint model's under "joint", each real-size one's under "real").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import harness
from headscope.backbones import backbone_for
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.models import call_defaults
from headscope.stream import STREAM_BUDGET_BYTES

ARMS = ("plain", "traced", "probe")
ROWS_BOUND = "plain, a text token more per concept"  # --rows-bound
JOINT_TEXT = 24  # T5 tokens per prompt, as the shapes MMDiT is trained


def small_sd3(side: int = 16):
    """The SD3-style shapes architecture at its trained size (a side x side token grid), random weights."""
    from headscope.shapes.mmdit import MMDiTConfig, random_mmdit_pipeline

    return random_mmdit_pipeline(MMDiTConfig(latent_size=side))


def small_flux(side: int = 16):
    """A FluxPipeline of the shapes MMDiT's widths over the shapes tokenizer (random weights); its token grid
    is set by the call's image size (`joint_call`)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from headscope.shapes.mmdit import MMDiTConfig, _for_sd3, build_clip, build_flow_scheduler, build_t5
    from headscope.shapes.model import TINY, build_vae
    from headscope.shapes.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg, tokenizer = MMDiTConfig(), build_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=2, num_single_layers=4,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=cfg.t5_hidden,
        pooled_projection_dim=cfg.clip1_hidden, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    clip = build_clip(cfg.clip1_hidden, cfg.clip1_layers, cfg.clip1_heads, tokenizer)
    text_encoder = CLIPTextModel(clip.config)
    pipe = FluxPipeline(scheduler=build_flow_scheduler(cfg), vae=_for_sd3(build_vae(TINY)), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=build_t5(cfg, tokenizer), tokenizer_2=tokenizer,
                        transformer=transformer)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


JOINT = {"sd3": ("small SD3-style shapes architecture (random)", small_sd3),
         "flux": ("small Flux of the shapes widths (random)", small_flux)}


def joint_call(family: str, side: int) -> dict:
    """Pipeline-call options of a small joint model with a side x side grid of image tokens (VAE: 4x per side;
    SD3 patch 1, Flux packs 2x2 latent pixels per token)."""
    pixels = 4 * side if family == "sd3" else 8 * side
    return {"max_sequence_length": JOINT_TEXT, "height": pixels, "width": pixels}


def options():
    parser = harness.parser(__doc__, "hrv_build", tiny="shapes")
    parser.add_argument("--concepts", default=None, help="concept set (default: shapes; hrv34 with --model)")
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts of the throughput build")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each arm (0 with --flops: count only)")
    parser.add_argument("--flops", action="store_true",
                        help="also count each arm's matmul and attention FLOPs (one generation per arm after the "
                             "warm-up): the cost ratio where arithmetic dominates, free of machine noise")
    parser.add_argument("--arm-prompts", type=int, default=1,
                        help="prompts per generation in the overhead arms (a build generates --batch-size at once)")
    parser.add_argument("--joint", default=None, type=_families, metavar="sd3,flux",
                        help="also measure small random joint-attention models (see above), in this process")
    parser.add_argument("--joint-side", default=[16], type=_sides, metavar="16,32",
                        help="token-grid sides of the joint models (16: 256 image tokens, the shapes size; 32: 1,024)")
    parser.add_argument("--real", default=None, type=_real_models, metavar="sd3-medium,flux-dev",
                        help="also measure real-size joint backbones (see above), in this process")
    parser.add_argument("--real-side", default=512, type=int, help="image side in pixels of the real-size runs")
    parser.add_argument("--rows-bound", action="store_true",
                        help="joint models: a plain arm with one more text token per concept (see above)")
    parser.add_argument("--stream-budgets", default=[], type=_budgets, metavar="0,4,16",
                        help="joint models: more probe arms, each with a concept stream of its own whose arena holds "
                             "at most this many MiB (0: every block carried as it runs), interleaved with the others")
    return parser


def _budgets(value: str) -> list[float]:
    try:
        budgets = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        budgets = []
    if not budgets or any(budget < 0 for budget in budgets):
        raise argparse.ArgumentTypeError(f"{value!r}: give arena budgets in MiB, 0 or more, e.g. 0,4,16")
    return list(dict.fromkeys(budgets))  # one arm per budget


def _real_models(value: str) -> list[str]:
    from real_layouts import MODELS

    names = [part.strip() for part in value.split(",") if part.strip()]
    joint = [name for name, spec in MODELS.items() if spec[0] != "unet"]
    if not names or any(name not in joint for name in names):
        raise argparse.ArgumentTypeError(f"{value!r}: give {', '.join(joint)} or both, comma-separated")
    return names


def _families(value: str) -> list[str]:
    families = [part.strip() for part in value.split(",") if part.strip()]
    if not families or any(family not in JOINT for family in families):
        raise argparse.ArgumentTypeError(f"{value!r}: give sd3, flux or sd3,flux")
    return families


def _sides(value: str) -> list[int]:
    try:
        sides = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        sides = []
    if not sides or any(side < 2 or side % 2 for side in sides):
        raise argparse.ArgumentTypeError(f"{value!r}: give even token-grid sides, e.g. 16 or 16,32")
    return sides


def measure(args) -> dict:
    if args.repeats < 0 or (args.repeats == 0 and not args.flops):
        raise HeadscopeError(f"--repeats {args.repeats}: give a positive number of timed runs (0 only with --flops)")
    pipe, model = harness.load(args)
    result = measure_one(pipe, model, concepts_and_prompts(args), call_defaults(pipe), args)
    if args.joint:
        shapes = concepts_and_prompts(args, shapes=True)
        result["joint"] = [measure_one(JOINT[family][1](side), f"{JOINT[family][0]}, {side}x{side} image tokens",
                                       shapes, joint_call(family, side), args)
                           for side in args.joint_side for family in args.joint]
    if args.real:
        result["real"] = [measure_real(name, args) for name in args.real]
    if args.joint or args.real:
        print(side_by_side([result, *result.get("joint", []), *result.get("real", [])]))
    return result


def measure_real(name: str, args) -> dict:
    """The overhead arms on a real-size joint backbone (blocks kept as real_layouts keeps them), hrv34."""
    from real_layouts import MODELS, TEXT_LENGTH

    from headscope.concepts import ConceptSet
    from headscope.testing_real import build_real_size

    family, guidance, _, config, kept = MODELS[name]
    concept_set = ConceptSet.load("hrv34")
    prompt = "a photo of a dog next to a red car"
    words = sorted({part for entries in concept_set.concepts.values() for entry in entries for part in entry.split()}
                   | set(prompt.split()))
    pipe = build_real_size(config, words)
    call = {"height": args.real_side, "width": args.real_side, "max_sequence_length": TEXT_LENGTH[family],
            "guidance_scale": guidance}
    overhead = time_arms(pipe, concept_set, [prompt], call, args)
    index = HeadIndex.from_model(pipe)
    result = {"model": f"{name} ({kept}), random weights, {args.real_side} px", **harness.machine(pipe),
              "family": family, "heads": index.n_heads, "layers": index.n_layers, "call_options": call,
              "concepts": concept_set.name, "n_concepts": len(concept_set),
              "n_words": sum(len(words) for words in concept_set.concepts.values()), "steps": args.steps,
              **overhead}
    if "median_seconds" in overhead:
        print(f"{result['model']}: probe / plain x{overhead['probe_over_plain']}, traced / plain "
              f"x{overhead['traced_over_plain']} (plain {overhead['median_seconds']['plain']:.2f} s)")
    if "flops" in overhead:
        print(f"{result['model']}: FLOPs probe / plain x{overhead['probe_flops_over_plain']}")
    return result


def measure_one(pipe, model: str, concepts_prompts, call: dict, args) -> dict:
    concept_set, prompts = concepts_prompts
    throughput = time_build(pipe, concept_set, prompts, call, args)
    overhead = time_arms(pipe, concept_set, prompts[:args.arm_prompts], call, args)
    index = HeadIndex.from_model(pipe)
    result = {"model": model, **harness.machine(pipe), "family": backbone_for(pipe).family,
              "heads": index.n_heads, "layers": index.n_layers, "call_options": call, "concepts": concept_set.name,
              "n_concepts": len(concept_set), "n_words": sum(len(words) for words in concept_set.concepts.values()),
              "steps": args.steps, "batch_size": args.batch_size, **throughput, **overhead}
    print(table(result))
    return result


def main(argv=None) -> int:
    return harness.run(measure, options(), argv)


def concepts_and_prompts(args, shapes: bool = False):
    """The concept set and the prompts of the build: the paper's for --model, else (or `shapes`) shapes captions."""
    from headscope.concepts import ConceptSet
    from headscope.shapes.world import SceneSampler

    paper = args.model and not shapes
    concept_set = ConceptSet.load("shapes" if shapes else args.concepts or ("hrv34" if paper else "shapes"))
    if paper:
        from headscope.concepts import shipped_text

        prompts = [line for line in shipped_text("hrv_prompts_2100.txt").splitlines() if line.strip()]
    else:
        sampler = SceneSampler(seed=0)
        prompts = [sampler.sample().caption for _ in range(args.n_prompts)]
    return concept_set, prompts[:args.n_prompts]


def time_build(pipe, concept_set, prompts, call: dict, args) -> dict:
    from headscope.hrv import HRVBuilder

    start = time.perf_counter()
    HRVBuilder(concept_set, steps=args.steps, batch_size=args.batch_size, call_options=call).fit(pipe, prompts)
    seconds = time.perf_counter() - start
    return {"n_prompts": len(prompts), "build_seconds": round(seconds, 3),
            "prompts_per_minute": round(60.0 * len(prompts) / seconds, 2)}


def time_arms(pipe, concept_set, prompt: list[str], call_options: dict, args) -> dict:
    """Median seconds of one generation per arm, interleaved; the probe's reader (and stream) are built once."""
    import headscope
    from headscope.hrv import concept_reader

    index = HeadIndex.from_model(pipe)
    probes = {"probe": concept_reader(pipe, index, concept_set, args.steps)}
    if probes["probe"][1] is not None:  # a joint model: the other arena budgets, each a stream (and arena) of its own
        for budget in args.stream_budgets:
            probes[budget_arm(budget)] = concept_reader(pipe, index, concept_set, args.steps)
            probes[budget_arm(budget)][1].budget = int(budget * 2**20)
    arms = ARMS + tuple(arm for arm in probes if arm != "probe")
    wider = dict(call_options)  # the rows-bound arm's call: a plain one, its text longer by a token per concept
    if args.rows_bound and probes["probe"][1] is not None and call_options.get("max_sequence_length"):
        wider["max_sequence_length"] += len(concept_set)
        arms += (ROWS_BOUND,)

    cpu = {arm: [] for arm in arms}  # this process's CPU seconds of each timed run (see the module docstring)
    faults = {arm: [] for arm in arms}  # and its minor page faults: fresh pages the allocator had the kernel map

    def run(arm: str) -> float:
        generator = torch.Generator("cpu").manual_seed(0)
        call = dict(num_inference_steps=args.steps, generator=generator, output_type="latent",
                    **(wider if arm == ROWS_BOUND else call_options))
        start, start_cpu, start_faults = time.perf_counter(), time.process_time(), minor_faults()
        if arm in ("plain", ROWS_BOUND):
            pipe(prompt, **call)
        elif arm == "traced":
            with headscope.trace(pipe, maps=False, hooks=[]):
                pipe(prompt, **call)
        else:
            reader, stream = probes[arm]
            reader.begin(list(range(len(prompt))))
            with headscope.trace(pipe, maps=False, **({"hooks": [reader]} if stream is None else
                                                      {"hooks": [], "concepts": stream})):
                pipe(prompt, **call)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        cpu[arm].append(time.process_time() - start_cpu)
        faults[arm].append(minor_faults() - start_faults)
        return time.perf_counter() - start

    for arm in arms:  # warm-up: the concept stream encodes its words once, at its first call
        run(arm)
    flops = {arm: count_flops(run, arm) for arm in ARMS + (ROWS_BOUND,) if arm in arms} if args.flops else {}
    counted = {} if not flops else {
        "flops": flops, "probe_flops_over_plain": round(flops["probe"] / flops["plain"], 4),
        "traced_flops_over_plain": round(flops["traced"] / flops["plain"], 4)}
    if args.repeats == 0:
        return {**counted, "repeats": 0, "arm_prompts": len(prompt)}
    runs = {arm: [] for arm in arms}
    cpu.update({arm: [] for arm in arms})  # the timed runs' only
    faults.update({arm: [] for arm in arms})
    for repeat in range(args.repeats):
        order = arms[repeat % len(arms):] + arms[:repeat % len(arms)]
        for arm in order:
            runs[arm].append(run(arm))
    medians = {arm: statistics.median(times) for arm, times in runs.items()}
    # Each repeat runs the arms back to back: the median of the per-repeat ratios cancels drift
    # between repeats (other tenants of a shared machine) that the ratio of medians keeps.
    paired = {arm: statistics.median(a / b for a, b in zip(runs[arm], runs["plain"])) for arm in arms[1:]}
    paired_cpu = {arm: statistics.median(a / b for a, b in zip(cpu[arm], cpu["plain"])) for arm in arms[1:]}
    budgets = [{"budget_mib": budget, "slots": probes[budget_arm(budget)][1].slots,
                "median_seconds": round(medians[budget_arm(budget)], 4),
                "probe_over_plain": round(medians[budget_arm(budget)] / medians["plain"], 3),
                "paired_probe_over_plain": round(paired[budget_arm(budget)], 3)}
               for budget in args.stream_budgets if budget_arm(budget) in probes]
    bound = {} if ROWS_BOUND not in arms else {"rows_bound": {
        "extra_tokens": len(concept_set), "max_sequence_length": wider["max_sequence_length"],
        "over_plain": round(medians[ROWS_BOUND] / medians["plain"], 3),
        "paired_over_plain": round(paired[ROWS_BOUND], 3), "paired_cpu_over_plain": round(paired_cpu[ROWS_BOUND], 3),
        **({"flops_over_plain": round(flops[ROWS_BOUND] / flops["plain"], 4)} if flops else {})}}
    return {"median_seconds": {arm: round(value, 4) for arm, value in medians.items()},
            "probe_over_plain": round(medians["probe"] / medians["plain"], 3),
            "traced_over_plain": round(medians["traced"] / medians["plain"], 3),
            "paired_probe_over_plain": round(paired["probe"], 3),
            "paired_traced_over_plain": round(paired["traced"], 3),
            "cpu_median_seconds": {arm: round(statistics.median(times), 4) for arm, times in cpu.items()},
            "paired_cpu_probe_over_plain": round(paired_cpu["probe"], 3),
            "paired_cpu_traced_over_plain": round(paired_cpu["traced"], 3),
            "cpu_seconds": {arm: [round(value, 4) for value in times] for arm, times in cpu.items()},
            "median_minor_faults": {arm: int(statistics.median(counts)) for arm, counts in faults.items()},
            "seconds": {arm: [round(value, 4) for value in times] for arm, times in runs.items()},
            "repeats": args.repeats, "arm_prompts": len(prompt), **counted,
            **({"slots": probes["probe"][1].slots, "budget_arms": budgets} if budgets else {}), **bound}


def minor_faults() -> int:
    """This process's minor page faults so far (Linux and macOS; 0 where `resource` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def budget_arm(budget: float) -> str:
    return f"probe, arena <= {budget:g} MiB"


def count_flops(run, arm: str) -> int:
    """Matmul, convolution and attention FLOPs of one generation of an arm (torch's FlopCounterMode, with a
    formula for the CPU flash-attention kernel, which it does not count by itself)."""
    from torch.utils import flop_counter

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_attention not in flop_counter.flop_registry:
        def attention_flops(query, key, value, *args, out_val=None, **kwargs):
            return flop_counter.sdpa_flop_count(query, key, value)

        flop_counter.register_flop_formula(cpu_attention)(attention_flops)
    with flop_counter.FlopCounterMode(display=False) as counter:
        run(arm)
    return int(counter.get_total_flops())


def side_by_side(results: list[dict]) -> str:
    """One row per model: heads, seconds per generation plain, the traced / probe ratios (and FLOP ratios)."""
    flops = any("flops" in entry for entry in results)
    rows = []
    for entry in results:
        timed = "median_seconds" in entry
        row = [entry["model"][:72], entry["family"], entry["heads"]]
        row += [entry["median_seconds"]["plain"], entry["traced_over_plain"], entry["probe_over_plain"],
                entry["paired_traced_over_plain"], entry["paired_probe_over_plain"],
                entry["paired_cpu_probe_over_plain"]] if timed else ["-"] * 6
        if flops:
            row.append(entry.get("probe_flops_over_plain", "-"))
        rows.append(tuple(row))
    names = ["model", "family", "heads", "plain s", "traced / plain", "probe / plain", "paired traced",
             "paired probe", "paired probe CPU"] + (["probe / plain FLOPs"] if flops else [])
    return "\n" + harness.table(rows, names, digits=3, left=2)


def table(result: dict) -> str:
    rows = [("model", result["model"]), ("device / threads", f"{result['device']} / {result['threads']}"),
            ("concepts", f"{result['concepts']} ({result['n_concepts']} concepts, {result['n_words']} words)"),
            ("steps, batch", f"{result['steps']}, {result['batch_size']}"),
            ("build", f"{result['n_prompts']} prompts in {result['build_seconds']} s"),
            ("prompts per minute", f"{result['prompts_per_minute']}")]
    if "median_seconds" in result:
        medians = result["median_seconds"]
        rows += [("generation, plain", f"{medians['plain']:.4f} s (median of {result['repeats']}, "
                                       f"{result['arm_prompts']} prompt(s))"),
                 ("generation, traced (no hook)", f"{medians['traced']:.4f} s  x{result['traced_over_plain']}"),
                 ("generation, with vote probe", f"{medians['probe']:.4f} s  x{result['probe_over_plain']}"),
                 ("paired ratios (median per repeat)", f"traced x{result['paired_traced_over_plain']}, "
                                                       f"probe x{result['paired_probe_over_plain']}"),
                 ("paired ratios of CPU time", f"traced x{result['paired_cpu_traced_over_plain']}, "
                                               f"probe x{result['paired_cpu_probe_over_plain']}"),
                 ("minor page faults (median)", ", ".join(f"{arm} {count:,}" for arm, count in
                                                          result["median_minor_faults"].items()))]
        if "budget_arms" in result:
            rows.append((f"probe's arena ({STREAM_BUDGET_BYTES / 2**20:g} MiB)",
                         f"{result['slots']} forwards side by side"))
        for arm in result.get("budget_arms", []):
            carried = f"{arm['slots']} forwards side by side" if arm["slots"] else "block by block"
            rows.append((budget_arm(arm["budget_mib"]), f"{arm['median_seconds']:.4f} s  x{arm['probe_over_plain']}, "
                                                        f"paired x{arm['paired_probe_over_plain']} ({carried})"))
    if "rows_bound" in result:
        bound = result["rows_bound"]
        value = (f"{result['median_seconds'][ROWS_BOUND]:.4f} s  x{bound['over_plain']}, paired "
                 f"x{bound['paired_over_plain']}, CPU x{bound['paired_cpu_over_plain']}")
        if "flops_over_plain" in bound:
            value += f", FLOPs x{bound['flops_over_plain']}"
        rows.append((f"plain, {bound['extra_tokens']} more text tokens", value))
    if "flops" in result:
        rows.append(("FLOPs per generation, probe / plain", f"x{result['probe_flops_over_plain']} "
                                                            f"({result['flops']['plain']:.3g} plain)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
