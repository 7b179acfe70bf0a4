"""trace() on SD3 and Flux: unchanged outputs, maps equal an explicit softmax over all keys, memory-bounded
chunks, guidance layouts, batches, non-square images, words through each text encoder."""
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import headscope
from headscope import HeadscopeError
from headscope.joint import renormalised_over_text, text_key_probs
from headscope.processor import HeadProcessor, Hook
from headscope.testing_joint import FirstCallInputs, generate_joint

PROMPT = "a red giraffe and a dog"


class Recorder(Hook):
    """Keeps every layer's probs of step 0, all rows."""

    rows = "all"

    def __init__(self):
        self.probs = {}

    def wants_probs(self, ctx):
        return ctx.step == 0

    def read(self, ctx, probs):
        self.probs[ctx.layer.name] = probs.clone()


def split_heads(tensor, heads):
    return tensor.unflatten(-1, (heads, -1))  # [batch, tokens, heads, head_dim]


def full_softmax(query, key):
    """The whole (L_img + L_txt)^2 joint matrix of every head: [batch, heads, L, L]."""
    logits = torch.einsum("bqhd,bkhd->bhqk", query.double(), key.double()) / query.shape[-1] ** 0.5
    return logits.softmax(dim=-1)


def sd3_reference(attn, hidden_states, encoder_hidden_states):
    """Image-query x text-key block of SD3's [image; text] joint softmax, written out: [batch, heads, L_img, L_txt]."""
    heads, n_image = attn.heads, hidden_states.shape[1]
    query = torch.cat([attn.norm_q(split_heads(attn.to_q(hidden_states), heads)),
                       attn.norm_added_q(split_heads(attn.add_q_proj(encoder_hidden_states), heads))], dim=1)
    key = torch.cat([attn.norm_k(split_heads(attn.to_k(hidden_states), heads)),
                     attn.norm_added_k(split_heads(attn.add_k_proj(encoder_hidden_states), heads))], dim=1)
    return full_softmax(query, key)[:, :, :n_image, n_image:]


def flux_reference(attn, hidden_states, image_rotary_emb, encoder_hidden_states=None, n_text=None):
    """Image-query x text-key block of Flux's [text; image] joint softmax (RoPE after joining)."""
    heads = attn.heads
    query = attn.norm_q(split_heads(attn.to_q(hidden_states), heads))
    key = attn.norm_k(split_heads(attn.to_k(hidden_states), heads))
    if encoder_hidden_states is not None:  # double-stream: the text has its own projections
        n_text = encoder_hidden_states.shape[1]
        query = torch.cat([attn.norm_added_q(split_heads(attn.add_q_proj(encoder_hidden_states), heads)), query], 1)
        key = torch.cat([attn.norm_added_k(split_heads(attn.add_k_proj(encoder_hidden_states), heads)), key], 1)
    query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
    key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return full_softmax(query, key)[:, :, n_text:, :n_text]


# -- outputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"guidance_scale": 7.0}, {"guidance_scale": 1.0}])
def test_traced_sd3_image_is_bitwise_the_untraced_image(tiny_sd3, options):
    plain = generate_joint(tiny_sd3, PROMPT, **options)
    with headscope.trace(tiny_sd3, rows="all", hooks=[Recorder()]) as tc:
        traced = generate_joint(tiny_sd3, PROMPT, **options)
    assert torch.equal(traced, plain)
    assert tc.layout.cfg is (options["guidance_scale"] > 1) and tc.steps == [0, 1]
    assert tc.word_map("giraffe").shape == (16, 16)


@pytest.mark.parametrize("options", [{"guidance_scale": 3.5},
                                     {"negative_prompt": "a blue cat", "true_cfg_scale": 2.0}])
def test_traced_flux_image_is_bitwise_the_untraced_image(tiny_flux, options):
    plain = generate_joint(tiny_flux, PROMPT, **options)
    with headscope.trace(tiny_flux, rows="all", hooks=[Recorder()]) as tc:
        traced = generate_joint(tiny_flux, PROMPT, **options)
    assert torch.equal(traced, plain)
    assert tc.word_map("giraffe").shape == (16, 16)


def test_sd3_skip_layer_guidance_pass_is_no_step_and_changes_nothing(tiny_sd3):
    options = dict(guidance_scale=5.0, steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0)
    plain = generate_joint(tiny_sd3, PROMPT, **options)
    with headscope.trace(tiny_sd3) as tc:
        traced = generate_joint(tiny_sd3, PROMPT, **options)
    assert torch.equal(traced, plain) and tc.steps == [0, 1, 2]


def test_processors_go_only_on_the_joint_modules_and_come_back_after_an_error(tiny_sd3, tiny_flux):
    for pipe in (tiny_sd3, tiny_flux):
        before = dict(pipe.transformer.attn_processors)

        def explode(pipe, step, timestep, callback_kwargs):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            with headscope.trace(pipe) as tc:
                inside = dict(pipe.transformer.attn_processors)
                ours = {name for name, processor in inside.items() if isinstance(processor, HeadProcessor)}
                assert ours == {f"{layer.name}.processor" for layer in tc.index.layers}
                generate_joint(pipe, PROMPT, callback_on_step_end=explode)
        after = dict(pipe.transformer.attn_processors)
        assert all(after[name] is before[name] for name in before)
        assert not pipe.transformer._forward_pre_hooks and "encode_prompt" not in pipe.__dict__


def test_sd35_image_only_attn2_keeps_its_processor(tiny_sd3):
    with headscope.trace(tiny_sd3):
        processor = tiny_sd3.transformer.transformer_blocks[0].attn2.processor
        assert type(processor).__name__ == "JointAttnProcessor2_0"


# -- maps equal the explicit reference --------------------------------------------------------

def test_sd3_joint_block_map_equals_a_softmax_over_all_keys(tiny_sd3):
    recorder, name = Recorder(), "transformer_blocks.1.attn"
    inputs = FirstCallInputs(tiny_sd3.transformer, [name])
    try:
        with headscope.trace(tiny_sd3, hooks=[recorder]):
            generate_joint(tiny_sd3, PROMPT, guidance_scale=7.0, steps=1)
    finally:
        inputs.remove()
    seen = inputs.seen[name]
    with torch.no_grad():
        reference = sd3_reference(tiny_sd3.transformer.get_submodule(name), seen["hidden_states"],
                                  seen["encoder_hidden_states"])
    assert recorder.probs[name].shape == (2, 2, 16, 24 + 16)  # [uncond; cond] rows, heads, 4x4 image, CLIP + T5 keys
    assert (recorder.probs[name].double() - reference).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["transformer_blocks.1.attn", "single_transformer_blocks.0.attn"])
def test_flux_double_and_single_stream_maps_equal_a_softmax_over_all_keys(tiny_flux, name, monkeypatch):
    monkeypatch.setattr("headscope.joint.MAP_BUDGET_BYTES", 512)  # several chunks of image queries
    recorder = Recorder()
    inputs = FirstCallInputs(tiny_flux.transformer, [name])
    try:
        with headscope.trace(tiny_flux, hooks=[recorder]):
            generate_joint(tiny_flux, [PROMPT, "a blue cat"], steps=1, width=24)  # non-square: 4x6 image tokens
    finally:
        inputs.remove()
    seen = inputs.seen[name]
    with torch.no_grad():
        reference = flux_reference(tiny_flux.transformer.get_submodule(name), seen["hidden_states"],
                                   seen["image_rotary_emb"], seen.get("encoder_hidden_states"), n_text=16)
    assert recorder.probs[name].shape == (2, 2, 24, 16)
    assert (recorder.probs[name].double() - reference).abs().max() < 1e-5


def test_chunked_text_key_probs_equal_the_unchunked_ones():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 40, 8, generator=generator)
    key = torch.randn(2, 3, 40 + 12, 8, generator=generator)
    text = slice(40, 52)
    whole = text_key_probs(query, key, text, 8 ** -0.5, budget=2**30)
    chunked = text_key_probs(query, key, text, 8 ** -0.5, budget=2 * 3 * 52 * 4 * 3)  # 3 queries at a time
    reference = (query @ key.transpose(-1, -2) * 8 ** -0.5).softmax(dim=-1)[..., text]
    assert torch.allclose(chunked, whole, atol=1e-7) and (whole - reference).abs().max() < 1e-6


def test_no_more_than_the_budget_of_logits_exists_at_once(tiny_flux, monkeypatch):
    sizes = []
    softmax = torch.softmax

    def spy(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return softmax(tensor, *args, **kwargs)

    monkeypatch.setattr("headscope.joint.MAP_BUDGET_BYTES", 4096)
    monkeypatch.setattr(torch, "softmax", spy)
    with headscope.trace(tiny_flux) as small:
        generate_joint(tiny_flux, PROMPT, steps=1)
    assert sizes and 2 * max(sizes) <= 4096  # logits and their softmax
    monkeypatch.setattr("headscope.joint.MAP_BUDGET_BYTES", 2**30)
    with headscope.trace(tiny_flux) as large:
        generate_joint(tiny_flux, PROMPT, steps=1)
    assert torch.allclose(small.word_map("dog"), large.word_map("dog"), atol=1e-6)


def test_text_renormalised_view_sums_to_one_over_the_text_keys(tiny_flux):
    block = torch.rand(1, 2, 5, 7) * 0.1
    assert torch.allclose(renormalised_over_text(block).sum(dim=-1), torch.ones(1, 2, 5))
    with headscope.trace(tiny_flux) as model:
        generate_joint(tiny_flux, PROMPT, steps=1)
    with headscope.trace(tiny_flux, normalize="text") as text:
        generate_joint(tiny_flux, PROMPT, steps=1)
    assert (text.word_map("dog") >= model.word_map("dog") - 1e-6).all()
    assert text.token_maps().sum() > model.token_maps().sum()


# -- guidance, batches, sizes -----------------------------------------------------------------

def test_sd3_guidance_batch_is_uncond_then_cond(tiny_sd3):
    with headscope.trace(tiny_sd3, rows="all") as tc:
        generate_joint(tiny_sd3, PROMPT, guidance_scale=7.0, negative_prompt="a blue cat")
    assert (tc.layout.cfg, tc.layout.n_rows, tc.layout.part) == (True, 2, None)
    assert tc.word_map("cat", rows="uncond").sum() > 0 and tc.word_map("giraffe").sum() > 0
    with pytest.raises(HeadscopeError, match="'giraffe' is not in the prompt 'a blue cat'"):
        tc.word_map("giraffe", rows="uncond")


def test_flux_guidance_embedding_is_no_cfg_batch(tiny_flux):
    with headscope.trace(tiny_flux, rows="all") as tc:
        generate_joint(tiny_flux, PROMPT, guidance_scale=3.5)
    assert (tc.layout.cfg, tc.layout.n_rows) == (False, 1) and not tc.reducer.sums["uncond"]
    with pytest.raises(HeadscopeError, match="no unconditional rows"):
        tc.word_map("a", rows="uncond")


def test_flux_true_cfg_runs_a_negative_pass_per_step_and_keeps_the_kinds_apart(tiny_flux):
    with headscope.trace(tiny_flux, rows="all", keep_steps=True) as guided:
        generate_joint(tiny_flux, PROMPT, negative_prompt="a blue cat", true_cfg_scale=2.0)
    with headscope.trace(tiny_flux, keep_steps=True) as plain:
        generate_joint(tiny_flux, PROMPT)
    assert guided.steps == [0, 1] and guided.layout.cfg and guided.layout.part == "uncond"
    assert guided.word_map("cat", rows="uncond").sum() > 0
    # Step 0 sees the same latents with and without the negative pass: its prompt maps must match.
    assert torch.allclose(guided.word_map("dog", steps=[0]), plain.word_map("dog", steps=[0]), atol=1e-6)


def test_flux_negative_pass_follows_its_conditional_pass_even_with_one_embedding_tensor(tiny_flux):
    embeds, pooled, _ = tiny_flux.encode_prompt(PROMPT, max_sequence_length=16)
    with headscope.trace(tiny_flux, rows="all") as tc:
        generate_joint(tiny_flux, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds,
                       negative_pooled_prompt_embeds=pooled, true_cfg_scale=2.0)
    assert tc.steps == [0, 1] and tc.reducer.kind_steps == {"cond": [0, 1], "uncond": [0, 1]}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_prompts_two_images_each_give_four_unmixed_map_sets(tiny_sd3, tiny_flux, family):
    pipe = tiny_sd3 if family == "sd3" else tiny_flux
    prompts = ["a red dog", "a blue cat"]
    shape = (4, 4, 8, 8) if family == "sd3" else (4, 16, 16)  # Flux latents arrive packed: [images, tokens, 16]
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    options = {"guidance_scale": 7.0} if family == "sd3" else {}
    with headscope.trace(pipe) as batch:
        generate_joint(pipe, prompts, num_images_per_prompt=2, latents=latents, **options)
    assert (batch.n_images, batch.layout.images_per_prompt) == (4, 2)
    for image in range(4):
        prompt = prompts[image // 2]
        with headscope.trace(pipe) as single:
            generate_joint(pipe, prompt, latents=latents[image:image + 1], **options)
        assert batch.tokenization(image).prompt == prompt
        noun = prompt.split()[-1]
        assert torch.allclose(batch.word_map(noun, image=image), single.word_map(noun), atol=1e-5, rtol=1e-4)


def test_non_square_flux_image_gets_a_non_square_token_grid(tiny_flux):
    with headscope.trace(tiny_flux) as tc:
        images = generate_joint(tiny_flux, PROMPT, height=16, width=32)
    assert images.shape[-2:] == (16, 32) and tc.image_size == (16, 32)
    assert {layer.resolution for layer in tc.index.layers} == {(4, 8)}
    assert tc.word_map("dog").shape == (16, 32) and tc.head_maps("dog").shape == (8, 8, 16)


# -- words and text encoders ------------------------------------------------------------------

def test_sd3_maps_clip_tokens_by_default_and_t5_tokens_when_asked(tiny_sd3):
    with headscope.trace(tiny_sd3) as clip:
        generate_joint(tiny_sd3, PROMPT)
    assert clip.tokenization().positions("giraffe") == [3, 4]  # after CLIP's start token
    with pytest.raises(HeadscopeError, match="trace with encoder='t5'"):
        clip.word_map("dog", encoder="t5")
    with headscope.trace(tiny_sd3, encoder="t5") as t5:
        generate_joint(tiny_sd3, PROMPT)
    assert t5.tokenization().positions("giraffe") == [24 + 2, 24 + 3]  # T5 keys follow the 24 CLIP positions
    assert not torch.equal(t5.word_map("dog"), t5.word_map("dog", encoder="clip"))
    assert torch.allclose(t5.word_map("dog", encoder="clip"), clip.word_map("dog"))


def test_a_word_absent_from_the_chosen_encoders_prompt_is_refused(tiny_sd3):
    with headscope.trace(tiny_sd3, encoder="t5") as tc:
        generate_joint(tiny_sd3, PROMPT, prompt_3="a red cat")
    assert tc.word_map("giraffe", encoder="clip").sum() > 0
    with pytest.raises(HeadscopeError, match="'giraffe' is not in the prompt 'a red cat'; its words are: a, red, cat"):
        tc.word_map("giraffe")


def test_flux_has_t5_keys_only(tiny_flux):
    with pytest.raises(HeadscopeError, match="tokens of t5 only; use encoder='t5'"):
        headscope.trace(tiny_flux, encoder="clip")
    with headscope.trace(tiny_flux) as tc:
        generate_joint(tiny_flux, PROMPT)
    assert tc.tokenization().tokens[:3] == ("▁a", "▁red", "▁gir") and tc.tokenization().encoder == "t5"


def test_long_prompts_are_refused_against_max_sequence_length(tiny_flux):
    with pytest.raises(HeadscopeError, match="takes at most 16"):
        with headscope.trace(tiny_flux):
            generate_joint(tiny_flux, "a red dog " * 8)


def test_sd3_without_t5_refuses_t5_maps(tmp_path):
    from headscope.testing_joint import build_tiny_sd3

    pipe = build_tiny_sd3(tmp_path, with_t5=False)
    with headscope.trace(pipe) as tc:
        generate_joint(pipe, PROMPT, steps=1)
    assert tc.word_map("dog").sum() > 0
    with pytest.raises(HeadscopeError, match="no t5 text encoder"):
        with headscope.trace(pipe, encoder="t5"):
            generate_joint(pipe, PROMPT, steps=1)


# -- writers --------------------------------------------------------------------------------------

class TextScale(Hook):
    """Scales one text key's values for image queries; also reads, to see the applied weights."""

    def __init__(self, key, factor):
        self.key, self.factor, self.seen = key, factor, {}

    def value_factors(self, ctx):
        factors = torch.ones(1, ctx.layer.heads, ctx.n_keys)
        factors[..., self.key] = self.factor
        return factors

    def wants_probs(self, ctx):
        return True

    def read(self, ctx, probs):
        self.seen[(ctx.layer.name, ctx.step)] = probs.clone()


def test_value_factors_scale_the_text_keys_for_image_queries(tiny_flux):
    with headscope.trace(tiny_flux, hooks=[TextScale(2, 1.0)]) as tc:
        neutral = generate_joint(tiny_flux, PROMPT, steps=1)
        assert tc.hooks.items[1].seen["transformer_blocks.0.attn", 0].shape[-1] == 16
    plain = generate_joint(tiny_flux, PROMPT, steps=1)
    assert torch.allclose(neutral, plain, atol=1e-6)
    unit, doubled = TextScale(2, 1.0), TextScale(2, 2.0)
    for hook in (unit, doubled):
        with headscope.trace(tiny_flux, hooks=[hook], maps=False):
            generate_joint(tiny_flux, PROMPT, steps=1)
    first = ("transformer_blocks.0.attn", 0)  # same input at the first layer: only the applied weights differ
    assert torch.allclose(doubled.seen[first][..., 2], 2 * unit.seen[first][..., 2])
    assert torch.equal(doubled.seen[first][..., 3], unit.seen[first][..., 3])
    steered = generate_joint(tiny_flux, PROMPT, steps=1, seed=0)
    with headscope.trace(tiny_flux, hooks=[TextScale(2, 3.0)], maps=False):
        assert not torch.allclose(generate_joint(tiny_flux, PROMPT, steps=1), steered)
