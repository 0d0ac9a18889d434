"""The database under the catalog: its engine (SQLite with its pragmas, or
PostgreSQL), the domain errors of a database that cannot be written or
reached, and the schema (memoryd.engine.schema) kept by Alembic
(memoryd/engine/migrations), run at open: see `upgrade` and `_migrate`.
"""
from __future__ import annotations

import importlib
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event

from memoryd.engine.schema import _AFTER_PRE_ALEMBIC, metadata
from memoryd.errors import FailedPrecondition, MemorydError, StorageFull, StorageUnwritable, Unavailable

log = logging.getLogger("memoryd")

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
PRE_ALEMBIC = "0001"                  # the revision of a catalog written before Alembic
PG_MIGRATION_LOCK = 0x6D656D6F7279    # pg_advisory_xact_lock key ("memory")

# Alembic logs at INFO at every open ("setup plugin ...", "Context impl
# SQLiteImpl."): quiet unless someone set its logger's level
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")     # readers never block the writer
    cur.execute("PRAGMA busy_timeout=10000")   # wait instead of 'database is locked'
    cur.execute("PRAGMA synchronous=NORMAL")   # WAL: commits survive a process crash, no fsync each
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _psycopg2_installed() -> bool:
    try:
        importlib.import_module("psycopg2")
    except ImportError:
        return False
    return True


def make_engine(url: str) -> sa.Engine:
    """The engine of a catalog URL: SQLite with its pragmas; PostgreSQL with
    pool_pre_ping (a server restart costs no request) and a connect timeout.
    A bare postgresql:// means psycopg (3) when psycopg2 is not installed."""
    u = sa.engine.make_url(url)
    kw: dict = {}
    if u.get_backend_name() == "postgresql":
        if u.drivername == "postgresql" and not _psycopg2_installed():
            u = u.set(drivername="postgresql+psycopg")
        kw["pool_pre_ping"] = True
        if "connect_timeout" not in u.query:
            kw["connect_args"] = {"connect_timeout": 10}
    try:
        engine = sa.create_engine(u, **kw)
    except ModuleNotFoundError as e:          # e.g. psycopg for postgresql+psycopg://
        raise FailedPrecondition(
            f"the catalog URL {u.render_as_string(hide_password=True)} needs the Python module "
            f"'{e.name}', which is not installed (PostgreSQL: pip install 'memoryd[postgres]')"
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def upgrade(url: str) -> None:
    """Bring the catalog at url to the newest schema (creating it if empty),
    as opening a Catalog does; for tools (backups, a cluster's launcher)."""
    engine = make_engine(url)
    try:
        _guarded(engine, lambda: _migrate(engine))
    finally:
        engine.dispose()


# ---- errors ----------------------------------------------------------------------------

def masked_url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _translate(engine: sa.Engine, e: sa.exc.DBAPIError, writing: bool) -> MemorydError | None:
    """The domain error of a database error, or None (a bug: re-raised as is).

    SQLite: by the message (disk full; read-only, unopenable). PostgreSQL
    (psycopg): by SQLSTATE -- 53100 disk full, 25006 read-only transaction;
    a server that cannot be reached, went away (class 08, 57P0x) or a
    connection found dead is Unavailable, naming the URL without its password.
    """
    orig = e.orig
    text = str(orig if orig is not None else e).strip()
    password = engine.url.password
    if password:
        text = text.replace(str(password), "***")
    low = text.lower()
    state = getattr(orig, "sqlstate", None)
    undone = "the change was not made; stored data is unchanged and reads go on" if writing \
        else "nothing was read"
    if engine.dialect.name == "sqlite":
        if not isinstance(e, sa.exc.OperationalError):
            return None
        if "full" in low:
            return StorageFull(f"the catalog's disk is full ({low}): {undone}")
        if any(w in low for w in ("readonly", "read-only", "unable to open", "disk i/o")):
            return StorageUnwritable(f"the catalog cannot be written ({low}): the change "
                                     "was not made; reads go on")
        return None
    if state == "53100":
        return StorageFull(f"the catalog's disk is full ({text}): {undone}")
    if state == "25006":
        return StorageUnwritable(f"the catalog at {masked_url(engine)} is read-only ({text}): "
                                 "the change was not made; reads go on")
    if e.connection_invalidated or (isinstance(e, sa.exc.OperationalError) and (
            state is None or state.startswith("08") or state.startswith("57P"))):
        first = text.splitlines()[0] if text else type(orig).__name__
        return Unavailable(f"the catalog database {masked_url(engine)} cannot be reached "
                           f"({first}): nothing was done; try again once it is back")
    return None


@contextmanager
def _mapped_errors(engine: sa.Engine, writing: bool = True) -> Iterator[None]:
    try:
        yield
    except sa.exc.DBAPIError as e:
        mapped = _translate(engine, e, writing)
        if mapped is None:
            raise
        raise mapped from None


def _guarded(engine: sa.Engine, fn) -> None:
    with _mapped_errors(engine):
        fn()


# ---- the schema: Alembic ---------------------------------------------------------------

def _alembic_config(conn: sa.Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)   # type: ignore[arg-type]
    return ScriptDirectory.from_config(cfg).get_current_head()


def _migrate(engine: sa.Engine, lock: bool = True) -> None:
    """Bring the database to head, one process at a time.

    Fresh: upgrade head. Tables but no alembic_version (written before
    Alembic, maybe by a memoryd older still, missing columns): add the
    missing columns the old way, stamp 0001, upgrade head. Else upgrade head.
    Afterwards a column of the tables still missing (dropped by hand) is
    added back the old way. The lock: pg_advisory_xact_lock on PostgreSQL
    (held by the migrating transaction), an flock on <db>.migrate-lock
    beside a SQLite file.
    """
    from alembic import command
    from alembic.migration import MigrationContext

    with (_file_lock(engine) if lock else nullcontext()), engine.begin() as conn:
        if conn.dialect.name == "postgresql" and lock:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        names = set(sa.inspect(conn).get_table_names())
        cfg = _alembic_config(conn)
        if "alembic_version" not in names and names & set(metadata.tables):
            log.info("catalog %s: written before migrations; upgrading it", masked_url(engine))
            _add_missing_columns(conn, pre_alembic=True)
            command.stamp(cfg, PRE_ALEMBIC)
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision()
        if before and before != after:
            log.info("catalog %s: upgraded from revision %s to %s", masked_url(engine), before, after)
        _add_missing_columns(conn)


def _add_missing_columns(conn: sa.Connection, pre_alembic: bool = False) -> None:
    """Bring a catalog written by an older memoryd up to this schema: the
    upgrade path from before Alembic (pre_alembic: only the columns of
    revision 0001, the rest are Alembic's), and afterwards the repair of a
    column missing at head.

    Only additive changes happened before Alembic, and every added column has
    a server default, so ALTER TABLE ... ADD COLUMN is enough.
    """
    inspector = sa.inspect(conn)
    present = set(inspector.get_table_names())
    for table in metadata.sorted_tables:
        later = _AFTER_PRE_ALEMBIC.get(table.name, set()) if pre_alembic else set()
        if table.name not in present or later is None:
            continue
        have = {col["name"] for col in inspector.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and col.name not in later:
                ddl = sa.schema.CreateColumn(col).compile(dialect=conn.dialect)
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}"))


@contextmanager
def _file_lock(engine: sa.Engine) -> Iterator[None]:
    """An exclusive flock on <db>.migrate-lock beside a SQLite file (none for
    in-memory SQLite or other databases, nor where the lock file cannot be
    made: a read-only folder, where no migration can write anyway)."""
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    if not db or db == ":memory:" or db.startswith("file:"):
        yield
        return
    import fcntl

    path = Path(db).parent / (Path(db).name + ".migrate-lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
