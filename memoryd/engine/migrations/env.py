"""Alembic environment of the catalog.

memoryd passes its own open connection (config.attributes["connection"],
inside the transaction that holds the migration lock: see
memoryd.engine.database._migrate). The alembic command line instead names a
database with `-x url=...` (or sqlalchemy.url in an ini).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from memoryd.engine.schema import metadata

config = context.config


def _configure(**kw) -> None:
    context.configure(target_metadata=metadata, compare_type=True, **kw)


def run_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: sa.Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif config.attributes.get("connection") is not None:
    run_online(config.attributes["connection"])
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("name the catalog: alembic ... -x url=SQLALCHEMY_URL")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            run_online(conn)
    finally:
        engine.dispose()
