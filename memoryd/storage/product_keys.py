"""Product-key banks: K = n^2 fixed unit keys searched exactly in ~sqrt(K).

Random keys defeat approximate search (DESIGN lesson 12), so a random-key
base bank of useful size uses product keys (Lample et al. 2019). The bank
holds two tables of n random unit sub-keys, one per half of the key:

    key(i * n + j) = concat(c1[i], c2[j]) / sqrt(2)       (a unit vector)

For a query q = (q1, q2), q . key = (q1 . c1[i] + q2 . c2[j]) / sqrt(2), and
the best k of those sums always lie among the best k of each half. So two
flat searches over n sub-keys and a re-rank of the candidate sums (only the
~k ln k of the k x k pairs that can still make the top k: _pairs) give the
EXACT top-k over all n^2 keys, as FAISS's MultiIndexQuantizer finds it
(bench/bench_product_keys.py). Ids are rows 0..K-1 of the value table.
Scores are float32 sums of the halves' inner products; equal scores come in
the order of the halves' ranks, whatever the thread count (which of several
keys tied at the k-th place is returned is unspecified, as with any faiss
index).

The key set itself is memoryd.keyspace's (pure numpy, shared with the
layer, which rebuilds key vectors from ids). Spec: index "product-keys:<n>"
with optional "|seed=<s>", e.g.
"product-keys:1024" for 1,048,576 keys. The keys are fixed at creation, so
`add` and `remove` are refused; values start at zero and are set with
`update_values` (e.g. pushed from a trainer's value table).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from memoryd.api import BankSpec, ExportChunk, SearchResult
from memoryd.arrays import value_dtype
from memoryd.errors import FailedPrecondition, InvalidArgument, QuotaExceeded
from memoryd.keyspace import key_vectors, parse_product_keys, subkeys
from memoryd.storage import faiss_index as fx
from memoryd.storage.faiss_index import faiss
from memoryd.storage.interface import AddPlan, BankStore
from memoryd.storage.files import as_bytes, atomic_write_json, fsync_dir, write_durably
from memoryd.storage.rows import folder_bytes
from memoryd.storage.wal import LOG, UPDATE, Op, WriteAheadLog, checkpoint_due, typed


HOST_MEMORY_SHARE = 0.5   # of this host's RAM that one product-key bank may take


def host_memory() -> int:
    """Bytes of RAM of this host (64 GiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 64 << 30


def planned_bytes(spec: BankSpec, n: int) -> int:
    """What a product-key bank of n^2 keys holds in RAM (= nbytes()): both sub-key
    tables twice (numpy and the flat indexes) and the n^2 x value_dim value table."""
    return 2 * (4 * n * spec.dim) + n * n * spec.value_dim * value_dtype(spec.value_dtype).itemsize


def check_size(spec: BankSpec, n: int) -> None:
    """Refuse a bank whose tables would not fit, BEFORE allocating them (a
    MemoryError deep in numpy would be an internal error, and an allocation that
    succeeds by overcommit would get the daemon killed): QuotaExceeded over the
    bank's own quota, InvalidArgument over HOST_MEMORY_SHARE of this host's RAM.
    (The tenant's quota is checked when the catalog reserves the bytes.)"""
    from memoryd.sizes import describe_size

    need = planned_bytes(spec, n)
    if spec.quota_bytes is not None and need > spec.quota_bytes:
        raise QuotaExceeded(spec.name, 0, spec.quota_bytes, need)
    most = int(host_memory() * HOST_MEMORY_SHARE)
    if need > most:
        raise InvalidArgument(
            f"product-key bank '{spec.name}' would hold {n}^2 keys with {spec.value_dim}-d "
            f"{spec.value_dtype} values: {describe_size(need)} of RAM, above the "
            f"{describe_size(most)} one bank may take on this host (half its memory); use "
            "fewer sub-keys or a smaller value_dim")


class ProductKeyBank(BankStore):
    """A bank whose keys are the product of two sub-key tables (see module doc).

    A bank interface of its own (memoryd.storage.interface): writes other
    than update_values raise FailedPrecondition; it is one searcher itself.
    """

    def __init__(self, path: Path, spec: BankSpec):
        if spec.dim % 2:
            raise InvalidArgument(f"product keys split the key in halves: dim must be even; got {spec.dim}")
        if spec.shards != 1:
            raise InvalidArgument("a product-key bank is searched exactly in one piece: use shards=1")
        super().__init__(path, spec)
        self.n, self.seed = parse_product_keys(spec.index)
        check_size(spec, self.n)                    # before allocating anything of that size
        self.sub = subkeys(self.n, spec.dim, self.seed)                      # (2, n, dim/2)
        self.halves = [faiss.IndexFlatIP(spec.dim // 2) for _ in range(2)]
        for flat, c in zip(self.halves, self.sub):
            flat.add(c)
        self._pair_cache: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}   # _pairs
        vdt = value_dtype(spec.value_dtype)
        self.values = np.zeros((self.count, spec.value_dim), vdt) if spec.value_dim else None
        self.wal = WriteAheadLog(self.path / LOG)
        self.seq = self.checkpoint_lsn = 0

    # ---- life cycle ---------------------------------------------------------------
    # Files: bank.json (the checkpoint record: {"format": 2, "seq", "lsn"}),
    # values.<seq>.bin (the value table as of that checkpoint) and wal.log
    # (value updates since: memoryd.storage.wal), as for every bank.
    def _values_file(self, seq: int | None = None) -> Path:
        seq = self.seq if seq is None else seq
        return self.path / (f"values.{seq}.bin" if seq else "values.bin")

    def create(self) -> "ProductKeyBank":
        self.path.mkdir(parents=True, exist_ok=False)
        self.wal.create()
        self.seq = 0
        self.checkpoint(force=True)
        fsync_dir(self.path.parent)
        return self

    def open(self) -> "ProductKeyBank":
        meta = json.loads((self.path / "bank.json").read_text())
        self.seq = int(meta.get("seq", 0))                 # 0: format 1, values.bin
        self.lsn = self.checkpoint_lsn = int(meta.get("lsn", 0))
        if self.values is not None:
            self.values = np.fromfile(self._values_file(), self.values.dtype).reshape(self.values.shape)
        replayed = 0
        for lsn, ops in self.wal.open(after_lsn=self.checkpoint_lsn):
            for op in ops:
                if op.code == UPDATE:
                    self._apply_update(op.arrays[0], typed(op.arrays[1], self.values.dtype))
            self.lsn, replayed = lsn, replayed + 1
        if replayed or not self.seq:
            self.checkpoint(force=True)
        return self

    def checkpoint(self, force: bool = False) -> None:
        """The value table in a new file, fsync'd, then the record naming it."""
        if self.lsn == self.checkpoint_lsn and not force:
            return
        seq = self.seq + 1
        if self.values is not None:
            write_durably(self._values_file(seq), as_bytes(self.values))
        atomic_write_json(self.path / "bank.json",
                          {"format": 2, "seq": seq, "lsn": self.lsn, "spec": self.spec.index})
        old, self.seq, self.checkpoint_lsn = self._values_file(), seq, self.lsn
        if old != self._values_file():
            old.unlink(missing_ok=True)
        self.wal.reset(self.lsn)

    def close(self) -> None:
        self.wal.close()

    def sync(self, lsn: int) -> None:
        self.wal.sync(lsn)

    def snapshot_to(self, dest: Path) -> None:
        self.checkpoint(force=True)
        dest.mkdir(parents=True, exist_ok=False)
        names = ["bank.json"] + ([self._values_file().name] if self.values is not None else [])
        for name in names:
            shutil.copyfile(self.path / name, dest / name)
        (dest / LOG).touch()

    def delete_files(self) -> None:
        self.wal.close()
        shutil.rmtree(self.path)

    # ---- sizes --------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.n * self.n

    @property
    def trained(self) -> bool:
        return True

    def nbytes(self) -> int:
        """Sub-keys (table and flat index) plus the value table."""
        vals = 0 if self.values is None else self.values.nbytes
        return 2 * self.sub.nbytes + vals

    # ---- writes --------------------------------------------------------------------
    def _fixed(self, op: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"bank '{self.spec.name}' has product keys, fixed at creation: it cannot {op}; "
            "set its values with update_values")

    def plan_add(self, keys, values, ids, scores=None) -> AddPlan:
        raise self._fixed("add keys")

    def add_cost(self, plan: AddPlan) -> int:
        raise self._fixed("add keys")

    def add(self, plan: AddPlan) -> None:
        raise self._fixed("add keys")

    def remove(self, ids: np.ndarray) -> int:
        raise self._fixed("remove keys")

    def oldest_ids(self, nbytes: int, row_bytes: int | None = None) -> np.ndarray:
        raise self._fixed("evict its oldest keys (fifo)")

    def update_values(self, ids: np.ndarray, values: np.ndarray) -> int:
        """One log record, then the table in RAM (a checkpoint writes it out)."""
        found = (ids >= 0) & (ids < self.count)
        if found.any():
            rows, vals = ids[found], values[found]
            self.lsn = self.wal.append([Op(UPDATE, (rows, vals))])
            self._apply_update(rows, vals)
            if checkpoint_due(self.wal.size, self.nbytes()):
                self.checkpoint()
        return int(found.sum())

    def _apply_update(self, rows: np.ndarray, vals: np.ndarray) -> None:
        self.values[rows] = vals

    def scores_of(self, ids: np.ndarray) -> np.ndarray:
        return np.full(len(ids), np.nan, np.float32)

    def split_bytes(self) -> dict[str, int]:
        vals = 0 if self.values is None else self.values.nbytes
        return {"data": vals, "index": self.nbytes() - vals}

    def tier_bytes(self) -> dict[str, int]:
        disk = folder_bytes(self.path)
        return {"ram": self.nbytes(), "disk": disk}

    def set_tier(self, tier: str) -> None:
        if tier != "ram":
            raise FailedPrecondition(
                f"bank '{self.spec.name}' has product keys: its sub-keys are tiny and live in "
                "RAM; only tier ram is offered")

    def checksum(self) -> str:
        h = hashlib.sha256(json.dumps([self.n, self.seed, self.spec.dim]).encode())
        if self.values is not None:
            h.update(self.values.tobytes())
        return "sha256:" + h.hexdigest()

    # ---- reads ---------------------------------------------------------------------
    def searchers(self) -> list["ProductKeyBank"]:
        return [self]

    def search(self, queries: np.ndarray, k: int, *, values: bool, keys: bool) -> SearchResult:
        """The exact top-k with its payload (api.ShardSearch)."""
        D, I = self.top_k(queries, k)                                              # (nq, k)
        kk = vv = None
        if keys or (values and self.values is not None):
            _, kk, vv = self.gather(I, keys=keys, values=values and self.values is not None)
        return SearchResult(ids=I, scores=D, bank=np.where(I >= 0, 0, -1).astype(np.int32),
                            values=vv, keys=kk)

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over all n^2 keys: best kk per half, then the re-rank of
        the candidate pairs that can still make the top m (_pairs)."""
        nq, h = len(queries), self.spec.dim // 2
        kk = min(k, self.n)
        m = min(k, kk * kk)
        # both halves' flat searches and the re-rank run on this search's threads
        with fx.omp_threads(fx.threads_for(nq, self.n * self.spec.dim)):
            s1, i1 = self.halves[0].search(np.ascontiguousarray(queries[:, :h]), kk)  # (nq, kk)
            s2, i2 = self.halves[1].search(np.ascontiguousarray(queries[:, h:]), kk)  # (nq, kk)
            ip, a, b = self._rerank(s1, s2, kk, m)                                     # (nq, m)
        rows = np.arange(nq)[:, None]
        ids = i1[rows, a]                                                              # (nq, m)
        ids *= self.n
        ids += i2[rows, b]
        ip = ip / math.sqrt(2.0)   # the same float32 ops as ever: scores stay bit-identical
        if self.spec.metric == "l2":  # |q - key|^2 with |key| = 1
            scores = (queries * queries).sum(1, keepdims=True) + 1.0 - 2.0 * ip
        else:
            scores = ip
        if m == k:
            return scores, ids
        D = np.full((nq, k), np.inf if self.spec.metric == "l2" else -np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        D[:, :m], I[:, :m] = scores, ids
        return D, I

    def _rerank(self, s1: np.ndarray, s2: np.ndarray, kk: int, m: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The best m sums s1[a] + s2[b], best first: (sums, a, b), each (nq, m).

        One C++ pass (a faiss heap per query, on this thread's OpenMP threads)
        over the candidates; ties come in candidate order (a, then b).
        """
        a_of, b_of, rev = self._pairs(kk, m)                                       # (P,)
        cand = np.take(s1, a_of, axis=1)                                           # (nq, P)
        cand += np.take(s2, b_of, axis=1)
        nq, p = cand.shape
        best = np.empty((nq, m), np.float32)
        pos = np.empty((nq, m), np.int64)
        heap = faiss.float_minheap_array_t()   # a min-heap keeps the m largest
        heap.nh, heap.k = nq, m
        heap.val, heap.ids = faiss.swig_ptr(best), faiss.swig_ptr(pos)
        heap.heapify()
        # ids P - position (one row for all queries: stride 0; never -1, which
        # the heap takes for "empty"): it orders equal sums by descending id,
        # so by ascending position
        heap.addn_with_ids(p, faiss.swig_ptr(cand), faiss.swig_ptr(rev), 0, 0, nq)
        heap.reorder()
        np.subtract(p, pos, out=pos)
        return best, a_of[pos], b_of[pos]

    def _pairs(self, kk: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, P - position) of the P candidate pairs for the best m of kk x kk sums.

        Both halves come sorted, best first, so at least (a+1)(b+1) pairs
        (all a' <= a, b' <= b) score >= s1[a] + s2[b] (float addition is
        monotonic): a pair with (a+1)(b+1) > m can only tie the m-th, never
        beat it. That leaves ~m ln m candidates instead of kk^2 (119 of
        1,024 for k = 32).
        """
        key = (kk, m)
        got = self._pair_cache.get(key)
        if got is None:
            r = np.arange(1, kk + 1)
            a, b = np.nonzero(r[:, None] * r[None, :] <= m)   # row-major: a, then b
            rev = len(a) - np.arange(len(a), dtype=np.int64)
            got = (a.astype(np.int64), b.astype(np.int64), rev)
            self._pair_cache[key] = got
        return got

    def keys_of(self, ids: np.ndarray) -> np.ndarray:
        """(n, dim) key vectors of valid ids."""
        return key_vectors(self.sub, ids)

    def gather(self, ids: np.ndarray, *, keys: bool, values: bool
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(found, keys, values) for any-shaped ids; zeros where not found.

        Values are one np.take into a fresh array (one pass; the mask
        indexing it replaces made three); missing ids, rare here (only k >
        n^2 pads), read row 0 and are zeroed after.
        """
        flat = ids.reshape(-1)
        found = (flat >= 0) & (flat < self.count)                                   # (n,)
        every = bool(found.all())
        rows = flat if every else np.where(found, flat, 0)
        k_out = v_out = None
        if keys:
            k_out = self.keys_of(rows)                                              # (n, dim)
        if values:
            v_out = np.take(self.values, rows, axis=0)                              # (n, dv)
        if not every:
            for out in (k_out, v_out):
                if out is not None:
                    out[~found] = 0
        shape = ids.shape
        return (found.reshape(shape),
                None if k_out is None else k_out.reshape(*shape, self.spec.dim),
                None if v_out is None else v_out.reshape(*shape, self.spec.value_dim))

    def export_chunks(self, chunk_rows: int) -> Iterator[ExportChunk]:
        for start in range(0, self.count, chunk_rows):
            ids = np.arange(start, min(self.count, start + chunk_rows), dtype=np.int64)
            vals = None if self.values is None else self.values[ids].copy()
            yield ExportChunk(ids=ids, keys=self.keys_of(ids), values=vals)
