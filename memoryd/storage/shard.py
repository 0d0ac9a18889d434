"""One shard of a bank: its rows (memoryd.storage.rows) and its index on the bank's tier.

The rows are the truth and the index is derived from them. Each key is
held once: a Flat bank has no index of its own (FAISS's exact kernel runs
over the key column: FlatRows); an HNSW bank over flat storage in RAM lends
its vectors as the key column (rows.IndexKeys), and its snapshot is the
keys' file. Other indexes hold codes of their own (graph links, centroids,
quantised vectors) beside the key column. Snapshots, written at
checkpoints, spare a rebuild on open; rows newer than one are re-added.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memoryd.api import BankSpec, SearchResult
from memoryd.arrays import value_dtype
from memoryd.storage import faiss_index as fx
from memoryd.storage import tiers
from memoryd.storage.faiss_index import faiss
from memoryd.storage.files import write_durably
from memoryd.storage.rows import IndexKeys, ShardStore, _Column
from memoryd.topk import worst


def keys_in_rows(template: "faiss.Index", tier: str) -> bool:
    """True when the index is a Flat one served from the key column (FlatRows):
    everywhere but the GPU, which needs its own copy of the vectors."""
    inner = faiss.downcast_index(template.index) if isinstance(template, faiss.IndexIDMap) else template
    return type(inner) in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP) and tier != "gpu"


def keys_in_index(template: "faiss.Index", tier: str) -> bool:
    """True when the index holds every key exactly, in row order, and can lend
    them as the key column (rows.IndexKeys): HNSW over a flat storage in RAM."""
    inner = faiss.downcast_index(template.index) if isinstance(template, faiss.IndexIDMap) else template
    return isinstance(inner, faiss.IndexHNSWFlat) and tier == "ram"


def index_row_bytes(template: "faiss.Index", tier: str, dim: int) -> int:
    """What one row adds to the index beyond the row's own bytes (fx.bytes_per_vector
    less the key, where the index's copy is the only one)."""
    if keys_in_rows(template, tier):
        return 0
    per = fx.bytes_per_vector(template, dim)
    return per - 4 * dim if keys_in_index(template, tier) else per


class FlatRows:
    """Exact search over a shard's key column with FAISS's brute-force kernel
    (faiss.knn: what IndexFlat.search runs), so no second copy of the keys."""

    def __init__(self, store: ShardStore, metric: str):
        self.store, self.metric = store, fx.METRICS[metric]

    @property
    def ntotal(self) -> int:
        return self.store.rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        D, pos = faiss.knn(queries, self.store.keys.data, k, metric=self.metric)    # (nq, k)
        ids = np.take(self.store.ids.data, np.maximum(pos, 0))
        return D, np.where(pos >= 0, ids, -1)

    def add_with_ids(self, keys: np.ndarray, ids: np.ndarray) -> None:
        pass          # the rows are the index


class Shard:
    """One shard: its rows and its index on the bank's tier.

    A shard answers a search by itself, payload included (api.ShardSearch):
    the ids FAISS returns are looked up in this shard's rows at once.
    """

    def __init__(self, path: Path, spec: BankSpec, template: "faiss.Index"):
        self.spec, self.template = spec, template
        self.store = ShardStore(path, spec.dim, spec.value_dim, value_dtype(spec.value_dtype),
                                scores=spec.kind == "session")
        self.snapshot: str | None = None      # the index file of the last checkpoint
        self.snapshot_rows = 0                # rows it covers
        self._key_column()
        self.index = self._fresh_index()

    def _key_column(self) -> None:
        """The key column the tier calls for: the index's vectors or a column of its own."""
        lent = isinstance(self.store.keys, IndexKeys)
        if keys_in_index(self.template, self.spec.tier) and not lent:
            self.store.keys_in_index(self._index_vectors)
        elif lent and not keys_in_index(self.template, self.spec.tier):
            self.own_keys()

    def own_keys(self) -> None:
        """Give the store a key column of its own (before leaving the ram tier):
        the next checkpoint re-lays the rows with a key file."""
        if isinstance(self.store.keys, IndexKeys):
            keys = np.array(self.store.keys.data)
            self.store.keys = _Column(self.spec.dim, np.float32)
            self.store.keys.replace(keys)
            self.store.relaid = True

    def _index_vectors(self) -> np.ndarray:
        """(n, dim) view of the HNSW index's flat storage (valid until its next add)."""
        index = self.index
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
        flat = faiss.downcast_index(inner.storage)
        n, d = flat.ntotal, self.spec.dim
        if not n:
            return np.empty((0, d), np.float32)
        return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)

    @property
    def flat(self) -> bool:
        return keys_in_rows(self.template, self.spec.tier)

    def _fresh_index(self):
        if self.flat:
            return FlatRows(self.store, self.spec.metric)
        return self._placed(fx.empty_like(self.template), None)

    def _placed(self, index: "faiss.Index", snapshot: Path | None):
        return tiers.place(self.spec.tier, index, snapshot, self.spec.index, self.spec.metric)

    def create(self) -> None:
        self.store.create()

    def load(self, state: dict) -> None:
        """Rows of the checkpoint record, index from its snapshot plus the rows after it."""
        store = self.store
        self._key_column()
        store.load(state["gen"], state["rows"], mapped=self.spec.tier == "mmap")
        self.snapshot, self.snapshot_rows = state.get("index"), int(state.get("index_rows", 0))
        if self.flat:
            self.snapshot, self.snapshot_rows = None, 0
            self.index = FlatRows(store, self.spec.metric)
            return
        snap = store.path / self.snapshot if self.snapshot else None
        covered = self.snapshot_rows
        if snap is None or not snap.exists() or covered > store.rows:
            snap, covered = None, 0
        if snap is not None and self.spec.tier == "mmap":
            self.index = self._placed(fx.empty_like(self.template), snap)
        else:
            cpu = (fx.configure(faiss.read_index(str(snap)), self.spec.index) if snap is not None
                   else fx.empty_like(self.template))
            self.index = self._placed(cpu, None)
        if covered < store.rows:
            lent = isinstance(store.keys, IndexKeys)
            if lent and store.keys.pending is None:
                raise OSError(f"{store.path}: rows {covered}..{store.rows} are in no index "
                              "snapshot and no key file")
            self.index.add_with_ids(store.keys.data[covered:], store.ids.data[covered:])
        if isinstance(store.keys, IndexKeys):
            store.keys.settle()

    # ---- writes (applied from a logged record) ----------------------------------------
    def add(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None,
            scores: np.ndarray | None) -> None:
        self.store.append(ids, keys, values, scores)
        self.index.add_with_ids(keys, ids)

    def remove(self, ids: np.ndarray) -> int:
        _, found = self.store.lookup(ids)
        gone = ids[found]
        if not len(gone):
            return 0
        keep = ~np.isin(self.store.ids.data, gone)
        self.store.to_ram()
        if self.flat:
            self.store.keep(keep)
        elif self.spec.tier == "ram" and fx.supports_remove(self.index):
            self.index.remove_ids(gone)
            self.store.keep(keep)
        else:
            # HNSW cannot delete, a mapped snapshot is read-only, a GPU index is
            # a copy: rebuild this shard's index in RAM from what stays
            self.store.keep(keep)
            rebuilt = fx.empty_like(self.template)
            rebuilt.add_with_ids(self.store.keys.data, self.store.ids.data)
            self.index = rebuilt if self.spec.tier == "mmap" else self._placed(rebuilt, None)
            if isinstance(self.store.keys, IndexKeys):   # the new index holds them now
                self.store.keys.settle()
        self.snapshot_rows = -1               # the old snapshot no longer matches
        return int(len(gone))

    def update_values(self, rows: np.ndarray, values: np.ndarray) -> None:
        self.store.to_ram()
        self.store.update_values(rows, values)

    def cpu_index(self) -> "faiss.Index":
        """The whole index as an in-RAM FAISS index (to write a snapshot)."""
        if isinstance(self.index, tiers.GpuIndex):
            return self.index.cpu()
        if not isinstance(self.index, tiers.MappedIndex):
            return self.index
        covered = self.snapshot_rows if self.index.base is not None else 0
        full = (fx.configure(faiss.read_index(str(self.store.path / self.snapshot)), self.spec.index)
                if covered else fx.empty_like(self.template))
        if covered < self.store.rows:   # faiss refuses even 0 rows on an untrained index
            full.add_with_ids(self.store.keys.data[covered:], self.store.ids.data[covered:])
        return full

    def write_checkpoint(self, seq: int) -> dict:
        """Rows and (for indexes with codes of their own) an index snapshot in
        files, fsync'd; this shard's part of the bank's checkpoint record."""
        state = self.store.write_checkpoint()
        if not self.flat and (self.snapshot_rows != self.store.rows or self.snapshot is None):
            name = f"index.{seq}.faiss"
            write_durably(self.store.path / name, faiss.serialize_index(self.cpu_index()))
            self.snapshot, self.snapshot_rows = name, self.store.rows
        return {**state, "index": self.snapshot, "index_rows": self.snapshot_rows}

    def after_checkpoint(self) -> None:
        """Once the bank's record names the new files: drop the stale ones, and on
        mmap map what was just written (its rows and index now live in files)."""
        self.store.drop_stale()
        for p in self.store.path.glob("index.*.faiss"):
            if p.name != self.snapshot:
                p.unlink(missing_ok=True)
        if self.spec.tier == "mmap":
            self.load({"gen": self.store.gen, "rows": self.store.rows, "index": self.snapshot,
                       "index_rows": self.snapshot_rows})

    def files(self) -> list[Path]:
        """The files of the last checkpoint (what a snapshot copies)."""
        return self.store.files() + ([self.store.path / self.snapshot] if self.snapshot else [])

    # ---- reads (the bank's read lock is held) ----------------------------------------
    def search(self, queries: np.ndarray, k: int, *, values: bool, keys: bool) -> SearchResult:
        """This shard's own top-k, with the winners' keys/values (api.ShardSearch)."""
        nq = len(queries)
        if self.index.ntotal == 0:  # also spares an untrained IVF from FAISS's error
            D = np.full((nq, k), worst(self.spec.metric), np.float32)
            I = np.full((nq, k), -1, np.int64)
        else:
            work = fx.work_per_query(self.template, self.store.rows, self.spec.dim)
            params = None if self.flat else fx.search_params(self.template, k)   # efSearch >= k
            with fx.omp_threads(fx.threads_for(nq, work)):
                D, I = (self.index.search(queries, k) if params is None
                        else self.index.search(queries, k, params=params))  # (nq, k)
        kk = vv = None
        if keys or (values and self.store.values is not None):
            _, kk, vv = self.gather(I, keys=keys, values=values and self.store.values is not None)
        return SearchResult(ids=I, scores=D, bank=np.where(I >= 0, 0, -1).astype(np.int32),
                            values=vv, keys=kk)

    def gather(self, ids: np.ndarray, *, keys: bool, values: bool
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(found, keys, values) of this shard's rows for any-shaped ids; zeros where
        not found (-1, or not here). Values in the bank's own dtype."""
        flat = ids.reshape(-1)
        rows, found = self.store.lookup(flat)
        out_k = out_v = None
        if self.store.rows:
            out_k = self.store.keys.data[rows] if keys else None            # (n, dim)
            out_v = self.store.values.data[rows] if values else None        # (n, dv)
            if not found.all():
                for out in (out_k, out_v):
                    if out is not None:
                        out[~found] = 0
        else:                                                                # nothing to index
            out_k = np.zeros((len(flat), self.spec.dim), np.float32) if keys else None
            out_v = (np.zeros((len(flat), self.spec.value_dim), self.store.values.dtype)
                     if values else None)
        shape = ids.shape
        return (found.reshape(shape),
                None if out_k is None else out_k.reshape(*shape, self.spec.dim),
                None if out_v is None else out_v.reshape(*shape, self.spec.value_dim))

    def scores_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, scores) of a session shard's rows; NaN where none."""
        rows, found = self.store.lookup(ids)
        out = np.full(len(ids), np.nan, np.float32)
        if self.store.scores is not None and self.store.rows:
            out[found] = self.store.scores.data[rows[found]]
        return found, out
