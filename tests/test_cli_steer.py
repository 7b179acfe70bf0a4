"""`headscope generate` with steering options on a tiny pipeline folder and a random HRV file."""
import json

import pytest
import torch

from headscope.hrv import HRV
from headscope.testing import random_hrv
from headscope_cli.steer import plan_steering
from test_cli import FAST, assert_one_line_error, invoke

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def hrv_file(tiny_sd, tmp_path_factory):
    return random_hrv(tiny_sd).save(tmp_path_factory.mktemp("hrv") / "tiny.hrv")


def generate(folder, out, *args):
    return invoke("generate", PROMPT, "--model", folder, "--out", out, *FAST, *args)


def test_strengthen_and_adjust_run_and_are_summarised(tiny_sd_folder, hrv_file, tmp_path):
    out = tmp_path / "run"
    result = generate(tiny_sd_folder, out, "--strengthen", "red=color:1.5", "--adjust", "circle=+shape,-color:3,0.5",
                      "--hrv", hrv_file, "--steer-steps", "0:0.5")
    assert result.exit_code == 0, result.output
    steering = json.loads((out / "summary.json").read_text())["steering"]
    assert steering["strengthen"] == [{"token": "red", "concept": "color", "scale": 1.5}]
    assert steering["adjust"] == [{"token": "circle", "desired": "shape", "undesired": "color", "a": 3.0, "b": 0.5,
                                   "clamp": None}]
    assert steering["steps"] == [0.0, 0.5]


def test_adjust_clamp_is_summarised(tiny_sd_folder, hrv_file, tmp_path):
    out = tmp_path / "run"
    result = generate(tiny_sd_folder, out, "--adjust", "circle=+shape,-color", "--adjust-clamp", "1.2", "--hrv",
                      hrv_file)
    assert result.exit_code == 0, result.output
    adjust = json.loads((out / "summary.json").read_text())["steering"]["adjust"]
    assert adjust == [{"token": "circle", "desired": "shape", "undesired": "color", "a": 2.0, "b": 1.0, "clamp": 1.2}]


def test_adjust_clamp_clips_both_hrvs_before_the_formula(tiny_sd, hrv_file):
    hrv = HRV.load(hrv_file)
    shape, color = hrv.vector("shape"), hrv.vector("color")
    clamp = float(torch.cat([shape, color]).median())
    options = dict(strengthen=[], adjust=[("circle", "shape", "color", 2.0, 1.0)], hrv_file=str(hrv_file),
                   steer_steps=None, neglect=None, subjects=None)
    plain = plan_steering(tiny_sd, PROMPT, **options).hooks[0].entries[0].factors
    clamped_plan = plan_steering(tiny_sd, PROMPT, **options, adjust_clamp=clamp)
    clamped = clamped_plan.hooks[0].entries[0].factors
    assert torch.allclose(plain, 2 * shape - color)
    assert torch.allclose(clamped, 2 * shape.clamp(max=clamp) - color.clamp(max=clamp))
    assert not torch.allclose(clamped, plain)
    assert clamped_plan.summary["adjust"][0]["clamp"] == clamp


def test_steering_with_daam_draws_maps_of_the_steered_run(tiny_sd_folder, hrv_file, tmp_path):
    out = tmp_path / "run"
    result = generate(tiny_sd_folder, out, "--strengthen", "red=color", "--hrv", hrv_file, "--daam")
    assert result.exit_code == 0, result.output
    assert (out / "maps" / "word-red.png").is_file()


def test_attend_and_excite_logs_its_updates(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = generate(tiny_sd_folder, out, "--mitigate-neglect", "ae", "--subjects", "circle,square")
    assert result.exit_code == 0, result.output
    neglect = json.loads((out / "summary.json").read_text())["steering"]["neglect"]
    assert neglect["method"] == "ae" and sorted(neglect["subjects"]) == ["circle", "square"]
    assert [entry["step"] for entry in neglect["log"]] == [0]


@pytest.mark.parametrize("method", ["ae-hrv", "heads"])
def test_hrv_neglect_methods_find_subjects_and_concepts_themselves(tiny_sd_folder, hrv_file, tmp_path, method):
    out = tmp_path / "run"
    result = generate(tiny_sd_folder, out, "--mitigate-neglect", method, "--hrv", hrv_file)
    assert result.exit_code == 0, result.output
    assert (out / "image.png").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--strengthen", "red"], "TOKEN=CONCEPT"),
    (["--strengthen", "red=color:strong"], "TOKEN=CONCEPT"),
    (["--adjust", "red=color,shape"], "TOKEN=+DESIRED,-UNDESIRED"),
    (["--adjust", "red=+color,-shape:2"], "TOKEN=+DESIRED,-UNDESIRED"),
    (["--adjust", "red=+color,-shape", "--adjust-clamp", "0"], "Invalid value for '--adjust-clamp'"),
    (["--adjust", "red=+color,-shape", "--adjust-clamp", "-1"], "Invalid value for '--adjust-clamp'"),
    (["--adjust-clamp", "9"], "--adjust-clamp needs --adjust"),
    (["--strengthen", "red=color", "--adjust-clamp", "9", "--hrv", "HRV"], "--adjust-clamp needs --adjust"),
    (["--strengthen", "red=color", "--steer-steps", "0.5:1.5"], "0 <= START < END <= 1"),
    (["--strengthen", "red=color", "--steer-steps", "half"], "START:END"),
    (["--mitigate-neglect", "excite"], "'excite' is not one of"),
    (["--mitigate-neglect", "ae", "--subjects", "circle=,square"], "bad subject"),
    (["--strengthen", "giraffe=color", "--hrv", "HRV"], "'giraffe' is not in the prompt"),
    (["--strengthen", "red=texture", "--hrv", "HRV"], "unknown concept 'texture'"),
    (["--adjust", "red=+color,-texture", "--hrv", "HRV"], "unknown concept 'texture'"),
    (["--strengthen", "red=color"], "no default HRV for this model"),
    (["--strengthen", "red=color", "--hrv", "missing.hrv"], "no HRV file at"),
    (["--subjects", "circle"], "--subjects needs --mitigate-neglect"),
    (["--mitigate-neglect", "heads", "--subjects", "circle", "--hrv", "HRV", "--steer-steps", "1:0"], "START"),
    (["--mitigate-neglect", "ae", "--subjects", "dog"], "'dog' is not in the prompt"),
])
def test_bad_steering_options_are_one_line_errors(tiny_sd_folder, hrv_file, tmp_path, args, expected):
    out = tmp_path / "run"
    args = [str(hrv_file) if arg == "HRV" else str(tmp_path / arg) if arg.endswith(".hrv") else arg for arg in args]
    assert_one_line_error(generate(tiny_sd_folder, out, *args), out, expected)
