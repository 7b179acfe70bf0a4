"""HeadIndex: real SD 1.5 / 2.1 / SDXL layouts built on the meta device, order, ids, lookups."""
import json

import pytest

from headscope.testing import SD15_UNET_CONFIG
from headscope import HeadIndex, HeadscopeError

SD21_UNET_CONFIG = {**SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                    "use_linear_projection": True, "sample_size": 96, "upcast_attention": True}
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}

# (module name prefix, block, block index, level, side at 64x64 latent, head_dim, offset) of SD 1.5
SD15_EXPECTED = [
    ("down_blocks.0.attentions.0", "down", 0, 0, 64, 40, 0),
    ("down_blocks.0.attentions.1", "down", 0, 0, 64, 40, 8),
    ("down_blocks.1.attentions.0", "down", 1, 1, 32, 80, 16),
    ("down_blocks.1.attentions.1", "down", 1, 1, 32, 80, 24),
    ("down_blocks.2.attentions.0", "down", 2, 2, 16, 160, 32),
    ("down_blocks.2.attentions.1", "down", 2, 2, 16, 160, 40),
    ("mid_block.attentions.0", "mid", 0, 3, 8, 160, 48),
    ("up_blocks.1.attentions.0", "up", 1, 2, 16, 160, 56),
    ("up_blocks.1.attentions.1", "up", 1, 2, 16, 160, 64),
    ("up_blocks.1.attentions.2", "up", 1, 2, 16, 160, 72),
    ("up_blocks.2.attentions.0", "up", 2, 1, 32, 80, 80),
    ("up_blocks.2.attentions.1", "up", 2, 1, 32, 80, 88),
    ("up_blocks.2.attentions.2", "up", 2, 1, 32, 80, 96),
    ("up_blocks.3.attentions.0", "up", 3, 0, 64, 40, 104),
    ("up_blocks.3.attentions.1", "up", 3, 0, 64, 40, 112),
    ("up_blocks.3.attentions.2", "up", 3, 0, 64, 40, 120),
]


@pytest.fixture(scope="module")
def sd15():
    return HeadIndex.from_config(SD15_UNET_CONFIG)


def test_sd15_has_16_layers_of_8_heads(sd15):
    assert (sd15.n_layers, sd15.n_heads, len(sd15)) == (16, 128, 128)
    assert all(layer.heads == 8 for layer in sd15.layers)


def test_sd15_layout_matches_the_unet_row_by_row(sd15):
    for layer, (prefix, block, block_index, level, side, head_dim, offset) in zip(sd15.layers, SD15_EXPECTED):
        assert layer.name == f"{prefix}.transformer_blocks.0.attn2"
        assert (layer.block, layer.block_index, layer.level) == (block, block_index, level)
        assert (layer.resolution, layer.head_dim, layer.offset) == ((side, side), head_dim, offset)


def test_sd21_head_counts_follow_attention_head_dim():
    index = HeadIndex.from_config(SD21_UNET_CONFIG)
    assert [layer.heads for layer in index.layers] == [5, 5, 10, 10, 20, 20, 20, 20, 20, 20, 10, 10, 10, 5, 5, 5]
    assert index.n_heads == 195 and {layer.head_dim for layer in index.layers} == {64}
    assert [layer.resolution[0] for layer in index.layers] == [96, 96, 48, 48, 24, 24, 12, 24, 24, 24,
                                                                48, 48, 48, 96, 96, 96]


def test_sdxl_base_has_1300_heads_in_70_layers():
    index = HeadIndex.from_config(SDXL_UNET_CONFIG)
    assert (index.n_layers, index.n_heads) == (70, 1300)
    per_block = {}
    for layer in index.layers:
        per_block.setdefault((layer.block, layer.block_index), []).append(layer)
    assert {key: len(layers) for key, layers in per_block.items()} == {
        ("down", 1): 4, ("down", 2): 20, ("mid", 0): 10, ("up", 0): 30, ("up", 1): 6}
    assert {layer.resolution for layer in per_block[("mid", 0)]} == {(32, 32)}
    assert {layer.resolution for layer in per_block[("up", 1)]} == {(64, 64)}


def test_execution_order_puts_mid_between_down_and_up(sd15):
    blocks = [layer.block for layer in sd15.layers]
    assert blocks == ["down"] * 6 + ["mid"] + ["up"] * 9


def test_flat_ids_are_contiguous_and_round_trip(sd15):
    refs = list(sd15)
    assert [ref.id for ref in refs] == list(range(128))
    for ref in refs:
        assert sd15.flat(ref.layer, ref.head) == ref.id
        assert sd15.unflat(ref.id) == (ref.layer, ref.head)
    assert sd15.flat("mid_block.attentions.0.transformer_blocks.0.attn2", 3) == 51


def test_lookup_by_module_name(sd15):
    layer = sd15["up_blocks.3.attentions.2.transformer_blocks.0.attn2"]
    assert (layer.index, list(layer.head_ids)) == (15, list(range(120, 128)))
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1" not in sd15


def test_out_of_range_lookups_raise_headscope_errors(sd15):
    for bad in (lambda: sd15.flat(0, 8), lambda: sd15.unflat(128), lambda: sd15.layer(16),
                lambda: sd15.layer("down_blocks.9")):
        with pytest.raises(HeadscopeError):
            bad()


def test_resolutions_follow_the_image_size(sd15):
    at_768 = sd15.at_image(768, 512)
    assert at_768.latent_hw == (96, 64)
    assert [layer.resolution for layer in at_768.layers[:7:2]] == [(96, 64), (48, 32), (24, 16), (12, 8)]
    assert sd15.at_latent(15).layers[6].resolution == (2, 2)  # ceil halvings: 15 -> 8 -> 4 -> 2
    with pytest.raises(HeadscopeError):
        sd15.at_image(500, 512)


def test_layout_is_json_and_fingerprint_ignores_resolution(sd15):
    layout = json.loads(json.dumps(sd15.layout()))
    assert layout[6]["name"] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    assert layout[6]["resolution"] == [8, 8]
    assert sd15.fingerprint() == sd15.at_latent(96).fingerprint()
    assert sd15.fingerprint() != HeadIndex.from_config(SD21_UNET_CONFIG).fingerprint()
    assert len(sd15.fingerprint()) == 12


def test_from_unet_matches_from_config_on_the_tiny_pipeline(tiny_sd):
    index = HeadIndex.from_unet(tiny_sd.unet)
    assert index.layout() == HeadIndex.from_config(dict(tiny_sd.unet.config)).layout()
    assert [layer.resolution[0] for layer in index.layers] == [8, 4, 4, 4, 4, 8, 8]
    assert [layer.heads for layer in index.layers] == [2, 4, 4, 4, 4, 2, 2]
