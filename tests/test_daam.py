"""Word maps against a reference written out from the modules' own projections; normalise, threshold."""
import pytest
import torch
import torch.nn.functional as F

import headscope
from headscope.testing import generate
from headscope import HeadscopeError
from headscope.maps.daam import normalize, threshold

PROMPT = "a red giraffe and a blue dog"


@pytest.fixture(scope="module")
def captured(tiny_sd):
    """A traced 2-step CFG run plus the inputs every cross-attention module got: {name: [(hidden, context)]}."""
    inputs, handles = {}, []
    with headscope.trace(tiny_sd, keep_steps=True) as tc:
        for layer in tc.index.layers:
            module = tiny_sd.unet.get_submodule(layer.name)

            def keep(module, args, kwargs, name=layer.name):
                inputs.setdefault(name, []).append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))

            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
        try:
            generate(tiny_sd, PROMPT, steps=2)
        finally:
            for handle in handles:
                handle.remove()
    return tc, inputs


def reference_head_maps(pipe, layer, calls, positions) -> torch.Tensor:
    """Mean over steps and tokens of softmax(q k^T * scale) for the conditional row: [heads, h, w]."""
    attn = pipe.unet.get_submodule(layer.name)
    per_step = []
    with torch.no_grad():
        for hidden, context in calls:
            cond_hidden, cond_context = hidden[1:], context[1:]  # CFG rows: [uncond, cond]
            query = attn.to_q(cond_hidden).view(1, -1, layer.heads, layer.head_dim).transpose(1, 2)
            key = attn.to_k(cond_context).view(1, -1, layer.heads, layer.head_dim).transpose(1, 2)
            probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1)[0]  # [heads, query, key]
            per_step.append(probs[:, :, positions].mean(dim=-1))  # [heads, query]
    height, width = layer.resolution
    return torch.stack(per_step).mean(dim=0).view(layer.heads, height, width)


def reference_word_map(pipe, tc, inputs, positions, size, mode="bicubic") -> torch.Tensor:
    total = torch.zeros(size)
    for layer in tc.index.layers:
        maps = reference_head_maps(pipe, layer, inputs[layer.name], positions)[:, None]  # [heads, 1, h, w]
        if mode == "bicubic":
            upsampled = F.interpolate(maps, size=size, mode="bicubic", align_corners=False).clamp(min=0)
        else:
            upsampled = maps.repeat_interleave(size[0] // maps.shape[-2], -2).repeat_interleave(
                size[1] // maps.shape[-1], -1)
        total += upsampled.sum(dim=(0, 1))
    return total


def test_word_map_equals_the_reference_from_explicit_probabilities(tiny_sd, captured):
    tc, inputs = captured
    assert tc.image_size == (16, 16)
    positions = tc.tokenization().positions("giraffe")
    expected = reference_word_map(tiny_sd, tc, inputs, positions, (16, 16))
    assert (tc.word_map("giraffe") - expected).abs().max() < 1e-5


def test_box_upsampling_repeats_each_latent_cell(tiny_sd, captured):
    tc, inputs = captured
    positions = tc.tokenization().positions("dog")
    expected = reference_word_map(tiny_sd, tc, inputs, positions, (16, 16), mode="box")
    box = tc.word_map("dog", upsample="box")
    assert (box - expected).abs().max() < 1e-5
    assert torch.equal(box[0:2, 0:2], box[0, 0].expand(2, 2))


def test_head_maps_are_per_head_probabilities_at_the_latent_size(tiny_sd, captured):
    tc, inputs = captured
    heads = tc.head_maps("dog")
    assert heads.shape == (tc.index.n_heads, 8, 8)
    layer = tc.index.layers[0]  # 8x8 already: no resampling
    expected = reference_head_maps(tiny_sd, layer, inputs[layer.name], tc.tokenization().positions("dog"))
    assert (heads[list(layer.head_ids)] - expected).abs().max() < 1e-6
    assert 0 <= heads.min() and heads.max() <= 1


def test_layer_and_head_selections_add_up_to_the_full_map(captured):
    tc, _ = captured
    full = tc.word_map("dog")
    by_layer = sum(tc.word_map("dog", layers=[layer.index]) for layer in tc.index.layers)
    by_name = tc.word_map("dog", layers=[layer.name for layer in tc.index.layers])
    first_half, second_half = range(0, 11), range(11, tc.index.n_heads)
    by_heads = tc.word_map("dog", heads=first_half) + tc.word_map("dog", heads=second_half)
    for parts in (by_layer, by_name, by_heads):
        assert (parts - full).abs().max() < 1e-5


def test_multi_token_word_averages_its_tokens(captured):
    tc, _ = captured
    token_maps = tc.token_maps()  # [tokens, H, W]
    assert token_maps.shape == (len(tc.tokenization()), 16, 16)
    assert (tc.word_map("giraffe") - token_maps[[3, 4]].mean(dim=0)).abs().max() < 1e-5  # linear before clamp


def test_repeated_word_occurrences_have_their_own_maps(captured):
    tc, _ = captured
    first, second = tc.word_map("a"), tc.word_map("a", occurrence=1)
    token_maps = tc.token_maps()
    assert torch.allclose(first, token_maps[1], atol=1e-6) and torch.allclose(second, token_maps[6], atol=1e-6)
    assert not torch.allclose(first, second)


def test_steps_pick_per_step_maps(captured):
    tc, _ = captured
    late = tc.word_map("dog", steps=(0.5, 1.0))
    assert torch.allclose(late, tc.word_map("dog", steps=[1]))
    with pytest.raises(HeadscopeError, match="step 5 is outside a 2-step run"):
        tc.word_map("dog", steps=[5])


def test_bad_map_options_are_clear_errors(captured):
    tc, _ = captured
    with pytest.raises(HeadscopeError, match="upsample='bilinear'"):
        tc.word_map("dog", upsample="bilinear")
    with pytest.raises(HeadscopeError, match="do not overlap"):
        tc.word_map("dog", layers=[0], heads=[5])


def test_normalize_maps_to_unit_range_and_threshold_masks():
    heat_map = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert torch.allclose(normalize(heat_map), torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(threshold(heat_map, 0.4), torch.tensor([[False, False], [True, True]]))
    assert torch.equal(normalize(torch.ones(3, 3)), torch.zeros(3, 3))
    with pytest.raises(HeadscopeError):
        threshold(heat_map, 1.5)
