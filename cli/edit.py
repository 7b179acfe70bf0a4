"""`headscope edit`: prompt-to-prompt word swaps (P2P), and P2P-HRV with --concept.

Options are checked by click before any model is loaded; prompts, the HRV and its concept are checked
against the loaded pipeline before anything is generated, and the outputs are staged and moved into
--out only when both images and the figure are done: a mistake is one line with exit code 2 and
leaves no output.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from headscope.backbones import require_unet
from headscope.errors import HeadscopeError
from headscope.steer.edit import DEFAULT_CROSS, DEFAULT_SELF
from headscope_cli.common import (DEFAULT_GUIDANCE, DEFAULT_STEPS, SEED, Finite, allow_unknown_option, claim_output,
                                  generation_settings, load_model, model_options)
EDIT_EXAMPLES = """
\b
Examples:
  headscope edit "a red circle and a blue square" "a green circle and a blue square" --seed 1
  headscope edit "a red circle" "a blue circle" --concept color --strength 1.5 --out out/edit
  headscope edit "a red circle" "a red star" --cross-steps 0.6 --self-steps 0.2
"""
FRACTION = click.FloatRange(0.0, 1.0)
FILES = ("source.png", "edited.png", "comparison.png", "run.json")


@click.command("edit", epilog=EDIT_EXAMPLES)
@click.argument("source_prompt")
@click.argument("target_prompt")
@model_options
@click.option("--seed", default=0, show_default=True, type=SEED, help="Random seed (both runs start from its noise).")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help=f"Denoising steps [default: the model's, else {DEFAULT_STEPS}].")
@click.option("--guidance", default=None, type=Finite(min=0.0),
              help=f"Classifier-free guidance scale [default: the model's, else {DEFAULT_GUIDANCE}].")
@click.option("--cross-steps", default=DEFAULT_CROSS, show_default=True, type=FRACTION, metavar="FRACTION",
              help="Inject the source's cross-attention maps over this first fraction of the steps (0: never).")
@click.option("--self-steps", default=DEFAULT_SELF, show_default=True, type=FRACTION, metavar="FRACTION",
              help="Inject the source's coarse self-attention over this first fraction of the steps (0: never).")
@click.option("--concept", default=None,
              help="P2P-HRV: strengthen the swapped word's maps by this concept's HRV (e.g. color).")
@click.option("--strength", default=None, type=Finite(),
              help="P2P-HRV factor 1 + STRENGTH * (HRV - 1); 1 is the paper's x HRV [default: 1].")
@click.option("--hrv", "hrv_file", default=None, type=click.Path(dir_okay=True),
              help="HRV file for --concept (default: the model's own HRV).")
@click.option("--out", default="out/edit", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              callback=claim_output, help="Output folder: source.png, edited.png, comparison.png, run.json.")
@allow_unknown_option
def edit(source_prompt, target_prompt, model, seed, steps, guidance, cross_steps, self_steps, concept, strength,
         hrv_file, out, device, dtype):
    """Edit the image of SOURCE_PROMPT into TARGET_PROMPT by swapping a word (prompt-to-prompt).

    Both prompts are generated from the same noise; the target run reuses the source's attention
    maps for the words the prompts share. With --concept (P2P-HRV) the swapped word's maps are
    also multiplied by that concept's Head Relevance Vector.
    """
    from headscope.steer.edit import Editor, align
    from headscope.steer import tokenize_prompts

    if concept is None and hrv_file is not None:
        raise HeadscopeError("--hrv is only used with --concept")
    if concept is None and strength is not None:
        raise HeadscopeError("--strength is only used with --concept")
    strength = 1.0 if strength is None else strength
    pipe = load_model(model, device, dtype)
    require_unet(pipe, "prompt-to-prompt edits")
    editor = Editor(pipe, cross_steps=cross_steps, self_steps=self_steps, concept=concept, hrv=hrv_file,
                    strength=strength)
    source_tokens, target_tokens = tokenize_prompts(pipe, [source_prompt, target_prompt])
    alignment = align(source_tokens, target_tokens, editor.swapped)
    if _words(source_tokens) == _words(target_tokens):
        raise HeadscopeError("the two prompts have the same words: change a word of TARGET_PROMPT to edit the image")
    swapped_in = [word.text for word in target_tokens.words if set(word.positions) & set(alignment.edited)]
    if concept is not None and not swapped_in:
        raise HeadscopeError("--concept strengthens the words TARGET_PROMPT puts in place of the source's, and "
                             "it has none (it only drops words)")
    steps, guidance = generation_settings(pipe, steps, guidance)
    pipe.set_progress_bar_config(disable=False, file=sys.stderr, desc="denoising", leave=False)
    result = editor(source_prompt, target_prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    run = {"source_prompt": source_prompt, "target_prompt": target_prompt, "seed": seed, "steps": steps,
           "guidance": guidance, "cross_steps": cross_steps, "self_steps": self_steps,
           "method": "p2p-hrv" if concept else "p2p", "swapped": editor.swapped, "swapped_in": swapped_in,
           "concept": concept, "strength": strength if concept else None,
           "hrv": (str(hrv_file) if hrv_file else "model default") if concept else None,
           "model": model or "embedded shapes model", "device": str(pipe.device),
           "dtype": str(pipe.unet.dtype).replace("torch.", ""), "stored_bytes": result.stored_bytes,
           "files": list(FILES)}
    write_edit(out, result.source[0], result.edited[0], run)
    click.echo(f"wrote {len(FILES)} files to {out}/")
    click.echo(f"  source: {out / 'source.png'}")
    click.echo(f"  edited: {out / 'edited.png'}")
    click.echo(f"  side by side: {out / 'comparison.png'}")
    click.echo(f"  settings: {out / 'run.json'}")


def _words(tokenization) -> list[str]:
    return [word.text.lower() for word in tokenization.words]


def write_edit(out: Path, source, edited, run: dict) -> None:
    """The two images, their side-by-side figure and run.json, moved into `out` together."""
    from headscope.io import write_json
    from headscope.viz import comparison_figure, save_figure
    from headscope.io import staged_folder

    with staged_folder(out) as stage:
        source.save(stage / "source.png")
        edited.save(stage / "edited.png")
        save_figure(comparison_figure(source, edited, run["source_prompt"], run["target_prompt"]),
                    stage / "comparison.png")
        write_json(stage / "run.json", run)

