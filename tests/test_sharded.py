"""A sharded memory answers as one bank does (memoryd.cluster).

N in-process shards (LocalMemory with a Placement, one shared SQLite catalog)
behind a ShardedMemory against ONE LocalMemory holding the same rows: ids,
scores, bank positions, values, keys and -1 padding equal, for N in {1, 2, 4},
metric l2 and ip, k above the rows held, per-bank k and bias, excluded banks,
per-row stacks with sessions; then placement, routing by id, and the
failure policy (UNAVAILABLE by default, flagged partial results opt-in,
an add taken back where it landed when another shard fails).
"""
from __future__ import annotations

import numpy as np
import pytest

from memoryd import errors
from memoryd.api import BankQuery, BankSpec, RowStacks, SessionSpec
from memoryd.cluster import Placement, ShardedMemory
from memoryd.cluster.placement import session_shard
from memoryd.engine import LocalMemory

DIM, VDIM = 8, 3


def _shards(tmp_path, n: int) -> list[LocalMemory]:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    return [LocalMemory(tmp_path / f"shard{i}", url, placement=Placement(i, n), reap_interval=None)
            for i in range(n)]


@pytest.fixture
def make_cluster(tmp_path):
    made = []

    def make(n: int, **kw) -> ShardedMemory:
        mem = ShardedMemory(_shards(tmp_path, n), **kw)
        made.append(mem)
        return mem

    yield make
    for m in made:
        m.close()


@pytest.fixture
def ref(tmp_path):
    mem = LocalMemory(tmp_path / "ref", reap_interval=None)
    yield mem
    mem.close()


def _fill(mems, metric: str, rng) -> dict[str, np.ndarray]:
    """banks a (60 rows) and b (25 rows, float16 values) in every mem, same ids."""
    rows = {}
    for name, n, dtype in (("a", 60, "float32"), ("b", 25, "float16")):
        keys = rng.standard_normal((n, DIM)).astype(np.float32)
        values = rng.standard_normal((n, VDIM)).astype(dtype)
        ids = rng.choice(10_000, n, replace=False).astype(np.int64)
        for m in mems:
            m.create_bank(BankSpec(name, dim=DIM, value_dim=VDIM, value_dtype=dtype,
                                   metric=metric))
            assert (m.add(name, keys, values, ids) == ids).all()
        rows[name] = ids
    return rows


def _same(got, want, *, ids: bool = True) -> None:
    assert got.ids.shape == want.ids.shape
    if ids:
        np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.bank, want.bank)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-5)
    for a, b in ((got.values, want.values), (got.keys, want.keys)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert got.missing_shards == ()


STACKS = [
    ["a"],
    ["a", "b"],
    [BankQuery("a", k=4), BankQuery("b", bias=0.5)],
    [BankQuery("a", include=False), "b"],
    [BankQuery("b", k=2), BankQuery("a", k=7, bias=-0.25)],
]


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_equals_one_bank(make_cluster, ref, n, metric):
    rng = np.random.default_rng(n * 10 + len(metric))
    mem = make_cluster(n)
    _fill([ref, mem], metric, rng)
    q = rng.standard_normal((9, DIM)).astype(np.float32)
    for stack in STACKS:
        for k in (1, 5, 100):                       # 100 > the 85 rows held: -1 padding
            for keys in (False, True):
                _same(mem.search(stack, q, k, keys=keys), ref.search(stack, q, k, keys=keys))
    # per-row stacks, each group its own stack
    rs = RowStacks(stacks=[["a", "b"], ["b"], [BankQuery("a", k=3), "b"]], rows=[3, 2, 4])
    for k in (4, 90):
        _same(mem.search(rs, q, k, keys=True), ref.search(rs, q, k, keys=True))
    assert mem.bank_info("a").count == 60 and mem.bank_info("b").count == 25
    assert mem.bank_info("a").used_bytes == ref.bank_info("a").used_bytes


@pytest.mark.parametrize("n", [2, 4])
def test_row_stacks_with_sessions_on_their_shards(make_cluster, ref, n):
    rng = np.random.default_rng(7)
    mem = make_cluster(n)
    _fill([ref, mem], "ip", rng)
    sessions = {}
    for m in (ref, mem):
        sessions[m] = [m.open_session(SessionSpec(dim=DIM, value_dim=VDIM, metric="ip")).session_id
                       for _ in range(3)]
    homes = {session_shard(s, n) for s in sessions[mem]}
    assert len(homes) > 1                      # opened on the shards in turn
    for i in range(3):
        keys = rng.standard_normal((5 + i, DIM)).astype(np.float32)
        vals = rng.standard_normal((5 + i, VDIM)).astype(np.float32)
        for m in (ref, mem):
            m.append(sessions[m][i], keys, vals)
    q = rng.standard_normal((6, DIM)).astype(np.float32)
    for m in (ref, mem):
        s = sessions[m]
        m._rs = RowStacks(stacks=[[s[0], "a"], [s[1], "b"], [BankQuery(s[2], k=2), "a", "b"]],
                          rows=[2, 2, 2])
    got, want = mem.search(mem._rs, q, 20), ref.search(ref._rs, q, 20)
    # session ids differ between the two memories; rows of the shared banks keep theirs
    _same(got, want, ids=False)
    shared = want.bank > 0
    np.testing.assert_array_equal(got.ids[shared], want.ids[shared])


def test_adds_place_rows_by_id_and_ids_are_unique(make_cluster, tmp_path):
    n = 3
    mem = make_cluster(n)
    mem.create_bank(BankSpec("w", dim=DIM, value_dim=VDIM))
    rng = np.random.default_rng(0)
    ids = np.concatenate([mem.add("w", rng.standard_normal((m, DIM)), rng.standard_normal((m, VDIM)))
                          for m in (1, 2, 5000, 9000, 3)])
    assert len(np.unique(ids)) == len(ids) == 14006
    explicit = np.arange(20_000, 20_050)
    mem.add("w", rng.standard_normal((50, DIM)), rng.standard_normal((50, VDIM)), ids=explicit)
    for q, shard in enumerate(mem.shards):          # every row on the shard its id names
        got = shard.get("w", np.concatenate([ids, explicit]), values=False)
        assert (got.found == (np.concatenate([ids, explicit]) % n == q)).all()
    big = mem.shards[0].bank_info("w").tier_bytes
    assert sum(big.values()) > 0
    # get / update / remove reach the right shard, in the caller's order
    pick = np.array([explicit[3], ids[5], 999_999, ids[-1]])
    g = mem.get("w", pick, keys=True)
    assert g.found.tolist() == [True, True, False, True]
    new = np.ones((3, VDIM), np.float32)
    assert mem.update_values("w", pick[[0, 1, 3]], new) == 3
    assert (mem.get("w", pick[[0, 1, 3]]).values == 1).all()
    assert mem.remove("w", pick) == 3
    assert not mem.get("w", pick).found.any()
    assert mem.bank_info("w").count == 14056 - 3
    assert sum(c.ids.size for c in mem.export("w")) == 14056 - 3


def test_quota_is_one_across_shards(make_cluster):
    mem = make_cluster(2)
    mem.create_bank(BankSpec("q", dim=DIM))
    one = mem.shards[0]
    row = 8 + 4 * DIM                               # id + key (a Flat bank holds them once)
    mem.set_quota("q", 10 * row + one.bank_info("q").used_bytes)
    mem.add("q", np.ones((10, DIM)), ids=np.arange(10))     # 5 rows on each shard
    with pytest.raises(errors.QuotaExceeded):
        mem.add("q", np.ones((1, DIM)), ids=[11])
    assert mem.bank_info("q").count == 10


class Down:
    """A shard that does not answer."""

    def __getattr__(self, name):
        def fail(*a, **kw):
            raise errors.Unavailable("connection refused")
        return fail

    def close(self):
        pass


def test_a_shard_down_is_unavailable_unless_partial_results_are_allowed(tmp_path):
    shards = _shards(tmp_path, 3)
    rng = np.random.default_rng(1)
    full = ShardedMemory(shards, owns_shards=False)
    full.create_bank(BankSpec("d", dim=DIM, value_dim=VDIM))
    full.add("d", rng.standard_normal((300, DIM)), rng.standard_normal((300, VDIM)),
             ids=np.arange(300))
    q = rng.standard_normal((4, DIM)).astype(np.float32)
    whole = full.search("d", q, 10)
    broken = ShardedMemory([shards[0], Down(), shards[2]], names=["a", "b", "c"],
                           owns_shards=False)
    broken._specs = dict(full._specs)               # the shape was read while all were up
    with pytest.raises(errors.Unavailable, match=r"shard 1 \(b\)"):
        broken.search("d", q, 10)
    partial = ShardedMemory([shards[0], Down(), shards[2]], partial_results=True,
                            owns_shards=False)
    partial._specs = dict(full._specs)
    r = partial.search("d", q, 10)
    assert r.missing_shards == (1,)
    assert (r.ids % 3 != 1).all()                   # the best of the shards that answered
    assert set(r.ids[0]) <= set(whole.ids[0]) | set(full.search("d", q, 300).ids[0])
    # a write that cannot reach every shard it needs leaves nothing behind
    before = full.bank_info("d").count
    with pytest.raises(errors.Unavailable):
        broken.add("d", rng.standard_normal((9000, DIM)), rng.standard_normal((9000, VDIM)))
    assert full.bank_info("d").count == before
    for s in shards:
        s.close()


def test_bank_admin_reaches_every_shard(make_cluster):
    mem = make_cluster(2)
    info = mem.create_bank(BankSpec("m", dim=DIM, index="HNSW16"))
    assert info.spec.index == "HNSW16"
    with pytest.raises(errors.AlreadyExists):
        mem.create_bank(BankSpec("m", dim=DIM))
    with pytest.raises(errors.InvalidArgument, match="session id"):
        mem.create_bank(BankSpec("s-0123456789abcdef", dim=DIM))
    mem.add("m", np.random.default_rng(2).standard_normal((100, DIM)))
    assert mem.freeze_bank("m").frozen
    with pytest.raises(errors.BankFrozen):
        mem.add("m", np.zeros((1, DIM)), ids=[1])
    assert [b.name for b in mem.list_banks()] == ["m"]
    assert mem.stats().banks[0].count == 100
    assert mem.delete_bank("m") > 0
    assert mem.list_banks() == []
    for s in mem.shards:
        with pytest.raises(errors.NotFound):
            s.bank_info("m")
