"""A static index.html for any output folder: figures, images, tables from its CSV/JSON, the command.

The page links only to files inside the folder, by relative paths, and loads nothing from anywhere
else (no scripts, fonts or styles from the network; its own CSS and a few lines of script are
inline), so it opens from disk and still works when the folder is copied or zipped. The script checks,
once the page has loaded, that every image loaded, and writes the result into the page title and the
body's data-images attribute ("N loaded, M failed"), which the browser test reads.
"""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from urllib.parse import quote

from headscope.errors import HeadscopeError
from headscope.io import write_text

IMAGE_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".webp", ".svg")
MAX_ROWS = 200          # rows of a CSV shown; the file has all of them
MAX_THUMBNAILS = 240    # images in subfolders shown as thumbnails
MAX_JSON_CHARS = 20000  # characters of a JSON file shown inline
REPORT_NAME = "index.html"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { font-size: 1.15em; margin-top: 32px;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
pre, code { background: #f5f5f5; border-radius: 4px; } pre { padding: 8px 12px; overflow-x: auto; }
figure { margin: 16px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; } caption { text-align: left;
        font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f0f0f0; }
td.text { text-align: left; }
.thumbs { display: flex; flex-wrap: wrap; gap: 8px; } .thumbs a { text-decoration: none; color: #555;
          font-size: 0.75em; text-align: center; width: 112px; overflow-wrap: anywhere; }
.thumbs img { width: 104px; height: 104px; object-fit: contain; image-rendering: pixelated;
              border: 1px solid #eee; background: #fafafa; display: block; margin: 0 auto 2px; }
.note { color: #666; font-size: 0.85em; } .wide { overflow-x: auto; max-width: 100%; }
"""
SCRIPT = """
window.addEventListener("error", function (event) {
  document.body.dataset.errors = (document.body.dataset.errors || "") + (event.message || "error") + ";";
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var failed = images.filter(function (image) { return !(image.complete && image.naturalWidth > 0); });
  var summary = (images.length - failed.length) + " loaded, " + failed.length + " failed";
  document.body.dataset.images = summary;
  document.body.dataset.failed = failed.map(function (image) { return image.getAttribute("src"); }).join(" ");
  document.title = document.title + " [images: " + summary + "]";
});
"""


def write_report(folder, *, files=None, title: str | None = None) -> Path:
    """Write `folder`/index.html describing the folder's files (default: every file under it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HeadscopeError(f"{folder} is not a folder; give an output folder of headscope")
    files = list(dict.fromkeys(files)) if files is not None else sorted(_files(folder))
    files = [name for name in files if name != REPORT_NAME and (folder / name).is_file()]
    if not files:
        raise HeadscopeError(f"{folder} holds no files to report on")
    payloads = {name: _read_json(folder / name) for name in files if name.endswith(".json")}
    title = title or _title(folder, payloads)
    captions = {name: text for payload in payloads.values() if isinstance(payload, dict)
                and isinstance(payload.get("figures"), dict) for name, text in payload["figures"].items()}
    body = [f"<h1>{_text(title)}</h1>", _command(folder, files, payloads)]
    figures = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES) and "/" not in name]
    figures.sort(key=lambda name: list(captions).index(name) if name in captions else len(captions))  # study's order
    thumbnails = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES) and "/" in name]
    if figures:
        body.append("<h2>Figures</h2>")
        body += [f'<figure><a href="{_href(name)}"><img src="{_href(name)}" alt="{_text(name)}"'
                 f"{_small_width(folder / name)}></a><figcaption>{_caption(name, captions)}</figcaption></figure>"
                 for name in figures]
    tables = [name for name in files if name.endswith(".csv")]
    if tables:
        body.append("<h2>Tables</h2>")
        body += [_csv_table(folder / name, name) for name in tables]
    if thumbnails:
        body.append(f"<h2>Images ({len(thumbnails)})</h2>")
        body.append(_thumbnails(thumbnails))
    if payloads:
        body.append("<h2>Settings and data</h2>")
        body += [_json_section(name, payload) for name, payload in payloads.items()]
    body.append("<h2>All files</h2><ul>" + "".join(f'<li><a href="{_href(name)}">{_text(name)}</a></li>'
                                                  for name in files) + "</ul>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_text(title)}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head>\n<body>\n" + "\n".join(body) +
            "\n<p class=\"note\">Written by headscope report; every link is relative to this folder.</p>"
            "\n</body></html>\n")
    return write_text(folder / REPORT_NAME, page)


def links(page: str) -> list[str]:
    """Every src and href of an HTML page, in order."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(value for name, value in attrs if name in ("src", "href") and value is not None)

    Collector().feed(page)
    return found


def _files(folder: Path) -> list[str]:
    return [path.relative_to(folder).as_posix() for path in folder.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)]


def _title(folder: Path, payloads: dict) -> str:
    for payload in payloads.values():
        if isinstance(payload, dict) and payload.get("title"):
            return f"{payload['title']} ({payload.get('study', folder.name)})"
    return f"headscope: {folder.resolve().name}"


def _command(folder: Path, files: list[str], payloads: dict) -> str:
    command = None
    if "command.txt" in files:
        command = (folder / "command.txt").read_text(encoding="utf-8", errors="replace").strip()
    for payload in payloads.values():
        if command is None and isinstance(payload, dict) and isinstance(payload.get("command"), str):
            command = payload["command"]
    if command is None:
        return '<p class="note">The command that made this folder was not recorded.</p>'
    return f"<p>Made by:</p><pre><code>{_text(command)}</code></pre>"


def _csv_table(path: Path, name: str) -> str:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return f'<p class="note">{_text(name)}: unreadable ({_text(str(error))})</p>'
    if not rows:
        return f'<p class="note">{_text(name)}: empty</p>'
    header, data = rows[0], rows[1:]
    shown = data[:MAX_ROWS]
    cells = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    lines = ["".join(f'<td class="{"" if _numeric(cell) else "text"}">{_text(_short(cell))}</td>' for cell in row)
             for row in shown]
    more = f'<p class="note">first {MAX_ROWS} of {len(data)} rows; all in the file</p>' if len(data) > MAX_ROWS else ""
    return (f'<div class="wide"><table><caption><a href="{_href(name)}">{_text(name)}</a></caption><tr>{cells}</tr>' +
            "".join(f"<tr>{line}</tr>" for line in lines) + "</table></div>" + more)


def _thumbnails(names: list[str]) -> str:
    shown = names[:MAX_THUMBNAILS]
    items = "".join(f'<a href="{_href(name)}"><img src="{_href(name)}" alt="{_text(name)}" loading="eager">'
                    f"{_text(name.rsplit('/', 1)[-1])}</a>" for name in shown)
    more = (f'<p class="note">{MAX_THUMBNAILS} of {len(names)} images shown; see "All files"</p>'
            if len(names) > MAX_THUMBNAILS else "")
    return f'<div class="thumbs">{items}</div>{more}'


def _json_section(name: str, payload) -> str:
    if payload is None:
        return f'<p class="note"><a href="{_href(name)}">{_text(name)}</a>: not valid JSON</p>'
    parts = []
    if isinstance(payload, dict) and isinstance(payload.get("settings"), dict):
        rows = "".join(f'<tr><th>{_text(key)}</th><td class="text">{_text(_short(_compact(value), 300))}</td></tr>'
                       for key, value in payload["settings"].items())
        parts.append(f"<table><caption>settings ({_text(name)})</caption>{rows}</table>")
        shown = {key: value for key, value in payload.items() if key not in ("settings", "records")}
        if isinstance(payload.get("records"), list):
            shown["records"] = f"{len(payload['records'])} records (one per image) in {name}"
    else:
        shown = payload
    text = json.dumps(shown, indent=1, ensure_ascii=False, default=str)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n... ({len(text) - MAX_JSON_CHARS} more characters in the file)"
    parts.append(f'<details><summary><a href="{_href(name)}">{_text(name)}</a></summary><pre>{_text(text)}</pre>'
                 "</details>")
    return "\n".join(parts)


def _caption(name: str, captions: dict) -> str:
    text = captions.get(name)
    return f"<b>{_text(name)}</b>: {_text(text)}" if text else _text(name)


def _small_width(path: Path, least: int = 256) -> str:
    """A width attribute that scales a small image (a 64-pixel sample) up to `least` pixels, pixelated."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            width = image.size[0]
    except Exception:  # not an image PIL reads (an SVG): leave it to the browser
        return ""
    return f' width="{least}" style="image-rendering: pixelated"' if width < least else ""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _href(name: str) -> str:
    return quote(name, safe="/")


def _text(value) -> str:
    return html.escape(str(value), quote=True)


def _numeric(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _short(cell: str, limit: int = 80) -> str:
    return cell if len(cell) <= limit else cell[:limit - 1] + "…"


def _compact(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
