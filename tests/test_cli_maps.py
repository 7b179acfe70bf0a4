"""`headscope daam` / `generate --daam` with a map method, and `headscope daam --image` (maps of an existing image),
on the embedded model with a few steps."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from headscope_cli.main import cli

FAST = ["--steps", "2", "--device", "cpu"]
PROMPT = "a large red circle on the left"


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    """A rendered shapes-world scene (no model drew it) as a PNG file, with its caption."""
    from headscope.shapes.world import SceneSampler, render

    scene = SceneSampler(seed=3).single(shape="circle", color="red", size="large", position="left", fill="solid")
    pixels, _ = render(scene)
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    Image.fromarray(pixels).save(path)
    return path


def assert_one_line_error(result, out, expected):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscope: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_daam_with_a_selective_method_writes_its_maps_and_says_how_they_were_made(tmp_path):
    plain, selective = tmp_path / "plain", tmp_path / "selective"
    assert invoke("daam", PROMPT, "--word", "circle", "--out", plain, *FAST).exit_code == 0
    result = invoke("daam", PROMPT, "--word", "circle", "--method", "selective", "--top-k", 3, "--out", selective,
                    *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((selective / "summary.json").read_text())
    assert summary["maps"] == {"method": "selective", "concept": None, "top_k": 3, "heads": None, "hrv": "model default"}
    assert {"maps/word-circle.png", "maps/heads-circle.png"} <= set(summary["files"])
    daam_summary = json.loads((plain / "summary.json").read_text())
    assert daam_summary["maps"]["method"] == "daam"
    assert summary["words"]["circle"][0]["max"] < daam_summary["words"]["circle"][0]["max"]  # 3 heads of 40


def test_daam_of_chosen_heads_sums_those_heads_only(tmp_path):
    out = tmp_path / "heads"
    result = invoke("daam", PROMPT, "--word", "circle", "--heads", "29,3,34", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["maps"]["heads"] == [3, 29, 34]


def test_generate_daam_takes_the_method_and_a_concept(tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", PROMPT, "--daam", "--method", "weighted", "--concept", "color", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["maps"]["method"] == "weighted" and summary["maps"]["concept"] == "color"
    assert "maps/word-circle.png" in summary["files"] and "maps/word-a.png" in summary["files"]


def test_daam_of_an_existing_image_writes_the_same_map_files(tmp_path, scene_png):
    out = tmp_path / "image"
    result = invoke("daam", PROMPT, "--image", scene_png, "--strength", 0.5, "--samples", 2, "--word", "circle",
                    "--out", out, "--steps", 4, "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["image"], summary["strength"], summary["samples"]) == (str(scene_png), 0.5, 2)
    assert summary["guidance"] == 1.0 and summary["image_notes"] == []
    assert {"image.png", "maps/word-circle.png", "maps/heads-circle.png", "maps/words.png"} <= set(summary["files"])
    assert np.array_equal(np.asarray(Image.open(out / "image.png")), np.asarray(Image.open(scene_png)))


def test_a_grey_image_is_converted_and_the_conversion_said(tmp_path, scene_png):
    grey = tmp_path / "grey.png"
    Image.open(scene_png).convert("L").save(grey)
    out = tmp_path / "grey"
    result = invoke("daam", PROMPT, "--image", grey, "--samples", 1, "--word", "circle", "--out", out, *FAST[2:],
                    "--steps", 2, "--strength", 1)
    assert result.exit_code == 0, result.output
    assert "note: grey.png converted from mode L to RGB" in result.stderr
    assert json.loads((out / "summary.json").read_text())["image_notes"] == ["converted from mode L to RGB"]


@pytest.mark.parametrize("options, expected", [
    (["--strength", 0], "--strength 0.0 must lie in (0, 1]"),
    (["--strength", 1.5], "--strength 1.5 must lie in (0, 1]"),
    (["--strength", "nan"], "--strength nan must lie in (0, 1]"),
    (["--samples", 0], "--samples 0; use at least 1"),
    (["--num-images", 2], "--num-images does not apply with --image"),
    (["--negative-prompt", "blue"], "--negative-prompt does not apply with --image"),
])
def test_bad_image_options_are_one_line_errors(tmp_path, scene_png, options, expected):
    out = tmp_path / "out"
    assert_one_line_error(invoke("daam", PROMPT, "--image", scene_png, *options, "--out", out, *FAST), out, expected)


def test_unreadable_and_wrongly_shaped_images_are_one_line_errors(tmp_path):
    out = tmp_path / "out"
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert_one_line_error(invoke("daam", PROMPT, "--image", notes, "--out", out, *FAST), out,
                          "cannot read")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(wide)
    assert_one_line_error(invoke("daam", PROMPT, "--image", wide, "--out", out, *FAST), out,
                          "image is 96x64; this model makes 64x64 images")
    assert_one_line_error(invoke("daam", PROMPT, "--image", tmp_path / "absent.png", "--out", out, *FAST), out,
                          "does not exist")


@pytest.mark.parametrize("command, options, expected", [
    (["daam", PROMPT], ["--method", "best"], "Invalid value for '--method': 'best' is not one of"),
    (["daam", PROMPT], ["--strength", 0.5], "--strength is only used with --image"),
    (["daam", PROMPT], ["--top-k", 2], "--top-k is only used with --method selective or weighted"),
    (["daam", PROMPT], ["--method", "weighted", "--top-k", 2], "--top-k is only used with --method selective"),
    (["daam", PROMPT], ["--method", "selective", "--top-k", 41], "--top-k 41 is more than this model's 40 heads"),
    (["daam", PROMPT], ["--method", "selective"], "'a' is in none of this HRV's concepts"),
    (["daam", PROMPT], ["--method", "selective", "--concept", "texture"], "unknown concept 'texture'"),
    (["generate", PROMPT], ["--method", "selective"], "add --daam"),
    (["daam", PROMPT], ["--heads", "3,x"], "give flat head ids separated by commas"),
    (["daam", PROMPT], ["--heads", "3,40"], "--heads 40 is out of range: this model has heads 0..39"),
    (["daam", PROMPT], ["--heads", "3", "--method", "weighted"], "use it with --method daam"),
])
def test_bad_map_options_are_one_line_errors(tmp_path, command, options, expected):
    out = tmp_path / "out"
    assert_one_line_error(invoke(*command, *options, "--out", out, *FAST), out, expected)
