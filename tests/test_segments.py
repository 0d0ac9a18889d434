"""Growing segments (memoryd.storage.segments): writes land in a flat growing
segment searched exactly, sealed into the bank's index in the background.

An IVF index probing every list is exact, so a bank of it must answer exactly
what numpy's brute force over the rows written so far answers, at every
moment: while a writer adds, a searcher searches and the sealer seals (the
check is linearizable: a search may see any prefix of batches between those
done before it started and those begun before it ended). Then removes and
updates in the middle of sealing, a reopen with rows still growing, the bytes
charged (never changed by sealing), HNSW's recall against a bank built the
old way (every add into the graph inline), and the sealer itself.

Sizes are scaled down (segments' knobs patched: a shard grows past 64 rows,
is sealed at 256 or after 50 ms idle, in chunks of ~2 ms), so that a few
thousand rows cross every path in seconds.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from memoryd import errors
from memoryd.api import BankSpec
from memoryd.engine import LocalMemory
from memoryd.storage import segments
from memoryd.storage.locks import RWLock
from reference import gaussian, mixture, recall, topk_union

DIM, VDIM = 16, 4
EXACT = "IVF16,Flat|nprobe=16"


@pytest.fixture
def seg(monkeypatch):
    """Small segments: sealing starts at 256 growing rows or 50 ms idle, ~2 ms chunks."""
    for name, value in dict(INLINE_ROWS=64, SEAL_ROWS=256, IDLE_S=0.05, RETRY_S=0.05,
                            LINGER_S=0.2, FIRST_CHUNK=32, CHUNK_S=0.002, MAX_CHUNK=300,
                            ENCODE_ROWS=200, QUIET_S=0.001).items():
        monkeypatch.setattr(segments, name, value)
    return monkeypatch


def hold_sealing(mp) -> None:
    """The sealer finds nothing due (growing rows stay growing)."""
    mp.setattr(segments, "SEAL_ROWS", 10 ** 9)
    mp.setattr(segments, "IDLE_S", 10 ** 6)


def resume_sealing(mp, *banks) -> None:
    mp.setattr(segments, "SEAL_ROWS", 256)
    mp.setattr(segments, "IDLE_S", 0.05)
    for b in banks:
        segments.SEALER.wake(b)


def wait_sealed(bank, timeout=20.0) -> None:
    end = time.monotonic() + timeout
    while bank.growing_rows():
        assert time.monotonic() < end, f"{bank.growing_rows()} rows still growing"
        time.sleep(0.01)


def spec(name, metric="l2", index=EXACT, **kw) -> BankSpec:
    return BankSpec(name, dim=DIM, value_dim=VDIM, metric=metric, index=index, **kw)


def assert_exact(r, keys, vals, alive, q, k, metric, what=""):
    """r equals the exact top-k over rows `alive` (ids = row numbers), payload too."""
    alive = np.asarray(alive, np.int64)
    _, pos, want_s = topk_union([keys[alive]], q, k, metric)
    want = np.where(pos >= 0, alive[np.maximum(pos, 0)], -1)
    assert r.ids.shape == (len(q), k)
    np.testing.assert_array_equal(r.ids < 0, want < 0, err_msg=what)
    hit = want >= 0
    np.testing.assert_allclose(r.scores[hit], want_s[hit], rtol=1e-4, atol=1e-4, err_msg=what)
    off = r.ids != want                  # only where two rows tie to float precision
    np.testing.assert_allclose(r.scores[off], want_s[off], rtol=1e-4, atol=1e-4, err_msg=what)
    found = r.ids >= 0
    assert (r.bank[~found] == -1).all() and (r.bank[found] == 0).all()
    if r.values is not None and vals is not None:
        np.testing.assert_array_equal(r.values[found], vals[r.ids[found]], err_msg=what)
        assert not r.values[~found].any()
    if r.keys is not None and vals is not None:
        np.testing.assert_array_equal(r.keys[found], keys[r.ids[found]], err_msg=what)
        assert not r.keys[~found].any()


def matches_exact(r, keys, alive, q, k, metric) -> bool:
    try:
        assert_exact(r, keys, None, alive, q, k, metric)
        return True
    except AssertionError:
        return False


# ---- exact at every moment --------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_an_exact_index_equals_brute_force_while_writing_searching_sealing(tmp_path, seg, metric):
    n, batch, k = 4000, 100, 12
    keys, vals = gaussian(n, DIM, 1), gaussian(n, VDIM, 2)
    q = gaussian(24, DIM, 3)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("b", metric))
        bank = mem.engine.bank("b")
        mem.add("b", keys[:1000], vals[:1000], ids=np.arange(1000))      # trains; grows at once
        assert bank.growing_rows() > 0
        done = [1000, 1000]                     # [batches finished, begun] in rows
        errs, seen, stop = [], {"both": 0, "searches": 0}, threading.Event()

        def writer():
            try:
                for start in range(1000, n, batch):
                    done[1] = start + batch
                    mem.add("b", keys[start:start + batch], vals[start:start + batch],
                            ids=np.arange(start, start + batch))
                    done[0] = start + batch
                    time.sleep(0.02)
            except BaseException as e:       # pragma: no cover - reported below
                errs.append(e)

        def searcher():
            try:
                while not stop.is_set():
                    lo = done[0]
                    sh = bank.shards[0]
                    both = sh.indexed > 0 and sh.growing > 0
                    r = mem.search("b", q, k, values=True, keys=True)
                    hi = done[1]
                    seen_rows = [m for m in range(lo, hi + 1, batch)
                                 if matches_exact(r, keys, np.arange(m), q, k, metric)]
                    m = seen_rows[0] if seen_rows else lo     # (lo: to say what differs)
                    assert_exact(r, keys, vals, np.arange(m), q, k, metric, f"rows {lo}..{hi}")
                    seen["searches"] += 1
                    seen["both"] += both
            except BaseException as e:
                errs.append(e)
                stop.set()

        threads = [threading.Thread(target=writer), threading.Thread(target=searcher)]
        for t in threads:
            t.start()
        threads[0].join()
        time.sleep(0.1)
        stop.set()
        threads[1].join()
        assert not errs, errs[0]
        assert seen["searches"] >= 10 and seen["both"] >= 1, seen   # both segments were searched
        wait_sealed(bank)
        assert segments.SEALER.sealed > 0
        everything = np.arange(n)
        assert_exact(mem.search("b", q, k, values=True, keys=True), keys, vals, everything, q, k,
                     metric, "all sealed")
        # k beyond the rows: -1 padding, the metric's worst score
        big = mem.search("b", q[:3], n + 20, values=True)
        assert (big.ids[:, n:] == -1).all() and (big.ids[:, :n] >= 0).all()
        assert np.isinf(big.scores[:, n:]).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_k_beyond_the_rows_pads_in_both_segments_like_a_flat_bank(tmp_path, seg, metric):
    hold_sealing(seg)
    keys, vals = gaussian(300, DIM, 4), gaussian(300, VDIM, 5)
    q = gaussian(5, DIM, 6)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("ivf", metric))
        mem.create_bank(spec("flat", metric, index="Flat"))
        for name in ("ivf", "flat"):
            mem.add(name, keys, vals)
        bank = mem.engine.bank("ivf")
        assert bank.growing_rows() == 300                   # all growing
        bank.shards[0].seal_chunk()                         # some sealed, the rest growing
        assert 0 < bank.shards[0].indexed < 300
        for k in (7, 299, 300, 400):
            a = mem.search("ivf", q, k, values=True, keys=True)
            b = mem.search("flat", q, k, values=True, keys=True)
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(a.bank, b.bank)
            np.testing.assert_array_equal(a.values, b.values)
            np.testing.assert_array_equal(a.keys, b.keys)
            assert_exact(a, keys, vals, np.arange(300), q, k, metric)


# ---- removes and updates in the middle of sealing ----------------------------------------

@pytest.mark.parametrize("index,how", [(EXACT, "encoded apart"), ("HNSW16", "copy and swap"),
                                       ("HNSW16", "chunks under the lock")])
def test_removes_and_updates_while_sealing(tmp_path, seg, index, how):
    if how == "chunks under the lock":
        seg.setattr(segments, "COPY_BYTES", 0)
    n = 3000
    keys, vals = mixture(n, DIM, 7, clusters=30, spread=0.3)[0], gaussian(n, VDIM, 8)
    vals = vals.copy()
    rng = np.random.default_rng(9)
    gone: set[int] = set()
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("b", index=index))
        bank = mem.engine.bank("b")
        mem.add("b", keys[:1000], vals[:1000], ids=np.arange(1000))
        errs, stop = [], threading.Event()
        removed_before = [frozenset()]

        def searcher():
            try:
                while not stop.is_set():
                    before = removed_before[0]
                    r = mem.search("b", keys[rng.integers(0, n, 16)], 8, values=False)
                    assert not (set(r.ids.ravel().tolist()) & before), "a removed row came back"
            except BaseException as e:
                errs.append(e)

        t = threading.Thread(target=searcher)
        t.start()
        try:
            for start in range(1000, n, 250):
                mem.add("b", keys[start:start + 250], vals[start:start + 250],
                        ids=np.arange(start, start + 250))
                victims = rng.choice(start + 250, 40, replace=False)
                assert mem.remove("b", victims) == len(set(victims.tolist()) - gone)
                gone |= set(victims.tolist())
                removed_before[0] = frozenset(gone)
                upd = np.setdiff1d(rng.choice(start + 250, 30, replace=False), list(gone))
                vals[upd] = gaussian(len(upd), VDIM, start)
                assert mem.update_values("b", upd, vals[upd]) == len(upd)
                time.sleep(0.02)                 # let the sealer in
        finally:
            stop.set()
            t.join()
        assert not errs, errs[0]
        alive = np.setdiff1d(np.arange(n), list(gone))

        def check(mem):
            assert mem.bank_info("b").count == len(alive)
            g = mem.get("b", np.arange(n), keys=True)
            np.testing.assert_array_equal(np.flatnonzero(g.found), alive)
            np.testing.assert_array_equal(g.keys[alive], keys[alive])
            np.testing.assert_array_equal(g.values[alive], vals[alive])
            r = mem.search("b", keys[list(gone)[:200]], 5, values=False)
            assert not np.isin(r.ids, list(gone)).any()
            r = mem.search("b", keys[alive[::7]], 1, values=True)
            if index == EXACT:
                np.testing.assert_array_equal(r.ids[:, 0], alive[::7])
            else:
                assert (r.ids[:, 0] == alive[::7]).mean() > 0.95
            hit = r.ids[:, 0] == alive[::7]
            np.testing.assert_array_equal(r.values[hit, 0], vals[alive[::7]][hit])

        check(mem)
        wait_sealed(bank)
        check(mem)
        mem.add("b", keys[:100] + 5.0, vals[:100], ids=np.arange(n, n + 100))   # grows again
        assert bank.growing_rows() > 0 or index == EXACT
        alive = np.concatenate([alive, np.arange(n, n + 100)])
        keys = np.concatenate([keys, keys[:100] + 5.0])
        vals = np.concatenate([vals, vals[:100]])
        n += 100
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        check(mem)
        wait_sealed(mem.engine.bank("b"))
        check(mem)


@pytest.mark.parametrize("index", [EXACT, "HNSW16"])
def test_a_step_off_the_lock_is_discarded_if_its_rows_moved(tmp_path, seg, index):
    """IVF rows are encoded off the lock, HNSW rows added to a copy of the
    index: a remove of a row of the step (or before it) before the step goes
    in makes it stale, and it is dropped; a remove of later rows does not."""
    hold_sealing(seg)
    keys, vals = gaussian(600, DIM, 10), gaussian(600, VDIM, 11)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("b", index=index))
        mem.add("b", keys, vals, ids=np.arange(600))
        bank = mem.engine.bank("b")
        shard = bank.shards[0]
        assert shard.growing == 600

        def step():
            if shard.encodes_apart:
                job = shard.seal_prepare(200)
                return job, lambda: shard.seal_commit(job, shard.seal_encode(job))
            assert shard.copies
            job = shard.seal_copy_prepare()
            job.index.add_with_ids(job.keys, job.ids)
            return job, lambda: shard.seal_swap(job)

        job, commit = step()
        assert job.start == 0 and job.end in (200, 600)
        mem.add("b", keys[:50] + 1.0, vals[:50], ids=np.arange(600, 650))
        assert mem.remove("b", np.array([620])) == 1      # after the step's rows: still good
        assert commit() == job.end and shard.indexed == job.end
        job, commit = step()
        inside = int(job.ids[len(job.ids) // 2])
        assert mem.remove("b", np.array([5, inside])) == 2   # one before it, one in it
        assert commit() == 0
        bank.seal_now()
        assert bank.growing_rows() == 0 and shard.index.ntotal == 647
        keys, vals = np.concatenate([keys, keys[:50] + 1.0]), np.concatenate([vals, vals[:50]])
        alive = np.setdiff1d(np.arange(650), [5, inside, 620])
        g = mem.get("b", alive, keys=True)
        np.testing.assert_array_equal(g.keys, keys[alive])
        q = gaussian(10, DIM, 12)
        if index == EXACT:
            assert_exact(mem.search("b", q, 9, values=True), keys, vals, alive, q, 9, "l2")
        r = mem.search("b", keys[alive[::5]], 1, values=False)
        assert (r.ids[:, 0] == alive[::5]).mean() > 0.95


# ---- reopen with growing rows ------------------------------------------------------------

@pytest.mark.parametrize("index,tier", [(EXACT, "ram"), ("HNSW16", "ram"), (EXACT, "mmap"),
                                        ("HNSW16", "mmap")])
def test_reopen_keeps_growing_rows_growing_and_sealing_resumes(tmp_path, seg, index, tier):
    hold_sealing(seg)
    n = 2000
    keys, vals = gaussian(n, DIM, 13), gaussian(n, VDIM, 14)
    q = gaussian(16, DIM, 15)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("b", index=index, tier=tier))
        mem.add("b", keys[:1000], vals[:1000])
        bank = mem.engine.bank("b")
        bank.seal_now()                                    # an index snapshot of 1000 rows ...
        mem.add("b", keys[1000:], vals[1000:])             # ... and 1000 growing after it
        bank.checkpoint()
        mem.add("b", keys[:10] + 3.0, vals[:10])           # and in the log only
        assert bank.growing_rows() == 1010
        before = mem.search("b", q, 10, values=True, keys=True)
        used = mem.bank_info("b").used_bytes
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        bank = mem.engine.bank("b")
        assert bank.growing_rows() == 1010                 # open did not seal them
        after = mem.search("b", q, 10, values=True, keys=True)
        for part in ("ids", "scores", "values", "keys"):
            np.testing.assert_array_equal(getattr(after, part), getattr(before, part), err_msg=part)
        assert mem.bank_info("b").used_bytes == used
        resume_sealing(seg, bank)
        wait_sealed(bank)
        got = mem.get("b", np.arange(n + 10), keys=True)
        assert got.found.all()
        np.testing.assert_array_equal(got.keys, np.concatenate([keys, keys[:10] + 3.0]))
        if index == EXACT:
            every = np.concatenate([keys, keys[:10] + 3.0])
            assert_exact(mem.search("b", q, 10, values=False), every, None, np.arange(n + 10),
                         q, 10, "l2")
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:   # the sealed index was saved
        assert mem.engine.bank("b").growing_rows() == 0


# ---- bytes --------------------------------------------------------------------------------

@pytest.mark.parametrize("index", ["HNSW16", "IVF16,SQ8"])
def test_sealing_changes_no_charged_byte(tmp_path, seg, index):
    hold_sealing(seg)
    keys, vals = gaussian(1500, DIM, 16), gaussian(1500, VDIM, 17)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("old", index=index))          # the same rows, every add inline
        seg.setattr(segments, "SEAL_ROWS", 0)
        mem.add("old", keys, vals)
        assert mem.engine.bank("old").growing_rows() == 0
        want = mem.bank_info("old").used_bytes
        hold_sealing(seg)
        mem.create_bank(spec("b", index=index))
        mem.add("b", keys[:1000], vals[:1000])
        mem.set_quota("b", want)                            # exactly the 1500 rows
        mem.add("b", keys[1000:], vals[1000:])
        bank = mem.engine.bank("b")
        assert bank.growing_rows() == 1500
        growing = mem.bank_info("b")
        assert growing.used_bytes == want == growing.spec.quota_bytes
        assert growing.tier_bytes["ram"] == want
        bank.seal_now()
        sealed = mem.bank_info("b")
        assert (sealed.used_bytes, sealed.data_bytes, sealed.index_bytes, sealed.tier_bytes["ram"]) \
            == (growing.used_bytes, growing.data_bytes, growing.index_bytes, growing.tier_bytes["ram"])
        assert bank.nbytes() == want
        with pytest.raises(errors.QuotaExceeded):           # full, sealed or not
            mem.add("b", keys[:1], vals[:1])


# ---- HNSW keeps its search quality ----------------------------------------------------------

@pytest.mark.parametrize("how", ["copy and swap", "chunks under the lock"])
def test_hnsw_recall_after_sealing_is_what_an_inline_bank_has(tmp_path, seg, how):
    if how == "chunks under the lock":
        seg.setattr(segments, "COPY_BYTES", 0)
    dim, n = 32, 8000
    keys, centers = mixture(n, dim, 18, clusters=64, spread=0.25)
    q = mixture(200, dim, 19, centers=centers, spread=0.25)[0]
    _, want, _ = topk_union([keys], q, 10, "l2")
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        for name in ("old", "new"):
            mem.create_bank(BankSpec(name, dim=dim, index="HNSW32|efSearch=32"))
        seg.setattr(segments, "SEAL_ROWS", 0)               # the old way: the graph inline
        for start in range(0, n, 1000):
            mem.add("old", keys[start:start + 1000])
        seg.setattr(segments, "SEAL_ROWS", 256)
        for start in range(0, n, 1000):
            mem.add("new", keys[start:start + 1000])
        new = mem.engine.bank("new")
        wait_sealed(new)
        assert new.shards[0].index.ntotal == n and new.shards[0].indexed == n   # ONE index
        r_old = recall(mem.search("old", q, 10, values=False).ids, want)
        r_new = recall(mem.search("new", q, 10, values=False).ids, want)
        assert r_new >= r_old - 0.02, (r_new, r_old)


# ---- the sealer -------------------------------------------------------------------------------

def test_one_sealer_thread_for_every_bank_and_it_survives_a_failure(tmp_path, seg):
    keys = gaussian(1200, DIM, 20)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        for name in ("a", "b", "c"):
            mem.create_bank(spec(name, index="HNSW16"))
        bank = mem.engine.bank("a")
        real, calls = bank.shards[0].seal_copy_prepare, [0]

        def failing():
            calls[0] += 1
            if calls[0] == 1:
                raise MemoryError("injected")
            return real()

        bank.shards[0].seal_copy_prepare = failing
        failures = segments.SEALER.failures
        for name in ("a", "b", "c"):
            mem.add(name, keys, keys[:, :VDIM])
        assert sum(t.name == "memoryd-sealer" for t in threading.enumerate()) == 1
        for name in ("a", "b", "c"):
            wait_sealed(mem.engine.bank(name))
        assert segments.SEALER.failures == failures + 1 and calls[0] > 1
        r = mem.search("a", keys[:50], 1, values=False)
        assert (r.ids[:, 0] == np.arange(50)).mean() > 0.95
    time.sleep(segments.LINGER_S + 0.3)                    # no bank left: the thread is gone
    assert not any(t.name == "memoryd-sealer" for t in threading.enumerate())


def test_close_with_rows_growing_is_clean(tmp_path, seg):
    hold_sealing(seg)
    keys = gaussian(3000, DIM, 21)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(spec("b", index="HNSW16"))
        mem.add("b", keys, keys[:, :VDIM])
        bank = mem.engine.bank("b")
        resume_sealing(seg, bank)
        time.sleep(0.1)                                    # mid-sealing
    assert bank._closed and bank not in segments.SEALER._banks
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        assert mem.bank_info("b").count == 3000
        got = mem.get("b", np.arange(3000), keys=True)
        np.testing.assert_array_equal(got.keys, keys)


def test_background_writes_yield_to_writers():
    lock = RWLock()
    with lock.write():
        t0 = time.monotonic()
        with lock.write_background(quiet=0.0, timeout=0.05) as held:
            assert not held and time.monotonic() - t0 >= 0.05
    with lock.write_background(quiet=0.05, timeout=0.01) as held:
        assert not held                                    # a writer let go just now
    time.sleep(0.06)
    with lock.write_background(quiet=0.05, timeout=0.01) as held:
        assert held
    with lock.read():                                      # and the lock is free again
        pass
