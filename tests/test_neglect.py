"""Multi-concept neglect: Attend-and-Excite as a step callback, A&E-HRV maps, head reweighting."""
import pytest
import torch

from headscope import HeadscopeError, trace
from headscope.processor import BatchLayout, HookContext
from headscope.steer import (AttendAndExcite, diffusers_attend_and_excite, find_subjects, heads_hook, mitigate_neglect,
                             steering)
from headscope.steer.neglect import _MapCollector
from headscope.testing import random_hrv

PROMPT = "a red circle and a blue square"


def call(pipe, ae, prompt=PROMPT, callback=None, steps=4, **options):
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent",
                callback_on_step_end=callback or ae, **options).images


@pytest.fixture(scope="module")
def hrv(tiny_sd):
    return random_hrv(tiny_sd)


def test_subjects_are_the_prompts_nouns_with_concepts_from_the_hrv(tiny_sd, hrv):
    subjects = find_subjects(tiny_sd, PROMPT, hrv=hrv)
    assert [(s.word, s.positions, s.concept) for s in subjects] == [("circle", ((3,),), "shape"),
                                                                    ("square", ((7,),), "shape")]
    given = find_subjects(tiny_sd, PROMPT, "circle=color,square", hrv=hrv)
    assert [(s.word, s.concept) for s in given] == [("circle", "color"), ("square", "shape")]


def test_ae_loss_decreases_over_its_refinement_iterations(tiny_sd):
    ae = AttendAndExcite(tiny_sd, PROMPT, thresholds={0.0: 0.9}, max_refinement_steps=4)
    with steering(tiny_sd, []) as tc, ae.attached(tc):
        call(tiny_sd, ae)
    losses = ae.log[0]["refinement_losses"]
    assert len(losses) == 4 and all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert ae.log[0]["loss_after_refinement"] < ae.log[0]["loss_before"]


def test_latents_change_only_at_the_configured_steps(tiny_sd):
    ae = AttendAndExcite(tiny_sd, PROMPT, steps=(0.25, 0.75), thresholds={})
    changed = {}

    def spy(pipe, step, timestep, kwargs):
        before = kwargs["latents"].clone()
        kwargs = ae(pipe, step, timestep, kwargs)
        changed[step + 1] = not torch.equal(before, kwargs["latents"])
        return kwargs

    first_inputs = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: first_inputs.append(args[0].clone()))
    try:
        with steering(tiny_sd, []) as tc, ae.attached(tc):
            call(tiny_sd, ae, callback=spy)
    finally:
        handle.remove()
    excited_first = first_inputs[0]
    first_inputs.clear()
    handle = tiny_sd.unet.register_forward_pre_hook(lambda module, args: first_inputs.append(args[0].clone()))
    try:
        call(tiny_sd, ae, callback=lambda pipe, step, timestep, kwargs: kwargs)
    finally:
        handle.remove()
    assert [entry["step"] for entry in ae.log] == [1, 2]
    assert changed == {1: True, 2: True, 3: False, 4: False}
    assert torch.equal(excited_first, first_inputs[0])  # step 0 is outside the window: untouched


def test_the_default_window_updates_step_zero_before_the_first_denoising(tiny_sd):
    ae = AttendAndExcite(tiny_sd, PROMPT, thresholds={})
    with steering(tiny_sd, []) as tc, ae.attached(tc):
        excited = call(tiny_sd, ae)
    assert [entry["step"] for entry in ae.log] == [0, 1]
    assert not torch.equal(excited, call(tiny_sd, ae, callback=lambda pipe, step, timestep, kwargs: kwargs))


def test_an_empty_window_gives_the_plain_image_bitwise(tiny_sd):
    ae = AttendAndExcite(tiny_sd, PROMPT, steps=slice(0, 0))
    with steering(tiny_sd, []) as tc, ae.attached(tc):
        excited = call(tiny_sd, ae)
    assert ae.log == [] and torch.equal(excited, call(tiny_sd, ae, callback=lambda p, s, t, kwargs: kwargs))


def test_extra_passes_leave_the_traces_maps_and_steps_alone(tiny_sd):
    with trace(tiny_sd) as plain:
        call(tiny_sd, None, callback=lambda pipe, step, timestep, kwargs: kwargs, steps=2)
    ae = AttendAndExcite(tiny_sd, PROMPT, steps=(0.5, 1.0), thresholds={})
    with trace(tiny_sd) as tc, ae.attached(tc):
        call(tiny_sd, ae, steps=2)
    assert tc.steps == [0, 1] and tc.reducer.kind_steps["cond"] == [0, 1]
    layer = 0  # step 0 is not excited, so its maps are the plain run's; sums hold steps 0 and 1 once each
    assert torch.allclose(tc.reducer.sums["cond"][layer].sum(), plain.reducer.sums["cond"][layer].sum(), rtol=0.2)
    assert len(ae.log) == 1 and ae.log[0]["step"] == 1
    assert "encode_prompt" not in tiny_sd.__dict__ and "prepare_latents" not in tiny_sd.__dict__


def test_several_images_per_prompt_are_excited_independently(tiny_sd):
    ae = AttendAndExcite(tiny_sd, [PROMPT, "a red square and a blue circle"], subjects="circle,square",
                         thresholds={})
    with steering(tiny_sd, []) as tc, ae.attached(tc):
        excited = call(tiny_sd, ae, prompt=ae.prompt, num_images_per_prompt=2, steps=2)
    assert excited.shape[0] == 4 and [entry["step"] for entry in ae.log] == [0]
    assert ae.subjects[0].positions == ((3,), (7,))


def test_hrv_weighted_maps_are_the_hrv_weighted_mean_over_heads(tiny_sd):
    n_heads = 22
    weights = torch.zeros(2, n_heads)
    weights[0, 1] = 1.0              # subject 0: only head 1 (layer 0, 8x8)
    weights[1, [6, 7]] = 1.0         # subject 1: heads 0 and 1 of layer 2 (4x4)
    collector = _MapCollector(None, (4, 4), weights)
    probs = {0: torch.rand(1, 2, 64, 5), 2: torch.rand(1, 4, 16, 5)}
    from headscope.heads import HeadIndex

    index = HeadIndex.from_unet(tiny_sd.unet)
    for layer_number, layer_probs in probs.items():
        layer = index.layers[layer_number]
        ctx = HookContext(layer=layer, call=0, step=0, n_steps=1, layout=BatchLayout(1, False), latent_hw=(8, 8),
                          query_hw=layer.resolution, rows=(0,), n_keys=5)
        collector.read(ctx, layer_probs)
    result = collector.result()  # [images, subjects, h, w, keys]
    head_1 = probs[0][0, 1].view(8, 8, 5).permute(2, 0, 1)
    expected_0 = torch.nn.functional.avg_pool2d(head_1, 2).permute(1, 2, 0)
    expected_1 = probs[2][0, :2].mean(dim=0).view(4, 4, 5)
    assert torch.allclose(result[0, 0], expected_0, atol=1e-6) and torch.allclose(result[0, 1], expected_1, atol=1e-6)


def test_ae_hrv_runs_with_subject_concepts(tiny_sd, hrv):
    output, details = mitigate_neglect(tiny_sd, PROMPT, "ae-hrv", hrv=hrv, num_inference_steps=2,
                                       generator=torch.Generator().manual_seed(0), output_type="latent")
    assert details["level"] == 1 and [s["concept"] for s in details["subjects"]] == ["shape", "shape"]
    assert [entry["step"] for entry in details["log"]] == [0]


def test_head_reweighting_strengthens_subjects_by_their_concepts_hrv(tiny_sd, hrv):
    hook = heads_hook(tiny_sd, PROMPT, hrv=hrv, strength=2.0)
    assert [entry.positions for entry in hook.entries] == [(3,), (7,)]
    assert torch.allclose(hook.entries[0].factors, 2 * hrv.vector("shape") - 1)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_diffusers_attend_and_excite_runs_on_the_same_components(tiny_sd):
    output = diffusers_attend_and_excite(tiny_sd, PROMPT, num_inference_steps=2, output_type="latent",
                                         generator=torch.Generator().manual_seed(0))
    assert output.images.shape == (1, 4, 8, 8)
    assert {type(p).__name__ for p in tiny_sd.unet.attn_processors.values()} == {"AttnProcessor2_0"}


@pytest.mark.parametrize("build, message", [
    (lambda pipe, hrv: AttendAndExcite(pipe, PROMPT, subjects="giraffe"), "'giraffe' is not in the prompt"),
    (lambda pipe, hrv: AttendAndExcite(pipe, PROMPT, level=5), "no cross-attention layer at level 5"),
    (lambda pipe, hrv: AttendAndExcite(pipe, "big and small", hrv=hrv), "found no subject nouns"),
    (lambda pipe, hrv: heads_hook(pipe, "a red dog", hrv=hrv), "no concept known for subject 'dog'"),
    (lambda pipe, hrv: find_subjects(pipe, PROMPT, "circle=", hrv=hrv), "bad subject 'circle='"),
    (lambda pipe, hrv: mitigate_neglect(pipe, PROMPT, "excite"), "unknown neglect method"),
])
def test_bad_neglect_input_is_a_headscope_error(tiny_sd, hrv, build, message):
    with pytest.raises(HeadscopeError) as error:
        build(tiny_sd, hrv)
    assert message in str(error.value)


def test_attend_and_excite_refuses_sdxl(tiny_sdxl):
    with pytest.raises(HeadscopeError, match="SD 1.x / 2.x"):
        AttendAndExcite(tiny_sdxl, PROMPT)
