"""Backbone adapters: real SD3 / SD3.5 / Flux layouts on the meta device, order, kinds, grids, unknown families."""
import pytest
import torch

from headscope import HeadIndex, HeadscopeError
from headscope.backbones import backbone_for
from headscope.models.configs import (FLUX_DEV_TRANSFORMER_CONFIG, SD3_MEDIUM_TRANSFORMER_CONFIG,
                                      SD15_UNET_CONFIG, SD35_LARGE_TRANSFORMER_CONFIG, SDXL_BASE_UNET_CONFIG)

SD35_MEDIUM_TRANSFORMER_CONFIG = {**SD3_MEDIUM_TRANSFORMER_CONFIG, "dual_attention_layers": list(range(13)),
                                  "qk_norm": "rms_norm", "pos_embed_max_size": 384}


def meta_model(config):
    from headscope.backbones import model_class_for_config

    with torch.device("meta"):
        return model_class_for_config(config).from_config(dict(config))


@pytest.mark.parametrize("config, layers, heads", [
    (SD3_MEDIUM_TRANSFORMER_CONFIG, 24, 576),
    (SD35_LARGE_TRANSFORMER_CONFIG, 38, 1444),
    (FLUX_DEV_TRANSFORMER_CONFIG, 57, 1368),
])
def test_real_joint_layouts_count_their_heads_on_meta(config, layers, heads):
    model = meta_model(config)
    index = HeadIndex.from_model(model)
    assert next(model.parameters()).device.type == "meta"
    assert (index.n_layers, index.n_heads) == (layers, heads)
    assert HeadIndex.from_config(config).layout() == index.layout()


def test_flux_runs_its_19_double_stream_layers_before_its_38_single_stream_ones():
    index = HeadIndex.from_config(FLUX_DEV_TRANSFORMER_CONFIG)
    assert [layer.name for layer in index.layers[:2]] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert [layer.kind for layer in index.layers] == ["joint"] * 19 + ["single"] * 38
    assert index.layers[19].name == "single_transformer_blocks.0.attn" and index.layers[19].offset == 19 * 24
    assert {(layer.heads, layer.head_dim) for layer in index.layers} == {(24, 128)}


def test_sd35_image_only_attn2_is_not_a_text_layer():
    index = HeadIndex.from_config(SD35_MEDIUM_TRANSFORMER_CONFIG)
    assert (index.n_layers, index.n_heads) == (24, 576)
    assert all(layer.name.endswith(".attn") and layer.kind == "joint" for layer in index.layers)


def test_token_grid_is_the_latent_over_the_patch_also_for_non_square_images():
    flux = HeadIndex.from_config(FLUX_DEV_TRANSFORMER_CONFIG)
    sd3 = HeadIndex.from_config(SD3_MEDIUM_TRANSFORMER_CONFIG)
    assert flux.layers[0].resolution == sd3.layers[0].resolution == (64, 64)  # 1024 px, latent 128, patch 2
    assert flux.at_image(1024, 768).layers[-1].resolution == (64, 48)
    assert sd3.at_image(768, 1344).layers[5].resolution == (48, 84)
    assert flux.layers[20].label == "single block 1 · 64×64" and sd3.layers[3].label == "joint block 3 · 64×64"


def test_unet_fingerprints_are_those_the_shipped_hrv_files_use():
    # Pinned before layers had a kind: adding joint attention must not move a UNet's fingerprint.
    assert HeadIndex.from_config(SD15_UNET_CONFIG).fingerprint() == "32b081ae2b6b"
    assert HeadIndex.from_config(SDXL_BASE_UNET_CONFIG).fingerprint() == "ca7a366ca510"
    assert {layer.kind for layer in HeadIndex.from_config(SD15_UNET_CONFIG).layers} == {"cross"}


def test_joint_fingerprints_differ_between_families_and_sizes():
    prints = {HeadIndex.from_config(config).fingerprint()
              for config in (SD3_MEDIUM_TRANSFORMER_CONFIG, SD35_LARGE_TRANSFORMER_CONFIG, FLUX_DEV_TRANSFORMER_CONFIG,
                             {**FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": 24, "num_single_layers": 0})}
    assert len(prints) == 4


def test_adapters_name_their_family_from_a_pipeline_or_a_bare_model(tiny_sd, tiny_sd3, tiny_flux):
    assert [backbone_for(pipe).family for pipe in (tiny_sd, tiny_sd3, tiny_flux)] == ["unet", "sd3", "flux"]
    assert backbone_for(tiny_flux.transformer).model is tiny_flux.transformer
    assert [backbone_for(pipe).default_encoder for pipe in (tiny_sd, tiny_sd3, tiny_flux)] == ["clip", "clip", "t5"]


def test_an_unknown_model_family_is_one_line_naming_the_supported_ones():
    class OtherPipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(HeadscopeError) as error:
        HeadIndex.from_model(OtherPipeline())
    message = str(error.value)
    assert "\n" not in message and "OtherPipeline" in message and "Linear" in message
    for family in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"):
        assert family in message
    with pytest.raises(HeadscopeError, match="supported: UNet2DConditionModel"):
        HeadIndex.from_config({"_class_name": "HunyuanDiT2DModel"})


def test_real_size_stand_in_pipelines_build_quickly_and_trace():
    import headscope
    from headscope.testing_real import build_real_size

    pipe = build_real_size({**FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 1})
    with headscope.trace(pipe) as tc:
        pipe("a red dog", num_inference_steps=1, height=32, width=48, max_sequence_length=8, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    assert tc.index.n_heads == 48 and tc.word_map("dog").shape == (32, 48)
