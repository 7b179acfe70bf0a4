"""`headscope hrv build | show | import | weaken` on the tiny pipeline folder; bad input ends in one line, exit 2."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from headscope.hrv import HRV
from headscope_cli.main import cli

ANCHORS = Path(__file__).resolve().parent / "data" / "hrv"  # the official HRV data, Apache-2.0
CONCEPTS = {"name": "tiny", "concepts": {"color": ["red", "blue", "green"], "animal": ["dog", "cat", "giraffe"],
                                         "shape": ["circle", "square"]}}
PROMPTS = "a red dog\na blue circle\n\na cat on the tree\n"


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_one_line_error(result, expected, *absent):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscope: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    for path in absent:
        assert not Path(path).exists(), path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hrv-cli")
    (folder / "tiny.json").write_text(json.dumps(CONCEPTS))
    (folder / "prompts.txt").write_text(PROMPTS)
    return folder


@pytest.fixture(scope="module")
def built(tiny_sd_folder, inputs):
    out = inputs / "tiny.hrv"
    result = invoke("hrv", "build", "--model", tiny_sd_folder, "--concepts", inputs / "tiny.json", "--prompts",
                    inputs / "prompts.txt", "--steps", 1, "--device", "cpu", "--concept", "shape", "--out", out)
    assert result.exit_code == 0, result.output
    return out, result


def test_build_writes_an_hrv_and_prints_the_chosen_concepts_top_heads(built, inputs):
    out, result = built
    hrv = HRV.load(out)
    assert hrv.concepts == ["color", "animal", "shape"] and hrv.meta["n_prompts"] == 3
    assert torch.allclose(hrv.vectors.mean(dim=1), torch.ones(3))
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"wrote {out}: 3 concepts x 22 heads from 3 prompts, 1 steps")
    assert lines[1] == "shape:" and len(lines) == 7 and "(id" in lines[2] and "attn2  head" in lines[2]
    assert not (inputs / "tiny.hrv.partial").exists()


def test_show_prints_top_heads_and_draws_figures(built, tmp_path):
    out, _ = built
    result = invoke("hrv", "show", out, "--top", 3, "--out", tmp_path / "figures")
    assert result.exit_code == 0, result.output
    assert "color:" in result.stdout and "animal:" in result.stdout
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == [
        "hrv-animal.png", "hrv-color.png", "hrv-shape.png", "similarity.png"]


@pytest.mark.parametrize("args, expected", [
    (["--n-prompts", 0], "0 is not in the range x>=1"),
    (["--concept", "texture"], "unknown concept 'texture' in set 'tiny'; known: color, animal, shape"),
])
def test_build_refuses_bad_options_before_loading_anything(inputs, tmp_path, args, expected):
    out = tmp_path / "bad.hrv"
    result = invoke("hrv", "build", "--model", tmp_path / "never-loaded", "--concepts", inputs / "tiny.json",
                    "--out", out, *args)
    assert_one_line_error(result, expected, out, tmp_path / "bad.hrv.partial")


def test_build_refuses_an_empty_concept(tmp_path):
    concepts = tmp_path / "empty.json"
    concepts.write_text(json.dumps({"concepts": {"color": ["red"], "shape": []}}))
    result = invoke("hrv", "build", "--concepts", concepts, "--out", tmp_path / "x.hrv")
    assert_one_line_error(result, "concept 'shape' of 'empty' is empty", tmp_path / "x.hrv")


def test_build_refuses_a_word_outside_the_models_vocabulary(tiny_sd_folder, tmp_path, monkeypatch):
    from headscope.concepts import ConceptSet

    def no_token_for_void(self, tokenizer):
        from headscope.errors import HeadscopeError
        raise HeadscopeError("word 'void' of concept 'color' becomes no token with this model's tokenizer; "
                             "remove it from the concept set")

    monkeypatch.setattr(ConceptSet, "token_ids", no_token_for_void)
    concepts = tmp_path / "void.json"
    concepts.write_text(json.dumps({"concepts": {"color": ["red", "void"]}}))
    out = tmp_path / "void.hrv"
    result = invoke("hrv", "build", "--model", tiny_sd_folder, "--concepts", concepts, "--n-prompts", 1,
                    "--steps", 1, "--device", "cpu", "--prompts", tmp_path / "p.txt", "--out", out)
    assert_one_line_error(result, "cannot read prompts", out)
    (tmp_path / "p.txt").write_text("a red dog\n")
    result = invoke("hrv", "build", "--model", tiny_sd_folder, "--concepts", concepts, "--n-prompts", 1,
                    "--steps", 1, "--device", "cpu", "--prompts", tmp_path / "p.txt", "--out", out)
    assert_one_line_error(result, "word 'void' of concept 'color' becomes no token", out, tmp_path / "void.hrv.partial")


def test_show_refuses_a_corrupt_file(built, tmp_path):
    out, _ = built
    corrupt = tmp_path / "corrupt.hrv"
    corrupt.write_bytes(out.read_bytes()[:100])
    assert_one_line_error(invoke("hrv", "show", corrupt, "--out", tmp_path / "figures"),
                          "is not a readable HRV file", tmp_path / "figures")


@pytest.mark.skipif(not ANCHORS.is_dir(), reason="shared/anchors not present")
def test_import_turns_the_official_array_into_an_hrv_file(tmp_path):
    out = tmp_path / "sd14.hrv"
    result = invoke("hrv", "import", ANCHORS / "hrv_sd_v1_4_34x128.npy", "--layout", "sd15", "--out", out)
    assert result.exit_code == 0, result.output
    assert HRV.load(out).vectors.shape == (34, 128)


def test_import_refuses_a_file_of_the_wrong_layout(tmp_path):
    import numpy as np

    np.save(tmp_path / "small.npy", np.ones((34, 22), dtype=np.float32))
    out = tmp_path / "small.hrv"
    assert_one_line_error(invoke("hrv", "import", tmp_path / "small.npy", "--layout", "sdxl", "--out", out),
                          "layout sdxl expects [34, 1300]", out)


@pytest.fixture(scope="module")
def tiny_clip(tiny_sd, tmp_path_factory):
    from headscope.testing import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tiny_sd.tokenizer)


def test_weaken_writes_table_json_and_curves(built, tiny_sd_folder, tiny_clip, inputs, tmp_path):
    out = tmp_path / "weaken"
    hrv_file, _ = built
    result = invoke("hrv", "weaken", "--concept", "color", "--hrv", hrv_file, "--model", tiny_sd_folder, "--k", "0,5",
                    "--seeds", "0", "--order", "morhf,lerhf", "--prompts", inputs / "prompts.txt", "--clip", tiny_clip,
                    "--steps", 1, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == ["weakening.csv", "weakening.json", "weakening.png"]
    header, *rows = (out / "weakening.csv").read_text().splitlines()
    assert header == "order,k,concept,role,mean,n" and rows[0].startswith("morhf,0,color,weakened,")
    payload = json.loads((out / "weakening.json").read_text())
    assert payload["settings"]["ks"] == [0, 5] and payload["settings"]["metric"] == "CLIP similarity"
    assert "color (weakened)" in result.stdout


def test_weaken_refuses_an_hrv_of_another_model(tiny_sd_folder, tmp_path):
    import numpy as np

    np.save(tmp_path / "sd.npy", np.ones((34, 128), dtype=np.float32))
    HRV.from_official(tmp_path / "sd.npy", "sd15").save(tmp_path / "sd.hrv")
    out = tmp_path / "weaken"
    result = invoke("hrv", "weaken", "--concept", "Color", "--hrv", tmp_path / "sd.hrv", "--model", tiny_sd_folder,
                    "--clip", tmp_path, "--device", "cpu", "--out", out)
    assert_one_line_error(result, "rebuild with `headscope hrv build --model", out)


def test_weaken_refuses_an_unknown_concept_and_order(built, tmp_path):
    hrv_file, _ = built
    out = tmp_path / "weaken"
    assert_one_line_error(invoke("hrv", "weaken", "--concept", "texture", "--hrv", hrv_file, "--out", out),
                          "unknown concept 'texture'; this HRV has: color, animal, shape", out)
    assert_one_line_error(invoke("hrv", "weaken", "--concept", "color", "--order", "best", "--hrv", hrv_file,
                                 "--out", out), "unknown order(s) best", out)
