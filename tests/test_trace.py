"""trace(pipe): unchanged outputs, batch/CFG layout, step windows, clean restore."""
import pytest
import torch

import headscope
from headscope.testing import MAX_TOKENS, generate
from headscope import HeadscopeError
from headscope.processor import HeadProcessor, Hook

PROMPT = "a red giraffe and a blue dog"


def processors_of(pipe):
    return dict(pipe.unet.attn_processors)


def assert_untouched(pipe, before):
    after = processors_of(pipe)
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert not pipe.unet._forward_pre_hooks
    assert "encode_prompt" not in pipe.__dict__


def test_traced_image_is_bitwise_the_untraced_image(tiny_sd):
    plain = generate(tiny_sd, PROMPT)
    with headscope.trace(tiny_sd, rows="all") as tc:
        traced = generate(tiny_sd, PROMPT)
    assert torch.equal(traced, plain)
    assert tc.word_map("giraffe").shape == (16, 16)


def test_processors_go_only_on_cross_attention_and_come_back(tiny_sd):
    before = processors_of(tiny_sd)
    with headscope.trace(tiny_sd) as tc:
        inside = processors_of(tiny_sd)
        ours = {name for name, processor in inside.items() if isinstance(processor, HeadProcessor)}
        assert ours == {f"{layer.name}.processor" for layer in tc.index.layers}
        assert all(inside[name] is before[name] for name in inside.keys() - ours)
    assert_untouched(tiny_sd, before)


def test_processors_are_restored_when_the_pipeline_raises(tiny_sd):
    before = processors_of(tiny_sd)

    def explode(pipe, step, timestep, callback_kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with headscope.trace(tiny_sd):
            generate(tiny_sd, PROMPT, callback_on_step_end=explode)
    assert_untouched(tiny_sd, before)


def test_guidance_on_records_the_conditional_rows(tiny_sd):
    with headscope.trace(tiny_sd) as tc:
        generate(tiny_sd, PROMPT, guidance_scale=7.5)
    assert (tc.layout.cfg, tc.layout.n_images, tc.layout.n_rows) == (True, 1, 2)
    assert set(tc.reducer.sums["cond"]) == set(range(tc.index.n_layers)) and not tc.reducer.sums["uncond"]


def test_guidance_off_traces_a_batch_without_unconditional_rows(tiny_sd):
    plain = generate(tiny_sd, PROMPT, guidance_scale=1.0)
    with headscope.trace(tiny_sd, rows="all") as tc:
        traced = generate(tiny_sd, PROMPT, guidance_scale=1.0)
    assert torch.equal(traced, plain)
    assert (tc.layout.cfg, tc.layout.n_rows) == (False, 1)
    assert tc.word_map("dog").sum() > 0 and not tc.reducer.sums["uncond"]
    with pytest.raises(HeadscopeError, match="no unconditional rows"):
        tc.word_map("a", rows="uncond")


def test_two_prompts_two_images_each_give_four_unmixed_map_sets(tiny_sd):
    prompts = ["a red dog", "a blue cat"]
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with headscope.trace(tiny_sd) as batch:
        generate(tiny_sd, prompts, num_images_per_prompt=2, latents=latents)
    assert (batch.n_images, batch.layout.images_per_prompt) == (4, 2)
    assert [batch.tokenization(image).prompt for image in range(4)] == [prompts[0]] * 2 + [prompts[1]] * 2
    batch_maps = [batch.word_map("a", image=image) for image in range(4)]
    for image in range(4):
        with headscope.trace(tiny_sd) as single:
            generate(tiny_sd, prompts[image // 2], latents=latents[image:image + 1])
        assert (batch_maps[image] - single.word_map("a")).abs().max() < 1e-4
    assert (batch_maps[0] - batch_maps[1]).abs().max() > 1e-3  # same prompt, other latents: other map
    assert (batch_maps[1] - batch_maps[2]).abs().max() > 1e-3


def test_negative_prompt_rows_are_recorded_on_request(tiny_sd):
    with headscope.trace(tiny_sd, rows="all") as tc:
        generate(tiny_sd, PROMPT, negative_prompt="a green tree")
    with headscope.trace(tiny_sd) as cond_only:
        generate(tiny_sd, PROMPT, negative_prompt="a green tree")
    assert tc.words(rows="uncond") == ["a", "green", "tree"]
    assert tc.word_map("tree", rows="uncond").shape == (16, 16)
    assert torch.allclose(tc.word_map("dog"), cond_only.word_map("dog"), atol=1e-6)
    with pytest.raises(HeadscopeError, match="no uncond prompt text"):
        cond_only.word_map("tree", rows="uncond")


def test_step_window_records_only_its_steps(tiny_sd):
    with headscope.trace(tiny_sd, steps=(0.0, 0.5)) as first_half:
        generate(tiny_sd, PROMPT, steps=4)
    with headscope.trace(tiny_sd, steps=slice(1, None)) as late:
        generate(tiny_sd, PROMPT, steps=4)
    assert (first_half.steps, first_half.n_steps, late.steps) == ([0, 1], 4, [1, 2, 3])


@pytest.mark.parametrize("window", [(0.5, 0.2), (0, 1), (-0.1, 0.5), "start", slice(0, 4, -1), []])
def test_invalid_step_windows_are_refused_before_running(tiny_sd, window):
    with pytest.raises(HeadscopeError):
        headscope.trace(tiny_sd, steps=window)


def test_kept_steps_average_to_the_running_sum(tiny_sd):
    with headscope.trace(tiny_sd, keep_steps=True) as tc:
        generate(tiny_sd, PROMPT, steps=3)
    assert (tc.word_map("dog", steps=[0, 1, 2]) - tc.word_map("dog")).abs().max() < 1e-5
    assert not torch.allclose(tc.word_map("dog", steps=[0]), tc.word_map("dog", steps=[2]))


def test_picking_steps_needs_keep_steps(tiny_sd):
    with headscope.trace(tiny_sd) as tc:
        generate(tiny_sd, PROMPT)
    with pytest.raises(HeadscopeError, match="keep_steps=True"):
        tc.word_map("dog", steps=[0])


def test_memory_does_not_grow_with_steps(tiny_sd):
    def stored_bytes(steps):
        with headscope.trace(tiny_sd) as tc:
            generate(tiny_sd, PROMPT, steps=steps)
        assert not tc.reducer.per_step["cond"]
        return sum(maps.numel() * maps.element_size() for maps in tc.reducer.sums["cond"].values())

    assert stored_bytes(2) == stored_bytes(5)


def test_keys_stop_at_the_prompt_end_token(tiny_sd):
    with headscope.trace(tiny_sd) as tc:
        generate(tiny_sd, "a dog")
    assert tc.reducer.sums["cond"][0].shape == (1, 2, 4, 8, 8)  # [images, heads, keys: BOS a dog EOS, h, w]


def test_long_prompt_is_refused_and_nothing_stays_installed(tiny_sd):
    before = processors_of(tiny_sd)
    with pytest.raises(HeadscopeError, match=f"the text encoder takes at most {MAX_TOKENS}"):
        with headscope.trace(tiny_sd):
            generate(tiny_sd, "a dog " * MAX_TOKENS)
    assert_untouched(tiny_sd, before)


def test_unknown_word_and_unknown_image_are_clear_errors(tiny_sd):
    with headscope.trace(tiny_sd) as tc:
        with pytest.raises(HeadscopeError, match="nothing recorded yet"):
            tc.word_map("dog")
        generate(tiny_sd, PROMPT)
    with pytest.raises(HeadscopeError, match="its words are: a, red, giraffe, and, a, blue, dog"):
        tc.word_map("zebra")
    with pytest.raises(HeadscopeError, match="image 1 out of range"):
        tc.word_map("dog", image=1)


def test_nested_traces_of_one_pipeline_are_refused(tiny_sd):
    with headscope.trace(tiny_sd):
        with pytest.raises(HeadscopeError, match="already being traced"):
            with headscope.trace(tiny_sd):
                pass


def test_results_follow_the_latest_call(tiny_sd):
    with headscope.trace(tiny_sd) as tc:
        generate(tiny_sd, "a red dog")
        generate(tiny_sd, "a blue cat", steps=3)
    assert (tc.calls, tc.n_steps, tc.steps, tc.words()) == (2, 3, [0, 1, 2], ["a", "blue", "cat"])


class OnesWriter(Hook):
    def value_factors(self, ctx):
        return torch.ones(1, ctx.layer.heads, 1)


class SilenceWord(Hook):
    """Zeroes every head's attention to key position 3 in the conditional rows."""

    def value_factors(self, ctx):
        factors = torch.ones(ctx.layout.n_rows, ctx.layer.heads, MAX_TOKENS)
        factors[list(ctx.layout.rows("cond")), :, 3] = 0.0
        return factors


def test_neutral_writer_leaves_the_image_bitwise_unchanged(tiny_sd):
    plain = generate(tiny_sd, PROMPT)
    with headscope.trace(tiny_sd, hooks=[OnesWriter()]):
        assert torch.equal(generate(tiny_sd, PROMPT), plain)


def test_writer_steers_and_readers_see_the_applied_weights(tiny_sd):
    plain = generate(tiny_sd, PROMPT)
    with headscope.trace(tiny_sd, hooks=[SilenceWord()]) as tc:
        steered = generate(tiny_sd, PROMPT)
    assert not torch.equal(steered, plain)
    assert tc.tokenization().positions("giraffe") == [3, 4]
    assert tc.token_maps()[3].abs().max() == 0


def test_tiny_sdxl_pipeline_traces_without_changing_its_image(tiny_sdxl):
    prompt = "a small bird in the sky"
    plain = generate(tiny_sdxl, prompt)
    with headscope.trace(tiny_sdxl) as tc:
        traced = generate(tiny_sdxl, prompt)
    assert torch.equal(traced, plain)
    assert (tc.index.n_layers, tc.index.n_heads, tc.layout.cfg) == (8, 32, True)
    assert tc.word_map("bird").shape == (16, 16) and tc.head_maps("bird").shape == (32, 8, 8)


def test_guidance_switched_off_mid_run_is_followed(tiny_sd):
    def stop_guidance(pipe, step, timestep, callback_kwargs):
        if step == 1:
            pipe._guidance_scale = 0.0
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
        return callback_kwargs

    options = dict(steps=4, callback_on_step_end=stop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    plain = generate(tiny_sd, PROMPT, **options)
    with headscope.trace(tiny_sd) as tc:
        traced = generate(tiny_sd, PROMPT, **options)
    assert torch.equal(traced, plain)
    assert tc.steps == [0, 1, 2, 3] and tc.layout.cfg is False
    assert tc.word_map("dog").sum() > 0


def test_hooks_must_be_headscope_hooks(tiny_sd):
    with pytest.raises(HeadscopeError, match="is not a headscope Hook"):
        headscope.trace(tiny_sd, hooks=[object()])


def test_layers_with_non_standard_processors_are_refused_untouched(tiny_sd):
    class CustomProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            raise AssertionError("never called")

    before = processors_of(tiny_sd)
    name = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"
    tiny_sd.unet.set_attn_processor({**before, name: CustomProcessor()})
    try:
        with pytest.raises(HeadscopeError, match="uses CustomProcessor"):
            with headscope.trace(tiny_sd):
                pass
        assert isinstance(processors_of(tiny_sd)[name], CustomProcessor)
    finally:
        tiny_sd.unet.set_attn_processor(dict(before))
