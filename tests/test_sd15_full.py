"""The full-size SD 1.5 UNet (random weights, ~860M parameters): 128 heads traced at a small latent."""
import pytest
import torch

import headscope
from headscope.testing import SD15_UNET_CONFIG, ddim_scheduler, text_config, tiny_vae

POOL = 1 << 20


def fill_fast(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights at memcpy speed: every tensor gets slices of one random pool, from a random offset.

    Drawing 860M fresh normals costs ~12 s on one busy core; this costs ~1 s and is as good for a
    layout/trace test.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 * POOL, generator=generator) * std
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            flat = tensor.view(-1)
            for start in range(0, flat.numel(), POOL):
                offset = int(torch.randint(POOL, (1,), generator=generator))
                length = min(POOL, flat.numel() - start)
                flat[start:start + length].copy_(pool[offset:offset + length])


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd):
    """SD 1.5's real UNet layout with random weights, a 768-wide tiny text encoder, the tiny VAE."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    unet = unet.to_empty(device="cpu")
    fill_fast(unet)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(tiny_sd.tokenizer, hidden=768, projection=768))
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tiny_sd.tokenizer,
                                   unet=unet.eval(), scheduler=ddim_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del pipe, unet


def latents_of(pipe, prompt):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=1, height=32, width=32, generator=generator,
                output_type="latent").images


def test_full_sd15_unet_records_all_128_heads_and_keeps_its_output(sd15_pipe):
    prompt = "a red dog"
    plain = latents_of(sd15_pipe, prompt)
    with headscope.trace(sd15_pipe) as tc:
        traced = latents_of(sd15_pipe, prompt)
    assert torch.equal(traced, plain)
    assert (tc.index.n_layers, tc.index.n_heads, tc.index.latent_hw) == (16, 128, (16, 16))
    assert [layer.resolution[0] for layer in tc.index.layers] == [16, 16, 8, 8, 4, 4, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16]
    sums = tc.reducer.sums["cond"]
    assert sorted(sums) == list(range(16))
    assert all(sums[layer.index].shape == (1, 8, 5, *layer.resolution) for layer in tc.index.layers)
    head_maps = tc.head_maps("dog")
    assert head_maps.shape == (128, 16, 16) and bool((head_maps.flatten(1).amax(1) > 0).all())
    assert tc.word_map("dog").shape == (32, 32)
