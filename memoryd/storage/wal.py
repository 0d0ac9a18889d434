"""The write-ahead log of one bank: every write is a record here before it
touches the bank's memory, and a record is the unit of all-or-nothing.

A write (an add with the evictions it needs, a value update, a remove, a
session append with its scores, a promote's remove) is ONE record, whatever
the bank's shard count: recovery replays it whole or, if the record is torn,
not at all. Records since the last checkpoint live here; a checkpoint
(memoryd.storage.bank) writes the bank's files and empties the log.

On disk, `wal.log` is a sequence of records

    u64 payload length | u32 crc32(lsn bytes + payload) | u64 lsn | payload

and a payload is a sequence of ops, each `u8 op | u8 n arrays | n x .npy`
(numpy's own format: dtype and shape travel with the bytes). LSNs rise by
one per record. Reading stops at the first record that is short, fails its
checksum or breaks the LSN sequence (a write torn by a crash or power loss):
the file is cut there, so a torn tail is dropped, never replayed.

Acknowledgement levels (what a reply promises, chosen per call):
    applied   the record is written (in the OS page cache) and the bank's
              memory updated: reads see it, a crash of the process keeps it;
              power loss may take the last ones back (never half of one).
    durable   also fdatasync'd before the reply: it survives power loss.
Durable waits share their fsyncs (group commit, `sync`): writers append
under the bank's write lock, then wait outside it, and one fdatasync covers
every record written by then, so N concurrent durable writers pay ~1 fsync.
"""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from memoryd import telemetry
from memoryd.errors import InvalidArgument, StorageUnwritable

LOG = "wal.log"
ACKS = ("applied", "durable")
DEFAULT_ACK = "applied"
_HEAD = struct.Struct("<QIQ")              # length, crc32, lsn
MAX_RECORD = 1 << 40                       # a sanity bound on a length read from disk

# op codes: what a record asks the bank to do, in order
ADD, UPDATE, REMOVE, MOVED = 1, 2, 3, 4
OP_NAMES = {ADD: "add", UPDATE: "update", REMOVE: "remove", MOVED: "moved"}
# MOVED(source name as uint8 bytes, ids) rides with the ADD of a promote with
# move: those ids left the source bank (memoryd.engine.banks.move_rows).


# A bank checkpoints after a write once its log holds this much, or a quarter
# of the bank, whichever is more: replay on open stays short, checkpoints rare.
CHECKPOINT_LOG_BYTES = 64 << 20


def checkpoint_due(log_bytes: int, bank_bytes: int) -> bool:
    return log_bytes > max(CHECKPOINT_LOG_BYTES, bank_bytes // 4)


def check_ack(ack: str | None) -> str:
    """The ack level, or InvalidArgument naming the ones there are."""
    if ack is None or ack == "":
        return DEFAULT_ACK
    if ack not in ACKS:
        raise InvalidArgument(f"ack must be one of {', '.join(ACKS)}; got {ack!r}")
    return ack


@dataclass
class Op:
    """One step of a record: ADD(ids, keys, values?, scores?), UPDATE(ids, values),
    REMOVE(ids), MOVED(source, ids). Absent arrays are None."""

    code: int
    arrays: tuple[np.ndarray | None, ...]


def encode(ops: Sequence[Op]) -> memoryview:
    out = io.BytesIO()
    for op in ops:
        present = [a is not None for a in op.arrays]
        out.write(struct.pack("<BBB", op.code, len(op.arrays),
                              sum(bit << i for i, bit in enumerate(present))))
        for a in op.arrays:
            if a is not None:
                np.lib.format.write_array(out, np.ascontiguousarray(a), allow_pickle=False)
    return out.getbuffer()        # the record's bytes, not a copy of them


def decode(payload: bytes) -> list[Op]:
    """The ops of a record. Arrays of a dtype .npy cannot name (bfloat16) come
    back as raw void items of the same size: Op.typed views them as the bank's."""
    src = io.BytesIO(payload)
    ops = []
    while src.tell() < len(payload):
        code, n, mask = struct.unpack("<BBB", src.read(3))
        arrays = tuple(np.lib.format.read_array(src, allow_pickle=False) if mask >> i & 1 else None
                       for i in range(n))
        ops.append(Op(code, arrays))
    return ops


def typed(a: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """a as dtype: a view of a replayed array whose dtype .npy could not name."""
    if a is None or a.dtype == dtype:
        return a
    return a.view(dtype)


def _crc(lsn: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<Q", lsn)))


class WriteAheadLog:
    """The log file of one bank. append() is called under the bank's write
    lock; sync() outside it (group commit, see the module doc)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self.next_lsn = 1
        self.size = 0                       # bytes in the file
        self._cond = threading.Condition()
        self._written = 0                   # highest lsn written to the file
        self._durable = 0                   # highest lsn known fsync'd
        self._syncing = False

    # ---- open / read -------------------------------------------------------------
    def open(self, after_lsn: int) -> Iterator[tuple[int, list[Op]]]:
        """Yield the intact records with lsn > after_lsn (the checkpoint's), in
        order; cut a torn tail off the file; then the log takes appends."""
        self.path.touch(exist_ok=True)
        data = self.path.read_bytes()
        good, expect, records = 0, None, []
        while good + _HEAD.size <= len(data):
            length, crc, lsn = _HEAD.unpack_from(data, good)
            end = good + _HEAD.size + length
            if length > MAX_RECORD or end > len(data):
                break
            payload = data[good + _HEAD.size:end]
            if _crc(lsn, payload) != crc or (expect is not None and lsn != expect):
                break
            records.append((lsn, payload))
            expect, good = lsn + 1, end
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        if good != len(data):               # torn tail: drop it before anything is appended
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self.size = good
        last = records[-1][0] if records else 0
        self.next_lsn = max(after_lsn, last) + 1
        self._written = self._durable = self.next_lsn - 1
        for lsn, payload in records:
            if lsn > after_lsn:
                yield lsn, decode(payload)

    def create(self) -> None:
        self.path.touch(exist_ok=False)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    # ---- write ---------------------------------------------------------------------
    def append(self, ops: Sequence[Op]) -> int:
        """Write one record; its lsn. The bytes are in the file (page cache) on
        return, or an OSError left the file as it was (StorageFull when the
        disk is full or the file may not grow)."""
        payload = encode(ops)
        lsn = self.next_lsn
        head = _HEAD.pack(len(payload), _crc(lsn, payload), lsn)
        size = len(head) + len(payload)
        try:
            written = os.pwritev(self._fd, [head, payload], self.size)   # no copy to join them
            if written != size:
                raise OSError(28, "short write to the write-ahead log")
        except OSError as e:
            os.ftruncate(self._fd, self.size)      # no partial record stays behind
            raise StorageUnwritable.from_os_error(e, self.path) from None
        self.size += size
        telemetry.wal_appended(size)
        self.next_lsn = lsn + 1
        with self._cond:
            self._written = lsn
        return lsn

    def undo(self, lsn: int, size: int) -> None:
        """Take back record lsn, the last one, written at offset size: its
        apply failed, so it must not be replayed either."""
        os.ftruncate(self._fd, size)
        self.size, self.next_lsn = size, lsn
        with self._cond:
            self._written = lsn - 1

    def sync(self, lsn: int) -> None:
        """Return once record lsn is fsync'd; one fdatasync serves every
        record written before it started (group commit)."""
        with self._cond:
            while self._durable < lsn:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing, target = True, self._written
                self._cond.release()
                try:
                    os.fdatasync(self._fd)
                    telemetry.wal_fsynced()
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._durable = max(self._durable, target)
                    self._cond.notify_all()

    def reset(self, checkpoint_lsn: int) -> None:
        """Empty the log once a checkpoint covering every record up to
        checkpoint_lsn is durable (the caller holds the bank's write lock, so no
        record is newer). LSNs go on from there."""
        os.ftruncate(self._fd, 0)
        self.size = 0
        self.next_lsn = max(self.next_lsn, checkpoint_lsn + 1)
        with self._cond:
            self._written = self._durable = max(self._durable, checkpoint_lsn)

    @property
    def last_lsn(self) -> int:
        return self.next_lsn - 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
