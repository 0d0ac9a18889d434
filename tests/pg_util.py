"""PostgreSQL for the catalog tests.

MEMORYD_TEST_PG_URL names a server (an SQLAlchemy URL, e.g.
postgresql+psycopg://postgres@127.0.0.1:5432/postgres) whose user may
CREATE DATABASE; `./dev test` starts one when it can (.ci/postgres.sh).

    pg_url        fixture: the URL of a fresh, empty database of its own,
                  dropped after the test. Without MEMORYD_TEST_PG_URL the test
                  is skipped -- except under CI (env CI set), where it fails:
                  CI must run the PostgreSQL tests.
    fresh_database()   the same as a context manager (for helpers).
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest
import sqlalchemy as sa

ENV = "MEMORYD_TEST_PG_URL"


def server_url() -> str:
    """MEMORYD_TEST_PG_URL, or skip (fail under CI)."""
    url = os.environ.get(ENV, "")
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {ENV} is unset (./dev test sets it "
                        "through .ci/postgres.sh; did PostgreSQL fail to start?)")
        pytest.skip(f"no PostgreSQL: set {ENV} (./dev test starts one as root)")
    return url


@contextmanager
def fresh_database() -> Iterator[str]:
    base = sa.engine.make_url(server_url())
    name = f"memoryd_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped after the test."""
    with fresh_database() as url:
        yield url
