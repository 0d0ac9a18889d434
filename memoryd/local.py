"""LocalMemory: the in-process backend (catalog + banks), no daemon needed.

This is the engine the daemon serves as well: `memoryd serve` wraps one
LocalMemory in thin gRPC handlers, so the two backends share every rule.

Layout of a data dir:
    catalog.db              SQLite catalog (unless --catalog-url says otherwise)
    banks/<name>-<hex>/     one folder per bank (memoryd.bank, memoryd.store)
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import memoryd
from memoryd import api
from memoryd import faiss_index as fx
from memoryd.api import (BankInfo, BankQuery, BankSpec, ExportChunk, GetResult, PromoteResult,
                         SearchResult, SessionInfo, SessionSpec, Stats, TenantInfo)
from memoryd.arrays import id_vector, matrix, value_dtype
from memoryd.bank import Bank
from memoryd.product_keys import ProductKeyBank, is_product_keys
from memoryd.catalog import Catalog
from memoryd.errors import BankFrozen, FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from memoryd.sessions import SessionManager
from memoryd.sizes import describe_size
from memoryd.stacks import StackLog
from memoryd.searching import common_values_dtype, search_stack

log = logging.getLogger("memoryd")


class LocalMemory:
    """The memory backend in this process. Thread-safe."""

    def __init__(self, data_dir: str | Path, catalog_url: str | None = None, *,
                 search_threads: int = 4, clock: Callable[[], float] = time.time,
                 reap_interval: float | None = 1.0):
        """clock: seconds, for session expiry (tests inject one); reap_interval:
        how often a background thread deletes expired sessions (None: never,
        call reap_expired() yourself)."""
        self.data_dir = Path(data_dir).resolve()
        (self.data_dir / "banks").mkdir(parents=True, exist_ok=True)
        self.catalog_url = catalog_url or f"sqlite:///{self.data_dir / 'catalog.db'}"
        self.catalog = Catalog(self.catalog_url)
        self._banks: dict[str, Bank] = {}
        self._admin = threading.Lock()   # guards the _banks dict, not bank contents
        self._pool = ThreadPoolExecutor(search_threads, thread_name_prefix="memoryd-search")
        self._started = time.time()
        self._closed = False
        self.stacks = StackLog()
        self.sessions = SessionManager(self, clock)
        self._open_all()
        self.sessions.load()
        self._stop = threading.Event()
        self._reaper = None
        if reap_interval:
            self._reaper = threading.Thread(target=self._reap_loop, args=(reap_interval,),
                                            name="memoryd-reaper", daemon=True)
            self._reaper.start()

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.reap_expired()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad pass
                log.exception("session reaper pass failed")

    def reap_expired(self) -> int:
        """Delete expired sessions now; returns how many."""
        return self.sessions.reap()

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
                _rmtree(folder)

    def close(self) -> None:
        """Snapshot every index and release files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
        self.sessions.flush()
        for bank in list(self._banks.values()):
            with bank.lock.write():
                bank.checkpoint()
        self._pool.shutdown(wait=True)
        self.catalog.close()

    def __enter__(self) -> "LocalMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _bank_path(self, storage: str) -> Path:
        return self.data_dir / "banks" / storage

    def _bank(self, name: str) -> Bank:
        try:
            bank = self._banks[name]
        except KeyError:
            raise NotFound(f"no bank named '{name}'") from None
        if bank.spec.kind == "session" and self.sessions.expired(name):
            raise NotFound(f"no bank named '{name}' (its session expired)")
        return bank

    def bank_path(self, name: str) -> Path:
        """The bank's folder, expired session or not (the session manager's files live there)."""
        try:
            return self._banks[name].path
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
                _rmtree(bank.path)
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
        """Move a live bank between ram, mmap and gpu (see memoryd.tiers)."""
        b = self._bank(name)
        if tier not in api.TIERS:
            raise InvalidArgument(f"tier must be one of {', '.join(api.TIERS)}; got {tier!r}")
        if tier == "gpu" and fx.num_gpus() == 0:
            raise FailedPrecondition(
                "tier gpu needs a CUDA device and faiss-gpu (pip install 'memoryd[gpu]'); "
                "this host has none: use ram or mmap")
        with b.lock.write():
            if b.spec.tier != tier:
                b.set_tier(tier)
                self.catalog.update_bank(name, tier=tier)
        return self.bank_info(name)

    def delete_bank(self, name: str) -> int:
        with self._admin:
            bank = self._bank(name)
            with bank.lock.write():
                released = self.catalog.delete_bank(name)
                del self._banks[name]
                bank.delete_files()
        return released

    def freeze_bank(self, name: str) -> BankInfo:
        bank = self._bank(name)
        with bank.lock.write():
            if bank.frozen:
                return self.catalog.bank(name)
            bank.checkpoint()
            info = self.catalog.update_bank(name, frozen=True, checksum=bank.checksum())
            bank.frozen = True
            return info

    def set_quota(self, name: str, quota_bytes: int | None) -> BankInfo:
        """Raise at once; lower below usage only for a fifo bank (which evicts)."""
        if quota_bytes is not None and quota_bytes < 0:
            raise InvalidArgument(f"quota must not be negative; got {quota_bytes}")
        b = self._bank(name)
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

    def _evict_oldest(self, b: Bank, nbytes: int) -> int:
        """fifo: remove the oldest rows (smallest ids) until nbytes are free."""
        rows = min(b.count, -(-nbytes // b.row_bytes()))
        oldest = np.sort(np.concatenate([s.store.ids.data for s in b.shards]))[:rows]
        before = b.nbytes()
        removed = b.remove(oldest)
        self.catalog.release(b.spec.name, before - b.nbytes(), removed, op="evict")
        return removed

    # ---- writes ------------------------------------------------------------------
    def _writable(self, name: str) -> Bank:
        bank = self._bank(name)
        if bank.frozen:  # mirrors the catalog: only this process writes it
            raise BankFrozen(f"bank '{name}' is frozen: it accepts no writes")
        return bank

    def _values_for(self, bank: Bank, values: Any, n: int) -> np.ndarray | None:
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
        b = self._bank(bank)
        k = matrix(keys, "keys", b.spec.dim, np.dtype(np.float32))
        v = self._values_for(b, values, len(k))
        given = None if ids is None else id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            new_ids = b.new_ids(len(k), given)
            was_trained = b.trained
            template = b.trained_template(k)
            delta = self._reserve(b, template, len(k))      # QuotaExceeded: nothing written
            try:
                b.add(new_ids, k, v, template)
            except BaseException:
                self.catalog.release(bank, delta, len(k), op="add-failed")
                raise
            if b.trained and not was_trained:
                self.catalog.update_bank(bank, trained=True)
        self.sessions.touch([bank])  # a write to a session bank is use, too
        return new_ids

    def _reserve(self, b: Bank, template, items: int) -> int:
        """Reserve the bytes `items` more rows cost; returns them. A fifo bank
        first evicts its oldest rows when that makes enough room."""
        delta = b.nbytes(b.count + items, template) - b.nbytes()
        try:
            self.catalog.reserve(b.spec.name, delta, items)
            return delta
        except QuotaExceeded as e:
            room = e.used + e.requested - e.limit
            # evicting r rows frees r rows' bytes (emptying also frees the fixed
            # bytes, but refilling charges them again): at most count rows' worth
            if b.spec.eviction != "fifo" or room > b.count * b.row_bytes(template):
                raise  # reject, or the batch cannot fit even with the bank emptied
        self._evict_oldest(b, room)
        delta = b.nbytes(b.count + items, template) - b.nbytes()
        self.catalog.reserve(b.spec.name, delta, items)
        return delta

    def update_values(self, bank: str, ids: Any, values: Any) -> int:
        b = self._bank(bank)
        i = id_vector(ids)
        v = self._values_for(b, values, len(i))
        with b.lock.write():
            self._writable(bank)
            return b.update_values(i, v)

    def remove(self, bank: str, ids: Any) -> int:
        b = self._bank(bank)
        i = id_vector(ids)
        with b.lock.write():
            self._writable(bank)
            before = b.nbytes()
            removed = b.remove(np.unique(i))
            if removed:
                self.catalog.release(bank, before - b.nbytes(), removed, op="remove")
            return removed

    # ---- reads -------------------------------------------------------------------
    def search(self, banks: str | BankQuery | Sequence[str | BankQuery], queries: Any, k: int,
               values: bool = True, keys: bool = False, *, client: str | None = "local"
               ) -> SearchResult:
        """client: who searched, for Stats.stacks; None for memoryd's own
        searches, which are neither logged nor count as use of a session."""
        stack = api.bank_list(banks)
        k = api.check_k(k)
        chosen = [self._bank(b.name) for b in stack]   # excluded banks must exist too
        active = [i for i, b in enumerate(stack) if b.include]
        first = chosen[active[0]].spec
        for i in active[1:]:
            spec = chosen[i].spec
            if (spec.dim, spec.metric) != (first.dim, first.metric):
                raise InvalidArgument(
                    f"banks of one search must share dim and metric: '{first.name}' is "
                    f"{first.dim}-d {first.metric}, '{spec.name}' is {spec.dim}-d {spec.metric}")
        vdt = common_values_dtype([chosen[i] for i in active]) if values else None
        q = matrix(queries, "queries", first.dim, np.dtype(np.float32))
        if client is not None:
            self.stacks.record(client, [b.name for b in stack])
            self.sessions.touch([b.name for b in stack])
        with ExitStack() as locks:
            for i in sorted(active, key=lambda i: stack[i].name):
                locks.enter_context(chosen[i].lock.read())
            return search_stack([(i, chosen[i], stack[i]) for i in active], q, k, first.metric,
                                vdt, keys, self._pool)

    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False) -> GetResult:
        b = self._bank(bank)
        i = id_vector(ids)
        with b.lock.read():  # a key-only bank has no values to give: None
            found, kk, vv = b.gather(i, keys=keys, values=values and b.spec.value_dim > 0)
        return GetResult(found=found, values=vv, keys=kk)

    def export(self, bank: str, chunk_rows: int = 65536) -> Iterator[ExportChunk]:
        b = self._bank(bank)
        if chunk_rows <= 0:
            raise InvalidArgument(f"chunk_rows must be positive; got {chunk_rows}")
        return self._export(b, chunk_rows)

    @staticmethod
    def _export(b: Bank, chunk_rows: int) -> Iterator[ExportChunk]:
        # One snapshot under the read lock, handed out in chunks: a slow
        # reader never holds the bank's lock between chunks.
        with b.lock.read():
            chunks = list(b.export_chunks(chunk_rows))
        yield from chunks

    def stats(self) -> Stats:
        banks = self.list_banks()
        return Stats(version=memoryd.__version__, data_dir=str(self.data_dir),
                     catalog_url=_redact(self.catalog_url), uptime_s=time.time() - self._started,
                     banks=banks, used_bytes=sum(b.used_bytes for b in banks),
                     num_gpus=fx.num_gpus(), stacks=self.stacks.snapshot(),
                     tenants=self.list_tenants())

    # ---- sessions (memoryd.sessions) ---------------------------------------------------
    def open_session(self, spec: SessionSpec) -> SessionInfo:
        return self.sessions.open(spec)

    def append(self, session_id: str, keys: Any, values: Any = None, scores: Any = None) -> np.ndarray:
        return self.sessions.append(session_id, keys, values, scores)

    def session_info(self, session_id: str) -> SessionInfo:
        return self.sessions.info(session_id)

    def list_sessions(self, tenant: str | None = None) -> list[SessionInfo]:
        return self.sessions.list(tenant)

    def extend_session(self, session_id: str, ttl_idle_s: float | None = None,
                       ttl_absolute_s: float | None = None) -> SessionInfo:
        return self.sessions.extend(session_id, ttl_idle_s, ttl_absolute_s)

    def close_session(self, session_id: str) -> int:
        return self.sessions.close(session_id)

    def promote_session(self, session_id: str, target: str, *, ids: Any = None,
                        min_score: float | None = None, dedup: float | None = None,
                        move: bool = False) -> PromoteResult:
        return self.sessions.promote(session_id, target, ids, min_score, dedup, move)

    # ---- tenants -------------------------------------------------------------------------
    def set_tenant_quota(self, tenant: str, quota_bytes: int | None) -> TenantInfo:
        if not api.name_ok(tenant):
            raise InvalidArgument(f"bad tenant name {tenant!r}")
        if quota_bytes is not None and (not api.int_ok(quota_bytes) or quota_bytes < 0):
            raise InvalidArgument(f"quota must be a non-negative number of bytes; got {quota_bytes!r}")
        self.catalog.set_tenant_quota(tenant, quota_bytes)
        return self.tenant_info(tenant)

    def tenant_info(self, tenant: str) -> TenantInfo:
        row = self.catalog.tenant(tenant)
        tiers: dict[str, int] = {}
        for info in self.list_banks(tenant):
            for tier, n in info.tier_bytes.items():
                tiers[tier] = tiers.get(tier, 0) + n
        return TenantInfo(name=tenant, quota_bytes=row["quota_bytes"], used_bytes=int(row["used_bytes"]),
                          banks=row["banks"], sessions=row["sessions"], tier_bytes=tiers)

    def list_tenants(self) -> list[TenantInfo]:
        return [self.tenant_info(t) for t in self.catalog.tenant_names()]


def new_bank(path: Path, spec: BankSpec) -> "Bank | ProductKeyBank":
    """The bank class a spec asks for (InvalidArgument if it cannot be built)."""
    return ProductKeyBank(path, spec) if is_product_keys(spec.index) else Bank(path, spec)


def _redact(url: str) -> str:
    """Hide a password in a catalog URL before it leaves the process."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def _rmtree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
