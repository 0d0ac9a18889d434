"""The SQL catalog: tenants, banks and their slices, quotas, usage, sessions,
tokens (SQLAlchemy Core; SQLite or PostgreSQL).

SQLite file by default; `postgresql+psycopg://...` for a catalog that many
processes share (the shard processes of a cluster). Only portable SQL is
used. The tables are in memoryd.engine.schema; the database under them (its
engine, its errors, the schema kept by Alembic, run at open: `upgrade`) in
memoryd.engine.database.

Banks and slices. A bank is one row of `banks` (its spec, quota, frozen,
tier): the logical bank. Each process that holds part of its rows -- shard
process i of `memoryd serve --shard-index i --num-shards N`; a single
process is shard 0 -- holds one *slice* of it, a row of `bank_slices`
(bank, shard): its folder under that process's banks/, its bytes and rows,
trained, checksum. A Catalog is opened by one process and knows its shard
(`Catalog(url, shard=i)`): storages(), slice(), delete_bank(), reconcile()
and the slice half of reserve()/update_bank() are about this shard's slice.

banks.used_bytes/count are the sum over the bank's slices, and
banks.trained/checksum the slices' aggregate (see `_refresh_aggregate`),
kept so in the same transaction as every change; every change to a slice
first writes its bank's row, so those changes are serialised per bank, in
every process (the row lock on PostgreSQL, the write lock on SQLite).

Quotas are enforced at admission: a write first reserves its bytes with one
conditional UPDATE of the LOGICAL bank

    UPDATE banks SET used_bytes = used_bytes + :n
     WHERE name = :bank AND (quota_bytes IS NULL OR used_bytes + :n <= quota_bytes)

(then its slice, then the same conditional UPDATE on its tenant) inside one
transaction, so concurrent writers, of one process or of many, can never take
usage above a quota. Deletes always succeed and release bytes.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from typing import Iterator

import sqlalchemy as sa

from memoryd.api import BankInfo, BankSpec
from memoryd.engine.database import _add_missing_columns, _guarded, _mapped_errors, _migrate, make_engine
from memoryd.engine.schema import bank_slices, banks, metadata, sessions, tenants, usage
from memoryd.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded
from memoryd.sizes import describe_size

# update_bank fields that belong to this shard's slice; the rest are the bank's.
SLICE_FIELDS = frozenset({"trained", "checksum", "storage"})
# What makes two specs the same bank (tier may differ: it is a process's choice).
_SHAPE = ("tenant", "kind", "dim", "value_dim", "value_dtype", "metric", "index_spec", "shards",
          "eviction", "key_version", "quota_bytes")


class Catalog:
    def __init__(self, url: str, shard: int = 0):
        if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
            raise InvalidArgument(f"shard must be an integer >= 0; got {shard!r}")
        self.url, self.shard = url, shard
        self.engine = make_engine(url)
        try:
            _guarded(self.engine, lambda: _migrate(self.engine))
        except BaseException:
            self.engine.dispose()
            raise

    def _add_missing_columns(self) -> None:
        """The pre-Alembic upgrade path (kept for tools that call it): see
        memoryd.engine.database._add_missing_columns."""
        with self._tx() as c:
            _add_missing_columns(c)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """One transaction; a catalog the disk cannot take (full, read-only) is
        StorageFull / StorageUnwritable, one that cannot be reached Unavailable,
        and the transaction left undone."""
        with _mapped_errors(self.engine):
            with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with _mapped_errors(self.engine, writing=False):
            with self.engine.connect() as conn:
                yield conn

    # ---- banks ---------------------------------------------------------------
    def create_bank(self, spec: BankSpec, storage: str) -> BankInfo:
        """The bank's row (if no process made it yet) and this shard's slice.

        Another shard process may have made the row: then this one attaches
        its slice, if the row is of the same shape (else AlreadyExists). Two
        processes creating one bank at once both end with a slice and there
        is one row (the row insert is INSERT .. ON CONFLICT DO NOTHING, then
        the row is read again).
        """
        for _ in range(3):
            try:
                self._create_once(spec, storage)
                break
            except _RowGone:     # its last slice was deleted under the attach: make it anew
                continue
        else:
            raise FailedPrecondition(f"bank '{spec.name}' was deleted again and again while "
                                     "this process was creating it: try again")
        return self.bank(spec.name)

    def _create_once(self, spec: BankSpec, storage: str) -> None:
        now = time.time()
        with self._tx() as c:
            self.ensure_tenant(c, spec.tenant)
            made = _insert_if_absent(c, banks, ["name"], dict(
                name=spec.name, tenant=spec.tenant, kind=spec.kind, dim=spec.dim,
                value_dim=spec.value_dim, value_dtype=spec.value_dtype, metric=spec.metric,
                index_spec=spec.index, shards=spec.shards, quota_bytes=spec.quota_bytes,
                used_bytes=0, count=0, frozen=False, trained=False, checksum="",
                storage=storage, tier=spec.tier, eviction=spec.eviction,
                key_version=spec.key_version, created_at=now, updated_at=now))
            if made:
                self._log(c, spec.name, spec.tenant, "create", 0, 0)
            else:
                row = _lock_bank(c, spec.name, now)
                if row is None:      # deleted between the insert and now
                    raise _RowGone()
                if self._has_slice(c, spec.name):
                    raise AlreadyExists(f"bank '{spec.name}' already exists")
                theirs, mine = _shape_of_row(row), _shape_of_spec(spec)
                if theirs != mine:
                    diff = ", ".join(f"{k} {theirs[k]!r} (not {mine[k]!r})"
                                     for k in _SHAPE if theirs[k] != mine[k])
                    raise AlreadyExists(f"bank '{spec.name}' already exists: the name is taken by "
                                        f"a bank of another shape ({diff})")
                self._log(c, spec.name, spec.tenant, "attach", 0, 0)
            if not _insert_if_absent(c, bank_slices, ["bank", "shard"], dict(
                    bank=spec.name, shard=self.shard, storage=storage, used_bytes=0, count=0,
                    trained=False, checksum="", updated_at=now)):
                raise AlreadyExists(f"bank '{spec.name}' already exists")
            if not made:
                _refresh_aggregate(c, spec.name)

    def bank(self, name: str) -> BankInfo:
        """The logical bank: totals over its slices."""
        with self._read() as c:
            row = c.execute(sa.select(banks).where(banks.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"no bank named '{name}'")
        return _info(row)

    def list_banks(self, tenant: str | None = None) -> list[BankInfo]:
        q = sa.select(banks).order_by(banks.c.name)
        if tenant:
            q = q.where(banks.c.tenant == tenant)
        with self._read() as c:
            return [_info(r) for r in c.execute(q).mappings()]

    def slice(self, name: str) -> dict:
        """This shard's slice of the bank: {bank, shard, storage, used_bytes,
        count, trained, checksum, updated_at}; NotFound if it holds none."""
        with self._read() as c:
            row = c.execute(sa.select(bank_slices).where(
                bank_slices.c.bank == name, bank_slices.c.shard == self.shard)).mappings().first()
        if row is None:
            raise NotFound(self._no_slice(name))
        return dict(row)

    def slices(self, name: str) -> list[dict]:
        """Every slice of the bank, in shard order ([] if there is no such bank)."""
        with self._read() as c:
            return [dict(r) for r in c.execute(sa.select(bank_slices).where(
                bank_slices.c.bank == name).order_by(bank_slices.c.shard)).mappings()]

    def has_slice(self, name: str) -> bool:
        with self._read() as c:
            return self._has_slice(c, name)

    def storages(self) -> dict[str, str]:
        """{bank: folder} of THIS shard's slices: the banks its process opens."""
        with self._read() as c:
            return dict(c.execute(sa.select(bank_slices.c.bank, bank_slices.c.storage)
                                  .where(bank_slices.c.shard == self.shard)).all())

    def delete_bank(self, name: str) -> int:
        """Drop this shard's slice and give its bytes back (the bank's row and
        its tenant); the bank's row goes with its last slice. Returns the bytes."""
        now = time.time()
        with self._tx() as c:
            row = _lock_bank(c, name, now)
            if row is None:
                raise NotFound(f"no bank named '{name}'")
            s = bank_slices.c
            mine = c.execute(sa.select(s.used_bytes, s.count).where(
                s.bank == name, s.shard == self.shard)).first()
            if mine is None:
                raise NotFound(self._no_slice(name))
            used, count = int(mine[0]), int(mine[1])
            tenant = row["tenant"]
            c.execute(bank_slices.delete().where(s.bank == name, s.shard == self.shard))
            left = c.execute(sa.select(sa.func.count()).select_from(bank_slices)
                             .where(s.bank == name)).scalar_one()
            if left:
                b = banks.c
                c.execute(banks.update().where(b.name == name).values(
                    used_bytes=b.used_bytes - used, count=b.count - count, updated_at=now))
                _refresh_aggregate(c, name)
            else:
                c.execute(banks.delete().where(banks.c.name == name))
            self._tenant_delta(c, tenant, -used)
            self._log(c, name, tenant, "delete", -used, -count)
        return used

    def update_bank(self, name: str, **fields) -> BankInfo:
        """Change the bank's row (frozen, tier, quota_bytes, ...) and, for
        trained/checksum/storage, this shard's slice."""
        mine = {k: fields.pop(k) for k in list(fields) if k in SLICE_FIELDS}
        now = time.time()
        with self._tx() as c:
            r = c.execute(banks.update().where(banks.c.name == name)
                          .values(**fields, updated_at=now))
            if r.rowcount == 0:
                raise NotFound(f"no bank named '{name}'")
            if mine:
                s = bank_slices.c
                r = c.execute(bank_slices.update().where(s.bank == name, s.shard == self.shard)
                              .values(**mine, updated_at=now))
                if r.rowcount == 0:
                    raise NotFound(self._no_slice(name))
                _refresh_aggregate(c, name)
        return self.bank(name)

    # ---- quota ---------------------------------------------------------------
    def reserve(self, name: str, nbytes: int, items: int, op: str = "add") -> None:
        """Take nbytes of the bank's (and its tenant's) quota for this shard's
        slice, or QuotaExceeded (of the logical bank, or of the tenant).

        Negative nbytes (a write that shrinks the bank) always succeeds.
        """
        now = time.time()
        with self._tx() as c:
            b = banks.c
            cond = [b.name == name]
            if nbytes > 0:
                cond.append(sa.or_(b.quota_bytes.is_(None), b.used_bytes + nbytes <= b.quota_bytes))
            tenant = c.execute(banks.update().where(*cond).values(
                used_bytes=b.used_bytes + nbytes, count=b.count + items, updated_at=now)
                .returning(b.tenant)).scalar()
            if tenant is None:
                row = c.execute(sa.select(b.used_bytes, b.quota_bytes).where(b.name == name)).first()
                if row is None:
                    raise NotFound(f"no bank named '{name}'")
                raise QuotaExceeded(name, int(row[0]), int(row[1]), nbytes)
            s = bank_slices.c
            if c.execute(bank_slices.update().where(s.bank == name, s.shard == self.shard).values(
                    used_bytes=s.used_bytes + nbytes, count=s.count + items,
                    updated_at=now)).rowcount == 0:
                raise NotFound(self._no_slice(name))
            if not self._tenant_delta(c, tenant, nbytes):
                t = c.execute(sa.select(tenants.c.used_bytes, tenants.c.quota_bytes)
                              .where(tenants.c.name == tenant)).first()
                raise QuotaExceeded(tenant, int(t[0]), int(t[1]), nbytes, scope="tenant")
            self._log(c, name, tenant, op, nbytes, items)

    def release(self, name: str, nbytes: int, items: int, op: str = "release") -> None:
        """Give back bytes (and items); never fails on quota."""
        self.reserve(name, -nbytes, -items, op)

    def set_quota(self, name: str, quota_bytes: int | None) -> BankInfo:
        return self.update_bank(name, quota_bytes=quota_bytes)

    def reconcile(self, name: str, used_bytes: int, count: int) -> None:
        """Set this shard's slice to what it really holds (after a restart or
        crash) and carry the difference to the bank and its tenant (the truth
        wins: no quota is checked). Nothing happens without a slice here."""
        s = bank_slices.c
        where = (s.bank == name, s.shard == self.shard)
        with self._read() as c:
            have = c.execute(sa.select(s.used_bytes, s.count).where(*where)).first()
        if have is None or (have[0] == used_bytes and have[1] == count):
            return                                  # the usual case: no write at all
        now = time.time()
        with self._tx() as c:
            row = _lock_bank(c, name, now)
            have = c.execute(sa.select(s.used_bytes, s.count).where(*where)).first()
            if row is None or have is None:
                return
            dbytes, ditems = used_bytes - int(have[0]), count - int(have[1])
            if dbytes == 0 and ditems == 0:
                return
            c.execute(bank_slices.update().where(*where).values(
                used_bytes=used_bytes, count=count, updated_at=now))
            b = banks.c
            c.execute(banks.update().where(b.name == name).values(
                used_bytes=b.used_bytes + dbytes, count=b.count + ditems))
            self._tenant_delta(c, row["tenant"], dbytes, enforce=False)   # the truth wins
            self._log(c, name, row["tenant"], "reconcile", dbytes, ditems)

    def _has_slice(self, c: sa.Connection, name: str) -> bool:
        s = bank_slices.c
        return c.execute(sa.select(s.shard).where(s.bank == name, s.shard == self.shard)).first() \
            is not None

    def _no_slice(self, name: str) -> str:
        if self.shard == 0:
            return f"no bank named '{name}'"
        return f"no bank named '{name}' on shard {self.shard} (this process holds no slice of it)"

    # ---- tenants -------------------------------------------------------------------
    def ensure_tenant(self, c: sa.Connection, tenant: str) -> None:
        """The tenant's row, made if missing (safe against a concurrent maker)."""
        _insert_if_absent(c, tenants, ["name"], dict(name=tenant, quota_bytes=None, used_bytes=0,
                                                     created_at=time.time()))

    def set_tenant_quota(self, tenant: str, quota_bytes: int | None) -> None:
        """Raise or lower a tenant's quota; below its usage is refused."""
        with self._tx() as c:
            self.ensure_tenant(c, tenant)
            t = tenants.c
            cond = [t.name == tenant]
            if quota_bytes is not None:
                cond.append(t.used_bytes <= quota_bytes)
            if c.execute(tenants.update().where(*cond).values(quota_bytes=quota_bytes)).rowcount == 0:
                used = c.execute(sa.select(t.used_bytes).where(t.name == tenant)).scalar_one()
                raise FailedPrecondition(
                    f"tenant '{tenant}' uses {describe_size(used)}: a quota of "
                    f"{describe_size(quota_bytes)} is below that; delete banks or close "
                    "sessions first")

    def tenant(self, tenant: str) -> dict:
        with self._read() as c:
            row = c.execute(sa.select(tenants).where(tenants.c.name == tenant)).mappings().first()
            if row is None:
                raise NotFound(f"no tenant named '{tenant}'")
            nbanks = c.execute(sa.select(sa.func.count()).select_from(banks)
                               .where(banks.c.tenant == tenant)).scalar_one()
            nsessions = c.execute(sa.select(sa.func.count()).select_from(sessions)
                                  .where(sessions.c.tenant == tenant)).scalar_one()
        return {**row, "banks": int(nbanks), "sessions": int(nsessions)}

    def tenant_names(self) -> list[str]:
        with self._read() as c:
            return list(c.execute(sa.select(tenants.c.name).order_by(tenants.c.name)).scalars())

    # ---- sessions ------------------------------------------------------------------
    def add_session(self, session_id: str, tenant: str, ttl_idle_s: float | None,
                    ttl_absolute_s: float | None, now: float, shard: int | None = None) -> None:
        """A session's row; shard: the process holding its bank (default this one)."""
        with self._tx() as c:
            c.execute(sessions.insert().values(
                id=session_id, tenant=tenant, ttl_idle_s=ttl_idle_s,
                ttl_absolute_s=ttl_absolute_s, created_at=now, last_used_at=now,
                shard=self.shard if shard is None else shard))

    def session(self, session_id: str) -> dict | None:
        with self._read() as c:
            row = c.execute(sa.select(sessions).where(sessions.c.id == session_id)).mappings().first()
        return None if row is None else dict(row)

    def all_sessions(self, shard: int | None = None) -> list[dict]:
        """Every session's row (oldest first), or only those of one shard."""
        q = sa.select(sessions).order_by(sessions.c.created_at)
        if shard is not None:
            q = q.where(sessions.c.shard == shard)
        with self._read() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def update_session(self, session_id: str, **fields) -> None:
        with self._tx() as c:
            c.execute(sessions.update().where(sessions.c.id == session_id).values(**fields))

    def drop_session(self, session_id: str) -> None:
        with self._tx() as c:
            c.execute(sessions.delete().where(sessions.c.id == session_id))

    # ---- backups ---------------------------------------------------------------------
    def copy_to(self, url: str, bank_names: set[str]) -> None:
        """Every table into a new catalog at url, keeping only the banks named
        (those a backup holds files for) of which this shard holds a slice,
        with that slice and their sessions. A backup is of one process and
        is restored as a single process: the slice becomes shard 0 and its
        bank's (and tenant's) usage that of the slice. One read transaction,
        so the copy is one state of the catalog."""
        target = make_engine(url)
        try:
            _guarded(target, lambda: _migrate(target, lock=False))
            with self._snapshot() as src, _mapped_errors(target), target.begin() as dst:
                rows = {t.name: [dict(r) for r in src.execute(sa.select(t)).mappings()]
                        for t in metadata.sorted_tables}
                mine = {r["bank"]: r for r in rows["bank_slices"]
                        if r["shard"] == self.shard and r["bank"] in bank_names}
                rows["bank_slices"] = [{**r, "shard": 0} for r in mine.values()]
                rows["banks"] = [
                    {**r, "used_bytes": mine[r["name"]]["used_bytes"],
                     "count": mine[r["name"]]["count"], "trained": mine[r["name"]]["trained"],
                     "checksum": mine[r["name"]]["checksum"], "storage": mine[r["name"]]["storage"]}
                    for r in rows["banks"] if r["name"] in mine]
                rows["sessions"] = [{**r, "shard": 0} for r in rows["sessions"] if r["id"] in mine]
                held: dict[str, int] = {}
                for r in rows["banks"]:
                    held[r["tenant"]] = held.get(r["tenant"], 0) + int(r["used_bytes"])
                rows["tenants"] = [{**r, "used_bytes": held.get(r["name"], 0)}
                                   for r in rows["tenants"]]
                for table in metadata.sorted_tables:
                    if rows[table.name]:
                        dst.execute(table.insert(), rows[table.name])
        finally:
            target.dispose()

    @contextmanager
    def _snapshot(self) -> Iterator[sa.Connection]:
        """A read-only connection whose statements all see one state."""
        with _mapped_errors(self.engine, writing=False):
            if self.engine.dialect.name == "postgresql":
                with self.engine.connect().execution_options(
                        isolation_level="REPEATABLE READ") as c:
                    yield c
            else:
                with self.engine.connect() as c:
                    if self.engine.dialect.name == "sqlite":
                        c.exec_driver_sql("BEGIN")   # pysqlite begins none before a SELECT
                    yield c

    @staticmethod
    def _tenant_delta(c: sa.Connection, tenant: str, nbytes: int, enforce: bool = True) -> bool:
        t = tenants.c
        cond = [t.name == tenant]
        if nbytes > 0 and enforce:
            cond.append(sa.or_(t.quota_bytes.is_(None), t.used_bytes + nbytes <= t.quota_bytes))
        return c.execute(tenants.update().where(*cond)
                         .values(used_bytes=t.used_bytes + nbytes)).rowcount == 1

    @staticmethod
    def _log(c: sa.Connection, bank: str, tenant: str, op: str, nbytes: int, items: int) -> None:
        c.execute(usage.insert().values(bank=bank, tenant=tenant, op=op, delta_bytes=nbytes,
                                        delta_items=items, at=time.time()))


# ---- rows ------------------------------------------------------------------------------

class _RowGone(Exception):
    """create_bank found the bank's row, which was deleted before it could lock it."""


def _insert_if_absent(c: sa.Connection, table: sa.Table, keys: list[str], values: dict) -> bool:
    """INSERT unless a row with these key values exists (made by anyone, even
    concurrently: the losing insert waits for the winner and does nothing);
    True if this one inserted it."""
    name = c.dialect.name
    if name in ("sqlite", "postgresql"):
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        # RETURNING, not rowcount: an INSERT's rowcount is not kept by every driver (psycopg)
        return c.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
                         .returning(*(table.c[k] for k in keys))).first() is not None
    where = [table.c[k] == values[k] for k in keys]   # any other database: a savepoint
    if c.execute(sa.select(*(table.c[k] for k in keys)).where(*where)).first():
        return False
    try:
        with c.begin_nested():
            c.execute(table.insert().values(**values))
    except sa.exc.IntegrityError:
        return False
    return True


def _lock_bank(c: sa.Connection, name: str, now: float):
    """Write the bank's row (updated_at) so no other process changes the bank
    until this transaction ends; its row (a mapping), or None."""
    return c.execute(banks.update().where(banks.c.name == name).values(updated_at=now)
                     .returning(*banks.c)).mappings().first()


def _refresh_aggregate(c: sa.Connection, name: str) -> None:
    """banks.trained/checksum from the bank's slices (the bank's row is
    already written by this transaction, so no slice changes meanwhile)."""
    s = bank_slices.c
    rows = c.execute(sa.select(s.shard, s.trained, s.checksum).where(s.bank == name)
                     .order_by(s.shard)).all()
    c.execute(banks.update().where(banks.c.name == name).values(
        # a slice trains on its first add, so one without rows may be untrained
        # while the bank is searchable: trained = some slice trained
        trained=any(bool(r[1]) for r in rows),
        checksum=combined_checksum([(int(r[0]), r[2]) for r in rows])))


def combined_checksum(slices: list[tuple[int, str]]) -> str:
    """The checksum of a bank from its slices' [(shard, checksum)].

    One slice: its own checksum. Several: "" if any slice has none (not
    frozen yet), else sha256 over the lines "shard:checksum\\n" in shard
    order, prefixed "sha256:" when every slice's checksum is.
    """
    if len(slices) == 1:
        return slices[0][1]
    if not slices or any(not cs for _, cs in slices):
        return ""
    h = hashlib.sha256()
    for shard, cs in sorted(slices):
        h.update(f"{shard}:{cs}\n".encode())
    prefix = "sha256:" if all(cs.startswith("sha256:") for _, cs in slices) else ""
    return prefix + h.hexdigest()


def _shape_of_spec(spec: BankSpec) -> dict:
    return dict(tenant=spec.tenant, kind=spec.kind, dim=spec.dim, value_dim=spec.value_dim,
                value_dtype=spec.value_dtype, metric=spec.metric, index_spec=spec.index,
                shards=spec.shards, eviction=spec.eviction, key_version=spec.key_version,
                quota_bytes=spec.quota_bytes)


def _shape_of_row(row) -> dict:
    out = {k: row[k] for k in _SHAPE}
    out["quota_bytes"] = None if row["quota_bytes"] is None else int(row["quota_bytes"])
    return out


def _info(row) -> BankInfo:
    spec = BankSpec(
        name=row["name"], dim=row["dim"], value_dim=row["value_dim"], kind=row["kind"],
        value_dtype=row["value_dtype"], metric=row["metric"], index=row["index_spec"],
        shards=row["shards"], quota_bytes=row["quota_bytes"], tenant=row["tenant"],
        tier=row["tier"], eviction=row["eviction"], key_version=row["key_version"])
    return BankInfo(
        spec=spec, count=int(row["count"]), used_bytes=int(row["used_bytes"]),
        frozen=bool(row["frozen"]), trained=bool(row["trained"]), checksum=row["checksum"],
        created_at=float(row["created_at"]), updated_at=float(row["updated_at"]))
