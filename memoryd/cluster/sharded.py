"""ShardedMemory: one MemoryBackend over N shard backends (memoryd.cluster).

    shards = [MemoryClient(a) for a in addresses]       # or LocalMemory(...) each
    mem = ShardedMemory(shards)                          # every plane of memoryd.api
    mem.search(["wiki"], queries, k=32)                  # one call per shard, in parallel

Each shard is a whole backend (a `memoryd serve --shard-index i` behind a
MemoryClient, or an in-process LocalMemory): the LocalShard/RemoteShard of
Qdrant behind one interface. All shards share one catalog, so quotas are
reserved race-free across them (a conditional UPDATE of the bank's row) and
a bank's count and usage read the same from any shard.

Placement (memoryd.cluster.placement): a bank has a slice on every shard; a
row with id x is on shard x mod N; a session and its bank are on one shard,
named by its id. So:

  * search: the stack (or per-row stacks) goes to every shard holding one of
    its banks, each shard getting the banks it holds; values and keys come in
    the same reply; the answers are merged exactly (memoryd.cluster.merge);
  * add with ids: each row to its id's shard; without ids: the rows are cut
    into consecutive pieces (at least MIN_SPLIT_ROWS each) over the shards,
    starting at a rotating shard, each piece's ids assigned by its shard;
  * get, update_values, remove: each id to its shard only;
  * sessions: opened on the next shard in turn (skipping one that is down),
    then every call goes to the session's shard; a promote writes into that
    shard's slice of the target;
  * bank admin (create, delete, freeze, quota, tier): every shard; tenants
    and tokens: the catalog, through the first shard that answers;
  * snapshots and backups: each shard writes `<path>/shard-<i>` on its own
    host, and restores from there.

Failure policy. A shard that does not answer (UNAVAILABLE, or past its
deadline) fails the call with Unavailable naming it, by default: a partial
answer is never passed off as a whole one. With `partial_results=True` a
search answers from the shards that did answer and lists the others in
`SearchResult.missing_shards` (on the wire too); every other call still
fails. A write that reaches some shards and not others is undone where it
landed (add: its rows are removed again) before the error is raised, or,
where that cannot be (update_values, remove), the error says so. A create
that failed half way is finished by creating again (shards that hold their
slice already count as done). Admin calls on a bank whose slice a shard
lacks (a create that never finished) skip that shard.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from memoryd import api, errors
from memoryd.api import (BankInfo, BankQuery, BankSpec, Caller, CreatedToken, ExportChunk,
                         GetResult, MemoryBackend, PromoteResult, RowStacks, SearchResult,
                         SessionInfo, SessionSpec, SnapshotInfo, Stats, TenantInfo, TokenInfo)
from memoryd.arrays import to_numpy
from memoryd.cluster import reports
from memoryd.cluster import search as searching
from memoryd.cluster.fanout import FanOut, raise_first
from memoryd.cluster.placement import id_shards, is_session_id, session_shard, spread
from memoryd.keyspace import is_product_keys
from memoryd.stacklog import StackLog

MIN_SPLIT_ROWS = 4096     # an add without ids smaller than this goes to one shard
SPEC_TTL_S = 10.0         # how long a bank's shape (metric, dims) is cached for merging


class ShardedMemory(FanOut):
    """A MemoryBackend over shard backends that share one catalog. Thread-safe."""

    def __init__(self, shards: Sequence[MemoryBackend], *, names: Sequence[str] | None = None,
                 partial_results: bool = False, owns_shards: bool = True,
                 on_call: Callable[[int, str, float, bool], None] | None = None):
        """names: how errors name each shard (default its repr); on_call(shard,
        method, seconds, ok) sees every call made to a shard (metrics)."""
        super().__init__(shards, names, on_call)
        self.partial_results = partial_results
        self._owns = owns_shards
        self._rotor = itertools.count()
        self._specs: dict[str, tuple[float, BankSpec]] = {}
        self._specs_lock = threading.Lock()
        self.stacks = StackLog()       # the whole stacks routed (shards see only their part)

    def close(self) -> None:
        super().close()
        if self._owns:
            for s in self.shards:
                s.close()

    def __enter__(self) -> "ShardedMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedMemory({self.names!r})"

    def _home(self, name: str) -> int | None:
        """The one shard holding a session's bank; None for a bank on every shard."""
        return session_shard(name, self.n) if is_session_id(name) else None

    # ---- admin plane ----------------------------------------------------------------
    def create_bank(self, spec: BankSpec, *, caller: Caller | None = None) -> BankInfo:
        if isinstance(spec, BankSpec) and is_session_id(spec.name):
            raise errors.InvalidArgument(
                f"bank name {spec.name!r} has the form of a session id (s-<16 hex>), which a "
                "sharded memory keeps for sessions: choose another name")
        if isinstance(spec, BankSpec) and isinstance(spec.index, str) and is_product_keys(spec.index):
            raise errors.FailedPrecondition(
                "a product-key bank is one table of n^2 fixed keys, born full: each shard "
                "would hold a copy of every key, so it is not split over shards; create it "
                "on a single memoryd")
        got = self._fan({q: ("create_bank", (spec,), {"caller": caller}) for q in range(self.n)})
        made = [q for q, r in got.items() if isinstance(r, BankInfo)]
        fails = {q: r for q, r in got.items() if isinstance(r, Exception)
                 and not isinstance(r, errors.AlreadyExists)}
        if fails:
            raise_first(fails, note="; create the bank again to finish"
                         if made else "")
        if not made:
            raise got[0]                               # AlreadyExists on every shard
        return self.bank_info(spec.name, caller=caller)

    def bank_info(self, name: str, *, caller: Caller | None = None) -> BankInfo:
        home = self._home(name)
        if home is not None:
            return self._one(home, "bank_info", name, caller=caller)
        return reports.merge_infos(list(self._all("bank_info", name, caller=caller,
                                           skip_missing=True).values()))

    def list_banks(self, tenant: str | None = None, *,
                   caller: Caller | None = None) -> list[BankInfo]:
        got = self._all("list_banks", tenant, caller=caller)
        return reports.merge_lists(got.values())

    def delete_bank(self, name: str, *, caller: Caller | None = None) -> int:
        self._forget(name)
        self.stacks.forget(name)
        home = self._home(name)
        if home is not None:
            return self._one(home, "delete_bank", name, caller=caller)
        return sum(self._all("delete_bank", name, caller=caller, skip_missing=True).values())

    def freeze_bank(self, name: str, *, caller: Caller | None = None) -> BankInfo:
        return self._admin("freeze_bank", name, caller=caller)

    def set_quota(self, name: str, quota_bytes: int | None, *,
                  caller: Caller | None = None) -> BankInfo:
        """One shard after the other: the first sets the (shared) quota, and a fifo
        bank over it is brought under it by each shard in turn evicting its oldest
        rows until the bank fits (later shards then find nothing to evict)."""
        api.check_quota(quota_bytes)
        home = self._home(name)
        if home is not None:
            return self._one(home, "set_quota", name, quota_bytes, caller=caller)
        missing = []
        for q in range(self.n):
            try:
                self._one(q, "set_quota", name, quota_bytes, caller=caller)
            except errors.NotFound as e:     # a slice a create never finished
                missing.append(e)
        if len(missing) == self.n:
            raise missing[0]
        return self.bank_info(name, caller=caller)

    def set_tier(self, name: str, tier: str, *, caller: Caller | None = None) -> BankInfo:
        return self._admin("set_tier", name, tier, caller=caller)

    def _admin(self, method: str, name: str, *args, caller: Caller | None) -> BankInfo:
        home = self._home(name)
        if home is not None:
            return self._one(home, method, name, *args, caller=caller)
        self._all(method, name, *args, caller=caller, skip_missing=True)
        return self.bank_info(name, caller=caller)

    def stats(self, *, caller: Caller | None = None) -> Stats:
        got = [s for _, s in sorted(self._all("stats", caller=caller).items())]
        banks = reports.merge_lists([s.banks for s in got])
        seen = {b.name for b in banks}     # the stacks of banks this caller may see
        return Stats(version=got[0].version, data_dir=f"{self.n} shards: " + ", ".join(
                         s.data_dir for s in got),
                     catalog_url=got[0].catalog_url, uptime_s=min(s.uptime_s for s in got),
                     banks=banks, used_bytes=sum(b.used_bytes for b in banks),
                     num_gpus=sum(s.num_gpus for s in got),
                     stacks=[u for u in self.stacks.snapshot() if set(u.banks) <= seen],
                     tenants=reports.merge_tenants([s.tenants for s in got]))

    # ---- data plane ----------------------------------------------------------------
    def add(self, bank: str, keys: Any, values: Any = None, ids: Any = None, *,
            ack: str | None = None, caller: Caller | None = None) -> np.ndarray:
        home = self._home(bank)
        kw = {"ack": ack, "caller": caller}
        keys = to_numpy(keys)
        if home is not None or keys.ndim != 2 or len(keys) == 0:
            # one shard: a session, or input its own checks refuse with the exact message
            return self._one(home or 0, "add", bank, keys, values, ids, **kw)
        values = None if values is None else to_numpy(values)
        if ids is not None:
            ids = np.asarray(to_numpy(ids))
            if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) != len(keys):
                return self._one(0, "add", bank, keys, values, ids, **kw)
            parts = _by_shard(id_shards(ids.astype(np.int64), self.n))
        else:
            parts = [(q, np.arange(len(keys))[sl])
                     for q, sl in spread(len(keys), self.n, next(self._rotor) % self.n,
                                         MIN_SPLIT_ROWS)]
        calls = {q: ("add", (bank, keys[rows], _rows(values, rows),
                             None if ids is None else ids[rows]), kw) for q, rows in parts}
        got = self._fan(calls)
        fails = {q: r for q, r in got.items() if isinstance(r, Exception)}
        if fails:
            undone, kept = [], []
            for q in sorted(q for q in got if q not in fails):   # all or nothing: take back
                try:
                    self._one(q, "remove", bank, got[q], caller=caller)
                    undone.append(q)
                except Exception:  # noqa: BLE001 - said in the error raised below
                    kept.append(q)
            note = f" (rows added on shards {undone} were removed again)" if undone else ""
            if kept:
                note += (f" (rows added on shards {kept} could not be removed again: they "
                         "stay, with the ids those shards gave them)")
            raise_first(fails, note=note)
        out = np.empty(len(keys), np.int64)
        for q, rows in parts:
            out[rows] = got[q]
        return out

    def search(self, banks: str | BankQuery | Sequence[str | BankQuery] | RowStacks,
               queries: Any, k: int, values: bool = True, keys: bool = False, *,
               caller: Caller | None = None) -> SearchResult:
        k = api.check_k(k)
        if isinstance(banks, RowStacks):
            groups, counts = [list(s) for s in banks.stacks], list(banks.rows)
        else:
            groups, counts = [api.bank_list(banks)], None
        specs = self._shapes({b.name for g in groups for b in g}, caller)
        spec = specs[groups[0][0].name]
        plan = searching.plan(groups, counts, self.n, self._home)
        qs = queries if counts is None else to_numpy(queries)
        if counts is not None and (qs.ndim != 2 or len(qs) != sum(counts)):
            raise errors.InvalidArgument(
                f"row stacks cover {sum(counts)} query rows ({len(counts)} groups) but "
                f"{len(qs) if qs.ndim else 0} queries were sent: the rows must sum to nq")
        calls, answers_of = {}, {}
        for q, (sub, rows, posmap) in plan.items():
            req = sub[0] if counts is None else RowStacks(stacks=sub, rows=rows["counts"])
            part = qs if counts is None else np.ascontiguousarray(qs[rows["rows"]])
            calls[q] = ("search", (req, part, k), {"values": values, "keys": keys,
                                                    "caller": caller})
            answers_of[q] = (None if counts is None else rows["rows"], posmap)
        got = self._fan(calls)
        missing = tuple(q for q, r in got.items() if isinstance(r, errors.Unavailable))
        fails = {q: r for q, r in got.items() if isinstance(r, Exception)}
        if fails and not (self.partial_results and len(missing) == len(fails) < len(got)):
            raise_first(fails)
        answers = [searching.ShardAnswer(r, *answers_of[q]) for q, r in sorted(got.items())
                   if not isinstance(r, Exception)]
        nq = len(qs) if counts is None else sum(counts)
        out = searching.merge(answers, nq, k, spec.metric, searching.caps(groups, counts, k),
                            values=values and any(s.value_dim for s in specs.values()),
                            keys=keys, value_dim=spec.value_dim, dim=spec.dim)
        if values and out.values is None and any(s.value_dim for s in specs.values()):
            out.values = np.zeros((*out.ids.shape, spec.value_dim), np.float32)
        out.missing_shards = missing
        who = (caller.name if caller is not None else "local")
        for stack in dict.fromkeys(tuple(b.name for b in g) for g in groups):
            self.stacks.record(who, list(stack))
        return out

    def _shapes(self, names: set[str], caller: Caller | None) -> dict[str, BankSpec]:
        """The specs of the banks searched (cached SPEC_TTL_S: only their metric and
        dims are used, which never change while the name stands)."""
        now = time.monotonic()
        out = {}
        for name in names:
            with self._specs_lock:
                hit = self._specs.get(name)
            if hit is None or now - hit[0] > SPEC_TTL_S:
                home = self._home(name)        # the shape is the catalog's: one shard tells
                hit = (now, (self._one(home, "bank_info", name, caller=caller) if home is not None
                             else self._any("bank_info", name, caller=caller)).spec)
                with self._specs_lock:
                    self._specs[name] = hit
            out[name] = hit[1]
        return out

    def _forget(self, name: str) -> None:
        with self._specs_lock:
            self._specs.pop(name, None)

    def get(self, bank: str, ids: Any, values: bool = True, keys: bool = False, *,
            caller: Caller | None = None) -> GetResult:
        kw = {"values": values, "keys": keys, "caller": caller}
        parts = self._id_parts(bank, ids)
        if parts is None:
            return self._one(self._home(bank) or 0, "get", bank, ids, **kw)
        ids = np.asarray(to_numpy(ids), np.int64)
        got = self._fan({q: ("get", (bank, ids[rows]), kw) for q, rows in parts})
        raise_first({q: r for q, r in got.items() if isinstance(r, Exception)})
        found = np.zeros(len(ids), bool)
        out_v = out_k = None
        for q, rows in parts:
            r = got[q]
            found[rows] = r.found
            if r.values is not None:
                if out_v is None:
                    out_v = np.zeros((len(ids), *r.values.shape[1:]), r.values.dtype)
                out_v[rows] = r.values
            if r.keys is not None:
                if out_k is None:
                    out_k = np.zeros((len(ids), *r.keys.shape[1:]), r.keys.dtype)
                out_k[rows] = r.keys
        return GetResult(found=found, values=out_v, keys=out_k)

    def update_values(self, bank: str, ids: Any, values: Any, *, ack: str | None = None,
                      caller: Caller | None = None) -> int:
        parts = self._id_parts(bank, ids)
        if parts is None:
            return self._one(self._home(bank) or 0, "update_values", bank, ids, values,
                             ack=ack, caller=caller)
        ids, values = np.asarray(to_numpy(ids), np.int64), to_numpy(values)
        if values.ndim != 2 or len(values) != len(ids):
            return self._one(0, "update_values", bank, ids, values, ack=ack, caller=caller)
        return self._id_write("update_values", bank, parts,
                              lambda rows: (ids[rows], values[rows]), ack, caller)

    def remove(self, bank: str, ids: Any, *, ack: str | None = None,
               caller: Caller | None = None) -> int:
        parts = self._id_parts(bank, ids)
        if parts is None:
            return self._one(self._home(bank) or 0, "remove", bank, ids, ack=ack, caller=caller)
        ids = np.asarray(to_numpy(ids), np.int64)
        return self._id_write("remove", bank, parts, lambda rows: (ids[rows],), ack, caller)

    def _id_write(self, method: str, bank: str, parts, args_of, ack, caller) -> int:
        got = self._fan({q: (method, (bank, *args_of(rows)), {"ack": ack, "caller": caller})
                         for q, rows in parts})
        fails = {q: r for q, r in got.items() if isinstance(r, Exception)}
        if fails:
            done = sorted(q for q in got if q not in fails)
            raise_first(fails, note=f" (shards {done} applied their part; repeat the call: it "
                                     "is idempotent)" if done else "")
        return int(sum(got.values()))

    def _id_parts(self, bank: str, ids: Any) -> list[tuple[int, np.ndarray]] | None:
        """(shard, positions) of each shard's ids, or None where one shard takes the
        call whole (a session's bank, or ids its own checks will refuse)."""
        if self._home(bank) is not None:
            return None
        a = np.asarray(to_numpy(ids))
        if a.ndim != 1 or a.dtype.kind not in "iu" or len(a) == 0:
            return None
        return _by_shard(id_shards(a.astype(np.int64), self.n))

    def export(self, bank: str, chunk_rows: int = api.CHUNK_ROWS, *,
               caller: Caller | None = None) -> Iterator[ExportChunk]:
        home = self._home(bank)
        for q in ([home] if home is not None else range(self.n)):
            yield from self._one(q, "export", bank, chunk_rows, caller=caller)

    # ---- session plane -----------------------------------------------------------------
    def open_session(self, spec: SessionSpec, *, caller: Caller | None = None) -> SessionInfo:
        start = next(self._rotor)
        last = None
        for j in range(self.n):        # the next shard in turn; one that is down is skipped
            try:
                return self._one((start + j) % self.n, "open_session", spec, caller=caller)
            except errors.Unavailable as e:
                last = e
        raise last

    def _session(self, method: str, session_id: str, *args, **kwargs):
        home = self._home(session_id) if isinstance(session_id, str) else None
        return self._one(0 if home is None else home, method, session_id, *args, **kwargs)

    def append(self, session_id: str, keys: Any, values: Any = None, scores: Any = None, *,
               ack: str | None = None, caller: Caller | None = None) -> np.ndarray:
        return self._session("append", session_id, keys, values, scores, ack=ack, caller=caller)

    def session_info(self, session_id: str, *, caller: Caller | None = None) -> SessionInfo:
        return self._session("session_info", session_id, caller=caller)

    def list_sessions(self, tenant: str | None = None, *,
                      caller: Caller | None = None) -> list[SessionInfo]:
        got = self._all("list_sessions", tenant, caller=caller)
        return sorted((s for v in got.values() for s in v), key=lambda s: s.created_at)

    def extend_session(self, session_id: str, ttl_idle_s: float | None = None,
                       ttl_absolute_s: float | None = None, *,
                       caller: Caller | None = None) -> SessionInfo:
        return self._session("extend_session", session_id, ttl_idle_s, ttl_absolute_s,
                             caller=caller)

    def close_session(self, session_id: str, *, caller: Caller | None = None) -> int:
        return self._session("close_session", session_id, caller=caller)

    def promote_session(self, session_id: str, target: str, *, ids: Any = None,
                        min_score: float | None = None, dedup: float | None = None,
                        move: bool = False, ack: str | None = None,
                        caller: Caller | None = None) -> PromoteResult:
        return self._session("promote_session", session_id, target, ids=ids, min_score=min_score,
                             dedup=dedup, move=move, ack=ack, caller=caller)

    # ---- tenants and tokens: the shared catalog ---------------------------------------
    def set_tenant_quota(self, tenant: str, quota_bytes: int | None, *,
                         caller: Caller | None = None) -> TenantInfo:
        self._any("set_tenant_quota", tenant, quota_bytes, caller=caller)
        return self.tenant_info(tenant, caller=caller)

    def tenant_info(self, tenant: str, *, caller: Caller | None = None) -> TenantInfo:
        return reports.merge_tenants([[t] for t in self._all("tenant_info", tenant,
                                                       caller=caller).values()])[0]

    def list_tenants(self, *, caller: Caller | None = None) -> list[TenantInfo]:
        return reports.merge_tenants(list(self._all("list_tenants", caller=caller).values()))

    def create_token(self, tenant: str | None = None, role: str = "write", name: str = "", *,
                     caller: Caller | None = None) -> CreatedToken:
        return self._any("create_token", tenant, role, name, caller=caller)

    def list_tokens(self, tenant: str | None = None, *,
                    caller: Caller | None = None) -> list[TokenInfo]:
        return self._any("list_tokens", tenant, caller=caller)

    def revoke_token(self, token_id: str, *, caller: Caller | None = None) -> TokenInfo:
        return self._any("revoke_token", token_id, caller=caller)

    # ---- snapshots and backups: each shard under <path>/shard-<i> ------------------------
    def snapshot_bank(self, name: str, path: str, *,
                      caller: Caller | None = None) -> SnapshotInfo:
        got = self._fan({q: ("snapshot_bank", (name, _under(path, q)), {"caller": caller})
                         for q in self._holders(name)})
        raise_first({q: r for q, r in got.items() if isinstance(r, Exception)})
        parts = [got[q] for q in sorted(got)]
        return SnapshotInfo(path=path, bank=name, count=sum(p.count for p in parts),
                            used_bytes=sum(p.used_bytes for p in parts),
                            checksum=",".join(p.checksum for p in parts))

    def restore_bank(self, path: str, name: str | None = None, *,
                     caller: Caller | None = None) -> BankInfo:
        got = self._all_at("restore_bank", lambda q: (_under(path, q), name), caller)
        return self.bank_info(got[0].name, caller=caller)

    def backup(self, path: str, *, caller: Caller | None = None) -> SnapshotInfo:
        got = self._all_at("backup", lambda q: (_under(path, q),), caller)
        banks = sorted({b for r in got.values() for b in r.banks})
        return SnapshotInfo(path=path, bank="", count=0,
                            used_bytes=sum(r.used_bytes for r in got.values()), checksum="",
                            banks=tuple(banks))

    def _all_at(self, method: str, args_of: Callable[[int], tuple], caller) -> dict[int, Any]:
        got = self._fan({q: (method, args_of(q), {"caller": caller}) for q in range(self.n)})
        raise_first({q: r for q, r in got.items() if isinstance(r, Exception)})
        return got

    def _holders(self, name: str) -> list[int]:
        home = self._home(name)
        return list(range(self.n)) if home is None else [home]


# ---- helpers ----------------------------------------------------------------------------

def _by_shard(shard: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(int(q), np.flatnonzero(shard == q)) for q in np.unique(shard)]


def _rows(a: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if a is None or a.ndim == 0 else a[rows]


def _under(path: str, q: int) -> str:
    return f"{path.rstrip('/')}/shard-{q}" if isinstance(path, str) else path


