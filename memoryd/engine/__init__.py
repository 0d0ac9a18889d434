"""The engine: the in-process backend, built in layers.

    catalog.py    the SQL catalog: tenants, banks and their slices, quotas, usage, sessions
    schema.py     its tables (SQLAlchemy Core), one source for the Alembic migrations
    database.py   the database under it: engines, error mapping, migrations (migrations/)
    banks.py      BankEngine: catalog + banks (admin and data rules, quotas, eviction)
    searching.py  one merged top-k over a stack of banks' searchers
    sessions.py   SessionManager: session banks on top of the engine
    local.py      LocalMemory: all of it as one MemoryBackend
"""
from memoryd.engine.local import LocalMemory

__all__ = ["LocalMemory"]
