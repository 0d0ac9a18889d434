"""Storage tiers on both backends: banks created on mmap, live moves
ram -> mmap -> ram with identical results for Flat, HNSW and IVF, adds and
removes on mmap, where the bytes sit (tier_bytes), gpu refused on a host
without one, and a move while other threads search and add."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from memoryd import errors
from memoryd.storage import faiss_index as fx
from reference import gaussian, mixture, topk_union

DIM, VDIM = 8, 4
INDEXES = ["Flat", "HNSW32", "IVF8,Flat"]
STORE_ROW = 8 + 4 * DIM + 4 * VDIM          # id, key, value: what mmap leaves on disk


def data(n, seed):
    keys, centers = mixture(n, DIM, seed, clusters=12, spread=0.2)
    return keys, gaussian(n, VDIM, seed + 1), centers


def snapshot(mem, name, q, k=6):
    r = mem.search(name, q, k, values=True, keys=True)
    return r.ids.copy(), r.scores.copy(), r.values.copy(), r.keys.copy()


def assert_same(a, b, what):
    for x, y, part in zip(a, b, ("ids", "scores", "values", "keys")):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: {part}")


def exact(mem, name, keys, ids, q, k):
    """The bank's search equals the exact top-k over (keys, ids)."""
    r = mem.search(name, q, k, values=False)
    _, pos, sc = topk_union([keys], q, k, "l2")
    np.testing.assert_array_equal(r.ids, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1))
    np.testing.assert_allclose(r.scores, sc, rtol=1e-5, atol=1e-5)


def test_bank_created_on_mmap(rig, make_bank):
    mem = rig.mem
    keys, vals, _ = data(120, 1)
    on_disk = make_bank(mem, dim=DIM, value_dim=VDIM, tier="mmap").name
    in_ram = make_bank(mem, dim=DIM, value_dim=VDIM).name
    info = mem.bank_info(on_disk)
    assert info.spec.tier == "mmap"
    ids = mem.add(on_disk, keys, vals)
    np.testing.assert_array_equal(mem.add(in_ram, keys, vals), ids)
    q = gaussian(7, DIM, 2)
    exact(mem, on_disk, keys, ids, q, 5)
    assert_same(snapshot(mem, on_disk, q), snapshot(mem, in_ram, q), "mmap vs ram")
    got = mem.get(on_disk, ids[::7], keys=True)
    np.testing.assert_array_equal(got.values, vals[::7])
    np.testing.assert_array_equal(got.keys, keys[::7])
    d, r = mem.bank_info(on_disk), mem.bank_info(in_ram)
    assert d.used_bytes == r.used_bytes and d.count == r.count == 120
    assert r.tier_bytes["ram"] == r.used_bytes
    assert d.tier_bytes["ram"] <= r.tier_bytes["ram"] - 120 * STORE_ROW
    assert d.tier_bytes["disk"] >= 120 * STORE_ROW


@pytest.mark.parametrize("index", INDEXES)
def test_move_ram_mmap_ram_keeps_results(rig, make_bank, index):
    mem = rig.mem
    keys, vals, centers = data(300, 3)
    name = make_bank(mem, dim=DIM, value_dim=VDIM, index=index).name
    ids = mem.add(name, keys, vals)
    q = mixture(12, DIM, 4, centers=centers)[0]
    before = snapshot(mem, name, q)
    ram_info = mem.bank_info(name)
    assert ram_info.tier_bytes["ram"] == ram_info.used_bytes

    info = mem.set_tier(name, "mmap")
    assert info.spec.tier == "mmap" and mem.bank_info(name).spec.tier == "mmap"
    assert_same(snapshot(mem, name, q), before, f"{index} on mmap")
    assert info.used_bytes == ram_info.used_bytes and info.count == 300
    assert info.tier_bytes["ram"] <= ram_info.tier_bytes["ram"] - 300 * STORE_ROW
    assert info.tier_bytes["disk"] >= 300 * STORE_ROW

    info = mem.set_tier(name, "ram")
    assert info.spec.tier == "ram"
    assert_same(snapshot(mem, name, q), before, f"{index} back in ram")
    assert info.tier_bytes["ram"] == ram_info.tier_bytes["ram"]
    got = mem.get(name, ids, keys=True)
    assert got.found.all()
    np.testing.assert_array_equal(got.keys, keys)
    np.testing.assert_array_equal(got.values, vals)
    assert mem.set_tier(name, "ram").spec.tier == "ram"      # a no-op move


@pytest.mark.parametrize("index", ["Flat", "HNSW32", "IVF8,Flat"])
def test_adds_and_removes_on_mmap(rig, make_bank, index):
    mem = rig.mem
    keys, vals, centers = data(260, 5)
    name = make_bank(mem, dim=DIM, value_dim=VDIM, index=index).name
    ids1 = mem.add(name, keys[:200], vals[:200])
    mem.set_tier(name, "mmap")
    ids2 = mem.add(name, keys[200:], vals[200:])           # beside the mapped snapshot
    ids = np.concatenate([ids1, ids2])
    gone = ids[np.r_[0:10, 195:205, 250:255]]              # from the snapshot and the delta
    assert mem.remove(name, gone) == len(gone)
    keep = ~np.isin(ids, gone)
    kept_ids, kept_keys, kept_vals = ids[keep], keys[keep], vals[keep]
    info = mem.bank_info(name)
    assert info.count == keep.sum() and info.spec.tier == "mmap"
    exported = np.sort(np.concatenate([c.ids for c in mem.export(name)]))
    np.testing.assert_array_equal(exported, kept_ids)
    assert not mem.get(name, gone).found.any()
    q = mixture(10, DIM, 6, centers=centers)[0]
    if index == "Flat":
        exact(mem, name, kept_keys, kept_ids, q, 8)
    r = mem.search(name, kept_keys[::5], 1, values=True)     # every kept row finds itself
    np.testing.assert_array_equal(r.ids[:, 0], kept_ids[::5])
    np.testing.assert_array_equal(r.values[:, 0], kept_vals[::5])
    r = mem.search(name, keys[~keep], 3, values=False)
    assert not np.isin(r.ids, gone).any()
    # values updated in place on mmap
    new_vals = gaussian(4, VDIM, 77)
    assert mem.update_values(name, kept_ids[[0, 1, -2, -1]], new_vals) == 4
    np.testing.assert_array_equal(mem.get(name, kept_ids[[0, 1, -2, -1]]).values, new_vals)
    # more adds after the removal, then a restart on mmap
    ids3 = mem.add(name, keys[:5] + 10.0, vals[:5])
    before = snapshot(mem, name, q)
    rig.reopen()
    mem = rig.mem
    assert mem.bank_info(name).spec.tier == "mmap"
    assert_same(snapshot(mem, name, q), before, "after reopen")
    assert mem.get(name, ids3).found.all()
    np.testing.assert_array_equal(mem.get(name, kept_ids[[0, 1, -2, -1]]).values, new_vals)
    # emptied on mmap, then filled again
    every = np.concatenate([c.ids for c in mem.export(name)])
    assert mem.remove(name, every) == len(every)
    assert mem.bank_info(name).count == 0
    assert (mem.search(name, q, 3).ids == -1).all()
    ids4 = mem.add(name, keys[:20], vals[:20])
    r = mem.search(name, keys[:20], 1, values=True)
    np.testing.assert_array_equal(r.ids[:, 0], ids4)
    np.testing.assert_array_equal(r.values[:, 0], vals[:20])


def test_tier_bytes_add_up_for_a_tenant(rig, make_bank):
    mem = rig.mem
    a = make_bank(mem, dim=DIM, value_dim=VDIM, tenant="tiers").name
    b = make_bank(mem, dim=DIM, value_dim=VDIM, tenant="tiers", tier="mmap").name
    for n in (a, b):
        mem.add(n, gaussian(40, DIM, 1), gaussian(40, VDIM, 2))
    t = mem.tenant_info("tiers")
    ia, ib = mem.bank_info(a), mem.bank_info(b)
    assert t.tier_bytes["ram"] == ia.tier_bytes["ram"] + ib.tier_bytes["ram"]
    assert t.tier_bytes["disk"] == ia.tier_bytes["disk"] + ib.tier_bytes["disk"]
    assert t.used_bytes == ia.used_bytes + ib.used_bytes


@pytest.mark.skipif(fx.num_gpus() > 0, reason="this host has a GPU")
def test_gpu_tier_refused_without_a_gpu(rig, make_bank):
    mem = rig.mem
    name = make_bank(mem, dim=DIM, value_dim=VDIM).name
    keys = gaussian(20, DIM, 1)
    ids = mem.add(name, keys, gaussian(20, VDIM, 2))
    with pytest.raises(errors.FailedPrecondition) as e:
        mem.set_tier(name, "gpu")
    assert "gpu" in str(e.value).lower()
    assert mem.bank_info(name).spec.tier == "ram"
    np.testing.assert_array_equal(mem.search(name, keys[:3], 1).ids[:, 0], ids[:3])
    with pytest.raises(errors.InvalidArgument):
        mem.set_tier(name, "tape")
    before = {b.name for b in mem.list_banks()}
    with pytest.raises(errors.FailedPrecondition):
        make_bank(mem, dim=DIM, value_dim=VDIM, tier="gpu")
    assert {b.name for b in mem.list_banks()} == before
    assert mem.stats().num_gpus == 0


@pytest.mark.parametrize("index", ["Flat", "HNSW32"])
def test_tier_moves_while_others_search_and_add(rig, make_bank, index):
    mem = rig.mem
    keys, vals, _ = data(200, 7)
    name = make_bank(mem, dim=DIM, value_dim=VDIM, index=index, shards=2).name
    mem.add(name, keys, vals)
    stop = threading.Event()
    errs: list[BaseException] = []
    added: list[tuple[np.ndarray, np.ndarray]] = []
    searches = [0]

    def conn(label):
        return mem if rig.kind == "local" else rig.connect(label)

    def searcher(seed):
        m = conn(f"search-{seed}")
        q = gaussian(4, DIM, seed)
        try:
            while not stop.is_set():
                r = m.search(name, q, 5, values=True)
                assert (r.ids >= 0).all() and r.values.shape == (4, 5, VDIM)
                searches[0] += 1
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    def adder():
        m = conn("adder")
        rng = np.random.default_rng(11)
        try:
            while not stop.is_set():
                k = (rng.standard_normal((5, DIM)) * 3 + 20).astype(np.float32)   # far away
                ids = m.add(name, k, rng.standard_normal((5, VDIM)).astype(np.float32))
                added.append((ids, k))
        except BaseException as e:  # noqa: BLE001
            errs.append(e)

    def wait_for(cond, seconds=20.0):
        t_end = time.monotonic() + seconds
        while not cond() and not errs and time.monotonic() < t_end:
            time.sleep(0.002)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    threads.append(threading.Thread(target=adder))
    for th in threads:
        th.start()
    try:
        wait_for(lambda: searches[0] > 3 and len(added) > 1)
        for tier in ("mmap", "ram", "mmap", "ram", "mmap"):
            s0, a0 = searches[0], len(added)
            assert mem.set_tier(name, tier).spec.tier == tier
            wait_for(lambda: searches[0] > s0 + 2 and len(added) > a0 + 1)  # traffic between moves
    finally:
        stop.set()
        for th in threads:
            th.join(60)
    assert not errs, errs[:3]
    assert searches[0] > 0 and added
    new_ids = np.concatenate([i for i, _ in added])
    new_keys = np.concatenate([k for _, k in added])
    assert mem.bank_info(name).count == 200 + len(new_ids)
    assert mem.get(name, new_ids).found.all()
    r = mem.search(name, new_keys, 1, values=False)
    np.testing.assert_array_equal(r.ids[:, 0], new_ids)
    mem.set_tier(name, "ram")
    r = mem.search(name, new_keys, 1, values=False)
    np.testing.assert_array_equal(r.ids[:, 0], new_ids)
