"""Atomic writes: a result file or folder is either complete or absent, never half-written.

Write failures (disk full, no permission) become a `WriteError` naming the result, not the temporary
file; the temporary files are removed, also on Ctrl-C. `output_lock` keeps a second process from
writing the same result at the same time.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from headscope.errors import HeadscopeError, WriteError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~umask())
        os.replace(temporary, path)
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def staged_folder(out: str | Path):
    """Yield a hidden staging folder next to `out`; on success move its files into `out`, else delete it.

    A new `out` appears at once (one rename); into an existing one the files move one by one,
    replacing files of the same name and keeping the others.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HeadscopeError(f"{out} is a file; give a folder for the results")
    stage = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        yield stage
        if not out.exists():
            os.chmod(stage, 0o777 & ~umask())
            os.rename(stage, out)
            return
        for source in sorted(path for path in stage.rglob("*") if path.is_file()):
            target = out / source.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    except OSError as error:  # a WriteError too: then name `out`, not the file in the staging folder
        raise WriteError(out, error.error if isinstance(error, WriteError) else error) from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def output_lock(path: str | Path):
    """Hold `path` (a result file or folder) for this process while the block runs.

    The lock is `.NAME.lock` next to `path`, taken with flock: the system lets go of it when the
    process ends, however it ends, and the file is removed on exit, with the folders made for it
    if they stayed empty. HeadscopeError, naming the other process, when another process holds it.
    (No locking where flock does not exist.)
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _locked(lock, fcntl)
    except OSError as error:
        _remove_empty(made)
        raise WriteError(path, error) from None
    if handle is None:
        holder = _read_pid(lock)
        raise HeadscopeError(f"another headscope run{f' (pid {holder})' if holder else ''} is writing {path}; "
                             "wait for it to finish or choose another output")
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock)  # while still holding it; a process that opened the old file retries
        except OSError:
            pass
        os.close(handle)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove these folders, innermost first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _locked(lock: Path, fcntl) -> int | None:
    """A descriptor of `lock` holding its exclusive flock, or None when another process holds it."""
    while True:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        try:
            if os.stat(lock).st_ino == os.fstat(handle).st_ino:
                return handle
        except FileNotFoundError:
            pass
        os.close(handle)  # the previous holder removed this file as we locked it: lock the new one


def _read_pid(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


@contextmanager
def uninterrupted():
    """Hold Ctrl-C back while the block runs (files that only make sense together), then raise it.

    Only in the main thread and where SIGINT has Python's handler; elsewhere the block runs as is.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json(path: str | Path, payload, indent: int = 2) -> Path:
    return write_text(path, json.dumps(payload, indent=indent) + "\n")


def replace_folder(stage: str | Path, target: str | Path) -> Path:
    """Move a finished folder `stage` into place at `target`, replacing an older one."""
    stage, target = Path(stage), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, target)
    return target


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
