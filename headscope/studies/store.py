"""A study's partial folder: finished jobs survive an interruption, and a rerun resumes from them."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from headscope.errors import HeadscopeError
from headscope.io import atomic_path


class RecordStore:
    """A study's partial folder: records-<rank>.jsonl (a settings line, then one line per finished job),
    images/<key>.png and arrays/<key>.npz. A job counts as done once its line is written; images and
    arrays are written (atomically) before it."""

    def __init__(self, folder, settings: dict):
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="headscope-study-"))
        self.settings_hash = settings_hash(settings)
        self.records_of_this_run: dict[str, dict] = {}
        self._handle = None

    def restore(self) -> dict[str, dict]:
        """Finished records of earlier runs, {key: record}; HeadscopeError if they were made otherwise."""
        done: dict[str, dict] = {}
        for path in sorted(self.folder.glob("records-*.jsonl")):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
                header = json.loads(lines[0]) if lines else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise HeadscopeError(f"{path} is damaged; delete {self.folder} and run again") from None
            if header.get("settings") != self.settings_hash:
                raise HeadscopeError(f"partial results in {self.folder} were made with other arguments; rerun with "
                                     f"the same arguments to resume, or delete {self.folder}")
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: that job runs again
                done[entry["key"]] = entry["record"]
        return done

    def open(self, rank: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"records-{rank}.jsonl"
        fresh = not path.is_file() or path.stat().st_size == 0
        if not fresh and not path.read_bytes().endswith(b"\n"):
            _drop_cut_line(path)
        self._handle = path.open("a", encoding="utf-8")
        if fresh:
            self._append({"settings": self.settings_hash})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def add(self, key: str, record: dict, image, arrays: dict) -> None:
        if image is not None:
            with atomic_path(self.image_path(key)) as temporary:
                image.save(temporary, format="PNG")
        if arrays:
            with atomic_path(self.folder / "arrays" / f"{key}.npz") as temporary:
                with open(temporary, "wb") as handle:
                    np.savez_compressed(handle, **arrays)
        self._append({"key": key, "record": record})
        self.records_of_this_run[key] = record

    def image_path(self, key: str) -> Path:
        return self.folder / "images" / f"{key}.png"

    def image(self, key: str):
        """The job's image (PIL), or None when it was not kept."""
        from PIL import Image

        path = self.image_path(key)
        return Image.open(path).convert("RGB") if path.is_file() else None

    def arrays(self, key: str) -> dict:
        """The arrays the study kept for a job ({} when none)."""
        path = self.folder / "arrays" / f"{key}.npz"
        if not path.is_file():
            return {}
        with np.load(path) as loaded:
            return {name: loaded[name] for name in loaded.files}

    def _append(self, entry: dict) -> None:
        self._handle.write(json.dumps(entry, default=jsonable) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())


def _drop_cut_line(path: Path) -> None:
    """Cut a records file back to its last complete line (a crash mid-write leaves a partial one)."""
    data = path.read_bytes()
    with atomic_path(path) as temporary:
        temporary.write_bytes(data[:data.rfind(b"\n") + 1])


def settings_hash(payload) -> str:
    """16 hex digits of the JSON of `payload` (keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
