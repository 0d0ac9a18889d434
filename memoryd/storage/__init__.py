"""Storage: one bank on disk and in memory, behind one interface (BankStore).

    interface.py     BankStore (what the engine may call), AddPlan
    bank.py          Bank: N shards of FAISS index + row files, one log, checkpoints
    wal.py           the write-ahead log of a bank: one record per write, ack levels
    files.py         crash-safe file writes (fsync, atomic rename, folder fsync)
    upgrade.py       opening banks written before the log
    shard.py         Shard: one shard's rows and index; searches with its payload
    segments.py      growing segments: rows searched exactly until sealed in the background
    rows.py          the row files of a shard (ids, keys, values, scores)
    faiss_index.py   index construction, training, sizes (the one faiss import)
    tiers.py         where an index lives: ram, mmap, gpu
    product_keys.py  ProductKeyBank: n^2 fixed keys, exact top-k in ~sqrt(K)
    locks.py         the readers/writer lock of a bank
"""
from __future__ import annotations

from pathlib import Path

from memoryd.api import BankSpec
from memoryd.keyspace import is_product_keys
from memoryd.storage.bank import Bank
from memoryd.storage.interface import AddPlan, BankStore
from memoryd.storage.product_keys import ProductKeyBank


def new_bank(path: Path, spec: BankSpec) -> BankStore:
    """The bank class a spec asks for (InvalidArgument if it cannot be built);
    call .create() or .open() on it."""
    cls = ProductKeyBank if is_product_keys(spec.index) else Bank
    return cls(path, spec)


__all__ = ["AddPlan", "Bank", "BankStore", "ProductKeyBank", "new_bank"]
