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
from memoryd.errors import BankFrozen, FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from memoryd.sizes import describe_size
from memoryd.storage import AddPlan, BankStore, new_bank
from memoryd.storage import faiss_index as fx

log = logging.getLogger("memoryd")
SEARCH_THREADS = 4          # threads that search a stack's shards in parallel


class BankEngine:
    """Banks by name over one catalog. Thread-safe: an admin lock guards the
    set of banks, each bank's own readers/writer lock its contents."""

    def __init__(self, data_dir: Path, catalog: Catalog, *, search_threads: int = SEARCH_THREADS):
        self.data_dir, self.catalog = data_dir, catalog
        (data_dir / "banks").mkdir(parents=True, exist_ok=True)
        self._banks: dict[str, BankStore] = {}
        self._admin = threading.Lock()   # guards the _banks dict, not bank contents
        self._pool = ThreadPoolExecutor(search_threads, thread_name_prefix="memoryd-search")
        self._open_all()

    # ---- open / close ------------------------------------------------------------
    def _open_all(self) -> None:
        storages = self.catalog.storages()
        for info in self.catalog.list_banks():
            spec = info.spec
            if spec.tier == "gpu" and fx.num_gpus() == 0:  # e.g. a data dir moved to a CPU host
                log.warning("bank %s: tier gpu but this host has no GPU; opening it in ram", info.name)
                spec = spec.with_(tier="ram")
                self.catalog.update_bank(info.name, tier="ram")
            bank = new_bank(self._bank_path(storages[info.name]), spec).open()
            bank.frozen = info.frozen
            self._banks[info.name] = bank
            self.catalog.reconcile(info.name, bank.nbytes(), bank.count)
        known = set(storages.values())
        for folder in (self.data_dir / "banks").iterdir():
            if folder.name not in known:  # a create or delete torn by a crash
                log.warning("removing orphan bank folder %s", folder)
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Snapshot every index (so the next open replays nothing)."""
        for bank in list(self._banks.values()):
            with bank.lock.write():
                bank.checkpoint()
        self._pool.shutdown(wait=True)

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
            bank = new_bank(self._bank_path(storage), spec)   # InvalidArgument on a bad spec
            self.catalog.create_bank(spec, storage)            # AlreadyExists
            try:
                bank.create()
                if bank.count:  # born full (product keys): its bytes must fit the quota
                    self.catalog.reserve(spec.name, bank.nbytes(), bank.count, op="create")
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
            return replace(info, tier_bytes=bank.tier_bytes())

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
            used = b.nbytes()
            if quota_bytes is not None and used > quota_bytes:
                if b.spec.eviction != "fifo":
                    raise FailedPrecondition(
                        f"bank '{name}' uses {describe_size(used)}: a quota of "
                        f"{describe_size(quota_bytes)} is below that; remove memories first "
                        "(or use eviction=fifo)")
                self._evict_oldest(b, used - quota_bytes)
            return self.catalog.set_quota(name, quota_bytes)

    def _evict_oldest(self, b: BankStore, nbytes: int, row_bytes: int | None = None) -> int:
        """fifo: remove the oldest rows until nbytes are free; give their bytes back."""
        before = b.nbytes()
        removed = b.evict_oldest(nbytes, row_bytes)
        self.catalog.release(b.spec.name, before - b.nbytes(), removed, op="evict")
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

    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None) -> np.ndarray:
        b = self.bank(bank)
        k = matrix(keys, "keys", b.spec.dim, np.dtype(np.float32))
        v = self._values_for(b, values, len(k))
        given = None if ids is None else id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            was_trained = b.trained
            plan = b.plan_add(k, v, given)
            cost = self._reserve(b, plan)                  # QuotaExceeded: nothing written
            try:
                b.add(plan)
            except BaseException:
                self.catalog.release(bank, cost, len(k), op="add-failed")
                raise
            if b.trained and not was_trained:
                self.catalog.update_bank(bank, trained=True)
        return plan.ids

    def _reserve(self, b: BankStore, plan: AddPlan) -> int:
        """Reserve the bytes plan's rows cost; returns them. A fifo bank first
        evicts its oldest rows when that makes enough room."""
        items = len(plan.ids)
        cost = b.add_cost(plan)
        try:
            self.catalog.reserve(b.spec.name, cost, items)
            return cost
        except QuotaExceeded as e:
            room = e.used + e.requested - e.limit
            # evicting r rows frees r rows' bytes (emptying also frees the fixed
            # bytes, but refilling charges them again): at most count rows' worth
            if b.spec.eviction != "fifo" or room > b.count * plan.row_bytes:
                raise  # reject, or the batch cannot fit even with the bank emptied
        self._evict_oldest(b, room, plan.row_bytes)
        cost = b.add_cost(plan)
        self.catalog.reserve(b.spec.name, cost, items)
        return cost

    def update_values(self, bank: str, ids: Any, values: Any) -> int:
        b = self.bank(bank)
        i = id_vector(ids)
        v = self._values_for(b, values, len(i))
        with b.lock.write():
            self._writable(bank)
            return b.update_values(i, v)

    def remove(self, bank: str, ids: Any) -> int:
        b = self.bank(bank)
        i = id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            before = b.nbytes()
            removed = b.remove(np.unique(i))
            if removed:
                self.catalog.release(bank, before - b.nbytes(), removed, op="remove")
            return removed

    # ---- reads -------------------------------------------------------------------
    def search(self, stack: Sequence[BankQuery], queries: Any, k: int, values: bool = True,
               keys: bool = False) -> SearchResult:
        """One merged top-k over a stack normalised by api.bank_list, k checked by api.check_k."""
        chosen = [self.bank(b.name) for b in stack]   # excluded banks must exist too
        active = [i for i, b in enumerate(stack) if b.include]
        first = _shared_shape([chosen[i].spec for i in active])
        vdt, vdim = (common_values(chosen[i].spec for i in active) if values else (None, 0))
        q = matrix(queries, "queries", first.dim, np.dtype(np.float32))
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
