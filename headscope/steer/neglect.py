"""Multi-concept neglect: Attend-and-Excite, A&E-HRV and gradient-free head reweighting.

(a) Attend-and-Excite (Chefer et al., SIGGRAPH 2023). At the early steps (default: the first half of
    the run, the paper's 25 of 50), before the UNet denoises step i, the latent is moved along
        - grad_z  max over subject tokens s of (1 - max over pixels of G * A_s)
    with step size 20 * sqrt(linspace(1, 0.5, steps)[i]). A_s is the cross-attention map of token s,
    averaged over the heads of the layers at one resolution (default: latent/4, A&E's 16x16 on SD's
    64x64 latents, else the UNet's middle level), restricted to the text tokens (start token dropped;
    the end token and padding too with `normalize_eot=True`), x100 and softmax-renormalised over them;
    G is a 3x3 Gaussian (sigma 0.5, reflect padding). At the paper's steps {0, 10, 20} of 50 (scaled to
    the run: fractions {0, 0.2, 0.4}) the update is iterated (at most 20 times) until every subject
    reaches max attention 0.05, 0.5, 0.8.
(b) A&E-HRV (Park et al., ICLR 2025): the same, with A_s the HRV-weighted mean over ALL heads of all
    layers, each head's map resized to one resolution (default: the coarsest cross-attention level,
    the paper's 8x8 on SD) — weights HRV_c[h] of the subject's concept.
(c) Head reweighting: no gradient; each subject token is strengthened by its concept's HRV through
    `HeadScale` (value scaling), x 1 + strength * (HRV_c[h] - 1).

Mechanism of (a)/(b) with an unmodified diffusers StableDiffusionPipeline, inside a `trace`:
  - the latents of step i >= 1 are updated in `callback_on_step_end` at the end of step i - 1 (the
    callback returns the new latents, which diffusers uses for step i); step 0's latents are updated
    when the pipeline's `prepare_latents` returns them (wrapped on the instance, like the trace wraps
    `encode_prompt`; both are restored on exit). The conditional prompt embeddings are taken from
    the pipeline's own `encode_prompt` call.
  - the maps come from a grad-enabled pass of the conditional rows through `unet.forward` — the same
    HeadProcessors, so steering hooks of the trace apply — with the trace's run state set to the step
    being prepared and a no-guidance batch layout. `unet.forward` is called directly, so module hooks
    (the trace's step counter) do not count the extra passes, and during them every other hook of the
    trace is write-only (readers such as the DAAM reducer do not record them).
  - the reference code feeds the latents to the UNet without `scheduler.scale_model_input`; here it
    is applied (the identity for DDIM and PNDM, which the paper uses; needed for Euler-type schedulers).

Differences from the reference implementations, on purpose: the Gaussian kernel is the textbook one
(the reference code's `exp(-((x - m) / (2 sigma)) ** 2)` is a Gaussian of sigma * sqrt(2)); maps
are taken at the resolution asked for on any model (diffusers hard-codes 16x16); A&E-HRV downsamples
with area averaging instead of a Gaussian blur + bicubic; several images and prompts are refined in
one batch (each image's loss only moves its own latent). SD 1.x / 2.x pipelines (no SDXL); on SD3
and Flux `AttendAndExcite` is `headscope.steer.joint_excite.JointAttendAndExcite` (maps of the joint
attention's image-query x text-key block; latents updated inside the pipeline's own transformer call).
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from headscope.backbones import backbone_for, denoiser_of
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex, resolution_at
from headscope.processor import BatchLayout
from headscope.steer.excite_maps import _gaussian_kernel, _MapCollector, _WriteOnly
from headscope.steer.scale import resolve_hrv, steering, tokenize_prompts
from headscope.steer.subjects import _describe, _heads, find_subjects
from headscope.steps import StepWindow

AE_WINDOW = (0.0, 0.5)                           # paper: max_iter_to_alter = 25 of 50 steps
AE_THRESHOLDS = {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}  # paper: {0: 0.05, 10: 0.5, 20: 0.8} of 50 steps
AE_SCALE_FACTOR, AE_SCALE_RANGE = 20.0, (1.0, 0.5)
AE_MAX_REFINEMENT = 20
LATENT_QUARTER_LEVEL = 2                        # latent/4: A&E's 16x16 on SD's 64x64 latents
METHODS = ("ae", "ae-hrv", "heads")

# -- (a), (b) Attend-and-Excite --------------------------------------------------------------------

class AttendAndExcite:
    """Attend-and-Excite (or A&E-HRV with `weighted=True`) for an unmodified SD pipeline.

        ae = AttendAndExcite(pipe, "a red circle and a blue square")       # subjects by spaCy
        images = ae.generate(num_inference_steps=25, generator=g).images
        # or inside your own trace:
        with trace(pipe) as tc, ae.attached(tc):
            pipe(prompt, callback_on_step_end=ae, generator=g)

    Args:
        pipe: a StableDiffusionPipeline (SD 1.x / 2.x).
        prompt: the prompt(s) the pipeline will be called with.
        subjects: subject words (see `find_subjects`); None: spaCy nouns.
        weighted: A&E-HRV: HRV-weighted mean over all heads (needs `hrv` and subject concepts).
        hrv: HRV, HRV file or None for `HRV.for_pipeline(pipe)` (only read when weighted).
        level: downsampling level of the maps (see the module docstring for the defaults).
        steps: step window in which latents are updated (default the first half).
        thresholds: {fraction of the run: target max attention} for iterative refinement.
        scale_factor, scale_range: step size scale_factor * sqrt(linspace(*scale_range, steps)[i]).
        max_refinement_steps, smooth, sigma, kernel_size, normalize_eot: as in the paper's code.

    After a run, `log` has one entry per updated step: step, loss before and after refinement (max
    over images), the loss at each refinement iteration, the step size.
    """

    def __new__(cls, pipe, *args, **kwargs):
        if cls is AttendAndExcite and backbone_for(pipe).family != "unet":  # SD3 / Flux: the joint-attention version
            from headscope.steer.joint_excite import JointAttendAndExcite

            cls = JointAttendAndExcite
        return super().__new__(cls)

    def __init__(self, pipe, prompt, subjects=None, *, weighted: bool = False, hrv=None, level: int | None = None,
                 steps=AE_WINDOW, thresholds: dict | None = None, scale_factor: float = AE_SCALE_FACTOR,
                 scale_range: tuple[float, float] = AE_SCALE_RANGE, max_refinement_steps: int = AE_MAX_REFINEMENT,
                 smooth: bool = True, sigma: float = 0.5, kernel_size: int = 3, normalize_eot: bool = False):
        self._check(pipe)
        self.pipe, self.prompt, self.weighted = pipe, prompt, weighted
        self.index = HeadIndex.from_model(pipe)
        hrv = resolve_hrv(pipe, hrv) if weighted else None
        self.subjects = find_subjects(pipe, prompt, subjects, hrv=hrv, need_concepts=weighted)
        self.tokenizations = tokenize_prompts(pipe, prompt)
        self.weights = (torch.stack([hrv.vector(subject.concept) for subject in self.subjects])
                        if weighted else None)  # [subjects, n_heads]
        levels = sorted({layer.level for layer in self.index.layers})
        if level is None:
            level = levels[-1] if weighted else (LATENT_QUARTER_LEVEL if LATENT_QUARTER_LEVEL in levels
                                                 else levels[len(levels) // 2])
        if not weighted and level not in levels:
            raise HeadscopeError(f"no cross-attention layer at level {level}; this UNet has levels "
                                 f"{', '.join(map(str, levels))}")
        self.level = level
        self.window = StepWindow.parse(steps)
        self.thresholds = dict(AE_THRESHOLDS if thresholds is None else thresholds)
        for fraction, target in self.thresholds.items():
            if not 0.0 <= float(fraction) <= 1.0 or not 0.0 <= float(target) <= 1.0:
                raise HeadscopeError(f"threshold {fraction}: {target} must map a fraction of the run in [0, 1] "
                                     "to a target attention in [0, 1]")
        self.scale_factor, self.scale_range = float(scale_factor), tuple(scale_range)
        self.max_refinement_steps = int(max_refinement_steps)
        self.kernel = _gaussian_kernel(kernel_size, sigma) if smooth else None
        self.normalize_eot = normalize_eot
        self.log: list[dict] = []
        self._trace = None
        self._embeds: torch.Tensor | None = None
        self._images_per_prompt = 1
        self._refinement_losses: list[float] = []

    def _check(self, pipe) -> None:
        _check_sd_pipeline(pipe)

    # -- running ----------------------------------------------------------------------------------

    def generate(self, *, hooks=(), **pipe_kwargs):
        """Run the pipeline on `prompt` with A&E, inside a trace that records nothing; returns its output."""
        with steering(self.pipe, hooks) as tc, self.attached(tc):
            return self.pipe(self.prompt, callback_on_step_end=self, **pipe_kwargs)

    @contextmanager
    def attached(self, tc):
        """Wrap the pipeline's encode_prompt and prepare_latents (on the instance) for a run inside `tc`."""
        pipe, own = self.pipe, {name: self.pipe.__dict__.get(name) for name in ("encode_prompt", "prepare_latents")}
        encode_prompt, prepare_latents = pipe.encode_prompt, pipe.prepare_latents
        signature = inspect.signature(encode_prompt)

        def capturing_encode_prompt(*args, **kwargs):
            result = encode_prompt(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            self._images_per_prompt = int(bound.arguments.get("num_images_per_prompt") or 1)
            self._embeds = result[0].detach()  # conditional embeddings [images, tokens, dim]
            return result

        def exciting_prepare_latents(*args, **kwargs):
            latents = prepare_latents(*args, **kwargs)
            return self._excite_if_due(latents, 0)

        self._trace, self.log = tc, []
        pipe.encode_prompt, pipe.prepare_latents = capturing_encode_prompt, exciting_prepare_latents
        try:
            yield self
        finally:
            for name, value in own.items():
                if value is None:
                    pipe.__dict__.pop(name, None)
                else:
                    setattr(pipe, name, value)
            self._trace = None

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers `callback_on_step_end`: update the latents that step `step + 1` will denoise."""
        if "latents" in callback_kwargs and step + 1 < len(pipe.scheduler.timesteps):
            callback_kwargs["latents"] = self._excite_if_due(callback_kwargs["latents"], step + 1)
        return callback_kwargs

    # -- one step ---------------------------------------------------------------------------------

    def _excite_if_due(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        if self._trace is None:
            raise HeadscopeError("Attend-and-Excite runs inside `with trace(pipe) as tc, ae.attached(tc):`")
        n_steps = len(self.pipe.scheduler.timesteps)
        if step not in self.window.resolve(n_steps):
            return latents
        if self._embeds is None or self._embeds.shape[0] != latents.shape[0]:
            raise HeadscopeError("Attend-and-Excite could not read the prompt embeddings of this call; pass "
                                 "the prompt text to the pipeline, not prompt_embeds")
        return self._excite(latents, step, n_steps)

    @torch.enable_grad()
    def _excite(self, latents: torch.Tensor, step: int, n_steps: int) -> torch.Tensor:
        """A&E at one step: optional iterative refinement, then one gradient step. Returns new latents."""
        timestep = self.pipe.scheduler.timesteps[step]
        step_size = self.scale_factor * math.sqrt(torch.linspace(*self.scale_range, n_steps)[step].item())
        original_dtype = latents.dtype
        latents = latents.detach().float().requires_grad_(True)
        losses = self._losses(latents, timestep, step, n_steps)  # [images]
        before, self._refinement_losses = losses.detach().max().item(), []
        target = self._refinement_target(step, n_steps)
        if target is not None and bool((losses > target).any()):
            latents, losses = self._refine(latents, losses, target, timestep, step, n_steps, step_size)
        if bool((losses > 0).any()):
            gradient = torch.autograd.grad(losses.sum(), [latents])[0]
            latents = latents - step_size * gradient
        self.log.append({"step": step, "loss_before": before, "loss_after_refinement": losses.detach().max().item(),
                         "refinement_losses": self._refinement_losses, "step_size": step_size})
        return latents.detach().to(original_dtype)

    def _refine(self, latents, losses, target, timestep, step, n_steps, step_size):
        """Iterate until every image's loss <= target (at most max_refinement_steps), then re-measure."""
        active = losses.detach() > target  # [images]
        while bool(active.any()) and len(self._refinement_losses) < self.max_refinement_steps:
            latents = latents.detach().requires_grad_(True)
            losses = self._losses(latents, timestep, step, n_steps)
            self._refinement_losses.append(losses.detach().max().item())
            if bool((losses > 0).any()):
                gradient = torch.autograd.grad(losses.sum(), [latents])[0]
                latents = latents - step_size * gradient * active.view(-1, *[1] * (latents.ndim - 1))
            active = active & (losses.detach() > target)
        latents = latents.detach().requires_grad_(True)
        return latents, self._losses(latents, timestep, step, n_steps)

    def _refinement_target(self, step: int, n_steps: int) -> float | None:
        """1 - threshold at the refinement steps (fractions scaled to the run; first one wins a clash)."""
        for fraction, threshold in sorted(self.thresholds.items()):
            if min(n_steps - 1, round(float(fraction) * n_steps)) == step:
                return max(0.0, 1.0 - float(threshold))
        return None

    # -- the loss ---------------------------------------------------------------------------------

    def _losses(self, latents: torch.Tensor, timestep, step: int, n_steps: int) -> torch.Tensor:
        """Per-image A&E loss [images]: max over subjects of 1 - max of the smoothed subject map."""
        maps = self._subject_maps(latents, timestep, step, n_steps)  # [images, subjects, h, w]
        if self.kernel is not None:
            pad = self.kernel.shape[-1] // 2
            flat = maps.flatten(0, 1)[:, None]  # [images * subjects, 1, h, w]
            mode = "reflect" if min(flat.shape[-2:]) > pad else "replicate"
            flat = F.conv2d(F.pad(flat, [pad] * 4, mode=mode), self.kernel.to(flat))
            maps = flat[:, 0].view_as(maps)
        peaks = maps.flatten(2).amax(dim=-1)  # [images, subjects]
        return (1.0 - peaks).clamp_min(0.0).amax(dim=-1)

    def _subject_maps(self, latents, timestep, step, n_steps) -> torch.Tensor:
        """Renormalised text-token maps of each subject: [images, subjects, h, w]."""
        collector = self._collector(self._trace.hooks.state.latent_hw if latents.ndim == 3 else latents.shape[-2:])
        with self._side_pass(collector, step, n_steps, latents):
            self._denoise(latents, timestep)
        token_maps = collector.result()  # [images, subjects or 1, h, w, keys]
        per_image = []
        for image in range(latents.shape[0]):
            tokens = self.tokenizations[image // self._images_per_prompt]
            first, stop = self._text_keys(tokens, token_maps.shape[-1])
            text = (token_maps[image, ..., first:stop] * 100).softmax(dim=-1)  # [subjects or 1, h, w, text keys]
            subject_maps = []
            for number, subject in enumerate(self.subjects):
                positions = [position - first for position in subject.positions[image // self._images_per_prompt]]
                subject_maps.append(text[number if self.weighted else 0][..., positions].mean(dim=-1))
            per_image.append(torch.stack(subject_maps))
        return torch.stack(per_image)

    def _denoise(self, latents: torch.Tensor, timestep) -> None:
        """The grad-enabled pass of the conditional rows whose maps the collector reads."""
        model_input = self.pipe.scheduler.scale_model_input(latents, timestep)
        self.pipe.unet.forward(model_input.to(self.pipe.unet.dtype), timestep, encoder_hidden_states=self._embeds,
                               return_dict=False)

    def _text_keys(self, tokens, n_keys: int) -> tuple[int, int]:
        """[first, stop) of the keys A&E renormalises over: after the start token, before the end token
        (`normalize_eot`) or the last key (the paper's code)."""
        return 1, len(tokens) - 1 if self.normalize_eot else n_keys - 1

    def _collector(self, latent_hw) -> "_MapCollector":
        size = resolution_at(self.level, tuple(latent_hw))
        if self.weighted:
            return _MapCollector(None, size, self.weights)
        layers = {layer.index for layer in self.index.layers if layer.level == self.level}
        return _MapCollector(layers, size, None)

    @contextmanager
    def _side_pass(self, collector, step: int, n_steps: int, latents: torch.Tensor):
        """Set the trace's run state to the step being prepared; other hooks write-only; restore after."""
        hooks = self._trace.hooks
        state = hooks.state
        saved = (state.step, state.n_steps, state.layout, state.latent_hw, hooks.items)
        state.step, state.n_steps = step, n_steps
        state.layout = BatchLayout(n_images=latents.shape[0], cfg=False, images_per_prompt=self._images_per_prompt)
        if latents.ndim == 4:  # packed latents [images, tokens, channels] (Flux) keep the real call's size
            state.latent_hw = tuple(latents.shape[-2:])
        hooks.items = [_WriteOnly(hook) for hook in saved[4]] + [collector]
        try:
            yield
        finally:
            state.step, state.n_steps, state.layout, state.latent_hw, hooks.items = saved
            denoiser_of(self.pipe).zero_grad(set_to_none=True)


def _check_sd_pipeline(pipe) -> None:
    if backbone_for(pipe).family != "unet":
        raise HeadscopeError(f"diffusers' StableDiffusionAttendAndExcitePipeline takes SD 1.x / 2.x pipelines, not "
                             f"{type(pipe).__name__}")
    if getattr(pipe.unet.config, "addition_embed_type", None) is not None or hasattr(pipe, "text_encoder_2"):
        raise HeadscopeError(f"Attend-and-Excite here supports SD 1.x / 2.x pipelines, not "
                             f"{type(pipe).__name__}; use the gradient-free head method (--mitigate-neglect heads)")
    for name in ("encode_prompt", "prepare_latents"):
        if not callable(getattr(pipe, name, None)):
            raise HeadscopeError(f"{type(pipe).__name__} has no {name}(); Attend-and-Excite needs a "
                                 "StableDiffusionPipeline")


# -- diffusers' own pipeline, for comparison -------------------------------------------------------

def diffusers_attend_and_excite(pipe, prompt: str, subjects=None, *, level: int | None = None,
                                num_inference_steps: int = 50, **pipe_kwargs):
    """Run diffusers' StableDiffusionAttendAndExcitePipeline (deprecated, still importable in diffusers
    0.42) built from `pipe`'s components, with the paper's settings scaled to the run and maps at the
    same level as `AttendAndExcite`. Returns its output. Subject words -> their first token each."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    _check_sd_pipeline(pipe)
    ae = AttendAndExcite(pipe, prompt, subjects, level=level)
    accepted = inspect.signature(StableDiffusionAttendAndExcitePipeline.__init__).parameters
    components = {name: value for name, value in pipe.components.items() if name in accepted}
    runner = StableDiffusionAttendAndExcitePipeline(**components, requires_safety_checker=False)
    runner.set_progress_bar_config(disable=True)
    default_side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent_hw = (int(pipe_kwargs.get("height") or default_side) // pipe.vae_scale_factor,
                 int(pipe_kwargs.get("width") or default_side) // pipe.vae_scale_factor)
    steps = num_inference_steps
    thresholds = {}
    for fraction, value in sorted(AE_THRESHOLDS.items()):
        thresholds.setdefault(min(steps - 1, round(fraction * steps)), value)
    originals = dict(pipe.unet.attn_processors)  # it shares our UNet and restores them only on success
    try:
        return runner(prompt=prompt, token_indices=[subject.positions[0][0] for subject in ae.subjects],
                      num_inference_steps=steps, max_iter_to_alter=max(1, round(AE_WINDOW[1] * steps)),
                      thresholds=thresholds, attn_res=resolution_at(ae.level, latent_hw), **pipe_kwargs)
    finally:
        pipe.unet.set_attn_processor(originals)


def mitigate_neglect(pipe, prompt, method: str, subjects=None, *, hrv=None, hooks=(), strength: float = 1.0,
                     **pipe_kwargs):
    """Generate `prompt` with one neglect method: "ae", "ae-hrv" or "heads". Returns (output, details)."""
    if method not in METHODS:
        raise HeadscopeError(f"unknown neglect method {method!r}; use one of {', '.join(METHODS)}")
    if method == "heads":
        hook, found = _heads(pipe, prompt, subjects, hrv, strength, None)
        with steering(pipe, [*hooks, hook]):
            output = pipe(prompt, **pipe_kwargs)
        return output, {"method": method, "subjects": _describe(found)}
    ae = AttendAndExcite(pipe, prompt, subjects, weighted=method == "ae-hrv", hrv=hrv)
    output = ae.generate(hooks=hooks, **pipe_kwargs)
    return output, {"method": method, "subjects": _describe(ae.subjects), "level": ae.level, "log": ae.log}
