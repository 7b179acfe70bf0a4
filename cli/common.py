"""What several commands share: model options, loading, and the generation settings a model defaults to."""
from __future__ import annotations

import click

from headscope.errors import HeadscopeError

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_STEPS, DEFAULT_GUIDANCE = 25, 7.5


def model_options(command):
    """Decorator adding --model, --device and --dtype."""
    options = [
        click.option("--model", default=None, help="Pipeline folder or hub id (default: the embedded shapes model)."),
        click.option("--device", default=None, help="cpu, cuda, mps... (default: best available)."),
        click.option("--dtype", default=None, type=click.Choice(DTYPES), help="Weights dtype (default: as saved)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_model(model, device, dtype):
    """The pipeline of --model; HeadscopeError unless it is a text-to-image UNet pipeline."""
    from headscope.models import load_pipeline

    pipe = load_pipeline(model, device, dtype)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise HeadscopeError(f"{model or 'the embedded model'} is not a text-to-image UNet pipeline "
                             "(no unet or tokenizer)")
    return pipe


def generation_settings(pipe, steps: int | None, guidance: float | None) -> tuple[int, float]:
    """(steps, guidance): the options where given, else the model's shipped defaults, else 25 and 7.5."""
    from headscope.models import model_defaults

    defaults = model_defaults(pipe)
    steps = steps or int(defaults.get("num_inference_steps", DEFAULT_STEPS))
    guidance = guidance if guidance is not None else float(defaults.get("guidance_scale", DEFAULT_GUIDANCE))
    return steps, guidance
