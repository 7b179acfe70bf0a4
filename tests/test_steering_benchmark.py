"""benchmarks/steering.py runs end to end on the tiny pipeline and writes its JSON atomically."""
import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "steering.py"


def test_the_steering_benchmark_runs_every_task_on_a_tiny_pipeline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("steering_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "steering.json"
    benchmark.main(["--tiny", "--n-prompts", "1", "--repeats", "1", "--steps", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["tasks"]) == list(benchmark.TASKS)
    assert result["tasks"]["overhead"]["ratio"] > 0
    assert set(result["tasks"]["neglect"]) >= set(benchmark.NEGLECT_METHODS)
    assert result["tasks"]["polysemy"]["n"] == 1 and "unwanted_sense" in result["tasks"]["polysemy"]["adjusted"]
    assert sorted(result["tasks"]["editing"]) == ["p2p-hrv/color", "p2p/color", "wall_seconds"]
    assert not list(tmp_path.glob("*.tmp"))
    assert "neglect" in capsys.readouterr().out
