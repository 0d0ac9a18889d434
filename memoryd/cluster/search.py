"""One search over shards: what each shard is asked (plan, caps), and one
answer from theirs (merge).


Each shard searched its slices of the stack's banks (each bank limited to its
own k, as on one process) and returned its best k. The merge keeps, per row,
the best k of all of those, but at most k_b from bank b: a shard's best k may
hold rows of bank b that another shard's slice beats, and only the cut per
bank after the union gives bank b's true best k_b. This is exact: a result in
the one-process answer has fewer than k better candidates among the true
per-bank best, so no shard can have k better ones of its own and every shard
returns it (tests/test_sharded.py checks the equality on random banks).

Order: best score first by the metric (smallest L2, largest inner product),
ties to the bank named first, then to the lower shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from memoryd.api import BankQuery, SearchResult
from memoryd.topk import worst


@dataclass
class ShardAnswer:
    """What one shard returned, and where its rows and banks sit in the search."""

    result: SearchResult          # (m, k) over the shard's rows and sub-stacks
    rows: np.ndarray | None       # (m,) row of the search each of its rows is (None: all, in order)
    banks: np.ndarray             # (m, L) position in the row's full stack of each sub-stack entry


def merge(answers: list[ShardAnswer], nq: int, k: int, metric: str, caps: np.ndarray | None,
          *, values: bool, keys: bool, value_dim: int, dim: int) -> SearchResult:
    """The best k per row over the answers. caps (nq, B): k of each stack position
    (None: no bank has its own k below the search's k)."""
    parts = [_full(a, nq, k, metric) for a in answers]
    if not parts:
        return _empty(nq, k, metric, values, keys, value_dim, dim)
    ids = np.concatenate([p[0] for p in parts], axis=1)                        # (nq, S*k)
    scores = np.concatenate([p[1] for p in parts], axis=1)                     # (nq, S*k)
    bank = np.concatenate([p[2] for p in parts], axis=1)                       # (nq, S*k)
    rank = np.where(ids < 0, np.inf, scores if metric == "l2" else -scores)
    order = np.lexsort((bank, rank), axis=1)                                   # (nq, S*k)
    kept = None
    if caps is not None:
        order, kept = _capped(order, np.take_along_axis(bank, order, axis=1), caps)
    order = order[:, :k]                                                       # (nq, k)
    out_ids = np.take_along_axis(ids, order, axis=1)
    if kept is not None:
        out_ids = np.where(kept[:, :k], out_ids, -1)
    missing = out_ids < 0
    out = SearchResult(
        ids=np.where(missing, -1, out_ids).astype(np.int64),
        scores=np.where(missing, np.float32(worst(metric)),
                        np.take_along_axis(scores, order, axis=1)).astype(np.float32),
        bank=np.where(missing, -1, np.take_along_axis(bank, order, axis=1)).astype(np.int32))
    if values:
        out.values = _payload([a.result.values for a in answers], parts, 3, order, missing)
    if keys:
        out.keys = _payload([a.result.keys for a in answers], parts, 4, order, missing)
    if out.ids.shape[1] < k:                          # fewer candidates than k (one shard, k_b < k)
        out = _pad_to(out, k, metric)
    return out


def _full(a: ShardAnswer, nq: int, k: int, metric: str) -> tuple:
    """(ids, scores, bank, values, keys) of one answer as (nq, k) arrays: rows it
    was not asked are missing; bank positions are the full stacks'."""
    r = a.result
    m, kk = r.ids.shape
    local = np.where(r.ids >= 0, r.bank, 0).astype(np.int64)
    banks = np.broadcast_to(a.banks, (m, a.banks.shape[1]))
    gbank = np.take_along_axis(banks, np.minimum(local, banks.shape[1] - 1), axis=1)
    gbank = np.where(r.ids >= 0, gbank, -1)
    if a.rows is None and m == nq:
        return r.ids, r.scores, gbank, r.values, r.keys
    ids = np.full((nq, kk), -1, np.int64)
    scores = np.full((nq, kk), worst(metric), np.float32)
    bank = np.full((nq, kk), -1, np.int64)
    rows = np.arange(m) if a.rows is None else a.rows
    ids[rows], scores[rows], bank[rows] = r.ids, r.scores, gbank
    vals = None if r.values is None else _scatter(r.values, rows, nq)
    keys = None if r.keys is None else _scatter(r.keys, rows, nq)
    return ids, scores, bank, vals, keys


def _scatter(a: np.ndarray, rows: np.ndarray, nq: int) -> np.ndarray:
    out = np.zeros((nq, *a.shape[1:]), a.dtype)
    out[rows] = a
    return out


def _capped(order: np.ndarray, sorted_bank: np.ndarray, caps: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """(order with the candidates past their bank's own k moved behind the rest,
    kept: False where a position holds such a candidate)."""
    keep = np.ones(order.shape, bool)
    for b in range(caps.shape[1]):
        is_b = sorted_bank == b
        keep &= ~(is_b & (np.cumsum(is_b, axis=1) > caps[:, b:b + 1]))
    first = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(order, first, axis=1), np.take_along_axis(keep, first, axis=1)


def _payload(arrays: list, parts: list, slot: int, order: np.ndarray,
             missing: np.ndarray) -> np.ndarray | None:
    """values (slot 3) or keys (slot 4) of the merged rows; zeros where missing."""
    held = [p[slot] for p in parts if p[slot] is not None]
    if not held:
        return None
    dtypes = {a.dtype for a in held}
    dtype = held[0].dtype if len(dtypes) == 1 else np.dtype(np.float32)
    width = held[0].shape[2]
    cols = [p[slot].astype(dtype, copy=False) if p[slot] is not None
            else np.zeros((*p[0].shape, width), dtype) for p in parts]
    allv = np.concatenate(cols, axis=1)                                        # (nq, S*k, w)
    out = np.take_along_axis(allv, order[:, :, None], axis=1)                  # (nq, k, w)
    out[missing] = 0
    return np.ascontiguousarray(out)


def _pad_to(r: SearchResult, k: int, metric: str) -> SearchResult:
    nq, m = r.ids.shape
    pad = ((0, 0), (0, k - m))
    return SearchResult(
        ids=np.pad(r.ids, pad, constant_values=-1),
        scores=np.pad(r.scores, pad, constant_values=worst(metric)),
        bank=np.pad(r.bank, pad, constant_values=-1),
        values=None if r.values is None else np.pad(r.values, pad + ((0, 0),)),
        keys=None if r.keys is None else np.pad(r.keys, pad + ((0, 0),)))


def _empty(nq: int, k: int, metric: str, values: bool, keys: bool, value_dim: int,
           dim: int) -> SearchResult:
    return SearchResult(
        ids=np.full((nq, k), -1, np.int64), scores=np.full((nq, k), worst(metric), np.float32),
        bank=np.full((nq, k), -1, np.int32),
        values=np.zeros((nq, k, value_dim), np.float32) if values and value_dim else None,
        keys=np.zeros((nq, k, dim), np.float32) if keys else None)


# ---- what each shard is asked ---------------------------------------------------------

def plan(groups: list[list[BankQuery]], counts: list[int] | None, n: int,
          home: Callable[[str], int | None]) -> dict[int, tuple]:
    """{shard: (sub-stacks, rows, posmap)} of a search: the banks each shard holds,
    the query rows it answers and where its stack entries sit in the full stacks."""
    starts = None if counts is None else np.concatenate([[0], np.cumsum(counts)])
    width = max(len(g) for g in groups)
    plan = {}
    for q in range(n):
        subs, maps, rows, cnts = [], [], [], []
        for gi, g in enumerate(groups):
            pos = [i for i, b in enumerate(g) if home(b.name) in (None, q)]
            if not any(g[i].include for i in pos):
                continue
            subs.append(tuple(g[i] for i in pos))
            maps.append(pos + [0] * (width - len(pos)))
            if counts is not None:
                rows.append(np.arange(starts[gi], starts[gi + 1]))
                cnts.append(counts[gi])
        if not subs:
            continue
        if counts is None:
            plan[q] = (subs, None, np.asarray([maps[0]], np.int64))
        else:
            per_row = np.repeat(np.asarray(maps, np.int64), cnts, axis=0)         # (m, width)
            plan[q] = (tuple(subs), {"rows": np.concatenate(rows).astype(np.int64),
                                     "counts": cnts}, per_row)
    return plan


def caps(groups: list[list[BankQuery]], counts: list[int] | None, k: int) -> np.ndarray | None:
    """(nq or 1, B) k of each stack position, or None when no bank's own k is below k."""
    if not any(b.k is not None and b.k < k for g in groups for b in g):
        return None
    width = max(len(g) for g in groups)
    per = np.asarray([[(b.k if b.k is not None else k) if b.include else 0 for b in g]
                      + [0] * (width - len(g)) for g in groups], np.int64)
    return per if counts is None else np.repeat(per, counts, axis=0)
