"""Sessions on both backends: read-your-writes, TTLs on an injected clock,
reaping and byte accounting, extend/close, promotion (scores, ids, dedup,
move), fifo/reject quotas, and surviving a restart.

Every test runs on the `rig` fixture (tests/conftest.py): a LocalMemory on a
FakeClock with the reaper off, used directly ("local") or through a
MemoryClient to a server wrapping it ("daemon").
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from memoryd import errors
from memoryd.api import SessionSpec
from reference import gaussian, rows_of, topk_union

DIM, VDIM = 8, 4


def spec(**kw) -> SessionSpec:
    return SessionSpec(**{"dim": DIM, "value_dim": VDIM, **kw})


def vals(n: int, seed: int) -> np.ndarray:
    return gaussian(n, VDIM, seed)


def tenant_used(mem, tenant: str = "default") -> int:
    try:
        return mem.tenant_info(tenant).used_bytes
    except errors.NotFound:      # no bank or session made it yet
        return 0


def session_rows(mem, sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, keys, values) of a session bank, in id order."""
    chunks = list(mem.export(sid))
    if not chunks:
        return np.empty(0, np.int64), np.empty((0, DIM), np.float32), np.empty((0, VDIM), np.float32)
    ids = np.concatenate([c.ids for c in chunks])
    keys = np.concatenate([c.keys for c in chunks])
    values = np.concatenate([c.values for c in chunks])
    order = np.argsort(ids)
    return ids[order], keys[order], values[order]


def assert_gone(mem, sid: str) -> None:
    """An expired or closed session answers NotFound to every read and write."""
    q = gaussian(1, DIM, 99)
    with pytest.raises(errors.NotFound):
        mem.session_info(sid)
    with pytest.raises(errors.NotFound):
        mem.search(sid, q, 1)
    with pytest.raises(errors.NotFound):
        mem.get(sid, [0])
    with pytest.raises(errors.NotFound):
        list(mem.export(sid))
    with pytest.raises(errors.NotFound):
        mem.append(sid, q, vals(1, 1))
    with pytest.raises(errors.NotFound):
        mem.extend_session(sid)
    assert sid not in [s.session_id for s in mem.list_sessions()]


def row_bytes(mem) -> tuple[int, int]:
    """(fixed, per-row) bytes of a session bank, from the catalog.

    An empty bank counts 0; one with n >= 1 rows counts fixed + n * row (the
    index's fixed bytes are charged with its first rows). Measured from the
    same bank at 1 and at 3 rows.
    """
    probe = mem.open_session(spec())
    assert probe.bank.used_bytes == 0                  # opening a session costs nothing
    mem.append(probe.session_id, gaussian(1, DIM, 5), vals(1, 6))
    one = mem.session_info(probe.session_id).bank.used_bytes
    mem.append(probe.session_id, gaussian(2, DIM, 7), vals(2, 8))
    three = mem.session_info(probe.session_id).bank.used_bytes
    assert mem.close_session(probe.session_id) == three
    assert (three - one) % 2 == 0
    row = (three - one) // 2
    fixed = one - row
    # id + key + value + score, once each: a Flat bank's index is its key column
    assert row == 8 + 4 * DIM + 4 * VDIM + 4 and fixed == 0
    return fixed, row


# ---- open, read-your-writes ---------------------------------------------------------

def test_open_returns_a_session_bank(rig, clock):
    mem = rig.mem
    info = mem.open_session(spec(ttl_idle_s=30, ttl_absolute_s=100))
    assert re.fullmatch(r"s-[0-9a-f]{16}", info.session_id)
    assert info.tenant == "default"
    assert info.created_at == clock.now and info.last_used_at == clock.now
    assert info.ttl_idle_s == 30 and info.ttl_absolute_s == 100
    assert info.expires_at == clock.now + 30
    assert info.bank.name == info.session_id
    assert info.bank.spec.kind == "session" and info.bank.count == 0
    assert info.bank.used_bytes == 0                   # an empty session holds no bytes
    assert (info.bank.spec.dim, info.bank.spec.value_dim) == (DIM, VDIM)
    assert [s.session_id for s in mem.list_sessions()] == [info.session_id]
    other = mem.open_session(spec(tenant="acme"))
    assert other.session_id != info.session_id
    assert [s.session_id for s in mem.list_sessions("acme")] == [other.session_id]
    assert mem.tenant_info("acme").sessions == 1


def test_read_your_writes_in_one_search_with_base_and_domain(rig, make_bank):
    mem = rig.mem
    base = make_bank(mem, dim=DIM, value_dim=VDIM, kind="base")
    dom = make_bank(mem, dim=DIM, value_dim=VDIM, kind="domain", shards=2)
    kb, vb = gaussian(40, DIM, 1), vals(40, 2)
    kd, vd = gaussian(30, DIM, 3), vals(30, 4)
    ib = mem.add(base.name, kb, vb)
    mem.freeze_bank(base.name)
    idd = mem.add(dom.name, kd, vd)
    sid = mem.open_session(spec()).session_id
    queries = gaussian(6, DIM, 5)
    ks = queries[:4] + 0.001 * gaussian(4, DIM, 6)    # each right next to a query
    vs = vals(4, 7)
    ids = mem.append(sid, ks, vs)                   # and read back at once:
    res = mem.search([base.name, dom.name, sid], queries, k=5, values=True)
    np.testing.assert_array_equal(res.bank[:4, 0], [2, 2, 2, 2])
    np.testing.assert_array_equal(res.ids[:4, 0], ids)
    np.testing.assert_array_equal(res.values[:4, 0], vs)
    # the whole top-k equals the exact one over the union of the three banks
    rb, rpos, rsc = topk_union([kb, kd, ks], queries, 5, "l2")
    all_ids = [ib, idd, ids]
    ref_ids = np.array([[all_ids[b][p] for b, p in zip(rrow, prow)] for rrow, prow in zip(rb, rpos)])
    np.testing.assert_array_equal(res.bank, rb)
    np.testing.assert_array_equal(res.ids, ref_ids)
    np.testing.assert_allclose(res.scores, rsc, rtol=1e-4, atol=1e-4)
    all_vals = [vb, vd, vs]
    want_v = np.stack([[all_vals[b][p] for b, p in zip(rrow, prow)] for rrow, prow in zip(rb, rpos)])
    np.testing.assert_array_equal(res.values, want_v)


# ---- TTLs (FakeClock), reaping ----------------------------------------------------------

def test_idle_ttl_expires_at_the_deadline_before_any_reap(rig, clock):
    mem = rig.mem
    baseline = tenant_used(mem)
    t0 = clock.now
    info = mem.open_session(spec(ttl_idle_s=10))
    sid = info.session_id
    mem.append(sid, gaussian(5, DIM, 1), vals(5, 2))
    assert tenant_used(mem) > baseline
    clock.advance(9.5)                                 # reads of info do not count as use
    assert mem.session_info(sid).expires_at == t0 + 10
    assert mem.search(sid, gaussian(1, DIM, 3), 2).ids.shape == (1, 2)   # this one does
    assert mem.session_info(sid).expires_at == t0 + 19.5
    clock.advance(9.75)
    assert mem.session_info(sid).session_id == sid
    clock.advance(0.25)                                # exactly at the deadline: gone
    assert_gone(mem, sid)
    assert rig.local.reap_expired() == 1
    assert tenant_used(mem) == baseline
    with pytest.raises(errors.NotFound):
        mem.bank_info(sid)
    assert sid not in [b.name for b in mem.list_banks()]
    assert mem.tenant_info("default").sessions == 0
    assert rig.local.reap_expired() == 0


def test_append_restarts_the_idle_clock(rig, clock):
    mem = rig.mem
    t0 = clock.now
    sid = mem.open_session(spec(ttl_idle_s=10)).session_id
    clock.advance(8)
    mem.append(sid, gaussian(1, DIM, 1), vals(1, 2))
    assert mem.session_info(sid).last_used_at == t0 + 8
    clock.advance(9.875)
    assert mem.session_info(sid).expires_at == t0 + 18
    clock.advance(0.125)
    assert_gone(mem, sid)


def test_failed_requests_do_not_restart_the_idle_clock(rig, clock, request):
    """Only a request that succeeded is use: a bad search, append or add that
    names a session leaves its idle clock where it was, and so does a stack
    search that fails on another (expired) session."""
    if rig.kind == "sharded":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "a sharded memory: a stack search failing on a session of another shard has "
            "already been use on the shard of the first (memoryd.cluster.sharded)")))
    mem = rig.mem
    t0 = clock.now
    sid = mem.open_session(spec(ttl_idle_s=10)).session_id
    gone = mem.open_session(spec(ttl_idle_s=1)).session_id
    clock.advance(5)
    with pytest.raises(errors.InvalidArgument):
        mem.search(sid, gaussian(1, DIM + 1, 3), 2)                 # wrong dim
    with pytest.raises(errors.InvalidArgument):
        mem.append(sid, gaussian(1, DIM + 1, 1), vals(1, 2))
    with pytest.raises(errors.InvalidArgument):
        mem.add(sid, gaussian(1, DIM, 1), vals(1, 2)[:, :1])        # wrong value dim
    with pytest.raises(errors.NotFound, match="expired"):
        mem.search([sid, gone], gaussian(1, DIM, 3), 2)
    assert mem.session_info(sid).last_used_at == t0
    mem.search(sid, gaussian(1, DIM, 3), 2)
    assert mem.session_info(sid).last_used_at == t0 + 5


def test_absolute_ttl_ignores_use(rig, clock):
    mem = rig.mem
    baseline = tenant_used(mem)
    t0 = clock.now
    sid = mem.open_session(spec(ttl_absolute_s=30, ttl_idle_s=20)).session_id
    for _ in range(3):                                 # used every 9 s: idle never fires
        clock.advance(9)
        mem.append(sid, gaussian(1, DIM, 1), vals(1, 2))
        mem.search(sid, gaussian(1, DIM, 3), 1)
    assert mem.session_info(sid).expires_at == t0 + 30
    clock.advance(2.75)                                # t0 + 29.75
    assert mem.session_info(sid).bank.count == 3
    clock.advance(0.25)                                # t0 + 30
    assert_gone(mem, sid)
    assert tenant_used(mem) > baseline                 # not reaped yet: bytes still held
    assert rig.local.reap_expired() == 1
    assert tenant_used(mem) == baseline


def test_extend_resets_idle_clock_and_absolute_counts_from_now(rig, clock):
    mem = rig.mem
    t0 = clock.now
    sid = mem.open_session(spec(ttl_idle_s=10, ttl_absolute_s=30)).session_id
    clock.advance(8)
    info = mem.extend_session(sid)                     # idle clock restarts
    assert info.last_used_at == t0 + 8 and info.expires_at == t0 + 18
    clock.advance(9)                                   # t0 + 17
    info = mem.extend_session(sid, ttl_idle_s=50)      # new idle ttl; absolute still t0+30
    assert info.ttl_idle_s == 50 and info.expires_at == t0 + 30
    clock.advance(12)                                  # t0 + 29
    info = mem.extend_session(sid, ttl_absolute_s=20)  # counts from now: t0 + 49
    assert info.expires_at == t0 + 49
    clock.advance(19.5)                                # t0 + 48.5 (idle deadline t0 + 79)
    assert mem.session_info(sid).session_id == sid
    clock.advance(0.5)
    assert_gone(mem, sid)
    with pytest.raises(errors.InvalidArgument):
        mem.extend_session(mem.open_session(spec()).session_id, ttl_idle_s=-1)


def test_close_session_releases_its_bytes(rig):
    mem = rig.mem
    baseline = tenant_used(mem)
    sid = mem.open_session(spec(ttl_idle_s=100)).session_id
    mem.append(sid, gaussian(20, DIM, 1), vals(20, 2), scores=np.arange(20))
    held = mem.session_info(sid).bank.used_bytes
    assert tenant_used(mem) == baseline + held
    assert mem.close_session(sid) == held
    assert tenant_used(mem) == baseline
    assert_gone(mem, sid)
    with pytest.raises(errors.NotFound):
        mem.close_session(sid)
    with pytest.raises(errors.NotFound):
        mem.session_info("s-0000000000000000")


def test_close_of_an_expired_session_releases_its_bytes(rig, clock):
    mem = rig.mem
    baseline = tenant_used(mem)
    sid = mem.open_session(spec(ttl_idle_s=5)).session_id
    mem.append(sid, gaussian(4, DIM, 1), vals(4, 2))
    held = rig.local.bank_info(sid).used_bytes
    clock.advance(5)
    assert mem.close_session(sid) == held
    assert tenant_used(mem) == baseline
    assert rig.local.reap_expired() == 0


# ---- promotion ----------------------------------------------------------------------------

def _target(mem, make_bank, **kw):
    return make_bank(mem, dim=DIM, value_dim=VDIM, kind="domain", **kw).name


def test_promote_by_min_score_picks_exactly_those_rows(rig, make_bank):
    mem = rig.mem
    target = _target(mem, make_bank)
    sid = mem.open_session(spec()).session_id
    k1, v1 = gaussian(10, DIM, 1), vals(10, 2)
    scores = np.array([0.9, 0.1, 0.5, 0.49, 0.7, -1, 0.5001, 0.2, 3.0, 0.0], np.float32)
    ids1 = mem.append(sid, k1, v1, scores=scores)
    k2, v2 = gaussian(3, DIM, 3), vals(3, 4)
    mem.append(sid, k2, v2)                          # no scores: never selected by score
    res = mem.promote_session(sid, target, min_score=0.5)
    want = scores >= 0.5
    assert res.promoted == int(want.sum()) == 5 and res.duplicates == 0 and not res.moved
    np.testing.assert_array_equal(np.sort(res.source_ids), np.sort(ids1[want]))
    assert len(res.target_ids) == 5 and len(np.unique(res.target_ids)) == 5
    got = mem.get(target, res.target_ids, values=True, keys=True)
    assert got.found.all()
    rows = rows_of(ids1, res.source_ids)
    np.testing.assert_array_equal(got.keys, k1[rows])
    np.testing.assert_array_equal(got.values, v1[rows])
    assert mem.bank_info(target).count == 5
    assert mem.session_info(sid).bank.count == 13        # copied, not moved
    none = mem.promote_session(sid, target, min_score=10.0)
    assert none.promoted == 0 and len(none.target_ids) == 0
    assert mem.bank_info(target).count == 5


def test_promote_by_ids(rig, make_bank):
    mem = rig.mem
    target = _target(mem, make_bank)
    mem.add(target, gaussian(4, DIM, 50), vals(4, 51))
    sid = mem.open_session(spec()).session_id
    k, v = gaussian(8, DIM, 1), vals(8, 2)
    ids = mem.append(sid, k, v, scores=np.linspace(0, 1, 8))
    pick = ids[[6, 1, 3]]
    res = mem.promote_session(sid, target, ids=pick)
    assert res.promoted == 3
    np.testing.assert_array_equal(np.sort(res.source_ids), np.sort(pick))
    got = mem.get(target, res.target_ids, keys=True)
    np.testing.assert_array_equal(got.keys, k[rows_of(ids, res.source_ids)])
    np.testing.assert_array_equal(got.values, v[rows_of(ids, res.source_ids)])
    assert mem.bank_info(target).count == 7
    # ids and min_score together: the rows that satisfy both
    both = mem.promote_session(sid, target, ids=ids[[0, 5, 7]], min_score=0.6)
    np.testing.assert_array_equal(np.sort(both.source_ids), np.sort(ids[[5, 7]]))
    with pytest.raises(errors.NotFound):
        mem.promote_session(sid, target, ids=[ids.max() + 100])
    assert mem.bank_info(target).count == 9


def test_promote_dedup_skips_near_duplicates_in_session_and_target(rig, make_bank, request):
    if rig.kind == "sharded":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "a sharded memory: dedup against the target sees the target's slice on the "
            "session's shard only (memoryd.cluster.sharded)")))
    mem = rig.mem
    target = _target(mem, make_bank)
    base = gaussian(6, DIM, 1)
    a, b, c, d, e, f = base
    noise = 1e-3 * gaussian(4, DIM, 2)
    mem.add(target, np.stack([c + noise[0], f]), vals(2, 3))   # c is already there
    sid = mem.open_session(spec()).session_id
    keys = np.stack([a, a + noise[1], b, c, d, 2.0 * d, e, b + noise[2]]).astype(np.float32)
    #          keep   dup of a      keep dup(t) keep  dup (cosine 1) keep  dup of b
    ids = mem.append(sid, keys, vals(8, 4))
    res = mem.promote_session(sid, target, dedup=0.99)
    assert res.duplicates == 4
    assert res.promoted == 4
    np.testing.assert_array_equal(res.source_ids, ids[[0, 2, 4, 6]])
    got = mem.get(target, res.target_ids, keys=True)
    np.testing.assert_array_equal(got.keys, keys[[0, 2, 4, 6]])
    assert mem.bank_info(target).count == 6
    # promoting again with dedup finds everything already there
    again = mem.promote_session(sid, target, dedup=0.99)
    assert again.promoted == 0 and again.duplicates == 8
    assert mem.bank_info(target).count == 6
    # without dedup, all of them go
    assert mem.promote_session(sid, target).promoted == 8
    with pytest.raises(errors.InvalidArgument):
        mem.promote_session(sid, target, dedup=1.5)


@pytest.mark.parametrize("move", [True, False])
def test_promote_move_removes_from_session(rig, make_bank, move):
    mem = rig.mem
    target = _target(mem, make_bank)
    sid = mem.open_session(spec()).session_id
    k, v = gaussian(10, DIM, 1), vals(10, 2)
    sc = np.arange(10, dtype=np.float32)
    ids = mem.append(sid, k, v, scores=sc)
    res = mem.promote_session(sid, target, min_score=6, move=move)
    assert res.moved is move and res.promoted == 4
    np.testing.assert_array_equal(np.sort(res.source_ids), ids[6:])
    left_ids, left_keys, _ = session_rows(mem, sid)
    found = mem.get(sid, ids[6:]).found
    if move:
        np.testing.assert_array_equal(left_ids, ids[:6])
        np.testing.assert_array_equal(left_keys, k[:6])
        assert not found.any()
        assert mem.session_info(sid).bank.count == 6
        # the session's hits no longer include the moved rows; the target's do
        r = mem.search(sid, k[6:], 1)
        assert not np.isin(r.ids, ids[6:]).any()
    else:
        np.testing.assert_array_equal(left_ids, ids)
        assert found.all()
        assert mem.session_info(sid).bank.count == 10
    r = mem.search(target, k[6:], 1, values=True)
    np.testing.assert_array_equal(np.sort(r.ids[:, 0]), np.sort(res.target_ids))
    np.testing.assert_array_equal(r.values[:, 0], v[6:])
    # byte accounting follows the rows
    banks = mem.list_banks("default")
    assert tenant_used(mem) == sum(b.used_bytes for b in banks)


def test_promote_refuses_non_domain_targets_and_shape_mismatch(rig, make_bank):
    mem = rig.mem
    sid = mem.open_session(spec()).session_id
    mem.append(sid, gaussian(3, DIM, 1), vals(3, 2))
    base = make_bank(mem, dim=DIM, value_dim=VDIM, kind="base").name
    other = mem.open_session(spec()).session_id
    for target in (base, other):
        with pytest.raises(errors.FailedPrecondition):
            mem.promote_session(sid, target)
        assert mem.bank_info(target).count == 0
    for shape in (dict(dim=DIM + 1, value_dim=VDIM), dict(dim=DIM, value_dim=VDIM + 1),
                  dict(dim=DIM, value_dim=VDIM, metric="ip")):
        t = make_bank(mem, kind="domain", **shape).name
        with pytest.raises(errors.InvalidArgument):
            mem.promote_session(sid, t)
        assert mem.bank_info(t).count == 0
    with pytest.raises(errors.NotFound):
        mem.promote_session(sid, "no-such-bank")
    assert mem.session_info(sid).bank.count == 3


def test_promote_over_target_quota_writes_nothing(rig, make_bank):
    mem = rig.mem
    sid = mem.open_session(spec()).session_id
    ids = mem.append(sid, gaussian(6, DIM, 1), vals(6, 2))
    target = _target(mem, make_bank)
    assert mem.bank_info(target).used_bytes == 0        # empty: nothing charged
    fixed, row = row_bytes(mem)                          # a 1-shard Flat bank, like the target
    row -= 4                                             # but without the session's scores
    mem.set_quota(target, fixed + 5 * row + row // 2)   # room for 5 of the 6
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.promote_session(sid, target, move=True)
    # the first rows into an empty bank bring the index's fixed bytes with them
    assert (e.value.used, e.value.requested) == (0, fixed + 6 * row)
    assert mem.bank_info(target).count == 0 and mem.bank_info(target).used_bytes == 0
    np.testing.assert_array_equal(session_rows(mem, sid)[0], ids)


# ---- quotas: fifo and reject -----------------------------------------------------------

def test_fifo_session_keeps_the_newest_rows(rig):
    mem = rig.mem
    fixed, row = row_bytes(mem)
    M = 7
    quota = fixed + M * row + row // 2              # room for 7 rows, not 8
    sid = mem.open_session(spec(quota_bytes=quota, eviction="fifo")).session_id
    assert mem.session_info(sid).bank.used_bytes == 0
    all_ids, all_keys = [], []
    # the batch of 7 evicts all 7 rows held (the bank empties) and refills it
    for i, n in enumerate([3, 3, 2, 5, 1, 4, 3, 7, 2]):     # 30 rows in all
        k = gaussian(n, DIM, 100 + i)
        ids = mem.append(sid, k, vals(n, 200 + i))
        all_ids.append(ids)
        all_keys.append(k)
        info = mem.session_info(sid).bank
        assert info.used_bytes <= quota
        held = min(M, sum(len(x) for x in all_ids))
        assert info.count == held and info.used_bytes == fixed + held * row
    all_ids, all_keys = np.concatenate(all_ids), np.concatenate(all_keys)
    assert len(np.unique(all_ids)) == 30                  # ids are never reused
    left_ids, left_keys, _ = session_rows(mem, sid)
    np.testing.assert_array_equal(left_ids, all_ids[-M:])
    np.testing.assert_array_equal(left_keys, all_keys[-M:])
    assert mem.tenant_info("default").used_bytes == sum(
        b.used_bytes for b in mem.list_banks("default"))


def test_fifo_batch_larger_than_the_quota_is_refused_and_evicts_nothing(rig):
    mem = rig.mem
    fixed, row = row_bytes(mem)
    quota = fixed + 7 * row + row // 2
    sid = mem.open_session(spec(quota_bytes=quota, eviction="fifo")).session_id
    ids = mem.append(sid, gaussian(5, DIM, 1), vals(5, 2))
    assert mem.session_info(sid).bank.used_bytes == fixed + 5 * row
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.append(sid, gaussian(8, DIM, 3), vals(8, 4))      # cannot fit even emptied
    assert (e.value.used, e.value.limit, e.value.requested) == (fixed + 5 * row, quota, 8 * row)
    info = mem.session_info(sid).bank
    assert info.count == 5 and info.used_bytes == fixed + 5 * row
    np.testing.assert_array_equal(session_rows(mem, sid)[0], ids)


def test_reject_session_raises_and_writes_nothing(rig):
    mem = rig.mem
    fixed, row = row_bytes(mem)
    quota = fixed + 7 * row + row // 2
    sid = mem.open_session(spec(quota_bytes=quota)).session_id
    k = gaussian(6, DIM, 1)
    ids = mem.append(sid, k, vals(6, 2), scores=np.ones(6))
    before = tenant_used(mem)
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.append(sid, gaussian(2, DIM, 3), vals(2, 4), scores=np.ones(2))
    assert (e.value.used, e.value.limit, e.value.requested) == (fixed + 6 * row, quota, 2 * row)
    assert sid in str(e.value)
    info = mem.session_info(sid).bank
    assert info.count == 6 and info.used_bytes == fixed + 6 * row
    assert tenant_used(mem) == before
    np.testing.assert_array_equal(session_rows(mem, sid)[0], ids)
    mem.append(sid, gaussian(1, DIM, 5), vals(1, 6))            # one more still fits
    assert mem.session_info(sid).bank.count == 7


# ---- restart ------------------------------------------------------------------------------

def test_session_survives_close_and_reopen(rig, clock, make_bank):
    mem = rig.mem
    t0 = clock.now
    info = mem.open_session(spec(ttl_idle_s=100, ttl_absolute_s=1000, tenant="acme",
                                 quota_bytes=10**6, eviction="fifo"))
    sid = info.session_id
    k, v = gaussian(12, DIM, 1), vals(12, 2)
    ids = mem.append(sid, k, v, scores=np.arange(12, dtype=np.float32))
    clock.advance(10)
    mem.append(sid, gaussian(2, DIM, 3), vals(2, 4))          # persisted last use: t0 + 10
    before = mem.session_info(sid)
    used = mem.tenant_info("acme").used_bytes
    rig.reopen()
    mem = rig.mem
    after = mem.session_info(sid)
    assert after.session_id == sid and after.tenant == "acme"
    assert (after.created_at, after.last_used_at, after.expires_at) == (t0, t0 + 10, t0 + 110)
    assert (after.ttl_idle_s, after.ttl_absolute_s) == (100, 1000)
    assert after.bank.count == 14 and after.bank.used_bytes == before.bank.used_bytes
    assert after.bank.spec.quota_bytes == 10**6 and after.bank.spec.eviction == "fifo"
    assert mem.tenant_info("acme").used_bytes == used
    assert [s.session_id for s in mem.list_sessions()] == [sid]
    got_ids, got_keys, got_vals = session_rows(mem, sid)
    np.testing.assert_array_equal(got_ids[:12], ids)
    np.testing.assert_array_equal(got_keys[:12], k)
    np.testing.assert_array_equal(got_vals[:12], v)
    r = mem.search(sid, k[:3], 1)
    np.testing.assert_array_equal(r.ids[:, 0], ids[:3])
    # scores came back too: promotion by score after the restart
    target = _target(mem, make_bank, tenant="acme")
    res = mem.promote_session(sid, target, min_score=9)
    np.testing.assert_array_equal(np.sort(res.source_ids), ids[9:])
    # new ids continue after the old ones
    new = mem.append(sid, gaussian(1, DIM, 5), vals(1, 6))
    assert new[0] > got_ids.max()
    # the TTL still runs from the persisted clock
    clock.advance(99.5)                                 # last used t0 + 10: deadline t0 + 110
    assert mem.session_info(sid).expires_at == t0 + 110
    clock.advance(0.5)
    assert_gone(mem, sid)


def test_search_use_before_a_restart_keeps_the_session_alive(rig, clock):
    """A search restarts the idle clock; a graceful close must not forget that."""
    mem = rig.mem
    t0 = clock.now
    sid = mem.open_session(spec(ttl_idle_s=10)).session_id
    mem.append(sid, gaussian(2, DIM, 1), vals(2, 2))
    clock.advance(8)
    mem.search(sid, gaussian(1, DIM, 3), 1)             # idle deadline now t0 + 18
    assert mem.session_info(sid).expires_at == t0 + 18
    rig.reopen()
    clock.advance(4)                                    # t0 + 12
    assert rig.mem.session_info(sid).expires_at == t0 + 18


def test_session_that_expired_while_down_is_gone_after_reopen(rig, clock):
    """Expiry during downtime: the data dir opens, the session is gone, reap frees it."""
    mem = rig.mem
    baseline = tenant_used(mem)
    sid = mem.open_session(spec(ttl_absolute_s=10)).session_id
    mem.append(sid, gaussian(3, DIM, 1), vals(3, 2), scores=[1, 2, 3])
    keep = mem.open_session(spec()).session_id
    rig.stop()
    clock.advance(60)
    rig.start()                                          # must not fail on the expired session
    mem = rig.mem
    assert_gone(mem, sid)
    assert [s.session_id for s in mem.list_sessions()] == [keep]
    rig.local.reap_expired()
    assert tenant_used(mem) == baseline + mem.session_info(keep).bank.used_bytes


def test_listing_banks_while_sessions_close_never_fails(tmp_path):
    """bench_load found list_banks/stats INTERNAL when a session's folder went
    between the catalog read and the sizing of its files."""
    import threading
    from memoryd.engine import LocalMemory
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        stop, errs, churned = threading.Event(), [], [0]

        def churn():
            while not stop.is_set():
                s = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM))
                mem.append(s.session_id, gaussian(4, DIM, 1), vals(4, 2))
                mem.close_session(s.session_id)
                churned[0] += 1

        t = threading.Thread(target=churn)
        t.start()
        try:
            for _ in range(1500):
                try:
                    mem.list_banks()
                    mem.stats()
                except Exception as e:   # noqa: BLE001 - any failure is the bug
                    errs.append(repr(e))
        finally:
            stop.set()
            t.join()
        assert errs == [] and churned[0] > 20
