"""headscope report: a static index.html whose links all resolve, checked in a real headless browser."""
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from headscope.report import links, write_report
from headscope_cli.main import cli


@pytest.fixture
def folder(tmp_path):
    """An output folder as a study writes it: a figure, images, a CSV, a JSON, command.txt."""
    out = tmp_path / "study out"
    (out / "images").mkdir(parents=True)
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((320, 240)).save(out / "pos.png")
    for name in ("p00000.png", "p 00001.png"):
        Image.fromarray(pixels).save(out / "images" / name)
    (out / "pos.csv").write_text("pos,mean_coverage,n\nNUM,0.171,12\nDET,0.18,40\n")
    (out / "pos.json").write_text(json.dumps({"study": "pos", "title": "Parts of speech", "settings": {"tau": 0.4},
                                              "summary": {"groups": {"NUM": 0.17}}, "records": [{"key": "p0"}]}))
    (out / "command.txt").write_text("headscope study pos --out 'study out'\n")
    return out


def test_every_link_is_relative_and_resolves_to_a_file_of_the_folder(folder):
    page = write_report(folder).read_text()
    found = links(page)
    assert len(found) >= 8
    for link in found:
        parsed = urlparse(link)
        assert not parsed.scheme and not parsed.netloc and not link.startswith("/"), link
        target = (folder / unquote(parsed.path)).resolve()
        assert target.is_file() and folder.resolve() in target.parents, link
    assert "images/p%2000001.png" in found


def test_the_page_shows_the_command_the_tables_and_the_figures(folder):
    page = write_report(folder).read_text()
    assert "<title>Parts of speech (pos)</title>" in page
    assert "headscope study pos --out &#x27;study out&#x27;" in page
    assert re.search(r"<td[^>]*>NUM</td><td[^>]*>0.171</td><td[^>]*>12</td>", page)
    assert '<img src="pos.png"' in page and "1 records (one per image)" in page
    assert "http://" not in page and "https://" not in page  # nothing from the network


def test_report_command_writes_index_html_and_refuses_what_is_not_an_output_folder(folder, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(folder)])
    assert result.exit_code == 0 and (folder / "index.html").is_file(), result.output
    (tmp_path / "empty").mkdir()
    for target, expected in ((tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "holds no files")):
        result = CliRunner().invoke(cli, ["report", str(target)])
        assert result.exit_code == 2 and expected in result.stderr and len(result.stderr.splitlines()) == 1


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return found


def open_in_browser(page: Path, *extra) -> tuple[str, str]:
    """(DOM after the load event, the browser's log) of a local page in headless chromium."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra,
                               page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def test_in_a_headless_browser_every_image_loads_and_nothing_logs_an_error(folder, tmp_path):
    page = write_report(folder)
    dom, log = open_in_browser(page, "--dump-dom")
    assert 'data-images="3 loaded, 0 failed"' in dom, log[-3000:]
    assert "data-errors" not in dom
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log
    (folder / "images" / "p00000.png").unlink()  # the check itself notices a missing image
    dom, _ = open_in_browser(page, "--dump-dom")
    assert 'data-images="2 loaded, 1 failed"' in dom and 'data-failed="images/p00000.png"' in dom
    screenshot = tmp_path / "page.png"
    open_in_browser(page, f"--screenshot={screenshot}", "--window-size=1200,1600")
    assert Image.open(screenshot).size == (1200, 1600)
