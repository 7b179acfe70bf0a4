"""`headscope hrv ...`: build, show and import Head Relevance Vectors; ordered weakening.

Every command validates its input before it generates anything and writes its outputs atomically:
a user's mistake ends as one line on stderr with exit code 2 and leaves no partial file.
"""
from __future__ import annotations

from pathlib import Path

import click

from headscope.errors import HeadscopeError
from headscope_cli.common import MODEL_HELP, SEED, Finite, allow_unknown_option, claim_output

EXAMPLES = """
\b
Examples:
  headscope hrv build --n-prompts 256 --out shapes.hrv
  headscope hrv build --model path/to/sd-v1-5 --concepts hrv34 --prompts prompts.txt --out sd15.hrv
  headscope hrv build --model path/to/flux-dev --concepts my-concepts.json --prompts prompts.txt --out flux.hrv
  headscope hrv show shapes.hrv --top 5 --out out/hrv
  headscope hrv import hrv_sd_v1_4_34x128.npy --layout sd15 --out sd14.hrv
  headscope hrv weaken --concept color --seeds 0,1 --out out/weaken-color
"""
DEFAULT_SHAPES_PROMPTS = 256


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        items = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 0,4,8") from None
    if any(item < 0 for item in items):
        raise click.BadParameter(f"{value!r}: give integers >= 0, e.g. 0,4,8")
    if not items:
        raise click.BadParameter("give at least one integer")
    return items


def _hrv_out(ctx, param, value):
    """--out of build / import: a .hrv file name or a folder name that the result can take; held for this run."""
    if value.suffix == ".hrv" and value.is_dir():
        raise click.BadParameter(f"{value} is a folder; give a free .hrv file name (or a folder name without .hrv)")
    if value.suffix != ".hrv" and value.exists() and not value.is_dir():
        raise click.BadParameter(f"{value} is a file; an HRV folder goes there: give a .hrv file name or a free "
                                 "folder name")
    return claim_output(ctx, param, value)


def _word_list(ctx, param, value):
    items = [part.strip().lower() for part in value.split(",") if part.strip()]
    if not items:
        raise click.BadParameter("give at least one value")
    return items


@click.group("hrv", epilog=EXAMPLES)
def hrv():
    """Head Relevance Vectors: which text-conditioned attention heads serve which concept (UNet, SD3, Flux)."""


# -- build -----------------------------------------------------------------------------------------

@hrv.command("build", epilog=EXAMPLES)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--concepts", "concept_source", default=None, metavar="NAME|FILE",
              help="Concept set: shapes, hrv34 or a .json/.csv file [default: shapes for the embedded model, "
                   "else hrv34].")
@click.option("--concept", "chosen", multiple=True,
              help="Concept to report (repeatable). The vote always runs over the whole set.")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Text file, one prompt per line [default: shapes-world captions for the embedded model, "
                   "else the paper's 2,100 prompts].")
@click.option("--n-prompts", default=None, type=click.IntRange(min=1),
              help=f"Use the first N prompts [default: all of the file; {DEFAULT_SHAPES_PROMPTS} sampled captions].")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Denoising steps [default: the model's, else 50].")
@click.option("--guidance", default=None, type=Finite(min=0.0), help="Guidance scale [default: the model's, else 7.5].")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of word sampling, noise and captions.")
@click.option("--soft", is_flag=True, help="Sum mean probabilities instead of argmax votes.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Prompts per call.")
@click.option("--save-every", default=32, show_default=True, type=click.IntRange(min=1),
              help="Save partial counts to OUT.partial/ after about this many prompts (a rerun resumes).")
@click.option("--out", default=Path("out/hrv.hrv"), show_default=True, type=click.Path(path_type=Path),
              callback=_hrv_out, help="HRV file (.hrv) or folder to write.")
@click.option("--device", default=None, help="cpu, cuda, mps... (default: best available).")
@click.option("--dtype", default=None, type=click.Choice(("fp32", "fp16", "bf16")), help="Weights dtype.")
@allow_unknown_option
def build_cmd(model, concept_source, chosen, prompts_file, n_prompts, steps, guidance, seed, soft, batch_size,
              save_every, out, device, dtype):
    """Build an HRV from ordinary generations; resumable, and splits across `accelerate launch` processes."""
    from headscope.concepts import ConceptSet
    from headscope.hrv import HRVBuilder, Processes
    from headscope.models import call_defaults, is_shapes_model
    from headscope_cli.common import load_model
    from headscope_cli.main import RESUME_HINT

    shapes_world = is_shapes_model(model)
    concept_set = ConceptSet.load(concept_source or ("shapes" if shapes_world else "hrv34"))
    chosen = [concept_set.check(name) for name in chosen] or concept_set.names
    prompts = load_prompts(prompts_file, n_prompts, seed, embedded=shapes_world)
    with Processes() as processes:
        device = device or processes.device  # under accelerate launch: this process's device
    pipe = load_model(model, device, dtype)  # any backbone: on SD3 / Flux the concept words ride the text stream
    pipe.set_progress_bar_config(disable=True)
    partial = out.with_name(out.name + ".partial")
    builder = HRVBuilder(concept_set, soft=soft, seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
                         partial=partial, save_every=save_every, progress=True,
                         call_options=call_defaults(pipe))
    click.get_current_context().meta[RESUME_HINT] = (f"votes so far are kept in {partial}/; run the same command "
                                                     "again to resume")
    builder.fit(pipe, prompts)
    if not builder.is_main_:
        return  # under accelerate launch, the main process writes the file
    builder.hrv_.save(out)
    builder.discard_partial()
    result = builder.hrv_
    click.echo(f"wrote {out}: {len(result.concepts)} concepts x {result.n_heads} heads from {len(prompts)} prompts, "
               f"{result.meta['steps']} steps ({'soft' if soft else 'argmax'} votes)")
    if result.meta.get("unvoted"):
        click.echo(f"warning: no head ever voted for {', '.join(result.meta['unvoted'])}; their rows are uniform",
                   err=True)
    click.echo(top_table(result, chosen, 5))


def load_prompts(prompts_file: Path | None, n_prompts: int | None, seed: int, *, embedded: bool) -> list[str]:
    """Prompts from a file (one per line), else shapes-world captions (embedded model) or the paper's prompts."""
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise HeadscopeError(f"cannot read prompts from {prompts_file}: {reason}") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise HeadscopeError(f"{prompts_file} holds no prompts (one prompt per line)")
        return prompts[:n_prompts] if n_prompts else prompts
    if embedded:
        from headscope.shapes.world import SceneSampler

        sampler = SceneSampler(seed=seed)
        return [sampler.sample().caption for _ in range(n_prompts or DEFAULT_SHAPES_PROMPTS)]
    from headscope.concepts import shipped_text

    text = shipped_text("hrv_prompts_2100.txt")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return prompts[:n_prompts] if n_prompts else prompts


def top_table(result, concepts, top: int) -> str:
    """Top heads per concept: layer name, head, flat id, relevance."""
    index = result.index
    lines = []
    for concept in concepts:
        lines.append(f"{result.concept(concept)}:")
        vector = result.vector(concept)
        for rank, head_id in enumerate(result.top_heads(concept, min(top, result.n_heads)).tolist(), start=1):
            layer, head = index.unflat(head_id)
            lines.append(f"  {rank:>2}. {index.layers[layer].name}  head {head:<2}  (id {head_id:>4})  "
                         f"{float(vector[head_id]):.3f}")
    return "\n".join(lines)


# -- show / import ---------------------------------------------------------------------------------

@hrv.command("show", epilog=EXAMPLES)
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--concept", "chosen", multiple=True, help="Concept to show (repeatable; default: all).")
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="Heads listed per concept.")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path), callback=claim_output,
              help="Folder for figures: a layers x heads map per concept and the similarity matrix.")
def show_cmd(file, chosen, top, out):
    """Print the top heads of each concept of an HRV FILE; with --out, draw its figures."""
    from headscope.hrv import HRV

    result = HRV.load(file)
    chosen = [result.concept(name) for name in chosen] or list(result.concepts)
    meta = result.meta
    click.echo(f"{file}: {len(result.concepts)} concepts x {result.n_heads} heads; model "
               f"{(meta.get('model') or {}).get('name_or_path')}; {meta.get('n_prompts')} prompts, "
               f"{meta.get('steps')} steps, {'soft' if meta.get('soft') else 'argmax'} votes")
    click.echo(top_table(result, chosen, top))
    if out is None:
        return
    from headscope import viz
    from headscope.io import staged_folder
    from headscope_cli.main import _slug

    with staged_folder(out) as stage:
        for concept in chosen:
            viz.save_figure(viz.hrv_heatmap_figure(result, concept, top=top), stage / f"hrv-{_slug(concept)}.png")
        viz.save_figure(viz.hrv_similarity_figure(result), stage / "similarity.png")
    click.echo(f"wrote {len(chosen) + 1} figures to {out}")


@hrv.command("import", epilog=EXAMPLES)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--layout", required=True, type=click.Choice(("sd15", "sdxl")),
              help="sd15: SD 1.4/1.5 (128 heads); sdxl: SDXL base 1.0 (1,300 heads).")
@click.option("--out", required=True, type=click.Path(path_type=Path), callback=_hrv_out,
              help="HRV file (.hrv) or folder to write.")
def import_cmd(file, layout, out):
    """Turn the HRV paper's official .npy array into a headscope HRV file."""
    from headscope.hrv import HRV

    result = HRV.from_official(file, layout)
    result.save(out)
    click.echo(f"wrote {out}: {len(result.concepts)} concepts x {result.n_heads} heads ({layout})")


# -- weaken ----------------------------------------------------------------------------------------

@hrv.command("weaken", epilog=EXAMPLES)
@click.option("--concept", required=True, help="Concept to weaken (a concept of the HRV).")
@click.option("--hrv", "hrv_file", default=None, type=click.Path(path_type=Path),
              help="HRV file [default: the embedded model's shipped HRV].")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--k", "ks", default=None, callback=_int_list, metavar="K,K,...",
              help="Numbers of weakened heads [default: 0, n/8, n/4, n/2, n].")
@click.option("--factor", default=-2.0, show_default=True, type=Finite(), help="Map multiplier (0 ablates).")
@click.option("--seeds", default="0,1", show_default=True, callback=_int_list, help="Image seeds.")
@click.option("--n-prompts", default=16, show_default=True, type=click.IntRange(min=1), help="Prompts to generate.")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Text file, one prompt per line (scored with --clip) [default: one-object shapes scenes for "
                   "the embedded model; 'a photo of a WORD' for the concept's words otherwise].")
@click.option("--order", "orders", default="morhf,lerhf,random", show_default=True, callback=_word_list,
              help="Orders to compare.")
@click.option("--clip", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Local CLIP model folder (transformers) to score plain-text prompts.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Denoising steps [default: the model's].")
@click.option("--guidance", default=None, type=Finite(min=0.0), help="Guidance scale [default: the model's].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Prompts per call.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the prompts and the random order.")
@click.option("--out", default=Path("out/weaken"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              callback=claim_output, help="Output folder: weakening.csv, weakening.json, weakening.png.")
@click.option("--device", default=None, help="cpu, cuda, mps... (default: best available).")
@allow_unknown_option
def weaken_cmd(concept, hrv_file, model, ks, factor, seeds, n_prompts, prompts_file, orders, clip, steps, guidance,
               batch_size, seed, out, device):
    """Ordered weakening: weaken the top-k heads by relevance (MoRHF), least relevant (LeRHF) and random."""
    from headscope.hrv import HRV
    from headscope.models import is_shapes_model
    from headscope.weaken import ORDERS, OrderedWeakening, weakening_scenes
    from headscope_cli.common import load_model
    from headscope.models import call_defaults

    unknown = [order for order in orders if order not in ORDERS]
    if unknown:
        raise HeadscopeError(f"unknown order(s) {', '.join(unknown)}; use {', '.join(ORDERS)}")
    result = HRV.load(hrv_file) if hrv_file is not None else None
    if result is not None:
        result.concept(concept)
    if prompts_file is not None and clip is None:
        raise HeadscopeError("prompts from a file are scored with CLIP: pass --clip PATH to a local CLIP model")
    pipe = load_model(model, device, None)  # any backbone: SD3 / Flux weaken the image queries' maps
    pipe.set_progress_bar_config(disable=True)
    result = result or HRV.for_pipeline(pipe)
    concept = result.concept(concept)
    if prompts_file is not None:
        prompts = load_prompts(prompts_file, n_prompts, seed, embedded=False)
    elif is_shapes_model(model):
        prompts = weakening_scenes(n_prompts, seed)
    else:
        if clip is None:
            raise HeadscopeError("on a real model the metric is CLIP similarity: pass --clip PATH to a local "
                                 "CLIP model folder")
        words = result.concept_words.get(concept) or [concept]
        prompts = [f"a photo of a {word}" for word in words][:n_prompts]
    sweep = OrderedWeakening(concept, result, ks=ks, factor=factor, orders=orders, seeds=seeds, random_seed=seed,
                             clip=clip, steps=steps, guidance=guidance, batch_size=batch_size, progress=True,
                             call_options=call_defaults(pipe))
    sweep.plan()
    sweep.fit(pipe, prompts)
    write_weakening(out, sweep)
    click.echo(weakening_table(sweep.summary_))
    click.echo(f"wrote weakening.csv, weakening.json, weakening.png to {out}")


def write_weakening(out: Path, sweep) -> None:
    """CSV (summary), JSON (settings, summary, per-image records) and the curve figure, atomically."""
    import csv
    import io

    from headscope import viz
    from headscope.weaken import curve_figure
    from headscope.io import staged_folder, write_json, write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["order", "k", "concept", "role", "mean", "n"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(sweep.summary_)
    with staged_folder(out) as stage:
        write_text(stage / "weakening.csv", buffer.getvalue())
        payload = {"settings": sweep.settings_, "summary": sweep.summary_, "records": sweep.results_}
        write_json(stage / "weakening.json", payload, indent=1)
        viz.save_figure(curve_figure(sweep.summary_, sweep.settings_), stage / "weakening.png")


def weakening_table(summary: list[dict]) -> str:
    """Rows: concept (role), order; columns: k."""
    ks = sorted({row["k"] for row in summary})
    lines = [f"{'concept':<24}{'order':<8}" + "".join(f"{'k=' + str(k):>9}" for k in ks)]
    keys = list(dict.fromkeys((row["concept"], row["role"], row["order"]) for row in summary))
    for concept, role, order in keys:
        values = {row["k"]: row["mean"] for row in summary
                  if (row["concept"], row["role"], row["order"]) == (concept, role, order)}
        label = f"{concept} ({'weakened' if role == 'weakened' else 'control'})"
        lines.append(f"{label:<24}{order:<8}" + "".join(f"{values[k]:>9.3f}" if k in values else f"{'':>9}" for k in ks))
    return "\n".join(lines)

