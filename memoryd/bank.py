"""A memory bank: N shards, each a FAISS index over explicit 64-bit ids plus
the rows (ids, keys, values) that the index was built from.

Ids are routed to shard `id % shards`, so any id finds its shard without a
lookup table. Ids are assigned by the bank (monotonic, never reused, even
after removals) unless the caller brings its own. Keys are kept beside the
index so that search can return exact key vectors (for gradients), export
can dump the bank, and the index can always be rebuilt.

Concurrency: one writer-preferring readers/writer lock per bank. Searches
share it; writes take it alone. Callers (memoryd.local) hold it around a
whole request, including the quota reservation.
"""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from memoryd.faiss_index import faiss  # the one import, with its install hint
import numpy as np

from memoryd import faiss_index as fx
from memoryd import faults, tiers
from memoryd.api import BankSpec, ExportChunk
from memoryd.arrays import value_dtype
from memoryd.errors import InvalidArgument
from memoryd.store import ShardStore, atomic_write_json, folder_bytes

META = "bank.json"
TEMPLATE = "trained.faiss"
INTENT = "intent.json"   # an add in progress across shards: rolled back on open


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Shard:
    """One shard: its rows (memoryd.store) and its index on the bank's tier."""

    def __init__(self, path: Path, spec: BankSpec, template: "faiss.Index"):
        self.spec, self.template = spec, template
        self.store = ShardStore(path, spec.dim, spec.value_dim, value_dtype(spec.value_dtype))
        self.index = self._placed(fx.empty_like(template), None)

    def _placed(self, index: "faiss.Index", snapshot: Path | None):
        return tiers.place(self.spec.tier, index, snapshot, self.spec.index, self.spec.metric)

    def create(self) -> None:
        self.store.create()

    def load(self) -> None:
        """Rows from disk, index from its snapshot plus a replay of newer rows."""
        store = self.store
        store.load(mapped=self.spec.tier == "mmap")
        snap, covered = store.index_file(), store.state["index_rows"]
        if not (snap.exists() and covered <= store.rows):  # none, or ahead of a rolled-back add
            snap, covered = None, 0
        if snap is not None and self.spec.tier == "mmap":
            self.index = self._placed(fx.empty_like(self.template), snap)
        else:
            cpu = (fx.configure(faiss.read_index(str(snap)), self.spec.index) if snap is not None
                   else fx.empty_like(self.template))
            self.index = self._placed(cpu, None)
        if covered < store.rows:
            self.index.add_with_ids(store.keys.data[covered:], store.ids.data[covered:])

    def add(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None) -> None:
        self.store.append(ids, keys, values)     # acknowledged on disk first
        self.index.add_with_ids(keys, ids)

    def remove(self, ids: np.ndarray) -> int:
        _, found = self.store.lookup(ids)
        gone = ids[found]
        if not len(gone):
            return 0
        keep = ~np.isin(self.store.ids.data, gone)
        if self.spec.tier == "ram" and fx.supports_remove(self.index):
            self.index.remove_ids(gone)
            self.store.rewrite(keep, lambda p: _write_index(self.index, p))
            return int(len(gone))
        # HNSW cannot delete, a mapped snapshot is read-only, a GPU index is a
        # copy: rebuild this shard's index in RAM from what stays
        rebuilt = fx.empty_like(self.template)
        rebuilt.add_with_ids(self.store.keys.data[keep], self.store.ids.data[keep])
        self.store.rewrite(keep, lambda p: _write_index(rebuilt, p))
        self.index = (self._placed(fx.empty_like(self.template), self.store.index_file())
                      if self.spec.tier == "mmap" else self._placed(rebuilt, None))
        return int(len(gone))

    def cpu_index(self) -> "faiss.Index":
        """The whole index as an in-RAM FAISS index (to write a snapshot)."""
        if isinstance(self.index, tiers.GpuIndex):
            return self.index.cpu()
        if not isinstance(self.index, tiers.MappedIndex):
            return self.index
        covered = self.store.state["index_rows"] if self.index.base is not None else 0
        full = (fx.configure(faiss.read_index(str(self.store.index_file())), self.spec.index)
                if covered else fx.empty_like(self.template))
        full.add_with_ids(self.store.keys.data[covered:], self.store.ids.data[covered:])
        return full

    def checkpoint(self) -> None:
        """Snapshot the index so the next open need not replay rows."""
        snap = self.store.index_file()
        if self.store.state["index_rows"] != self.store.rows or not snap.exists():
            _write_index(self.cpu_index(), snap)
            self.store.save_state(index_rows=self.store.rows)
            if self.spec.tier == "mmap":  # fold the RAM part into the mapped snapshot
                self.index = self._placed(fx.empty_like(self.template), snap)

    def set_tier(self, spec: BankSpec) -> None:
        """Snapshot, then reopen rows and index on spec.tier."""
        self.checkpoint()
        self.spec = spec
        self.load()


def _write_index(index: "faiss.Index", path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)


class Bank:
    def __init__(self, path: Path, spec: BankSpec):
        self.path, self.spec = Path(path), spec
        self.lock = RWLock()
        self.frozen = False       # mirrors the catalog, set by memoryd.local
        self.next_id = 0
        self.template = fx.build(spec.dim, spec.index, spec.metric)
        self.shards: list[Shard] = []

    # ---- life cycle -----------------------------------------------------------
    def create(self) -> "Bank":
        self.path.mkdir(parents=True, exist_ok=False)
        self.shards = [Shard(self._shard_path(i), self.spec, self.template)
                       for i in range(self.spec.shards)]
        for s in self.shards:
            s.create()
        self._save_meta()
        return self

    def open(self) -> "Bank":
        meta = json.loads((self.path / META).read_text())
        self.next_id = int(meta["next_id"])
        self._roll_back_torn_add()
        if (self.path / TEMPLATE).exists():
            self.template = fx.configure(faiss.read_index(str(self.path / TEMPLATE)), self.spec.index)
        self.shards = [Shard(self._shard_path(i), self.spec, self.template)
                       for i in range(self.spec.shards)]
        for s in self.shards:
            s.load()
        # ids written by an add whose meta update was torn must never be reused
        self.next_id = max([self.next_id] + [int(s.store.ids.data.max()) + 1
                                             for s in self.shards if s.store.rows])
        return self

    def _shard_path(self, i: int) -> Path:
        return self.path / f"shard-{i:03d}"

    def _save_meta(self) -> None:
        atomic_write_json(self.path / META, {"next_id": self.next_id, "spec": self.spec.index})

    def checkpoint(self) -> None:
        for s in self.shards:
            s.checkpoint()
        self._save_meta()

    def set_tier(self, tier: str) -> None:
        """Move every shard to tier (caller holds the write lock: no write is
        lost and searches wait for the move instead of failing)."""
        self.spec = self.spec.with_(tier=tier)
        for s in self.shards:
            s.set_tier(self.spec)

    def tier_bytes(self) -> dict[str, int]:
        """Where the bytes of nbytes() sit, and what the files take on disk."""
        store = sum(s.store.nbytes() for s in self.shards)
        index = self.nbytes() - store
        disk = sum(s.store.disk_bytes() for s in self.shards) + folder_bytes(self.path)
        if self.spec.tier == "mmap":  # rows and flat codes are paged in from disk
            codes = self.count * fx.code_bytes(self.template, self.spec.dim)
            return {"ram": index - codes, "disk": disk}
        if self.spec.tier == "gpu":
            return {"ram": store, "gpu": index, "disk": disk}
        return {"ram": store + index, "disk": disk}

    def delete_files(self) -> None:
        for s in self.shards:
            s.store.delete_files()
        for p in self.path.glob("*"):
            p.unlink()
        self.path.rmdir()

    # ---- sizes ------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(s.store.rows for s in self.shards)

    @property
    def trained(self) -> bool:
        return bool(self.template.is_trained)

    def row_bytes(self, template: "faiss.Index | None" = None) -> int:
        """Bytes one row costs: its id, key and value, and its index entry."""
        t = template or self.template
        vbytes = self.spec.value_dim * value_dtype(self.spec.value_dtype).itemsize
        return 8 + 4 * self.spec.dim + vbytes + fx.bytes_per_vector(t, self.spec.dim)

    def nbytes(self, rows: int | None = None, template: "faiss.Index | None" = None) -> int:
        """What the bank holds (or would hold with `rows` rows and `template`).

        An empty bank counts as 0: the few header bytes of an empty index are
        not charged, so creating a bank or opening a session never needs
        quota; the index's fixed bytes (e.g. trained centroids) are charged
        with its first rows.
        """
        t = template or self.template
        rows = self.count if rows is None else rows
        return self.spec.shards * fx.fixed_bytes(t) + rows * self.row_bytes(t) if rows else 0

    # ---- writes (caller holds lock.write()) ---------------------------------------
    def trained_template(self, keys: np.ndarray) -> "faiss.Index":
        """The template after training on keys if it needs training (not installed)."""
        if self.template.is_trained:
            return self.template
        t = fx.empty_like(self.template)
        fx.train(t, keys, self.spec.index)
        return t

    def new_ids(self, n: int, ids: np.ndarray | None) -> np.ndarray:
        if ids is None:
            return np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        if len(ids) != n:
            raise InvalidArgument(f"got {len(ids)} ids for {n} keys")
        if (ids < 0).any():
            raise InvalidArgument("ids must be >= 0 (-1 marks a missing result)")
        if len(np.unique(ids)) != n:
            raise InvalidArgument("ids repeat within the batch")
        present = self.get_rows(ids)[1]
        if present.any():
            raise InvalidArgument(
                f"{int(present.sum())} ids already exist in bank '{self.spec.name}', "
                f"e.g. {int(ids[present][0])}")
        return ids

    def add(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None,
            template: "faiss.Index") -> None:
        if template is not self.template:  # first add trained the index
            _write_index(template, self.path / TEMPLATE)
            self.template = template
            for s in self.shards:
                s.template = template
                s.index = s._placed(fx.empty_like(template), None)
        if self.spec.shards == 1:  # one state.json replace commits the whole add
            self.shards[0].add(ids, keys, values)
        else:
            self._add_across_shards(ids, keys, values)
        # not saved here: open() derives it from the row files; remove() saves it
        self.next_id = max(self.next_id, int(ids.max()) + 1)

    def _add_across_shards(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None) -> None:
        """All shards take their rows, or (after a crash half way) none do.

        The intent file records each shard's row count before the add; it is
        removed once every shard has acknowledged, and open() rolls the
        shards back to those counts if it finds it.
        """
        atomic_write_json(self.path / INTENT, {"rows": [s.store.rows for s in self.shards]})
        route = ids % self.spec.shards
        for i, s in enumerate(self.shards):
            sel = route == i
            if sel.any():
                s.add(ids[sel], keys[sel], values[sel] if values is not None else None)
                faults.point("bank.add:between-shards")
        (self.path / INTENT).unlink()

    def _roll_back_torn_add(self) -> None:
        intent = self.path / INTENT
        if not intent.exists():
            return
        before = json.loads(intent.read_text())["rows"]
        for i, rows in enumerate(before):
            store = ShardStore(self._shard_path(i), self.spec.dim, self.spec.value_dim,
                               value_dtype(self.spec.value_dtype))
            state = json.loads((store.path / "state.json").read_text())
            if state["rows"] > rows:
                store.state = state
                store.save_state(rows=rows)  # a snapshot past `rows` is rebuilt by load()
        intent.unlink()

    def update_values(self, ids: np.ndarray, values: np.ndarray) -> int:
        shard_of, rows, found = self.get_rows(ids)
        for i, s in enumerate(self.shards):
            sel = found & (shard_of == i)
            if sel.any():
                s.store.update_values(rows[sel], values[sel])
        return int(found.sum())

    def remove(self, ids: np.ndarray) -> int:
        self._save_meta()  # the largest id may go: never hand it out again
        route = ids % self.spec.shards
        return sum(s.remove(ids[route == i]) for i, s in enumerate(self.shards))

    def checksum(self) -> str:
        """sha256 over every shard's rows: what a frozen bank promises to hold."""
        h = hashlib.sha256()
        for s in self.shards:
            for col in (s.store.ids, s.store.keys, s.store.values):
                if col is not None:
                    h.update(np.ascontiguousarray(col.data).tobytes())
        return "sha256:" + h.hexdigest()

    # ---- reads (caller holds lock.read()) -------------------------------------------
    def search_shard(self, i: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.shards[i].index
        if index.ntotal == 0:  # also spares an untrained IVF from FAISS's error
            nq = len(queries)
            return np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
        return index.search(queries, k)

    def get_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, row, found) for each id."""
        if self.spec.shards == 1:
            rows, found = self.shards[0].store.lookup(ids)
            return np.zeros(len(ids), np.int64), rows, found
        shard_of = ids % self.spec.shards
        rows = np.zeros(len(ids), np.int64)
        found = np.zeros(len(ids), bool)
        for i, s in enumerate(self.shards):
            sel = shard_of == i
            if sel.any():
                rows[sel], found[sel] = s.store.lookup(ids[sel])
        return shard_of, rows, found

    def gather(self, ids: np.ndarray, *, keys: bool, values: bool, out_values_dtype=None):
        """(found, keys, values) for any-shaped ids; missing (-1, unknown) -> zeros."""
        flat = ids.reshape(-1)
        shard_of, rows, found = self.get_rows(flat)
        vdt = out_values_dtype or value_dtype(self.spec.value_dtype)
        if self.spec.shards == 1 and self.shards[0].store.rows:  # hot path: one gather per column
            store = self.shards[0].store
            k_out = store.keys.data[rows] if keys else None
            v_out = store.values.data[rows].astype(vdt, copy=False) if values else None
            if not found.all():
                for out in (k_out, v_out):
                    if out is not None:
                        out[~found] = 0
        else:
            k_out = np.zeros((len(flat), self.spec.dim), np.float32) if keys else None
            v_out = np.zeros((len(flat), self.spec.value_dim), vdt) if values else None
            for i, s in enumerate(self.shards):
                sel = found & (shard_of == i)
                if not sel.any():
                    continue
                if k_out is not None:
                    k_out[sel] = s.store.keys.data[rows[sel]]
                if v_out is not None:
                    v_out[sel] = s.store.values.data[rows[sel]]
        shape = ids.shape
        return (found.reshape(shape),
                None if k_out is None else k_out.reshape(*shape, self.spec.dim),
                None if v_out is None else v_out.reshape(*shape, self.spec.value_dim))

    def export_chunks(self, chunk_rows: int) -> Iterator[ExportChunk]:
        for s in self.shards:
            for start in range(0, s.store.rows, chunk_rows):
                end = min(s.store.rows, start + chunk_rows)
                vals = s.store.values.data[start:end].copy() if s.store.values is not None else None
                yield ExportChunk(ids=s.store.ids.data[start:end].copy(),
                                  keys=s.store.keys.data[start:end].copy(), values=vals)
