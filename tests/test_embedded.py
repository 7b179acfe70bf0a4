"""The embedded shapes-world models and their default HRVs ship inside the package and load offline:
"shapes" (SD-style UNet, the default) and "shapes-mmdit" (SD3-style joint attention)."""
import pytest
import torch

import headscope
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.models import EMBEDDED, embedded_model_path, embedded_name, model_defaults, resolve_model

PIPELINES = {"shapes": "StableDiffusionPipeline", "shapes-mmdit": "StableDiffusion3Pipeline"}


@pytest.fixture(scope="module", params=list(EMBEDDED))
def embedded(request):
    return request.param, headscope.load_pipeline(request.param, device="cpu")


def test_the_default_model_is_the_unet_one_also_reachable_as_shapes():
    assert resolve_model(None) == resolve_model("shapes") == embedded_model_path()
    assert embedded_name(None) == embedded_name(embedded_model_path("shapes")) == "shapes"
    assert embedded_name(embedded_model_path("shapes-mmdit")) == "shapes-mmdit"
    assert embedded_name("stabilityai/stable-diffusion-3-medium-diffusers") is None
    with pytest.raises(HeadscopeError, match="no embedded model 'shapes-flux'; the embedded models are shapes, "
                                             "shapes-mmdit"):
        embedded_model_path("shapes-flux")


@pytest.mark.parametrize("name", list(EMBEDDED))
def test_embedded_models_are_small_ordinary_pipeline_folders(name):
    folder = embedded_model_path(name)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    denoiser = "unet" if name == "shapes" else "transformer"
    assert (folder / "model_index.json").is_file() and (folder / denoiser / "config.json").is_file()
    assert size < 20 * 2**20


def test_embedded_models_load_offline_through_from_pretrained(embedded):
    name, pipe = embedded
    assert type(pipe).__name__ == PIPELINES[name]
    denoiser = pipe.unet if name == "shapes" else pipe.transformer
    assert denoiser.dtype == torch.float32  # stored in fp16, computed in fp32 on a CPU


def test_embedded_unet_has_cross_attention_at_several_resolutions_with_four_heads():
    index = HeadIndex.from_unet(headscope.load_pipeline(device="cpu").unet)
    assert len({layer.resolution for layer in index.layers}) >= 2
    assert all(layer.heads >= 4 for layer in index.layers)


def test_embedded_mmdit_has_joint_blocks_of_four_heads_on_a_16x16_token_grid():
    pipe = headscope.load_pipeline("shapes-mmdit", device="cpu")
    index = HeadIndex.from_model(pipe)
    assert index.n_layers >= 4 and all(layer.heads == 4 for layer in index.layers)
    assert pipe.transformer.config.sample_size // pipe.transformer.config.patch_size == 16


def test_a_two_step_generation_has_the_model_image_size(embedded):
    from headscope.models import call_defaults

    _, pipe = embedded
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 **call_defaults(pipe)).images[0]
    assert image.size == (64, 64)


def test_embedded_models_ship_generation_defaults(embedded):
    name, pipe = embedded
    defaults = model_defaults(pipe)
    assert defaults["num_inference_steps"] >= 10 and defaults["guidance_scale"] > 1
    if name == "shapes-mmdit":
        assert defaults["max_sequence_length"] == 24  # the T5 length it was trained on


def test_default_hrv_matches_each_embedded_model(embedded):
    from headscope.hrv import HRV

    _, pipe = embedded
    hrv = HRV.for_pipeline(pipe)
    hrv.check_compatible(pipe)
    assert {"color", "shape", "size", "position"} <= set(hrv.concepts)
    assert torch.allclose(hrv.vectors.mean(dim=1), torch.ones(len(hrv.concepts)), atol=1e-4)


def test_an_embedded_models_hrv_is_refused_on_the_other_one():
    from headscope.hrv import HRV, default_hrv_path

    mmdit = headscope.load_pipeline("shapes-mmdit", device="cpu")
    with pytest.raises(HeadscopeError):
        HRV.load(default_hrv_path("shapes")).check_compatible(mmdit)


def test_default_hrv_tells_colour_heads_from_shape_heads(embedded):
    from headscope.hrv import HRV

    _, pipe = embedded
    hrv = HRV.for_pipeline(pipe)
    color, shape = hrv.vector("color"), hrv.vector("shape")
    assert torch.nn.functional.cosine_similarity(color, shape, dim=0) < 0.8


def test_each_shipped_hrv_was_built_by_the_command_its_error_names(embedded):
    from headscope.hrv import HRV, build_default_command
    from headscope.hrv.meta import HRV_PROMPTS

    name, pipe = embedded
    hrv = HRV.for_pipeline(pipe)
    assert hrv.meta["n_prompts"] == HRV_PROMPTS[name] and hrv.meta["seed"] == 0
    assert f"--n-prompts {HRV_PROMPTS[name]} --seed 0" in build_default_command(name)
