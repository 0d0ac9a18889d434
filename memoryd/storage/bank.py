"""A memory bank: N shards (memoryd.storage.shard), each a FAISS index over
explicit 64-bit ids plus the rows (ids, keys, values) it was built from,
and ONE write-ahead log (memoryd.storage.wal) for all of them.

Ids are routed to shard `id % shards`, so any id finds its shard without a
lookup table. Ids are assigned by the bank (monotonic, never reused, even
after removals) unless the caller brings its own. Keys are kept with the
rows so that search can return exact key vectors (for gradients), export
can dump the bank, and the index can always be rebuilt; a Flat bank
searches that very column (shard.FlatRows), so its keys are held once.

Durability: a write is one log record (all its shards, its evictions, a
session's scores) before it touches memory; a checkpoint writes every
shard's files, fsync'd, then switches `bank.json` (the checkpoint record:
generation and row count per shard, the index snapshots, the last log
sequence number it covers) by an atomic rename, then empties the log. Open
loads the checkpoint and replays the log after it, so a request is all
there or not there whatever the shard count.

    bank.json       {"format": 2, "seq", "lsn", "next_id", "spec", "shards": [...]}
    wal.log         records after the checkpoint
    trained.faiss   the trained empty index (IVF centroids, PQ codebooks)
    shard-<i>/      row files and index snapshots (memoryd.storage.rows), and the keys
                    of growing rows a lent key column holds nowhere else (shard.py)

Concurrency: the bank's readers/writer lock (memoryd.storage.interface),
held by the engine around whole requests.

Growing segments (memoryd.storage.segments): a write to a bank whose index
is costly to add to only appends rows; the process's sealer adds them to
the shards' indexes later (seal_step, taking the lock itself), and
checkpoints record how many rows each index snapshot covers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from memoryd import faults
from memoryd import telemetry
from memoryd.api import BankSpec, ExportChunk
from memoryd.arrays import value_dtype
from memoryd.errors import InvalidArgument, StorageUnwritable
from memoryd.storage import faiss_index as fx
from memoryd.storage import segments
from memoryd.storage.faiss_index import faiss
from memoryd.storage.files import atomic_write_json, fsync_dir, write_durably
from memoryd.storage.interface import AddPlan, BankStore
from memoryd.storage.rows import folder_bytes
from memoryd.storage.shard import Shard, index_row_bytes, keys_in_rows
from memoryd.storage import wal
from memoryd.storage.wal import ADD, LOG, MOVED, REMOVE, UPDATE, Op, WriteAheadLog, typed
from memoryd.storage import upgrade

META = "bank.json"
TEMPLATE = "trained.faiss"
FORMAT = 2


class Bank(BankStore):
    def __init__(self, path: Path, spec: BankSpec):
        super().__init__(path, spec)
        self.next_id = 0
        self.template = fx.build(spec.dim, spec.index, spec.metric)
        self.shards: list[Shard] = []
        self.wal = WriteAheadLog(self.path / LOG)
        self.seq = 0              # checkpoints written
        self.lsn = 0              # the last record applied
        self.checkpoint_lsn = 0   # the last record the files hold
        self._checkpoint_due = False
        self.last_write = time.monotonic()   # when a write last applied (the sealer's idle clock)
        self._closed = False      # closed or deleted: the sealer leaves it alone

    # ---- life cycle -----------------------------------------------------------
    def create(self) -> "Bank":
        self.path.mkdir(parents=True, exist_ok=False)
        self.shards = [Shard(self._shard_path(i), self.spec, self.template)
                       for i in range(self.spec.shards)]
        for s in self.shards:
            s.create()
        self.wal.create()
        self._save_meta([{"gen": 0, "rows": 0, "index": None, "index_rows": 0}] * self.spec.shards)
        fsync_dir(self.path.parent)
        return self

    def open(self) -> "Bank":
        meta = json.loads((self.path / META).read_text())
        if meta.get("format") != FORMAT:   # written by memoryd before the log
            meta = upgrade.v1_meta(self.path, meta, self.spec)
        self.next_id, self.seq = int(meta["next_id"]), int(meta.get("seq", 0))
        self.lsn = self.checkpoint_lsn = int(meta.get("lsn", 0))
        if (self.path / TEMPLATE).exists():
            self.template = fx.configure(faiss.read_index(str(self.path / TEMPLATE)), self.spec.index)
        self.shards = [Shard(self._shard_path(i), self.spec, self.template)
                       for i in range(self.spec.shards)]
        for s, state in zip(self.shards, meta["shards"]):
            s.load(state)
        replayed = 0
        for lsn, ops in self.wal.open(after_lsn=self.checkpoint_lsn):
            self._apply(ops, replay=True)
            self.lsn, replayed = lsn, replayed + 1
        # (a promote's move waits for the engine to finish it: engine.banks._redo_moves)
        if (replayed or meta.get("format") != FORMAT) and not self.replayed_moves:
            self.checkpoint()
        upgrade.drop_v1_files(self.path)
        self._wake_sealer()
        return self

    def _shard_path(self, i: int) -> Path:
        return self.path / f"shard-{i:03d}"

    def _save_meta(self, shards: list[dict]) -> None:
        atomic_write_json(self.path / META, {
            "format": FORMAT, "seq": self.seq, "lsn": self.lsn, "next_id": self.next_id,
            "spec": self.spec.index, "shards": shards})

    def checkpoint(self, force: bool = False) -> None:
        """Every shard's files, fsync'd; then the record naming them; then an
        empty log (see the module doc). A no-op when nothing changed."""
        if (self.lsn == self.checkpoint_lsn and self.seq and not force
                and not any(s.index_moved for s in self.shards)):   # nor sealed since
            return
        t0 = telemetry.now()
        self.seq += 1
        states = [s.write_checkpoint(self.seq) for s in self.shards]
        for s in self.shards:
            fsync_dir(s.store.path)
        faults.point("bank.checkpoint:files-written")
        self._save_meta(states)
        self.checkpoint_lsn, self._checkpoint_due = self.lsn, False
        for s in self.shards:
            s.after_checkpoint()
        self.wal.reset(self.lsn)
        telemetry.checkpointed(t0)

    def close(self) -> None:
        self._closed = True
        segments.SEALER.forget(self)
        self.wal.close()

    def set_tier(self, tier: str) -> None:
        """Move every shard to tier (caller holds the write lock: no write is
        lost and searches wait for the move instead of failing)."""
        for s in self.shards:
            s.own_keys()          # an HNSW bank leaving ram needs its key file back
        self.checkpoint(force=any(s.store.relaid for s in self.shards))
        self.spec = self.spec.with_(tier=tier)
        meta = json.loads((self.path / META).read_text())
        for s, state in zip(self.shards, meta["shards"]):
            s.spec = self.spec
            s.load(state)
        self._wake_sealer()

    def snapshot_to(self, dest: Path) -> None:
        self.checkpoint()
        dest.mkdir(parents=True, exist_ok=False)
        files = [self.path / META] + ([self.path / TEMPLATE] if (self.path / TEMPLATE).exists() else [])
        for f in files:
            _link_or_copy(f, dest / f.name)
        for i, s in enumerate(self.shards):
            (dest / s.store.path.name).mkdir()
            for f in s.files():
                _link_or_copy(f, dest / s.store.path.name / f.name)
        (dest / LOG).touch()

    def tier_bytes(self) -> dict[str, int]:
        """Where the bytes of nbytes() sit, and what the files take on disk."""
        store = sum(s.store.nbytes() for s in self.shards)
        index = self.nbytes() - store
        disk = sum(s.store.disk_bytes() for s in self.shards) + folder_bytes(self.path)
        if self.spec.tier == "mmap":  # rows and flat codes are paged in from disk
            codes = 0 if self.flat else self.count * fx.code_bytes(self.template, self.spec.dim)
            return {"ram": max(0, index - codes), "disk": disk}
        if self.spec.tier == "gpu":
            return {"ram": store, "gpu": index, "disk": disk}
        return {"ram": store + index, "disk": disk}

    def split_bytes(self) -> dict[str, int]:
        """nbytes() as the data users store (ids, keys, values, scores) and
        what the index adds on top (graph links, centroids, its own codes)."""
        data = self.count * self._data_row_bytes() if self.count else 0
        return {"data": data, "index": self.nbytes() - data}

    def delete_files(self) -> None:
        self._closed = True
        segments.SEALER.forget(self)
        self.wal.close()
        shutil.rmtree(self.path)

    # ---- sizes ------------------------------------------------------------------
    @property
    def flat(self) -> bool:
        return keys_in_rows(self.template, self.spec.tier)

    @property
    def count(self) -> int:
        return sum(s.store.rows for s in self.shards)

    @property
    def trained(self) -> bool:
        return bool(self.template.is_trained)

    def _data_row_bytes(self) -> int:
        vbytes = self.spec.value_dim * value_dtype(self.spec.value_dtype).itemsize
        return 8 + 4 * self.spec.dim + vbytes + (4 if self.spec.kind == "session" else 0)

    def _row_bytes(self, template: "faiss.Index | None" = None) -> int:
        """Bytes one row costs: its id, key, value (and score), and its index entry
        (none for a Flat bank: its index is the key column)."""
        t = template or self.template
        return self._data_row_bytes() + index_row_bytes(t, self.spec.tier, self.spec.dim)

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
        if not rows:
            return 0
        fixed = 0 if keys_in_rows(template, self.spec.tier) else fx.fixed_bytes(template)
        return self.spec.shards * fixed + rows * self._row_bytes(template)

    # ---- writes (caller holds lock.write()) ---------------------------------------
    def plan_add(self, keys: np.ndarray, values: np.ndarray | None,
                 ids: np.ndarray | None, scores: np.ndarray | None = None) -> AddPlan:
        fx.check_graph(self.template)     # a bank made before M >= 2 was checked
        ids = self._new_ids(len(keys), ids)
        template = self._trained_template(keys)
        return AddPlan(ids=ids, keys=keys, values=values, row_bytes=self._row_bytes(template),
                       detail=template, scores=scores)

    def add_cost(self, plan: AddPlan) -> int:
        after = self.count + len(plan.ids) - len(plan.evict)
        return self._nbytes(after, plan.detail) - self.nbytes()

    def _trained_template(self, keys: np.ndarray) -> "faiss.Index":
        """The template after training on keys if it needs training (not installed)."""
        if self.template.is_trained:
            return self.template
        t = fx.empty_like(self.template)
        fx.train(t, keys, self.spec.index)
        return t

    def _new_ids(self, n: int, ids: np.ndarray | None) -> np.ndarray:
        """The ids of an add: assigned (from next_id) or the caller's, checked.

        A caller's ids must be in 0..api.MAX_ID (2^62 - 1), so the ids the bank
        assigns after them still fit int64; a bank whose largest id leaves no
        room (one written before that bound) refuses assigned ids precisely."""
        from memoryd.api import MAX_ID
        from memoryd.errors import FailedPrecondition

        if ids is None:
            step, offset = self.id_step
            start = self.next_id + (offset - self.next_id) % step   # first id = offset mod step
            if start + step * (n - 1) > np.iinfo(np.int64).max:
                raise FailedPrecondition(
                    f"bank '{self.spec.name}' has no ids left to assign: its largest id is "
                    f"{self.next_id - 1}; id space exhausted (give explicit ids <= {MAX_ID})")
            return np.arange(start, start + step * n, step, dtype=np.int64)
        if len(ids) != n:
            raise InvalidArgument(f"got {len(ids)} ids for {n} keys")
        if (ids < 0).any():
            raise InvalidArgument("ids must be >= 0 (-1 marks a missing result)")
        if (ids > MAX_ID).any():
            raise InvalidArgument(
                f"ids must be <= {MAX_ID} (2^62 - 1: the ids above stay free for the ones the "
                f"bank assigns); got {int(ids.max())}")
        if len(np.unique(ids)) != n:
            raise InvalidArgument("ids repeat within the batch")
        present = self.get_rows(ids)[2]
        if present.any():
            raise InvalidArgument(
                f"{int(present.sum())} ids already exist in bank '{self.spec.name}', "
                f"e.g. {int(ids[present][0])}")
        return ids

    def add(self, plan: AddPlan) -> None:
        template = plan.detail
        if template is not self.template:  # the first add trained the index
            write_durably(self.path / TEMPLATE, faiss.serialize_index(template))
            fsync_dir(self.path)
            self.template = template
            for s in self.shards:
                s.template = template
                s.index = s._fresh_index()
        ops = [Op(REMOVE, (plan.evict,))] if len(plan.evict) else []
        ops.append(Op(ADD, (plan.ids, plan.keys, plan.values, plan.scores)))
        if plan.moved_from is not None:
            source, ids = plan.moved_from
            ops.append(Op(MOVED, (np.frombuffer(source.encode(), np.uint8), ids)))
        self._commit(ops)

    def update_values(self, ids: np.ndarray, values: np.ndarray) -> int:
        found = self.get_rows(ids)[2]
        if found.any():
            self._commit([Op(UPDATE, (ids[found], values[found]))])
        return int(found.sum())

    def remove(self, ids: np.ndarray) -> int:
        found = self.get_rows(ids)[2]
        if found.any():
            self._commit([Op(REMOVE, (ids[found],))])
        return int(found.sum())

    def oldest_ids(self, nbytes: int, row_bytes: int | None = None) -> np.ndarray:
        rows = min(self.count, -(-nbytes // (row_bytes or self._row_bytes())))
        return np.sort(np.concatenate([s.store.ids.data for s in self.shards]))[:rows]

    def _commit(self, ops: list[Op]) -> None:
        """Log, then apply (StorageFull/StorageUnwritable before anything changed).
        An apply that fails half way (memory, the mmap tier's files) takes its
        record back and reloads the bank from its files: all or nothing here too."""
        size = self.wal.size
        lsn = self.wal.append(ops)
        faults.point("bank.write:logged")
        try:
            self._apply(ops)
        except BaseException:
            self.wal.undo(lsn, size)
            self.wal.close()
            self.open()                    # the checkpoint plus the log without it
            raise
        self.lsn = lsn
        self.last_write = time.monotonic()
        self._wake_sealer()
        relay = self.spec.tier == "mmap" and any(op.code in (UPDATE, REMOVE) for op in ops)
        due = relay or self._checkpoint_due or wal.checkpoint_due(self.wal.size, self.nbytes())
        if any(op.code == MOVED for op in ops):
            # this record must stay in the log until the source's remove is logged
            # (engine.banks.move_rows): the next write checkpoints instead
            self._checkpoint_due = due
        elif due:
            try:
                self.checkpoint()
            except StorageUnwritable:   # the write is logged and applied; retried next time
                self._checkpoint_due = True

    def _apply(self, ops: list[Op], replay: bool = False) -> None:
        n, vdt = self.spec.shards, value_dtype(self.spec.value_dtype)
        for op in ops:
            if op.code == MOVED:
                if replay:
                    self.replayed_moves.append((op.arrays[0].tobytes().decode(), op.arrays[1]))
                continue
            ids = op.arrays[0]
            route = ids % n
            for i, s in enumerate(self.shards):
                sel = route == i if n > 1 else slice(None)
                if n > 1 and not sel.any():
                    continue
                if op.code == ADD:
                    _, keys, values, scores = op.arrays
                    values = typed(values, vdt)
                    s.add(ids[sel], keys[sel], None if values is None else values[sel],
                          None if scores is None else scores[sel])
                    if not replay:
                        faults.point("bank.add:between-shards")
                elif op.code == UPDATE:
                    rows, found = s.store.lookup(ids[sel])
                    s.update_values(rows[found], typed(op.arrays[1], vdt)[sel][found])
                elif op.code == REMOVE:
                    s.remove(ids[sel])
            if op.code == ADD and len(ids):
                self.next_id = max(self.next_id, int(ids.max()) + 1)

    def sync(self, lsn: int) -> None:
        self.wal.sync(lsn)

    # ---- growing segments (memoryd.storage.segments) -----------------------------------
    def growing_rows(self) -> int:
        """Rows not in their shard's index yet (searched exactly until sealed)."""
        return sum(s.growing for s in self.shards)

    def _wake_sealer(self) -> None:
        if not self._closed and any(s.growing for s in self.shards):
            segments.SEALER.wake(self)

    def seal_now(self) -> int:
        """Seal every growing row now, in this thread; the rows sealed. Takes the
        write lock a chunk at a time, like the sealer: the caller must not hold
        the bank's lock (tests, benches, an operator)."""
        return self.seal_step(background=False, budget_s=float("inf"))

    def seal_step(self, background: bool = True, budget_s: float = segments.STEP_S) -> int:
        """Seal growing rows, chunk after chunk, for about budget_s seconds; the
        rows sealed (0 also when the lock did not come free: writers go first
        while the bank grows less than segments.high_rows())."""
        done, idle, t0 = 0, 0, time.monotonic()
        while self.growing_rows() and not self._closed and idle < 3:
            n = self._seal_chunk(background)
            if n < 0:
                break
            done, idle = done + n, 0 if n else idle + 1      # 0: its rows moved; try again
            if time.monotonic() - t0 >= budget_s:
                break
        return done

    def _seal_chunk(self, background: bool) -> int:
        """One chunk of the shard growing most; -1 if the lock was not had."""
        shard = max(self.shards, key=lambda s: s.growing)      # a hint: checked under the lock
        if shard.encodes_apart:
            with self.lock.read():
                if self._closed or shard not in self.shards:
                    return 0
                job = shard.seal_prepare(segments.ENCODE_ROWS)
            if job is None:
                return 0
            codes = shard.seal_encode(job)                     # off the lock: the cost
            with self._commit_lock():
                if self._closed or shard not in self.shards:
                    return 0
                return shard.seal_commit(job, codes)            # 0: rows moved meanwhile
        if background and shard.copies:
            with self.lock.read():
                if self._closed or shard not in self.shards:
                    return 0
                job = shard.seal_copy_prepare()                # reads the index: searches go on
            if job is None:
                return 0
            job.index.add_with_ids(job.keys, job.ids)          # off the lock: the cost
            with self._commit_lock():
                if self._closed or shard not in self.shards:
                    return 0
                return shard.seal_swap(job)                    # 0: rows moved meanwhile
        with self._seal_lock(background) as held:
            if not held:
                return -1
            if self._closed or shard not in self.shards:
                return 0
            return shard.seal_chunk()

    @contextmanager
    def _commit_lock(self):
        """The write lock to put in what was sealed off it (a copy, ~ms): queued
        like any writer, never given up (that would throw the work away)."""
        with self.lock.write():
            t = time.perf_counter()
            yield
        segments.HOLDS.append(time.perf_counter() - t)

    @contextmanager
    def _seal_lock(self, background: bool):
        """The write lock for one chunk: behind writers (see segments) unless the
        bank grew past segments.high_rows() or this is seal_now."""
        if background and self.growing_rows() < segments.high_rows():
            with self.lock.write_background(segments.QUIET_S, timeout=0.2) as held:
                t = time.perf_counter()
                yield held
        else:
            with self.lock.write():
                t, held = time.perf_counter(), True
                yield True
        if held:
            segments.HOLDS.append(time.perf_counter() - t)

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
                k_out[sel] = s.store.keys.take(rows[sel])
            if v_out is not None:
                v_out[sel] = s.store.values.data[rows[sel]]
        shape = ids.shape
        return (found.reshape(shape),
                None if k_out is None else k_out.reshape(*shape, self.spec.dim),
                None if v_out is None else v_out.reshape(*shape, self.spec.value_dim))

    def scores_of(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(len(ids), np.nan, np.float32)
        route = ids % self.spec.shards
        for i, s in enumerate(self.shards):
            sel = route == i
            if sel.any():
                out[sel] = s.scores_of(ids[sel])[1]
        return out

    def export_chunks(self, chunk_rows: int) -> Iterator[ExportChunk]:
        for s in self.shards:
            for start in range(0, s.store.rows, chunk_rows):
                end = min(s.store.rows, start + chunk_rows)
                vals = s.store.values.data[start:end].copy() if s.store.values is not None else None
                yield ExportChunk(ids=s.store.ids.data[start:end].copy(),
                                  keys=np.array(s.store.keys.slice(start, end)), values=vals)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A snapshot's copy of a checkpoint file: a hard link where the snapshot is
    on the same file system (checkpoint files are never rewritten in place:
    only bytes past the rows a checkpoint counts are ever added), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
