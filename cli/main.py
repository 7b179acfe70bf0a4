"""The `headscope` command: generate images, draw DAAM word maps, list a model's heads.

Every user mistake (a HeadscopeError, a click usage error, a file that cannot be read or written)
ends as one line on stderr and exit code 2, before anything is written to --out: outputs are staged
in a hidden folder next to --out and moved in only when everything succeeded. Ctrl-C ends as one
line and exit code 130, leaving --out as it was (resumable commands keep their partial results).
Each run holds its --out (`headscope.io.output_lock`): a second run into the same --out while the
first is running is refused at once, naming the first.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from headscope import __version__
from headscope.errors import HeadscopeError
from headscope.io import staged_folder, write_json
from headscope_cli.common import (DEFAULT_GUIDANCE, DEFAULT_STEPS, MODEL_HELP, SEED, Finite, allow_unknown_option,
                                  claim_output, generation_settings, load_model, model_options)
from headscope_cli.edit import edit
from headscope_cli.hrv import hrv
from headscope_cli.maps import concepts_option, from_context, image_options, map_options, write_concept_maps
from headscope_cli.report import report
from headscope_cli.shapes import shapes
from headscope_cli.study import study
from headscope_cli.steer import SteeringPlan, parse_fractions, plan_steering, steering_options
from headscope_cli.trajectory import run_trajectory, trajectory_options

EXAMPLES = """
\b
Examples:
  headscope generate "a red circle and a blue square" --seed 1 --daam
  headscope daam "a red circle and a blue square" --word circle --word square --out out/circle
  headscope generate "two red circles" --trajectory --at 0.2,0.4,0.6,0.8 --rapid --out out/trajectory
  headscope study pos --out out/study-pos        (and syntax, cohyponyms, adjectives, numeracy, guidance)
  headscope report out/study-pos
  headscope heads --model path/to/sd-v1-5
  headscope edit "a red circle and a blue square" "a green circle and a blue square" --concept color
"""
STEER_EXAMPLES = """\b
  headscope generate "a square in rose" --adjust rose=+color,-shape
  headscope generate "a square in rose" --adjust rose=+color,-shape --adjust-clamp 9
  headscope generate "a red circle and a blue square" --mitigate-neglect ae-hrv --subjects circle,square
  headscope generate "a small green star" --strengthen green=color:1.5 --steer-steps 0:0.5
"""


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
RESUME_HINT = "headscope.resume_hint"  # ctx.meta key: what a resumable command tells an interrupted user


class HeadscopeGroup(click.Group):
    """A click group whose errors are one line on stderr with exit code 2, never a traceback;
    Ctrl-C is one line and exit code 130."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            _fail(error.format_message(), error.ctx)
        except HeadscopeError as error:
            _fail(str(error))
        except click.ClickException as error:
            _fail(error.format_message(), code=error.exit_code)
        except click.Abort as error:
            if isinstance(error.__cause__, KeyboardInterrupt):  # Ctrl-C while click parsed the options
                _interrupted(None)
            _fail("aborted", code=1)
        except OSError as error:  # a file the user named that cannot be read or written
            _fail(f"{error.strerror or error}{': ' + str(error.filename) if error.filename else ''}")
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # before click turns it into Abort and prints a blank line
            _interrupted(ctx.meta.get(RESUME_HINT))


def _fail(message: str, ctx: click.Context | None = None, code: int = 2):
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    click.echo(f"headscope: error: {' '.join(str(message).split())}{hint}", err=True)
    sys.exit(code)


def _interrupted(hint: str | None):
    """One line and exit code 130; staged outputs and temporary files are already gone."""
    click.echo(f"headscope: interrupted{'; ' + hint if hint else ''}", err=True)
    sys.exit(INTERRUPTED)


@click.group(name="headscope", cls=HeadscopeGroup, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="headscope", message="%(prog)s %(version)s")
def cli():
    """Look inside the cross-attention heads of text-to-image diffusion models."""
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep stderr for our progress bar and errors: no loading bars or warnings from the libraries."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def generation_options(command):
    """Options shared by `generate` and `daam`."""
    options = [
        click.option("--seed", default=0, show_default=True, type=SEED, help="Random seed."),
        click.option("--steps", default=None, type=click.IntRange(min=1),
                     help=f"Denoising steps [default: the model's, else {DEFAULT_STEPS}]."),
        click.option("--guidance", default=None, type=Finite(min=0.0),
                     help=f"Classifier-free guidance scale, <= 1 turns it off [default: the model's, else "
                          f"{DEFAULT_GUIDANCE}]."),
        click.option("--negative-prompt", default=None, help="Negative prompt."),
        click.option("--num-images", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Images to generate for the prompt."),
        click.option("--window", default=None, callback=parse_fractions, metavar="START:END",
                     help="Record only this part of the run, as fractions (e.g. 0:0.5)."),
        click.option("--out", default="out", show_default=True, type=click.Path(file_okay=False, path_type=Path),
                     callback=claim_output, help="Output folder."),
        allow_unknown_option,
    ]
    for option in reversed(options):
        command = option(command)
    return model_options(command)


@cli.command(epilog=EXAMPLES + STEER_EXAMPLES)
@click.argument("prompt")
@generation_options
@click.option("--daam", "with_daam", is_flag=True, help="Also draw a heat map for every word.")
@map_options(hrv=False)
@steering_options
@trajectory_options
def generate(prompt, with_daam, strengthen, adjust, adjust_clamp, hrv_file, steer_steps, neglect, subjects,
             trajectory, **options):
    """Generate image(s) for PROMPT into --out (image.png, summary.json; maps/ with --daam).

    Steering by heads: --strengthen / --adjust scale a word's cross-attention maps head by head with
    Head Relevance Vectors; --mitigate-neglect brings back objects the model leaves out.
    --trajectory: the clean image the model predicts at every step beside per-step word maps.
    """
    steer = dict(strengthen=strengthen, adjust=adjust, adjust_clamp=adjust_clamp, hrv_file=hrv_file,
                 steer_steps=steer_steps, neglect=neglect, subjects=subjects)
    if run_trajectory(prompt, trajectory, with_daam=with_daam, steer=steer, **options):
        return
    words = [] if with_daam else None
    _run(prompt, words=words, head_grids=False, steer=steer, **options)


@cli.command(epilog=EXAMPLES)
@click.argument("prompt")
@generation_options
@click.option("--word", "words", multiple=True, help="Word to map (repeatable; default: every word).")
@map_options(hrv=True)
@image_options
@concepts_option
def daam(prompt, words, concepts, **options):
    """Generate PROMPT (or read --image) and draw word maps and per-head grids into --out/maps.

    SD3 / Flux: --concepts A,B,... also draws ConceptAttention maps (output space) of those concepts.
    """
    _run(prompt, words=list(words) or (None if concepts else []), head_grids=True, concepts=concepts, **options)


@cli.command(epilog=EXAMPLES)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the layout as JSON instead of a table.")
def heads(model, as_json):
    """List the text-conditioned attention layers and heads of a model, in execution order.

    UNets (SD 1.x / 2.x / XL): cross-attention layers; SD3 / SD3.5: joint blocks; Flux: double- then
    single-stream blocks. A local folder is read from its config alone, without loading weights.
    """
    from headscope.heads import HeadIndex

    config = _denoiser_config(model)
    index = (HeadIndex.from_config(config) if config is not None
             else HeadIndex.from_model(load_model(model, "cpu", None)))
    if as_json:
        click.echo(json.dumps({"fingerprint": index.fingerprint(), "latent": list(index.latent_hw),
                               "layers": index.layout()}, indent=2))
        return
    click.echo(heads_table(index))


def heads_table(index) -> str:
    """The head index as a fixed-width text table."""
    height, width = index.latent_hw
    lines = [f"{index.n_layers} {index.noun} layers, {index.n_heads} heads, latent {height}×{width}, "
             f"fingerprint {index.fingerprint()}"]
    name_width = max(len(layer.name) for layer in index.layers)
    header = (f"{'layer':>5}  {'name':<{name_width}}  {'block':<6}  {'level':>5}  {'resolution':>10}  "
              f"{'heads':>5}  {'head_dim':>8}  flat ids")
    lines += [header, "-" * len(header)]
    for layer in index.layers:
        block = "mid" if layer.block == "mid" else f"{layer.block} {layer.block_index}"
        resolution = "×".join(map(str, layer.resolution))
        ids = f"{layer.head_ids.start}-{layer.head_ids.stop - 1}"
        lines.append(f"{layer.index:>5}  {layer.name:<{name_width}}  {block:<6}  {layer.level:>5}  {resolution:>10}  "
                     f"{layer.heads:>5}  {layer.head_dim:>8}  {ids}")
    return "\n".join(lines)


# -- running a generation ----------------------------------------------------------------------

def _run(prompt, *, words, head_grids, model, seed, steps, guidance, negative_prompt, num_images, window,
         out, device, dtype, steer=None, concepts=None):
    """Load, validate, generate, write everything into a staging folder, then move it into `out`."""
    import torch

    from headscope.backbones import denoiser_of
    from headscope.models import call_defaults
    from headscope.prompts import prompt_tokens

    maps, source, steer = from_context(words=words, steer=steer, guidance=guidance, num_images=num_images,
                                       negative_prompt=negative_prompt)
    pipe = load_model(model, device, dtype)
    steps, guidance = generation_settings(pipe, steps, guidance)
    defaults = call_defaults(pipe)
    tokenization = prompt_tokens(pipe, prompt, **defaults)  # the tokens word maps use (SD3: CLIP; Flux: T5)
    if negative_prompt:
        prompt_tokens(pipe, negative_prompt, **defaults)
    if words is not None:
        words = words or list(dict.fromkeys(word.lower() for word in tokenization.word_texts()))
        if not words:
            raise HeadscopeError(f"the prompt {prompt!r} has no words to draw maps of; give a prompt with words")
        for word in words:
            tokenization.positions(word)
        maps.check(pipe, words)
    if source is not None:
        if concepts is not None:
            raise HeadscopeError("--concepts draws the maps of a generated image; it does not take --image yet")
        source.check(pipe)
    plan = plan_steering(pipe, prompt, **steer) if steer else SteeringPlan()
    pipe.set_progress_bar_config(disable=False, file=sys.stderr, desc="denoising", leave=False)
    generator = torch.Generator("cpu").manual_seed(seed)
    call = dict(num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative_prompt,
                num_images_per_prompt=num_images, generator=generator, **defaults)
    if source is not None:
        tc, images = source.trace(pipe, prompt, steps=steps, seed=seed, window=window)
    elif concepts is not None:  # daam only: no steering options there
        from headscope.trace import trace

        with trace(pipe, steps=window, concepts=concepts, maps=words is not None) as tc:
            images = pipe(prompt, **call).images
    else:
        with plan.running(pipe, record=words is not None, window=window) as (tc, extra):
            images = pipe(prompt, **call, **extra).images
    summary = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
               "guidance": guidance, "num_images": num_images, "model": model or "embedded shapes model",
               "device": str(pipe.device), "dtype": str(denoiser_of(pipe).dtype).replace("torch.", ""),
               "window": window, "files": []}
    if plan.summary:
        summary["steering"] = plan.summary
    if source is not None:
        summary.update(source.summary())
    if words is not None:
        summary["maps"] = maps.summary
    with staged_folder(out) as stage:
        summary["files"] += _write_images(stage, images)
        if words is not None:
            summary["heads"] = {"layers": tc.index.n_layers, "heads": tc.index.n_heads,
                                "fingerprint": tc.index.fingerprint()}
            summary["words"], files = _write_maps(stage, tc, images, words, prompt, head_grids, maps.options)
            summary["files"] += files
        if concepts is not None:
            summary["heads"] = {"layers": tc.index.n_layers, "heads": tc.index.n_heads,
                                "fingerprint": tc.index.fingerprint()}
            summary["concepts"], files = write_concept_maps(stage, tc, images, concepts, prompt)
            summary["files"] += files
        summary["files"].append("summary.json")
        write_json(stage / "summary.json", summary)
    _report(out, summary["files"])


def _report(out: Path, files: list[str]) -> None:
    """Tell the user where the pictures are: images, the all-words grid, per-word overlays, summary."""
    images = [f for f in files if f.startswith("image")]
    grids = [f for f in files if f.startswith("maps/words")]
    overlays = [f for f in files if f.startswith("maps/word-")]
    concept_maps = [f for f in files if f.startswith("maps/concept-")]
    head_grids = [f for f in files if f.startswith("maps/heads-")]
    click.echo(f"wrote {len(files)} files to {out}/")
    click.echo(f"  image{'s' if len(images) > 1 else ''}: " + ", ".join(str(out / f) for f in images))
    if grids:
        click.echo("  all word maps: " + ", ".join(str(out / f) for f in grids))
    if overlays:
        click.echo(f"  one map per word: {out / 'maps'}/word-*.png ({len(overlays)} files)")
    if head_grids:
        click.echo(f"  layer x head grids: {out / 'maps'}/heads-*.png ({len(head_grids)} files)")
    if concept_maps:
        click.echo(f"  one map per concept: {out / 'maps'}/concept-*.png ({len(concept_maps)} files), all of them "
                   f"in {out / 'maps'}/concepts*.png")
    click.echo(f"  summary: {out / 'summary.json'}")


def _write_images(stage: Path, images) -> list[str]:
    names = ["image.png"] if len(images) == 1 else [f"image-{number}.png" for number in range(len(images))]
    for name, image in zip(names, images):
        image.save(stage / name)
    return names


def _write_maps(stage: Path, tc, images, words, prompt, head_grids, method_options=None):
    """Word-map figures (per word, and a grid per image) + per-head grids; returns (stats, files).

    method_options: keyword arguments of `tc.word_map` / `tc.head_maps` (the map method), default DAAM's.
    """
    from headscope import viz

    stats, files = {word: [] for word in words}, []
    (stage / "maps").mkdir()
    for image_number, image in enumerate(images):
        suffix = "" if len(images) == 1 else f"-{image_number}"
        maps = {word: tc.word_map(word, image=image_number, **(method_options or {})).cpu() for word in words}
        for word, heat_map in maps.items():
            stats[word].append(_map_stats(tc, word, image_number, heat_map))
            files.append(_save(viz.overlay_figure(image, heat_map, word=word, prompt=prompt),
                               stage, f"maps/word-{_slug(word)}{suffix}.png"))
            if head_grids:
                figure = viz.head_grid_figure(tc.head_maps(word, image=image_number, **(method_options or {})),
                                              tc.index, word=word, prompt=prompt)
                files.append(_save(figure, stage, f"maps/heads-{_slug(word)}{suffix}.png"))
        files.append(_save(viz.word_grid_figure(image, maps, prompt=prompt), stage, f"maps/words{suffix}.png"))
    return stats, files


def _map_stats(tc, word, image_number, heat_map) -> dict:
    from headscope.maps.daam import threshold

    return {"image": image_number, "tokens": tc.tokenization(image_number).positions(word),
            "max": round(float(heat_map.max()), 6), "mean": round(float(heat_map.mean()), 6),
            "area_at_0.4": round(float(threshold(heat_map, 0.4).float().mean()), 6)}


def _save(figure, stage: Path, relative: str) -> str:
    from headscope.viz import save_figure

    save_figure(figure, stage / relative)
    return relative


def _slug(word: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-") or "word"


# -- models ------------------------------------------------------------------------------------

def _denoiser_config(model) -> dict | None:
    """The denoiser config (unet/ or transformer/config.json) of a local pipeline folder, no weights loaded;
    None for a hub id."""
    from headscope.models import resolve_model

    folder = Path(resolve_model(model)).expanduser()
    if not folder.exists():
        if str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
            raise HeadscopeError(f"model folder {model} does not exist; pass an existing folder or a hub id")
        return None
    for candidate in (folder / "unet" / "config.json", folder / "transformer" / "config.json",
                      folder / "config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise HeadscopeError(f"{candidate} is not valid JSON ({error})") from None
    raise HeadscopeError(f"{folder} has no unet/config.json or transformer/config.json; pass a diffusers pipeline "
                         "folder or a hub id")


cli.add_command(shapes)
cli.add_command(hrv)
cli.add_command(edit)
cli.add_command(study)
cli.add_command(report)


def main() -> None:
    cli(prog_name="headscope")


if __name__ == "__main__":
    main()
