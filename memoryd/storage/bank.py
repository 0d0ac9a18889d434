"""A memory bank: N shards (memoryd.storage.shard), each a FAISS index over
explicit 64-bit ids plus the rows (ids, keys, values) it was built from.

Ids are routed to shard `id % shards`, so any id finds its shard without a
lookup table. Ids are assigned by the bank (monotonic, never reused, even
after removals) unless the caller brings its own. Keys are kept beside the
index so that search can return exact key vectors (for gradients), export
can dump the bank, and the index can always be rebuilt.

Concurrency: the bank's readers/writer lock (memoryd.storage.interface),
held by the engine around whole requests.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from memoryd import faults
from memoryd.api import BankSpec, ExportChunk
from memoryd.arrays import value_dtype
from memoryd.errors import InvalidArgument
from memoryd.storage import faiss_index as fx
from memoryd.storage.faiss_index import faiss
from memoryd.storage.interface import AddPlan, BankStore
from memoryd.storage.rows import ShardStore, atomic_write_json, folder_bytes
from memoryd.storage.shard import Shard, write_index

META = "bank.json"
TEMPLATE = "trained.faiss"
INTENT = "intent.json"   # an add in progress across shards: rolled back on open


class Bank(BankStore):
    def __init__(self, path: Path, spec: BankSpec):
        super().__init__(path, spec)
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

    def _row_bytes(self, template: "faiss.Index | None" = None) -> int:
        """Bytes one row costs: its id, key and value, and its index entry."""
        t = template or self.template
        vbytes = self.spec.value_dim * value_dtype(self.spec.value_dtype).itemsize
        return 8 + 4 * self.spec.dim + vbytes + fx.bytes_per_vector(t, self.spec.dim)

    def nbytes(self) -> int:
        """What the bank holds.

        An empty bank counts as 0: the few header bytes of an empty index are
        not charged, so creating a bank or opening a session never needs
        quota; the index's fixed bytes (e.g. trained centroids) are charged
        with its first rows.
        """
        return self._nbytes(self.count, self.template)

    def _nbytes(self, rows: int, template: "faiss.Index") -> int:
        """What the bank would hold with `rows` rows and index `template`."""
        return self.spec.shards * fx.fixed_bytes(template) + rows * self._row_bytes(template) \
            if rows else 0

    # ---- writes (caller holds lock.write()) ---------------------------------------
    def plan_add(self, keys: np.ndarray, values: np.ndarray | None,
                 ids: np.ndarray | None) -> AddPlan:
        ids = self._new_ids(len(keys), ids)
        template = self._trained_template(keys)
        return AddPlan(ids=ids, keys=keys, values=values, row_bytes=self._row_bytes(template),
                       detail=template)

    def add_cost(self, plan: AddPlan) -> int:
        return self._nbytes(self.count + len(plan.ids), plan.detail) - self.nbytes()

    def _trained_template(self, keys: np.ndarray) -> "faiss.Index":
        """The template after training on keys if it needs training (not installed)."""
        if self.template.is_trained:
            return self.template
        t = fx.empty_like(self.template)
        fx.train(t, keys, self.spec.index)
        return t

    def _new_ids(self, n: int, ids: np.ndarray | None) -> np.ndarray:
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

    def add(self, plan: AddPlan) -> None:
        ids, keys, values, template = plan.ids, plan.keys, plan.values, plan.detail
        if template is not self.template:  # first add trained the index
            write_index(template, self.path / TEMPLATE)
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

    def evict_oldest(self, nbytes: int, row_bytes: int | None = None) -> int:
        rows = min(self.count, -(-nbytes // (row_bytes or self._row_bytes())))
        oldest = np.sort(np.concatenate([s.store.ids.data for s in self.shards]))[:rows]
        return self.remove(oldest)

    def checksum(self) -> str:
        """sha256 over every shard's rows: what a frozen bank promises to hold."""
        h = hashlib.sha256()
        for s in self.shards:
            for col in (s.store.ids, s.store.keys, s.store.values):
                if col is not None:
                    h.update(np.ascontiguousarray(col.data).tobytes())
        return "sha256:" + h.hexdigest()

    # ---- reads (caller holds lock.read()) -------------------------------------------
    def searchers(self) -> list[Shard]:
        return self.shards

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

    def gather(self, ids: np.ndarray, *, keys: bool, values: bool
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if self.spec.shards == 1:
            return self.shards[0].gather(ids, keys=keys, values=values)
        flat = ids.reshape(-1)
        shard_of, rows, found = self.get_rows(flat)
        k_out = np.zeros((len(flat), self.spec.dim), np.float32) if keys else None
        v_out = (np.zeros((len(flat), self.spec.value_dim), value_dtype(self.spec.value_dtype))
                 if values else None)
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
