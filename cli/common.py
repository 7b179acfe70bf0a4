"""What several commands share: model options, loading, the generation settings a model defaults to,
and the option types and callbacks that check input before anything runs."""
from __future__ import annotations

import math
import os

import click

from headscope.errors import HeadscopeError

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5
MODEL_HELP = ("Pipeline folder, hub id, or an embedded model: shapes (the default, SD-style UNet) or "
              "shapes-mmdit (SD3-style joint attention).")
SEED = click.IntRange(0, 2**63 - 1)  # what torch, numpy and Python's random all take


class Finite(click.FloatRange):
    """A float option that refuses nan and inf (click's FloatRange lets nan through every bound)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def claim_output(ctx, param, value):
    """Option callback: hold the output path for this run (`headscope.io.output_lock`), so that a second
    run into the same --out is refused at once, naming the first; released when the command ends.

    Under `accelerate launch` / torchrun only the first process (RANK 0) holds it, for all of them.
    """
    if value is not None and int(os.environ.get("RANK", "0") or 0) == 0:
        from headscope.io import output_lock

        # On the root context: a later option can still fail to parse, and then only the root is closed.
        ctx.find_root().with_resource(output_lock(value))
    return value


def _allow_unknown(ctx, param, value):
    if value:
        from headscope.tokens import allow_unknown_words

        ctx.find_root().with_resource(allow_unknown_words())  # the root: see claim_output


allow_unknown_option = click.option(
    "--allow-unknown-words", is_flag=True, expose_value=False, callback=_allow_unknown,
    help="Accept prompt words the model's tokenizer can only turn into its unknown token (refused by default).")


def model_options(command):
    """Decorator adding --model, --device and --dtype."""
    options = [
        click.option("--model", default=None, help=MODEL_HELP),
        click.option("--device", default=None, help="cpu, cuda, mps... (default: best available)."),
        click.option("--dtype", default=None, type=click.Choice(DTYPES), help="Weights dtype (default: as saved)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_model(model, device, dtype):
    """The pipeline of --model; HeadscopeError unless its denoiser is of a family headscope knows (UNet,
    SD3, Flux; the message names them) and it has a tokenizer."""
    from headscope.backbones import backbone_for
    from headscope.models import load_pipeline

    pipe = load_pipeline(model, device, dtype)
    backbone_for(pipe)
    if getattr(pipe, "tokenizer", None) is None:
        raise HeadscopeError(f"{model or 'the embedded model'} is not a text-to-image pipeline (no tokenizer)")
    return pipe


def generation_settings(pipe, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """(steps, guidance): the options where given, else the model's shipped defaults, else 25 and 7.5."""
    from headscope.models import model_defaults

    defaults = model_defaults(pipe)
    steps = steps or int(defaults.get("num_inference_steps", DEFAULT_STEPS))
    guidance = guidance if guidance is not None else float(defaults.get("guidance_scale", DEFAULT_GUIDANCE))
    return steps, guidance
