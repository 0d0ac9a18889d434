"""Search with per-row bank stacks (api.RowStacks): ONE request in which each
group of query rows has its own stack, answered as one top-k per row.

    plan_rows(row_stacks, entry)  -> RowPlan: the distinct banks and each group's slots
    search_rows(plan, queries, k, ...) -> SearchResult, row for row what
        concatenating search(stacks[g], queries[group g], k) over groups gives

Each distinct (bank, options) of the request is ONE job, searched once over
the union of the rows whose stacks name it: a base bank shared by B documents
sees one batch of all their rows (a product-key or Flat bank costs far less
per query at large nq than B small batches), and every searcher of every job
runs in the same pool. A job's shards are merged to its own k first (what a
plain stack does for a capped sharded bank; for the rest it changes nothing,
as a bank's k best are all the final merge can take from it).

Then the jobs' results are laid out in slots: slot s of a row holds the s-th
included bank of the row's own stack, so one merge (memoryd.topk, with
per-row labels = positions in each row's own stack) keeps the best k of every
row, and ties go to the bank named first in that row's stack, as in a plain
search. In-process banks answer with ids and scores; their winners' payload
is gathered after the merge, one gather per bank and run of rows.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from memoryd.api import BankQuery, RowStacks, SearchResult
from memoryd.engine.searching import StackEntry, ask
from memoryd.topk import merge_results, worst

# Rows per piece of the payload gather: one gather per bank over B*T*H rows
# would scatter into arrays of many MiB (a plain search's are B times
# smaller); pieces of this many rows keep its working set in cache.
GATHER_ROWS = 1024


@dataclass
class RowJob:
    """One distinct (bank, options) of a row-stack search: searched once."""

    entry: StackEntry                  # its searchers and options (entry.pos unused)
    offset: dict[int, int] = field(default_factory=dict)   # group -> its first row in `result`
    n: int = 0                         # query rows it searches (its groups' rows, in order)
    result: SearchResult | None = None  # (n, w) best first, w <= the search's k


@dataclass
class RowPlan:
    rows: tuple[int, ...]                     # query rows per group
    slots: list[list[tuple[int, RowJob]]]     # per group: (position in its stack, job) of
                                              # each included bank, in stack order
    jobs: list[RowJob]

    @property
    def starts(self) -> np.ndarray:           # (groups + 1,) group g's rows: starts[g]:starts[g+1]
        return np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)])


def plan_rows(rs: RowStacks, entry: Callable[[BankQuery], StackEntry]) -> RowPlan:
    """The jobs of rs: a bank named with the same options by several stacks is
    one job; with different options, one job per set of options."""
    jobs: dict[BankQuery, RowJob] = {}
    slots = []
    for g, (stack, n) in enumerate(zip(rs.stacks, rs.rows)):
        mine = []
        for pos, bq in enumerate(stack):
            if not bq.include:
                continue
            job = jobs.get(bq)
            if job is None:
                job = jobs[bq] = RowJob(entry(bq))
            job.offset[g] = job.n
            job.n += n
            mine.append((pos, job))
        slots.append(mine)
    return RowPlan(rs.rows, slots, list(jobs.values()))


def search_rows(plan: RowPlan, q: np.ndarray, k: int, metric: str,
                values_dtype: np.dtype | None, value_dim: int, keys: bool,
                pool: ThreadPoolExecutor) -> SearchResult:
    """One top-k per row of q (nq, dim) over its own stack, payload included.

    The caller holds the read locks of the banks in this process;
    values_dtype/value_dim: the merged values' (None: no values).
    """
    starts = plan.starts
    _run_jobs(plan, q, starts, k, metric, values_dtype, value_dim, keys, pool)
    nslots = max(len(mine) for mine in plan.slots)
    parts = [_slot(plan, s, starts, len(q), metric, values_dtype, value_dim, keys, q.shape[1])
             for s in range(nslots)]
    any_remote = any(j.entry.gather is None for j in plan.jobs)
    out = merge_results(parts, k, metric, values_dtype=values_dtype if any_remote else None,
                        value_dim=value_dim, keys=keys and any_remote)
    if (values_dtype is not None or keys) and any(j.entry.gather is not None for j in plan.jobs):
        _gather_rows(out, plan, starts, values_dtype, value_dim, keys, q.shape[1])
    return out


# ---- the searches: every searcher of every job, once ---------------------------------

def _run_jobs(plan: RowPlan, q: np.ndarray, starts: np.ndarray, k: int, metric: str,
              values_dtype: np.dtype | None, value_dim: int, keys: bool,
              pool: ThreadPoolExecutor) -> None:
    """Fill each job's result: its rows' top-k over all its shards."""
    values = values_dtype is not None
    asks = []                                   # (job, searcher, the job's queries)
    for job in plan.jobs:
        if job.n:
            qj = _job_queries(job, q, starts)                                 # (job.n, dim)
            asks += [(job, s, qj) for s in job.entry.searchers]

    def run(a) -> SearchResult:
        job, searcher, qj = a
        return ask(job.entry, searcher, qj, k, metric, values, keys)

    results = [run(asks[0])] if len(asks) == 1 else list(pool.map(run, asks))
    pieces: dict[int, list[SearchResult]] = {}
    for (job, _, _), r in zip(asks, results):
        pieces.setdefault(id(job), []).append(r)
    for job in plan.jobs:
        job.result = _bank_top(job, pieces.get(id(job), []), k, metric, values_dtype,
                               value_dim, keys)


def _job_queries(job: RowJob, q: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The rows of q the job's groups own, in group order: a view when they are
    one run of consecutive rows (a bank every stack names: all of q)."""
    runs: list[list[int]] = []
    for g in job.offset:                        # groups in increasing order
        a, b = int(starts[g]), int(starts[g + 1])
        if runs and runs[-1][1] == a:
            runs[-1][1] = b
        elif b > a:
            runs.append([a, b])
    if len(runs) == 1:
        return q[runs[0][0]:runs[0][1]]
    return np.concatenate([q[a:b] for a, b in runs])


def _bank_top(job: RowJob, pieces: list[SearchResult], k: int, metric: str,
              values_dtype: np.dtype | None, value_dim: int, keys: bool) -> SearchResult:
    """The job's best min(its k, k) per row over its shards' pieces."""
    kj = min(job.entry.query.k or k, k)
    if not pieces:                              # no rows: its groups are all empty
        return SearchResult(ids=np.empty((0, kj), np.int64),
                            scores=np.empty((0, kj), np.float32),
                            bank=np.empty((0, kj), np.int32))
    if len(pieces) == 1:                        # best first: its first kj are its best kj
        r = pieces[0]
        if r.ids.shape[1] <= kj:
            return r
        cut = (lambda a: None if a is None else a[:, :kj])
        return SearchResult(ids=cut(r.ids), scores=cut(r.scores), bank=cut(r.bank),
                            values=cut(r.values), keys=cut(r.keys))
    remote = job.entry.gather is None
    return merge_results([(0, p) for p in pieces], kj, metric,
                         values_dtype=values_dtype if remote else None, value_dim=value_dim,
                         keys=keys and remote)


# ---- slots: the jobs' results laid out by row, for one merge --------------------------

def _slot(plan: RowPlan, s: int, starts: np.ndarray, nq: int, metric: str,
          values_dtype: np.dtype | None, value_dim: int, keys: bool, dim: int
          ) -> tuple[np.ndarray, SearchResult]:
    """(labels (nq,), results (nq, w)) of slot s: each row's s-th included bank,
    labelled with its position in the row's own stack (-1: no such bank)."""
    cells = [(g, *mine[s]) for g, mine in enumerate(plan.slots) if len(mine) > s]
    labels = np.full(nq, -1, np.int32)                                        # (nq,)
    for g, pos, _ in cells:
        labels[starts[g]:starts[g + 1]] = pos
    jobs = list({id(j): j for _, _, j in cells}.values())
    covered = sum(plan.rows[g] for g, _, _ in cells)
    if len(jobs) == 1 and covered == nq == jobs[0].n:   # one bank for every row: as it is
        return labels, jobs[0].result
    w = max(j.result.ids.shape[1] for j in jobs)
    remote = any(j.entry.gather is None for j in jobs)
    ids = np.full((nq, w), -1, np.int64)                                      # (nq, w)
    scores = np.full((nq, w), worst(metric), np.float32)                      # (nq, w)
    vals = (np.zeros((nq, w, value_dim), values_dtype)
            if remote and values_dtype is not None else None)                 # (nq, w, dv)
    kk = np.zeros((nq, w, dim), np.float32) if remote and keys else None     # (nq, w, dim)
    for g, _, job in cells:
        a, b = int(starts[g]), int(starts[g + 1])
        o, r = job.offset[g], job.result
        wj = r.ids.shape[1]
        ids[a:b, :wj] = r.ids[o:o + b - a]
        scores[a:b, :wj] = r.scores[o:o + b - a]
        if vals is not None and r.values is not None:
            vals[a:b, :wj] = r.values[o:o + b - a]
        if kk is not None and r.keys is not None:
            kk[a:b, :wj] = r.keys[o:o + b - a]
    bank = np.broadcast_to(labels[:, None], ids.shape)  # not read by the merge: labels are
    return labels, SearchResult(ids=ids, scores=scores, bank=bank, values=vals, keys=kk)


# ---- payload of the in-process banks' winners ------------------------------------------

def _gather_rows(out: SearchResult, plan: RowPlan, starts: np.ndarray,
                 values_dtype: np.dtype | None, value_dim: int, keys: bool, dim: int) -> None:
    """Fill out's values/keys for the results of the in-process banks: one
    gather per bank and run of consecutive rows whose stacks name it."""
    values = values_dtype is not None
    nq, k = out.ids.shape
    if values and out.values is None:
        out.values = np.zeros((nq, k, value_dim), values_dtype)
    if keys and out.keys is None:
        out.keys = np.zeros((nq, k, dim), np.float32)
    for e, a, b, pos in _local_runs(plan, starts):
        for c in range(a, b, GATHER_ROWS):   # in blocks: the masks and payload stay in cache
            d = min(b, c + GATHER_ROWS)
            sel = out.bank[c:d] == pos[c - a:d - a]                           # (d-c, k)
            if not sel.any():
                continue
            _, kk, vv = e.gather(out.ids[c:d][sel], keys=keys, values=values and e.holds_values)
            if kk is not None:
                out.keys[c:d][sel] = kk
            if vv is not None:
                out.values[c:d][sel] = vv


def _local_runs(plan: RowPlan, starts: np.ndarray
                ) -> list[tuple[StackEntry, int, int, np.ndarray]]:
    """(entry, a, b, pos (b-a, 1)) for each run of consecutive rows a:b whose
    stacks name one in-process bank (by name: with any options), pos its
    position in each row's stack."""
    cells: dict[str, list[tuple[int, int, StackEntry]]] = {}     # name -> [(g, pos, entry)]
    for g, mine in enumerate(plan.slots):
        if plan.rows[g]:
            for pos, job in mine:
                if job.entry.gather is not None:
                    cells.setdefault(job.entry.query.name, []).append((g, pos, job.entry))
    runs = []
    for mine in cells.values():
        i = 0
        while i < len(mine):
            j = i
            while j + 1 < len(mine) and starts[mine[j + 1][0]] == starts[mine[j][0] + 1]:
                j += 1
            group = mine[i:j + 1]
            a, b = int(starts[group[0][0]]), int(starts[group[-1][0] + 1])
            pos = np.repeat([p for _, p, _ in group],
                            [plan.rows[g] for g, _, _ in group]).astype(np.int32)[:, None]
            runs.append((group[0][2], a, b, pos))
            i = j + 1
    return runs
