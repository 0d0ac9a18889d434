"""Search over a stack of banks: every searcher (shard) of every included
bank asked once (api.ShardSearch), per-bank k and bias applied, merged into
one top-k in the metric's direction (memoryd.topk).

Payload: a bank whose rows live in this process (`gather` given) is asked
for ids and scores only, and the winners' keys/values are gathered from it
after the merge: copying k rows from every piece only to keep k in all
would cost a copy per piece (1.5-2x the search on 4 shards, measured). A
bank elsewhere (no `gather`: e.g. a shard in another process) returns its
payload in the same call, so it costs one round trip.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from memoryd.api import BankQuery, SearchResult, ShardSearch
from memoryd.topk import merge_results

Gather = Callable[..., tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


@dataclass
class StackEntry:
    """One included bank of a stack, as the search sees it."""

    pos: int                           # its position in the stack (SearchResult.bank)
    query: BankQuery                   # its options: k, bias
    searchers: list[ShardSearch]       # its pieces
    gather: Gather | None = None       # BankStore.gather for a bank in this process
    holds_values: bool = True          # False: a key-only bank (its results get zero values)


def search_stack(active: list[StackEntry], q: np.ndarray, k: int, metric: str,
                 values_dtype: np.dtype | None, value_dim: int, keys: bool,
                 pool: ThreadPoolExecutor) -> SearchResult:
    """One top-k over the active banks of a stack, payload included.

    The caller holds the read locks of the banks in this process;
    values_dtype/value_dim: the merged values' (None: no values).
    """
    values = values_dtype is not None
    jobs = [(e, s) for e in active for s in e.searchers]

    def run(job) -> SearchResult:
        e, searcher = job
        return ask(e, searcher, q, k, metric, values, keys)

    results = [run(jobs[0])] if len(jobs) == 1 else list(pool.map(run, jobs))
    parts = [(e.pos, r) for (e, _), r in zip(jobs, results)]
    any_remote = any(e.gather is None for e in active)
    merge = dict(values_dtype=values_dtype if any_remote else None, value_dim=value_dim,
                 keys=keys and any_remote)
    # A sharded bank with its own k gives at most that many in all, not that
    # many per shard: merge its shards first, in place of its first part, so
    # that bank order (and so tie-breaking) is kept.
    capped = {e.pos: e.query.k for e in active
              if len(e.searchers) > 1 and e.query.k and e.query.k < k}
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
    out = merge_results(parts, k, metric, **merge)
    local = [e for e in active if e.gather is not None]
    if local and (values or keys):
        _gather_winners(out, local, values_dtype, value_dim, keys, q.shape[1])
    return out


def ask(e: StackEntry, searcher: ShardSearch, q: np.ndarray, k: int, metric: str,
        values: bool, keys: bool) -> SearchResult:
    """One searcher's top-k for entry e's options (its k, its bias); the payload
    only from a bank elsewhere (an in-process one is gathered after the merge)."""
    remote = e.gather is None
    r = searcher.search(q, e.query.k or k, values=values and remote, keys=keys and remote)
    if e.query.bias:  # in the bank's favour: larger ip, smaller l2
        shift = e.query.bias if metric == "ip" else -e.query.bias
        r.scores = np.where(r.ids >= 0, r.scores + np.float32(shift), r.scores)
    return r


def _gather_winners(out: SearchResult, local: list[StackEntry], values_dtype: np.dtype | None,
                    value_dim: int, keys: bool, dim: int) -> None:
    """Fill out's values/keys for the results of the in-process banks."""
    values = values_dtype is not None
    if len(local) == 1 and out.values is None and out.keys is None:   # gather straight in
        _, kk, vv = local[0].gather(out.ids, keys=keys, values=values and local[0].holds_values)
        out.keys = kk
        out.values = (None if not values
                      else vv.astype(values_dtype, copy=False) if vv is not None
                      else np.zeros((*out.ids.shape, value_dim), values_dtype))
        return
    nq, k = out.ids.shape
    if values and out.values is None:
        out.values = np.zeros((nq, k, value_dim), values_dtype)
    if keys and out.keys is None:
        out.keys = np.zeros((nq, k, dim), np.float32)
    for e in local:
        sel = out.bank == e.pos
        if not sel.any():
            continue
        _, kk, vv = e.gather(out.ids[sel], keys=keys, values=values and e.holds_values)
        if kk is not None:
            out.keys[sel] = kk
        if vv is not None:
            out.values[sel] = vv
