"""The benchmarks of maps and of the model: daam_segmentation (both shapes models), position_probe and
vae_reconstruction run end to end."""
import json

import numpy as np
import pytest
import torch

import headscope
from headscope.maps import daam, metrics
from headscope.testing import generate, random_hrv


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, load_benchmark):
    """One smoke run of daam_segmentation on the tiny pipeline: (its JSON, its folder)."""
    folder = tmp_path_factory.mktemp("daam")
    load_benchmark("daam_segmentation").main([
        "--tiny", "--n-single", "4", "--n-pair", "1", "--cal-single", "2", "--cal-pair", "1", "--steps", "4",
        "--strengths", "0.5,1", "--samples", "1", "--image-cal", "2", "--image-heldout", "2",
        "--out", str(folder / "daam.json")])
    return json.loads((folder / "daam.json").read_text()), folder


def test_daam_benchmark_scores_heads_levels_and_heldout_head_choices(tiny_run):
    result, folder = tiny_run
    assert result["prompts"] == 5 and result["seeds"] == [0, 1]
    for role, entry in result["heads"].items():
        assert len(entry["head_pointing"]) == 8  # the tiny shapes architecture: 8 heads
        assert all(0.0 <= value <= 1.0 for value in entry["head_pointing"])
        assert entry["best_head_pointing"] == max(entry["head_pointing"])
        assert set(entry["level_pointing"]) and "top4_heads_heldout_pointing" in entry
    assert not any("_heads" in record or "maps" in record for record in result["records"])
    assert (folder / "daam_methods.png").is_file()


def test_daam_benchmark_fits_on_calibration_and_scores_every_method_on_heldout_rendered_scenes(tiny_run):
    result, _ = tiny_run
    splits = result["splits"]
    assert set(splits["calibration"]["seeds"]).isdisjoint(splits["heldout"]["seeds"])
    rendered = result["image_maps"]
    assert rendered["heldout_strengths"] and set(rendered["heldout_strengths"]) <= {0.5, 1.0}
    nouns = rendered["methods"]["shape"]  # the renderer's masks: every rendered noun is scored
    assert set(nouns) == {"daam", "selective", "weighted", "fitted", "oracle"}
    assert nouns["oracle"]["chosen_on"] == "heldout (oracle)" and nouns["fitted"]["chosen_on"] == "calibration"
    for entry in nouns.values():
        held, config = entry["heldout"], entry["config"]
        assert held["n"] >= 2 and 0.0 <= held["miou@0.4"] <= 1.0 and 0.0 <= held["mean_threshold_ap"] <= 1.0
        assert config["view"].startswith(("s=0.5/", "s=1.0/")) and 0.2 <= config["tau_fit"] <= 0.8
    assert len(nouns["selective"]["config"]["heads"]) == nouns["selective"]["config"]["k"]
    assert "noun_miou@0.4" in result["goals"]


@pytest.fixture(scope="module")
def side_by_side_run(tmp_path_factory, load_benchmark):
    """One smoke run of daam_segmentation on both tiny models, UNet and SD3-style: (its JSON, its stdout)."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("daam-models") / "daam.json", io.StringIO()
    with contextlib.redirect_stdout(printed):
        load_benchmark("daam_segmentation").main([
            "--tiny", "--models", "shapes,shapes-mmdit", "--n-single", "5", "--n-pair", "1", "--cal-single", "2",
            "--cal-pair", "1", "--steps", "2", "--seeds", "0", "--cal-seeds", "1", "--image-cal", "0",
            "--out", str(out)])
    return json.loads(out.read_text()), printed.getvalue(), out.parent


def test_daam_benchmark_writes_a_figure_per_model_the_joint_one_with_its_concept_maps(side_by_side_run):
    from PIL import Image

    folder = side_by_side_run[2]
    figures = sorted(path.name for path in folder.glob("*.png"))
    assert figures == ["daam_methods.png", "daam_methods_shapes-mmdit.png"]
    width, height = Image.open(folder / "daam_methods_shapes-mmdit.png").size
    assert width > 600 and height > 200


def test_daam_benchmark_keeps_the_unets_keys_and_puts_the_joint_model_under_models(side_by_side_run):
    result, printed, _ = side_by_side_run
    assert "build_tiny_shapes" in result["model"] and "summary" in result and "records" in result
    assert not any("concept" in methods for methods in result["methods"].values())
    joint = result["models"]["shapes-mmdit"]
    assert "random_mmdit_pipeline" in joint["model"] and joint["call_options"] == {"max_sequence_length": 24}
    assert joint["image_maps"] is None and len(joint["heads"]["shape"]["head_pointing"]) == 4  # 2 blocks x 2 heads
    assert not any("concept_maps" in record or "maps" in record for record in joint["records"])
    assert "shapes-mmdit  concept" in printed and "shapes        daam" in printed  # one side-by-side table


def test_daam_benchmark_fits_the_joint_models_concept_maps_on_calibration_and_scores_them_held_out(side_by_side_run):
    joint = side_by_side_run[0]["models"]["shapes-mmdit"]
    nouns = joint["methods"]["shape"]
    assert {"daam", "selective", "weighted", "fitted", "oracle", "concept"} <= set(nouns)
    concept = nouns["concept"]
    assert concept["chosen_on"] == "calibration" and concept["config"]["view"] in ("all", "0.5:1", "0.75:1")
    held = concept["heldout"]
    assert held["n"] == nouns["daam"]["heldout"]["n"] >= 1  # the same words, from the same traces
    assert 0.0 <= held["miou@fit"] <= 1.0 and 0.0 <= held["mean_threshold_miou"] <= 1.0
    assert joint["concept_maps"]["layers"] == ["transformer_blocks.1.attn"]  # the later half of 2 blocks


def test_the_benchmarks_concept_maps_average_as_the_librarys_and_a_roles_softmax_is_over_its_concepts(
        tiny_sd3, load_benchmark):
    from headscope.maps.concepts import default_layers
    from headscope.maps.daam import _upsample
    from headscope.testing_joint import generate_joint

    daam_joint = load_benchmark("daam_joint")
    targets = [("red", "color", 0, []), ("circle", "shape", 0, []), ("square", "shape", 0, [])]
    stream, roles = daam_joint.concept_stream(tiny_sd3, targets)
    assert stream.entries == ["red", "circle", "square", "background"]
    with headscope.trace(tiny_sd3, concepts=stream, keep_steps=True) as tc:
        generate_joint(tiny_sd3, "a red circle and a blue square", steps=3)
    every = stream.readers[0]  # the library's reader, over every carried word
    for steps in (None, (0.5, 1.0)):
        native = daam_joint.concept_native(tc, every, stream.entries, "square", 0, steps)
        expected = tc.concept_maps(["square"], steps=steps)[0]
        assert torch.allclose(_upsample(native[None], tc.image_size, "bicubic")[0], expected, atol=1e-5)
    concepts, shapes = roles["shape"]
    assert concepts == ["circle", "square", "background"]
    layer = default_layers(tc.index)[0]
    ours, library = shapes.per_step[layer][1][0], every.per_step[layer][1][0]  # [concepts, h, w], step 1
    assert torch.allclose(ours.sum(dim=0), torch.ones_like(ours[0]), atol=1e-5)  # a softmax over the role's own
    assert torch.allclose(ours[0] / ours[1], library[1] / library[2], rtol=1e-4)  # of the same scores


def test_overlapping_calibration_and_heldout_seeds_are_refused(tmp_path, capsys, load_benchmark):
    benchmark = load_benchmark("daam_segmentation")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--tiny", "--seeds", "0,1", "--cal-seeds", "1,2", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and "overlap" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [(["--models", "shapes,sd3"], "give embedded models"),
                                           (["--model", "folder", "--models", "shapes-mmdit"], "one or the other")])
def test_models_that_are_not_embedded_or_that_clash_with_model_are_refused(tmp_path, capsys, argv, message,
        load_benchmark):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("daam_segmentation").main([*argv, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_pointing_counts_a_hit_only_inside_the_mask(load_benchmark):
    benchmark = load_benchmark("daam_segmentation")
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 1], maps[1, 3, 3] = 1.0, 1.0
    target = torch.zeros(4, 4, dtype=torch.bool).numpy()
    target[1, 1] = True
    assert benchmark._pointing(maps, target) == [1, 0]


def test_position_probe_reports_where_each_seed_put_the_object(tmp_path, load_benchmark):
    from headscope.shapes.model import random_pipeline

    folder = tmp_path / "model"
    random_pipeline().save_pretrained(folder)
    out = tmp_path / "probe.json"
    load_benchmark("position_probe").main(["--model", str(folder), "--seeds", "2", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["follows_word"]) == {"left", "right", "top", "bottom", "center"}
    assert all(len(drawn) == 2 for drawn in result["drawn"].values())
    matrix = result["text_encoder_relative_distance"]["output"]
    assert len(matrix) == 5 and all(abs(matrix[i][i]) < 1e-3 for i in range(5))
    assert min(result["text_encoder_relative_distance"]["input_embedding"][0][1:]) > 0
    assert 0.0 <= result["same_place_for_every_edge_word"] <= 1.0


def test_vae_reconstruction_benchmark_scores_clean_and_rebuilt_scenes(tmp_path, load_benchmark):
    from headscope.shapes.model import random_pipeline

    folder = tmp_path / "model"
    random_pipeline().save_pretrained(folder)
    out = tmp_path / "vae.json"
    load_benchmark("vae_reconstruction").main(["--model", str(folder), "--n", "4", "--batch", "3", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert summary["clean"]["shape"] == 1.0 and summary["clean"]["color"] == 1.0  # the annotator on renders
    assert 0.0 <= summary["reconstructed"]["shape"] <= 1.0
    assert summary["reconstructed"]["shape_by_shape"]


def test_daam_benchmark_tells_which_object_of_a_pair_a_word_describes(load_benchmark):
    from headscope.shapes.world import ObjectSpec, Scene

    benchmark = load_benchmark("daam_segmentation")
    objects = [ObjectSpec("circle", "red", "large", "left"), ObjectSpec("circle", "blue", "large", "right")]
    pair = Scene(objects, "a red circle on the left and a blue circle on the right", "pair", {})
    assert benchmark._context(pair, "circle", 0) == "pair, first"
    assert benchmark._context(pair, "circle", 1) == "pair, second"
    assert benchmark._context(pair, "blue", 0) == "pair, second"
    assert benchmark._context(Scene(objects[:1], "a red circle", "single", {}), "circle", 0) == "one object"


# -- the metrics, on examples small enough to check by hand ------------------------------------

MAP = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
TRUTH = np.array([[False, True], [False, True]])


def test_pointing_is_a_hit_when_the_first_maximum_lies_in_the_mask():
    assert metrics.pointing(MAP, TRUTH)
    assert not metrics.pointing(MAP, ~TRUTH)
    ties = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert metrics.pointing(ties, np.array([[True, False], [False, False]]))  # row-major: the first of equal maxima


def test_daam_iou_normalises_then_thresholds_at_tau():
    # normalised [[0, .25], [.75, 1]]: at 0.4 the bottom row; truth is the right column: 1 shared of 3
    assert metrics.daam_iou(MAP, TRUTH, 0.4) == pytest.approx(1 / 3)
    assert metrics.daam_iou(MAP, TRUTH, 0.2) == pytest.approx(2 / 3)  # adds the top-right pixel
    assert metrics.daam_iou(MAP, TRUTH, 0.4) == metrics.iou(daam.threshold(MAP, 0.4).numpy(), TRUTH)


def test_mean_threshold_gives_pixel_accuracy_foreground_background_miou_and_average_precision():
    scores = metrics.mean_threshold(MAP, TRUTH)
    # mean 2: predicted = bottom row; right on (0, 0) and (1, 1) of 4 pixels
    assert scores["pixel_accuracy"] == pytest.approx(0.5)
    # foreground IoU 1/3 (the bottom row vs the right column), background IoU 1/3 (top row vs left column)
    assert scores["miou"] == pytest.approx(1 / 3)
    # ranked 4 (hit), 3, 1 (hit), 0: precision 1 at recall 0.5, 2/3 at recall 1
    assert scores["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_the_stacked_scores_equal_the_single_ones():
    maps = torch.stack([MAP, MAP.flip(0), torch.ones(2, 2)])
    ious = metrics.daam_iou_stack(maps, TRUTH, (0.3, 0.4))
    assert ious.shape == (3, 2) and ious[2].tolist() == [0.0, 0.0]  # a flat map normalises to zeros
    assert ious[1, 1] == pytest.approx(metrics.daam_iou(MAP.flip(0), TRUTH, 0.4))
    assert metrics.pointing_stack(maps[:2], TRUTH).tolist() == [True, True]


def test_the_benchmarks_method_maps_equal_the_librarys(tiny_sd, load_benchmark):
    map_fit = load_benchmark("map_fit")
    hrv = random_hrv(tiny_sd, {"color": ["red"], "shape": ["circle"], "size": ["big"], "position": ["left"]})
    with headscope.trace(tiny_sd, keep_steps=True) as tc:
        generate(tiny_sd, "a red circle on the left", steps=4)
    native = map_fit.native_maps(tc, "circle", 0, 0, (0.5, 1.0))
    heads = map_fit.head_stack(native, tc.image_size, "bicubic")
    assert torch.allclose(heads, tc.head_maps("circle", steps=(0.5, 1.0), size=tc.image_size))
    fit = map_fit.Fit(hrv, tc.index.n_heads, ["late"], tc.image_size, "bicubic")
    found = {(method, k): weights for method, k, weights in fit.candidates("shape", "late")}
    for (method, k), options in [(("daam", None), {}), (("selective", 4), {"method": "selective", "k": 4}),
                                 (("weighted", None), {"method": "weighted"})]:
        expected = tc.word_map("circle", steps=(0.5, 1.0), hrv=hrv, concept="shape", **options)
        assert torch.allclose(map_fit.method_map(found[method, k], heads), expected, atol=1e-6)


def test_fit_picks_the_view_and_k_with_the_best_calibration_miou_and_its_best_tau(load_benchmark):
    map_fit = load_benchmark("map_fit")
    fit = map_fit.Fit(None, 8, ["all", "late"], (4, 4), "bicubic")
    column = map_fit.TAU_GRID.index(0.4)
    def rows(at_fit, best_tau=None):
        scores = np.full((3, len(map_fit.TAU_GRID)), 0.1)
        scores[:, column] = at_fit
        if best_tau is not None:
            scores[:, map_fit.TAU_GRID.index(best_tau)] = 0.9
        return scores
    scores = {("shape", "all", "fitted", 1): rows(0.5), ("shape", "late", "fitted", 2): rows(0.6, best_tau=0.7),
              ("shape", "late", "fitted", 4): rows(0.6)}
    choice = fit.choose(scores, "shape", "fitted")
    assert (choice["view"], choice["k"], choice["tau"]) == ("late", 2, 0.7)  # a tie on 0.6 goes to the smaller k
    assert choice["fit_miou@0.4"] == pytest.approx(0.6) and fit.choose(scores, "color", "fitted") is None
