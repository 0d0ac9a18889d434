"""The client's reply buffers: shared memory that memoryd writes search results into.

See memoryd/wire/shm.py for the protocol. Here: a small pool, so that each search
in flight (a forward's `start` overlapping another's, several threads) has a
buffer of its own, sized by what the replies turned out to need:

  * a search takes a free buffer if there is one, else goes inline (socket);
  * after the search, a buffer that was too small is swapped for one twice
    the size, and a missing one is opened (up to MAX_BUFFERS), so from the
    second search of a kind on, replies come through shared memory;
  * a buffer whose search failed is dropped, never reused: a cancelled call
    may still be writing into it;
  * when the daemon has no room for a size (its --shm-bytes, or a small
    /dev/shm as in a default container), that size and larger ones are not
    asked for again for RETRY_AFTER_S: a refused open costs an RPC;
  * when the daemon cannot offer buffers (off, full, older) or the client
    cannot map them (another host or /dev/shm), the pool turns itself off
    and says why in `off_reason`; searches go on through the socket.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from memoryd import errors
from memoryd.v1 import memory_pb2 as pb
from memoryd.wire import shm

log = logging.getLogger("memoryd.client")

MAX_BUFFERS = 4               # searches in flight at once that use shared memory
MIN_REPLY_BYTES = 64 << 10    # smaller replies stay inline: the socket is as fast
MIN_BUFFER_BYTES = 1 << 20
RETRY_AFTER_S = 60.0          # after the daemon had no room for a size, before asking again


def buffer_size(needed: int) -> int:
    """A power of two >= needed (and >= 1 MiB), so a growing workload reopens rarely."""
    size = MIN_BUFFER_BYTES
    while size < needed:
        size *= 2
    return size


class ReplyBufferPool:
    def __init__(self, open_rpc: Callable[[int], pb.ReplyBuffer], close_rpc: Callable[[str], None]):
        self._open_rpc, self._close_rpc = open_rpc, close_rpc
        self._free: list[shm.MappedReplyBuffer] = []
        self._count = 0                          # open buffers, free or in use
        self._lock = threading.Lock()
        self._refused: tuple[int, float] | None = None   # (size, when) of the last "no room"
        self._closed = False
        self.off_reason: str | None = None

    def take(self) -> shm.MappedReplyBuffer | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, buf: shm.MappedReplyBuffer | None, needed: int) -> None:
        """Return buf after a search whose reply needed `needed` bytes."""
        if buf is not None and self._closed:     # the client closed during this search
            self.drop(buf)
            return
        if buf is not None and buf.size >= needed:
            with self._lock:
                self._free.append(buf)
            return
        if buf is not None:                      # too small: replaced below
            self.drop(buf)
        if self.off_reason is not None or not MIN_REPLY_BYTES <= needed <= shm.MAX_BUFFER_BYTES:
            return
        size = buffer_size(needed)
        if self._refused is not None and size >= self._refused[0] \
                and time.monotonic() - self._refused[1] < RETRY_AFTER_S:
            return
        with self._lock:
            if self._count >= MAX_BUFFERS:
                return
            self._count += 1                     # reserved before the RPC: no overshoot
        new = self._open(size)
        with self._lock:
            if new is None:
                self._count -= 1
            else:
                self._free.append(new)

    def drop(self, buf: shm.MappedReplyBuffer) -> None:
        """Close a buffer for good (too small, or its search failed)."""
        with self._lock:
            self._count -= 1
        buf.close()
        try:
            self._close_rpc(buf.handle)
        except (errors.MemorydError, ValueError):  # already gone (idle, restart); channel closed
            pass

    def close(self) -> None:
        with self._lock:
            bufs, self._free = self._free, []
            self._closed = True
        for buf in bufs:
            self.drop(buf)
        self.off_reason = self.off_reason or "client closed"

    def _open(self, size: int) -> shm.MappedReplyBuffer | None:
        try:
            info = self._open_rpc(size)
        except errors.MemorydError as e:          # off, full, or a daemon without buffers
            if getattr(e, "code", "") == "UNIMPLEMENTED" or isinstance(e, errors.FailedPrecondition):
                self._turn_off(f"the daemon offers no reply buffers: {e}")
            else:                                # no room: not this size again for a while
                self._refused = (size, time.monotonic())
                log.debug("no reply buffer of %d bytes: %s", size, e)
            return None
        try:
            return shm.MappedReplyBuffer(info.handle, info.path, info.size_bytes, info.data_offset)
        except (OSError, ValueError) as e:       # not this host's /dev/shm
            try:
                self._close_rpc(info.handle)
            except errors.MemorydError:
                pass
            self._turn_off(f"cannot map the daemon's reply buffer {info.path}: {e}")
            return None

    def _turn_off(self, reason: str) -> None:
        if self.off_reason is None:
            self.off_reason = reason
            log.info("reply buffers off, replies go through the socket: %s", reason)
