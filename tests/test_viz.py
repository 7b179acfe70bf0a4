"""Figures: rendered from a real traced run, titled for a reader, written atomically."""
import pytest
import torch
from PIL import Image

import headscope
from headscope.testing import generate
from headscope import viz

PROMPT = "a red giraffe and a blue dog"


@pytest.fixture(scope="module")
def run(tiny_sd):
    with headscope.trace(tiny_sd) as tc:
        image = generate(tiny_sd, PROMPT, height=32, width=32)[0]
    return tc, image


def texts(figure) -> str:
    found = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]
    return " ".join(found)


def assert_png(path, min_side=200):
    with Image.open(path) as picture:
        assert picture.format == "PNG" and min(picture.size) >= min_side
    assert not [leftover for leftover in path.parent.iterdir() if leftover.name.endswith(".tmp")]


def test_overlay_names_word_and_prompt_and_has_a_colour_bar(run, tmp_path):
    tc, image = run
    figure = viz.overlay_figure(image, tc.word_map("giraffe"), word="giraffe", prompt=PROMPT)
    assert '"giraffe"' in texts(figure) and PROMPT in texts(figure)
    assert len(figure.axes) == 2  # the picture and its colour bar
    assert_png(viz.save_figure(figure, tmp_path / "overlay.png"))


def test_word_grid_has_the_image_then_one_panel_per_word(run, tmp_path):
    tc, image = run
    words = list(dict.fromkeys(tc.words()))
    figure = viz.word_grid_figure(image, {word: tc.word_map(word) for word in words}, prompt=PROMPT)
    visible = [axes for axes in figure.axes if axes.get_visible() and axes.get_title()]
    assert [axes.get_title() for axes in visible] == ["generated image"] + [f'"{word}"' for word in words]
    assert_png(viz.save_figure(figure, tmp_path / "maps" / "words.png"))


def test_head_grid_has_a_row_per_layer_and_a_panel_per_head(run, tmp_path):
    tc, _ = run
    figure = viz.head_grid_figure(tc.head_maps("dog"), tc.index, word="dog", prompt=PROMPT)
    panels = [axes for axes in figure.axes if axes.get_visible() and axes.images]
    assert len(panels) == tc.index.n_heads
    for layer in tc.index.layers:
        assert f"layer {layer.index}\n{layer.label}" in texts(figure)
    assert_png(viz.save_figure(figure, tmp_path / "heads.png"))


def test_failed_save_leaves_no_file(run, tmp_path):
    tc, image = run
    figure = viz.overlay_figure(image, torch.zeros(32, 32), word="dog", prompt=PROMPT)
    with pytest.raises(ValueError):
        viz.save_figure(figure, tmp_path / "overlay.nosuchformat")
    assert list(tmp_path.iterdir()) == []


def test_concept_shares_are_drawn_as_they_are_on_one_scale_not_normalised_per_map():
    image = torch.zeros(3, 8, 8)
    shares = {"circle": torch.full((8, 8), 0.75), "sky": torch.full((8, 8), 0.25)}
    shares["circle"][0, 0], shares["sky"][0, 0] = 0.5, 0.5

    def drawn(figure):  # the overlays' arrays, panel by panel (the image itself is the first artist)
        return [artist.get_array() for axes in figure.axes for artist in axes.get_images()[1:]]

    as_shares = drawn(viz.word_grid_figure(image, shares, prompt="p", shares=True))
    assert [float(heat[4, 4]) for heat in as_shares] == [0.75, 0.25] and float(as_shares[0][0, 0]) == 0.5
    assert "softmax over the concepts" in texts(viz.word_grid_figure(image, shares, prompt="p", shares=True))
    normalised = drawn(viz.word_grid_figure(image, shares, prompt="p"))
    assert [float(heat[4, 4]) for heat in normalised] == [1.0, 0.0]  # each map stretched to [0, 1] on its own
    single = drawn(viz.overlay_figure(image, shares["sky"], word="sky", prompt="p", shares=True))
    assert float(single[0][4, 4]) == 0.25
