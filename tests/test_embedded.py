"""The embedded shapes model and its default HRV ship inside the package and load offline."""
import pytest
import torch

import headscope
from headscope.heads import HeadIndex
from headscope.models import embedded_model_path, model_defaults


@pytest.fixture(scope="module")
def pipe():
    return headscope.load_pipeline(device="cpu")


def test_embedded_model_is_a_small_ordinary_pipeline_folder():
    folder = embedded_model_path()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    assert size < 20 * 2**20


def test_embedded_model_loads_offline_through_from_pretrained(pipe):
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32  # stored in fp16, computed in fp32 on a CPU


def test_embedded_unet_has_cross_attention_at_several_resolutions_with_four_heads(pipe):
    index = HeadIndex.from_unet(pipe.unet)
    assert len({layer.resolution for layer in index.layers}) >= 2
    assert all(layer.heads >= 4 for layer in index.layers)


def test_a_two_step_generation_has_the_model_image_size(pipe):
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_embedded_model_ships_generation_defaults(pipe):
    defaults = model_defaults(pipe)
    assert defaults["num_inference_steps"] >= 10 and defaults["guidance_scale"] > 1


def test_default_hrv_matches_the_embedded_model(pipe):
    from headscope.hrv import HRV

    hrv = HRV.for_pipeline(pipe)
    hrv.check_compatible(pipe)
    assert {"color", "shape", "size", "position"} <= set(hrv.concepts)
    assert torch.allclose(hrv.vectors.mean(dim=1), torch.ones(len(hrv.concepts)), atol=1e-4)


def test_default_hrv_tells_colour_heads_from_shape_heads(pipe):
    from headscope.hrv import HRV

    hrv = HRV.for_pipeline(pipe)
    color, shape = hrv.vector("color"), hrv.vector("shape")
    assert torch.nn.functional.cosine_similarity(color, shape, dim=0) < 0.8
