"""The headscope command line on tiny SD3 and Flux pipeline folders written with save_pretrained."""
import json

import pytest
from click.testing import CliRunner

from headscope_cli.main import cli

FAST = ["--steps", "1", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def test_heads_lists_joint_blocks_from_the_config_alone(sd3_folder, flux_folder):
    sd3 = invoke("heads", "--model", sd3_folder)
    assert sd3.exit_code == 0, sd3.output
    assert sd3.output.splitlines()[0].startswith("3 joint-attention layers, 6 heads, latent 8×8, fingerprint ")
    flux = invoke("heads", "--model", flux_folder, "--json")
    layout = json.loads(flux.output)["layers"]
    assert [(layer["block"], layer["kind"]) for layer in layout] == [("double", "joint")] * 2 + [("single", "single")] * 2


def test_daam_on_flux_writes_t5_word_maps_and_head_grids(flux_folder, tmp_path):
    out = tmp_path / "flux"
    result = invoke("daam", "a red giraffe and a dog", "--model", flux_folder, "--word", "giraffe", "--out", out,
                    "--guidance", 3.5, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"]["heads"] == 8 and summary["words"]["giraffe"][0]["tokens"] == [2, 3]  # T5: no start token
    assert {"maps/word-giraffe.png", "maps/heads-giraffe.png", "maps/words.png"} <= set(summary["files"])


def test_generate_daam_on_sd3_maps_clip_tokens(sd3_folder, tmp_path):
    out = tmp_path / "sd3"
    result = invoke("generate", "a red giraffe and a dog", "--model", sd3_folder, "--daam", "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["words"]["giraffe"][0]["tokens"] == [3, 4] and summary["words"]["dog"][0]["max"] > 0


def test_a_word_absent_from_the_prompt_is_one_line(flux_folder, tmp_path):
    result = invoke("daam", "a red dog", "--model", flux_folder, "--word", "cat", "--out", tmp_path / "x", *FAST)
    assert result.exit_code == 2 and "'cat' is not in the prompt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_an_unknown_model_family_is_one_line_naming_the_supported_ones(sd3_folder, tmp_path):
    folder = tmp_path / "other"
    (folder / "transformer").mkdir(parents=True)
    config = json.loads((sd3_folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "PixArtTransformer2DModel"}))
    result = invoke("heads", "--model", folder)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "PixArtTransformer2DModel" in line
    assert all(name in line for name in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"))


@pytest.mark.parametrize("command", [["edit", "a red dog", "a blue dog"]])
def test_unet_only_features_refuse_joint_models_in_one_line(flux_folder, tmp_path, command):
    result = invoke(*command, "--model", flux_folder, "--out", tmp_path / "x")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "on UNet models (SD 1.x / 2.x / XL) for now" in line and "FluxTransformer2DModel" in line
