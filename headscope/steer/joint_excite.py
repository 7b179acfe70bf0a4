"""Attend-and-Excite and A&E-HRV on joint attention (SD3, Flux): subject maps from the image-query x
text-key blocks of the joint layers, latents updated inside the pipeline's own transformer call.

`AttendAndExcite(pipe, ...)` on an SD3 / Flux pipeline is a `JointAttendAndExcite`: the same loss,
refinement, step sizes and log as on SD (`headscope.steer.neglect`). What differs is how a step's
latents are reached, with an unmodified StableDiffusion3Pipeline / FluxPipeline:
  - a forward pre-hook on the transformer (registered after the trace's, so the step and the batch
    layout are known) runs A&E at a step inside the window on the latents that call was given. The
    maps come from grad-enabled passes of the conditional rows through `transformer.forward` with the
    call's own arguments (the timestep in the family's format, text embeddings, pooled projections,
    guidance, token ids; the rows of the batched ones, `backbone.batch_inputs`, picked), only
    `hidden_states` replaced. So nothing about a family's call is rebuilt here.
  - the updated latents replace `hidden_states` (each row gets its image's latents) and are written in
    place into the pipeline's own `latents` tensor, which its scheduler step uses next: the tensor
    `prepare_latents` returned (step 0), then the one `callback_on_step_end` was handed (so the
    callback must be passed, as on SD). Flux's true-CFG negative pass and SD3's skip-layer pass are
    left alone; they see the updated latents.
Maps: every joint layer has the same token grid (latent / patch size), so A&E averages all heads and
A&E-HRV weights all heads by the HRV. Keys renormalised over (x100, softmax): the trace encoder's keys
from the prompt's first token (SD3's CLIP keys after the start token; Flux's T5 keys from the first)
up to the end token (`normalize_eot`) or to the last key of that encoder, as the paper's code does.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from headscope.backbones import backbone_for
from headscope.errors import HeadscopeError
from headscope.steer.neglect import AttendAndExcite


class JointAttendAndExcite(AttendAndExcite):
    """Attend-and-Excite (A&E-HRV with `weighted=True`) for SD3 / Flux pipelines; arguments as `AttendAndExcite`.

        ae = AttendAndExcite(flux, "a red fox and a blue car", weighted=True, hrv="flux.hrv")
        images = ae.generate(num_inference_steps=28, generator=g).images
        # or inside your own trace (the callback is needed):
        with trace(flux) as tc, ae.attached(tc):
            flux(prompt, callback_on_step_end=ae, generator=g)
    """

    def _check(self, pipe) -> None:
        self.backbone = backbone_for(pipe)
        if not self.backbone.batch_inputs or not callable(getattr(pipe, "prepare_latents", None)):
            raise HeadscopeError(f"{type(pipe).__name__} gives Attend-and-Excite no way to update its latents; use the "
                                 "gradient-free head method (--mitigate-neglect heads)")
        self._latents, self._latents_step, self._call = None, None, {}

    @contextmanager
    def attached(self, tc):
        """Keep `prepare_latents`' tensor (wrapped on the instance) and hook the transformer, inside `tc`."""
        pipe, own = self.pipe, self.pipe.__dict__.get("prepare_latents")
        prepare_latents = pipe.prepare_latents

        def keeping_prepare_latents(*args, **kwargs):
            prepared = prepare_latents(*args, **kwargs)  # Flux: (latents, latent_image_ids)
            self._latents, self._latents_step = (prepared[0] if isinstance(prepared, tuple) else prepared), 0
            return prepared

        self._trace, self.log = tc, []
        pipe.prepare_latents = keeping_prepare_latents
        handle = self.backbone.model.register_forward_pre_hook(self._before_transformer, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            if own is None:
                pipe.__dict__.pop("prepare_latents", None)
            else:
                pipe.prepare_latents = own
            self._trace, self._latents, self._call = None, None, {}

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers `callback_on_step_end`: keep the latents step `step + 1` denoises (updated there, in place)."""
        self._latents, self._latents_step = callback_kwargs.get("latents"), step + 1
        return callback_kwargs

    def _before_transformer(self, module, args, kwargs):
        """Transformer pre-hook: at a step in the window, excite the latents this call denoises."""
        state = self._trace.hooks.state
        if not state.recording or state.layout.part == "uncond" or "hidden_states" not in kwargs:
            return None
        n_steps = len(self.pipe.scheduler.timesteps)
        if state.step not in self.window.resolve(n_steps):
            return None
        layout, hidden_states = state.layout, kwargs["hidden_states"]  # [rows, ...]
        cond = list(layout.rows("cond"))
        if self._latents_step != state.step or not torch.equal(hidden_states[cond], self._latents.to(hidden_states)):
            raise HeadscopeError("Attend-and-Excite on SD3 / Flux updates the pipeline's latents from its step "
                                 "callback: call the pipeline with callback_on_step_end=ae (ae.generate does)")
        self._images_per_prompt = layout.images_per_prompt
        self._call = {name: value[cond] if name in self.backbone.batch_inputs and torch.is_tensor(value) else value
                      for name, value in kwargs.items()}
        self._call["return_dict"] = False
        updated = self._excite(self._latents, state.step, n_steps)  # [images, ...]
        self._latents.copy_(updated)
        kwargs["hidden_states"] = self._latents[[layout.image(row) for row in range(layout.n_rows)]].to(hidden_states)
        return args, kwargs

    def _denoise(self, latents: torch.Tensor, timestep) -> None:
        """The conditional rows through `transformer.forward` with the real call's arguments, new latents."""
        self.backbone.model.forward(**{**self._call, "hidden_states": latents.to(self._call["hidden_states"].dtype)})

    def _text_keys(self, tokens, n_keys: int) -> tuple[int, int]:
        first = tokens.words[0].positions[0] if tokens.words else tokens.offset  # after a start token, if any
        if self.normalize_eot:
            return first, tokens.key_end - 1
        later = [slot.offset for slot in self.backbone.text_slots(self.pipe, {})
                 if slot.keys and slot.offset > tokens.offset]  # SD3: the T5 keys after the CLIP ones
        return first, min(later, default=n_keys) - 1
