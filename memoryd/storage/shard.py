"""One shard of a bank: its row files and its FAISS index on the bank's tier.

Rows are appended to files before the index sees them (memoryd.storage.rows),
so the index is a cache: on open it is read from its snapshot and the rows
newer than the snapshot are replayed into it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memoryd.api import BankSpec, SearchResult
from memoryd.arrays import value_dtype
from memoryd.storage import faiss_index as fx
from memoryd.storage import tiers
from memoryd.storage.faiss_index import faiss
from memoryd.storage.rows import ShardStore
from memoryd.topk import worst


class Shard:
    """One shard: its rows (memoryd.storage.rows) and its index on the bank's tier.

    A shard answers a search by itself, payload included (api.ShardSearch):
    the ids FAISS returns are looked up in this shard's rows at once.
    """

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
            self.store.rewrite(keep, lambda p: write_index(self.index, p))
            return int(len(gone))
        # HNSW cannot delete, a mapped snapshot is read-only, a GPU index is a
        # copy: rebuild this shard's index in RAM from what stays
        rebuilt = fx.empty_like(self.template)
        rebuilt.add_with_ids(self.store.keys.data[keep], self.store.ids.data[keep])
        self.store.rewrite(keep, lambda p: write_index(rebuilt, p))
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
            write_index(self.cpu_index(), snap)
            self.store.save_state(index_rows=self.store.rows)
            if self.spec.tier == "mmap":  # fold the RAM part into the mapped snapshot
                self.index = self._placed(fx.empty_like(self.template), snap)

    def set_tier(self, spec: BankSpec) -> None:
        """Snapshot, then reopen rows and index on spec.tier."""
        self.checkpoint()
        self.spec = spec
        self.load()

    # ---- reads (the bank's read lock is held) ----------------------------------------
    def search(self, queries: np.ndarray, k: int, *, values: bool, keys: bool) -> SearchResult:
        """This shard's own top-k, with the winners' keys/values (api.ShardSearch)."""
        nq = len(queries)
        if self.index.ntotal == 0:  # also spares an untrained IVF from FAISS's error
            D = np.full((nq, k), worst(self.spec.metric), np.float32)
            I = np.full((nq, k), -1, np.int64)
        else:
            work = fx.work_per_query(self.template, self.store.rows, self.spec.dim)
            with fx.omp_threads(fx.threads_for(nq, work)):
                D, I = self.index.search(queries, k)                      # (nq, k)
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


def write_index(index: "faiss.Index", path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(path)
