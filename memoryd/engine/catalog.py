"""The SQL catalog: tenants, banks, quotas and usage (SQLAlchemy Core).

SQLite file by default; any SQLAlchemy URL works (PostgreSQL later), so only
portable SQL is used. Quotas are enforced at admission: a write first
reserves its bytes with one conditional UPDATE

    UPDATE banks SET used_bytes = used_bytes + :n
     WHERE name = :bank AND (quota_bytes IS NULL OR used_bytes + :n <= quota_bytes)

(and the same on its tenant) inside one transaction, so concurrent writers
can never take usage above a quota. Deletes always succeed and release bytes.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event

from memoryd.api import BankInfo, BankSpec
from memoryd.errors import (AlreadyExists, FailedPrecondition, NotFound, QuotaExceeded, StorageFull,
                            StorageUnwritable)
from memoryd.sizes import describe_size

metadata = sa.MetaData()

tenants = sa.Table(
    "tenants", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("quota_bytes", sa.BigInteger, nullable=True),   # NULL: unlimited
    sa.Column("used_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
)

banks = sa.Table(
    "banks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("value_dim", sa.Integer, nullable=False),
    sa.Column("value_dtype", sa.String(16), nullable=False),
    sa.Column("metric", sa.String(8), nullable=False),
    sa.Column("index_spec", sa.String(256), nullable=False),
    sa.Column("shards", sa.Integer, nullable=False),
    sa.Column("quota_bytes", sa.BigInteger, nullable=True),   # NULL: unlimited
    sa.Column("used_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("count", sa.BigInteger, nullable=False, default=0),
    sa.Column("frozen", sa.Boolean, nullable=False, default=False),
    sa.Column("trained", sa.Boolean, nullable=False, default=False),
    sa.Column("checksum", sa.String(80), nullable=False, default=""),
    sa.Column("storage", sa.String(128), nullable=False),     # folder under banks/
    sa.Column("tier", sa.String(8), nullable=False, server_default="ram"),
    sa.Column("eviction", sa.String(8), nullable=False, server_default="reject"),
    sa.Column("key_version", sa.String(128), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),         # also the name of its bank
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("ttl_idle_s", sa.Float, nullable=True),
    sa.Column("ttl_absolute_s", sa.Float, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_used_at", sa.Float, nullable=False),
)

# API tokens (memoryd.auth.tokens): the secret is never stored, only its
# SHA-256; a revoked token keeps its row (revoked_at) so `token list` shows it.
tokens = sa.Table(
    "tokens", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, server_default=""),
    sa.Column("tenant", sa.String(64), nullable=True),          # NULL: admin, every tenant
    sa.Column("role", sa.String(8), nullable=False),            # read | write | admin
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)

usage = sa.Table(
    "usage", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bank", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("op", sa.String(16), nullable=False),            # create/add/remove/delete/...
    sa.Column("delta_bytes", sa.BigInteger, nullable=False),
    sa.Column("delta_items", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")     # readers never block the writer
    cur.execute("PRAGMA busy_timeout=10000")   # wait instead of 'database is locked'
    cur.execute("PRAGMA synchronous=NORMAL")   # WAL: commits survive a process crash, no fsync each
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Catalog:
    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url, future=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring a catalog written by an older memoryd up to this schema.

        Only additive changes happen between versions, and every added column
        has a server default, so ALTER TABLE ... ADD COLUMN is enough.
        """
        inspector = sa.inspect(self.engine)
        with self._tx() as c:
            for table in metadata.sorted_tables:
                have = {col["name"] for col in inspector.get_columns(table.name)}
                for col in table.columns:
                    if col.name not in have:
                        ddl = sa.schema.CreateColumn(col).compile(dialect=self.engine.dialect)
                        c.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """One transaction; a catalog the disk cannot take (full, read-only) is
        StorageFull / StorageUnwritable, and the transaction left undone."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.OperationalError as e:
            text = str(e.orig if e.orig is not None else e).lower()
            if "full" in text:
                raise StorageFull(f"the catalog's disk is full ({text}): the change was not made; "
                                  "stored data is unchanged and reads go on") from None
            if any(w in text for w in ("readonly", "read-only", "unable to open", "disk i/o")):
                raise StorageUnwritable(f"the catalog cannot be written ({text}): the change "
                                        "was not made; reads go on") from None
            raise

    # ---- banks ---------------------------------------------------------------
    def create_bank(self, spec: BankSpec, storage: str) -> BankInfo:
        now = time.time()
        with self._tx() as c:
            if c.execute(sa.select(banks.c.id).where(banks.c.name == spec.name)).first():
                raise AlreadyExists(f"bank '{spec.name}' already exists")
            self.ensure_tenant(c, spec.tenant)
            c.execute(banks.insert().values(
                name=spec.name, tenant=spec.tenant, kind=spec.kind, dim=spec.dim,
                value_dim=spec.value_dim, value_dtype=spec.value_dtype, metric=spec.metric,
                index_spec=spec.index, shards=spec.shards, quota_bytes=spec.quota_bytes,
                used_bytes=0, count=0, frozen=False, trained=False, checksum="",
                storage=storage, tier=spec.tier, eviction=spec.eviction,
                key_version=spec.key_version,
                created_at=now, updated_at=now))
            self._log(c, spec.name, spec.tenant, "create", 0, 0)
        return self.bank(spec.name)

    def bank(self, name: str) -> BankInfo:
        with self.engine.connect() as c:
            row = c.execute(sa.select(banks).where(banks.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"no bank named '{name}'")
        return _info(row)

    def list_banks(self, tenant: str | None = None) -> list[BankInfo]:
        q = sa.select(banks).order_by(banks.c.name)
        if tenant:
            q = q.where(banks.c.tenant == tenant)
        with self.engine.connect() as c:
            return [_info(r) for r in c.execute(q).mappings()]

    def storages(self) -> dict[str, str]:
        with self.engine.connect() as c:
            return dict(c.execute(sa.select(banks.c.name, banks.c.storage)).all())

    def delete_bank(self, name: str) -> int:
        """Drop the bank's row and give its bytes back; returns them."""
        with self._tx() as c:
            row = c.execute(sa.select(banks.c.used_bytes, banks.c.tenant, banks.c.count)
                            .where(banks.c.name == name)).first()
            if row is None:
                raise NotFound(f"no bank named '{name}'")
            used, tenant, count = row
            c.execute(banks.delete().where(banks.c.name == name))
            self._tenant_delta(c, tenant, -used)
            self._log(c, name, tenant, "delete", -used, -count)
        return int(used)

    def update_bank(self, name: str, **fields) -> BankInfo:
        with self._tx() as c:
            r = c.execute(banks.update().where(banks.c.name == name)
                          .values(**fields, updated_at=time.time()))
            if r.rowcount == 0:
                raise NotFound(f"no bank named '{name}'")
        return self.bank(name)

    # ---- quota ---------------------------------------------------------------
    def reserve(self, name: str, nbytes: int, items: int, op: str = "add") -> None:
        """Take nbytes of the bank's (and its tenant's) quota, or QuotaExceeded.

        Negative nbytes (a write that shrinks the bank) always succeeds.
        """
        with self._tx() as c:
            b = banks.c
            cond = [b.name == name]
            if nbytes > 0:
                cond.append(sa.or_(b.quota_bytes.is_(None), b.used_bytes + nbytes <= b.quota_bytes))
            tenant = c.execute(banks.update().where(*cond).values(
                used_bytes=b.used_bytes + nbytes, count=b.count + items, updated_at=time.time())
                .returning(b.tenant)).scalar()
            if tenant is None:
                row = c.execute(sa.select(b.used_bytes, b.quota_bytes).where(b.name == name)).first()
                if row is None:
                    raise NotFound(f"no bank named '{name}'")
                raise QuotaExceeded(name, int(row[0]), int(row[1]), nbytes)
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
        """Set usage to what the bank really holds (after a restart or crash)."""
        with self._tx() as c:
            row = c.execute(sa.select(banks.c.used_bytes, banks.c.count, banks.c.tenant)
                            .where(banks.c.name == name)).first()
            if row is None or (row[0] == used_bytes and row[1] == count):
                return
            c.execute(banks.update().where(banks.c.name == name)
                      .values(used_bytes=used_bytes, count=count))
            self._tenant_delta(c, row[2], used_bytes - row[0], enforce=False)  # the truth wins
            self._log(c, name, row[2], "reconcile", used_bytes - row[0], count - row[1])

    # ---- tenants -------------------------------------------------------------------
    def ensure_tenant(self, c: sa.Connection, tenant: str) -> None:
        if not c.execute(sa.select(tenants.c.name).where(tenants.c.name == tenant)).first():
            c.execute(tenants.insert().values(name=tenant, quota_bytes=None, used_bytes=0,
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
        with self.engine.connect() as c:
            row = c.execute(sa.select(tenants).where(tenants.c.name == tenant)).mappings().first()
            if row is None:
                raise NotFound(f"no tenant named '{tenant}'")
            nbanks = c.execute(sa.select(sa.func.count()).select_from(banks)
                               .where(banks.c.tenant == tenant)).scalar_one()
            nsessions = c.execute(sa.select(sa.func.count()).select_from(sessions)
                                  .where(sessions.c.tenant == tenant)).scalar_one()
        return {**row, "banks": int(nbanks), "sessions": int(nsessions)}

    def tenant_names(self) -> list[str]:
        with self.engine.connect() as c:
            return list(c.execute(sa.select(tenants.c.name).order_by(tenants.c.name)).scalars())

    # ---- sessions ------------------------------------------------------------------
    def add_session(self, session_id: str, tenant: str, ttl_idle_s: float | None,
                    ttl_absolute_s: float | None, now: float) -> None:
        with self._tx() as c:
            c.execute(sessions.insert().values(
                id=session_id, tenant=tenant, ttl_idle_s=ttl_idle_s,
                ttl_absolute_s=ttl_absolute_s, created_at=now, last_used_at=now))

    def session(self, session_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(sessions).where(sessions.c.id == session_id)).mappings().first()
        return None if row is None else dict(row)

    def all_sessions(self) -> list[dict]:
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(sa.select(sessions).order_by(sessions.c.created_at))
                    .mappings()]

    def update_session(self, session_id: str, **fields) -> None:
        with self._tx() as c:
            c.execute(sessions.update().where(sessions.c.id == session_id).values(**fields))

    def drop_session(self, session_id: str) -> None:
        with self._tx() as c:
            c.execute(sessions.delete().where(sessions.c.id == session_id))

    # ---- backups ---------------------------------------------------------------------
    def copy_to(self, url: str, bank_names: set[str]) -> None:
        """Every table into a new catalog at url, keeping only the banks named
        (those a backup holds files for) and their sessions; one read
        transaction, so the copy is one state of the catalog."""
        target = sa.create_engine(url, future=True)
        try:
            metadata.create_all(target)
            with self.engine.connect() as src, target.begin() as dst:
                for table in metadata.sorted_tables:
                    rows = [dict(r) for r in src.execute(sa.select(table)).mappings()]
                    if table is banks:
                        rows = [r for r in rows if r["name"] in bank_names]
                    elif table is sessions:
                        rows = [r for r in rows if r["id"] in bank_names]
                    if rows:
                        dst.execute(table.insert(), rows)
        finally:
            target.dispose()

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
