"""Search over a stack of banks: every searcher (shard) of every included
bank, each answering once with its payload (api.ShardSearch), per-bank k and
bias applied, merged into one top-k in the metric's direction (memoryd.topk).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from memoryd.api import BankQuery, SearchResult, ShardSearch
from memoryd.topk import merge_results


def search_stack(active: list[tuple[int, BankQuery, list[ShardSearch]]], q: np.ndarray, k: int,
                 metric: str, values_dtype: np.dtype | None, value_dim: int, keys: bool,
                 pool: ThreadPoolExecutor) -> SearchResult:
    """One top-k over the active banks of a stack, payload included.

    active: (position in the stack, its options, its searchers) of the
    included banks, whose read locks the caller holds; values_dtype/value_dim:
    the merged values' (None: no values).
    """
    values = values_dtype is not None
    jobs = [(pos, opt, s) for pos, opt, searchers in active for s in searchers]

    def run(job) -> SearchResult:
        _, opt, searcher = job
        r = searcher.search(q, opt.k or k, values=values, keys=keys)       # (nq, k_b)
        if opt.bias:  # in the bank's favour: larger ip, smaller l2
            shift = opt.bias if metric == "ip" else -opt.bias
            r.scores = np.where(r.ids >= 0, r.scores + np.float32(shift), r.scores)
        return r

    results = [run(jobs[0])] if len(jobs) == 1 else list(pool.map(run, jobs))
    parts = list(zip([pos for pos, _, _ in jobs], results))
    merge = dict(values_dtype=values_dtype, value_dim=value_dim, keys=keys)
    # A sharded bank with its own k gives at most that many in all, not that
    # many per shard: merge its shards first, in place of its first part, so
    # that bank order (and so tie-breaking) is kept.
    capped = {pos: opt.k for pos, opt, searchers in active
              if len(searchers) > 1 and opt.k and opt.k < k}
    if capped:
        merged, done = [], set()
        for pos, r in parts:
            if pos not in capped:
                merged.append((pos, r))
            elif pos not in done:
                done.add(pos)
                mine = [(pos, p) for s, p in parts if s == pos]
                merged.append((pos, merge_results(mine, capped[pos], metric, **merge)))
        parts = merged
    return merge_results(parts, k, metric, **merge)
