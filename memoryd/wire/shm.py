"""Reply buffers: search results handed to a client on the same host through shared memory.

A search reply is mostly array bytes (4096 queries x k=32 x 64 fp16 values
is 16 MiB). Through a unix socket they are copied by the server into the
message, twice by the kernel, and once more by the client, which costs about
as much as the search. With a reply buffer the daemon writes the arrays into
a file in shared memory that the client has mapped, and the reply message
only says where they lie (Tensor.buffer_offset): one copy on each side.

Lifecycle (the daemon owns every buffer, as Triton's system shared memory
does with the roles swapped, so a client can never point it at a file):

    OpenReplyBuffer(size)  daemon creates <dir>/memoryd-<uid>/memoryd-<pid>-<handle>
                           (mode 0600 less the umask; 0640 when the daemon's
                           socket is open to its group, which may then map it
                           read-only, as the clients in group memoryd of
                           deploy/memoryd.service do; the folder is 0710, so
                           nobody else can list the handles in the names),
                           owned by the caller's token (auth on): the
                           handle of another token is unknown to it,
                           reserves its pages (posix_fallocate: a full tmpfs
                           is an error here, never a SIGBUS later), writes
                           MAGIC + handle in the header, maps it
    client                 maps the file and checks the header: a
                           client on another host (or in another /dev/shm)
                           sees no such file or another handle, and falls back
    Search(reply_buffer=h) a client of the daemon's user writes its queries at
                           offset 0 (others send them inline); the daemon
                           copies them out, searches, writes the reply there
                           and, the first time,
                           unlinks the file: from then on it lives exactly as
                           long as the two mappings, so nothing leaks when
                           either process dies
    CloseReplyBuffer(h)    or idle for `idle_s`, or daemon stop: unmapped

A daemon also removes files of dead daemons' pids at start (buffers opened
but never used by a client that died).
"""
from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from memoryd.errors import FailedPrecondition, InvalidArgument, QuotaExceeded, UnknownReplyBuffer
from memoryd.v1 import memory_pb2 as pb
from memoryd.wire.tensors import check_shape

log = logging.getLogger("memoryd.shm")

MAGIC = b"memoryd reply buffer v1\0"
HEADER = mmap.PAGESIZE                # MAGIC + handle; data starts page aligned
ALIGN = 64                            # each array starts on a cache line
MAX_BUFFER_BYTES = 1 << 30            # one buffer; a reply this big goes inline
DEFAULT_TOTAL_BYTES = 1 << 30         # all buffers of one daemon
DEFAULT_IDLE_S = 300.0
_NAME = re.compile(r"^memoryd-(\d+)-([0-9a-f]{32})$")


def default_dir() -> Path | None:
    """/dev/shm when it is a writable directory (Linux), else None: buffers off."""
    d = Path("/dev/shm")
    return d if d.is_dir() and os.access(d, os.W_OK | os.X_OK) else None


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(arrays: dict[str, np.ndarray | None]) -> tuple[dict[str, int], int]:
    """({name: byte offset in the data area}, bytes needed) for the arrays, in order."""
    offsets, end = {}, 0
    for name, a in arrays.items():
        if a is not None:
            offsets[name] = end
            end = aligned(end + a.nbytes)
    return offsets, end


@dataclass(frozen=True)
class Placed:
    """An array that lies in a reply buffer: what Tensor.buffer_offset describes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int                       # from the start of the data area

    def __len__(self) -> int:                 # rows, like an ndarray's len
        return self.shape[0] if self.shape else 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize      # Python ints: no overflow


class ReplyBufferFile:
    """One buffer, daemon side: the file's mapping and the lock writers hold.

    Trust: the file is 0600 or 0640 (less the umask), so only the daemon's own
    user can write it. A process of that user could truncate it under the
    daemon's mapping (a SIGBUS), but it could as well kill the daemon; other
    users (the daemon's group) map it read-only and cannot. pwrite instead of
    the mapping would remove even that, at ~2 ms per 18 MiB reply here (2.7
    vs 0.7 ms), a tenth of the whole remote overhead.
    """

    def __init__(self, path: Path, handle: str, size: int, now: float, *,
                 mode: int = 0o600, owner: str | None = None):
        self.path, self.handle, self.size = path, handle, size
        self.owner = owner                           # the token that opened it (None: auth off)
        self.lock = threading.Lock()                 # held by read, place and close
        self.last_used = now
        self.unlinked = self.closed = False
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)   # less the umask
        try:
            try:
                os.posix_fallocate(fd, 0, HEADER + size)
            except OSError as e:
                if e.errno != errno.ENOSPC:          # e.g. a file system without fallocate
                    raise FailedPrecondition(f"reply buffers cannot be made in {path.parent}: "
                                             f"{e.strerror}") from e
                fs = os.statvfs(path.parent)
                total = fs.f_blocks * fs.f_frsize
                raise QuotaExceeded(str(path.parent), total - fs.f_bavail * fs.f_frsize, total,
                                    HEADER + size, scope="shared memory") from e
            self._mm = mmap.mmap(fd, HEADER + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)                                 # the mapping keeps the file open
        self._mm[: len(MAGIC) + 32] = MAGIC + handle.encode()
        self._data = np.frombuffer(self._mm, np.uint8, count=size, offset=HEADER)  # (size,)

    def read(self, p: Placed) -> np.ndarray:
        """A copy of an array the client wrote (its queries). Hold self.lock."""
        if self.closed:
            raise UnknownReplyBuffer(f"reply buffer '{self.handle[:8]}…' was closed")
        return view(self._mm, HEADER, self.size, p).copy()

    def place(self, arrays: dict[str, np.ndarray | None]) -> dict[str, Placed] | None:
        """Copy the arrays into the data area; None when they do not fit. Hold self.lock."""
        if self.closed:                              # closed while this search ran
            raise UnknownReplyBuffer(f"reply buffer '{self.handle[:8]}…' was closed")
        offsets, need = layout(arrays)
        if need > self.size:
            return None
        placed = {}
        for name, off in offsets.items():
            a = np.ascontiguousarray(arrays[name])
            raw = a.reshape(-1).view(np.uint8)                           # (nbytes,)
            self._data[off: off + raw.size] = raw
            placed[name] = Placed(a.dtype, tuple(a.shape), off)
        if not self.unlinked:      # the client has mapped it (it only sends mapped handles)
            self.path.unlink(missing_ok=True)
            self.unlinked = True
        return placed

    def close(self) -> None:
        """Unmap (hold self.lock); the client's mapping stays valid until it unmaps."""
        if self.closed:
            return
        self.closed = True
        self._data = None                            # the view first: an exported mmap won't close
        self._mm.close()
        if not self.unlinked:
            self.path.unlink(missing_ok=True)


class ReplyBuffers:
    """The daemon's open reply buffers: open, look up by handle, close, expire."""

    def __init__(self, directory: Path | None = None, *, total_bytes: int = DEFAULT_TOTAL_BYTES,
                 idle_s: float = DEFAULT_IDLE_S, clock: Callable[[], float] = time.monotonic,
                 file_mode: int = 0o600):
        """directory: where the daemon's own folder memoryd-<uid> goes (None: buffers off);
        file_mode: of each buffer (0o640: the daemon's group maps them read-only)."""
        if file_mode & ~0o640:
            raise ValueError(f"reply buffer mode {file_mode:o}: at most owner rw, group r")
        self.directory = own_folder(directory) if directory is not None else None
        self.total_bytes, self.idle_s, self.clock = total_bytes, idle_s, clock
        self.file_mode = file_mode
        self._open: dict[str, ReplyBufferFile] = {}
        self._reserved = 0                   # bytes of buffers being created (outside the lock)
        self._lock = threading.Lock()
        self._last_expiry = clock()
        if self.directory is not None:
            remove_stale(self.directory)

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.total_bytes > 0

    def used_bytes(self) -> int:
        with self._lock:
            return sum(b.size for b in self._open.values())

    def open(self, size: int, owner: str | None = None) -> ReplyBufferFile:
        if not self.enabled:
            raise FailedPrecondition("reply buffers are off on this daemon (no shared-memory dir)")
        if not 0 < size <= min(MAX_BUFFER_BYTES, self.total_bytes):
            raise InvalidArgument(f"reply buffer size must be in 1..{min(MAX_BUFFER_BYTES, self.total_bytes)} "
                                  f"bytes; got {size}")
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.expire()
        handle = secrets.token_hex(16)
        with self._lock:                     # reserve the bytes; the file is made unlocked
            used = sum(b.size for b in self._open.values()) + self._reserved
            if used + size > self.total_bytes:
                raise QuotaExceeded("reply buffers", used, self.total_bytes, size, scope="daemon")
            self._reserved += size
        try:                                 # fallocate of up to 1 GiB: searches go on meanwhile
            buf = ReplyBufferFile(self.directory / f"memoryd-{os.getpid()}-{handle}", handle,
                                  size, self.clock(), mode=self.file_mode, owner=owner)
        finally:
            with self._lock:
                self._reserved -= size
        with self._lock:
            self._open[handle] = buf
        return buf

    def get(self, handle: str, owner: str | None = None) -> ReplyBufferFile:
        """The open buffer of that handle and owner (another owner's is as unknown
        as a closed one: its queries and replies are its owner's alone)."""
        now = self.clock()
        if now - self._last_expiry > 1.0:    # dead clients' buffers go even if nobody opens one
            self._last_expiry = now
            self.expire()
        with self._lock:
            buf = self._open.get(handle)
        if buf is None or buf.owner != owner:
            raise UnknownReplyBuffer(f"reply buffer '{handle[:8]}…' is not open on this daemon "
                                     "(closed or idle too long): open another")
        buf.last_used = self.clock()
        return buf

    def close(self, handle: str, owner: str | None = None) -> None:
        with self._lock:
            buf = self._open.get(handle)
            if buf is not None and buf.owner == owner:
                del self._open[handle]
            else:
                buf = None
        if buf is None:
            raise UnknownReplyBuffer(f"reply buffer '{handle[:8]}…' is not open on this daemon")
        with buf.lock:                       # after a write in flight
            buf.close()

    def expire(self) -> int:
        """Close the buffers unused for idle_s; how many."""
        now = self.clock()
        with self._lock:
            old = [h for h, b in self._open.items() if now - b.last_used > self.idle_s]
            bufs = [self._open.pop(h) for h in old]
        for b in bufs:
            with b.lock:
                b.close()
        return len(bufs)

    def close_all(self) -> None:
        with self._lock:
            bufs, self._open = list(self._open.values()), {}
        for b in bufs:
            with b.lock:
                b.close()


def to_pb(buf: ReplyBufferFile, idle_s: float) -> pb.ReplyBuffer:
    """What OpenReplyBuffer answers: where the client maps the buffer."""
    return pb.ReplyBuffer(handle=buf.handle, path=str(buf.path), size_bytes=buf.size,
                          data_offset=HEADER, idle_timeout_s=idle_s)


def own_folder(parent: Path) -> Path | None:
    """<parent>/memoryd-<uid>, made 0710 (group may open files it knows the name of,
    not list them); None, with a warning, when it is not ours (someone else made it)."""
    folder = parent / f"memoryd-{os.getuid()}"
    try:
        folder.mkdir(mode=0o710, exist_ok=True)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            log.warning("reply buffers off: %s is not a folder of this user", folder)
            return None
        os.chmod(folder, 0o710)                       # whatever the umask made of it
    except OSError as e:
        log.warning("reply buffers off: cannot make %s: %s", folder, e)
        return None
    return folder


def remove_stale(directory: Path) -> int:
    """Unlink buffer files left by daemons that are no longer running; how many.

    Files of this very pid are stale too (a daemon starting has none yet): a
    daemon that is pid 1 of its container has the same pid after a restart."""
    removed = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for p in entries:
        m = _NAME.match(p.name)
        if m and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass                         # another user's file, or raced away
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                          # someone else's live process
    return True


def check_inside(p: Placed, size: int) -> None:
    """InvalidArgument unless p's shape is sane and its bytes lie in a size-byte data area."""
    check_shape(p.shape, "reply buffer array")
    if p.offset < 0 or p.offset + p.nbytes > size:
        raise InvalidArgument(f"array at {p.offset}+{p.nbytes} lies outside the "
                              f"{size}-byte reply buffer")


def view(mm: mmap.mmap, data_offset: int, size: int, p: Placed) -> np.ndarray:
    """The array p describes, as a view into a buffer's data area; checked to lie inside it."""
    check_inside(p, size)
    return np.frombuffer(mm, p.dtype, count=math.prod(p.shape),
                         offset=data_offset + p.offset).reshape(p.shape)


# ---- the client's side ----------------------------------------------------------------------

class MappedReplyBuffer:
    """One buffer, client side: a mapping checked against its handle.

    The client reads replies from it and, when the file's mode lets it write
    (`writable`), puts its queries at offset 0 (the daemon copies them out
    before it writes the reply).
    """

    def __init__(self, handle: str, path: str, size: int, data_offset: int):
        """Raises OSError or ValueError when the file is not the daemon's (another host)."""
        self.handle, self.size = handle, size
        try:
            fd, self.writable = os.open(path, os.O_RDWR), True
        except PermissionError:                      # another user of the daemon's group
            fd, self.writable = os.open(path, os.O_RDONLY), False
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        try:
            self._mm = mmap.mmap(fd, data_offset + size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        if self._mm[: len(MAGIC) + 32] != MAGIC + handle.encode():
            self._mm.close()
            raise ValueError(f"{path} is not reply buffer {handle[:8]}…")
        self._offset = data_offset

    def read(self, p: Placed) -> np.ndarray:
        """A writable copy of a placed array."""
        return view(self._mm, self._offset, self.size, p).copy()

    def write(self, a: np.ndarray) -> Placed:
        """Copy a (the queries) to the start of the data area."""
        p = Placed(a.dtype, tuple(a.shape), 0)
        view(self._mm, self._offset, self.size, p)[...] = a
        return p

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:                  # a view still alive: the GC unmaps it later
            pass
