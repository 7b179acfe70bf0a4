"""User-facing errors: one line that names the problem and the fix."""
from __future__ import annotations

import errno
from pathlib import Path

_FIXES = {errno.ENOSPC: "free some disk space or write elsewhere",
          errno.EDQUOT: "free some of your disk quota or write elsewhere",
          errno.EACCES: "make the folder writable or write elsewhere",
          errno.EPERM: "make the folder writable or write elsewhere",
          errno.EROFS: "the file system is read-only: write elsewhere",
          errno.ENOTDIR: "a part of the path is a file, not a folder: write elsewhere",
          errno.EISDIR: "a folder is in the way: remove it or write elsewhere",
          errno.EEXIST: "a file is in the way of a folder: write elsewhere"}


class HeadscopeError(ValueError):
    """A mistake in what the user asked for (bad word, bad file, bad option).

    The CLI prints its message on one line and exits with code 2; no traceback.
    """


class WriteError(HeadscopeError, OSError):
    """A result could not be written (disk full, no permission...); nothing half-written is left behind.

    Also an OSError (with the failure's errno), as the failed write was; `error` is that failure.
    """

    def __init__(self, path: str | Path, error: OSError):
        fix = _FIXES.get(error.errno)
        super().__init__(f"cannot write {path}: {error.strerror or error}; nothing was written"
                         f"{' (' + fix + ')' if fix else ''}")
        self.path, self.error, self.errno = Path(path), error, error.errno
