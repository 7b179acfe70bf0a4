"""Maps of an image the model did not draw: noised to a strength, denoised with the prompt while traced."""
import numpy as np
import pytest
import torch
from PIL import Image

import headscope
from headscope import HeadscopeError
from headscope.shapes.world import SceneSampler, render


SIDE = 16  # the tiny SD pipeline makes 16x16 images


@pytest.fixture(scope="module")
def scene_image():
    scene = SceneSampler(seed=1).pair()
    image, _ = render(scene)
    return Image.fromarray(image).resize((SIDE, SIDE)), "a red circle and a blue square"


def test_image_maps_are_reproducible_with_a_fixed_seed(tiny_sd, scene_image):
    image, prompt = scene_image
    first = headscope.image_maps(tiny_sd, image, prompt, strength=0.5, samples=2, steps=4, seed=7)
    again = headscope.image_maps(tiny_sd, image, prompt, strength=0.5, samples=2, steps=4, seed=7)
    other = headscope.image_maps(tiny_sd, image, prompt, strength=0.5, samples=2, steps=4, seed=8)
    assert first.n_images == 1 and first.word_map("circle").shape == (SIDE, SIDE)
    assert torch.equal(first.word_map("circle"), again.word_map("circle"))
    assert not torch.equal(first.word_map("circle"), other.word_map("circle"))


def test_the_samples_maps_are_averaged(tiny_sd, scene_image):
    image, prompt = scene_image
    pooled = headscope.image_maps(tiny_sd, image, prompt, strength=0.5, samples=2, steps=4, seed=7)
    singles = [headscope.image_maps(tiny_sd, image, prompt, strength=0.5, samples=1, steps=4, seed=seed)
               for seed in (7, 8)]
    expected = (singles[0].head_maps("square") + singles[1].head_maps("square")) / 2
    assert torch.allclose(pooled.head_maps("square"), expected, atol=1e-5)


def test_a_smaller_image_of_the_same_aspect_is_resized_and_a_grey_one_converted(tiny_sd, scene_image):
    image, prompt = scene_image
    tc = headscope.image_maps(tiny_sd, image.resize((8, 8)).convert("L"), prompt, steps=2, samples=1)
    assert tc.image_notes == ["converted from mode L to RGB", "resized from 8x8 to 16x16"]


@pytest.mark.parametrize("options, message", [
    ({"strength": 0.0}, r"strength=0.0 must lie in \(0, 1\]"),
    ({"strength": 1.5}, r"strength=1.5 must lie in \(0, 1\]"),
    ({"samples": 0}, "samples=0; use at least 1"),
    ({"steps": 1, "strength": 0.5}, "runs no denoising step"),
])
def test_bad_options_are_one_clear_error(tiny_sd, scene_image, options, message):
    image, prompt = scene_image
    with pytest.raises(HeadscopeError, match=message):
        headscope.image_maps(tiny_sd, image, prompt, **options)


def test_unreadable_missing_and_wrongly_shaped_images_are_refused(tiny_sd, scene_image, tmp_path):
    _, prompt = scene_image
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(HeadscopeError, match="cannot read .*notes.png as an image"):
        headscope.image_maps(tiny_sd, tmp_path / "notes.png", prompt)
    with pytest.raises(HeadscopeError, match="does not exist"):
        headscope.image_maps(tiny_sd, tmp_path / "absent.png", prompt)
    wide = Image.fromarray(np.zeros((16, 24, 3), np.uint8))
    with pytest.raises(HeadscopeError, match="image is 24x16; this model makes 16x16 images: crop it"):
        headscope.image_maps(tiny_sd, wide, prompt)


def test_a_step_window_records_only_that_part_of_the_denoising(tiny_sd, scene_image):
    image, prompt = scene_image
    tc = headscope.image_maps(tiny_sd, image, prompt, strength=0.5, samples=1, steps=8, window=(0.5, 1.0))
    assert tc.n_steps == 4 and tc.reducer.steps == [2, 3]  # 8 x 0.5 steps run; the window keeps their last half
