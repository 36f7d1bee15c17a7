"""Writing files so that a reader never sees half of one: temporary file, fsync, rename.

A rename within one filesystem is atomic, so `path` holds either its old contents or the new
ones, whatever happens midway (a full disk, a killed process). The temporary file sits in the same
directory as `path` (a rename across filesystems is a copy) and is removed when writing fails.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
