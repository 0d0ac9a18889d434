"""LocalMemory: the in-process backend (every plane of memoryd.api), no daemon needed.

This is the engine the daemon serves as well: `memoryd serve` wraps one
LocalMemory in thin gRPC handlers, so the two backends share every rule.
It composes the layers below it and adds nothing but their wiring:

    BankEngine       banks and the catalog (memoryd.engine.banks)
    SessionManager   sessions, built on the engine (memoryd.engine.sessions)
    StackLog         who searched which stack (memoryd.stacklog)

Each request that names banks to read or write checks them first (an
expired session's bank is NOT_FOUND, bank by bank in the order named); one
that counts as use of a session (search, add, append) restarts the idle
clocks of the sessions it named once it succeeded (`SessionManager.touch`).
bank_info and list_banks show a session's bank until the reaper drops it.

Who may do what is decided here, for both backends, by memoryd.auth.rights
(`caller=`: a token's tenant and rights; None: the owner, every right). A
bank's tenant is read off its open store, so the checks cost a dict lookup.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

import memoryd
from memoryd import api
from memoryd.api import (BankInfo, BankQuery, BankSpec, Caller, CreatedToken, ExportChunk,
                         GetResult, PromoteResult, RowStacks, SearchResult, SessionInfo,
                         SessionSpec, SnapshotInfo, Stats, TenantInfo, TokenInfo)
from memoryd.auth import rights
from memoryd.cluster.placement import Placement
from memoryd.engine import backup
from memoryd.engine.catalog import Catalog
from memoryd.engine.banks import SEARCH_THREADS, BankEngine
from memoryd.engine.sessions import SessionManager
from memoryd.stacklog import StackLog
from memoryd.engine.tokens import TokenStore
from memoryd.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from memoryd.storage import faiss_index as fx

log = logging.getLogger("memoryd")
LOCAL_CALLER = Caller("local")        # who calls when an in-process caller names nobody


class LocalMemory:
    """The memory backend in this process. Thread-safe."""

    def __init__(self, data_dir: str | Path, catalog_url: str | None = None, *,
                 search_threads: int = SEARCH_THREADS, clock: Callable[[], float] = time.time,
                 reap_interval: float | None = 1.0, placement: Placement | None = None):
        """clock: seconds, for session expiry (tests inject one); reap_interval:
        how often a background thread deletes expired sessions (None: never,
        call reap_expired() yourself); placement: this process's shard of a
        cluster (memoryd.cluster), whose catalog_url all shards share (None: alone).

        The data dir is this object's alone until close(): a second LocalMemory
        or a daemon on it (memoryd.engine.datadir) raises DataDirInUse, a
        FailedPrecondition naming the process that holds it."""
        import weakref

        from memoryd.engine.datadir import DataDirLock

        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DataDirLock(self.data_dir).acquire()     # DataDirInUse: nothing opened
        weakref.finalize(self, self._lock.release)   # one never closed frees it when collected
        self._closed = False
        try:
            self.catalog_url = catalog_url or f"sqlite:///{self.data_dir / 'catalog.db'}"
            self.placement = (placement or Placement()).validated()
            if self.placement.count > 1 and catalog_url is None:
                raise InvalidArgument("a shard of a cluster needs the cluster's shared catalog: "
                                      "give its catalog URL")
            self.catalog = Catalog(self.catalog_url, shard=self.placement.index)
            _check_cluster(self.catalog, self.placement)
            self._started = time.time()
            self.engine = BankEngine(self.data_dir, self.catalog, search_threads=search_threads,
                                     placement=self.placement)
            self.sessions = SessionManager(self.engine, self.catalog, clock)
            self.sessions.load()
            self.stacks = StackLog()
            self.tokens = TokenStore(self.catalog)
            self.guard = rights.Guard(lambda name: self.engine.bank(name).spec.tenant)
            self._stop = threading.Event()
            self._reaper = None
            if reap_interval:
                self._reaper = threading.Thread(target=self._reap_loop, args=(reap_interval,),
                                                name="memoryd-reaper", daemon=True)
                self._reaper.start()
        except BaseException:
            self._lock.release()
            raise

    def _reap_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.reap_expired()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad pass
                log.exception("session reaper pass failed")

    def reap_expired(self) -> int:
        """Delete expired sessions now; returns how many."""
        return self.sessions.reap()

    def close(self) -> None:
        """Snapshot every index and release files; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if self._reaper is not None:
                self._reaper.join()
            self.sessions.flush()
            self.engine.close()
            self.catalog.close()
        finally:
            self._lock.release()      # the data dir is free for the next user

    def __enter__(self) -> "LocalMemory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _visible(self, name: str) -> str:
        """name, once it is a bank (NotFound) and not an expired session's."""
        self.engine.bank(name)
        self.sessions.visible([name])
        return name

    # ---- admin plane ---------------------------------------------------------------
    def create_bank(self, spec: BankSpec, *, caller: Caller | None = None) -> BankInfo:
        rights.need(caller, "write", "create_bank")
        if isinstance(spec, BankSpec):     # anything else: the engine names what is wrong
            spec = spec.with_(tenant=rights.owned(caller, spec.tenant, "create_bank"))
        return self.engine.create_bank(spec)

    def bank_info(self, name: str, *, caller: Caller | None = None) -> BankInfo:
        return self.engine.bank_info(self.guard.bank(caller, name, "read", "bank_info"))

    def list_banks(self, tenant: str | None = None, *,
                   caller: Caller | None = None) -> list[BankInfo]:
        return self.engine.list_banks(rights.listing(caller, tenant, "list_banks"))

    def delete_bank(self, name: str, *, caller: Caller | None = None) -> int:
        self.guard.bank(caller, name, "write", "delete_bank")
        released = self.engine.delete_bank(self._visible(name))
        self.stacks.forget(name)
        return released

    def freeze_bank(self, name: str, *, caller: Caller | None = None) -> BankInfo:
        self.guard.bank(caller, name, "write", "freeze_bank")
        return self.engine.freeze_bank(self._visible(name))

    def set_quota(self, name: str, quota_bytes: int | None, *,
                  caller: Caller | None = None) -> BankInfo:
        self.guard.bank(caller, name, "write", "set_quota")
        return self.engine.set_quota(self._visible(name), quota_bytes)

    def set_tier(self, name: str, tier: str, *, caller: Caller | None = None) -> BankInfo:
        self.guard.bank(caller, name, "write", "set_tier")
        return self.engine.set_tier(self._visible(name), tier)

    def stats(self, *, caller: Caller | None = None) -> Stats:
        banks = self.list_banks(caller=caller)
        admin = rights.is_admin(caller)    # where the data lives is the operator's business
        return Stats(version=memoryd.__version__, data_dir=str(self.data_dir) if admin else "",
                     catalog_url=_redact(self.catalog_url) if admin else "",
                     uptime_s=time.time() - self._started,
                     banks=banks, used_bytes=sum(b.used_bytes for b in banks),
                     num_gpus=fx.num_gpus(),
                     stacks=[u for u in self.stacks.snapshot()
                             if self.guard.visible(caller, u.banks)],
                     tenants=self.list_tenants(caller=caller))

    # ---- data plane ------------------------------------------------------------------
    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None, *,
            ack: str | None = None, caller: Caller | None = None) -> np.ndarray:
        self.guard.bank(caller, bank, "write", "add")
        ids = self.engine.add(self._visible(bank), keys, values, ids, ack=ack)
        self.sessions.touch([bank])    # a write to a session's bank is use, too
        return ids

    def search(self, banks: str | BankQuery | Sequence[str | BankQuery] | RowStacks,
               queries: Any, k: int, values: bool = True, keys: bool = False, *,
               caller: Caller | None = None) -> SearchResult:
        if isinstance(banks, RowStacks):
            return self._search_rows(banks, queries, k, values, keys, caller)
        stack = api.bank_list(banks)
        k = api.check_k(k)
        self.guard.banks(caller, (b.name for b in stack), "read", "search")
        names = [self._visible(b.name) for b in stack]
        result = self.engine.search(stack, queries, k, values, keys)
        self.stacks.record((caller or LOCAL_CALLER).name, names)
        self.sessions.touch(names)
        return result

    def _search_rows(self, rs: RowStacks, queries: Any, k: int, values: bool, keys: bool,
                     caller: Caller | None) -> SearchResult:
        """Per-row stacks: each distinct stack is logged, and each distinct bank
        checked and touched, once per request."""
        k = api.check_k(k)
        names = list(dict.fromkeys(b.name for s in rs.stacks for b in s))
        self.guard.banks(caller, names, "read", "search")
        for name in names:
            self._visible(name)
        result = self.engine.search_rows(rs, queries, k, values, keys)
        who = (caller or LOCAL_CALLER).name
        for stack in dict.fromkeys(tuple(b.name for b in s) for s in rs.stacks):
            self.stacks.record(who, list(stack))
        self.sessions.touch(names)
        return result

    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False, *,
            caller: Caller | None = None) -> GetResult:
        self.guard.bank(caller, bank, "read", "get")
        return self.engine.get(self._visible(bank), ids, values, keys)

    def update_values(self, bank: str, ids: Any, values: Any, *, ack: str | None = None,
                      caller: Caller | None = None) -> int:
        self.guard.bank(caller, bank, "write", "update_values")
        return self.engine.update_values(self._visible(bank), ids, values, ack=ack)

    def remove(self, bank: str, ids: Any, *, ack: str | None = None,
               caller: Caller | None = None) -> int:
        self.guard.bank(caller, bank, "write", "remove")
        return self.engine.remove(self._visible(bank), ids, ack=ack)

    def export(self, bank: str, chunk_rows: int = api.CHUNK_ROWS, *,
               caller: Caller | None = None) -> Iterator[ExportChunk]:
        self.guard.bank(caller, bank, "read", "export")
        return self.engine.export(self._visible(bank), chunk_rows)

    # ---- session plane (memoryd.engine.sessions) ---------------------------------------
    def open_session(self, spec: SessionSpec, *, caller: Caller | None = None) -> SessionInfo:
        rights.need(caller, "write", "open_session")
        if isinstance(spec, SessionSpec):
            spec = replace(spec, tenant=rights.owned(caller, spec.tenant, "open_session"))
        return self.sessions.open(spec)

    def append(self, session_id: str, keys: Any, values: Any = None, scores: Any = None, *,
               ack: str | None = None, caller: Caller | None = None) -> np.ndarray:
        self.guard.session(caller, session_id, "write", "append")
        return self.sessions.append(session_id, keys, values, scores, ack)

    def session_info(self, session_id: str, *, caller: Caller | None = None) -> SessionInfo:
        return self.sessions.info(self.guard.session(caller, session_id, "read", "session_info"))

    def list_sessions(self, tenant: str | None = None, *,
                      caller: Caller | None = None) -> list[SessionInfo]:
        return self.sessions.list(rights.listing(caller, tenant, "list_sessions"))

    def extend_session(self, session_id: str, ttl_idle_s: float | None = None,
                       ttl_absolute_s: float | None = None, *,
                       caller: Caller | None = None) -> SessionInfo:
        self.guard.session(caller, session_id, "write", "extend_session")
        return self.sessions.extend(session_id, ttl_idle_s, ttl_absolute_s)

    def close_session(self, session_id: str, *, caller: Caller | None = None) -> int:
        self.guard.session(caller, session_id, "write", "close_session")
        return self.sessions.close(session_id)

    def promote_session(self, session_id: str, target: str, *, ids: Any = None,
                        min_score: float | None = None, dedup: float | None = None,
                        move: bool = False, ack: str | None = None,
                        caller: Caller | None = None) -> PromoteResult:
        self.guard.session(caller, session_id, "write", "promote_session")
        self.guard.bank(caller, target, "write", "promote_session")
        return self.sessions.promote(session_id, target, ids, min_score, dedup, move, ack)

    # ---- backup plane (memoryd.engine.backup; paths on this host: admin only) -------------
    def snapshot_bank(self, name: str, path: str, *, caller: Caller | None = None) -> SnapshotInfo:
        self._admin_only(caller, "snapshot_bank")
        m = backup.snapshot_bank(self.engine, self._visible(name), path)
        return SnapshotInfo(path=str(path), bank=name, count=m["count"],
                            used_bytes=m["used_bytes"], checksum=m["checksum"])

    def restore_bank(self, path: str, name: str | None = None, *,
                     caller: Caller | None = None) -> BankInfo:
        self._admin_only(caller, "restore_bank")
        return backup.restore_bank(self.engine, path, name)

    def backup(self, path: str, *, caller: Caller | None = None) -> SnapshotInfo:
        self._admin_only(caller, "backup")
        self.sessions.flush()          # the idle clocks the copy of the catalog carries
        m = backup.backup(self.engine, path)
        return SnapshotInfo(path=str(path), bank="", count=0, used_bytes=m["used_bytes"],
                            checksum="", banks=tuple(m["banks"]))

    @staticmethod
    def _admin_only(caller: Caller | None, what: str) -> None:
        rights.need(caller, "admin", what)
        if not rights.is_admin(caller):
            raise PermissionDenied(f"{what} reads and writes folders on the daemon's host: "
                                   "it needs an admin token of no tenant")

    # ---- tenant plane ------------------------------------------------------------------
    def set_tenant_quota(self, tenant: str, quota_bytes: int | None, *,
                         caller: Caller | None = None) -> TenantInfo:
        rights.need(caller, "admin", "set_tenant_quota")
        if not api.name_ok(tenant):
            raise InvalidArgument(f"bad tenant name {tenant!r}")
        self.catalog.set_tenant_quota(tenant, api.check_quota(quota_bytes))
        return self.tenant_info(tenant)

    def tenant_info(self, tenant: str, *, caller: Caller | None = None) -> TenantInfo:
        row = self.catalog.tenant(rights.tenant(caller, tenant, "read", "tenant_info"))
        tiers: dict[str, int] = {}
        for info in self.engine.list_banks(tenant):
            for tier, n in info.tier_bytes.items():
                tiers[tier] = tiers.get(tier, 0) + n
        return TenantInfo(name=tenant, quota_bytes=row["quota_bytes"], used_bytes=int(row["used_bytes"]),
                          banks=row["banks"], sessions=row["sessions"], tier_bytes=tiers)

    def list_tenants(self, *, caller: Caller | None = None) -> list[TenantInfo]:
        rights.need(caller, "read", "list_tenants")
        mine = rights.scoped(caller)
        return [self.tenant_info(t) for t in self.catalog.tenant_names() if mine in (None, t)]

    # ---- token plane (memoryd.auth.tokens): admin only ---------------------------------
    def create_token(self, tenant: str | None = None, role: str = "write", name: str = "", *,
                     caller: Caller | None = None) -> CreatedToken:
        rights.need(caller, "admin", "create_token")
        return self.tokens.create(tenant, role, name)

    def list_tokens(self, tenant: str | None = None, *,
                    caller: Caller | None = None) -> list[TokenInfo]:
        rights.need(caller, "admin", "list_tokens")
        return self.tokens.list(tenant)

    def revoke_token(self, token_id: str, *, caller: Caller | None = None) -> TokenInfo:
        rights.need(caller, "admin", "revoke_token")
        return self.tokens.revoke(token_id)


def _check_cluster(catalog: Catalog, placement: Placement) -> None:
    """FailedPrecondition (the catalog closed) when the catalog holds slices of
    shards this process does not count: a cluster's catalog opened alone (its
    banks would look like this process's, with the wrong ids) or with too few
    shards."""
    import sqlalchemy as sa

    from memoryd.engine.schema import bank_slices

    with catalog.engine.connect() as c:
        top = c.execute(sa.select(sa.func.max(bank_slices.c.shard))).scalar()
    if top is not None and top >= placement.count:
        catalog.close()
        raise FailedPrecondition(
            f"the catalog {_redact(catalog.url)} holds banks of a cluster of at least "
            f"{top + 1} shards (this process counts {placement.count}): open it as one "
            "of its shards (memoryd serve --shard-index I --num-shards N), reach the "
            "cluster through `memoryd route`, or make tokens with `memctl --catalog-url "
            "URL token ...`")


def _redact(url: str) -> str:
    """Hide a password in a catalog URL before it leaves the process."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)
