"""One shard of a bank: its rows (memoryd.storage.rows) and its index on the bank's tier.

The rows are the truth and the index is derived from them. Each key is
held once: a Flat bank has no index of its own (FAISS's exact kernel runs
over the key column: FlatRows); an HNSW bank over flat storage in RAM lends
its vectors as the key column (rows.IndexKeys), and its snapshot is the
keys' file. Other indexes hold codes of their own (graph links, centroids,
quantised vectors) beside the key column. Snapshots, written at
checkpoints, spare a rebuild on open.

The index holds a prefix of the rows, `indexed` of them, in row order; the
rows after it are the growing segment (memoryd.storage.segments): searched
exactly beside the index and sealed into it in the background. A shard of
at most segments.INLINE_ROWS rows, or an index whose add is cheap (Flat),
keeps no growing rows: its adds go into the index at once, as do rows
newer than a snapshot on open. A snapshot covers the first `snapshot_rows`
rows; the keys of the growing rows of an HNSW shard in RAM (whose key
column is its index's vectors) go to a file of their own at a checkpoint,
`growing.<seq>.keys`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memoryd.api import BankSpec, SearchResult
from memoryd.arrays import value_dtype
from memoryd.storage import faiss_index as fx
from memoryd.storage import segments, tiers
from memoryd.storage.faiss_index import faiss
from memoryd.storage.files import as_bytes, write_durably
from memoryd.storage.rows import IndexKeys, ShardStore, _Column
from memoryd.topk import merge_topk, worst


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


@dataclass
class SealJob:
    """Growing rows start..end of a shard, sealed off the lock: encoded
    (fx.encodes_apart) or added to a copy of the index (Shard.copies)."""

    epoch: int
    start: int
    end: int
    keys: np.ndarray          # (n, dim) a view of the rows: rows never change once appended
    ids: np.ndarray           # (n,) int64
    index: object = None      # the copy of the index, for a copy-and-swap seal


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
        self.snapshot_rows = 0                # rows it covers (-1: it no longer matches)
        self.indexed = 0                      # rows 0..indexed are in the index; the rest grow
        self.epoch = 0                        # bumped when rows move or the index is replaced
        self._moves: list[tuple[int, int]] = []   # (epoch, first row that moved) of the last ones
        self.growing_file: str | None = None  # the growing keys of the last checkpoint (IndexKeys)
        self._growing_written: tuple | None = None   # (epoch, indexed, rows) of that file
        self._chunk = segments.FIRST_CHUNK    # rows per sealing step under the lock
        self._row_bytes: int | None = None    # fx.bytes_per_vector (Shard.copies)
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

    @property
    def growing(self) -> int:
        """Rows not in the index yet (searched exactly beside it)."""
        return 0 if self.flat else self.store.rows - self.indexed

    def _stays_growing(self) -> bool:
        """New rows wait for the sealer rather than enter the index inline."""
        return (segments.enabled() and self.store.rows > segments.INLINE_ROWS
                and fx.costly_add(self.template) and bool(self.template.is_trained))

    @property
    def encodes_apart(self) -> bool:
        """Sealing encodes off the lock and appends codes under it (fx.encodes_apart)."""
        return fx.encodes_apart(self.template) and hasattr(self.index, "add_sa_codes")

    def _fresh_index(self):
        if self.flat:
            return FlatRows(self.store, self.spec.metric)
        return self._placed(fx.empty_like(self.template), None)

    def _placed(self, index: "faiss.Index", snapshot: Path | None):
        return tiers.place(self.spec.tier, index, snapshot, self.spec.index, self.spec.metric)

    def create(self) -> None:
        self.store.create()

    def load(self, state: dict) -> None:
        """Rows of the checkpoint record, index from its snapshot; the rows after
        it stay growing (sealed in the background) or, in a small shard, are
        added at once."""
        store = self.store
        self._key_column()
        store.load(state["gen"], state["rows"], mapped=self.spec.tier == "mmap")
        self._moved(0)
        self.snapshot, self.snapshot_rows = state.get("index"), int(state.get("index_rows", 0))
        self.growing_file, self._growing_written = state.get("growing"), None
        if self.flat:
            self.snapshot, self.snapshot_rows, self.growing_file = None, 0, None
            self.index = FlatRows(store, self.spec.metric)
            self.indexed = store.rows
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
        self.indexed = covered
        if isinstance(store.keys, IndexKeys):
            self._growing_keys(covered)
        if covered < store.rows and not self._stays_growing():
            self._seal(store.rows)

    def _growing_keys(self, covered: int) -> None:
        """The lent key column's rows after the snapshot's: from a key file read
        by the store (every key), else the checkpoint's growing-keys file."""
        keys, rows = self.store.keys, self.store.rows
        if keys.pending is not None:
            keys.to_tail(covered)
            return
        if covered == rows:
            return
        path = self.store.path / self.growing_file if self.growing_file else None
        n = (rows - covered) * self.spec.dim
        if (path is None or not path.exists() or covered != self.snapshot_rows
                or path.stat().st_size < 4 * n):
            raise OSError(f"{self.store.path}: rows {covered}..{rows} are in no index "
                          "snapshot and no key file")
        keys.tail.replace(np.fromfile(path, np.float32, count=n).reshape(-1, self.spec.dim))
        self._growing_written = (self.epoch, covered, rows)

    # ---- writes (applied from a logged record) ----------------------------------------
    def add(self, ids: np.ndarray, keys: np.ndarray, values: np.ndarray | None,
            scores: np.ndarray | None) -> None:
        self.store.append(ids, keys, values, scores)
        if not self.flat and not self._stays_growing():
            self._seal(self.store.rows)

    def _seal(self, end: int) -> None:
        """Add growing rows indexed..end to the index (under the write lock). If
        FAISS fails part way, the index is dropped and every row grows again:
        never an index that disagrees with the rows."""
        start = self.indexed
        if end <= start:
            return
        try:
            self.index.add_with_ids(self.store.keys.slice(start, end),
                                    self.store.ids.data[start:end])
        except BaseException:
            self._reset_index()
            raise
        self.indexed = end
        if isinstance(self.store.keys, IndexKeys):
            self.store.keys.sealed(end - start)

    def _reset_index(self) -> None:
        """An empty index: every row grows (the sealer rebuilds it)."""
        keys = self.store.keys
        if isinstance(keys, IndexKeys) and keys.pending is None:
            keys.replace(np.concatenate([keys.vectors()[:self.indexed], keys.tail.data]))
        fresh = fx.empty_like(self.template)
        self.index = fresh if self.spec.tier == "mmap" else self._placed(fresh, None)
        self.indexed, self.snapshot_rows = 0, -1
        self._moved(0)
        if isinstance(keys, IndexKeys):
            keys.to_tail(0)

    def _moved(self, first: int) -> None:
        """Rows from `first` on moved (a remove) or may have (a reload, a new index)."""
        self.epoch += 1
        self._moves = self._moves[-31:] + [(self.epoch, first)]

    def _moved_since(self, epoch: int, end: int) -> bool:
        """Did a row before `end` move, or the index change, since `epoch`?"""
        if epoch == self.epoch:
            return False
        if not self._moves or self._moves[0][0] > epoch + 1:       # older than we recall
            return True
        return any(first < end for e, first in self._moves if e > epoch)

    def seal_chunk(self) -> int:
        """Seal the next chunk of growing rows under the write lock, sized to
        hold it ~segments.CHUNK_S; the rows sealed."""
        n = min(self.growing, self._chunk)
        if n <= 0:
            return 0
        t = time.perf_counter()
        self._seal(self.indexed + n)
        self._chunk = segments.next_chunk(n, time.perf_counter() - t)
        return n

    def seal_prepare(self, rows: int) -> SealJob | None:
        """The next growing rows to encode off the lock (any lock held)."""
        if not self.growing:
            return None
        start = self.indexed
        end = min(self.store.rows, start + rows)
        return SealJob(self.epoch, start, end, self.store.keys.slice(start, end),
                       self.store.ids.data[start:end].copy())

    def seal_encode(self, job: SealJob) -> np.ndarray:
        """The job's codes, from the trained template (no lock: it only reads)."""
        return self.template.sa_encode(np.ascontiguousarray(job.keys, dtype=np.float32))

    def seal_commit(self, job: SealJob, codes: np.ndarray) -> int:
        """Append the job's codes (under the write lock); 0 if its rows moved meanwhile."""
        if (self._moved_since(job.epoch, job.end) or job.start != self.indexed
                or job.end > self.store.rows):
            return 0
        try:
            self.index.add_sa_codes(codes, job.ids)
        except BaseException:
            self._reset_index()
            raise
        self.indexed = job.end
        return job.end - job.start

    @property
    def copies(self) -> bool:
        """Sealing adds to a copy of the index off the lock and swaps it in:
        an index in RAM (not encoded apart) of at most segments.COPY_BYTES."""
        if self.flat or self.encodes_apart or self.spec.tier != "ram":
            return False
        if self._row_bytes is None:
            self._row_bytes = fx.bytes_per_vector(self.template, self.spec.dim)
        return 0 <= self._row_bytes and self.indexed * self._row_bytes <= segments.COPY_BYTES

    def seal_copy_prepare(self) -> SealJob | None:
        """The next growing rows and a copy of the index to add them to, off the
        lock (any lock held: copying only reads the index). A step takes a
        quarter of the index's rows at least, so the copy costs little beside
        the adds (HNSW32, 128-d: ~0.1 s a million rows' copy vs ~2 min of adds)."""
        job = self.seal_prepare(max(segments.SEAL_ROWS, self.indexed // 4, 1))
        if job is not None:
            try:
                job.index = faiss.clone_index(self.index)
            except RuntimeError:                 # a kind faiss cannot copy: chunks, then
                self._row_bytes = -1
                return None
        return job

    def seal_swap(self, job: SealJob) -> int:
        """Put the job's index in (under the write lock); 0 if rows it holds moved.
        The job keeps the old index, freed with it after the lock (~ms per GB)."""
        if (self._moved_since(job.epoch, job.end) or job.start != self.indexed
                or job.end > self.store.rows):
            return 0
        self.index, job.index = job.index, self.index
        self.indexed = job.end
        if isinstance(self.store.keys, IndexKeys):      # the new index holds them now
            self.store.keys.sealed(job.end - job.start)
        return job.end - job.start

    def remove(self, ids: np.ndarray) -> int:
        _, found = self.store.lookup(ids)
        gone = ids[found]
        if not len(gone):
            return 0
        keep = ~np.isin(self.store.ids.data, gone)
        self.store.to_ram()
        self._moved(int(np.argmin(keep)))
        if self.flat:
            self.store.keep(keep)
            self.indexed = self.store.rows
            return int(len(gone))
        sealed = int(keep[:self.indexed].sum())
        if sealed == self.indexed:            # only growing rows leave: the index stays
            self.store.keep(keep)
        elif self.spec.tier == "ram" and fx.supports_remove(self.index):
            self.index.remove_ids(gone)
            self.store.keep(keep)
            self.indexed = sealed
            self.snapshot_rows = -1           # the old snapshot no longer matches
        else:
            # HNSW cannot delete, a mapped snapshot is read-only, a GPU index is
            # a copy: a new index from what stays, at once in a small shard,
            # else by the sealer (every row grows until then, searched exactly)
            self.store.keep(keep)
            fresh = fx.empty_like(self.template)
            self.index = fresh if self.spec.tier == "mmap" else self._placed(fresh, None)
            self.indexed, self.snapshot_rows = 0, -1
            if isinstance(self.store.keys, IndexKeys):   # every kept key, in RAM until sealed
                self.store.keys.to_tail(0)
            if not self._stays_growing():
                self._seal(self.store.rows)
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
        if self.index.base is None:       # the RAM part is all of it
            return self.index.delta
        covered = self.snapshot_rows
        full = (fx.configure(faiss.read_index(str(self.store.path / self.snapshot)), self.spec.index)
                if covered else fx.empty_like(self.template))
        if covered < self.indexed:   # faiss refuses even 0 rows on an untrained index
            full.add_with_ids(self.store.keys.slice(covered, self.indexed),
                              self.store.ids.data[covered:self.indexed])
        return full

    @property
    def index_moved(self) -> bool:
        """The index differs from the last snapshot (sealing or a rebuild since)."""
        return not self.flat and (self.snapshot_rows != self.indexed or self.snapshot is None)

    def write_checkpoint(self, seq: int) -> dict:
        """Rows and (for indexes with codes of their own) an index snapshot of
        the rows indexed, and the growing keys an HNSW shard in RAM holds nowhere
        else, in files, fsync'd; this shard's part of the bank's checkpoint record."""
        state = self.store.write_checkpoint()
        if self.index_moved:
            name = f"index.{seq}.faiss"
            write_durably(self.store.path / name, faiss.serialize_index(self.cpu_index()))
            self.snapshot, self.snapshot_rows = name, self.indexed
        growing = None
        if isinstance(self.store.keys, IndexKeys) and self.growing:
            now = (self.epoch, self.indexed, self.store.rows)
            if self.growing_file is None or self._growing_written != now:
                self.growing_file = f"growing.{seq}.keys"
                write_durably(self.store.path / self.growing_file,
                              as_bytes(self.store.keys.slice(self.indexed, self.store.rows)))
                self._growing_written = now
            growing = self.growing_file
        self.growing_file = growing
        return {**state, "index": self.snapshot, "index_rows": self.snapshot_rows,
                "growing": growing}

    def after_checkpoint(self) -> None:
        """Once the bank's record names the new files: drop the stale ones, and on
        mmap map what was just written (its rows and index now live in files)."""
        self.store.drop_stale()
        for pattern, keep in (("index.*.faiss", self.snapshot), ("growing.*.keys", self.growing_file)):
            for p in self.store.path.glob(pattern):
                if p.name != keep:
                    p.unlink(missing_ok=True)
        if self.spec.tier == "mmap":
            self.load({"gen": self.store.gen, "rows": self.store.rows, "index": self.snapshot,
                       "index_rows": self.snapshot_rows, "growing": self.growing_file})

    def files(self) -> list[Path]:
        """The files of the last checkpoint (what a snapshot copies)."""
        return (self.store.files() + ([self.store.path / self.snapshot] if self.snapshot else [])
                + ([self.store.path / self.growing_file] if self.growing_file else []))

    # ---- reads (the bank's read lock is held) ----------------------------------------
    def search(self, queries: np.ndarray, k: int, *, values: bool, keys: bool) -> SearchResult:
        """This shard's own top-k, with the winners' keys/values (api.ShardSearch)."""
        nq = len(queries)
        parts = []
        if self.index.ntotal:       # (0 also spares an untrained IVF from FAISS's error)
            work = fx.work_per_query(self.template, self.index.ntotal, self.spec.dim)
            params = None if self.flat else fx.search_params(self.template, k)   # efSearch >= k
            with fx.omp_threads(fx.threads_for(nq, work)):
                parts.append(self.index.search(queries, k) if params is None
                             else self.index.search(queries, k, params=params))  # (nq, k)
        growing = self.growing
        if growing:                 # the rows not indexed yet: exactly, then merged
            start = self.indexed
            with fx.omp_threads(fx.threads_for(nq, growing * self.spec.dim)):
                D, pos = faiss.knn(queries, self.store.keys.slice(start, self.store.rows), k,
                                   metric=fx.METRICS[self.spec.metric])      # (nq, k)
            ids = self.store.ids.data[start:]
            parts.append((D, np.where(pos >= 0, np.take(ids, np.maximum(pos, 0)), -1)))
        if not parts:
            D = np.full((nq, k), worst(self.spec.metric), np.float32)
            I = np.full((nq, k), -1, np.int64)
        elif len(parts) == 1:
            D, I = parts[0]
        else:
            D, I, _ = merge_topk(parts, [0] * len(parts), k, self.spec.metric)
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
            out_k = self.store.keys.take(rows) if keys else None            # (n, dim)
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
