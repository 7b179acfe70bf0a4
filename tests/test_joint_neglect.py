"""Attend-and-Excite and A&E-HRV on SD3 and Flux: joint-attention subject maps, latents updated inside the
pipeline's own transformer call and stepped on by its scheduler."""
import pytest
import torch

from headscope import HeadscopeError, trace
from headscope.steer import AttendAndExcite, steering
from headscope.steer.joint_excite import JointAttendAndExcite
from headscope.testing import random_hrv

PROMPT = "a red circle and a blue square"
SMALL = dict(height=16, width=16, max_sequence_length=16)


@pytest.fixture(params=["sd3", "flux"])
def pipe(request, tiny_sd3, tiny_flux):
    return tiny_sd3 if request.param == "sd3" else tiny_flux


def call(pipe, callback, steps=4, **options):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="latent",
                callback_on_step_end=callback, guidance_scale=7.0, **SMALL, **options).images


def keep(pipe, step, timestep, kwargs):
    return kwargs


class Latents:
    """Per step: the conditional rows the transformer denoises (seen after A&E's pre-hook) and the sample the
    scheduler steps from."""

    def __init__(self, pipe):
        self.pipe, self.denoised, self.stepped = pipe, [], []

    def __enter__(self):
        self.handle = self.pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: self.denoised.append(kwargs["hidden_states"][-1:].clone()), with_kwargs=True)
        step = self.pipe.scheduler.step

        def stepping(model_output, timestep, sample, *args, **kwargs):
            self.stepped.append(sample.clone())
            return step(model_output, timestep, sample, *args, **kwargs)

        self.pipe.scheduler.step = stepping
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()
        del self.pipe.scheduler.step


def test_attend_and_excite_on_joint_attention_renormalises_the_trace_encoders_keys(tiny_sd3, tiny_flux):
    sd3, flux = (AttendAndExcite(pipe, PROMPT, "circle,square") for pipe in (tiny_sd3, tiny_flux))
    assert isinstance(sd3, JointAttendAndExcite) and isinstance(flux, JointAttendAndExcite)
    assert sd3._text_keys(sd3.tokenizations[0], 24 + 16) == (1, 23)  # CLIP keys after the start token
    assert flux._text_keys(flux.tokenizations[0], 16) == (0, 15)      # T5 keys from the first token
    assert [subject.positions for subject in flux.subjects] == [((2,),), ((6,),)]


def test_the_scheduler_steps_from_the_latents_the_transformer_denoised(pipe):
    ae = AttendAndExcite(pipe, PROMPT, "circle,square", thresholds={})
    with Latents(pipe) as plain:
        call(pipe, keep)
    with steering(pipe, []) as tc, ae.attached(tc), Latents(pipe) as excited:
        call(pipe, ae)
    assert [entry["step"] for entry in ae.log] == [0, 1]
    assert all(torch.equal(denoised, stepped[-1:]) for denoised, stepped in zip(excited.denoised, excited.stepped))
    assert not torch.equal(excited.stepped[0], plain.stepped[0]) and not torch.equal(excited.stepped[1],
                                                                                    plain.stepped[1])


def test_latents_change_only_inside_the_window(tiny_flux):
    ae = AttendAndExcite(tiny_flux, PROMPT, "circle,square", steps=(0.25, 0.75), thresholds={})
    with Latents(tiny_flux) as plain:
        call(tiny_flux, keep)
    with steering(tiny_flux, []) as tc, ae.attached(tc), Latents(tiny_flux) as excited:
        call(tiny_flux, ae)
    assert [entry["step"] for entry in ae.log] == [1, 2]
    assert torch.equal(excited.denoised[0], plain.denoised[0]) and not torch.equal(excited.denoised[1],
                                                                                  plain.denoised[1])


def test_an_empty_window_gives_the_plain_latents_bitwise(pipe):
    ae = AttendAndExcite(pipe, PROMPT, "circle,square", steps=slice(0, 0))
    with steering(pipe, []) as tc, ae.attached(tc):
        excited = call(pipe, ae)
    assert ae.log == [] and torch.equal(excited, call(pipe, keep))


def test_ae_loss_decreases_over_its_refinement_iterations(pipe):
    ae = AttendAndExcite(pipe, PROMPT, "circle,square", thresholds={0.0: 0.99}, max_refinement_steps=3,
                         scale_factor=2.0)  # the paper's 20 overshoots on the tiny random Flux
    with steering(pipe, []) as tc, ae.attached(tc):
        call(pipe, ae, steps=2)
    losses = ae.log[0]["refinement_losses"]
    assert len(losses) == 3 and all(later < earlier for earlier, later in zip(losses, losses[1:]))


def test_ae_hrv_runs_with_subject_concepts_and_leaves_the_trace_alone(tiny_sd3):
    ae = AttendAndExcite(tiny_sd3, PROMPT, weighted=True, hrv=random_hrv(tiny_sd3), subjects="circle,square",
                         thresholds={})
    with trace(tiny_sd3) as tc, ae.attached(tc):
        call(tiny_sd3, ae, steps=2)
    assert [subject.concept for subject in ae.subjects] == ["shape", "shape"] and len(ae.log) == 1
    assert tc.steps == [0, 1] and tc.word_map("circle").shape == (16, 16)
    assert "prepare_latents" not in tiny_sd3.__dict__ and not tiny_sd3.transformer._forward_pre_hooks


def test_without_its_callback_the_update_is_refused_in_one_line(tiny_flux):
    ae = AttendAndExcite(tiny_flux, PROMPT, "circle,square", thresholds={})
    with steering(tiny_flux, []) as tc, ae.attached(tc), pytest.raises(HeadscopeError) as error:
        call(tiny_flux, None)
    assert "callback_on_step_end=ae" in str(error.value) and "\n" not in str(error.value)
