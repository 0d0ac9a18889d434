"""The rows of one shard (ids, keys, values, and a session's scores): in
memory, and in files as of the bank's last checkpoint.

On disk (a shard's folder; which generation and how many rows count is
the bank's checkpoint record, memoryd.storage.bank):

    ids.<g>.bin             int64 little-endian, one per row, in insertion order
    keys.<g>.bin            float32 (n, dim)
    values.<g>.bin          value dtype (n, value_dim), absent for key-only banks
    scores.<g>.bin          float32 (n,), session banks only (NaN: no score)

Between checkpoints the bank's write-ahead log holds the changes and these
files are not modified: a checkpoint either appends the new rows after the
`rows` its predecessor counted (bytes past that count belong to no
checkpoint, so writing them cannot damage one) or, once rows were updated or
removed, writes a whole new generation. The mmap tier reads the columns
straight from the files, so its appends write their bytes past the count at
once (still no checkpoint's), and its updates and removes re-lay the bank.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from memoryd.storage.files import as_bytes, write_durably

# Row files are raw native-order arrays; the format is little-endian.
assert sys.byteorder == "little", "memoryd's storage format needs a little-endian host"


class _Column:
    """A growable (n, width) array with amortised O(1) append."""

    persist = True         # written to the shard's files (IndexKeys: not)

    def __init__(self, width: int, dtype: np.dtype):
        self.width, self.dtype = width, np.dtype(dtype)
        self._buf = np.empty(self._shape(0), self.dtype)
        self.n = 0

    def _shape(self, n: int) -> tuple[int, ...]:
        return (n, self.width) if self.width else (n,)

    @property
    def data(self) -> np.ndarray:
        return self._buf[: self.n]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * max(1, self.width)

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._buf):
            cap = max(need, 2 * len(self._buf), 1024)
            grown = np.empty(self._shape(cap), self.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n: need] = rows
        self.n = need

    def replace(self, rows: np.ndarray) -> None:
        self._buf = np.array(rows, self.dtype)
        self.n = len(self._buf)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (a copy)."""
        return self.data[rows]

    def slice(self, start: int, end: int) -> np.ndarray:
        """Rows start..end (a view where it can be)."""
        return self.data[start:end]

    def keep(self, keep: np.ndarray) -> None:
        self.replace(self.data[keep])

    def read(self, path: Path, n: int) -> None:
        count = n * max(1, self.width)
        raw = np.fromfile(path, dtype=self.dtype, count=count)
        if raw.size != count:
            raise OSError(f"{path} holds {raw.size} of the {count} items its checkpoint counts")
        self.replace(raw.reshape(self._shape(n)))

    def map(self, path: Path, n: int) -> None:
        """Read rows straight from the file (read-only, paged in on demand)."""
        self._buf = (np.memmap(path, dtype=self.dtype, mode="r", shape=self._shape(n)) if n
                     else np.empty(self._shape(0), self.dtype))
        self.n = n


class _Tail:
    """Rows appended at the end and taken from the front (a growing segment's
    keys, sealed into the index first in, first out), amortised O(1) both ways."""

    def __init__(self, width: int):
        self.width = width
        self._buf = np.empty((0, width), np.float32)
        self._start = self._end = 0

    @property
    def n(self) -> int:
        return self._end - self._start

    @property
    def data(self) -> np.ndarray:
        return self._buf[self._start:self._end]

    def append(self, rows: np.ndarray) -> None:
        if self._end + len(rows) > len(self._buf):      # grow, dropping the taken front
            n = self.n
            grown = np.empty((max(n + len(rows), 2 * n, 1024), self.width), np.float32)
            grown[:n] = self.data
            self._buf, self._start, self._end = grown, 0, n
        self._buf[self._end:self._end + len(rows)] = rows
        self._end += len(rows)

    def drop_front(self, n: int) -> None:
        self._start += n
        if self._start >= self._end:                     # all taken: free the buffer
            self.replace(np.empty((0, self.width), np.float32))
        elif self._start > len(self._buf) // 2:          # mostly taken: keep what is left
            self.replace(self.data)

    def replace(self, rows: np.ndarray) -> None:
        self._buf = np.array(rows, np.float32).reshape(-1, self.width)
        self._start, self._end = 0, len(self._buf)


class IndexKeys:
    """The key column of a shard whose index holds the exact vectors in row
    order (HNSW over a flat storage, on the ram tier): a view of the index's
    own vectors, so each key is held once. Its file is the index snapshot:
    nothing is written for it. The keys of the rows the index does not hold
    yet (the growing segment, memoryd.storage.segments) follow in `tail`,
    until sealing moves them into the index (sealed()); a checkpoint writes
    them in a file of their own (shard.Shard.write_checkpoint). Between a
    removal and the index rebuilt from what stays (shard.Shard.remove), and
    on an open that reads a key file, it holds a RAM copy of every key
    (`pending`) until settle() or to_tail()."""

    persist = False

    def __init__(self, dim: int, vectors):
        self.width, self.dtype = dim, np.dtype(np.float32)
        self.vectors = vectors             # () -> the index's (n, dim) float32 view
        self.pending: np.ndarray | None = None
        self.tail = _Tail(dim)             # keys of the rows after the index's

    @property
    def data(self) -> np.ndarray:
        """Every key in row order (a copy when some are growing)."""
        if self.pending is not None:
            return self.pending
        if not self.tail.n:
            return self.vectors()
        return np.concatenate([self.vectors(), self.tail.data])

    @property
    def n(self) -> int:
        return len(self.pending) if self.pending is not None else len(self.vectors()) + self.tail.n

    @property
    def row_bytes(self) -> int:
        return 4 * self.width

    def take(self, rows: np.ndarray) -> np.ndarray:
        if self.pending is not None:
            return self.pending[rows]
        v = self.vectors()
        if not self.tail.n:
            return v[rows]
        out = np.empty((len(rows), self.width), np.float32)
        low = rows < len(v)
        out[low] = v[rows[low]]
        out[~low] = self.tail.data[rows[~low] - len(v)]
        return out

    def slice(self, start: int, end: int) -> np.ndarray:
        if self.pending is not None:
            return self.pending[start:end]
        nv = len(self.vectors())
        if start >= nv:
            return self.tail.data[start - nv:end - nv]
        if end <= nv:
            return self.vectors()[start:end]
        return self.data[start:end]

    def append(self, rows: np.ndarray) -> None:
        self.tail.append(rows)             # growing until sealed() into the index

    def sealed(self, n: int) -> None:
        """The index took the first n growing keys."""
        self.tail.drop_front(n)

    def keep(self, keep: np.ndarray) -> None:
        nv = len(self.vectors()) if self.pending is None else -1
        if nv >= 0 and keep[:nv].all():        # only growing rows leave: the index stays
            self.tail.replace(self.tail.data[keep[nv:]])
        else:                                  # the index must be rebuilt (or emptied)
            self.replace(self.data[keep])

    def replace(self, rows: np.ndarray) -> None:
        self.pending = np.array(rows, self.dtype)
        self.tail.replace(np.empty((0, self.width), np.float32))

    def read(self, path: Path, n: int) -> None:
        """Keys the snapshot may lack: from a key file if one is there (an older
        layout, or a bank that was on another tier)."""
        self.pending = None
        self.tail.replace(np.empty((0, self.width), np.float32))
        if path.exists() and os.path.getsize(path) >= n * self.row_bytes:
            self.pending = np.fromfile(path, np.float32, count=n * self.width).reshape(n, self.width)

    def settle(self) -> None:
        """The index holds every key."""
        self.pending = None
        self.tail.replace(np.empty((0, self.width), np.float32))

    def to_tail(self, start: int) -> None:
        """The index holds the first `start` keys of `pending`; the rest grow."""
        rows = self.pending[start:]
        self.pending = None
        self.tail.replace(rows)


class ShardStore:
    def __init__(self, path: Path, dim: int, value_dim: int, value_dtype: np.dtype,
                 scores: bool = False):
        self.path = Path(path)
        self.value_dim = value_dim
        self.ids = _Column(0, np.int64)
        self.keys = _Column(dim, np.float32)
        self.values = _Column(value_dim, value_dtype) if value_dim else None
        self.scores = _Column(0, np.float32) if scores else None
        self.gen = 0            # the generation of the row files
        self.persisted = 0      # rows whose bytes are in the files (>= the checkpoint's)
        self.relaid = False     # rows changed in place or left: the next checkpoint re-lays
        self.mapped = False     # tier mmap: columns read from the files, not RAM copies
        # sorted view of ids for vectorised id -> row lookups
        self._sorted_ids = np.empty(0, np.int64)
        self._sorted_rows = np.empty(0, np.int64)
        self._progression: tuple[int, int] | None = None

    # ---- files -------------------------------------------------------------
    def _file(self, name: str, gen: int | None = None) -> Path:
        return self.path / f"{name}.{self.gen if gen is None else gen}.bin"

    def _columns(self) -> list[tuple[str, _Column]]:
        cols = [("ids", self.ids), ("keys", self.keys)]
        cols += [("values", self.values)] if self.values is not None else []
        return cols + ([("scores", self.scores)] if self.scores is not None else [])

    def _persisted(self) -> list[tuple[str, _Column]]:
        return [(name, col) for name, col in self._columns() if col.persist]

    def files(self) -> list[Path]:
        """The row files of the current generation (what a snapshot copies)."""
        return [self._file(name) for name, _ in self._persisted()]

    def keys_in_index(self, vectors) -> None:
        """Serve the key column from the index's own vectors (IndexKeys)."""
        self.keys = IndexKeys(self.keys.width, vectors)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name, _ in self._persisted():
            self._file(name).touch()

    def load(self, gen: int, rows: int, mapped: bool = False) -> None:
        """The checkpoint's rows: generation gen, the first `rows` of each file."""
        self.gen, self.mapped, self.persisted, self.relaid = gen, mapped, rows, False
        for name, col in self._columns():
            path = self._file(name)
            if not path.exists() and name == "scores":   # a v1 session bank: no scores yet
                np.full(rows, np.nan, np.float32).tofile(path)
            if not col.persist:
                col.read(path, rows)
                continue
            if mapped:
                if os.path.getsize(path) < rows * col.row_bytes:
                    raise OSError(f"{path} is shorter than the {rows} rows its checkpoint counts")
                col.map(path, rows)
            else:
                col.read(path, rows)
        self._resort()

    def to_ram(self) -> None:
        """Copy mapped columns into RAM (before rows change in place)."""
        if self.mapped:
            for _, col in self._persisted():
                col.replace(np.array(col.data))
            self.mapped = False

    # ---- rows --------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.ids.n

    def append(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None,
               scores: np.ndarray | None) -> None:
        parts = {"ids": ids, "keys": keys, "values": values, "scores": scores}
        if self.scores is not None and scores is None:
            parts["scores"] = np.full(len(ids), np.nan, np.float32)
        start = self.rows
        if self.mapped:   # past every checkpoint's rows: see the module doc
            self._write_tail({name: parts[name] for name, _ in self._persisted()}, start)
            for name, col in self._persisted():
                col.map(self._file(name), start + len(ids))
            self.persisted = start + len(ids)
        else:
            for name, col in self._columns():
                col.append(parts[name])
        self._index_new_ids(ids, start)

    def update_values(self, rows: np.ndarray, values: np.ndarray) -> None:
        self.values.data[rows] = values            # RAM columns (the bank unmaps first)
        self.relaid = True

    def keep(self, keep: np.ndarray) -> None:
        """Keep only the rows where keep is True (in order)."""
        for _, col in self._columns():
            col.keep(keep)
        self.relaid = True
        self._resort()

    # ---- checkpoints ---------------------------------------------------------
    def write_checkpoint(self) -> dict:
        """Put every row in the files, fsync'd; the checkpoint record for them.
        Old-generation files stay until drop_stale() (the record switches first)."""
        if self.relaid:
            gen = self.gen + 1
            for name, col in self._persisted():
                write_durably(self._file(name, gen), as_bytes(col.data))
            self.gen, self.relaid = gen, False
        elif self.persisted < self.rows or self.mapped:
            tail = {name: col.data[self.persisted:] for name, col in self._persisted()}
            self._write_tail(tail, self.persisted, sync=True)
        self.persisted = self.rows
        return {"gen": self.gen, "rows": self.rows}

    def _write_tail(self, parts: dict[str, np.ndarray], start: int, sync: bool = False) -> None:
        from memoryd.errors import StorageUnwritable
        for name, col in self._persisted():
            path = self._file(name)
            try:
                with open(path, "r+b") as f:
                    f.seek(start * col.row_bytes)
                    f.write(as_bytes(parts[name]))
                    f.truncate()
                    if sync:
                        f.flush()
                        os.fsync(f.fileno())
            except OSError as e:
                raise StorageUnwritable.from_os_error(e, path) from None

    def drop_stale(self) -> None:
        """Delete row files of generations before the current one."""
        keep = {p.name for p in self.files()}
        for p in self.path.glob("*.bin"):
            if p.name not in keep:
                p.unlink(missing_ok=True)

    # ---- id -> row ----------------------------------------------------------
    # Bank-assigned ids make a shard's ids an arithmetic progression in row
    # order (id = first + step * row, step = the shard count), and then a
    # lookup is arithmetic. Otherwise (explicit ids, removals) a sorted copy
    # of the ids answers it with a binary search.
    def _resort(self) -> None:
        ids = self.ids.data
        self._progression = _progression(ids)
        order = np.argsort(ids, kind="stable")
        self._sorted_ids, self._sorted_rows = ids[order], order.astype(np.int64)

    def _index_new_ids(self, ids: np.ndarray, start: int) -> None:
        rows = np.arange(start, start + len(ids), dtype=np.int64)
        if len(self._sorted_ids) == 0 or ids.min() > self._sorted_ids[-1]:
            if np.all(ids[1:] > ids[:-1]):  # the common case: bank-assigned ids
                self._sorted_ids = np.concatenate([self._sorted_ids, ids])
                self._sorted_rows = np.concatenate([self._sorted_rows, rows])
                self._progression = self._extended_progression(ids, start)
                return
        self._resort()

    def _extended_progression(self, ids: np.ndarray, start: int) -> tuple[int, int] | None:
        """The progression after appending ids at row start, in O(len(ids))."""
        if start == 0:
            return _progression(ids)
        if self._progression is None:
            return None
        first, step = self._progression
        if start == 1:  # a single row fixes no step yet
            step = int(ids[0]) - first
        expect = first + step * np.arange(start, start + len(ids), dtype=np.int64)
        return (first, step) if step > 0 and np.array_equal(ids, expect) else None

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) for ids; rows are 0 where not found."""
        n = len(self._sorted_ids)
        if n == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        if self._progression is not None:
            first, step = self._progression
            off = ids - first
            rows = off // step
            found = (off >= 0) & (rows < n) & (off - rows * step == 0)
            return np.where(found, rows, 0), found
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, n - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._sorted_rows[pos], 0), found

    def nbytes(self) -> int:
        """Bytes of the columns this store holds itself (IndexKeys: the index's)."""
        return sum(col.data.nbytes for _, col in self._persisted())

    def disk_bytes(self) -> int:
        return folder_bytes(self.path)

    def delete_files(self) -> None:
        for p in self.path.glob("*"):
            p.unlink()
        self.path.rmdir()


def folder_bytes(path: Path) -> int:
    """Bytes of the files directly in path (a file, or path itself, may vanish
    while we look: a bank being deleted)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _progression(ids: np.ndarray) -> tuple[int, int] | None:
    """(first, step) if ids[r] == first + step * r for every row r, else None."""
    if len(ids) < 2:
        return (int(ids[0]), 1) if len(ids) else None
    step = int(ids[1] - ids[0])
    if step <= 0 or not np.array_equal(np.diff(ids), np.full(len(ids) - 1, step)):
        return None
    return int(ids[0]), step
