"""The rows of one shard (ids, keys, values): in RAM, mirrored to disk.

On disk a shard is a folder:

    state.json              {"generation": g, "rows": n, "index_rows": m}
    ids.<g>.bin             int64 little-endian, one per row, in insertion order
    keys.<g>.bin            float32 (n, dim)
    values.<g>.bin          value dtype (n, value_dim), absent for key-only banks
    index.<g>.faiss         snapshot of the shard's FAISS index covering rows [0, m)

Appends write the row files first and then replace state.json atomically, so
a torn append is invisible: rows beyond state["rows"] are ignored and
overwritten. The index is a derived cache: on open, rows [m, n) are re-added
from the row files (the row files act as the log of adds, which is where a
write-ahead log slots in). Removals write a new generation and switch to it
with the same atomic state.json replace.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

# Row files are raw native-order arrays; the format is little-endian.
assert sys.byteorder == "little", "memoryd's storage format needs a little-endian host"
STATE = "state.json"


def atomic_write_json(path: Path, obj: dict) -> None:
    """Replace path with obj in one rename: a reader (or a restart after the
    process died) sees the old or the new state, never a torn one. No fsync:
    surviving power loss is the write-ahead log's job, not this file's."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class _Column:
    """A growable (n, width) array with amortised O(1) append."""

    def __init__(self, width: int, dtype: np.dtype, data: np.ndarray | None = None):
        self.width, self.dtype = width, np.dtype(dtype)
        shape = (0, width) if width else (0,)
        self._buf = np.empty(shape, self.dtype) if data is None else np.array(data, self.dtype)
        self.n = len(self._buf)

    @property
    def data(self) -> np.ndarray:
        return self._buf[: self.n]

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self._buf):
            cap = max(need, 2 * len(self._buf), 1024)
            grown = np.empty((cap, self.width) if self.width else (cap,), self.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n: need] = rows
        self.n = need

    def replace(self, rows: np.ndarray) -> None:
        self._buf = np.array(rows, self.dtype)
        self.n = len(self._buf)

    def map(self, path: Path, n: int) -> None:
        """Read rows straight from the file (read-only, paged in on demand)."""
        shape = (n, self.width) if self.width else (n,)
        self._buf = (np.memmap(path, dtype=self.dtype, mode="r", shape=shape) if n
                     else np.empty(shape, self.dtype))
        self.n = n


class ShardStore:
    def __init__(self, path: Path, dim: int, value_dim: int, value_dtype: np.dtype):
        self.path = Path(path)
        self.value_dim = value_dim
        self.ids = _Column(0, np.int64)
        self.keys = _Column(dim, np.float32)
        self.values = _Column(value_dim, value_dtype) if value_dim else None
        self.state = {"generation": 0, "rows": 0, "index_rows": 0}
        self.mapped = False    # tier mmap: columns read from the files, not RAM copies
        # sorted view of ids for vectorised id -> row lookups
        self._sorted_ids = np.empty(0, np.int64)
        self._sorted_rows = np.empty(0, np.int64)
        self._progression: tuple[int, int] | None = None

    # ---- files -------------------------------------------------------------
    def _file(self, name: str, gen: int | None = None) -> Path:
        gen = self.state["generation"] if gen is None else gen
        return self.path / f"{name}.{gen}.bin"

    def index_file(self, gen: int | None = None) -> Path:
        gen = self.state["generation"] if gen is None else gen
        return self.path / f"index.{gen}.faiss"

    def _columns(self):
        cols = [("ids", self.ids), ("keys", self.keys)]
        return cols + ([("values", self.values)] if self.values is not None else [])

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for name, _ in self._columns():
            self._file(name).touch()
        atomic_write_json(self.path / STATE, self.state)

    def load(self, mapped: bool = False) -> None:
        """Read state and rows; bytes past the acknowledged rows are dropped."""
        self.state = json.loads((self.path / STATE).read_text())
        self.mapped = mapped
        n = self.state["rows"]
        for name, col in self._columns():
            if mapped:
                col.map(self._file(name), n)
                continue
            shape = (n, col.width) if col.width else (n,)
            count = int(np.prod(shape))
            raw = np.fromfile(self._file(name), dtype=col.dtype, count=count)
            if raw.size != count:
                raise OSError(f"{self._file(name)} holds {raw.size} of {count} acknowledged items")
            col.replace(raw.reshape(shape))
        self._resort()

    def save_state(self, **changes: int) -> None:
        self.state = {**self.state, **changes}
        atomic_write_json(self.path / STATE, self.state)

    # ---- rows --------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.ids.n

    def append(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None) -> None:
        """Append rows to files, then acknowledge them in state.json."""
        start = self.state["rows"]
        parts = [("ids", ids), ("keys", keys)] + ([("values", values)] if self.values is not None else [])
        for name, arr in parts:
            with open(self._file(name), "r+b") as f:
                f.seek(start * arr[:1].nbytes if len(arr) else 0)
                f.write(np.ascontiguousarray(arr).tobytes())
                f.truncate()
        for (name, col), (_, arr) in zip(self._columns(), parts):
            if self.mapped:
                col.map(self._file(name), start + len(arr))
            else:
                col.append(arr)
        self._index_new_ids(ids, start)
        self.save_state(rows=self.rows)

    def update_values(self, rows: np.ndarray, values: np.ndarray) -> None:
        if not self.mapped:  # a mapped column sees the file's new bytes by itself
            self.values.data[rows] = values
        mm = np.memmap(self._file("values"), dtype=self.values.dtype, mode="r+",
                       shape=(self.rows, self.value_dim))
        mm[rows] = values
        mm.flush()
        del mm

    def rewrite(self, keep: np.ndarray, index_writer) -> None:
        """Keep only rows where keep is True, as a new generation.

        index_writer(path) saves the (already updated) index for the new
        generation, so that state.json switches rows and index together.
        """
        old = self.state["generation"]
        new = old + 1
        for name, col in self._columns():
            col.replace(col.data[keep])
            col.data.tofile(self._file(name, new))
            if self.mapped:
                col.map(self._file(name, new), col.n)
        index_writer(self.index_file(new))
        self.save_state(generation=new, rows=self.rows, index_rows=self.rows)
        for name, _ in self._columns():
            self._file(name, old).unlink(missing_ok=True)
        self.index_file(old).unlink(missing_ok=True)
        self._resort()

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
        return sum(col.data.nbytes for _, col in self._columns())

    def disk_bytes(self) -> int:
        return folder_bytes(self.path)

    def delete_files(self) -> None:
        for p in self.path.glob("*"):
            p.unlink()
        self.path.rmdir()


def folder_bytes(path: Path) -> int:
    """Bytes of the files directly in path (a file may vanish while we look)."""
    total = 0
    for entry in os.scandir(path):
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
