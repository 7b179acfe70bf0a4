"""benchmarks/harness.py: Ctrl-C and user mistakes end in one line and leave --out as it was; results are complete."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # as `python benchmarks/NAME.py` has it
    sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402

SLEEPER = """
    import signal, sys, time
    sys.path.insert(0, {benchmarks!r})
    import harness

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if started in the background

    def measure(args):
        print("measuring", flush=True)
        time.sleep(120)
        return {{"score": 1.0}}

    sys.exit(harness.run(measure, harness.parser("Sleeps until interrupted.", "sleeper"), sys.argv[1:]))
"""


def _sleeper(tmp_path: Path) -> Path:
    script = tmp_path / "sleeper.py"
    script.write_text(textwrap.dedent(SLEEPER.format(benchmarks=str(BENCHMARKS))))
    return script


def test_ctrl_c_exits_130_with_one_line_and_leaves_the_result_file_as_it_was(tmp_path):
    out = tmp_path / "results" / "sleeper.json"
    out.parent.mkdir()
    out.write_text('{"score": 0.5}\n')
    process = subprocess.Popen([sys.executable, str(_sleeper(tmp_path)), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "measuring\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.splitlines() == [f"sleeper: interrupted; {out} left as it was"]
    assert out.read_text() == '{"score": 0.5}\n'
    assert os.listdir(out.parent) == ["sleeper.json"]  # no temporary file left behind


def test_a_headscope_error_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "probe.json"
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "position_probe.py"), "--model",
                                str(tmp_path / "missing-model"), "--out", str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr.splitlines() == [
        f"position_probe: error: model folder {tmp_path / 'missing-model'} does not exist; "
        "pass an existing folder or a hub id"]
    assert not out.exists()


def test_the_result_file_holds_the_result_and_how_it_was_run(tmp_path, capsys):
    out = tmp_path / "result.json"
    argv = ["--threads", "1", "--out", str(out)]
    assert harness.run(lambda args: {"score": 0.25, "rows": [1, 2]}, harness.parser("Doc.", "demo"), argv) == 0
    result = json.loads(out.read_text())
    assert {key: result[key] for key in ("score", "rows")} == {"score": 0.25, "rows": [1, 2]}
    run = result["run"]
    assert run["command"] == f"python benchmarks/demo.py --threads 1 --out {out}"
    assert run["threads"] == 1 and run["wall_seconds"] >= 0.0
    assert run["torch"] and run["platform"] and run["python"]
    assert capsys.readouterr().err == f"wrote {out}\n"


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    measured = []
    with pytest.raises(SystemExit) as exit_info:
        harness.run(measured.append, harness.parser("Doc.", "demo"), ["--out", str(blocker / "result.json")])
    assert exit_info.value.code == 2 and measured == []
    assert capsys.readouterr().err.startswith(f"demo: error: cannot write {blocker / 'result.json'}: ")


def test_a_measurement_that_returns_nothing_writes_no_file(tmp_path):
    out = tmp_path / "result.json"
    assert harness.run(lambda args: None, harness.parser("Doc.", "demo"), ["--out", str(out)]) == 0
    assert not out.exists()


def test_the_shared_options_default_to_the_embedded_model_the_cpu_and_the_results_folder():
    args = harness.parser("Doc.", "demo", device=False).parse_args([])
    assert args.out == BENCHMARKS / "results" / "demo.json"
    assert (args.tiny, args.model, args.device, args.threads) == (None, None, "cpu", None)
    assert harness.describe(args) == "embedded shapes model"
    assert harness.parser("Doc.", "demo", tiny="sd").parse_args(["--tiny"]).tiny == "sd"


def test_tiny_and_model_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        harness.parser("Doc.", "demo", tiny="shapes").parse_args(["--tiny", "--model", "some/folder"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_table_aligns_labels_left_numbers_right_and_shows_none_as_na():
    text = harness.table([["color", 0.5, None], ["position", 12, 0.125]], ["words", "score", "chance"])
    assert text.splitlines() == ["words     score  chance",
                                 "color     0.500     n/a",
                                 "position     12   0.125"]
    assert harness.table([["a", "b", 1.0]], ["x", "y", "z"], digits=1, left=2).splitlines()[1] == "a  b  1.0"
