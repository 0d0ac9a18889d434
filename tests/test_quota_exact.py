"""Quota boundaries to the byte, on both backends (the `mem` fixture).

Every quota here is set to exactly what a write brings the usage to (the
write must be accepted and usage must equal the quota), or to one byte less
(the write must be refused and change nothing). No byte cost is hardcoded:
each test first replays the same adds into a probe bank of the same spec, in
a tenant of its own, and reads the cumulative `BankInfo.used_bytes` after
each batch (then deletes the probe), so the tests hold whatever a row or an
index costs once storage is laid out differently.
"""
from __future__ import annotations

import numpy as np
import pytest

from memoryd import errors
from memoryd.api import SessionSpec
from conftest import unique_name
from reference import gaussian

DIM, VDIM = 8, 4


def keys(n: int, seed: int) -> np.ndarray:
    return gaussian(n, DIM, seed)


def vals(n: int, seed: int) -> np.ndarray:
    return gaussian(n, VDIM, seed + 7919)


def batches_of(sizes, seed0=0):
    """[(keys, values)] of the given batch sizes, deterministic."""
    return [(keys(n, seed0 + i), vals(n, seed0 + i)) for i, n in enumerate(sizes)]


def usage_after(mem, make_bank, batches, **spec) -> list[int]:
    """Cumulative used_bytes of a bank of `spec` after each batch (probe bank,
    own tenant, deleted afterwards: it leaves no bytes behind)."""
    tenant = unique_name("probe")
    probe = make_bank(mem, dim=DIM, value_dim=VDIM, **{**spec, "tenant": tenant}).name
    assert mem.bank_info(probe).used_bytes == 0
    out = []
    for k, v in batches:
        mem.add(probe, k, v)
        out.append(mem.bank_info(probe).used_bytes)
    assert mem.delete_bank(probe) == out[-1]
    assert mem.tenant_info(tenant).used_bytes == 0
    assert all(b > a for a, b in zip([0] + out, out)), out     # every row costs something
    return out


def session_usage_after(mem, batches, **spec) -> list[int]:
    """The same for a session bank (appends), in its own tenant; closed afterwards."""
    tenant = unique_name("probe")
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=tenant, **spec)).session_id
    out = []
    for k, v in batches:
        mem.append(sid, k, v)
        out.append(mem.session_info(sid).bank.used_bytes)
    assert mem.close_session(sid) == out[-1]
    return out


def ids_of(mem, name: str) -> np.ndarray:
    chunks = list(mem.export(name))
    return np.sort(np.concatenate([c.ids for c in chunks])) if chunks else np.empty(0, np.int64)


def assert_refused(e, *, used: int, limit: int, requested: int, scope: str = "bank") -> None:
    assert (e.value.used, e.value.limit, e.value.requested) == (used, limit, requested)
    assert e.value.scope == scope


# ---- bank quota on add -------------------------------------------------------------------

SPECS = {"flat": {}, "2 shards": {"shards": 2}, "fp16 values": {"value_dtype": "float16"},
         "HNSW": {"index": "HNSW8"}}


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
def test_bank_quota_on_add_is_exact(mem, make_bank, spec):
    kw = SPECS[spec]
    data = batches_of([3, 1, 1])
    u3, u4, u5 = usage_after(mem, make_bank, data, **kw)

    # the first add of an empty bank: exactly the quota fits, one byte less does not
    fits = make_bank(mem, dim=DIM, value_dim=VDIM, quota_bytes=u3, **kw).name
    mem.add(fits, *data[0])
    assert mem.bank_info(fits).used_bytes == u3 == mem.bank_info(fits).spec.quota_bytes
    short = make_bank(mem, dim=DIM, value_dim=VDIM, quota_bytes=u3 - 1, **kw).name
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.add(short, *data[0])
    assert_refused(e, used=0, limit=u3 - 1, requested=u3)
    info = mem.bank_info(short)
    assert (info.count, info.used_bytes) == (0, 0) and len(ids_of(mem, short)) == 0

    # a later add that lands exactly on the quota, then the next row is refused
    name = make_bank(mem, dim=DIM, value_dim=VDIM, quota_bytes=u4, **kw).name
    first = mem.add(name, *data[0])
    second = mem.add(name, *data[1])
    info = mem.bank_info(name)
    assert (info.count, info.used_bytes) == (4, u4)
    assert info.tier_bytes["ram"] == u4                   # charged what it holds (tier ram)
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.add(name, *data[2])
    assert_refused(e, used=u4, limit=u4, requested=u5 - u4)
    assert (mem.bank_info(name).count, mem.bank_info(name).used_bytes) == (4, u4)
    np.testing.assert_array_equal(ids_of(mem, name), np.sort(np.concatenate([first, second])))

    # one byte short of the second add: refused, the first add's rows untouched
    tight = make_bank(mem, dim=DIM, value_dim=VDIM, quota_bytes=u4 - 1, **kw).name
    kept = mem.add(tight, *data[0])
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.add(tight, *data[1])
    assert_refused(e, used=u3, limit=u4 - 1, requested=u4 - u3)
    assert (mem.bank_info(tight).count, mem.bank_info(tight).used_bytes) == (3, u3)
    np.testing.assert_array_equal(ids_of(mem, tight), np.sort(kept))
    # raising it by exactly that one byte lets the same add through
    mem.set_quota(tight, u4)
    mem.add(tight, *data[1])
    assert mem.bank_info(tight).used_bytes == u4


# ---- tenant quota on add -------------------------------------------------------------------

def test_tenant_quota_on_add_is_exact(mem, make_bank):
    data = batches_of([3, 1, 1])
    u3, u4, u5 = usage_after(mem, make_bank, data)
    (f1,) = usage_after(mem, make_bank, batches_of([1], 50), shards=2)   # first row, 2 shards

    t = unique_name("t")
    a = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=t).name
    b = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=t, shards=2).name
    mem.set_tenant_quota(t, u4 + f1)                 # a's 4 rows and b's first row, exactly
    mem.add(a, *data[0])
    mem.add(a, *data[1])
    mem.add(b, *batches_of([1], 50)[0])
    assert mem.tenant_info(t).used_bytes == u4 + f1 == mem.tenant_info(t).quota_bytes
    for name, (k, v), cost in ((a, data[2], u5 - u4), (b, batches_of([1], 60)[0], None)):
        with pytest.raises(errors.QuotaExceeded) as e:
            mem.add(name, k, v)
        assert e.value.scope == "tenant" and e.value.bank == t
        assert (e.value.used, e.value.limit) == (u4 + f1, u4 + f1)
        if cost is not None:
            assert e.value.requested == cost
    assert (mem.bank_info(a).count, mem.bank_info(b).count) == (4, 1)
    assert mem.tenant_info(t).used_bytes == u4 + f1

    # one byte below: the add that would reach it is refused, usage stays
    t2 = unique_name("t")
    c = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=t2).name
    mem.set_tenant_quota(t2, u4 - 1)
    mem.add(c, *data[0])
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.add(c, *data[1])
    assert_refused(e, used=u3, limit=u4 - 1, requested=u4 - u3, scope="tenant")
    assert mem.tenant_info(t2).used_bytes == u3 == mem.bank_info(c).used_bytes
    assert mem.bank_info(c).count == 3


def test_tenant_quota_set_exactly_at_usage_and_one_byte_below(mem, make_bank):
    data = batches_of([5])
    (u5,) = usage_after(mem, make_bank, data)
    t = unique_name("t")
    name = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=t).name
    mem.add(name, *data[0])
    with pytest.raises(errors.FailedPrecondition):
        mem.set_tenant_quota(t, u5 - 1)
    assert mem.tenant_info(t).quota_bytes is None
    assert mem.set_tenant_quota(t, u5).quota_bytes == u5
    with pytest.raises(errors.QuotaExceeded):        # full: the next row does not fit
        mem.add(name, keys(1, 9), vals(1, 9))


# ---- session banks: append -----------------------------------------------------------------

def test_session_quota_on_append_is_exact(mem):
    data = batches_of([3, 1, 1], 10)
    u3, u4, u5 = session_usage_after(mem, data)

    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, quota_bytes=u4)).session_id
    ids = [mem.append(sid, *data[0]), mem.append(sid, *data[1])]
    bank = mem.session_info(sid).bank
    assert (bank.count, bank.used_bytes, bank.spec.quota_bytes) == (4, u4, u4)
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.append(sid, *data[2])
    assert_refused(e, used=u4, limit=u4, requested=u5 - u4)
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(np.concatenate(ids)))

    short = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, quota_bytes=u4 - 1)).session_id
    kept = mem.append(short, *data[0])
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.append(short, *data[1])
    assert_refused(e, used=u3, limit=u4 - 1, requested=u4 - u3)
    bank = mem.session_info(short).bank
    assert (bank.count, bank.used_bytes) == (3, u3)
    np.testing.assert_array_equal(ids_of(mem, short), np.sort(kept))

    first = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, quota_bytes=u3 - 1)).session_id
    with pytest.raises(errors.QuotaExceeded) as e:   # the first append brings the fixed bytes
        mem.append(first, *data[0])
    assert_refused(e, used=0, limit=u3 - 1, requested=u3)
    assert mem.session_info(first).bank.count == 0


# ---- fifo eviction makes exactly enough room ------------------------------------------------

def test_fifo_evicts_exactly_enough_at_an_exact_quota(mem):
    data = batches_of([1] * 5 + [2, 4, 5], 20)
    u = session_usage_after(mem, data[:4])               # u[n-1]: n rows
    u4 = u[3]
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, quota_bytes=u4,
                                       eviction="fifo")).session_id
    order = [mem.append(sid, *data[i]) for i in range(4)]   # full: exactly 4 rows
    assert mem.session_info(sid).bank.used_bytes == u4
    # one more row: exactly one (the oldest) leaves
    order.append(mem.append(sid, *data[4]))
    bank = mem.session_info(sid).bank
    assert (bank.count, bank.used_bytes) == (4, u4)
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(np.concatenate(order[1:])))
    # two rows: exactly two leave
    order.append(mem.append(sid, *data[5]))
    bank = mem.session_info(sid).bank
    assert (bank.count, bank.used_bytes) == (4, u4)
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(np.concatenate(order[3:])))
    # a batch of exactly the quota's rows empties the bank and fits
    new = mem.append(sid, *data[6])
    bank = mem.session_info(sid).bank
    assert (bank.count, bank.used_bytes) == (4, u4)
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(new))
    # one row more than the quota can ever hold: refused, nothing evicted
    with pytest.raises(errors.QuotaExceeded):
        mem.append(sid, *data[7])
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(new))
    assert mem.session_info(sid).bank.used_bytes == u4


def test_fifo_one_byte_short_of_a_row_keeps_one_row_fewer(mem):
    data = batches_of([1] * 5, 30)
    u = session_usage_after(mem, data)
    u3, u4 = u[2], u[3]
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, quota_bytes=u4 - 1,
                                       eviction="fifo")).session_id
    ids = [mem.append(sid, *data[i]) for i in range(3)]
    assert mem.session_info(sid).bank.used_bytes == u3
    ids.append(mem.append(sid, *data[3]))                 # 4 rows would be 1 byte over: 1 leaves
    bank = mem.session_info(sid).bank
    assert (bank.count, bank.used_bytes) == (3, u3)
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(np.concatenate(ids[1:])))


def test_fifo_session_at_an_exact_tenant_quota(mem, make_bank):
    data = batches_of([1] * 4, 40)
    u = session_usage_after(mem, data)
    t = unique_name("t")
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t,
                                       eviction="fifo")).session_id
    ids = [mem.append(sid, *data[i]) for i in range(3)]
    mem.set_tenant_quota(t, u[2])                         # exactly its usage: full
    ids.append(mem.append(sid, *data[3]))                 # evicts exactly the oldest row
    bank = mem.session_info(sid).bank
    assert (bank.count, bank.used_bytes) == (3, u[2]) and mem.tenant_info(t).used_bytes == u[2]
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(np.concatenate(ids[1:])))


# ---- promote into a target bank at its quota -------------------------------------------------

@pytest.mark.parametrize("move", [False, True])
def test_promote_into_a_target_at_exactly_its_quota(mem, make_bank, move):
    rows = batches_of([2, 6], 70)
    u2, u8 = usage_after(mem, make_bank, rows)
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM)).session_id
    src = mem.append(sid, *rows[1])

    short = make_bank(mem, dim=DIM, value_dim=VDIM, quota_bytes=u8 - 1).name
    mem.add(short, *rows[0])
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.promote_session(sid, short, move=move)
    assert_refused(e, used=u2, limit=u8 - 1, requested=u8 - u2)
    assert (mem.bank_info(short).count, mem.bank_info(short).used_bytes) == (2, u2)
    np.testing.assert_array_equal(ids_of(mem, sid), np.sort(src))      # nothing moved

    exact = make_bank(mem, dim=DIM, value_dim=VDIM, quota_bytes=u8).name
    mem.add(exact, *rows[0])
    res = mem.promote_session(sid, exact, move=move)
    assert res.promoted == 6
    info = mem.bank_info(exact)
    assert (info.count, info.used_bytes, info.spec.quota_bytes) == (8, u8, u8)
    assert mem.session_info(sid).bank.count == (0 if move else 6)


# ---- set_quota at usage -----------------------------------------------------------------------

def test_set_quota_exactly_at_usage_and_one_byte_below(mem, make_bank):
    data = batches_of([1] * 6, 80)
    u = usage_after(mem, make_bank, data)                 # u[n-1]: n rows
    rej = make_bank(mem, dim=DIM, value_dim=VDIM).name
    for d in data:
        mem.add(rej, *d)
    assert mem.bank_info(rej).used_bytes == u[5]
    with pytest.raises(errors.FailedPrecondition):
        mem.set_quota(rej, u[5] - 1)
    info = mem.bank_info(rej)
    assert (info.spec.quota_bytes, info.count, info.used_bytes) == (None, 6, u[5])
    assert mem.set_quota(rej, u[5]).spec.quota_bytes == u[5]            # at usage: accepted
    assert mem.bank_info(rej).count == 6
    with pytest.raises(errors.QuotaExceeded):
        mem.add(rej, keys(1, 99), vals(1, 99))

    fifo = make_bank(mem, dim=DIM, value_dim=VDIM, eviction="fifo").name
    ids = [mem.add(fifo, *d)[0] for d in data]
    assert mem.set_quota(fifo, u[5]).spec.quota_bytes == u[5]          # at usage: evicts nothing
    assert mem.bank_info(fifo).count == 6
    mem.set_quota(fifo, u[5] - 1)                                       # 1 byte below: 1 row goes
    info = mem.bank_info(fifo)
    assert (info.count, info.used_bytes) == (5, u[4])
    np.testing.assert_array_equal(ids_of(mem, fifo), ids[1:])
    mem.set_quota(fifo, u[3])                                           # exactly 4 rows: 1 goes
    assert (mem.bank_info(fifo).count, mem.bank_info(fifo).used_bytes) == (4, u[3])
    mem.set_quota(fifo, u[2] - 1)                                       # 1 byte short of 3: 2 go
    assert (mem.bank_info(fifo).count, mem.bank_info(fifo).used_bytes) == (2, u[1])
    np.testing.assert_array_equal(ids_of(mem, fifo), ids[4:])


# ---- product-key banks: born full -------------------------------------------------------------

def test_product_key_bank_created_at_exactly_its_size(mem, make_bank):
    pk = dict(dim=DIM, value_dim=VDIM, kind="base", index="product-keys:8")
    probe_tenant = unique_name("probe")
    probe = make_bank(mem, tenant=probe_tenant, **pk).name
    size = mem.bank_info(probe).used_bytes
    assert size > 0 and mem.bank_info(probe).count == 64
    assert mem.delete_bank(probe) == size

    fits = make_bank(mem, quota_bytes=size, **pk).name
    info = mem.bank_info(fits)
    assert (info.used_bytes, info.spec.quota_bytes, info.count) == (size, size, 64)
    assert info.tier_bytes["ram"] == size              # charged what it holds (tier ram)

    from conftest import new_spec
    spec = new_spec(quota_bytes=size - 1, **pk)
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.create_bank(spec)
    assert_refused(e, used=0, limit=size - 1, requested=size)
    assert spec.name not in [b.name for b in mem.list_banks()]
    with pytest.raises(errors.NotFound):
        mem.bank_info(spec.name)
    mem.create_bank(spec.with_(quota_bytes=size))       # the name was not taken by the failure

    # the tenant's quota, the same way
    t = unique_name("t")
    mem.set_tenant_quota(t, size - 1)
    over = new_spec(tenant=t, **pk)
    with pytest.raises(errors.QuotaExceeded) as e:
        mem.create_bank(over)
    assert_refused(e, used=0, limit=size - 1, requested=size, scope="tenant")
    assert mem.tenant_info(t).used_bytes == 0 and mem.tenant_info(t).banks == 0
    mem.set_tenant_quota(t, size)
    mem.create_bank(over)
    assert mem.tenant_info(t).used_bytes == size == mem.tenant_info(t).quota_bytes
