"""The engine: the in-process backend, built in layers.

    catalog.py    the SQL catalog: tenants, banks, quotas, usage, sessions (SQLAlchemy)
    banks.py      BankEngine: catalog + banks (admin and data rules, quotas, eviction)
    searching.py  one merged top-k over a stack of banks' searchers
    sessions.py   SessionManager: session banks on top of the engine
    stacks.py     StackLog: who searched which stack
    local.py      LocalMemory: all of it as one MemoryBackend
"""
from memoryd.engine.local import LocalMemory

__all__ = ["LocalMemory"]
