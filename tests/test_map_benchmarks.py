"""The benchmarks of maps and of the model: daam_segmentation, position_probe and vae_reconstruction run end to end."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:  # as `python benchmarks/NAME.py` has it, for `import harness`
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_daam_benchmark_scores_heads_levels_and_heldout_head_choices(tmp_path):
    benchmark = _load("daam_segmentation")
    out = tmp_path / "daam.json"
    benchmark.main(["--tiny", "--n-single", "4", "--n-pair", "1", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["prompts"] == 5 and result["seeds"] == [0, 1]
    for role, entry in result["heads"].items():
        assert len(entry["head_pointing"]) == 8  # the tiny shapes architecture: 8 heads
        assert all(0.0 <= value <= 1.0 for value in entry["head_pointing"])
        assert entry["best_head_pointing"] == max(entry["head_pointing"])
        assert set(entry["level_pointing"]) and "top4_heads_heldout_pointing" in entry
    assert not any("_heads" in record for record in result["records"])


def test_pointing_counts_a_hit_only_inside_the_mask():
    benchmark = _load("daam_segmentation")
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 1], maps[1, 3, 3] = 1.0, 1.0
    target = torch.zeros(4, 4, dtype=torch.bool).numpy()
    target[1, 1] = True
    assert benchmark._pointing(maps, target) == [1, 0]


def test_position_probe_reports_where_each_seed_put_the_object(tmp_path):
    from headscope.shapes.model import random_pipeline

    folder = tmp_path / "model"
    random_pipeline().save_pretrained(folder)
    out = tmp_path / "probe.json"
    _load("position_probe").main(["--model", str(folder), "--seeds", "2", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["follows_word"]) == {"left", "right", "top", "bottom", "center"}
    assert all(len(drawn) == 2 for drawn in result["drawn"].values())
    matrix = result["text_encoder_relative_distance"]["output"]
    assert len(matrix) == 5 and all(abs(matrix[i][i]) < 1e-3 for i in range(5))
    assert min(result["text_encoder_relative_distance"]["input_embedding"][0][1:]) > 0
    assert 0.0 <= result["same_place_for_every_edge_word"] <= 1.0


def test_vae_reconstruction_benchmark_scores_clean_and_rebuilt_scenes(tmp_path):
    from headscope.shapes.model import random_pipeline

    folder = tmp_path / "model"
    random_pipeline().save_pretrained(folder)
    out = tmp_path / "vae.json"
    _load("vae_reconstruction").main(["--model", str(folder), "--n", "4", "--batch", "3", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert summary["clean"]["shape"] == 1.0 and summary["clean"]["color"] == 1.0  # the annotator on renders
    assert 0.0 <= summary["reconstructed"]["shape"] <= 1.0
    assert summary["reconstructed"]["shape_by_shape"]


def test_daam_benchmark_tells_which_object_of_a_pair_a_word_describes():
    from headscope.shapes.world import ObjectSpec, Scene

    benchmark = _load("daam_segmentation")
    objects = [ObjectSpec("circle", "red", "large", "left"), ObjectSpec("circle", "blue", "large", "right")]
    pair = Scene(objects, "a red circle on the left and a blue circle on the right", "pair", {})
    assert benchmark._context(pair, "circle", 0) == "pair, first"
    assert benchmark._context(pair, "circle", 1) == "pair, second"
    assert benchmark._context(pair, "blue", 0) == "pair, second"
    assert benchmark._context(Scene(objects[:1], "a red circle", "single", {}), "circle", 0) == "one object"
