"""`headscope edit` (prompt-to-prompt, P2P-HRV) on a tiny pipeline folder and a random HRV file."""
import json

import pytest
from PIL import Image

from headscope.steer.edit import DEFAULT_CROSS, DEFAULT_SELF
from headscope.testing import MAX_TOKENS, random_hrv
from test_cli import FAST, assert_one_line_error, invoke

SOURCE, TARGET = "a red circle and a blue square", "a green circle and a blue square"


@pytest.fixture(scope="module")
def hrv_file(tiny_sd, tmp_path_factory):
    return random_hrv(tiny_sd).save(tmp_path_factory.mktemp("hrv") / "tiny.hrv")


def edit(folder, out, *args, source=SOURCE, target=TARGET):
    return invoke("edit", source, target, "--model", folder, "--out", out, *FAST, *args)


def test_edit_writes_both_images_the_comparison_and_the_settings(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = edit(tiny_sd_folder, out, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["comparison.png", "edited.png", "run.json", "source.png"]
    assert str(out / "comparison.png") in result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["source_prompt"], run["target_prompt"], run["seed"], run["steps"]) == (SOURCE, TARGET, 3, 2)
    assert (run["cross_steps"], run["self_steps"]) == (DEFAULT_CROSS, DEFAULT_SELF)
    assert (run["method"], run["swapped"], run["swapped_in"], run["concept"]) == ("p2p", "source", ["green"], None)
    assert run["model"] == str(tiny_sd_folder) and run["stored_bytes"] > 0
    source, edited = Image.open(out / "source.png"), Image.open(out / "edited.png")
    assert source.size == edited.size and source.tobytes() != edited.tobytes()
    assert Image.open(out / "comparison.png").size[0] > 2 * source.size[0]
    assert not [path for path in tmp_path.iterdir() if ".staging-" in path.name]


def test_edit_without_injection_differs_from_the_default_edit(tiny_sd_folder, tmp_path):
    default, none = tmp_path / "default", tmp_path / "none"
    assert edit(tiny_sd_folder, default).exit_code == 0
    assert edit(tiny_sd_folder, none, "--cross-steps", 0, "--self-steps", 0).exit_code == 0
    assert json.loads((none / "run.json").read_text())["stored_bytes"] == 0
    assert Image.open(default / "source.png").tobytes() == Image.open(none / "source.png").tobytes()
    assert Image.open(default / "edited.png").tobytes() != Image.open(none / "edited.png").tobytes()


def test_p2p_hrv_records_concept_strength_and_hrv(tiny_sd_folder, hrv_file, tmp_path):
    plain, out = tmp_path / "plain", tmp_path / "run"  # strength 0: factors 1, the swapped word keeps its map
    assert edit(tiny_sd_folder, plain, "--cross-steps", 1, "--concept", "color", "--strength", 0,
                "--hrv", hrv_file).exit_code == 0
    result = edit(tiny_sd_folder, out, "--cross-steps", 1, "--concept", "color", "--strength", 1.5,
                  "--hrv", hrv_file)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["method"], run["concept"], run["strength"], run["hrv"]) == ("p2p-hrv", "color", 1.5, str(hrv_file))
    assert run["swapped"] == "own" and run["swapped_in"] == ["green"]
    assert Image.open(plain / "edited.png").tobytes() != Image.open(out / "edited.png").tobytes()


@pytest.mark.parametrize("source, target, args, expected", [
    (SOURCE, TARGET, ["--cross-steps", "1.5"], "Invalid value for '--cross-steps'"),
    (SOURCE, TARGET, ["--self-steps", "-0.1"], "Invalid value for '--self-steps'"),
    (SOURCE, TARGET, ["--strength", "strong"], "Invalid value for '--strength'"),
    (SOURCE, TARGET, ["--concept", "texture", "--hrv", "HRV"], "unknown concept 'texture'"),
    (SOURCE, TARGET, ["--concept", "color"], "no default HRV for this model"),
    (SOURCE, TARGET, ["--concept", "color", "--hrv", "missing.hrv"], "no HRV file at"),
    (SOURCE, TARGET, ["--hrv", "HRV"], "--hrv is only used with --concept"),
    (SOURCE, TARGET, ["--strength", "2"], "--strength is only used with --concept"),
    (SOURCE, "A red circle and a blue square", [], "the two prompts have the same words"),
    (SOURCE, "a dog " * MAX_TOKENS, [], f"the text encoder takes at most {MAX_TOKENS}"),
    ("a red circle", "a circle", ["--concept", "color", "--hrv", "HRV"], "it only drops words"),
    (SOURCE, TARGET, ["--model", "MISSING"], "does not exist"),
])
def test_bad_edit_input_is_a_one_line_error_and_writes_nothing(tiny_sd_folder, hrv_file, tmp_path, source, target,
                                                               args, expected):
    out = tmp_path / "run"
    args = [str(hrv_file) if arg == "HRV" else str(tmp_path / arg) if arg.endswith(".hrv") or arg == "MISSING"
            else arg for arg in args]
    assert_one_line_error(edit(tiny_sd_folder, out, *args, source=source, target=target), out, expected)


def test_help_lists_edit_with_examples():
    top = invoke("--help")
    assert top.exit_code == 0 and "edit" in top.output and "headscope edit" in top.output
    result = invoke("edit", "--help")
    assert result.exit_code == 0
    assert all(option in result.output for option in ("--cross-steps", "--self-steps", "--concept", "--strength",
                                                      "--hrv", "Examples:"))
