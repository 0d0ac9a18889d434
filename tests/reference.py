"""Exact brute-force references (numpy, float64) and synthetic data for the tests.

Everything here is deterministic for a given seed, and independent of FAISS,
so a test that compares a backend with these helpers checks the backend's
search, merge and id bookkeeping against plain arithmetic.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

def assert_same_result(got, ref) -> None:
    """Two SearchResults byte for byte: each array present in both or neither,
    same dtype, shape and bytes, and writable (a caller may change it)."""
    assert got.missing_shards == ref.missing_shards
    for f in (field.name for field in dataclasses.fields(ref) if field.name != "missing_shards"):
        a, b = getattr(got, f), getattr(ref, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f
            assert a.flags.writeable, f


# ---- data --------------------------------------------------------------------

def gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 standard normal rows."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixture(n: int, dim: int, seed: int, clusters: int = 48, spread: float = 0.05,
            centers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-mixture rows (low intrinsic dimension: what ANN indexes are for).

    Returns (points, centers); pass `centers` back in to draw queries from the
    same mixture.
    """
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    which = rng.integers(0, len(centers), n)
    pts = centers[which] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return pts.astype(np.float32), centers


def values_for(n: int, value_dim: int, seed: int, dtype: str = "float32") -> np.ndarray:
    """Values as the bank will store them (already rounded to its dtype)."""
    v = np.random.default_rng(seed).standard_normal((n, value_dim)).astype(np.float32)
    return stored(v, dtype)


def stored(v: np.ndarray, dtype: str) -> np.ndarray:
    from memoryd.arrays import VALUE_DTYPES

    return np.asarray(v, dtype=np.float32).astype(VALUE_DTYPES[dtype])


def f32(a) -> np.ndarray:
    """float32 copy of a numpy array of any float dtype (bf16 included)."""
    a = np.asarray(a)
    return a.astype(np.float32)


# ---- exact search --------------------------------------------------------------

def scores(keys: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """(nq, n) float64: squared L2 distance (l2) or inner product (ip)."""
    k = np.asarray(keys, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    ip = q @ k.T
    if metric == "ip":
        return ip
    return (q * q).sum(1)[:, None] + (k * k).sum(1)[None, :] - 2.0 * ip


def empty_score(metric: str) -> float:
    return np.inf if metric == "l2" else -np.inf


def topk(keys: np.ndarray, queries: np.ndarray, k: int, metric: str
         ) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of the exact top-k, best first; -1 / +-inf padding."""
    res = topk_union([keys], queries, k, metric)
    return res[1], res[2]


def topk_union(key_sets: Sequence[np.ndarray], queries: np.ndarray, k: int, metric: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k over the union of several key sets.

    Returns (bank, position, score), each (nq, k): bank is the index into
    key_sets (-1 where missing), position the row inside that set (-1 where
    missing), score float64 (+inf for l2 / -inf for ip where missing).
    """
    nq = len(queries)
    parts = [scores(ks, queries, metric) for ks in key_sets if len(ks)]
    owners = [np.full(len(ks), b) for b, ks in enumerate(key_sets) if len(ks)]
    rows = [np.arange(len(ks)) for ks in key_sets if len(ks)]
    bank = np.full((nq, k), -1, dtype=np.int64)
    pos = np.full((nq, k), -1, dtype=np.int64)
    sc = np.full((nq, k), empty_score(metric), dtype=np.float64)
    if not parts:
        return bank, pos, sc
    all_s = np.concatenate(parts, axis=1)
    all_b = np.concatenate(owners)
    all_r = np.concatenate(rows)
    key = -all_s if metric == "ip" else all_s
    m = min(k, key.shape[1])
    if m < key.shape[1]:
        cand = np.argpartition(key, m - 1, axis=1)[:, :m]
    else:
        cand = np.broadcast_to(np.arange(key.shape[1]), key.shape)
    order = np.take_along_axis(
        cand, np.argsort(np.take_along_axis(key, cand, axis=1), axis=1, kind="stable"), axis=1)
    bank[:, :m] = all_b[order]
    pos[:, :m] = all_r[order]
    sc[:, :m] = np.take_along_axis(all_s, order, axis=1)
    return bank, pos, sc


# ---- comparisons ---------------------------------------------------------------

def score_tol(ref_scores: np.ndarray) -> float:
    """Absolute tolerance for float32 scores next to float64 ones of this scale."""
    finite = np.abs(ref_scores[np.isfinite(ref_scores)])
    scale = float(finite.max()) if finite.size else 1.0
    return 1e-4 * max(scale, 1.0)


def assert_scores_close(got: np.ndarray, ref: np.ndarray, what: str = "scores") -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    inf = ~np.isfinite(ref)
    assert np.array_equal(got[inf], ref[inf]), f"{what}: padding differs from {ref[inf][:3]}"
    np.testing.assert_allclose(got[~inf], ref[~inf], rtol=1e-4, atol=score_tol(ref),
                               err_msg=what)


def assert_same_hits(got_ids: np.ndarray, got_scores: np.ndarray, ref_ids: np.ndarray,
                     ref_scores: np.ndarray, metric: str, *, got_bank=None, ref_bank=None,
                     true_scores=None) -> None:
    """A backend's top-k equals the exact one, up to ties.

    Scores must match the reference row by row (allclose). Per row the set of
    hits must equal the reference set, except for hits whose score is within
    tolerance of the row's k-th score (ties at the boundary may go either
    way); those must still have the right score, checked through
    `true_scores` (nq, k): the exact score of each returned hit's stored key.
    """
    got_ids = np.asarray(got_ids)
    assert got_ids.shape == ref_ids.shape, f"ids shape {got_ids.shape} != {ref_ids.shape}"
    assert_scores_close(got_scores, ref_scores)
    tol = score_tol(ref_scores) + 1e-4 * np.abs(ref_scores[np.isfinite(ref_scores)]).max(
        initial=0.0)
    gb = np.zeros_like(got_ids) if got_bank is None else np.asarray(got_bank)
    rb = np.zeros_like(ref_ids) if ref_bank is None else np.asarray(ref_bank)
    np.testing.assert_array_equal(got_ids >= 0, ref_ids >= 0, err_msg="mask")
    for i in range(len(ref_ids)):
        valid = ref_ids[i] >= 0
        if not valid.any():
            continue
        kth = ref_scores[i][valid][-1]
        safe = np.abs(ref_scores[i] - kth) > tol
        want = {(int(b), int(x)) for b, x, s in zip(rb[i], ref_ids[i], safe) if x >= 0 and s}
        have = {(int(b), int(x)) for b, x in zip(gb[i], got_ids[i]) if x >= 0}
        missing = want - have
        assert not missing, f"row {i}: exact hits {sorted(missing)} missing from {sorted(have)}"
        assert len(have) == int(valid.sum()), f"row {i}: repeated hits {got_ids[i]}"
    if true_scores is not None:
        m = got_ids >= 0
        t = np.asarray(true_scores, np.float64)[m]
        g = np.asarray(got_scores, np.float64)[m]
        bad = np.abs(t - g) > tol + 1e-4 * np.abs(t)
        assert not bad.any(), (
            f"{int(bad.sum())} hits have scores that are not their keys' scores, e.g. "
            f"returned {g[bad][:3]} but the keys score {t[bad][:3]}")


def rows_of(ids_added: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row positions (in the add order) of ids; -1 where id is -1 or unknown."""
    ids_added = np.asarray(ids_added, np.int64)
    ids = np.asarray(ids, np.int64)
    if len(ids_added) == 0:
        return np.full(ids.shape, -1, np.int64)
    order = np.argsort(ids_added, kind="stable")
    sorted_ids = ids_added[order]
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    found = sorted_ids[pos] == ids
    return np.where(found, order[pos], -1)


def hit_scores(keys: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise exact score of queries[i] against keys[i] (float64)."""
    q = np.asarray(queries, np.float64)
    k = np.asarray(keys, np.float64)
    return (q * k).sum(-1) if metric == "ip" else ((q - k) ** 2).sum(-1)


def recall(got_ids: np.ndarray, ref_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids found (per row, as sets)."""
    hits = 0
    total = 0
    for g, r in zip(np.asarray(got_ids), np.asarray(ref_ids)):
        want = set(int(x) for x in r if x >= 0)
        hits += len(want & set(int(x) for x in g if x >= 0))
        total += len(want)
    return hits / max(total, 1)

