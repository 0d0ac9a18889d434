"""Merging per-shard / per-bank top-k lists into one top-k.

The merge direction follows the metric: smallest first for L2 distances,
largest first for inner products (faiss contrib's client/server merge gets
this wrong for IP). Missing results (-1 from FAISS) sort last. Ties keep the
order of the parts (a stable sort), so the bank named first wins them.

    merge_topk      (scores, ids) lists only: what an index's pieces return
    merge_results   SearchResults with their payload (values, keys) carried
                    along: what a stack search over shards returns, so that no
                    shard is asked twice (search, then gather)
"""
from __future__ import annotations

import numpy as np

from memoryd.api import SearchResult


def worst(metric: str) -> float:
    return np.inf if metric == "l2" else -np.inf


def _order(D: np.ndarray, I: np.ndarray, k: int, metric: str, parts: int
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """(D with missing results at the metric's worst, the best-k order or None for as-is)."""
    D = np.where(I < 0, worst(metric), D).astype(np.float32, copy=False)
    if D.shape[1] <= k and parts == 1:
        return D, None
    key = D if metric == "l2" else -D
    return D, np.argsort(key, axis=1, kind="stable")[:, :k]                    # (nq, k)


def _pad(a: np.ndarray, k: int, fill) -> np.ndarray:
    """a (nq, m, ...) padded with fill to (nq, k, ...) along axis 1."""
    if a.shape[1] >= k:
        return a
    pad = [(0, 0), (0, k - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, constant_values=fill)


def _label(label) -> np.int32 | np.ndarray:
    """A part's label as np.full/np.where take it: one int for the whole part, or
    (nq,) per-row labels (a row-stack search: each row's own stack) as (nq, 1)."""
    if np.ndim(label) == 0:
        return np.int32(label)
    return np.asarray(label, np.int32).reshape(-1, 1)


def _merge(scores: list[np.ndarray], ids: list[np.ndarray], labels: list, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(scores, ids, source, order) of the best k over parts of (nq, k_i) arrays;
    order (nq, k) indexes their concatenation (None: taken as they are)."""
    D = _pad(np.concatenate(scores, axis=1), k, 0)                            # (nq, >= k)
    I = _pad(np.concatenate(ids, axis=1), k, -1)                              # (nq, >= k)
    S = _pad(np.concatenate([np.full(i.shape, _label(s), np.int32) for i, s in zip(ids, labels)],
                            axis=1), k, 0)
    D, order = _order(D, I, k, metric, len(ids))
    D, I, S = (_take(a, order) for a in (D, I, S))
    S = np.where(I < 0, -1, S).astype(np.int32, copy=False)
    return D, I.astype(np.int64, copy=False), S, order


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], sources: list[int], k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, ids, source) of the best k over all parts, best first.

    parts[i] = (D, I), each (nq, k_i); sources[i] labels part i's results.
    Missing results get id -1, source -1 and the metric's worst score.
    """
    D, I, S, _ = _merge([d for d, _ in parts], [i for _, i in parts], sources, k, metric)
    return D, I, S


def merge_results(parts: list[tuple[int | np.ndarray, SearchResult]], k: int, metric: str, *,
                  values_dtype: np.dtype | None, value_dim: int, keys: bool) -> SearchResult:
    """The best k of several parts' results, payload included, best first.

    parts: (source label, result) pairs; the merged `bank` is the label of the
    part each result came from (-1 where missing); a label is an int, or an
    (nq,) array of per-row labels. values_dtype: the values'
    dtype in the merged result (None: no values); a part without values (a
    key-only bank) contributes zeros. keys: whether to merge keys (a part
    without them contributes zeros).
    """
    if len(parts) == 1 and parts[0][1].ids.shape[1] == k:       # the common case: no copies
        label, r = parts[0]
        vals = r.values
        if vals is not None and values_dtype is not None and vals.dtype != values_dtype:
            vals = vals.astype(values_dtype)
        bank = np.where(r.ids >= 0, _label(label), np.int32(-1)).astype(np.int32)
        scores = np.where(r.ids >= 0, r.scores, np.float32(worst(metric))).astype(np.float32)
        return SearchResult(ids=r.ids, scores=scores, bank=bank,
                            values=vals if values_dtype is not None else None,
                            keys=r.keys if keys else None)
    nq = len(parts[0][1].ids)
    D, I, S, order = _merge([r.scores for _, r in parts], [r.ids for _, r in parts],
                            [label for label, _ in parts], k, metric)
    out_v = out_k = None
    if values_dtype is not None:
        out_v = _take(_pad(np.concatenate(
            [r.values.astype(values_dtype, copy=False) if r.values is not None
             else np.zeros((nq, r.ids.shape[1], value_dim), values_dtype)
             for _, r in parts], axis=1), k, 0), order)                      # (nq, k, dv)
    if keys:
        dim = next((r.keys.shape[2] for _, r in parts if r.keys is not None), 0)
        out_k = _take(_pad(np.concatenate(
            [r.keys if r.keys is not None else np.zeros((nq, r.ids.shape[1], dim), np.float32)
             for _, r in parts], axis=1), k, 0), order)                      # (nq, k, dim)
    for out in (out_v, out_k):
        if out is not None:
            out[I < 0] = 0
    return SearchResult(ids=I, scores=D, bank=S, values=out_v, keys=out_k)


def _take(a: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """a's rows (nq, m, ...) in order (nq, k), or a itself when order is None: C-contiguous."""
    if order is None:
        return np.ascontiguousarray(a)
    idx = order if a.ndim == 2 else order.reshape(*order.shape, *([1] * (a.ndim - 2)))
    return np.ascontiguousarray(np.take_along_axis(a, idx, axis=1))
