"""The headscope command line on a tiny pipeline folder written with save_pretrained."""
import json

import pytest
from click.testing import CliRunner

from headscope.testing import MAX_TOKENS
from headscope_cli.main import cli

FAST = ["--steps", "2", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_one_line_error(result, out, expected):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscope: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [path for path in out.parent.iterdir() if ".staging-" in path.name]


def test_heads_prints_the_index_as_a_table(tiny_sd_folder):
    result = invoke("heads", "--model", tiny_sd_folder)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("7 cross-attention layers, 22 heads, latent 8×8, fingerprint ")
    assert lines[1].split() == ["layer", "name", "block", "level", "resolution", "heads", "head_dim", "flat", "ids"]
    assert lines[5].split() == ["2", "mid_block.attentions.0.transformer_blocks.0.attn2", "mid", "1", "4×4", "4",
                                "16", "6-9"]


def test_heads_json_is_the_layout(tiny_sd_folder):
    result = invoke("heads", "--model", tiny_sd_folder, "--json")
    layout = json.loads(result.output)
    assert [layer["heads"] for layer in layout["layers"]] == [2, 4, 4, 4, 4, 2, 2]


def test_generate_with_daam_writes_image_maps_and_summary(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", "a red giraffe and a dog", "--model", tiny_sd_folder, "--daam", "--seed", 3,
                    "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompt"], summary["seed"], summary["steps"]) == ("a red giraffe and a dog", 3, 2)
    assert summary["model"] == str(tiny_sd_folder) and summary["heads"]["heads"] == 22
    assert {"image.png", "maps/words.png", "maps/word-giraffe.png", "summary.json"} <= set(summary["files"])
    assert all((out / name).is_file() for name in summary["files"])
    assert sorted(summary["words"]) == ["a", "and", "dog", "giraffe", "red"]
    assert summary["words"]["giraffe"][0]["tokens"] == [3, 4] and summary["words"]["dog"][0]["max"] > 0


def test_generate_without_daam_writes_only_images_and_summary(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", "a dog", "--model", tiny_sd_folder, "--num-images", 2, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["image-0.png", "image-1.png", "summary.json"]


def test_daam_draws_the_chosen_words_and_head_grids(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke("daam", "a red giraffe and a dog", "--word", "giraffe", "--word", "Dog", "--model",
                    tiny_sd_folder, "--out", out, "--window", "0:0.5", *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in (out / "maps").iterdir()) == [
        "heads-dog.png", "heads-giraffe.png", "word-dog.png", "word-giraffe.png", "words.png"]


def test_a_second_run_into_an_existing_folder_replaces_its_files(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert invoke("generate", "a dog", "--model", tiny_sd_folder, "--out", out, *FAST).exit_code == 0
    assert sorted(path.name for path in out.iterdir()) == ["image.png", "keep.txt", "summary.json"]


@pytest.mark.parametrize("args, expected", [
    (["--guidance", "-1"], "Invalid value for '--guidance'"),
    (["--steps", "0"], "Invalid value for '--steps'"),
    (["--window", "0.5:0.2"], "Invalid value for '--window'"),
    (["--dtype", "fp8"], "Invalid value for '--dtype'"),
    (["--bogus"], "No such option '--bogus'"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, expected):
    out = tmp_path / "run"
    assert_one_line_error(invoke("generate", "a dog", "--out", out, *args), out, expected)


def test_unknown_word_exits_2_before_generating(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke("daam", "a red dog", "--word", "zebra", "--model", tiny_sd_folder, "--out", out, *FAST)
    assert_one_line_error(result, out, "'zebra' is not in the prompt 'a red dog'; its words are: a, red, dog")


def test_long_prompt_exits_2(tiny_sd_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke("generate", "a dog " * MAX_TOKENS, "--model", tiny_sd_folder, "--daam", "--out", out, *FAST)
    assert_one_line_error(result, out, f"the text encoder takes at most {MAX_TOKENS}")


def test_unreadable_model_folders_exit_2(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    out = tmp_path / "run"
    assert_one_line_error(invoke("generate", "a dog", "--model", broken, "--out", out), out, "not valid JSON")
    assert_one_line_error(invoke("generate", "a dog", "--model", tmp_path / "missing", "--out", out), out,
                          "does not exist")
    assert_one_line_error(invoke("heads", "--model", broken), out, "has no unet/config.json")


def test_help_lists_the_commands_with_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    assert all(command in result.output for command in ("generate", "daam", "heads", "Examples:"))
