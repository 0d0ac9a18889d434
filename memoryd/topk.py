"""Merging per-shard / per-bank top-k lists into one top-k.

The merge direction follows the metric: smallest first for L2 distances,
largest first for inner products (faiss contrib's client/server merge gets
this wrong for IP). Missing results (-1 from FAISS) sort last.
"""
from __future__ import annotations

import numpy as np


def worst(metric: str) -> float:
    return np.inf if metric == "l2" else -np.inf


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], sources: list[int], k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, ids, source) of the best k over all parts, best first.

    parts[i] = (D, I), each (nq, k_i); sources[i] labels part i's results.
    Missing results get id -1, source -1 and the metric's worst score.
    """
    D = np.concatenate([d for d, _ in parts], axis=1)                 # (nq, sum k_i)
    I = np.concatenate([i for _, i in parts], axis=1)                 # (nq, sum k_i)
    S = np.concatenate([np.full(i.shape, s, np.int32) for (_, i), s in zip(parts, sources)], axis=1)
    if D.shape[1] < k:  # parts asked for fewer than k in all: pad with missing results
        pad = ((0, 0), (0, k - D.shape[1]))
        D, I, S = np.pad(D, pad), np.pad(I, pad, constant_values=-1), np.pad(S, pad)
    missing = I < 0
    D = np.where(missing, worst(metric), D).astype(np.float32, copy=False)
    if D.shape[1] > k or len(parts) > 1:
        key = D if metric == "l2" else -D
        order = np.argsort(key, axis=1, kind="stable")[:, :k]          # (nq, k)
        D, I, S = (np.take_along_axis(a, order, axis=1) for a in (D, I, S))
        missing = I < 0
    S = np.where(missing, -1, S).astype(np.int32, copy=False)
    return np.ascontiguousarray(D), np.ascontiguousarray(I.astype(np.int64, copy=False)), S
