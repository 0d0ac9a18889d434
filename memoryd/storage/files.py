"""Writing files so that a crash or a power cut leaves the old or the new
state, never a torn one: new files fsync'd, replacements by rename, and the
folder fsync'd so the rename itself survives."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from memoryd.errors import StorageUnwritable


def as_bytes(arr: np.ndarray) -> memoryview:
    """The array's bytes without a copy (any dtype: float16 has no buffer format)."""
    return memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in path survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write a new file and fsync it (the caller fsyncs the folder once).
    A failure (disk full, read-only) removes the partial file and raises
    StorageFull / StorageUnwritable."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        path.unlink(missing_ok=True)
        raise StorageUnwritable.from_os_error(e, path) from None


def atomic_write_json(path: Path, obj: dict) -> None:
    """Replace path with obj: temp file, fsync, rename, folder fsync."""
    tmp = path.with_suffix(".tmp")
    write_durably(tmp, json.dumps(obj).encode())
    try:
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageUnwritable.from_os_error(e, path) from None
    fsync_dir(path.parent)
