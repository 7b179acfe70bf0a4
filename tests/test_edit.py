"""Prompt-to-prompt editing: same-seed runs, cross/self injection inside their windows, P2P-HRV."""
import pytest
import torch

from headscope import HeadscopeError
from headscope.steer.edit import Editor, align, edit
from headscope.processor import Hook
from headscope.steer import tokenize_prompts
from headscope.testing import random_hrv

FAST = dict(num_inference_steps=4, output_type="latent")


class Spy(Hook):
    """Per run: applied cross maps of the conditional rows and self-attention q, k, keyed (step, layer)."""

    def __init__(self):
        self.runs = []

    def start_call(self, state):
        self.runs.append({"cross": {}, "self": {}})

    def wants_probs(self, ctx):
        return True

    def read(self, ctx, probs):
        self.runs[-1]["cross"][(ctx.step, ctx.layer.index)] = probs.clone()

    def self_attention(self, ctx, query, key):
        self.runs[-1]["self"][(ctx.step, ctx.layer.index, ctx.layer.level)] = (query.clone(), key.clone())


def test_identical_prompts_without_injection_reproduce_the_source_bitwise(tiny_sd):
    result = edit(tiny_sd, "a red circle", "a red circle", cross_steps=0, self_steps=0, **FAST)
    assert torch.equal(result.source, result.edited) and result.stored_bytes == 0


def test_identical_prompts_with_full_injection_reproduce_the_source(tiny_sd):
    result = edit(tiny_sd, "a red circle", "a red circle", cross_steps=1.0, self_steps=1.0, **FAST)
    assert (result.source - result.edited).abs().max() < 1e-4 and result.stored_bytes > 0


def test_a_word_swap_changes_the_image_and_keeps_both_traces(tiny_sd):
    result = edit(tiny_sd, "a red circle", "a blue circle", **FAST)
    assert (result.source - result.edited).abs().max() > 1e-3
    assert result.source_trace.words() == ["a", "red", "circle"]
    assert result.edited_trace.words() == ["a", "blue", "circle"]
    assert result.edited_trace.word_map("blue").max() > 0


@pytest.mark.parametrize("swapped, own_columns", [("source", []), ("own", [2])])
def test_injected_cross_maps_equal_the_source_maps_inside_the_window_only(tiny_sd, swapped, own_columns):
    spy = Spy()
    edit(tiny_sd, "a red circle", "a blue circle", cross_steps=0.5, self_steps=0, swapped=swapped, hooks=[spy],
         **FAST)
    source, target = spy.runs[0]["cross"], spy.runs[1]["cross"]
    assert source.keys() == target.keys() and len(source) == 4 * 7
    aligned = [column for column in range(source[(0, 0)].shape[-1]) if column not in own_columns]
    for (step, layer), maps in target.items():
        same = torch.equal(maps[..., aligned], source[(step, layer)][..., aligned])
        assert same == (step < 2), (step, layer)
        if own_columns and step < 2 and (step, layer) != (0, 0):
            assert not torch.equal(maps[..., own_columns], source[(step, layer)][..., own_columns])


def test_self_attention_injection_uses_the_source_queries_and_keys_at_coarse_layers(tiny_sd):
    spy = Spy()
    edit(tiny_sd, "a red circle", "a blue circle", cross_steps=0, self_steps=0.5, self_min_level=1, hooks=[spy],
         **FAST)
    source, target = spy.runs[0]["self"], spy.runs[1]["self"]
    assert len(target) == 4 * 7
    injected = {key for key in target if key[0] < 2 and key[2] >= 1}
    assert injected
    for key, (query, keys) in target.items():  # guidance on, one image: row 0 uncond, row 1 cond
        if key == (0, 0, 0):
            continue  # the first layer of step 0 sees the same input in both runs
        source_query, source_keys = source[key]
        same = torch.equal(query[1], source_query[1]) and torch.equal(keys[1], source_keys[1])
        assert same == (key in injected), key
        if key[0] == 1:
            assert not torch.equal(query[0], source_query[0])  # unconditional rows are never injected


def test_p2p_hrv_multiplies_the_swapped_tokens_own_map_by_the_hrv(tiny_sd):
    hrv = random_hrv(tiny_sd)
    plain, with_hrv = Spy(), Spy()
    edit(tiny_sd, "a red circle", "a blue circle", swapped="own", hooks=[plain], **FAST)
    edit(tiny_sd, "a red circle", "a blue circle", concept="color", hrv=hrv, hooks=[with_hrv], **FAST)
    first_layer_heads = hrv.vector("color")[:2]  # layer 0 has 2 heads; at step 0 its input is the same in both runs
    own, strengthened = plain.runs[1]["cross"][(0, 0)], with_hrv.runs[1]["cross"][(0, 0)]
    assert torch.allclose(strengthened[..., 2], own[..., 2] * first_layer_heads[None, :, None], atol=1e-6)
    assert torch.equal(strengthened[..., [0, 1, 3]], own[..., [0, 1, 3]])


def test_alignment_maps_a_multi_token_word_to_the_mean_of_the_source_tokens(tiny_sd):
    source, target = tokenize_prompts(tiny_sd, ["a giraffe on a tree", "a dog on a tree"])
    alignment = align(source, target, "source")
    mapper, own = alignment.mapper(len(source) + 2, len(target) + 3)
    assert alignment.edited == (2,)
    assert mapper[:, 2].tolist()[2:4] == [0.5, 0.5] and mapper[:, 2].sum() == 1
    assert mapper[4, 3] == 1 and mapper[7, 6] == 1  # "on" and the end token: one token later in the source
    assert mapper[8, 7] == 1 and mapper[9, 8] == 1 and own[9]  # padding, until the source keys run out


def test_processors_are_restored_after_an_edit(tiny_sd):
    before = {name: type(processor) for name, processor in tiny_sd.unet.attn_processors.items()}
    edit(tiny_sd, "a red circle", "a blue circle", num_inference_steps=2, output_type="latent")
    assert {name: type(processor) for name, processor in tiny_sd.unet.attn_processors.items()} == before


@pytest.mark.parametrize("options, message", [
    (dict(cross_steps=1.5), "cross_steps=1.5"),
    (dict(self_steps=(0.5, 0.2)), "0 <= start < end"),
    (dict(swapped="both"), "swapped='both'"),
    (dict(concept="texture", hrv="HRV"), "unknown concept 'texture'"),
])
def test_bad_edit_options_are_headscope_errors(tiny_sd, options, message):
    if options.get("hrv") == "HRV":
        options = {**options, "hrv": random_hrv(tiny_sd)}
    with pytest.raises(HeadscopeError) as error:
        Editor(tiny_sd, **options)
    assert message in str(error.value)


def test_self_attention_processors_compute_diffusers_attention_bitwise_and_restore(tiny_sd):
    from headscope import trace
    from headscope.backbones.unet import SelfAttentionProcessor, self_attention_processors

    generator = torch.Generator().manual_seed(0)
    plain = tiny_sd("a red circle", num_inference_steps=2, generator=generator, output_type="latent").images
    with trace(tiny_sd) as tc, self_attention_processors(tiny_sd.unet, tc.hooks) as layers:
        installed = [type(processor) for processor in tiny_sd.unet.attn_processors.values()]
        generator = torch.Generator().manual_seed(0)
        traced = tiny_sd("a red circle", num_inference_steps=2, generator=generator, output_type="latent").images
    assert torch.equal(plain, traced)
    assert len(layers) == 7 and installed.count(SelfAttentionProcessor) == 7
    assert {type(p).__name__ for p in tiny_sd.unet.attn_processors.values()} == {"AttnProcessor2_0"}
