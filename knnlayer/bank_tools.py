"""Bank tools for training with memory: make a seeded random-key base bank,
and move a trainable value table into a bank and back.

All go through the memory interface in pieces of api.CHUNK_ROWS rows, so
they work against any backend (in-process or a daemon).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from memoryd.api import CHUNK_ROWS, BankInfo, BankSpec, MemoryBackend
from knnlayer.retrieval import to_device


def _pieces(n: int):
    """(start, end, ids) of consecutive pieces of ids 0..n-1."""
    for start in range(0, n, CHUNK_ROWS):
        end = min(n, start + CHUNK_ROWS)
        yield start, end, np.arange(start, end, dtype=np.int64)


def create_base_bank(memory: MemoryBackend, name: str, ntotal: int, key_dim: int,
                     value_dim: int, *, values: Any = None, seed: int = 0,
                     kind: str = "base", index: str = "Flat", metric: str = "l2",
                     value_dtype: str = "float32", **spec: Any) -> BankInfo:
    """Create bank `name` holding `ntotal` seeded random unit keys with ids 0..ntotal-1.

    index="product-keys" makes a product-key bank (exact top-k at ~sqrt(ntotal)
    cost; ntotal must be a square): its keys are the product of two seeded
    sub-key tables built by the bank, so only the values are sent.

    values: an (ntotal, value_dim) array/tensor (e.g. `attn.value_table.weight`,
    so the bank starts equal to the table), or None for seeded N(0, 1) values;
    value_dim=0 makes a keys-only bank (values must then be None).
    Returns the BankInfo after the adds.
    """
    if values is not None and value_dim == 0:
        raise ValueError("a keys-only bank (value_dim=0) takes no values")
    if values is not None:
        values = values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
        if values.shape != (ntotal, value_dim):
            raise ValueError(f"values must be ({ntotal}, {value_dim}); got {tuple(values.shape)}")
    rng = np.random.default_rng(seed)
    product = index.startswith("product-keys")
    if product:  # keys = product of 2 x sqrt(ntotal) seeded sub-keys, made by the bank
        n = math.isqrt(ntotal)
        if n * n != ntotal:
            raise ValueError(f"product keys need a square ntotal (n^2); got {ntotal}")
        if index == "product-keys":
            index = f"product-keys:{n}|seed={seed}"
    memory.create_bank(BankSpec(name=name, dim=key_dim, value_dim=value_dim, kind=kind,
                                index=index, metric=metric, value_dtype=value_dtype, **spec))
    for start, end, ids in _pieces(ntotal):
        if value_dim == 0:
            vals = None
        elif values is None:
            vals = rng.standard_normal((end - start, value_dim), dtype=np.float32)  # (n, dv)
        else:
            vals = values[start:end]                                          # (n, dv)
        if product:
            if vals is not None:
                memory.update_values(name, ids, vals)
            continue
        keys = rng.standard_normal((end - start, key_dim), dtype=np.float32)  # (n, dk)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        memory.add(name, keys, vals, ids=ids)
    return memory.bank_info(name)


@torch.no_grad()
def push_values(memory: MemoryBackend, bank: str, table: torch.Tensor) -> int:
    """Write table (ntotal, dv) as the values of ids 0..ntotal-1 of bank; rows updated."""
    updated = 0
    for start, end, ids in _pieces(table.shape[0]):
        updated += memory.update_values(bank, ids, table[start:end].float())
    if updated != table.shape[0]:
        raise ValueError(f"bank '{bank}' holds only {updated} of ids 0..{table.shape[0] - 1}")
    return updated


@torch.no_grad()
def load_values(memory: MemoryBackend, bank: str, table: torch.Tensor) -> None:
    """Copy the values of ids 0..ntotal-1 of bank into table (ntotal, dv), in place."""
    for start, end, ids in _pieces(table.shape[0]):
        got = memory.get(bank, ids, values=True)
        if not got.found.all():
            missing = start + int(np.flatnonzero(~got.found)[0])
            raise ValueError(f"bank '{bank}' has no row with id {missing}")
        table[start:end].copy_(to_device(got.values, table.device, table.dtype))
