"""A data dir for the benchmarks' daemon while this process opens the original.

A data dir has one user at a time (memoryd.engine.datadir: LocalMemory takes an
exclusive lock on it, and `memoryd serve` is a LocalMemory behind gRPC), so a
benchmark that times LocalMemory and a daemon over the same banks in
interleaved rounds gives the daemon a copy: the same files, byte for byte, so
the same banks and the same answers.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# what belongs to whoever holds a data dir, not to its banks
_NOT_COPIED = shutil.ignore_patterns("memoryd.pid", "memoryd.sock", "*.log")


@contextmanager
def served_copy(data_dir: Path) -> Iterator[Path]:
    """A fresh copy of data_dir (closed: no LocalMemory may hold it while it is
    copied) beside it, for a daemon to serve; removed afterwards."""
    data_dir = Path(data_dir)
    copy = data_dir.with_name(data_dir.name + "-served")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(data_dir, copy, ignore=_NOT_COPIED)
    try:
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)
