"""Product-key banks: K = n^2 fixed unit keys searched exactly in ~sqrt(K).

Random keys defeat approximate search (DESIGN lesson 12), so a random-key
base bank of useful size uses product keys (Lample et al. 2019). The bank
holds two tables of n random unit sub-keys, one per half of the key:

    key(i * n + j) = concat(c1[i], c2[j]) / sqrt(2)       (a unit vector)

For a query q = (q1, q2), q . key = (q1 . c1[i] + q2 . c2[j]) / sqrt(2), and
the best k of those sums always lie among the best k of each half. So two
flat searches over n sub-keys and a re-rank of the k x k candidate sums give
the EXACT top-k over all n^2 keys. Ids are rows 0..K-1 of the value table.

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
from pathlib import Path
from typing import Iterator

import numpy as np

from memoryd.api import BankSpec, ExportChunk, SearchResult
from memoryd.arrays import value_dtype
from memoryd.errors import FailedPrecondition, InvalidArgument
from memoryd.keyspace import key_vectors, parse_product_keys, subkeys
from memoryd.storage.faiss_index import faiss
from memoryd.storage.interface import AddPlan, BankStore
from memoryd.storage.rows import atomic_write_json, folder_bytes


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
        self.sub = subkeys(self.n, spec.dim, self.seed)                      # (2, n, dim/2)
        self.halves = [faiss.IndexFlatIP(spec.dim // 2) for _ in range(2)]
        for flat, c in zip(self.halves, self.sub):
            flat.add(c)
        vdt = value_dtype(spec.value_dtype)
        self.values = np.zeros((self.count, spec.value_dim), vdt) if spec.value_dim else None

    # ---- life cycle ---------------------------------------------------------------
    def _values_file(self) -> Path:
        return self.path / "values.bin"

    def create(self) -> "ProductKeyBank":
        self.path.mkdir(parents=True, exist_ok=False)
        if self.values is not None:
            self.values.tofile(self._values_file())
        atomic_write_json(self.path / "bank.json", {"spec": self.spec.index})
        return self

    def open(self) -> "ProductKeyBank":
        if self.values is not None:
            self.values = np.fromfile(self._values_file(), self.values.dtype).reshape(self.values.shape)
        return self

    def checkpoint(self) -> None:  # values are written through on every update
        pass

    def delete_files(self) -> None:
        for p in self.path.glob("*"):
            p.unlink()
        self.path.rmdir()

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

    def plan_add(self, keys, values, ids) -> AddPlan:
        raise self._fixed("add keys")

    def add_cost(self, plan: AddPlan) -> int:
        raise self._fixed("add keys")

    def add(self, plan: AddPlan) -> None:
        raise self._fixed("add keys")

    def remove(self, ids: np.ndarray) -> int:
        raise self._fixed("remove keys")

    def evict_oldest(self, nbytes: int, row_bytes: int | None = None) -> int:
        raise self._fixed("evict its oldest keys (fifo)")

    def update_values(self, ids: np.ndarray, values: np.ndarray) -> int:
        found = (ids >= 0) & (ids < self.count)
        rows, vals = ids[found], values[found]
        self.values[rows] = vals
        mm = np.memmap(self._values_file(), dtype=self.values.dtype, mode="r+", shape=self.values.shape)
        mm[rows] = vals
        mm.flush()
        del mm
        return int(found.sum())

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
        """Exact top-k over all n^2 keys: best k per half, then the k x k re-rank."""
        nq, h = len(queries), self.spec.dim // 2
        kk = min(k, self.n)
        s1, i1 = self.halves[0].search(np.ascontiguousarray(queries[:, :h]), kk)   # (nq, kk)
        s2, i2 = self.halves[1].search(np.ascontiguousarray(queries[:, h:]), kk)   # (nq, kk)
        cand = (s1[:, :, None] + s2[:, None, :]).reshape(nq, kk * kk)             # (nq, kk*kk)
        m = min(k, kk * kk)
        top = np.argpartition(-cand, m - 1, axis=1)[:, :m] if m < kk * kk else \
            np.broadcast_to(np.arange(kk * kk), (nq, kk * kk))
        ip = np.take_along_axis(cand, top, axis=1)                                 # (nq, m)
        order = np.argsort(-ip, axis=1, kind="stable")
        top, ip = np.take_along_axis(top, order, axis=1), np.take_along_axis(ip, order, axis=1)
        rows = np.arange(nq)[:, None]
        ids = i1[rows, top // kk] * self.n + i2[rows, top % kk]                     # (nq, m)
        ip = ip / math.sqrt(2.0)
        if self.spec.metric == "l2":  # |q - key|^2 with |key| = 1
            scores = (queries * queries).sum(1, keepdims=True) + 1.0 - 2.0 * ip
        else:
            scores = ip
        D = np.full((nq, k), np.inf if self.spec.metric == "l2" else -np.inf, np.float32)
        I = np.full((nq, k), -1, np.int64)
        D[:, :m], I[:, :m] = scores, ids
        return D, I

    def keys_of(self, ids: np.ndarray) -> np.ndarray:
        """(n, dim) key vectors of valid ids."""
        return key_vectors(self.sub, ids)

    def gather(self, ids: np.ndarray, *, keys: bool, values: bool
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        flat = ids.reshape(-1)
        found = (flat >= 0) & (flat < self.count)
        k_out = v_out = None
        if keys:
            k_out = np.zeros((len(flat), self.spec.dim), np.float32)
            k_out[found] = self.keys_of(flat[found])
        if values:
            v_out = np.zeros((len(flat), self.spec.value_dim), self.values.dtype)
            v_out[found] = self.values[flat[found]]
        shape = ids.shape
        return (found.reshape(shape),
                None if k_out is None else k_out.reshape(*shape, self.spec.dim),
                None if v_out is None else v_out.reshape(*shape, self.spec.value_dim))

    def export_chunks(self, chunk_rows: int) -> Iterator[ExportChunk]:
        for start in range(0, self.count, chunk_rows):
            ids = np.arange(start, min(self.count, start + chunk_rows), dtype=np.int64)
            vals = None if self.values is None else self.values[ids].copy()
            yield ExportChunk(ids=ids, keys=self.keys_of(ids), values=vals)
