"""One user of a data dir at a time: an exclusive lock on <data_dir>/memoryd.pid.

LocalMemory takes it when it opens a data dir and releases it in close(), so
a daemon (`memoryd serve`, whose backend is a LocalMemory), `memctl
--data-dir` and any in-process LocalMemory exclude each other: two of them on
one data dir would each hold its own copy of the banks, and what one wrote
the other would never see (a bank created in-process showed in the daemon's
list, and the daemon answered NOT_FOUND for it).

The lock is a flock(2) on an open file: the kernel drops it when the holder
exits, however it exits, so a crashed holder leaves no stale lock; the file
holds the holder's pid for the message of whoever is refused. A second
LocalMemory on the same dir is refused in the same process too (each open
file description has its own flock).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from memoryd.errors import FailedPrecondition

LOCK_NAME = "memoryd.pid"


class DataDirInUse(FailedPrecondition):
    """The data dir is held by another LocalMemory or daemon (another process, or
    an open LocalMemory in this one); .pid is the holder's pid as it wrote it."""

    def __init__(self, data_dir: Path, pid: str):
        self.data_dir, self.pid = data_dir, pid
        super().__init__(f"data dir {data_dir} is in use by process {pid} (memoryd serve?): "
                         "stop it, or reach it through its daemon (memctl --address)")

    def __reduce__(self):
        return (type(self), (self.data_dir, self.pid))


class DataDirLock:
    """An exclusive flock on <data_dir>/memoryd.pid while held (acquire/release)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "DataDirLock":
        """Take the lock, or DataDirInUse naming its holder; writes our pid."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(self.data_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)          # closing the last descriptor drops the flock

    @property
    def held(self) -> bool:
        return self.fd is not None
