"""Sessions: short-term memory written during inference.

A session owns one bank of kind "session" (a small Flat index of its own,
named by the session id), so ending a session drops a whole bank: no
remove_ids on a big index (DESIGN lesson 7). Expiry has two clocks: idle
(since the last append or search naming the session) and absolute (since it
opened). An expired session vanishes from reads at once (its bank answers
NOT_FOUND); the reaper then deletes it and its bytes return to the quota.

Per-memory scores (e.g. how much attention a memory drew) may ride along
with appends; `promote` can select by them.

Layering: sessions are built on the bank engine (memoryd.engine.banks) and
the catalog's session table; the engine knows nothing of them. LocalMemory
checks the banks a request names (`visible`: an expired session's bank is
NOT_FOUND) and, once the request succeeded, restarts the idle clocks of the
sessions it used (`touch`, once per request).
"""
from __future__ import annotations

import re
import threading
from typing import Any, Callable, Iterable

import numpy as np

from memoryd import api, faults
from memoryd.api import BankQuery, PromoteResult, SessionInfo, SessionSpec
from memoryd.arrays import id_vector, matrix, to_numpy
from memoryd.engine.catalog import Catalog
from memoryd.engine.banks import BankEngine
from memoryd.errors import FailedPrecondition, InvalidArgument, NotFound
from memoryd.storage.faiss_index import faiss

SESSION_ID = re.compile(r"^s-[0-9a-f]{16}$")


class SessionManager:
    def __init__(self, engine: BankEngine, catalog: Catalog, clock: Callable[[], float]):
        self.engine, self.catalog, self.clock = engine, catalog, clock
        self._lock = threading.Lock()
        self._rows: dict[str, dict] = {}       # session id -> catalog row (cached)

    # ---- start-up ---------------------------------------------------------------
    def load(self) -> None:
        """Cache sessions; drop halves left by a crash (bank or row without the other).

        Only banks named like session ids count: a session-kind bank made
        with create_bank is the caller's own and is left alone.
        """
        here = set(self.catalog.storages())      # this shard's slices (all banks, alone)
        banks = {b.name for b in self.catalog.list_banks()
                 if b.spec.kind == "session" and SESSION_ID.match(b.name) and b.name in here}
        for row in self.catalog.all_sessions(shard=self.catalog.shard):
            if row["id"] in banks:
                self._rows[row["id"]] = row
            else:
                self.catalog.drop_session(row["id"])
        for orphan in banks - set(self._rows):
            self.engine.delete_bank(orphan)

    # ---- life cycle ----------------------------------------------------------------
    def open(self, spec: SessionSpec) -> SessionInfo:
        spec.validated()
        sid = self.engine.placement.new_session_id()   # = this shard (mod N): routers find it
        self.engine.create_bank(spec.bank_spec(sid))
        now = self.clock()
        self.catalog.add_session(sid, spec.tenant, api.check_ttl(spec.ttl_idle_s, "ttl_idle_s"),
                                     api.check_ttl(spec.ttl_absolute_s, "ttl_absolute_s"), now)
        with self._lock:
            self._rows[sid] = self.catalog.session(sid)
        return self.info(sid)

    def close(self, sid: str) -> int:
        self._row(sid, alive=False)
        return self._drop(sid)

    def _drop(self, sid: str) -> int:
        with self._lock:
            self._rows.pop(sid, None)
        self.catalog.drop_session(sid)   # first: a crash now leaves an orphan bank, reaped on open
        try:
            return self.engine.delete_bank(sid)
        except NotFound:
            return 0

    def extend(self, sid: str, ttl_idle_s: float | None, ttl_absolute_s: float | None) -> SessionInfo:
        """Reset the idle clock; a new idle TTL replaces the old one, a new
        absolute TTL counts from now."""
        row = self._row(sid)
        now = self.clock()
        fields: dict[str, Any] = {"last_used_at": now}
        if ttl_idle_s is not None:
            fields["ttl_idle_s"] = api.check_ttl(ttl_idle_s, "ttl_idle_s")
        if ttl_absolute_s is not None:
            fields["ttl_absolute_s"] = now - row["created_at"] + api.check_ttl(ttl_absolute_s, "ttl_absolute_s")
        self.catalog.update_session(sid, **fields)
        with self._lock:
            self._rows[sid] = {**row, **fields}
        return self.info(sid)

    # ---- time ----------------------------------------------------------------------
    @staticmethod
    def deadline(row: dict) -> float | None:
        ends = []
        if row["ttl_idle_s"] is not None:
            ends.append(row["last_used_at"] + row["ttl_idle_s"])
        if row["ttl_absolute_s"] is not None:
            ends.append(row["created_at"] + row["ttl_absolute_s"])
        return min(ends) if ends else None

    def expired(self, sid: str) -> bool:
        row = self._rows.get(sid)
        return row is not None and self._deadline_passed(row, self.clock())

    def _deadline_passed(self, row: dict, now: float) -> bool:
        end = self.deadline(row)
        return end is not None and now >= end

    def visible(self, names: Iterable[str]) -> None:
        """NotFound for the first of names that is an expired session's bank."""
        for name in names:
            if self.expired(name):
                raise NotFound(f"no bank named '{name}' (its session expired)")

    def touch(self, names: Iterable[str]) -> None:
        """A request (search, add, append) used these banks and succeeded: the
        idle clocks of the sessions among them restart (persisted by flush())."""
        now = self.clock()
        with self._lock:
            for name in names:
                row = self._rows.get(name)
                if row is not None and not self._deadline_passed(row, now):
                    row["last_used_at"] = now

    def reap(self) -> int:
        """Delete expired sessions (their bytes return to the quotas); persist idle clocks."""
        reaped = 0
        for sid in list(self._rows):
            if self.expired(sid):
                self._drop(sid)
                reaped += 1
        self.flush()
        return reaped

    def flush(self) -> None:
        """Persist the idle clocks that searches moved (they live in memory between passes)."""
        for sid, row in list(self._rows.items()):
            self.catalog.update_session(sid, last_used_at=row["last_used_at"])

    # ---- reads of the session table ---------------------------------------------------
    def _row(self, sid: str, alive: bool = True) -> dict:
        row = self._rows.get(sid)
        if row is None or (alive and self.expired(sid)):
            raise NotFound(f"no session '{sid}'" + (" (it expired)" if row is not None else ""))
        return row

    def info(self, sid: str) -> SessionInfo:
        row = self._row(sid)
        return SessionInfo(
            session_id=sid, tenant=row["tenant"], created_at=row["created_at"],
            last_used_at=row["last_used_at"], expires_at=self.deadline(row),
            ttl_idle_s=row["ttl_idle_s"], ttl_absolute_s=row["ttl_absolute_s"],
            bank=self.engine.bank_info(sid))

    def list(self, tenant: str | None = None) -> list[SessionInfo]:
        out = []
        for sid in sorted(self._rows, key=lambda s: self._rows[s]["created_at"]):
            row = self._rows.get(sid)
            if row is not None and not self.expired(sid) and tenant in (None, row["tenant"]):
                try:
                    out.append(self.info(sid))
                except NotFound:   # closed meanwhile
                    pass
        return out

    # ---- writes ----------------------------------------------------------------------
    def append(self, sid: str, keys: Any, values: Any, scores: Any,
               ack: str | None = None) -> np.ndarray:
        """Rows and their scores in ONE log record of the session's bank."""
        self._row(sid)                   # NotFound names the session, not its bank
        keys = matrix(keys, "keys", self.engine.bank(sid).spec.dim, np.dtype(np.float32))
        n = len(keys)
        sc = None
        if scores is not None:
            sc = to_numpy(scores).astype(np.float32).reshape(-1)
            if len(sc) != n:
                raise InvalidArgument(f"got {n} keys but {len(sc)} scores")
            if not np.isfinite(sc).all():
                raise InvalidArgument("scores contain NaN or Inf")
        ids = self.engine.add(sid, keys, values, scores=sc, ack=ack)
        self.touch([sid])
        return ids

    def scores_of(self, sid: str, ids: np.ndarray) -> np.ndarray:
        """Scores of ids (NaN where an append gave none)."""
        return self.engine.scores_of(sid, ids)

    # ---- promotion -------------------------------------------------------------------
    def promote(self, sid: str, target: str, ids: Any, min_score: float | None,
                dedup: float | None, move: bool, ack: str | None = None) -> PromoteResult:
        """Copy (or move) session memories into a domain bank: all of them or none.

        The add to the target is one bank add (one log record, its bytes
        reserved as usual); with move, every selected memory then leaves the
        session, the duplicates dedup skipped included (the target holds their
        like). Across a crash a move is whole: engine.banks.move_rows.
        """
        self._row(sid)
        src, dst = self.engine.bank_info(sid).spec, self.engine.bank_info(target).spec
        if dst.kind != "domain":
            raise FailedPrecondition(f"sessions promote into domain banks; '{target}' is a {dst.kind} bank")
        if (src.dim, src.value_dim, src.metric) != (dst.dim, dst.value_dim, dst.metric):
            raise InvalidArgument(
                f"session '{sid}' ({src.dim}-d keys, {src.value_dim}-d values, {src.metric}) does not "
                f"fit bank '{target}' ({dst.dim}-d, {dst.value_dim}-d, {dst.metric})")
        if min_score is not None and not np.isfinite(min_score):
            raise InvalidArgument(f"min_score must be a finite number; got {min_score}")
        if dedup is not None and not 0 < dedup <= 1:
            raise InvalidArgument(f"dedup is a cosine similarity in (0, 1]; got {dedup}")
        chunks = list(self.engine.export(sid))
        all_ids = np.concatenate([c.ids for c in chunks]) if chunks else np.empty(0, np.int64)
        keep = np.ones(len(all_ids), bool)
        if ids is not None:
            wanted = id_vector(ids, allow_empty=True)
            missing = np.setdiff1d(wanted, all_ids)
            if len(missing):
                raise NotFound(f"session '{sid}' has no memories with ids {missing[:5].tolist()}")
            keep &= np.isin(all_ids, wanted)
        if min_score is not None:
            keep &= self.scores_of(sid, all_ids) >= min_score      # NaN (no score) fails
        sel_ids = all_ids[keep]
        keys = np.concatenate([c.keys for c in chunks])[keep] if chunks else np.empty((0, src.dim), np.float32)
        vals = (np.concatenate([c.values for c in chunks])[keep]
                if chunks and src.value_dim else None)
        duplicates = 0
        if dedup is not None and len(sel_ids):
            unique = _dedup_mask(keys, dedup, self.engine, target)
            duplicates = int((~unique).sum())
            sel_ids, keys = sel_ids[unique], keys[unique]
            vals = vals[unique] if vals is not None else None
        faults.point("promote:selected")
        leaving = all_ids[keep] if move else np.empty(0, np.int64)
        target_ids, sel_ids = self.engine.move_rows(sid, target, sel_ids, keys, vals, leaving,
                                                    move, ack)
        return PromoteResult(promoted=len(target_ids), duplicates=duplicates,
                             target_ids=target_ids, source_ids=sel_ids, moved=bool(move))


def _dedup_mask(keys: np.ndarray, threshold: float, engine: BankEngine, target: str,
                block: int = 1024) -> np.ndarray:
    """True for keys to keep: no kept key before it, nor any key already in
    the target bank, has cosine similarity >= threshold with it. Greedy in
    append order (the first of a group stays), in blocks: memory O(block^2).

    Against the target, a key meets only the target's nearest key by the
    bank's own metric (one search, not a scan of the bank): that is the
    most cosine-similar one when keys are unit vectors (as the layers'
    are); with keys of other norms a cosine duplicate that is not the
    metric's nearest is missed (tests/test_promote.py, xfail)."""
    unit = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    keep = np.ones(len(keys), bool)
    if engine.bank_info(target).count:
        near = engine.search([BankQuery(target)], keys, 1, values=False, keys=True).keys[:, 0]  # (n, d)
        near = near / np.maximum(np.linalg.norm(near, axis=1, keepdims=True), 1e-12)
        keep &= (unit * near).sum(1) < threshold
    kept = faiss.IndexFlatIP(unit.shape[1])                   # keys kept in earlier blocks
    for start in range(0, len(unit), block):
        part, ok = unit[start:start + block], keep[start:start + block]
        if kept.ntotal:
            ok &= kept.search(part, 1)[0][:, 0] < threshold
        sims = part @ part.T                                  # (b, b)
        for i in range(len(part)):
            if ok[i]:
                ok[i + 1:] &= sims[i, i + 1:] < threshold
        kept.add(part[ok])
    return keep
