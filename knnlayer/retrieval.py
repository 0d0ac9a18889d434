"""Retrieval for KNNAttention: one memory search for all queries of a forward,
its results moved to the compute device as tensors.

Depends on the memory interface (memoryd.api) and the pure-numpy key facts
(memoryd.keyspace) only: nothing here loads faiss or the storage engine, so
a model talking to a remote daemon never imports them.

    bank_facts(specs, ...)           what forward must know of its banks
    retrieve(memory, banks, facts, q, ...) -> Retrieved   (banks: a stack or api.RowStacks)
    to_device(array, device)         numpy -> tensor, through pinned memory on CUDA
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from memoryd.api import BankQuery, BankSpec, MemoryBackend, RowStacks, SearchResult
from memoryd.arrays import BFLOAT16
from memoryd.keyspace import exact_scores, is_product_keys, key_vectors, subkeys_of


@dataclass(frozen=True)
class BankFacts:
    """What forward needs to know of its banks, read once by bank_facts."""

    metric: str                            # "l2" or "ip", shared by all banks
    # Sub-key tables when all banks are product-key banks, else None. Product
    # keys are a pure function of (n, seed), so their vectors are rebuilt from
    # the returned ids instead of crossing the wire (4096 queries x k=32 x
    # 128-d fp32 keys would be 64 MiB).
    pk_tables: list[np.ndarray] | None
    # Whether every bank's scores are exact distances of the returned keys
    # (Flat, HNSW, IVF..,Flat, product keys): then q . k may be read off the
    # scores. A quantised index (PQ, SQ) scores approximately: keys are fetched.
    exact_scores: bool = True


def bank_facts(specs: Sequence[BankSpec], key_dim: int, value_dim: int,
               tabled: frozenset[str] = frozenset(), plain: bool = True) -> BankFacts:
    """What forward must know of its banks, from their specs (read once by the
    module): ValueError unless each fits (key_dim; value_dim, unless a
    trainable table backs the bank: `tabled`) and all share a metric.

    plain: the search is one stack (no per-row banks), so product-key key
    vectors can be rebuilt by stack position.
    """
    for spec in specs:
        if spec.dim != key_dim:
            raise ValueError(f"bank '{spec.name}' holds {spec.dim}-d keys; this layer has "
                             f"key_dim {key_dim}")
        if spec.name not in tabled and spec.value_dim not in (0, value_dim):
            raise ValueError(f"bank '{spec.name}' holds {spec.value_dim}-d values; "
                             f"this layer has value_dim {value_dim}")
    metrics = {s.metric for s in specs}
    if len(metrics) > 1:
        raise ValueError(f"banks {[s.name for s in specs]} mix metrics {sorted(metrics)}; "
                         "one search needs one metric")
    product = plain and all(is_product_keys(s.index) for s in specs)
    tables = [subkeys_of(s.index, s.dim) for s in specs] if product else None
    return BankFacts(metric=specs[0].metric, pk_tables=tables,
                     exact_scores=all(exact_scores(s.index) for s in specs))


@dataclass
class Retrieved:
    """One search's results as tensors on the compute device."""

    ids: torch.Tensor                 # (N, H, k) int64, 0 where missing
    mask: torch.Tensor                # (N, H, k) bool, True where a result exists
    bank: torch.Tensor | None         # (N, H, k) int64 stack position, -1 where missing
                                      # (None unless tables: only they need it)
    keys: torch.Tensor | None         # (N, H, k, dk) module dtype, zeros where missing
    qk: torch.Tensor | None           # (N, H, k) q . k from the scores when keys is None
    values: torch.Tensor | None       # (N, H, k, dv) module dtype, None when all from the table


def retrieve(memory: MemoryBackend, banks: list[BankQuery] | RowStacks,
             facts: Callable[[], BankFacts], q: torch.Tensor, k: int, value_dim: int, *,
             keys: bool, values: bool, tables: dict[int, int], dtype: torch.dtype) -> Retrieved:
    """One memory.search for all N*H unit queries q (N, H, dk); results on q's device.

    banks: one stack for all rows, or per-row stacks (api.RowStacks, whose
    groups are consecutive rows of q: N*H query rows in all). facts() gives
    the banks' facts (read once, on first need: an empty batch asks memory
    nothing at all).

    keys=True: with the key vectors (fetched, or rebuilt for product keys);
    False: with q . k read off the scores instead (ip: the score; l2:
    (|q|^2 + 1 - d) / 2, keys being unit vectors), unless a bank's index
    quantises its keys (its scores are then not q . k). values: whether the
    memory's values are wanted; tables: {stack position: rows} of the
    trainable tables backing banks by position (ids must be below rows).
    The only host sync is moving the queries to the host; results travel
    back through pinned memory.
    """
    N, H, dk = q.shape
    device = q.device
    if N == 0:                                                     # nothing to ask
        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)
        return Retrieved(ids=zeros(0, H, k, dt=torch.long), mask=zeros(0, H, k, dt=torch.bool),
                         bank=zeros(0, H, k, dt=torch.long) if tables else None,
                         keys=zeros(0, H, k, dk), qk=None,
                         values=zeros(0, H, k, value_dim) if values else None)
    flat = q.detach().reshape(N * H, dk).to("cpu", torch.float32).numpy()  # (N*H, dk) host sync
    known = facts()
    keys = keys or not known.exact_scores                         # quantised: scores are not q . k
    pk = known.pk_tables
    res: SearchResult = memory.search(banks, flat, k, values=values, keys=keys and pk is None)
    ids = res.ids.reshape(N, H, k)                                 # (N, H, k) host int64
    mask = ids >= 0                                                # (N, H, k) host bool
    key_vectors_ = qk = None
    if keys:
        key_vectors_ = (res.keys if pk is None
                        else _rebuild_keys(pk, res.ids, res.bank, dk))       # (N*H, k, dk)
    else:
        scores = _unbiased(res.scores, res.bank, banks, known.metric)          # (N*H, k)
        qk = np.where(mask, _dot_of_scores(scores, known.metric, flat).reshape(N, H, k),
                      np.float32(0))                               # (N, H, k)
    pos = res.bank.reshape(N, H, k).astype(np.int64)               # (N, H, k) host
    for p, rows in tables.items():
        bad = (pos == p) & (ids >= rows)
        if bad.any():
            raise ValueError(f"bank at stack position {p} returned id {int(ids[bad].max())}, "
                             f"but its trainable value table has {rows} rows (ids 0..{rows - 1})")
    if values and (res.values is None or res.values.shape[-1] != value_dim):
        got = None if res.values is None else res.values.shape[-1]
        raise ValueError(f"the banks searched returned {got}-d values; "
                         f"this layer has value_dim {value_dim}")
    return Retrieved(
        ids=to_device(np.where(mask, ids, 0), device),                          # (N, H, k)
        mask=to_device(mask, device),                                           # (N, H, k)
        bank=to_device(pos, device) if tables else None,                        # (N, H, k)
        keys=(to_device(key_vectors_.reshape(N, H, k, dk), device, dtype)       # (N, H, k, dk)
              if key_vectors_ is not None else None),
        qk=to_device(qk, device, dtype) if qk is not None else None,           # (N, H, k)
        values=(to_device(res.values.reshape(N, H, k, value_dim), device, dtype)  # (N, H, k, dv)
                if values else None))


def _unbiased(scores: np.ndarray, bank: np.ndarray, banks: list[BankQuery] | RowStacks,
              metric: str) -> np.ndarray:
    """Scores (nq, k) with each bank's BankQuery.bias taken back out: a bias
    chooses which rows are retrieved, the softmax weighs them by q . k alone
    (so forward with and without a gradient agree)."""
    stacks, rows = (([banks], [len(scores)]) if not isinstance(banks, RowStacks)
                    else (banks.stacks, banks.rows))
    if not any(b.bias for s in stacks for b in s):
        return scores
    sign = -1.0 if metric == "ip" else 1.0                         # ip: bias was added
    shift = np.zeros(scores.shape, np.float32)                     # (nq, k)
    start = 0
    for stack, n in zip(stacks, rows):
        bias = np.array([b.bias for b in stack] + [0.0], np.float32)   # [-1] -> missing: 0
        shift[start:start + n] = sign * bias[bank[start:start + n]]
        start += n
    return scores + shift


def _dot_of_scores(scores: np.ndarray, metric: str, queries: np.ndarray) -> np.ndarray:
    """q . k (nq, k) from search scores (nq, k) of queries (nq, dk): ip scores are
    q . k; l2 scores are |q - k|^2 = |q|^2 + 1 - 2 q . k for the unit keys of
    this layer (|q| is 1 too, except for a zero query row, whose q . k is 0)."""
    if metric == "ip":
        return scores
    q_sq = np.einsum("nd,nd->n", queries, queries)[:, None]               # (nq, 1)
    return 0.5 * (q_sq + 1.0 - scores)


def _rebuild_keys(tables: list[np.ndarray], ids: np.ndarray, bank: np.ndarray, dk: int) -> np.ndarray:
    """Key vectors (nq, k, dk) of product-key results; zeros where missing."""
    out = np.zeros((*ids.shape, dk), np.float32)                           # (nq, k, dk)
    for b, sub in enumerate(tables):
        sel = bank == b
        if sel.any():
            out[sel] = key_vectors(sub, ids[sel])
    return out


_POOL: ThreadPoolExecutor | None = None


def search_pool() -> ThreadPoolExecutor:
    """Threads for background searches, shared by every layer of the process."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="knnlayer-search")
    return _POOL


def to_device(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy (float32/16, ml_dtypes bfloat16, int, bool) -> tensor on device, without a sync.

    On CUDA the rows are copied once into pinned host memory and sent with
    non_blocking=True; on CPU a writable array is used in place.
    """
    bf16 = a.dtype == BFLOAT16
    raw = a.view(np.int16) if bf16 else a                                  # torch has no ml_dtypes
    if device.type == "cuda":
        host = torch.empty(raw.shape, dtype=_TORCH_OF[raw.dtype], pin_memory=True)
        host.numpy()[...] = raw
        t = host.to(device, non_blocking=True)
    else:
        if not raw.flags.writeable or not raw.flags.c_contiguous:          # e.g. a wire buffer
            raw = np.array(raw)
        t = torch.from_numpy(raw)
        if t.device != device:
            t = t.to(device)
    if bf16:
        t = t.view(torch.bfloat16)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.float64): torch.float64, np.dtype(np.int16): torch.int16,
             np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
             np.dtype(np.bool_): torch.bool}
