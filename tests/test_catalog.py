"""The catalog (memoryd.engine.catalog) on SQLite and on PostgreSQL: bank
slices of several shard processes over one catalog, their totals, quotas,
the Alembic migrations (head equals the tables; a catalog written before
Alembic upgrades keeping every row), processes creating one bank at once,
a LocalMemory on PostgreSQL, and the errors of a server that cannot be
reached or written.

The PostgreSQL half needs MEMORYD_TEST_PG_URL (tests/pg_util.py; ./dev test
starts a server), and is skipped without it except under CI.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from memoryd import errors
from memoryd.api import BankSpec
from memoryd.engine import catalog as cat
from memoryd.engine import database, schema
from memoryd.engine.catalog import Catalog

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def two(url):
    """Shard 0 and shard 1 over one catalog."""
    a, b = Catalog(url), Catalog(url, shard=1)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def spec(name="x", **kw) -> BankSpec:
    return BankSpec(name, dim=4, value_dim=2, **kw)


def usage_ops(c: Catalog, bank: str) -> list[tuple[str, int, int]]:
    with c.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(schema.usage.c.op, schema.usage.c.delta_bytes, schema.usage.c.delta_items)
            .where(schema.usage.c.bank == bank).order_by(schema.usage.c.id))]


# ---- slices ----------------------------------------------------------------------------

def test_slices_create_attach_delete(two):
    a, b = two
    info = a.create_bank(spec(tenant="acme"), "x-a")
    assert (info.count, info.used_bytes, info.spec.tenant) == (0, 0, "acme")
    assert a.has_slice("x") and not b.has_slice("x")
    assert a.storages() == {"x": "x-a"} and b.storages() == {}
    with pytest.raises(errors.NotFound):
        b.slice("x")
    with pytest.raises(errors.AlreadyExists, match="^bank 'x' already exists$"):
        a.create_bank(spec(tenant="acme"), "x-a2")
    with pytest.raises(errors.AlreadyExists, match="another shape.*dim 4 \\(not 5\\)"):
        b.create_bank(BankSpec("x", dim=5, value_dim=2, tenant="acme"), "x-b")
    with pytest.raises(errors.AlreadyExists, match="another shape"):
        b.create_bank(spec(tenant="acme", quota_bytes=10), "x-b")
    assert not b.has_slice("x")                                # a refused attach left nothing

    b.create_bank(spec(tenant="acme"), "x-b")                  # attach
    assert b.storages() == {"x": "x-b"} and a.storages() == {"x": "x-a"}
    assert [(s["shard"], s["storage"]) for s in a.slices("x")] == [(0, "x-a"), (1, "x-b")]
    assert len(a.list_banks()) == len(b.list_banks("acme")) == 1
    assert a.tenant("acme")["banks"] == 1

    a.reserve("x", 100, 1)
    b.reserve("x", 250, 2)
    assert b.delete_bank("x") == 250                           # the row stays with a's slice
    info = a.bank("x")
    assert (info.used_bytes, info.count) == (100, 1) and a.tenant("acme")["used_bytes"] == 100
    with pytest.raises(errors.NotFound, match="shard 1"):
        b.delete_bank("x")
    with pytest.raises(errors.NotFound):
        b.reserve("x", 1, 1)                                   # no slice here: refused whole
    assert a.bank("x").used_bytes == 100
    assert a.delete_bank("x") == 100                           # the last slice takes the row
    for c in (a, b):
        with pytest.raises(errors.NotFound):
            c.bank("x")
    assert a.tenant("acme")["used_bytes"] == 0 and a.list_banks() == []
    assert [op for op, *_ in usage_ops(a, "x")] == ["create", "attach", "add", "add", "delete",
                                                     "delete"]


def test_totals_quotas_and_reconcile(two):
    a, b = two
    a.create_bank(spec(tenant="acme", quota_bytes=1000), "x-a")
    b.create_bank(spec(tenant="acme", quota_bytes=1000), "x-b")
    a.reserve("x", 300, 3)
    b.reserve("x", 500, 5)
    assert (a.bank("x").used_bytes, a.bank("x").count) == (800, 8)
    assert (a.slice("x")["used_bytes"], b.slice("x")["used_bytes"]) == (300, 500)

    with pytest.raises(errors.QuotaExceeded) as q:             # the LOGICAL bank's numbers
        a.reserve("x", 201, 1)
    assert (q.value.scope, q.value.used, q.value.limit, q.value.requested) == ("bank", 800, 1000, 201)
    a.reserve("x", 200, 1)                                     # exactly to the quota
    assert a.bank("x").used_bytes == 1000

    a.set_quota("x", None)
    a.set_tenant_quota("acme", 1100)
    with pytest.raises(errors.QuotaExceeded) as q:
        b.reserve("x", 101, 1)
    assert (q.value.scope, q.value.used, q.value.limit) == ("tenant", 1000, 1100)
    assert b.slice("x")["used_bytes"] == 500 and b.bank("x").used_bytes == 1000  # undone whole

    b.release("x", 400, 4)
    assert (b.slice("x")["used_bytes"], b.slice("x")["count"]) == (100, 1)
    assert b.bank("x").used_bytes == 600 and b.tenant("acme")["used_bytes"] == 600

    b.reconcile("x", 5000, 7)                                  # the truth wins over the quota
    assert (b.slice("x")["used_bytes"], b.slice("x")["count"]) == (5000, 7)
    assert (a.slice("x")["used_bytes"], a.slice("x")["count"]) == (500, 4)
    info = a.bank("x")
    assert (info.used_bytes, info.count) == (5500, 11) and a.tenant("acme")["used_bytes"] == 5500
    assert usage_ops(b, "x")[-1] == ("reconcile", 4900, 6)
    n = len(usage_ops(b, "x"))
    b.reconcile("x", 5000, 7)                                  # already true: nothing written
    assert len(usage_ops(b, "x")) == n
    with pytest.raises(errors.QuotaExceeded):
        a.reserve("x", 1, 1)


def test_trained_checksum_frozen(two):
    """trained: some slice is (one without rows may never train: the bank
    searches all the same); checksum: of every slice, once each has one."""
    a, b = two
    a.create_bank(spec(), "x-a")
    b.create_bank(spec(), "x-b")
    assert (a.bank("x").trained, a.bank("x").checksum) == (False, "")
    b.delete_bank("x")
    a.update_bank("x", trained=True, checksum="sha256:aa")
    assert (a.bank("x").trained, a.bank("x").checksum) == (True, "sha256:aa")   # one slice: its own
    b.create_bank(spec(), "x-b")
    assert (a.bank("x").trained, a.bank("x").checksum) == (True, "")   # b's slice has no checksum
    info = b.update_bank("x", trained=True, checksum="sha256:bb", frozen=True)
    assert info.trained and info.frozen
    assert info.checksum == cat.combined_checksum([(0, "sha256:aa"), (1, "sha256:bb")])
    assert info.checksum.startswith("sha256:") and len(info.checksum) == 71
    assert (a.slice("x")["checksum"], b.slice("x")["checksum"]) == ("sha256:aa", "sha256:bb")
    assert a.bank("x").frozen                                  # logical: one row for all
    b.delete_bank("x")
    assert (a.bank("x").trained, a.bank("x").checksum) == (True, "sha256:aa")
    with pytest.raises(errors.NotFound):
        b.update_bank("x", trained=False)


def test_combined_checksum():
    assert cat.combined_checksum([(3, "sha256:ab")]) == "sha256:ab"
    assert cat.combined_checksum([(0, "sha256:ab"), (1, "")]) == ""
    two = cat.combined_checksum([(1, "sha256:cd"), (0, "sha256:ab")])
    assert two == cat.combined_checksum([(0, "sha256:ab"), (1, "sha256:cd")])   # shard order
    assert two != cat.combined_checksum([(0, "sha256:cd"), (1, "sha256:ab")])
    assert not cat.combined_checksum([(0, "ab"), (1, "cd")]).startswith("sha256:")


def test_sessions_name_their_shard(two):
    a, b = two
    a.add_session("s-1", "t", 5.0, None, 1.0)                  # positional, as callers do
    b.add_session("s-2", "t", None, None, 2.0)
    a.add_session("s-3", "t", None, None, 3.0, shard=1)
    assert [r["id"] for r in a.all_sessions()] == ["s-1", "s-2", "s-3"]
    assert [r["id"] for r in a.all_sessions(shard=1)] == ["s-2", "s-3"]
    assert a.session("s-1")["shard"] == 0 and a.session("s-1")["ttl_idle_s"] == 5.0


def test_a_backup_copy_is_one_process(two, tmp_path):
    a, b = two
    for c, storage in ((a, "x-a"), (b, "x-b")):
        c.create_bank(spec(tenant="acme"), storage)
    b.create_bank(spec("y", tenant="acme"), "y-b")             # only on shard 1
    a.reserve("x", 100, 1)
    b.reserve("x", 200, 2)
    b.reserve("y", 50, 1)
    b.add_session("y", "acme", None, None, 1.0)
    b.update_bank("x", trained=True, checksum="sha256:bb")
    b.copy_to(f"sqlite:///{tmp_path}/copy.db", {"x", "y"})
    copy = Catalog(f"sqlite:///{tmp_path}/copy.db")
    try:
        assert copy.storages() == {"x": "x-b", "y": "y-b"}
        assert [s["shard"] for s in copy.slices("x")] == [0]
        x = copy.bank("x")
        assert (x.used_bytes, x.count, x.trained, x.checksum) == (200, 2, True, "sha256:bb")
        assert copy.tenant("acme")["used_bytes"] == 250
        assert copy.session("y")["shard"] == 0
        copy.reserve("x", 10, 1)                               # a working single-process catalog
    finally:
        copy.close()
    a.copy_to(f"sqlite:///{tmp_path}/copy0.db", {"x", "y"})    # shard 0 holds no slice of y
    copy = Catalog(f"sqlite:///{tmp_path}/copy0.db")
    try:
        assert copy.storages() == {"x": "x-a"} and copy.bank("x").used_bytes == 100
        assert [i.name for i in copy.list_banks()] == ["x"] and copy.session("y") is None
    finally:
        copy.close()


# ---- migrations ------------------------------------------------------------------------

def test_head_equals_the_tables(url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    Catalog(url).close()
    engine = database.make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, schema.metadata) == []
            assert ctx.get_current_revision() == database.head_revision() == "0002"
    finally:
        engine.dispose()
    database.upgrade(url)                                      # at head: a no-op


def old_metadata(with_key_version: bool = True) -> sa.MetaData:
    """The tables as memoryd wrote them before Alembic (create_all, no
    alembic_version); without key_version as a memoryd older still did."""
    md = sa.MetaData()
    sa.Table("tenants", md, sa.Column("name", sa.String(64), primary_key=True),
             sa.Column("quota_bytes", sa.BigInteger), sa.Column("used_bytes", sa.BigInteger, nullable=False),
             sa.Column("created_at", sa.Float, nullable=False))
    cols = [sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("name", sa.String(64), nullable=False, unique=True),
            sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
            sa.Column("kind", sa.String(16), nullable=False), sa.Column("dim", sa.Integer, nullable=False),
            sa.Column("value_dim", sa.Integer, nullable=False),
            sa.Column("value_dtype", sa.String(16), nullable=False),
            sa.Column("metric", sa.String(8), nullable=False),
            sa.Column("index_spec", sa.String(256), nullable=False),
            sa.Column("shards", sa.Integer, nullable=False), sa.Column("quota_bytes", sa.BigInteger),
            sa.Column("used_bytes", sa.BigInteger, nullable=False),
            sa.Column("count", sa.BigInteger, nullable=False),
            sa.Column("frozen", sa.Boolean, nullable=False), sa.Column("trained", sa.Boolean, nullable=False),
            sa.Column("checksum", sa.String(80), nullable=False),
            sa.Column("storage", sa.String(128), nullable=False),
            sa.Column("tier", sa.String(8), nullable=False, server_default="ram"),
            sa.Column("eviction", sa.String(8), nullable=False, server_default="reject"),
            sa.Column("created_at", sa.Float, nullable=False), sa.Column("updated_at", sa.Float, nullable=False)]
    if with_key_version:
        cols.insert(-2, sa.Column("key_version", sa.String(128), nullable=False, server_default=""))
    sa.Table("banks", md, *cols)
    sa.Table("sessions", md, sa.Column("id", sa.String(64), primary_key=True),
             sa.Column("tenant", sa.String(64), nullable=False), sa.Column("ttl_idle_s", sa.Float),
             sa.Column("ttl_absolute_s", sa.Float), sa.Column("created_at", sa.Float, nullable=False),
             sa.Column("last_used_at", sa.Float, nullable=False))
    sa.Table("tokens", md, sa.Column("id", sa.String(32), primary_key=True),
             sa.Column("name", sa.String(64), nullable=False, server_default=""),
             sa.Column("tenant", sa.String(64)), sa.Column("role", sa.String(8), nullable=False),
             sa.Column("secret_sha256", sa.String(64), nullable=False),
             sa.Column("created_at", sa.Float, nullable=False), sa.Column("revoked_at", sa.Float))
    sa.Table("usage", md, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("bank", sa.String(64), nullable=False), sa.Column("tenant", sa.String(64), nullable=False),
             sa.Column("op", sa.String(16), nullable=False),
             sa.Column("delta_bytes", sa.BigInteger, nullable=False),
             sa.Column("delta_items", sa.BigInteger, nullable=False), sa.Column("at", sa.Float, nullable=False))
    return md


@pytest.mark.parametrize("with_key_version", [True, False], ids=["today", "older"])
def test_a_catalog_from_before_alembic_upgrades(url, with_key_version):
    md = old_metadata(with_key_version)
    engine = database.make_engine(url)
    bank = dict(name="old", tenant="acme", kind="domain", dim=4, value_dim=2, value_dtype="float32",
                metric="l2", index_spec="Flat", shards=1, quota_bytes=10_000, used_bytes=1234,
                count=12, frozen=True, trained=True, checksum="sha256:0ld", storage="old-abc",
                tier="ram", eviction="reject", created_at=1.0, updated_at=2.0)
    if with_key_version:
        bank["key_version"] = "kv1"
    try:
        md.create_all(engine)
        with engine.begin() as c:
            t = md.tables
            c.execute(t["tenants"].insert().values(name="acme", quota_bytes=50_000, used_bytes=1234,
                                                   created_at=1.0))
            c.execute(t["banks"].insert().values(**bank))
            c.execute(t["sessions"].insert().values(id="s-0123456789abcdef", tenant="acme",
                                                    ttl_idle_s=60.0, ttl_absolute_s=None,
                                                    created_at=1.0, last_used_at=1.5))
            c.execute(t["tokens"].insert().values(id="tok1", name="n", tenant="acme", role="read",
                                                  secret_sha256="ab" * 32, created_at=1.0,
                                                  revoked_at=None))
            c.execute(t["usage"].insert().values(bank="old", tenant="acme", op="add",
                                                 delta_bytes=1234, delta_items=12, at=1.0))
    finally:
        engine.dispose()

    c = Catalog(url)
    try:
        info = c.bank("old")
        assert (info.used_bytes, info.count, info.frozen, info.trained, info.checksum) == \
            (1234, 12, True, True, "sha256:0ld")
        assert info.spec.key_version == ("kv1" if with_key_version else "")
        assert info.spec.quota_bytes == 10_000 and info.created_at == 1.0
        assert c.slices("old") == [dict(bank="old", shard=0, storage="old-abc", used_bytes=1234,
                                        count=12, trained=True, checksum="sha256:0ld",
                                        updated_at=2.0)]
        assert c.storages() == {"old": "old-abc"}
        t = c.tenant("acme")
        assert (t["quota_bytes"], t["used_bytes"], t["banks"], t["sessions"]) == (50_000, 1234, 1, 1)
        assert c.all_sessions() == [dict(id="s-0123456789abcdef", tenant="acme", ttl_idle_s=60.0,
                                         ttl_absolute_s=None, created_at=1.0, last_used_at=1.5,
                                         shard=0)]
        with c.engine.connect() as conn:
            assert conn.execute(sa.select(schema.tokens.c.secret_sha256)).scalar_one() == "ab" * 32
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.usage)).scalar_one() == 1
            from alembic.migration import MigrationContext
            assert MigrationContext.configure(conn).get_current_revision() == "0002"
        c.reserve("old", 100, 1)
        assert c.slice("old")["used_bytes"] == c.bank("old").used_bytes == 1334
    finally:
        c.close()
    Catalog(url).close()                                       # and opens again as it is


def test_in_memory_sqlite_catalog():
    c = Catalog("sqlite://")
    try:
        c.create_bank(spec(), "x-1")
        c.reserve("x", 10, 1)
        assert c.bank("x").used_bytes == 10 and c.storages() == {"x": "x-1"}
    finally:
        c.close()


# ---- processes -------------------------------------------------------------------------

RACER = textwrap.dedent("""
    import json, os, sys, time
    from memoryd.api import BankSpec
    from memoryd import errors
    from memoryd.engine.catalog import Catalog

    url, shard, go, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    while not os.path.exists(go):
        time.sleep(0.002)
    c = Catalog(url, shard=shard)             # a fresh catalog: the migration races too
    made = []
    for i in range(8):
        name = f"b{i}"
        c.create_bank(BankSpec(name, dim=4, value_dim=2, tenant=f"t{i % 3}"), f"{name}-{shard}")
        c.reserve(name, 10 + shard, 1)
        made.append(name)
    with open(out, "w") as f:
        json.dump({"made": made, "storages": c.storages()}, f)
""")


def test_processes_create_one_bank_at_once(url, tmp_path):
    """Two shard processes open a fresh catalog (the migration is theirs) and
    create the same banks at the same moment: each ends with a slice, there
    is one row per bank, and the tenants they made once each."""
    script, go = tmp_path / "racer.py", tmp_path / "go"
    script.write_text(RACER)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), url, str(i), str(go), str(out)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for i, out in enumerate(outs)]
    time.sleep(1.0)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    for i, out in enumerate(outs):
        r = json.loads(out.read_text())
        assert r["storages"] == {f"b{j}": f"b{j}-{i}" for j in range(8)}
    c = Catalog(url)
    try:
        assert [b.name for b in c.list_banks()] == [f"b{j}" for j in range(8)]
        for j in range(8):
            assert [s["shard"] for s in c.slices(f"b{j}")] == [0, 1]
            assert (c.bank(f"b{j}").used_bytes, c.bank(f"b{j}").count) == (21, 2)
        assert c.tenant_names() == ["t0", "t1", "t2"]
        assert sum(c.tenant(f"t{k}")["used_bytes"] for k in range(3)) == 8 * 21
    finally:
        c.close()


# ---- a LocalMemory on PostgreSQL --------------------------------------------------------

def test_local_memory_on_postgresql(pg_url, tmp_path):
    from memoryd.engine import LocalMemory

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((20, 8)).astype(np.float32)
    vals = rng.standard_normal((20, 3)).astype(np.float32)
    m = LocalMemory(tmp_path / "data", catalog_url=pg_url)
    try:
        m.create_bank(BankSpec("pg", dim=8, value_dim=3, quota_bytes=10**6))
        ids = m.add("pg", keys, vals)
        res = m.search("pg", keys[:2], 1)
        np.testing.assert_array_equal(res.ids[:, 0], ids[:2])
        np.testing.assert_allclose(res.values[:, 0], vals[:2])
        used = m.bank_info("pg").used_bytes
        assert used > 0 and m.stats().catalog_url == pg_url
    finally:
        m.close()
    m = LocalMemory(tmp_path / "data", catalog_url=pg_url)
    try:
        info = m.bank_info("pg")
        assert (info.count, info.used_bytes) == (20, used)
        res = m.search("pg", keys[5:6], 1)
        assert res.ids[0, 0] == ids[5]
        m.delete_bank("pg")
        assert m.list_banks() == []
    finally:
        m.close()


# ---- errors ----------------------------------------------------------------------------

def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_an_unreachable_server_is_unavailable():
    url = f"postgresql+psycopg://memoryd:s3cr3t-pw@127.0.0.1:{closed_port()}/catalog"
    with pytest.raises(errors.Unavailable) as e:
        Catalog(url)
    assert "s3cr3t-pw" not in str(e.value)
    assert "postgresql+psycopg://memoryd:***@127.0.0.1:" in str(e.value)
    with pytest.raises(errors.Unavailable):
        database.upgrade(url)


def test_postgresql_sqlstates_map_to_domain_errors():
    class PgError(Exception):
        def __init__(self, sqlstate):
            super().__init__(f"pg {sqlstate}")
            self.sqlstate = sqlstate

    engine = database.make_engine("postgresql+psycopg://u:pw@127.0.0.1:1/x")   # never connects
    full = database._translate(engine, sa.exc.OperationalError("INSERT", {}, PgError("53100")), True)
    assert isinstance(full, errors.StorageFull)
    ro = database._translate(engine, sa.exc.InternalError("UPDATE", {}, PgError("25006")), True)
    assert isinstance(ro, errors.StorageUnwritable)
    gone = database._translate(engine, sa.exc.OperationalError("SELECT", {}, PgError("57P01")), False)
    assert isinstance(gone, errors.Unavailable) and "pw" not in str(gone).replace("***", "")
    assert database._translate(engine, sa.exc.IntegrityError("INSERT", {}, PgError("23505")), True) is None
    engine.dispose()


def test_postgresql_read_only_and_dropped_connections(pg_url):
    c = Catalog(pg_url)
    admin = sa.create_engine(sa.engine.make_url(pg_url).set(database="postgres"),
                             isolation_level="AUTOCOMMIT")
    db = sa.engine.make_url(pg_url).database
    try:
        c.create_bank(spec(), "x-a")
        with admin.connect() as a:                             # every connection of the catalog dies
            a.exec_driver_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              f"WHERE datname = '{db}' AND pid <> pg_backend_pid()")
        c.reserve("x", 10, 1)                                  # pool_pre_ping: a new one, no error
        with admin.connect() as a:
            a.exec_driver_sql(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
        c.engine.dispose()                                     # new connections read-only
        with pytest.raises(errors.StorageUnwritable, match="read-only"):
            c.reserve("x", 10, 1)
        assert c.bank("x").used_bytes == 10                    # reads go on
    finally:
        c.close()
        with admin.connect() as a:
            a.exec_driver_sql(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
        admin.dispose()
