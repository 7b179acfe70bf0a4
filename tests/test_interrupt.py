"""Ctrl-C: one line on stderr, exit code 130, no half-written result; `hrv build` resumes to the same bits.

The resume test runs real processes: `headscope hrv build` on the tiny pipeline folder gets SIGINT once
its first partial vote file exists, then runs again and must end with exactly the tensors of a build
that was never interrupted (run in this process, one torch thread as there). While it runs, a second
build into the same --out is refused.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from headscope_cli.main import cli

WORDS = ["red", "blue", "green", "big"], ["dog", "cat", "circle", "square", "bird"]
PROMPTS = [f"a {color} {thing} on the tree" for color in WORDS[0] for thing in WORDS[1]][:16]
CONCEPTS = {"name": "tiny", "concepts": {"color": WORDS[0], "thing": WORDS[1]}}
INTERRUPTED = "headscope: interrupted"


def _visible_lines(stderr: str) -> list[str]:
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def _headscope(*args, **options) -> subprocess.Popen:
    """The console script in a fresh process, one torch thread, with Python's SIGINT handler (a parent that
    ignores SIGINT, as a background shell does, would otherwise pass that on)."""
    script = Path(sys.executable).with_name("headscope")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **options)


@pytest.fixture(scope="module")
def build_args(tiny_sd_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupt")
    (folder / "concepts.json").write_text(json.dumps(CONCEPTS))
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return ["hrv", "build", "--model", tiny_sd_folder, "--concepts", folder / "concepts.json", "--prompts",
            folder / "prompts.txt", "--steps", 2, "--batch-size", 1, "--save-every", 1, "--device", "cpu"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sigint_stops_hrv_build_and_a_rerun_resumes_to_the_same_bits(build_args, tmp_path):
    reference, out = tmp_path / "reference.hrv", tmp_path / "built.hrv"
    partial = tmp_path / "built.hrv.partial" / "rank-0-of-1.safetensors"
    running = _headscope(*build_args, "--out", out)
    deadline = time.monotonic() + 120
    while not partial.exists() and running.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert partial.exists(), running.communicate()

    second = CliRunner().invoke(cli, [str(arg) for arg in [*build_args, "--out", out]])
    assert second.exit_code == 2
    assert f"another headscope run (pid {running.pid}) is writing {out}" in second.stderr

    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=60)
    assert running.returncode == 130, stderr
    assert _visible_lines(stderr)[-1] == (f"{INTERRUPTED}; votes so far are kept in {out}.partial/; run the same "
                                          "command again to resume")
    assert "Traceback" not in stderr
    assert not out.exists() and partial.exists()
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".built.hrv")]  # no temp, no lock
    done = json.loads(__import__("safetensors").safe_open(str(partial), "pt").metadata()["state"])["done"]
    assert 0 < len(done) < len(PROMPTS), "the build was not interrupted half-way"

    resumed = _headscope(*build_args, "--out", out)
    uninterrupted = CliRunner().invoke(cli, [str(arg) for arg in [*build_args, "--out", reference]])  # meanwhile
    assert uninterrupted.exit_code == 0, uninterrupted.output
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert not partial.parent.exists()  # discarded once the HRV is saved
    built, expected = _tensors(out), _tensors(reference)
    assert built.keys() == expected.keys() == {"vectors", "step_votes"}
    assert all(torch.equal(built[name], expected[name]) for name in expected)
    assert expected["step_votes"].sum() > 0


# -- the other long commands, interrupted in-process -----------------------------------------------

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("target, args, hint", [
    ("headscope.weaken.OrderedWeakening.fit", ["hrv", "weaken", "--concept", "color", "--out", "{out}"], None),
    ("headscope.shapes.evaluate.evaluate", ["shapes", "eval", "--out", "{out}/eval.json"], None),
    ("headscope.shapes.train.train", ["shapes", "train", "--run-dir", "{out}", "--tiny"],
     "checkpoints are kept in {out}/; run the same command again to resume"),
    ("PIL.Image.Image.save", ["generate", "a red circle", "--steps", "1", "--out", "{out}"], None),
    ("headscope.viz.save_figure", ["hrv", "show", "headscope/models/shapes_hrv.hrv", "--out", "{out}"], None),
])
def test_ctrl_c_is_one_line_exit_130_and_leaves_no_output(target, args, hint, tmp_path, monkeypatch):
    monkeypatch.setattr(target, _interrupt)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [arg.format(out=out) for arg in args])
    assert result.exit_code == 130, (result.output, result.exception)
    expected = INTERRUPTED + ("; " + hint.format(out=out) if hint else "")
    assert _visible_lines(result.stderr) == [expected]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no lock


def test_ctrl_c_while_options_are_parsed_is_the_same_line(tmp_path, monkeypatch):
    from headscope_cli.shapes import render_cmd

    out_option = next(param for param in render_cmd.params if param.name == "out")
    monkeypatch.setattr(out_option, "callback", _interrupt)
    result = CliRunner().invoke(cli, ["shapes", "render", "--n", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 130 and _visible_lines(result.stderr) == [INTERRUPTED]
    assert list(tmp_path.iterdir()) == []


def test_files_that_belong_together_are_written_before_ctrl_c_lands():
    from headscope.io import uninterrupted

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT does not raise KeyboardInterrupt in this process")
    written = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            written.append("both files")
    assert written == ["both files"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
