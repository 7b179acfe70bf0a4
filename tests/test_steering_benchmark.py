"""benchmarks/steering.py runs end to end on tiny pipelines (SD; SD3 beside it) and writes its JSON atomically."""
import json

import pytest


def test_the_steering_benchmark_runs_every_task_on_a_tiny_pipeline(tmp_path, capsys, load_benchmark):
    benchmark = load_benchmark("steering")
    out = tmp_path / "steering.json"
    benchmark.main(["--tiny", "--n-prompts", "1", "--repeats", "1", "--steps", "2", "--out", str(out),
                    "--images", str(tmp_path / "sheets")])
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == list(benchmark.TASKS)
    assert result["tasks"]["overhead"]["ratio"] > 0
    tasks = result["tasks"]
    assert {f"neglect/{method}" for method in benchmark.NEGLECT_METHODS} <= set(tasks["neglect"])
    assert set(tasks["neglect"]["records"][0]) == {"caption", "seed", *benchmark.NEGLECT_METHODS}
    for name in ("trained/adjusted", "end_word/adjusted", "end_word/adjusted_shuffled_heads", "object_sense/adjusted"):
        assert tasks["polysemy"][name]["n"] == 1 and "unwanted_sense vs baseline" in tasks["polysemy"][name]
    assert "colour_right vs baseline" in tasks["strengthening"]["end_word/color_s2"]
    assert len(tasks["strengthening"]["records"]["end_word"]) == 1
    assert sorted(tasks["editing"]) == ["p2p-hrv/color", "p2p/color", "records", "wall_seconds"]
    sheets = {path.name for path in (tmp_path / "sheets").glob("*.png")}
    assert {"polysemy-end_word.png", "neglect.png", "editing-color.png", "strengthening-end_word.png"} <= sheets
    assert not list(tmp_path.glob("*.tmp"))
    assert "neglect" in capsys.readouterr().out


def test_the_steering_benchmark_runs_polysemy_and_neglect_on_a_unet_and_a_joint_model_side_by_side(tmp_path, capsys,
        load_benchmark):
    benchmark = load_benchmark("steering")
    out = tmp_path / "steering.json"
    benchmark.main(["--tiny", "--models", "shapes,shapes-mmdit", "--tasks", "polysemy", "neglect", "editing",
                    "--n-prompts", "1", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["models"]) == ["shapes-mmdit"]
    assert "p2p/color" in result["tasks"]["editing"] and "neglect/diffusers-ae" in result["tasks"]["neglect"]
    joint = result["models"]["shapes-mmdit"]
    assert joint["model"] == benchmark.TINY_SD3 and list(joint["tasks"]) == ["polysemy", "neglect", "editing"]
    assert joint["tasks"]["polysemy"]["end_word/adjusted"]["n"] == 1
    for method in ("ae", "ae-hrv", "heads"):
        assert "both_present vs plain" in joint["tasks"]["neglect"][f"neglect/{method}"]
    assert joint["tasks"]["neglect"]["neglect/diffusers-ae"] == {"unsupported": benchmark.UNET_ONLY["diffusers-ae"]}
    assert "diffusers-ae" not in joint["tasks"]["neglect"]["records"][0]
    assert joint["tasks"]["editing"] == {"unsupported": benchmark.UNET_ONLY["editing"]}
    printed = capsys.readouterr().out
    assert "  shapes: " in printed and "  shapes-mmdit: " in printed
    assert f"n/a ({benchmark.UNET_ONLY['editing']})" in printed


def test_the_table_has_a_column_per_model_and_says_why_a_family_lacks_a_variant(load_benchmark):
    benchmark = load_benchmark("steering")
    run = {"model": "m", "hrv": "h", "steps": 2, "guidance": 5.0, "device": "cpu", "threads": 1}
    unet = {**run, "tasks": {"neglect": {"n": 3, "neglect/plain": {"both_present": 0.5, "n": 3},
                                         "neglect/diffusers-ae": {"both_present": 0.25, "n": 3}},
                             "editing": {"p2p/color": {"success": 1.0, "n": 2}}}}
    joint = {**run, "tasks": {"neglect": {"n": 3, "neglect/plain": {"both_present": 0.75, "n": 3},
                                          "neglect/diffusers-ae": {"unsupported": "SD only"}},
                              "editing": {"unsupported": "UNet only"}}}
    rows = benchmark.table({"shapes": unet, "shapes-mmdit": joint}).splitlines()[4:]
    assert [row.split() for row in rows] == [
        ["neglect", "neglect/plain", "both_present", "0.5000", "3", "0.7500", "3"],
        ["neglect", "neglect/diffusers-ae", "both_present", "0.2500", "3", "n/a", "(SD", "only)"],
        ["editing", "p2p/color", "success", "1.0000", "2", "n/a", "(UNet", "only)"]]


@pytest.mark.parametrize("argv", [["--models", "shapes,sd15"], ["--models", "shapes,shapes"],
                                  ["--model", "some/folder", "--models", "shapes,shapes-mmdit"],
                                  ["--hrv", "x.hrv", "--models", "shapes,shapes-mmdit"]])
def test_models_that_cannot_run_side_by_side_are_refused_before_loading_anything(tmp_path, argv, load_benchmark):
    with pytest.raises(SystemExit) as refused:
        load_benchmark("steering").main([*argv, "--out", str(tmp_path / "steering.json")])
    assert refused.value.code == 2 and not (tmp_path / "steering.json").exists()


def test_paired_counts_the_discordant_prompts_and_tests_them_exactly(load_benchmark):
    paired = load_benchmark("steering")._paired
    assert paired([True, True, True, False], [False, False, False, False]) == {
        "baseline_only": 3, "variant_only": 0, "p": 0.25}
    assert paired([True, False, True], [True, True, False]) == {"baseline_only": 1, "variant_only": 1, "p": 1.0}
    assert paired([True], [True])["p"] == 1.0
    assert paired([False] * 10, [True] * 10)["p"] < 0.01
