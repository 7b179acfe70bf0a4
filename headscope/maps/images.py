"""Word maps of an image the model did not draw: noise it, denoise it with the prompt while tracing.

    tc = headscope.image_maps(pipe, "photo.png", "a red circle and a blue square", strength=0.5, samples=4)
    tc.word_map("circle")                       # [H, W], the same Trace object `trace()` returns

How: the image goes through diffusers' own image-to-image pipeline for the model
(`AutoPipelineForImage2Image.from_pipe`, which shares the modules, so nothing is reloaded): the VAE
encodes it, the scheduler noises it to `strength` (the img2img meaning: the share of the schedule
that is run) with `samples` independent noise seeds in one batched call, and the denoiser runs the
last `int(steps * strength)` steps with the prompt, guidance off by default (only the prompt's maps
are wanted, and without guidance there are no unconditional rows to pay for). The trace records
every step; the samples' maps are then averaged into one (image 0 of the trace), so the map does
not depend on one draw of noise.

Input checks: the file must be an image PIL reads; other modes than RGB are converted (said in
`tc.image_notes`); an image of another size is resized to the model's when its aspect ratio is the
same (said too), and refused otherwise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from headscope.errors import HeadscopeError
from headscope.processor import BatchLayout

DEFAULT_STRENGTH, DEFAULT_SAMPLES = 0.5, 4


def image_maps(pipe, image, prompt: str, *, strength: float = DEFAULT_STRENGTH, samples: int = DEFAULT_SAMPLES,
               steps: int | None = None, guidance: float = 1.0, seed: int = 0, keep_steps: bool = False,
               window=None, **trace_options):
    """Trace `pipe` denoising a noised copy of `image` with `prompt`; returns the Trace, maps averaged over samples.

    Args:
        image: a path or a PIL image.
        strength: in (0, 1]: how far into the schedule the image is noised (1 = pure noise).
        samples: noise seeds `seed`, `seed + 1`, ... whose maps are averaged.
        steps: the schedule's length (default: the model's generation default); int(steps * strength)
            denoising steps run.
        guidance: guidance scale of the denoising (1 = no classifier-free guidance).
        window: record only this part of the denoising (see `headscope.steps`; fractions count the
            steps that run), as `trace(steps=...)` does; other keyword arguments go to `trace`.
    """
    from headscope.hrv.meta import generation_defaults
    from headscope.trace import trace

    if not 0.0 < float(strength) <= 1.0:
        raise HeadscopeError(f"strength={strength} must lie in (0, 1] (1 noises the image completely)")
    if int(samples) < 1:
        raise HeadscopeError(f"samples={samples}; use at least 1 noise sample")
    n_steps = int(steps) if steps is not None else generation_defaults(pipe)[0]
    if int(n_steps * strength) < 1:
        raise HeadscopeError(f"steps={n_steps} x strength={strength} runs no denoising step; raise steps or strength")
    picture, notes = load_image(image, _native_size(pipe))
    try:
        img2img = _image_to_image(pipe)
    except ValueError as error:
        raise HeadscopeError(f"no image-to-image pipeline for {type(pipe).__name__}: {error}") from None
    img2img.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + sample) for sample in range(int(samples))]
    with trace(img2img, keep_steps=keep_steps, steps=window, **trace_options) as tc:
        img2img(prompt, image=picture, strength=float(strength), num_inference_steps=n_steps,
                guidance_scale=guidance, num_images_per_prompt=int(samples), generator=generators,
                output_type="latent")
    _pool_samples(tc)
    tc.image_notes = notes
    return tc


def _image_to_image(pipe):
    """diffusers' image-to-image pipeline sharing `pipe`'s modules (the auto-pipeline import is noisy)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import AutoPipelineForImage2Image
    finally:
        transformers_logging.set_verbosity(verbosity)
    return AutoPipelineForImage2Image.from_pipe(pipe)


def load_image(image, size: tuple[int, int]):
    """(RGB PIL image of `size` (h, w), notes): read, converted and resized where that is safe."""
    from PIL import Image, UnidentifiedImageError

    notes = []
    if not isinstance(image, Image.Image):
        path = Path(image).expanduser()
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except FileNotFoundError:
            raise HeadscopeError(f"image file {path} does not exist") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise HeadscopeError(f"cannot read {path} as an image ({type(error).__name__}); pass a PNG or JPEG") from None
    if image.mode != "RGB":
        notes.append(f"converted from mode {image.mode} to RGB")
        image = image.convert("RGB")
    height, width = size
    if (image.height, image.width) != (height, width):
        if image.height * width != image.width * height:
            raise HeadscopeError(f"image is {image.width}x{image.height}; this model makes {width}x{height} images: "
                                 "crop it to that aspect ratio first")
        notes.append(f"resized from {image.width}x{image.height} to {width}x{height}")
        image = image.resize((width, height), Image.BICUBIC)
    return image, notes


def _native_size(pipe) -> tuple[int, int]:
    """(h, w) in pixels of the images the pipeline makes by default."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    side = denoiser.config.sample_size
    height, width = (side, side) if isinstance(side, int) else side
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    return height * scale, width * scale


def _pool_samples(tc) -> None:
    """Average the recorded maps over the images of the call into image 0; the trace then holds one image."""
    reducer = tc.reducer
    for kind in reducer.sums:
        for layer, sums in reducer.sums[kind].items():
            reducer.sums[kind][layer] = sums.mean(dim=0, keepdim=True)  # [1, heads, keys, h, w]
        for layer, per_step in reducer.per_step[kind].items():
            for step, maps in per_step.items():
                per_step[step] = maps.mean(dim=0, keepdim=True)
    layout = tc.hooks.state.layout
    tc.hooks.state.layout = BatchLayout(n_images=1, cfg=layout.cfg, images_per_prompt=1)
    tc.images_per_prompt = 1
