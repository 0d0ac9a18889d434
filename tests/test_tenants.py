"""Tenant and bank quotas on both backends: raising and lowering, fifo banks
shrinking to a lowered quota, a tenant's quota over all its banks and
sessions, and concurrent writers that must never take usage above a quota
nor make the catalog drift from what the banks hold."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from memoryd.sizes import describe_size

from memoryd import errors
from memoryd.api import SessionSpec
from conftest import unique_name
from reference import gaussian

DIM, VDIM = 8, 4
ROW = 8 + 4 * DIM + 4 * VDIM    # id, key, value: a Flat bank's index is its key column


def new_bank(mem, make_bank, tenant, **kw):
    spec = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=tenant, **kw)
    return spec.name


def add(mem, name, n, seed=0):
    return mem.add(name, gaussian(n, DIM, seed), gaussian(n, VDIM, seed + 1))


def sizes(mem, make_bank) -> tuple[int, int]:
    """(fixed bytes of a 1-shard bank, bytes per row), measured.

    An empty bank counts 0; with n >= 1 rows it counts shards * fixed + n *
    row (the index's fixed bytes are charged with the first rows). Measured
    from one bank at 1 and at 3 rows.
    """
    probe = new_bank(mem, make_bank, "probe")
    assert mem.bank_info(probe).used_bytes == 0 == used(mem, "probe")
    add(mem, probe, 1)
    one = mem.bank_info(probe).used_bytes
    add(mem, probe, 2, seed=5)
    three = mem.bank_info(probe).used_bytes
    assert (three - one) % 2 == 0
    row = (three - one) // 2
    fixed = one - row
    assert row == ROW and fixed == 0
    assert used(mem, "probe") == three
    assert mem.delete_bank(probe) == three
    assert used(mem, "probe") == 0
    return fixed, row


def used(mem, tenant) -> int:
    return mem.tenant_info(tenant).used_bytes


def assert_tenant_consistent(mem, tenant):
    banks = mem.list_banks(tenant)
    assert used(mem, tenant) == sum(b.used_bytes for b in banks)


def test_raising_a_tenant_quota_takes_effect_at_once(rig, make_bank):
    mem = rig.mem
    fixed, row = sizes(mem, make_bank)
    t = unique_name("t")
    a = new_bank(mem, make_bank, t)
    add(mem, a, 5)
    u = used(mem, t)
    assert u == fixed + 5 * row
    info = mem.set_tenant_quota(t, u + 2 * row)
    assert info.quota_bytes == u + 2 * row and info.used_bytes == u
    with pytest.raises(errors.QuotaExceeded) as e:
        add(mem, a, 3, seed=10)
    assert t in str(e.value)
    assert (e.value.used, e.value.limit, e.value.requested) == (u, u + 2 * row, 3 * row)
    assert mem.bank_info(a).count == 5 and mem.bank_info(a).used_bytes == u and used(mem, t) == u
    mem.set_tenant_quota(t, u + 3 * row)
    add(mem, a, 3, seed=10)                              # the same add now fits exactly
    assert used(mem, t) == u + 3 * row == mem.tenant_info(t).quota_bytes
    with pytest.raises(errors.QuotaExceeded):
        add(mem, a, 1, seed=20)
    assert mem.set_tenant_quota(t, None).quota_bytes is None
    add(mem, a, 50, seed=30)
    assert mem.bank_info(a).count == 58
    assert_tenant_consistent(mem, t)


def test_lowering_a_tenant_quota_below_usage_is_refused(rig, make_bank):
    mem = rig.mem
    t = unique_name("t")
    a = new_bank(mem, make_bank, t)
    add(mem, a, 10)
    u = used(mem, t)
    mem.set_tenant_quota(t, u + 1000)
    with pytest.raises(errors.FailedPrecondition) as e:
        mem.set_tenant_quota(t, u - 1)
    assert describe_size(u) in str(e.value) and describe_size(u - 1) in str(e.value)
    assert mem.tenant_info(t).quota_bytes == u + 1000
    assert mem.set_tenant_quota(t, u).quota_bytes == u     # exactly the usage is fine
    with pytest.raises(errors.InvalidArgument):
        mem.set_tenant_quota(t, -5)


def test_bank_quota_below_usage_refused_unless_fifo(rig, make_bank):
    mem = rig.mem
    fixed, row = sizes(mem, make_bank)
    t = unique_name("t")
    rej = new_bank(mem, make_bank, t)
    add(mem, rej, 10)
    u = mem.bank_info(rej).used_bytes
    with pytest.raises(errors.FailedPrecondition) as e:
        mem.set_quota(rej, u - row)
    assert describe_size(u) in str(e.value)
    info = mem.bank_info(rej)
    assert info.spec.quota_bytes is None and info.count == 10 and info.used_bytes == u
    # raising a bank quota takes effect at once
    mem.set_quota(rej, u + row)
    with pytest.raises(errors.QuotaExceeded) as e:
        add(mem, rej, 2, seed=5)
    assert rej in str(e.value) and e.value.limit == u + row
    mem.set_quota(rej, u + 2 * row)
    add(mem, rej, 2, seed=5)
    assert mem.bank_info(rej).used_bytes == u + 2 * row

    fifo = new_bank(mem, make_bank, t, shards=2, eviction="fifo")
    assert mem.bank_info(fifo).used_bytes == 0                              # empty: 0
    fixed2 = 2 * fixed                                   # both shards' index bytes
    ids = np.concatenate([add(mem, fifo, 4, seed=s) for s in range(5)])     # 20 rows
    assert mem.bank_info(fifo).used_bytes == fixed2 + 20 * row
    before_t = used(mem, t)
    info = mem.set_quota(fifo, fixed2 + 6 * row + row // 2)                   # room for 6
    assert info.spec.quota_bytes == fixed2 + 6 * row + row // 2
    info = mem.bank_info(fifo)
    assert info.count == 6 and info.used_bytes == fixed2 + 6 * row
    left = np.sort(np.concatenate([c.ids for c in mem.export(fifo)]))
    if rig.kind != "sharded":
        np.testing.assert_array_equal(left, ids[-6:])
        assert mem.get(fifo, ids[:14]).found.sum() == 0
    else:   # no clock across shards: each evicts its own oldest, shard by shard
        assert len(left) == 6 and set(left) <= set(ids.tolist())
    assert used(mem, t) == before_t - 14 * row
    assert_tenant_consistent(mem, t)
    # a quota below even one row empties a fifo bank: back to 0 bytes
    mem.set_quota(fifo, row // 2)
    info = mem.bank_info(fifo)
    assert info.count == 0 and info.used_bytes == 0
    assert sum(len(c.ids) for c in mem.export(fifo)) == 0
    assert used(mem, t) == before_t - 20 * row - fixed2
    assert_tenant_consistent(mem, t)
    with pytest.raises(errors.QuotaExceeded) as e:       # the first row brings the fixed bytes
        add(mem, fifo, 1, seed=40)
    assert (e.value.used, e.value.limit, e.value.requested) == (0, row // 2, fixed2 + row)
    assert mem.bank_info(fifo).used_bytes == 0


def test_tenant_quota_covers_all_its_banks_and_sessions(rig, make_bank):
    mem = rig.mem
    fixed, row = sizes(mem, make_bank)
    t, other = unique_name("t"), unique_name("t")
    a, b = new_bank(mem, make_bank, t), new_bank(mem, make_bank, t, shards=2)
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t)).session_id
    o = new_bank(mem, make_bank, other)
    base = used(mem, t)
    assert base == 0                                     # empty banks and sessions: 0
    srow = row + 4                                       # a session's rows carry a score
    # the fixed bytes of a (1 shard), b (2 shards) and the session (1), and 10 rows
    quota = base + 4 * fixed + 8 * row + 2 * srow
    mem.set_tenant_quota(t, quota)
    add(mem, a, 4)
    add(mem, b, 4, seed=3)
    assert used(mem, t) == base + 3 * fixed + 8 * row
    with pytest.raises(errors.QuotaExceeded) as e:       # only 2 rows of room left
        mem.append(sid, gaussian(3, DIM, 5), gaussian(3, VDIM, 6))
    assert t in str(e.value) and e.value.limit == quota
    assert (e.value.used, e.value.requested) == (base + 3 * fixed + 8 * row, fixed + 3 * srow)
    assert mem.session_info(sid).bank.count == 0 and mem.session_info(sid).bank.used_bytes == 0
    mem.append(sid, gaussian(2, DIM, 5), gaussian(2, VDIM, 6))
    assert used(mem, t) == quota
    for name in (a, b):
        with pytest.raises(errors.QuotaExceeded):
            add(mem, name, 1, seed=7)
    add(mem, o, 30, seed=8)                              # another tenant is not affected
    released = mem.close_session(sid)
    assert released == fixed + 2 * srow
    add(mem, a, 2, seed=9)
    assert mem.tenant_info(t).sessions == 0 and mem.tenant_info(t).banks == 2
    assert_tenant_consistent(mem, t)


def test_fifo_session_makes_room_under_its_tenant_quota(rig, make_bank):
    """A full tenant: a fifo session evicts its own oldest rows, nobody else's."""
    mem = rig.mem
    fixed, row = sizes(mem, make_bank)
    t = unique_name("t")
    a = new_bank(mem, make_bank, t)
    a_ids = add(mem, a, 4)
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t, eviction="fifo")).session_id
    assert used(mem, t) == fixed + 4 * row               # the empty session adds nothing
    quota = used(mem, t) + fixed + 10 * (row + 4)        # the session can hold 10 rows (+ scores)
    mem.set_tenant_quota(t, quota)
    ids = []
    for i in range(9):                                   # 27 rows in batches of 3
        ids.append(mem.append(sid, gaussian(3, DIM, 40 + i), gaussian(3, VDIM, 60 + i)))
        assert used(mem, t) <= quota
        assert mem.session_info(sid).bank.count == min(10, 3 * (i + 1))
    ids = np.concatenate(ids)
    left = np.sort(np.concatenate([c.ids for c in mem.export(sid)]))
    np.testing.assert_array_equal(left, ids[-10:])
    np.testing.assert_array_equal(np.sort(np.concatenate([c.ids for c in mem.export(a)])), a_ids)
    with pytest.raises(errors.QuotaExceeded) as e:       # more than the session could ever hold
        mem.append(sid, gaussian(11, DIM, 90), gaussian(11, VDIM, 91))
    assert t in str(e.value) and "tenant" in str(e.value)
    np.testing.assert_array_equal(np.sort(np.concatenate([c.ids for c in mem.export(sid)])), ids[-10:])
    assert_tenant_consistent(mem, t)


def test_session_or_empty_bank_in_a_full_tenant_stays_within_quota_and_consistent(rig, make_bank):
    mem = rig.mem
    t = unique_name("t")
    a = new_bank(mem, make_bank, t)
    add(mem, a, 3)
    quota = used(mem, t)
    mem.set_tenant_quota(t, quota)                       # full
    # an empty session or bank holds 0 bytes: opening one needs no quota
    info = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t))
    assert info.bank.used_bytes == 0
    assert used(mem, t) == quota
    assert_tenant_consistent(mem, t)          # and what it holds is what it is charged
    empty = new_bank(mem, make_bank, t)          # an empty bank, too
    assert mem.bank_info(empty).used_bytes == 0
    assert used(mem, t) == quota
    assert_tenant_consistent(mem, t)
    with pytest.raises(errors.QuotaExceeded):            # but their first row needs room
        mem.append(info.session_id, gaussian(1, DIM, 1), gaussian(1, VDIM, 2))
    assert used(mem, t) == quota


# ---- concurrency --------------------------------------------------------------------------

def test_concurrent_writers_never_pass_the_tenant_quota(rig, make_bank):
    """8 threads append to sessions and add to banks of one tenant (reject and
    fifo, some removing too) under a small tenant quota; a sampler reads the
    tenant's usage all along. Through the daemon every thread has its own
    MemoryClient connection."""
    mem = rig.mem
    t = unique_name("t")
    targets = []
    for i in range(8):
        fifo = i in (2, 3, 7)
        if i % 2 == 0:
            sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t,
                                               eviction="fifo" if fifo else "reject")).session_id
            targets.append(("session", sid))
        else:
            name = new_bank(mem, make_bank, t, shards=1 + i % 3,
                            eviction="fifo" if fifo else "reject")
            targets.append(("bank", name))
    assert used(mem, t) == 0                             # empty sessions and banks: 0
    quota = used(mem, t) + 60 * ROW
    mem.set_tenant_quota(t, quota)

    def client(name):
        return mem if rig.kind == "local" else rig.connect(name)

    stop = threading.Event()
    samples: list[int] = []
    failures: list[BaseException] = []
    sample_errors: list[BaseException] = []
    counts = {"ok": 0, "quota": 0}
    lock = threading.Lock()

    sampling = threading.Event()

    def sampler():
        m = client("sampler")
        while not stop.is_set():
            try:
                samples.append(m.tenant_info(t).used_bytes)
            except BaseException as e:  # noqa: BLE001 - reported at the end
                sample_errors.append(e)
            sampling.set()

    def writer(i):
        kind, name = targets[i]
        m = client(f"writer-{i}")
        rng = np.random.default_rng(i)
        try:
            for step in range(25):
                n = int(rng.integers(1, 5))
                k = rng.standard_normal((n, DIM)).astype(np.float32)
                v = rng.standard_normal((n, VDIM)).astype(np.float32)
                try:
                    if kind == "session":
                        m.append(name, k, v, scores=rng.random(n))
                    else:
                        m.add(name, k, v)
                    with lock:
                        counts["ok"] += 1
                except errors.QuotaExceeded:
                    with lock:
                        counts["quota"] += 1
                if step % 5 == 4:                      # free some room now and then
                    ids = np.concatenate([c.ids for c in m.export(name)] or [np.empty(0, np.int64)])
                    if len(ids):
                        m.remove(name, ids[: max(1, len(ids) // 3)])
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    watch = threading.Thread(target=sampler)
    watch.start()
    assert sampling.wait(30)          # the writers start once the sampler is reading
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    stop.set()
    watch.join(30)
    assert not failures, failures[:3]
    assert counts["ok"] > 20 and counts["quota"] > 0, counts   # the quota did bind
    assert samples                    # the sampler read usage while the writers ran
    assert max(samples) <= quota, (max(samples), quota)

    # the catalog equals what the banks hold ...
    final = used(mem, t)
    assert final <= quota
    infos = {b.name: b for b in mem.list_banks(t)}
    assert final == sum(b.used_bytes for b in infos.values())
    for name, info in infos.items():
        slices = [s.engine.bank(name) for s in getattr(rig.local, "shards", [rig.local])
                  if name in s.engine._banks]        # a sharded rig: the bank's slices
        assert info.used_bytes == sum(b.nbytes() for b in slices), name
        assert info.count == sum(b.count for b in slices) \
            == sum(len(c.ids) for c in mem.export(name)), name
    # ... and what a fresh LocalMemory on the same dir reconciles to
    rig.reopen()
    mem = rig.mem
    assert used(mem, t) == final
    for name, info in infos.items():
        again = mem.bank_info(name)
        assert (again.used_bytes, again.count) == (info.used_bytes, info.count), name
    # Failed reads of usage during the writes are test_usage_reads_survive_concurrent_writes'
    # business; here they only must not be the norm.
    assert len(sample_errors) < len(samples), sample_errors[:2]


def test_usage_reads_survive_concurrent_writes(rig, make_bank):
    """bank_info / tenant_info / list_banks / stats while another thread adds
    and removes (removes switch a shard to new files and delete the old)."""
    mem = rig.mem
    t = unique_name("t")
    names = [new_bank(mem, make_bank, t, shards=4), new_bank(mem, make_bank, t, tier="mmap"),
             new_bank(mem, make_bank, t, shards=2)]
    for n in names:
        add(mem, n, 20)
    stop = threading.Event()
    errs: list[BaseException] = []

    def writer(name, seed):
        m = mem if rig.kind == "local" else rig.connect(f"w-{seed}")
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                ids = m.add(name, rng.standard_normal((4, DIM)).astype(np.float32),
                            rng.standard_normal((4, VDIM)).astype(np.float32))
                m.remove(name, ids[:3])
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    writers = [threading.Thread(target=writer, args=(n, i)) for i, n in enumerate(names)]
    for w in writers:
        w.start()
    calls = 0
    try:
        for _ in range(80):
            for read in (lambda: mem.bank_info(names[0]), lambda: mem.bank_info(names[1]),
                         lambda: mem.bank_info(names[2]), lambda: mem.tenant_info(t),
                         lambda: mem.list_banks(t), mem.stats):
                try:
                    read()
                    calls += 1
                except BaseException as e:  # noqa: BLE001
                    errs.append(e)
    finally:
        stop.set()
        for w in writers:
            w.join(60)
    assert not errs, f"{len(errs)} of {calls + len(errs)} calls failed, e.g. {errs[:2]}"
    assert_tenant_consistent(mem, t)
