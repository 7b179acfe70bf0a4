"""Trajectories: the clean image the model predicts at every step, beside that step's word maps.

At step k of an n-step run the scheduler holds the latent x_t and the model output at timestep t; the
clean-image estimate x0 is the scheduler's `pred_original_sample` where it reports one, else, for a
variance-preserving schedule with cumulative alphas a_t,
    epsilon:  x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    v:        x0 = sqrt(a_t) * x_t - sqrt(1 - a_t) * v
    sample:   x0 = model output.
The "rapid" variant (from a student report) starts at the same x_t and reaches the end in a few large
DDIM steps (eta = 0) instead of the n - k small ones, removing the same total noise: what the latent
already holds shows earlier than in the single-step x0.

The estimates are read by wrapping `pipe.scheduler.step` on the instance for one call (the class is
never touched) and the conditioning by a UNet forward pre-hook; the rapid runs call the UNet after the
traced call, so the trace does not count them as steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from headscope.errors import HeadscopeError

DEFAULT_AT = (0.2, 0.4, 0.6, 0.8)
DEFAULT_RAPID_STEPS = 3
MAX_FRAMES = 50


@dataclass
class Trajectory:
    """One generation's path. Latents are [steps, C, h, w]; images float [*, H, W, 3] in [0, 1]."""

    prompt: str
    timesteps: list[int]
    x0_latents: torch.Tensor
    final_latents: torch.Tensor
    image: np.ndarray                      # the pipeline's result, decoded from final_latents: [H, W, 3]
    x0_images: dict[int, np.ndarray]       # step -> decoded x0 estimate [H, W, 3]
    words: list[str] = field(default_factory=list)
    maps: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # word -> step -> [H, W]
    run_maps: dict[str, torch.Tensor] = field(default_factory=dict)          # word -> DAAM map of all steps
    rapid_images: dict[int, np.ndarray] = field(default_factory=dict)       # step -> [H, W, 3]
    rapid_steps: int = 0

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)


def steps_at(fractions, n_steps: int) -> list[int]:
    """Step indices at which each fraction (0 < f <= 1) of an n-step run is done: ceil(f * n) - 1."""
    steps = []
    for fraction in fractions:
        if not 0.0 < float(fraction) <= 1.0:
            raise HeadscopeError(f"--at {fraction:g} is out of range; give fractions of the run in (0, 1], "
                                 "e.g. 0.2,0.4,0.6,0.8")
        steps.append(max(0, math.ceil(float(fraction) * n_steps - 1e-9) - 1))
    return sorted(set(steps))


def record_trajectory(pipe, prompt: str, *, words, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                      negative_prompt=None, rapid_steps: int = 0, frames: int = MAX_FRAMES, progress=None) -> Trajectory:
    """Generate `prompt` once and record x0 per step, per-step maps of `words` and, with rapid_steps > 0,
    the rapid estimate from every step. Decodes at most `frames` evenly spaced steps (always the last)."""
    import headscope

    _check_pipeline(pipe, rapid_steps)
    capture = _StepCapture(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad(), capture, headscope.trace(pipe, keep_steps=True) as tc:
        final = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative_prompt,
                     generator=generator, output_type="latent").images
    n_steps = len(capture.x0)
    if n_steps == 0:
        raise HeadscopeError("the scheduler never stepped; nothing to record")
    shown = sorted({round(i * (n_steps - 1) / max(1, min(frames, n_steps) - 1)) for i in range(min(frames, n_steps))})
    x0 = torch.cat(capture.x0)  # [steps, C, h, w] for the one image
    trajectory = Trajectory(prompt=prompt, timesteps=capture.timesteps, x0_latents=x0, final_latents=final[:1],
                            image=decode(pipe, final[:1])[0],
                            x0_images=dict(zip(shown, decode(pipe, x0[shown]))), words=list(words),
                            rapid_steps=rapid_steps)
    for word in words:
        trajectory.maps[word] = {step: tc.word_map(word, steps=[step]).float().cpu() for step in shown}
        trajectory.run_maps[word] = tc.word_map(word).float().cpu()
    if rapid_steps:
        with torch.no_grad():
            rapid = [rapid_x0(pipe, capture, step, rapid_steps, guidance) for step in shown]
        trajectory.rapid_images = dict(zip(shown, decode(pipe, torch.cat(rapid))))
    return trajectory


def rapid_x0(pipe, capture: "_StepCapture", step: int, n_jumps: int, guidance: float) -> torch.Tensor:
    """From the latent entering `step`, reach the end in `n_jumps` DDIM steps (eta 0): x0 [1, C, h, w].

    The timesteps are t_k * (1 - j / n_jumps) for j = 0..n_jumps-1, and after the last model call the
    latent jumps to a = 1 (no noise left). n_jumps = 1 is the plain x0 estimate of that step.
    """
    scheduler = pipe.scheduler
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    start = int(capture.timesteps[step])
    latent = capture.samples[step].to(torch.float64)
    times = [round(start * (1 - jump / n_jumps)) for jump in range(n_jumps)]
    x0 = latent
    for number, time in enumerate(times):
        output = _guided_output(pipe, capture, latent.to(capture.samples[step].dtype), time, guidance).to(torch.float64)
        x0, epsilon = _x0_and_noise(scheduler.config.prediction_type, output, latent, float(alphas[time]))
        alpha_next = float(alphas[times[number + 1]]) if number + 1 < len(times) else 1.0
        latent = math.sqrt(alpha_next) * x0 + math.sqrt(1.0 - alpha_next) * epsilon
    return x0.to(capture.samples[step].dtype)


def decode(pipe, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode latents [n, C, h, w] the way the SD pipelines do: float images [n, H, W, 3] in [0, 1]."""
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    with torch.no_grad():
        decoded = torch.cat([vae.decode(scaled[i:i + 1], return_dict=False)[0] for i in range(len(scaled))])
    return pipe.image_processor.postprocess(decoded, output_type="np")


class _StepCapture:
    """Wraps pipe.scheduler.step on the instance and pre-hooks the UNet, for one pipeline call.

    x0[k]: [1, C, h, w] estimate of step k (first image); samples[k]: the latent entering step k;
    timesteps[k]; unet_kwargs: the conditioning of the first UNet call (constant over steps).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.x0, self.samples, self.timesteps = [], [], []
        self.unet_kwargs: dict | None = None
        self.guided = False

    def __enter__(self):
        scheduler = self.pipe.scheduler
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            wanted_dict = kwargs.pop("return_dict", True)
            output = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
            x0 = getattr(output, "pred_original_sample", None)
            if x0 is None:
                x0, _ = _x0_and_noise(scheduler.config.prediction_type, model_output, sample,
                                      float(scheduler.alphas_cumprod[int(timestep)]))
            self.x0.append(x0[:1].detach().float().cpu())
            self.samples.append(sample[:1].detach().cpu())
            self.timesteps.append(int(timestep))
            return output if wanted_dict else output.to_tuple()

        scheduler.step = step
        self._handle = self.pipe.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        return self

    def __exit__(self, *exc_info):
        self.pipe.scheduler.__dict__.pop("step", None)
        self._handle.remove()

    def _before_unet(self, module, args, kwargs):
        if self.unet_kwargs is None:
            self.guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
            self.unet_kwargs = {key: kwargs.get(key) for key in ("encoder_hidden_states", "timestep_cond",
                                                                  "added_cond_kwargs", "cross_attention_kwargs")}
            if self.unet_kwargs["encoder_hidden_states"] is None and len(args) > 2:
                self.unet_kwargs["encoder_hidden_states"] = args[2]


def _guided_output(pipe, capture: _StepCapture, latent: torch.Tensor, time: int, guidance: float) -> torch.Tensor:
    """The guided model output for the first image at an integer timestep: [1, C, h, w]."""
    kwargs = dict(capture.unet_kwargs)
    states = kwargs.pop("encoder_hidden_states")
    rows = 2 if capture.guided else 1
    count = states.shape[0] // rows  # the traced call's images; keep the first image's rows only
    pick = [0, count] if capture.guided else [0]
    extra = {key: ({name: value[pick] for name, value in item.items()} if isinstance(item, dict) else
                   (item[pick] if isinstance(item, torch.Tensor) else item)) for key, item in kwargs.items()}
    model_input = latent.repeat(rows, 1, 1, 1).to(pipe.unet.device)
    timestep = torch.tensor(time, device=pipe.unet.device)
    output = pipe.unet(model_input, timestep, encoder_hidden_states=states[pick], return_dict=False, **extra)[0]
    if capture.guided:
        uncond, cond = output.chunk(2)
        output = uncond + guidance * (cond - uncond)
    return output.cpu()


def _x0_and_noise(prediction_type: str, output: torch.Tensor, latent: torch.Tensor, alpha: float):
    """(x0, epsilon) from a model output at cumulative alpha `alpha` (variance-preserving latents)."""
    output, latent = output.to(latent.device, latent.dtype), latent
    root_alpha, root_beta = math.sqrt(alpha), math.sqrt(max(0.0, 1.0 - alpha))
    if prediction_type == "epsilon":
        x0 = (latent - root_beta * output) / max(root_alpha, 1e-8)
        return x0, output
    if prediction_type == "v_prediction":
        return root_alpha * latent - root_beta * output, root_alpha * output + root_beta * latent
    if prediction_type == "sample":
        return output, (latent - root_alpha * output) / max(root_beta, 1e-8)
    raise HeadscopeError(f"unknown prediction type {prediction_type!r}; use epsilon, v_prediction or sample")


def _check_pipeline(pipe, rapid_steps: int) -> None:
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise HeadscopeError("a trajectory needs a UNet pipeline with a VAE (SD 1.x / 2.x / XL); joint-attention "
                             "transformers (SD3, Flux) are not supported yet")
    _check_scheduler(pipe.scheduler, rapid_steps)


def _check_scheduler(scheduler, rapid_steps: int) -> None:
    if getattr(scheduler, "order", 1) != 1:
        raise HeadscopeError(f"{type(scheduler).__name__} calls the model {scheduler.order} times per step; a "
                             "trajectory needs a first-order scheduler (DDIM, DDPM, Euler, DPM-Solver++...)")
    if rapid_steps and (getattr(scheduler, "alphas_cumprod", None) is None
                        or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0):
        raise HeadscopeError(f"--rapid needs a variance-preserving scheduler (DDIM, DDPM, DPM-Solver); "
                             f"{type(scheduler).__name__} scales its latents by sigma")
