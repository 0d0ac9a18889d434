"""Per-row bank stacks (api.RowStacks) in ONE search, on both backends (the
in-process one, and the daemon both through reply buffers and streamed).

The contract (RowStacks' docstring): the result equals concatenating
search(stacks[g], queries[group g], k) over the groups, row for row (ids,
scores, bank = index into each row's own stack, values, keys, -1 padding),
with every distinct (bank, options) searched once for all rows naming it.
Checked against a float64 reference of the stack semantics and against the
backend's own separate searches.
"""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from knnlayer.client import MemoryClient
from memoryd import errors
from memoryd.api import BankQuery, RowStacks, SessionSpec
from memoryd.engine.row_search import plan_rows, search_rows
from memoryd.engine.searching import StackEntry
from memoryd.wire import messages, shm
from memoryd.wire import search as search_wire
from reference import f32, gaussian, scores, values_for

DIM, VDIM = 8, 4
FIELDS = ("ids", "scores", "bank", "values", "keys")


# ---- data and the reference ---------------------------------------------------------

class Data:
    """Banks made on a backend, with what they hold: name -> (keys, ids, values)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.held: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def add(self, mem, name: str, n: int, seed: int, session: bool = False,
            dtype: str = "float32") -> str:
        keys, vals = gaussian(n, DIM, seed), values_for(n, VDIM, seed + 1000, dtype)
        ids = mem.append(name, keys, vals) if session else mem.add(name, keys, vals)
        self.held[name] = (keys, np.asarray(ids), f32(vals))
        return name


def setup(mem, make_bank, metric: str, sessions: int = 4) -> tuple[Data, str, str, list[str]]:
    """(data, base (2 shards, 60 rows), a domain bank (30 rows), session banks (3.. rows))."""
    d = Data(metric)
    base = make_bank(mem, dim=DIM, value_dim=VDIM, metric=metric, shards=2).name
    dom = make_bank(mem, dim=DIM, value_dim=VDIM, metric=metric).name
    d.add(mem, base, 60, 1)
    d.add(mem, dom, 30, 2)
    sids = []
    for i in range(sessions):
        sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, metric=metric)).session_id
        sids.append(d.add(mem, sid, 3 + 3 * i, 10 + i, session=True))
    return d, base, dom, sids


def reference(d: Data, stack, q: np.ndarray, k: int):
    """(ids, bank, scores, values, keys) of one stack search by api.BankQuery's rules."""
    m = d.metric
    cand = []                                   # (scores, bank, ids, values, keys) per bank
    for pos, bq in enumerate(stack):
        if not bq.include:
            continue
        keys, ids, vals = d.held[bq.name]
        s = scores(keys, q, m)                                                # (nq, n)
        kb = min(bq.k or k, len(keys))
        order = np.argsort(s if m == "l2" else -s, axis=1, kind="stable")[:, :kb]  # (nq, kb)
        top = np.take_along_axis(s, order, axis=1)
        cand.append((top + bq.bias if m == "ip" else top - bq.bias, np.full(top.shape, pos),
                     ids[order], vals[order], keys[order]))
    S, B, I, V, K = (np.concatenate([c[i] for c in cand], axis=1) for i in range(5))
    order = np.argsort(S if m == "l2" else -S, axis=1, kind="stable")[:, :k]
    S, B, I = (np.take_along_axis(a, order, axis=1) for a in (S, B, I))
    V, K = (np.take_along_axis(a, order[..., None], axis=1) for a in (V, K))
    pad = k - S.shape[1]
    if pad > 0:
        S = np.pad(S, ((0, 0), (0, pad)), constant_values=np.inf if m == "l2" else -np.inf)
        B, I = (np.pad(a, ((0, 0), (0, pad)), constant_values=-1) for a in (B, I))
        V, K = (np.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (V, K))
    return I, B, S, V, K


def groups(rs: RowStacks):
    """(stack, first row, end row) of each group."""
    start = 0
    for stack, n in zip(rs.stacks, rs.rows):
        yield list(stack), start, start + n
        start += n


def check(mem, d: Data, rs: RowStacks, q: np.ndarray, k: int, values=True, keys=True):
    got = mem.search(rs, q, k, values=values, keys=keys)
    assert got.ids.shape == (len(q), k)
    assert (got.values is None) == (not values) and (got.keys is None) == (not keys)
    for stack, a, b in groups(rs):
        ids, bank, sc, vals, kk = reference(d, stack, q[a:b], k)
        np.testing.assert_array_equal(got.bank[a:b], bank, err_msg="bank")
        np.testing.assert_array_equal(got.ids[a:b], ids, err_msg="ids")
        np.testing.assert_allclose(got.scores[a:b], sc, rtol=2e-5, atol=2e-5, err_msg="scores")
        if values:
            np.testing.assert_array_equal(f32(got.values[a:b]), vals, err_msg="values")
        if keys:
            np.testing.assert_array_equal(got.keys[a:b], kk, err_msg="keys")
        if b > a:
            assert_same(got, mem.search(stack, q[a:b], k, values=values, keys=keys), a, b)
    return got


def assert_same(got, sep, a: int, b: int) -> None:
    """Rows a:b of got equal a separate search's answer (scores: up to BLAS rounding,
    as a batch of other size may take another FAISS kernel)."""
    for f in FIELDS:
        x, y = getattr(got, f), getattr(sep, f)
        assert (x is None) == (y is None), f
        if x is None:
            continue
        if f == "values":           # one dtype for all rows: common_values over every stack
            x, y = f32(x), f32(y)
        assert x.dtype == y.dtype, f
        if f == "scores":
            np.testing.assert_allclose(x[a:b], y, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(x[a:b], y, err_msg=f)


@pytest.fixture
def mems(rig):
    """The backends to check: in-process, or the daemon through reply buffers and streamed."""
    if rig.kind == "local":
        return [rig.mem]
    streamed = MemoryClient(rig.address, reply_buffers=False)
    rig._clients.append(streamed)
    assert rig.mem.reply_buffers == "shared memory"
    assert streamed.reply_buffers.startswith("socket")
    return [rig.mem, streamed]


# ---- the answers -------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [4, 40])                     # 40 > every session, > dom
@pytest.mark.parametrize("payload", [(True, True), (True, False), (False, False)])
def test_rows_equal_separate_searches(rig, mems, make_bank, metric, k, payload):
    d, base, dom, sids = setup(rig.mem, make_bank, metric)
    rs = RowStacks(stacks=[[sids[0], base], [sids[1], base, dom], [base, sids[2]], [sids[3]]],
                   rows=[5, 3, 4, 2])
    q = gaussian(14, DIM, 7)
    for mem in mems:
        check(mem, d, rs, q, k, *payload)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_options_may_differ_by_stack(rig, mems, make_bank, metric):
    d, base, dom, sids = setup(rig.mem, make_bank, metric)
    rs = RowStacks(stacks=[
        [sids[0], BankQuery(base, k=3)],
        [BankQuery(sids[1], bias=0.5), BankQuery(base, k=3)],           # same options: one job
        [sids[2], BankQuery(base, bias=1.0), BankQuery(dom, k=2)],
        [BankQuery(base, include=False), sids[3], dom],                 # excluded, position kept
        [base, BankQuery(sids[0], k=1)]], rows=[3, 4, 2, 3, 2])
    q = gaussian(14, DIM, 8)
    for mem in mems:
        got = check(mem, d, rs, q, 9)
        assert (got.bank[9:12] != 0).all()                               # base left out there


def test_one_stack_for_every_row(rig, mems, make_bank):
    """B = 1, or every group naming the same stack: the plain stack search answers."""
    d, base, dom, sids = setup(rig.mem, make_bank, "ip", sessions=1)
    q = gaussian(6, DIM, 17)
    stack = [BankQuery(sids[0], bias=0.2), BankQuery(base, k=3), dom]
    for mem in mems:
        check(mem, d, RowStacks([stack], [6]), q, 8)
        check(mem, d, RowStacks([stack] * 3, [2, 0, 4]), q, 8)


def test_groups_of_zero_rows(rig, mems, make_bank):
    d, base, dom, sids = setup(rig.mem, make_bank, "l2")
    rs = RowStacks(stacks=[[sids[0], base], [sids[1], base], [dom], [sids[2], base], [sids[3]]],
                   rows=[0, 4, 0, 3, 0])
    q = gaussian(7, DIM, 9)
    for mem in mems:
        check(mem, d, rs, q, 6)
        one = RowStacks(stacks=[[sids[0]], [dom, base]], rows=[0, 7])   # only one group has rows
        check(mem, d, one, q, 6)


def test_value_dtypes_of_all_stacks_decide_the_values_dtype(rig, mems, make_bank):
    d, base, dom, sids = setup(rig.mem, make_bank, "l2", sessions=2)
    half = make_bank(rig.mem, dim=DIM, value_dim=VDIM, value_dtype="bfloat16").name
    d.add(rig.mem, half, 20, 3, dtype="bfloat16")
    q = gaussian(6, DIM, 16)
    for mem in mems:
        alone = mem.search(RowStacks([[half], [half]], [2, 4]), q, 5)
        assert alone.values.dtype == mem.search(half, q[:2], 5).values.dtype  # bfloat16
        mixed = RowStacks([[half], [sids[0], base], [sids[1], half]], [2, 2, 2])
        mixed = check(mem, d, mixed, q, 5)
        assert mixed.values.dtype == np.float32        # banks differ: float32, for every row


def test_a_reply_larger_than_one_stream_piece(rig, mems, make_bank, monkeypatch):
    """2048 rows x k 64 with values and keys: ~8 MiB, over two 4 MiB pieces (streamed),
    and through one reply buffer from the second search on."""
    d, base, dom, sids = setup(rig.mem, make_bank, "l2", sessions=2)
    rs = RowStacks(stacks=[[sids[0], base], [sids[1], dom, base]], rows=[1024, 1024])
    q = gaussian(2048, DIM, 10)
    placed = []
    read = shm.MappedReplyBuffer.read
    monkeypatch.setattr(shm.MappedReplyBuffer, "read",
                        lambda self, p: placed.append(p) or read(self, p))
    for mem in mems:
        first = mem.search(rs, q, 64, values=True, keys=True)
        assert first.ids.nbytes + first.values.nbytes + first.keys.nbytes > 4 * 2**20
        got = check(mem, d, rs, q, 64)
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(first, f), getattr(got, f))
    if rig.kind == "daemon":
        assert placed, "the shared-memory client never read a reply from its buffer"


# ---- one search per bank -------------------------------------------------------------

class Counting:
    """A searcher that records the query rows of each call."""

    def __init__(self, inner, calls: list):
        self.inner, self.calls = inner, calls

    def search(self, queries, k, *, values, keys):
        self.calls.append(len(queries))
        return self.inner.search(queries, k, values=values, keys=keys)


def count_searches(monkeypatch, mem, name: str) -> list[int]:
    bank, calls = mem.engine.bank(name), []
    inner = bank.searchers
    monkeypatch.setattr(bank, "searchers", lambda: [Counting(s, calls) for s in inner()])
    return calls


def test_each_bank_is_searched_once_per_request(local_mem, make_bank, monkeypatch):
    d, base, dom, sids = setup(local_mem, make_bank, "ip")
    calls = {n: count_searches(monkeypatch, local_mem, n) for n in [base, dom, *sids]}
    rows = [6, 5, 4, 3]
    rs = RowStacks(stacks=[[s, base] for s in sids], rows=rows)
    check(local_mem, d, rs, gaussian(18, DIM, 11), 5)
    for c in calls.values():       # check() also ran one separate search per group: drop them
        c.clear()
    local_mem.search(rs, gaussian(18, DIM, 11), 5)
    assert calls[base] == [18, 18]                     # each of its 2 shards once, all rows
    assert [calls[s] for s in sids] == [[n] for n in rows]
    assert calls[dom] == []
    for c in calls.values():
        c.clear()
    opts = RowStacks(stacks=[[base], [BankQuery(base, k=2)], [base]], rows=[2, 3, 4])
    local_mem.search(opts, gaussian(9, DIM, 12), 5)
    assert sorted(calls[base]) == [3, 3, 6, 6]         # one job per set of options


def test_banks_elsewhere_give_their_payload_in_the_search(local_mem, make_bank):
    """Searchers without an in-process gather (a shard in another process) answer
    with their payload, which the slots carry through the merge."""
    d, base, dom, sids = setup(local_mem, make_bank, "l2")
    rs = RowStacks(stacks=[[sids[0], base], [dom, BankQuery(base, k=3)], [sids[1], dom]],
                   rows=[3, 4, 2])
    q = gaussian(9, DIM, 13)
    want = local_mem.search(rs, q, 7, values=True, keys=True)
    eng = local_mem.engine

    def remote(bq):
        b = eng.bank(bq.name)
        return StackEntry(pos=-1, query=bq, searchers=b.searchers(), gather=None)

    with cf.ThreadPoolExecutor(2) as pool:
        got = search_rows(plan_rows(rs, remote), q, 7, "l2", np.dtype(np.float32), VDIM,
                          True, pool)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)


# ---- bookkeeping: sessions and Stats.stacks ---------------------------------------------

def test_sessions_touched_and_stacks_logged_once_per_request(rig, make_bank):
    mem, clock = rig.mem, rig.clock
    d, base, dom, sids = setup(mem, make_bank, "l2", sessions=2)
    ttl = SessionSpec(dim=DIM, value_dim=VDIM, ttl_idle_s=100)
    idle = mem.open_session(ttl).session_id
    before = mem.session_info(idle).last_used_at
    clock.advance(50)
    rs = RowStacks(stacks=[[sids[0], base], [sids[1], base], [sids[0], base], [idle]],
                   rows=[2, 2, 2, 1])
    with pytest.raises(errors.InvalidArgument):               # a failed request is no use
        mem.search(rs, gaussian(6, DIM, 14), 3)
    assert mem.session_info(idle).last_used_at == before
    mem.search(rs, gaussian(7, DIM, 14), 3)
    assert mem.session_info(idle).last_used_at == clock()
    clock.advance(60)                                         # alive: its clock restarted
    mem.search(rs, gaussian(7, DIM, 14), 3)
    uses = {u.banks: u.searches for u in mem.stats().stacks if u.client == rig.CLIENT_NAME
            or rig.kind == "local"}
    assert uses == {(sids[0], base): 2, (sids[1], base): 2, (idle,): 2}
    clock.advance(101)
    with pytest.raises(errors.NotFound, match="expired"):
        mem.search(rs, gaussian(7, DIM, 14), 3)


# ---- bad requests ----------------------------------------------------------------------

def test_bad_requests(rig, mems, make_bank):
    d, base, dom, sids = setup(rig.mem, make_bank, "l2", sessions=2)
    other_dim = make_bank(rig.mem, dim=DIM * 2, value_dim=VDIM).name
    other_metric = make_bank(rig.mem, dim=DIM, value_dim=VDIM, metric="ip").name
    other_vdim = make_bank(rig.mem, dim=DIM, value_dim=VDIM + 1).name
    q = gaussian(6, DIM, 15)
    for mem in mems:
        with pytest.raises(errors.InvalidArgument, match="rows must sum to nq"):
            mem.search(RowStacks([[sids[0], base], [sids[1]]], [3, 2]), q, 4)
        with pytest.raises(errors.NotFound, match="nope"):
            mem.search(RowStacks([[sids[0], base], ["nope"]], [3, 3]), q, 4)
        with pytest.raises(errors.NotFound, match="nope"):   # excluded banks must exist too
            mem.search(RowStacks([[sids[0], BankQuery("nope", include=False)], [base]], [3, 3]),
                       q, 4)
        for odd in (other_dim, other_metric):
            with pytest.raises(errors.InvalidArgument, match="share dim and metric"):
                mem.search(RowStacks([[sids[0], base], [odd]], [3, 3]), q, 4)
        with pytest.raises(errors.InvalidArgument, match="share value_dim"):
            mem.search(RowStacks([[base], [other_vdim]], [3, 3]), q, 4)
        mem.search(RowStacks([[base], [other_vdim]], [3, 3]), q, 4, values=False)   # fine
        with pytest.raises(errors.InvalidArgument, match="k must be"):
            mem.search(RowStacks([[base]], [6]), q, 0)
        check(mem, d, RowStacks([[sids[0], base], [sids[1]]], [3, 3]), q, 4)   # still serving


def test_bad_row_stacks_are_refused_when_made():
    with pytest.raises(errors.InvalidArgument, match="one row count per stack"):
        RowStacks([["a"], ["b"]], [1])
    with pytest.raises(errors.InvalidArgument, match="non-negative"):
        RowStacks([["a"]], [-1])
    with pytest.raises(errors.InvalidArgument, match="named twice"):
        RowStacks([["a", "a"]], [1])
    with pytest.raises(errors.InvalidArgument, match="excluded"):
        RowStacks([[BankQuery("a", include=False)]], [1])


# ---- the wire ----------------------------------------------------------------------------

def test_row_stacks_travel_as_row_stack_messages():
    rs = RowStacks([["s-1", BankQuery("base", k=3, bias=0.5)], [BankQuery("base", include=False),
                                                                "s-2"]], [5, 0])
    req = search_wire.request(rs, 8, True, False)
    assert not req.banks and not req.stack and len(req.row_stacks) == 2
    assert [m.rows for m in req.row_stacks] == [5, 0]
    back = type(req).FromString(req.SerializeToString())
    assert messages.row_stacks_from_pb(back.row_stacks) == rs
    assert search_wire._stack(back) == rs


def test_the_daemon_refuses_row_stacks_beside_a_stack(rig, make_bank):
    if rig.kind == "local":
        pytest.skip("a wire rule")
    import grpc

    from memoryd.v1 import memory_pb2 as pb
    from memoryd.v1 import memory_pb2_grpc as pb_grpc
    from memoryd.wire.tensors import encode

    base = make_bank(rig.mem, dim=DIM, value_dim=VDIM).name
    rig.mem.add(base, gaussian(5, DIM, 1), values_for(5, VDIM, 2))
    q = encode(gaussian(2, DIM, 3), "queries")
    with grpc.insecure_channel(rig.address) as ch:
        stub = pb_grpc.MemoryStub(ch)
        rows = [pb.RowStack(stack=[pb.BankQuery(name=base)], rows=2)]
        for extra in (dict(banks=[base]), dict(stack=[pb.BankQuery(name=base)])):
            req = pb.SearchRequest(row_stacks=rows, queries=q, k=2, **extra)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Search(req))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "row_stacks replaces banks and stack" in e.value.details()
        bad = pb.SearchRequest(row_stacks=[pb.RowStack(stack=[pb.BankQuery(name=base)], rows=-2)],
                               queries=q, k=2)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Search(bad))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = list(stub.Search(pb.SearchRequest(row_stacks=rows, queries=q, k=2)))
        assert ok
