"""HeadProcessor on a lone diffusers Attention module: same maths as AttnProcessor2_0, hooks exact."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import headscope.processor as processor_module
from headscope.heads import LayerInfo
from headscope.processor import BatchLayout, HeadProcessor, Hook, Hooks

BATCH, QUERIES, KEYS, HEADS, HEAD_DIM = 2, 16, 6, 4, 8


class Recorder(Hook):
    def __init__(self, rows="cond"):
        self.rows, self.seen = rows, []

    def wants_probs(self, ctx):
        return True

    def read(self, ctx, probs):
        self.seen.append((ctx.rows, probs.clone()))


class Scaler(Hook):
    def __init__(self, factors):
        self.factors = factors

    def value_factors(self, ctx):
        return self.factors


class Editor(Hook):
    def __init__(self, edit):
        self.edit = edit

    def edits_probs(self, ctx):
        return True

    def edit_probs(self, ctx, probs):
        return self.edit(probs)


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=16, heads=HEADS, dim_head=HEAD_DIM).eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, QUERIES, 32, generator=generator), torch.randn(BATCH, KEYS, 16, generator=generator)


def run(attn, hidden, context, *hooks, mask=None):
    layer = LayerInfo(index=0, name="attn", block="down", block_index=0, level=0, heads=HEADS,
                      head_dim=HEAD_DIM, offset=0, resolution=(4, 4))
    with torch.no_grad():
        return HeadProcessor(layer, Hooks(list(hooks)))(attn, hidden, context, attention_mask=mask)


def reference(attn, hidden, context, post_softmax=lambda probs: probs):
    """Attention written out: softmax(q k^T * scale), an optional post-softmax change, then @ v."""
    def heads(tensor):  # [batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]
        return tensor.view(BATCH, -1, HEADS, HEAD_DIM).transpose(1, 2)

    with torch.no_grad():
        query, key, value = heads(attn.to_q(hidden)), heads(attn.to_k(context)), heads(attn.to_v(context))
        probs = post_softmax((query @ key.transpose(-1, -2) * attn.scale).softmax(-1))
        mixed = (probs @ value).transpose(1, 2).reshape(BATCH, QUERIES, HEADS * HEAD_DIM)
        return attn.to_out[1](attn.to_out[0](mixed)), probs


def test_output_is_bitwise_attnprocessor2_0_with_and_without_readers(attn, inputs):
    hidden, context = inputs
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, context)
    assert torch.equal(run(attn, hidden, context), expected)
    assert torch.equal(run(attn, hidden, context, Recorder("all")), expected)


def test_output_is_bitwise_attnprocessor2_0_with_a_padding_mask(attn, inputs):
    hidden, context = inputs
    mask = torch.zeros(BATCH, 1, KEYS)
    mask[1, :, -2:] = -10000.0  # row 1 ignores its last two keys
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, context, attention_mask=mask)
    recorder = Recorder("all")
    assert torch.equal(run(attn, hidden, context, recorder, mask=mask), expected)
    assert recorder.seen[0][1][1, :, :, -2:].max() < 1e-6


def test_readers_get_softmax_probabilities_of_their_rows(attn, inputs):
    hidden, context = inputs
    _, probs = reference(attn, hidden, context)
    recorder = Recorder("all")
    run(attn, hidden, context, recorder)
    rows, seen = recorder.seen[0]
    assert rows == (0, 1) and seen.shape == (BATCH, HEADS, QUERIES, KEYS)
    assert (seen - probs).abs().max() < 1e-6


def test_value_factors_equal_scaling_post_softmax_maps(attn, inputs):
    hidden, context = inputs
    factors = torch.rand(1, HEADS, KEYS, generator=torch.Generator().manual_seed(2)) * 3
    expected, _ = reference(attn, hidden, context, lambda probs: probs * factors[:, :, None, :])
    assert (run(attn, hidden, context, Scaler(factors)) - expected).abs().max() < 1e-5


def test_factors_of_several_writers_multiply_and_readers_see_them(attn, inputs):
    hidden, context = inputs
    first, second = torch.full((1, HEADS, KEYS), 2.0), torch.rand(BATCH, HEADS, KEYS)
    expected, probs = reference(attn, hidden, context, lambda probs: probs * (first * second)[:, :, None, :])
    recorder = Recorder("all")
    assert (run(attn, hidden, context, Scaler(first), Scaler(second), recorder) - expected).abs().max() < 1e-5
    assert (recorder.seen[0][1] - probs).abs().max() < 1e-6


def test_probability_editor_changes_the_output_like_the_reference(attn, inputs):
    hidden, context = inputs
    def drop_key_2(probs):
        edited = probs.clone()
        edited[..., 2] = 0.0
        return edited

    expected, _ = reference(attn, hidden, context, drop_key_2)
    assert (run(attn, hidden, context, Editor(drop_key_2)) - expected).abs().max() < 1e-5


def test_probabilities_are_materialised_only_when_asked(attn, inputs, monkeypatch):
    hidden, context = inputs
    calls = []
    original = processor_module.attention_probs
    monkeypatch.setattr(processor_module, "attention_probs", lambda *args: calls.append(1) or original(*args))
    run(attn, hidden, context, Scaler(torch.ones(1, HEADS, KEYS)))
    assert calls == []
    run(attn, hidden, context, Recorder())
    assert calls == [1]


def test_batch_layout_with_guidance_puts_unconditional_rows_first():
    layout = BatchLayout(n_images=4, cfg=True, images_per_prompt=2)
    assert layout.rows("uncond") == (0, 1, 2, 3) and layout.rows("cond") == (4, 5, 6, 7)
    assert [layout.image(row) for row in layout.rows("cond")] == [0, 1, 2, 3]
    assert [layout.prompt_index(image) for image in range(4)] == [0, 0, 1, 1]
    assert layout.kind(3) == "uncond" and layout.kind(4) == "cond"


def test_batch_layout_without_guidance_has_only_conditional_rows():
    layout = BatchLayout(n_images=3, cfg=False)
    assert layout.rows("cond") == layout.rows("all") == (0, 1, 2) and layout.rows("uncond") == ()
