"""Two processes with the same arguments and seed write byte-identical images, maps and summaries."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROMPT = "a red circle"


def _generate(out: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("headscope")
    return subprocess.Popen([str(script), "generate", PROMPT, "--seed", "3", "--daam", "--steps", "2", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_two_processes_with_one_seed_write_identical_files(tmp_path):
    first, second = _generate(tmp_path / "a"), _generate(tmp_path / "b")  # at the same time
    for process in (first, second):
        _, stderr = process.communicate(timeout=600)  # reads the pipes: a full pipe would block the process
        assert process.returncode == 0, stderr
    written, again = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert {"image.png", "summary.json", "maps/words.png", "maps/word-red.png", "maps/word-circle.png"} <= set(written)
    assert written.keys() == again.keys()
    assert [name for name in written if written[name] != again[name]] == []
    words = json.loads(written["summary.json"])["words"]
    assert words["circle"][0]["max"] > 0 and words == json.loads(again["summary.json"])["words"]
