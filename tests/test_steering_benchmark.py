"""benchmarks/steering.py runs end to end on the tiny pipeline and writes its JSON atomically."""
import importlib.util
import json
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "steering.py"


def _load():
    if str(BENCHMARK.parent) not in sys.path:  # as `python benchmarks/steering.py` has it, for `import harness`
        sys.path.insert(0, str(BENCHMARK.parent))
    spec = importlib.util.spec_from_file_location("steering_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_the_steering_benchmark_runs_every_task_on_a_tiny_pipeline(tmp_path, capsys):
    benchmark = _load()
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


def test_paired_counts_the_discordant_prompts_and_tests_them_exactly():
    paired = _load()._paired
    assert paired([True, True, True, False], [False, False, False, False]) == {
        "baseline_only": 3, "variant_only": 0, "p": 0.25}
    assert paired([True, False, True], [True, True, False]) == {"baseline_only": 1, "variant_only": 1, "p": 1.0}
    assert paired([True], [True])["p"] == 1.0
    assert paired([False] * 10, [True] * 10)["p"] < 0.01
