"""Search over a stack of banks: every shard of every included bank, bias
and per-bank k applied, one merged top-k (memoryd.topk), then the keys and
values of the winners gathered from the banks that hold them.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memoryd.api import BankQuery, SearchResult
from memoryd.arrays import value_dtype
from memoryd.bank import Bank
from memoryd.errors import InvalidArgument
from memoryd.topk import merge_topk


def search_stack(active: list[tuple[int, Bank, BankQuery]], q: np.ndarray, k: int, metric: str,
                 vdt: np.dtype | None, keys: bool, pool: ThreadPoolExecutor) -> SearchResult:
    """One top-k over the active banks of a stack, with keys/values gathered.

    active: (position in the stack, bank, its options) of the included banks,
    whose read locks the caller holds; vdt: the values' dtype, None for none.
    """
    jobs = [(pos, b, opt, si) for pos, b, opt in active for si in range(b.spec.shards)]

    def run(job):
        pos, b, opt, si = job
        dist, ids = b.search_shard(si, q, opt.k or k)                 # (nq, k_b)
        if opt.bias:  # in the bank's favour: larger ip, smaller l2
            dist = np.where(ids >= 0, dist + (opt.bias if metric == "ip" else -opt.bias), dist)
        return dist, ids

    parts = [run(jobs[0])] if len(jobs) == 1 else list(pool.map(run, jobs))
    sources = [pos for pos, *_ in jobs]
    capped = {pos: opt.k for pos, b, opt in active if b.spec.shards > 1 and opt.k and opt.k < k}
    if capped:  # a sharded bank gives at most its own k in all, not k per shard
        parts, sources = _cap_banks(parts, sources, capped, metric)
    dist, ids, src = merge_topk(parts, sources, k, metric)
    values = vdt is not None
    if len(active) == 1:  # gather straight into the result, no scatter
        _, out_k, out_v = active[0][1].gather(ids, keys=keys, values=values, out_values_dtype=vdt)
        return SearchResult(ids=ids, scores=dist, bank=src, values=out_v, keys=out_k)
    nq = len(q)
    value_dim = max(b.spec.value_dim for _, b, _ in active)
    out_v = np.zeros((nq, k, value_dim), vdt) if values else None
    out_k = np.zeros((nq, k, active[0][1].spec.dim), np.float32) if keys else None
    for pos, b, _ in active:
        sel = src == pos
        if not sel.any():
            continue
        _, kk, vv = b.gather(ids[sel], keys=keys, values=values and b.spec.value_dim > 0,
                             out_values_dtype=vdt)
        if keys:
            out_k[sel] = kk
        if vv is not None:
            out_v[sel] = vv
    return SearchResult(ids=ids, scores=dist, bank=src, values=out_v, keys=out_k)


def _cap_banks(parts: list, sources: list[int], capped: dict[int, int], metric: str):
    """Merge the shard parts of each capped bank into its own top-k, in place
    of its first part, so that bank order (and so tie-breaking) is kept."""
    out_parts, out_sources, done = [], [], set()
    for part, pos in zip(parts, sources):
        if pos not in capped:
            out_parts.append(part)
            out_sources.append(pos)
        elif pos not in done:
            done.add(pos)
            mine = [p for p, s in zip(parts, sources) if s == pos]
            dist, ids, _ = merge_topk(mine, [pos] * len(mine), capped[pos], metric)
            out_parts.append((dist, ids))
            out_sources.append(pos)
    return out_parts, out_sources


def common_values_dtype(chosen: list[Bank]) -> np.dtype | None:
    """Value dtype of a merged result: the banks' own if shared, else float32.

    None when no bank holds values. Results from a key-only bank searched
    together with value banks get zero values (the layer pairs such a bank
    with a trainable value table of its own).
    """
    with_values = [b for b in chosen if b.spec.value_dim]
    if not with_values:
        return None
    dims = {b.spec.value_dim for b in with_values}
    if len(dims) > 1:
        raise InvalidArgument(f"banks of one search with values must share value_dim; got {sorted(dims)}")
    dtypes = {b.spec.value_dtype for b in with_values}
    return value_dtype(dtypes.pop()) if len(dtypes) == 1 else np.dtype(np.float32)
