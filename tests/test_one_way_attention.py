"""The concept queries' one-way attention over [image keys; concept keys], both ways it is computed: over an
arena's buffer (keys joined in place) and in two parts over views of a block's own tensors (block by block,
no copy), each equal to a softmax over the joined keys written here, padded concept keys hidden."""
import pytest
import torch

from headscope.backbones.streams import ImageSide, _one_way_attention

ROWS, HEADS, TOKENS, IMAGE, DIM = 2, 3, 5, 40, 8


def reference(query, key, value, image_key, image_value, key_mask=None):
    keys, values = torch.cat([image_key, key], dim=2), torch.cat([image_value, value], dim=2)
    scores = query @ keys.transpose(-1, -2) / DIM ** 0.5
    if key_mask is not None:
        hidden = torch.cat([torch.zeros(ROWS, IMAGE, dtype=torch.bool), ~key_mask], dim=1)
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ values


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("where", ["views", "arena"])
def test_one_way_attention_is_a_softmax_over_image_and_concept_keys(where, masked):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(ROWS, HEADS, TOKENS, DIM, generator=generator) for _ in range(3))
    joint_key, joint_value = (torch.randn(ROWS + 1, HEADS, IMAGE + 7, DIM, generator=generator) for _ in range(2))
    image_key, image_value = joint_key[1:, :, :IMAGE], joint_value[1:, :, :IMAGE]  # views, as a block's are
    key_mask = torch.tensor([[True] * TOKENS, [True, True, False, True, False]]) if masked else None
    if where == "views":
        image = ImageSide(image_key, image_value)
    else:  # an arena's buffers: the image, then room for the concept tokens
        room_key, room_value = (torch.zeros(ROWS, HEADS, IMAGE + TOKENS + 2, DIM) for _ in range(2))
        room_key[:, :, :IMAGE], room_value[:, :, :IMAGE] = image_key, image_value
        image = ImageSide(room_key, room_value, IMAGE)
    before = joint_key.clone(), joint_value.clone()
    out = _one_way_attention(query, key, value, image, key_mask)
    assert out.shape == (ROWS, HEADS, TOKENS, DIM)
    assert torch.allclose(out, reference(query, key, value, image_key, image_value, key_mask), atol=1e-6)
    assert torch.equal(joint_key, before[0]) and torch.equal(joint_value, before[1])  # the block's own: untouched
