"""Steering by heads: HeadScale as value scaling, strengthening and adjusting formulas, windows, rows."""
import pytest
import torch

import headscope.processor as processor_module
from headscope import HeadscopeError, HeadIndex, trace
from headscope.processor import Hook
from headscope.steer import (HeadScale, TokenFactors, adjust_factors, adjust_hook, steering, strengthen,
                             strengthen_factors, strengthen_hook)
from headscope.testing import random_hrv

PROMPT = "a red circle and a blue square"


class Spy(Hook):
    """Reader of the weights a layer applied (probs x value factors), every row, first layer only."""

    def __init__(self):
        self.rows, self.seen = "all", []

    def wants_probs(self, ctx):
        return ctx.layer.index == 0

    def read(self, ctx, probs):
        self.seen.append((ctx.step, ctx.layout, probs.clone()))


class ExplicitScale(Hook):
    """The reference: multiply materialised post-softmax maps by the same factors."""

    def __init__(self, head_scale):
        self.head_scale = head_scale

    def edits_probs(self, ctx):
        return True

    def edit_probs(self, ctx, probs):
        factors = self.head_scale.value_factors(ctx)
        return probs if factors is None else probs * factors[:, :, None, :]


@pytest.fixture(scope="module")
def hrv(tiny_sd):
    return random_hrv(tiny_sd)


def plain_latents(pipe, prompt=PROMPT, *, seed=0, steps=2, output_type="latent", **options):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type=output_type, **options).images


def latents(pipe, hooks, prompt=PROMPT, **options):
    with steering(pipe, hooks):
        return plain_latents(pipe, prompt, **options)


def test_value_scaling_equals_explicit_post_softmax_scaling(tiny_sd):
    n_heads = HeadIndex.from_unet(tiny_sd.unet).n_heads
    factors = torch.linspace(-1.0, 3.0, n_heads)
    scale = HeadScale.for_words(tiny_sd, PROMPT, {"circle": factors, "blue": 2.5 * torch.ones(n_heads)})
    steered = latents(tiny_sd, [scale], output_type="pt")  # images in [0, 1]: [1, 3, H, W]
    reference = latents(tiny_sd, [ExplicitScale(scale)], output_type="pt")
    plain = plain_latents(tiny_sd, output_type="pt")
    assert (steered - reference).abs().max() < 1e-5
    assert (steered - plain).abs().max() > 1e-3


def test_head_scale_never_materialises_probabilities(tiny_sd, hrv, monkeypatch):
    calls = []
    original = processor_module.attention_probs
    monkeypatch.setattr(processor_module, "attention_probs", lambda *args: calls.append(1) or original(*args))
    strengthen(tiny_sd, PROMPT, {"circle": ("shape", 2.0)}, hrv=hrv, num_inference_steps=2)
    assert calls == []


def test_scaled_values_reach_fused_attention_with_the_strides_of_plain_values(tiny_sd, hrv, monkeypatch):
    seen = []
    original = processor_module.F.scaled_dot_product_attention

    def spy(query, key, value, **options):
        seen.append(value.stride())
        return original(query, key, value, **options)

    monkeypatch.setattr(processor_module.F, "scaled_dot_product_attention", spy)
    latents(tiny_sd, [])
    plain = list(seen)
    seen.clear()
    latents(tiny_sd, [strengthen_hook(tiny_sd, PROMPT, {"circle": ("shape", 2.0)}, hrv=hrv)])
    assert plain and seen == plain


def test_strength_one_is_the_papers_hrv_factor_and_zero_the_identity(hrv):
    vector = hrv.vector("color")
    assert torch.equal(strengthen_factors(vector, 1.0), vector)
    assert torch.equal(strengthen_factors(vector, 0.0), torch.ones_like(vector))
    assert torch.allclose(strengthen_factors(vector, 2.0), 2 * vector - 1)


def test_strength_zero_gives_the_plain_image_bitwise(tiny_sd, hrv):
    hook = strengthen_hook(tiny_sd, PROMPT, {"red": ("color", 0.0)}, hrv=hrv)
    assert torch.equal(latents(tiny_sd, [hook]), plain_latents(tiny_sd))


def test_strengthen_hook_puts_hrv_factors_on_the_words_tokens(tiny_sd, hrv):
    hook = strengthen_hook(tiny_sd, PROMPT, {"red": "color"}, hrv=hrv)
    (entry,) = hook.entries
    assert entry.positions == (2,) and torch.equal(entry.factors, hrv.vector("color"))


def test_adjust_is_a_times_desired_minus_b_times_undesired_with_optional_clamp():
    desired, undesired = torch.tensor([0.5, 12.0, 1.0]), torch.tensor([2.0, 1.0, 10.0])
    assert torch.equal(adjust_factors(desired, undesired), torch.tensor([-1.0, 23.0, -8.0]))
    assert torch.equal(adjust_factors(desired, undesired, 1.0, 0.5), torch.tensor([-0.5, 11.5, -4.0]))
    assert torch.equal(adjust_factors(desired, undesired, clamp=9.0), torch.tensor([-1.0, 17.0, -7.0]))


def test_adjust_hook_uses_the_formula_per_word(tiny_sd, hrv):
    hook = adjust_hook(tiny_sd, PROMPT, {"red": ("color", "shape", 3.0, 0.5)}, hrv=hrv)
    expected = 3.0 * hrv.vector("color") - 0.5 * hrv.vector("shape")
    assert torch.allclose(hook.entries[0].factors, expected)


def test_factors_apply_inside_the_step_window_on_conditional_rows_only(tiny_sd):
    n_heads = HeadIndex.from_unet(tiny_sd.unet).n_heads
    scale = HeadScale.for_words(tiny_sd, PROMPT, {"circle": torch.full((n_heads,), 3.0)}, steps=(0.0, 0.5))
    spy = Spy()
    latents(tiny_sd, [scale, spy], steps=4)
    for step, layout, weights in spy.seen:  # weights: [rows, heads, query, keys]
        excess = weights.sum(dim=-1) - 1.0  # applied maps sum to 1 + 2 * p_circle where scaled
        for row in range(layout.n_rows):
            if step < 2 and layout.kind(row) == "cond":
                assert torch.allclose(excess[row], 2.0 / 3.0 * weights[row, :, :, 3], atol=1e-5)
                assert excess[row].min() > 0
            else:
                assert excess[row].abs().max() < 1e-5
    assert sorted({step for step, _, _ in spy.seen}) == [0, 1, 2, 3]


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_several_prompts_and_images_per_prompt_steer_each_prompts_own_tokens(tiny_sd, guidance):
    prompts = ["a red dog", "a big red cat"]  # "red" is token 2, then token 3
    n_heads = HeadIndex.from_unet(tiny_sd.unet).n_heads
    scale = HeadScale.for_words(tiny_sd, prompts, {"red": torch.full((n_heads,), 2.0)})
    spy = Spy()
    latents(tiny_sd, [scale, spy], prompt=prompts, num_images_per_prompt=2, guidance_scale=guidance)
    _, layout, weights = spy.seen[0]
    assert layout.n_images == 4 and layout.cfg == (guidance > 1)
    for row in range(layout.n_rows):
        red = 2 if layout.prompt_index(layout.image(row)) == 0 else 3
        excess = weights[row].sum(dim=-1) - 1.0
        expected = weights[row, :, :, red] / 2.0 if layout.kind(row) == "cond" else torch.zeros_like(excess)
        assert torch.allclose(excess, expected, atol=1e-5)


def test_steering_composes_with_a_recording_trace(tiny_sd, hrv):
    hook = strengthen_hook(tiny_sd, PROMPT, {"circle": ("shape", 3.0)}, hrv=hrv)
    with trace(tiny_sd, hooks=[hook]) as tc:
        steered = plain_latents(tiny_sd)
    assert torch.equal(steered, latents(tiny_sd, [hook]))
    assert tc.word_map("circle").max() > 0


def test_token_factors_for_a_single_prompt_of_a_batch(tiny_sd):
    n_heads = HeadIndex.from_unet(tiny_sd.unet).n_heads
    scale = HeadScale([TokenFactors((2,), torch.full((n_heads,), 4.0), prompt=1)])
    spy = Spy()
    latents(tiny_sd, [scale, spy], prompt=["a red dog", "a red cat"])
    _, layout, weights = spy.seen[0]
    excess = (weights.sum(dim=-1) - 1.0).abs().amax(dim=(1, 2))  # [rows]
    assert [row for row in range(layout.n_rows) if excess[row] > 1e-4] == [3]


@pytest.mark.parametrize("build, message", [
    (lambda pipe, hrv: strengthen_hook(pipe, PROMPT, {"giraffe": "shape"}, hrv=hrv), "'giraffe' is not in the prompt"),
    (lambda pipe, hrv: strengthen_hook(pipe, PROMPT, {"red": "texture"}, hrv=hrv), "unknown concept 'texture'"),
    (lambda pipe, hrv: strengthen_hook(pipe, PROMPT, {"red": "color"}, hrv=hrv, steps=(0.5, 1.5)), "0 <= start < end"),
    (lambda pipe, hrv: HeadScale.for_words(pipe, PROMPT, {"red": torch.ones(3)}), "this model has 22 cross-attention heads"),
    (lambda pipe, hrv: adjust_hook(pipe, PROMPT, {"red": ("color",)}, hrv=hrv), "(desired, undesired)"),
])
def test_bad_steering_input_is_a_headscope_error(tiny_sd, hrv, build, message):
    with pytest.raises(HeadscopeError, match=None) as error:
        build(tiny_sd, hrv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_hrv_of_another_model_is_refused(tiny_sd, tiny_sdxl):
    with pytest.raises(HeadscopeError, match="layout"):
        strengthen_hook(tiny_sd, PROMPT, {"red": "color"}, hrv=random_hrv(tiny_sdxl))
