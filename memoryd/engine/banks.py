"""BankEngine: the catalog and the banks of one data dir, with every rule of
bank admin and data (quotas, frozen banks, fifo eviction, tiers).

It knows nothing of sessions or of who is calling: LocalMemory
(memoryd.engine.local) puts sessions (memoryd.engine.sessions) and the stack
log on top, and sessions are built on this engine, never the other way.

Layout of a data dir:
    catalog.db              SQLite catalog (unless a catalog URL says otherwise)
    banks/<name>-<hex>/     one folder per bank (memoryd.storage)
"""
from __future__ import annotations

import logging
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from memoryd import api
from memoryd.api import (BankInfo, BankQuery, BankSpec, ExportChunk, GetResult, RowStacks,
                         SearchResult)
from memoryd.arrays import id_vector, matrix, value_dtype
from memoryd.engine.catalog import Catalog
from memoryd.engine.row_search import plan_rows, search_rows
from memoryd.engine.searching import StackEntry, search_stack
from memoryd import faults
from memoryd import telemetry
from memoryd.errors import (BankFrozen, FailedPrecondition, InvalidArgument, MemorydError, NotFound,
                            QuotaExceeded, StorageUnwritable)
from memoryd.sizes import describe_size
from memoryd.cluster.placement import Placement
from memoryd.storage import AddPlan, BankStore, new_bank
from memoryd.storage import faiss_index as fx
from memoryd.storage.wal import check_ack

log = logging.getLogger("memoryd")
SEARCH_THREADS = 4          # threads that search a stack's shards in parallel


class BankEngine:
    """Banks by name over one catalog. Thread-safe: an admin lock guards the
    set of banks, each bank's own readers/writer lock its contents."""

    def __init__(self, data_dir: Path, catalog: Catalog, *, search_threads: int = SEARCH_THREADS,
                 placement: Placement = Placement()):
        """placement: this process's shard of a cluster (memoryd.cluster.placement):
        it holds only its slices of the catalog's banks, and assigns ids = index mod count."""
        self.data_dir, self.catalog, self.placement = data_dir, catalog, placement
        (data_dir / "banks").mkdir(parents=True, exist_ok=True)
        self._banks: dict[str, BankStore] = {}
        self._admin = threading.Lock()   # guards the _banks dict, not bank contents
        self._pool = ThreadPoolExecutor(search_threads, thread_name_prefix="memoryd-search")
        self._open_all()

    # ---- open / close ------------------------------------------------------------
    def _open_all(self) -> None:
        storages = self.catalog.storages()
        for info in self.catalog.list_banks():
            if info.name not in storages:      # a bank whose slices are on other shards only
                continue
            spec = info.spec
            if spec.tier == "gpu" and fx.num_gpus() == 0:  # e.g. a data dir moved to a CPU host
                log.warning("bank %s: tier gpu but this host has no GPU; opening it in ram", info.name)
                spec = spec.with_(tier="ram")
                self.catalog.update_bank(info.name, tier="ram")
            bank = self.new_bank(self._bank_path(storages[info.name]), spec).open()
            bank.frozen = info.frozen
            self._banks[info.name] = bank
        self._redo_moves()
        for name, bank in self._banks.items():
            self.catalog.reconcile(name, bank.nbytes(), bank.count)
        known = set(storages.values())
        for folder in (self.data_dir / "banks").iterdir():
            if folder.name not in known:  # a create or delete torn by a crash
                log.warning("removing orphan bank folder %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def _redo_moves(self) -> None:
        """Finish promotes with move that a crash cut between their two records:
        the target's record (replayed) names the session rows that left."""
        for bank in list(self._banks.values()):
            if not bank.replayed_moves:
                continue
            for source, ids in bank.replayed_moves:
                src = self._banks.get(source)
                if src is not None and src.remove(ids):
                    src.sync(src.lsn)
                    log.warning("bank %s: finished moving %d rows to %s after a crash",
                                source, len(ids), bank.spec.name)
            bank.replayed_moves = []
            bank.checkpoint()   # only now may the target's record leave its log

    def close(self) -> None:
        """Checkpoint every bank (so the next open replays nothing) and close its log."""
        for bank in list(self._banks.values()):
            with bank.lock.write():
                try:
                    bank.checkpoint()
                except MemorydError as e:   # e.g. disk full: the log still holds it all
                    log.warning("bank %s: checkpoint at close failed (%s); its log keeps "
                                "every write", bank.spec.name, e)
                bank.close()
        self._pool.shutdown(wait=True)

    def new_bank(self, path: Path, spec: BankSpec) -> BankStore:
        """The storage object of a bank (memoryd.storage.new_bank) with this shard's ids."""
        bank = new_bank(path, spec)
        bank.id_step = self.placement.id_step
        return bank

    def _bank_path(self, storage: str) -> Path:
        return self.data_dir / "banks" / storage

    def bank(self, name: str) -> BankStore:
        """The bank's storage object (NotFound if there is none)."""
        try:
            return self._banks[name]
        except KeyError:
            raise NotFound(f"no bank named '{name}'") from None

    # ---- bank admin --------------------------------------------------------------
    def create_bank(self, spec: BankSpec) -> BankInfo:
        spec.validated()
        with self._admin:
            storage = f"{spec.name}-{uuid.uuid4().hex[:12]}"
            bank = self.new_bank(self._bank_path(storage), spec)   # InvalidArgument: bad spec
            self.catalog.create_bank(spec, storage)            # AlreadyExists
            try:
                if bank.count:  # born full (product keys): its bytes must fit the quotas first
                    self.catalog.reserve(spec.name, bank.nbytes(), bank.count, op="create")
                try:
                    bank.create()
                except OSError as e:                           # disk full, read-only dir
                    raise StorageUnwritable.from_os_error(e, bank.path) from None
            except BaseException:
                self.catalog.delete_bank(spec.name)
                shutil.rmtree(bank.path, ignore_errors=True)
                raise
            self._banks[spec.name] = bank
            self.catalog.update_bank(spec.name, trained=bank.trained)
        return self.bank_info(spec.name)

    def bank_info(self, name: str) -> BankInfo:
        return self._with_tiers(self.catalog.bank(name))

    def list_banks(self, tenant: str | None = None) -> list[BankInfo]:
        return [self._with_tiers(i) for i in self.catalog.list_banks(tenant)]

    def _with_tiers(self, info: BankInfo) -> BankInfo:
        bank = self._banks.get(info.name)
        if bank is None:
            return info
        with bank.lock.read():  # a remove swaps the files underneath
            if self._banks.get(info.name) is not bank:   # deleted while we waited
                return info
            return replace(info, tier_bytes=bank.tier_bytes(),
                           data_bytes=min(info.used_bytes, bank.split_bytes()["data"]))

    def set_tier(self, name: str, tier: str) -> BankInfo:
        """Move a live bank between ram, mmap and gpu (see memoryd.storage.tiers)."""
        b = self.bank(name)
        if tier not in api.TIERS:
            raise InvalidArgument(f"tier must be one of {', '.join(api.TIERS)}; got {tier!r}")
        if tier == "gpu":
            fx.require_gpu()
        with b.lock.write():
            if b.spec.tier != tier:
                b.set_tier(tier)
                self.catalog.update_bank(name, tier=tier)
        return self.bank_info(name)

    def delete_bank(self, name: str) -> int:
        with self._admin:
            bank = self.bank(name)
            with bank.lock.write():
                released = self.catalog.delete_bank(name)
                del self._banks[name]
                bank.delete_files()
        return released

    def freeze_bank(self, name: str) -> BankInfo:
        bank = self.bank(name)
        with bank.lock.write():
            if bank.frozen:
                return self.catalog.bank(name)
            bank.checkpoint()
            info = self.catalog.update_bank(name, frozen=True, checksum=bank.checksum())
            bank.frozen = True
            return info

    def set_quota(self, name: str, quota_bytes: int | None) -> BankInfo:
        """Raise at once; lower below usage only for a fifo bank (which evicts)."""
        quota_bytes = api.check_quota(quota_bytes)
        b = self.bank(name)
        with b.lock.write():
            # alone, the bank's own bytes; in a cluster, all its slices' (the catalog)
            used = b.nbytes() if self.placement.count == 1 else self.catalog.bank(name).used_bytes
            if quota_bytes is not None and used > quota_bytes:
                if b.spec.eviction != "fifo":
                    raise FailedPrecondition(
                        f"bank '{name}' uses {describe_size(used)}: a quota of "
                        f"{describe_size(quota_bytes)} is below that; remove memories first "
                        "(or use eviction=fifo)")
                # this slice's oldest rows, until the bank fits or the slice is empty (a
                # router asks the shards in turn: the next one evicts what is left)
                self._evict_oldest(b, used - quota_bytes)
            return self.catalog.set_quota(name, quota_bytes)

    def _evict_oldest(self, b: BankStore, nbytes: int) -> int:
        """fifo: remove the oldest rows until nbytes are free; give their bytes back."""
        before = b.nbytes()
        removed = b.remove(b.oldest_ids(nbytes))
        self.catalog.release(b.spec.name, before - b.nbytes(), removed, op="evict")
        telemetry.evicted(b.spec, removed)
        return removed

    # ---- writes ------------------------------------------------------------------
    def _writable(self, name: str) -> BankStore:
        bank = self.bank(name)
        if bank.frozen:  # mirrors the catalog: only this process writes it
            raise BankFrozen(f"bank '{name}' is frozen: it accepts no writes")
        return bank

    def _values_for(self, bank: BankStore, values: Any, n: int) -> np.ndarray | None:
        spec = bank.spec
        if spec.value_dim == 0:
            if values is not None:
                raise InvalidArgument(f"bank '{spec.name}' holds keys only: do not send values")
            return None
        if values is None:
            raise InvalidArgument(
                f"bank '{spec.name}' holds values (value_dim {spec.value_dim}): send them with the keys")
        v = matrix(values, "values", spec.value_dim, value_dtype(spec.value_dtype))
        if len(v) != n:
            raise InvalidArgument(f"got {n} keys but {len(v)} values")
        return v

    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None, *,
            scores: np.ndarray | None = None, ack: str | None = None) -> np.ndarray:
        """Add rows (with a session append's scores); acknowledged at `ack`
        (memoryd.storage.wal: "applied", the default, or "durable")."""
        ack = check_ack(ack)
        b = self.bank(bank)
        k = matrix(keys, "keys", b.spec.dim, np.dtype(np.float32))
        v = self._values_for(b, values, len(k))
        given = None if ids is None else id_vector(ids)
        with b.lock.write():
            plan = self._add_locked(b, k, v, given, scores)
            lsn = b.lsn
        self._ack(b, lsn, ack)
        return plan.ids

    def _add_locked(self, b: BankStore, k: np.ndarray, v: np.ndarray | None,
                    ids: np.ndarray | None, scores: np.ndarray | None,
                    moved_from: tuple[str, np.ndarray] | None = None) -> AddPlan:
        """The add itself (the caller holds b's write lock): plan, reserve, one log record."""
        name = b.spec.name
        self._writable(name)
        was_trained = b.trained
        plan = b.plan_add(k, v, ids, scores)
        plan.moved_from = moved_from
        cost, items = self._reserve(b, plan)               # QuotaExceeded: nothing written
        try:
            b.add(plan)
        except BaseException:
            self.catalog.release(name, cost, items, op="add-failed")
            raise
        if b.trained and not was_trained:
            self.catalog.update_bank(name, trained=True)
        return plan

    def _reserve(self, b: BankStore, plan: AddPlan) -> tuple[int, int]:
        """Reserve the bytes plan's rows cost: (bytes, items). A fifo bank makes
        room by evicting its oldest rows in the same log record as the add
        (plan.evict), when that makes enough room."""
        items = len(plan.ids)
        cost = b.add_cost(plan)
        try:
            self.catalog.reserve(b.spec.name, cost, items)
            return cost, items
        except QuotaExceeded as e:
            room = e.used + e.requested - e.limit
            # evicting r rows frees r rows' bytes (emptying also frees the fixed
            # bytes, but refilling charges them again): at most count rows' worth
            if b.spec.eviction != "fifo" or room > b.count * plan.row_bytes:
                raise  # reject, or the batch cannot fit even with the bank emptied
        plan.evict = b.oldest_ids(room, plan.row_bytes)
        cost, items = b.add_cost(plan), items - len(plan.evict)
        self.catalog.reserve(b.spec.name, cost, items, op="add+evict")
        telemetry.evicted(b.spec, len(plan.evict))
        return cost, items

    @staticmethod
    def _ack(b: BankStore, lsn: int, ack: str) -> None:
        """A durable ack waits for the fsync outside the bank's lock (group commit)."""
        if ack == "durable" and lsn:
            b.sync(lsn)

    def update_values(self, bank: str, ids: Any, values: Any, *, ack: str | None = None) -> int:
        ack = check_ack(ack)
        b = self.bank(bank)
        i = id_vector(ids)
        v = self._values_for(b, values, len(i))
        with b.lock.write():
            self._writable(bank)
            updated, lsn = b.update_values(i, v), b.lsn
        self._ack(b, lsn, ack)
        return updated

    def remove(self, bank: str, ids: Any, *, ack: str | None = None) -> int:
        ack = check_ack(ack)
        b = self.bank(bank)
        i = id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            removed, lsn = self._remove_locked(b, np.unique(i)), b.lsn
        self._ack(b, lsn, ack)
        return removed

    def _remove_locked(self, b: BankStore, ids: np.ndarray) -> int:
        before = b.nbytes()
        removed = b.remove(ids)
        if removed:
            self.catalog.release(b.spec.name, before - b.nbytes(), removed, op="remove")
        return removed

    def move_rows(self, source: str, target: str, ids: np.ndarray, keys: np.ndarray,
                  values: np.ndarray | None, leaving: np.ndarray, move: bool,
                  ack: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Copy rows `ids` of source (their keys, values) into target and, with
        move, remove `leaving` (ids and any others) from source: all or nothing
        across a crash. Both banks' write locks are held throughout; the
        target's record names the ids leaving the source and is durable before
        the source's remove is logged, so recovery finishes a move a crash cut
        in two (_redo_moves). A move is always durable (two fsyncs); a copy is
        acknowledged at `ack`. Returns (target ids, the source ids copied)."""
        ack = check_ack(ack)
        src, dst = self.bank(source), self.bank(target)
        with ExitStack() as locks:
            for b in sorted({src, dst}, key=lambda b: b.spec.name):
                locks.enter_context(b.lock.write())
            if move:   # a concurrent promote may have moved some of them: never twice
                self._writable(source)
                here = src.get_rows(ids)[2]
                ids, keys = ids[here], keys[here]
                values = None if values is None else values[here]
                leaving = leaving[src.get_rows(leaving)[2]]
            if not len(ids):
                if move and len(leaving):      # only duplicates: they leave, nothing is added
                    self._remove_locked(src, leaving)
                    src.sync(src.lsn)
                return np.empty(0, np.int64), ids
            plan = self._add_locked(dst, keys, values, None, None,
                                    (source, leaving) if move else None)
            lsn = dst.lsn
            if move:
                dst.sync(lsn)
                faults.point("promote:added")
                self._remove_locked(src, leaving)
                src.sync(src.lsn)
        self._ack(dst, lsn, ack)
        return plan.ids, ids

    def scores_of(self, bank: str, ids: np.ndarray) -> np.ndarray:
        b = self.bank(bank)
        with b.lock.read():
            return b.scores_of(ids)

    # ---- reads -------------------------------------------------------------------
    def search(self, stack: Sequence[BankQuery], queries: Any, k: int, values: bool = True,
               keys: bool = False) -> SearchResult:
        """One merged top-k over a stack normalised by api.bank_list, k checked by api.check_k."""
        chosen = [self.bank(b.name) for b in stack]   # excluded banks must exist too
        active = [i for i, b in enumerate(stack) if b.include]
        first = _shared_shape([chosen[i].spec for i in active])
        vdt, vdim = (common_values(chosen[i].spec for i in active) if values else (None, 0))
        q = matrix(queries, "queries", first.dim, np.dtype(np.float32))
        api.check_result_size(len(q), k, _payload(vdt, vdim, first.dim, keys))
        with ExitStack() as locks:
            for i in sorted(active, key=lambda i: stack[i].name):
                locks.enter_context(chosen[i].lock.read())
            entries = [StackEntry(pos=i, query=stack[i], searchers=chosen[i].searchers(),
                                  gather=chosen[i].gather,
                                  holds_values=chosen[i].spec.value_dim > 0) for i in active]
            return search_stack(entries, q, k, first.metric, vdt, vdim, keys, self._pool)

    def search_rows(self, rs: RowStacks, queries: Any, k: int, values: bool = True,
                    keys: bool = False) -> SearchResult:
        """One top-k per query row over its own stack (api.RowStacks), each distinct
        bank searched once for all the rows naming it; k checked by api.check_k."""
        chosen = {b.name: self.bank(b.name) for s in rs.stacks for b in s}   # excluded too
        active = list(dict.fromkeys(b.name for s in rs.stacks for b in s if b.include))
        first = _shared_shape([chosen[n].spec for n in active])
        vdt, vdim = (common_values(chosen[n].spec for n in active) if values else (None, 0))
        q = matrix(queries, "queries", first.dim, np.dtype(np.float32))
        api.check_result_size(len(q), k, _payload(vdt, vdim, first.dim, keys))
        if len(q) != rs.nq:
            raise InvalidArgument(f"row stacks cover {rs.nq} query rows ({len(rs.rows)} groups) "
                                  f"but {len(q)} queries were sent: the rows must sum to nq")
        if len(set(rs.stacks)) == 1:   # one stack for every row (B = 1): a plain search is it
            return self.search(rs.stacks[0], q, k, values, keys)
        with ExitStack() as locks:
            for n in sorted(active):
                locks.enter_context(chosen[n].lock.read())
            plan = plan_rows(rs, lambda bq: StackEntry(
                pos=-1, query=bq, searchers=chosen[bq.name].searchers(),
                gather=chosen[bq.name].gather, holds_values=chosen[bq.name].spec.value_dim > 0))
            return search_rows(plan, q, k, first.metric, vdt, vdim, keys, self._pool)

    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False) -> GetResult:
        b = self.bank(bank)
        i = id_vector(ids)
        vdt = value_dtype(b.spec.value_dtype) if values and b.spec.value_dim else None
        api.check_result_size(len(i), 1, _payload(vdt, b.spec.value_dim, b.spec.dim, keys), "get")
        with b.lock.read():  # a key-only bank has no values to give: None
            found, kk, vv = b.gather(i, keys=keys, values=values and b.spec.value_dim > 0)
        return GetResult(found=found, values=vv, keys=kk)

    def export(self, bank: str, chunk_rows: int = api.CHUNK_ROWS) -> Iterator[ExportChunk]:
        b = self.bank(bank)
        if chunk_rows <= 0:
            raise InvalidArgument(f"chunk_rows must be positive; got {chunk_rows}")
        return _export(b, chunk_rows)


def _export(b: BankStore, chunk_rows: int) -> Iterator[ExportChunk]:
    # One snapshot under the read lock, handed out in chunks: a slow
    # reader never holds the bank's lock between chunks.
    with b.lock.read():
        chunks = list(b.export_chunks(chunk_rows))
    yield from chunks


def _payload(vdt: np.dtype | None, vdim: int, dim: int, keys: bool) -> int:
    """Bytes a result carries beyond its id, score and bank: its value and key."""
    return (vdim * vdt.itemsize if vdt is not None else 0) + (4 * dim if keys else 0)


def _shared_shape(specs: list[BankSpec]) -> BankSpec:
    """The first of the banks searched together, once all share its dim and metric."""
    first = specs[0]
    for spec in specs[1:]:
        if (spec.dim, spec.metric) != (first.dim, first.metric):
            raise InvalidArgument(
                f"banks of one search must share dim and metric: '{first.name}' is "
                f"{first.dim}-d {first.metric}, '{spec.name}' is {spec.dim}-d {spec.metric}")
    return first


def common_values(specs) -> tuple[np.dtype | None, int]:
    """(dtype, value_dim) of a merged result's values: the banks' own dtype if
    shared, else float32; (None, 0) when no bank holds values.

    Results from a key-only bank searched together with value banks get zero
    values (the layer pairs such a bank with a trainable value table of its own).
    """
    with_values = [s for s in specs if s.value_dim]
    if not with_values:
        return None, 0
    dims = {s.value_dim for s in with_values}
    if len(dims) > 1:
        raise InvalidArgument(f"banks of one search with values must share value_dim; got {sorted(dims)}")
    dtypes = {s.value_dtype for s in with_values}
    dtype = value_dtype(dtypes.pop()) if len(dtypes) == 1 else np.dtype(np.float32)
    return dtype, dims.pop()
