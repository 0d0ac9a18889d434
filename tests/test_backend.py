"""The backend contract, on both backends (in-process and over gRPC), checked
against an exact float64 brute-force reference (tests/reference.py)."""
from __future__ import annotations

import numpy as np
import pytest

from memoryd import errors
from memoryd.api import METRICS, BankInfo, MemoryBackend, SearchResult
from memoryd.arrays import BFLOAT16, VALUE_DTYPES
from reference import (assert_same_hits, assert_scores_close, empty_score, f32, gaussian,
                       hit_scores, mixture, recall, rows_of, scores, topk_union, values_for)

VALUE_DTYPE_NAMES = list(VALUE_DTYPES)


# ---- helpers -------------------------------------------------------------------

def fill(mem, spec, n, seed, keys=None, ids=None):
    """Add n rows to the bank; returns (keys, values-as-stored or None, ids)."""
    keys = gaussian(n, spec.dim, seed) if keys is None else keys
    vals = values_for(n, spec.value_dim, seed + 7777, spec.value_dtype) if spec.value_dim else None
    got = mem.add(spec.name, keys, vals, ids=ids)
    got = np.asarray(got)
    assert got.shape == (n,), got.shape
    assert got.dtype == np.int64, got.dtype
    return keys, vals, got


def check_result_types(res: SearchResult, nq, k, *, value_dim=None, value_dtype=None, dim=None):
    assert isinstance(res, SearchResult)
    assert res.ids.shape == (nq, k) and res.ids.dtype == np.int64, (res.ids.shape, res.ids.dtype)
    assert res.scores.shape == (nq, k) and res.scores.dtype == np.float32, res.scores.dtype
    assert res.bank.shape == (nq, k) and res.bank.dtype == np.int32, res.bank.dtype
    if value_dim is not None:
        assert res.values is not None
        assert res.values.shape == (nq, k, value_dim), res.values.shape
        assert res.values.dtype == VALUE_DTYPES[value_dtype], res.values.dtype
    if dim is not None:
        assert res.keys is not None
        assert res.keys.shape == (nq, k, dim) and res.keys.dtype == np.float32


def check_hits_payload(res, per_bank):
    """values/keys returned for every hit equal what was stored.

    per_bank: list (by bank position in the search) of (keys, values, ids).
    """
    for b, (keys, vals, ids) in enumerate(per_bank):
        sel = res.bank == b
        rows = rows_of(ids, res.ids[sel])
        assert (rows >= 0).all(), f"bank {b}: ids {res.ids[sel][rows < 0]} were never added"
        if res.values is not None and vals is not None:
            np.testing.assert_array_equal(f32(res.values[sel]), f32(vals[rows]))
        if res.keys is not None:
            np.testing.assert_array_equal(res.keys[sel], keys[rows])
    missing = res.ids < 0
    assert (res.bank[missing] == -1).all()
    if res.values is not None:
        assert (f32(res.values[missing]) == 0).all()
    if res.keys is not None:
        assert (res.keys[missing] == 0).all()


def exact_check(mem, names, per_bank, queries, k, metric, **kw):
    """Search `names` and compare with the exact top-k over the union."""
    res = mem.search(names, queries, k, **kw)
    rb, rpos, rsc = topk_union([p[0] for p in per_bank], queries, k, metric)
    ref_ids = np.where(rpos >= 0, 0, -1).astype(np.int64)
    for b, (_, _, ids) in enumerate(per_bank):
        sel = rb == b
        ref_ids[sel] = ids[rpos[sel]]

    q = np.asarray(queries, np.float32)
    true = np.full(res.ids.shape, np.nan)
    for b, (keys, _, ids) in enumerate(per_bank):
        sel = (res.bank == b) & (res.ids >= 0)
        rows = rows_of(ids, res.ids[sel])
        assert (rows >= 0).all(), f"bank {b} returned unknown ids {res.ids[sel][rows < 0][:5]}"
        true[sel] = hit_scores(keys[rows], q[np.nonzero(sel)[0]], metric)
    assert not np.isnan(true[res.ids >= 0]).any(), "hits with a bank outside the request"
    assert_same_hits(res.ids, res.scores, ref_ids, rsc, metric, got_bank=res.bank,
                     ref_bank=rb, true_scores=true)
    check_hits_payload(res, per_bank)
    return res, ref_ids, rsc


def count(mem, name) -> int:
    return mem.bank_info(name).count


def used(mem, name) -> int:
    return mem.bank_info(name).used_bytes


# ---- exact search ----------------------------------------------------------------

def test_backend_satisfies_protocol(mem):
    assert isinstance(mem, MemoryBackend)


@pytest.mark.parametrize("value_dtype", VALUE_DTYPE_NAMES)
@pytest.mark.parametrize("metric", METRICS)
def test_flat_exact_topk(mem, make_bank, metric, value_dtype):
    spec = make_bank(mem, dim=32, value_dim=8, metric=metric, value_dtype=value_dtype)
    keys, vals, ids = fill(mem, spec, 2000, seed=1)
    assert len(set(ids.tolist())) == 2000
    q = gaussian(40, 32, seed=2)
    res, _, _ = exact_check(mem, spec.name, [(keys, vals, ids)], q, 10, metric, keys=True)
    check_result_types(res, 40, 10, value_dim=8, value_dtype=value_dtype, dim=32)
    assert (res.bank == 0).all()
    assert res.mask.all()
    # best first
    d = np.diff(res.scores.astype(np.float64), axis=1)
    assert (d >= -1e-5).all() if metric == "l2" else (d <= 1e-5).all()


@pytest.mark.parametrize("metric", METRICS)
def test_flat_exact_unit_queries_and_k1(mem, make_bank, metric):
    """Unit keys/queries (what the attention layer sends); k=1 finds the key itself."""
    from reference import unit

    spec = make_bank(mem, dim=16, value_dim=4, metric=metric)
    keys, vals, ids = fill(mem, spec, 800, seed=3, keys=unit(gaussian(800, 16, 3)))
    q = keys[::50].copy()
    res, _, _ = exact_check(mem, spec.name, [(keys, vals, ids)], q, 1, metric)
    np.testing.assert_array_equal(res.ids[:, 0], ids[::50])
    if metric == "ip":
        np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(res.scores[:, 0], 0.0, atol=1e-5)


def test_search_flags_values_keys(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4)
    keys, vals, ids = fill(mem, spec, 300, seed=4)
    q = gaussian(5, 16, 5)
    res = mem.search(spec.name, q, 3, values=False, keys=False)
    assert res.values is None and res.keys is None
    res = mem.search(spec.name, q, 3, values=False, keys=True)
    assert res.values is None
    check_result_types(res, 5, 3, dim=16)
    res2 = mem.search(spec.name, q, 3, values=True, keys=True)
    check_result_types(res2, 5, 3, value_dim=4, value_dtype="float32", dim=16)
    np.testing.assert_array_equal(res.ids, res2.ids)
    np.testing.assert_array_equal(res.keys, res2.keys)
    check_hits_payload(res2, [(keys, vals, ids)])


def test_key_only_bank(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=0)
    keys, _, ids = fill(mem, spec, 400, seed=6)
    q = gaussian(7, 16, 7)
    res, _, _ = exact_check(mem, spec.name, [(keys, None, ids)], q, 5, "l2", keys=True,
                            values=False)
    assert res.values is None
    g = mem.get(spec.name, ids[:10], values=False, keys=True)
    assert g.found.all() and g.values is None
    np.testing.assert_array_equal(g.keys, keys[:10])


def test_key_only_bank_default_flags(mem, make_bank):
    """search/get with their default flags (values=True) work on a key-only
    bank too: there are no values to return, so `values` is None (or empty)."""
    spec = make_bank(mem, dim=16, value_dim=0)
    keys, _, ids = fill(mem, spec, 50, seed=6)
    res = mem.search(spec.name, keys[:3], 2)
    np.testing.assert_array_equal(res.ids[:, 0], ids[:3])
    assert res.values is None or res.values.shape == (3, 2, 0)
    g = mem.get(spec.name, ids[:4])
    assert g.found.all()
    assert g.values is None or g.values.shape == (4, 0)


@pytest.mark.parametrize("metric", METRICS)
def test_k_larger_than_bank(mem, make_bank, metric):
    spec = make_bank(mem, dim=16, value_dim=4, metric=metric, value_dtype="float16")
    keys, vals, ids = fill(mem, spec, 5, seed=8)
    q = gaussian(3, 16, 9)
    res, _, _ = exact_check(mem, spec.name, [(keys, vals, ids)], q, 8, metric, keys=True)
    check_result_types(res, 3, 8, value_dim=4, value_dtype="float16", dim=16)
    assert res.mask[:, :5].all() and not res.mask[:, 5:].any()
    assert (res.ids[:, 5:] == -1).all()
    assert (res.bank[:, 5:] == -1).all() and (res.bank[:, :5] == 0).all()
    assert (res.scores[:, 5:] == empty_score(metric)).all()
    assert (f32(res.values[:, 5:]) == 0).all()
    assert (res.keys[:, 5:] == 0).all()
    assert sorted(res.ids[0, :5].tolist()) == sorted(ids.tolist())


@pytest.mark.parametrize("metric", METRICS)
def test_empty_bank_search(mem, make_bank, metric):
    spec = make_bank(mem, dim=16, value_dim=4, metric=metric)
    res = mem.search(spec.name, gaussian(2, 16, 10), 4, keys=True)
    check_result_types(res, 2, 4, value_dim=4, value_dtype="float32", dim=16)
    assert (res.ids == -1).all() and (res.bank == -1).all() and not res.mask.any()
    assert (res.scores == empty_score(metric)).all()
    assert (res.values == 0).all() and (res.keys == 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_search_untrained_ivf_bank_is_empty(mem, make_bank, metric):
    """An IVF bank before its first add is untrained; searching it (alone or
    with others) finds nothing there instead of failing."""
    ivf = make_bank(mem, dim=16, value_dim=4, metric=metric, index="IVF16,Flat")
    assert not mem.bank_info(ivf.name).trained
    res = mem.search(ivf.name, gaussian(3, 16, 11), 5, keys=True)
    check_result_types(res, 3, 5, value_dim=4, value_dtype="float32", dim=16)
    assert not res.mask.any() and (res.bank == -1).all()
    assert (res.scores == empty_score(metric)).all()
    flat = make_bank(mem, dim=16, value_dim=4, metric=metric)
    kv = fill(mem, flat, 100, seed=12)
    empty = (np.zeros((0, 16), np.float32), np.zeros((0, 4), np.float32),
             np.zeros(0, np.int64))
    res, _, _ = exact_check(mem, [ivf.name, flat.name], [empty, kv], gaussian(3, 16, 13), 5,
                            metric)
    assert (res.bank == 1).all()


@pytest.mark.parametrize("explicit_ids", [False, True], ids=["assigned", "colliding"])
@pytest.mark.parametrize("metric", METRICS)
def test_multi_bank_merge(mem, make_bank, metric, explicit_ids):
    """Top-k over the union of banks; `bank` says where each hit lives.

    With explicit ids 0..n-1 in every bank the same id exists in all banks,
    so only `bank` can tell the hits apart.
    """
    per_bank, names = [], []
    for i, n in enumerate((300, 700, 1200)):
        spec = make_bank(mem, dim=16, value_dim=4, metric=metric)
        ids = np.arange(n, dtype=np.int64) if explicit_ids else None
        kv = fill(mem, spec, n, seed=20 + i, ids=ids)
        if explicit_ids:
            np.testing.assert_array_equal(kv[2], ids)
        per_bank.append(kv)
        names.append(spec.name)
    q = gaussian(30, 16, 30)
    res, _, _ = exact_check(mem, names, per_bank, q, 20, metric, keys=True)
    assert set(np.unique(res.bank).tolist()) <= {0, 1, 2}
    assert len(np.unique(res.bank)) > 1, "expected hits from more than one bank"

    # the bank order of the request defines `bank`
    order = [2, 0]
    res2, _, _ = exact_check(mem, [names[i] for i in order], [per_bank[i] for i in order],
                             q, 20, metric)
    assert set(np.unique(res2.bank).tolist()) <= {0, 1}


@pytest.mark.parametrize("metric", METRICS)
def test_multi_bank_merge_with_empty_and_small_banks(mem, make_bank, metric):
    """k larger than the union: the union's items first, then padding."""
    specs = [make_bank(mem, dim=16, value_dim=2, metric=metric) for _ in range(3)]
    empty = (np.zeros((0, 16), np.float32), np.zeros((0, 2), np.float32),
             np.zeros(0, np.int64))
    a = fill(mem, specs[0], 3, seed=40)
    c = fill(mem, specs[2], 4, seed=41)
    q = gaussian(4, 16, 42)
    res, _, _ = exact_check(mem, [s.name for s in specs], [a, empty, c], q, 10, metric)
    assert res.mask[:, :7].all() and not res.mask[:, 7:].any()
    assert (res.scores[:, 7:] == empty_score(metric)).all()
    assert (res.bank[:, :7] != 1).all()
    assert sorted(res.bank[0, :7].tolist()) == [0, 0, 0, 2, 2, 2, 2]


def test_merge_key_only_bank_with_value_bank(mem, make_bank):
    """api: values come back when some bank holds them; hits from a key-only
    bank carry zero values."""
    vb = make_bank(mem, dim=16, value_dim=4)
    kb = make_bank(mem, dim=16, value_dim=0)
    a = fill(mem, vb, 200, seed=130)
    b = fill(mem, kb, 200, seed=131)
    q = gaussian(10, 16, 132)
    res, _, _ = exact_check(mem, [vb.name, kb.name], [a, (b[0], None, b[2])], q, 10, "l2",
                            keys=True)
    check_result_types(res, 10, 10, value_dim=4, value_dtype="float32", dim=16)
    assert (res.bank == 1).any() and (res.bank == 0).any()
    assert (res.values[res.bank == 1] == 0).all()
    check_hits_payload(res, [a, (b[0], None, b[2])])
    only = mem.search([kb.name], q, 3)
    assert only.values is None


def test_merge_banks_of_different_value_dtypes(mem, make_bank):
    """Banks with different value dtypes merge; values keep every bank's numbers."""
    specs = [make_bank(mem, dim=16, value_dim=4, value_dtype=d)
             for d in ("float16", "bfloat16", "float32")]
    per_bank = [fill(mem, s, 150, seed=140 + i) for i, s in enumerate(specs)]
    q = gaussian(8, 16, 143)
    res, _, _ = exact_check(mem, [s.name for s in specs], per_bank, q, 12, "l2")
    assert res.values.shape == (8, 12, 4)
    assert res.values.dtype in (np.dtype(np.float32), *VALUE_DTYPES.values())
    assert len(np.unique(res.bank)) > 1


@pytest.mark.parametrize("metric", METRICS)
def test_sharded_equals_unsharded(mem, make_bank, metric):
    one = make_bank(mem, dim=16, value_dim=4, metric=metric, shards=1)
    three = make_bank(mem, dim=16, value_dim=4, metric=metric, shards=3)
    keys = gaussian(1500, 16, 50)
    vals = values_for(1500, 4, 51)
    ids1, ids3 = [], []
    for s in range(0, 1500, 500):                  # several adds
        ids1.append(mem.add(one.name, keys[s:s + 500], vals[s:s + 500]))
        ids3.append(mem.add(three.name, keys[s:s + 500], vals[s:s + 500]))
    ids1, ids3 = np.concatenate(ids1), np.concatenate(ids3)
    assert len(set(ids3.tolist())) == 1500
    assert count(mem, three.name) == count(mem, one.name) == 1500
    q = gaussian(25, 16, 52)
    r1, _, _ = exact_check(mem, one.name, [(keys, vals, ids1)], q, 15, metric, keys=True)
    r3, _, _ = exact_check(mem, three.name, [(keys, vals, ids3)], q, 15, metric, keys=True)
    np.testing.assert_allclose(r1.scores, r3.scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(r1.keys, r3.keys)
    assert (r3.bank == 0).all()

    g = mem.get(three.name, ids3[::7], keys=True)
    assert g.found.all()
    np.testing.assert_array_equal(g.keys, keys[::7])
    np.testing.assert_array_equal(g.values, vals[::7])

    # removal across shards
    gone = np.arange(0, 1500, 3)
    assert mem.remove(three.name, ids3[gone]) == len(gone)
    assert mem.remove(one.name, ids1[gone]) == len(gone)
    keep = np.setdiff1d(np.arange(1500), gone)
    assert count(mem, three.name) == len(keep)
    exact_check(mem, three.name, [(keys[keep], vals[keep], ids3[keep])], q, 15, metric)
    exact_check(mem, one.name, [(keys[keep], vals[keep], ids1[keep])], q, 15, metric)


def test_sharded_explicit_ids_and_export(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4, shards=3)
    ids = np.arange(10_000, 10_900, dtype=np.int64)[::-1].copy()
    keys, vals, got = fill(mem, spec, 900, seed=55, ids=ids)
    np.testing.assert_array_equal(got, ids)
    exact_check(mem, spec.name, [(keys, vals, ids)], gaussian(10, 16, 56), 12, "l2")
    ex_ids, ex_keys, ex_vals = export_all(mem, spec.name, chunk_rows=128)
    order = np.argsort(ex_ids)
    ref = np.argsort(ids)
    np.testing.assert_array_equal(ex_ids[order], ids[ref])
    np.testing.assert_array_equal(ex_keys[order], keys[ref])
    np.testing.assert_array_equal(ex_vals[order], vals[ref])


# ---- approximate indexes ------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("index", ["HNSW32", "IVF16,Flat"])
def test_approximate_index_recall(mem, make_bank, index, metric):
    spec = make_bank(mem, dim=32, value_dim=4, metric=metric, index=index)
    if index.startswith("IVF"):
        assert not mem.bank_info(spec.name).trained
    x, centers = mixture(3000, 32, seed=60, clusters=48, spread=0.2)
    assert len(x) >= 16 * 39
    keys, vals, ids = fill(mem, spec, 3000, seed=61, keys=x)
    info = mem.bank_info(spec.name)
    assert info.trained and info.count == 3000
    q, _ = mixture(200, 32, seed=62, centers=centers, spread=0.2)
    res = mem.search(spec.name, q, 10, keys=True)
    check_result_types(res, 200, 10, value_dim=4, value_dtype="float32", dim=32)
    _, rpos, _ = topk_union([keys], q, 10, metric)
    r = recall(res.ids, ids[rpos])
    assert r >= 0.999, f"{index} {metric}: recall@10 {r:.3f}"   # measured 1.000
    check_hits_payload(res, [(keys, vals, ids)])
    # scores are the true scores of the returned keys
    rows = rows_of(ids, res.ids)
    true = np.take_along_axis(scores(keys, q, metric), rows, axis=1)
    assert_scores_close(res.scores, true)

    # later small adds go into the trained index
    k2, v2, ids2 = fill(mem, spec, 50, seed=63, keys=mixture(50, 32, 64, centers=centers,
                                                                spread=0.2)[0])
    assert not set(ids2.tolist()) & set(ids.tolist())
    assert count(mem, spec.name) == 3050
    r2 = mem.search(spec.name, k2[:20], 10)
    _, rpos2, _ = topk_union([np.concatenate([keys, k2])], k2[:20], 10, metric)
    r = recall(r2.ids, np.concatenate([ids, ids2])[rpos2])
    assert r >= 0.995, f"{index} {metric}: recall@10 after a second add {r:.3f}"
    assert set(r2.ids.ravel().tolist()) & set(ids2.tolist()), "new rows are searchable"


# ---- items: add / get / update / remove ----------------------------------------------

def test_add_get_update_remove(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=6, value_dtype="float16")
    base_used = used(mem, spec.name)
    keys, vals, ids = fill(mem, spec, 600, seed=70)
    k2, v2, ids2 = fill(mem, spec, 400, seed=71)
    assert not set(ids.tolist()) & set(ids2.tolist()), "ids must be unique within a bank"
    assert (ids >= 0).all() and (ids2 >= 0).all()
    keys, vals, ids = np.concatenate([keys, k2]), np.concatenate([vals, v2]), \
        np.concatenate([ids, ids2])
    assert count(mem, spec.name) == 1000
    used_full = used(mem, spec.name)
    assert used_full > base_used

    # get, in any order, with repeats
    pick = np.array([5, 999, 0, 5, 640])
    g = mem.get(spec.name, ids[pick], values=True, keys=True)
    assert g.found.dtype == np.bool_ and g.found.all()
    assert g.values.dtype == np.float16 and g.values.shape == (5, 6)
    np.testing.assert_array_equal(g.values, vals[pick])
    np.testing.assert_array_equal(g.keys, keys[pick])
    g = mem.get(spec.name, ids[pick], values=False, keys=False)
    assert g.found.all() and g.values is None and g.keys is None

    # unknown ids
    unknown = np.array([ids.max() + 1, ids.max() + 12345, ids[3]], dtype=np.int64)
    g = mem.get(spec.name, unknown, keys=True)
    np.testing.assert_array_equal(g.found, [False, False, True])
    assert (g.values[:2] == 0).all() and (g.keys[:2] == 0).all()
    np.testing.assert_array_equal(g.values[2], vals[3])

    # update_values: get and search see the new values
    upd = np.arange(0, 1000, 10)
    new = values_for(len(upd), 6, 72, "float16") + np.float16(5)
    assert mem.update_values(spec.name, ids[upd], new) == len(upd)
    vals = vals.copy()
    vals[upd] = new
    g = mem.get(spec.name, ids[upd])
    np.testing.assert_array_equal(g.values, new)
    q = keys[upd[:8]]
    exact_check(mem, spec.name, [(keys, vals, ids)], q, 5, "l2")
    assert count(mem, spec.name) == 1000

    # remove: gone from get and search; count and usage drop
    gone = np.arange(0, 1000, 2)
    assert mem.remove(spec.name, ids[gone]) == len(gone)
    assert count(mem, spec.name) == 500
    assert used(mem, spec.name) < used_full
    g = mem.get(spec.name, ids[gone[:20]])
    assert not g.found.any()
    keep = np.setdiff1d(np.arange(1000), gone)
    res, _, _ = exact_check(mem, spec.name, [(keys[keep], vals[keep], ids[keep])],
                            keys[gone[:10]], 8, "l2")
    assert not set(res.ids.ravel().tolist()) & set(ids[gone].tolist())

    # new ids never reuse removed ones
    _, _, ids3 = fill(mem, spec, 50, seed=73)
    assert not set(ids3.tolist()) & set(ids.tolist())


@pytest.mark.parametrize("index", ["HNSW32", "IVF8,Flat"])
def test_remove_from_approximate_index(mem, make_bank, index):
    """Removed items never come back from search, whatever the index type."""
    spec = make_bank(mem, dim=16, value_dim=2, index=index, shards=2)
    x, centers = mixture(800, 16, seed=120, clusters=10, spread=0.3)
    keys, vals, ids = fill(mem, spec, 800, seed=121, keys=x)
    gone = np.arange(0, 800, 4)
    assert mem.remove(spec.name, ids[gone]) == len(gone)
    assert count(mem, spec.name) == 600
    res = mem.search(spec.name, keys[gone[:50]], 10)
    assert not set(res.ids.ravel().tolist()) & set(ids[gone].tolist())
    keep = np.setdiff1d(np.arange(800), gone)
    _, rpos, _ = topk_union([keys[keep]], keys[gone[:50]], 10, "l2")
    assert recall(res.ids, ids[keep][rpos]) >= 0.998      # measured 1.000 (500 hits)
    check_hits_payload(res, [(keys, vals, ids)])


def test_remove_unknown_ids_removes_nothing(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=2)
    _, _, ids = fill(mem, spec, 20, seed=74)
    assert mem.remove(spec.name, ids[:5]) == 5
    assert mem.remove(spec.name, ids[:5]) == 0
    assert mem.remove(spec.name, np.array([ids.max() + 100])) == 0
    assert count(mem, spec.name) == 15


def test_remove_everything_then_add(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=2, shards=2)
    _, _, ids = fill(mem, spec, 30, seed=75)
    assert mem.remove(spec.name, ids) == 30
    assert count(mem, spec.name) == 0
    res = mem.search(spec.name, gaussian(2, 16, 76), 3)
    assert (res.ids == -1).all()
    keys, vals, ids2 = fill(mem, spec, 10, seed=77)
    exact_check(mem, spec.name, [(keys, vals, ids2)], gaussian(2, 16, 78), 3, "l2")


def test_explicit_ids_honoured(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4)
    ids = np.array([7, 3, 1 << 40, 123456789012, 0, 42], dtype=np.int64)
    keys, vals, got = fill(mem, spec, 6, seed=80, ids=ids)
    np.testing.assert_array_equal(got, ids)
    g = mem.get(spec.name, ids[::-1], keys=True)
    assert g.found.all()
    np.testing.assert_array_equal(g.keys, keys[::-1])
    np.testing.assert_array_equal(g.values, vals[::-1])
    res = mem.search(spec.name, keys, 1)
    np.testing.assert_array_equal(res.ids[:, 0], ids)
    # explicit ids as a list, and assigned ids after explicit ones do not collide
    got2 = mem.add(spec.name, gaussian(2, 16, 81), values_for(2, 4, 82), ids=[99, 100])
    np.testing.assert_array_equal(got2, [99, 100])
    _, _, auto = fill(mem, spec, 20, seed=83)
    assert not set(auto.tolist()) & {7, 3, 1 << 40, 123456789012, 0, 42, 99, 100}


def test_duplicate_explicit_ids_refused(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4)
    with pytest.raises(errors.InvalidArgument, match="(?i)duplicate|twice|repeat|unique"):
        mem.add(spec.name, gaussian(3, 16, 84), values_for(3, 4, 85), ids=[1, 2, 1])
    assert count(mem, spec.name) == 0
    mem.add(spec.name, gaussian(2, 16, 86), values_for(2, 4, 87), ids=[1, 2])
    # an id the bank already holds
    with pytest.raises((errors.InvalidArgument, errors.AlreadyExists)):
        mem.add(spec.name, gaussian(2, 16, 88), values_for(2, 4, 89), ids=[5, 2])
    assert count(mem, spec.name) == 2
    assert not mem.get(spec.name, [5]).found.any()


# ---- bank administration ---------------------------------------------------------------

def test_bank_admin(mem, make_bank):
    from conftest import new_spec

    spec = new_spec(dim=24, value_dim=12, kind="session", value_dtype="bfloat16",
                    metric="ip", index="HNSW32", shards=2, quota_bytes=10**7, tenant="acme")
    info = mem.create_bank(spec)
    assert isinstance(info, BankInfo)
    assert info.spec == spec
    assert info.count == 0 and not info.frozen
    assert mem.bank_info(spec.name).spec == spec
    other = make_bank(mem)
    names = [b.name for b in mem.list_banks()]
    assert spec.name in names and other.name in names
    assert [b.name for b in mem.list_banks(tenant="acme")] == [spec.name]
    assert mem.list_banks(tenant="nobody") == []
    assert spec.name in [b.name for b in mem.stats().banks]

    mem.add(spec.name, gaussian(30, 24, 90), values_for(30, 12, 91, "bfloat16"))
    before = mem.bank_info(spec.name)
    assert before.count == 30 and before.used_bytes > 0
    released = mem.delete_bank(spec.name)
    assert released == before.used_bytes
    with pytest.raises(errors.NotFound):
        mem.bank_info(spec.name)
    assert spec.name not in [b.name for b in mem.list_banks()]
    # the name can be used again, for a different bank
    again = mem.create_bank(spec.with_(dim=8, value_dim=0, tenant="default"))
    assert again.count == 0 and again.spec.dim == 8


def test_freeze(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4, kind="base")
    keys, vals, ids = fill(mem, spec, 200, seed=92)
    info = mem.freeze_bank(spec.name)
    assert info.frozen and mem.bank_info(spec.name).frozen
    assert info.checksum, "a frozen bank carries a checksum"
    with pytest.raises(errors.BankFrozen, match="(?i)frozen"):
        mem.add(spec.name, gaussian(2, 16, 93), values_for(2, 4, 94))
    with pytest.raises(errors.FailedPrecondition, match="(?i)frozen"):
        mem.update_values(spec.name, ids[:2], values_for(2, 4, 95))
    with pytest.raises(errors.BankFrozen, match="(?i)frozen"):
        mem.remove(spec.name, ids[:2])
    assert count(mem, spec.name) == 200
    exact_check(mem, spec.name, [(keys, vals, ids)], gaussian(5, 16, 96), 4, "l2")
    g = mem.get(spec.name, ids[:3])
    np.testing.assert_array_equal(g.values, vals[:3])
    # a frozen bank can still be deleted
    assert mem.delete_bank(spec.name) >= 0


def test_set_quota_and_usage(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4)
    total0 = mem.stats().used_bytes
    assert used(mem, spec.name) >= 0
    info = mem.set_quota(spec.name, 12345)
    assert info.spec.quota_bytes == 12345
    assert mem.bank_info(spec.name).spec.quota_bytes == 12345
    assert mem.set_quota(spec.name, None).spec.quota_bytes is None
    u0 = used(mem, spec.name)
    fill(mem, spec, 100, seed=97)
    u1 = used(mem, spec.name)
    fill(mem, spec, 100, seed=98)
    u2 = used(mem, spec.name)
    assert u0 < u1 < u2
    # at least the raw keys and values
    assert u2 - u0 >= 200 * (16 * 4 + 4 * 4)
    st = mem.stats()
    assert st.used_bytes == sum(b.used_bytes for b in st.banks)
    assert st.used_bytes >= total0 + (u2 - u0)
    assert mem.delete_bank(spec.name) == u2
    assert mem.stats().used_bytes == total0 - u0


def test_stats(mem, make_bank):
    a = make_bank(mem)
    b = make_bank(mem, dim=8, value_dim=0)
    fill(mem, a, 10, seed=99)
    st = mem.stats()
    assert st.version
    assert st.uptime_s >= 0
    by_name = {i.name: i for i in st.banks}
    assert {a.name, b.name} <= set(by_name)
    assert by_name[a.name].count == 10 and by_name[b.name].count == 0


# ---- quotas -----------------------------------------------------------------------------

def test_quota_enforced_at_admission(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4)
    u_empty = used(mem, spec.name)
    fill(mem, spec, 10, seed=100)
    per_row = (used(mem, spec.name) - u_empty) / 10
    assert per_row >= 16 * 4 + 4 * 4, "usage counts at least the raw keys and values"
    # room for about 25 more rows of this size, not 100
    quota = used(mem, spec.name) + int(25 * per_row)
    mem.set_quota(spec.name, quota)
    fill(mem, spec, 20, seed=101)
    before = mem.bank_info(spec.name)
    assert before.count == 30 and before.used_bytes <= quota
    keys = gaussian(100, 16, 102)
    vals = values_for(100, 4, 103)
    with pytest.raises(errors.QuotaExceeded, match="(?i)quota") as ei:
        mem.add(spec.name, keys, vals)
    e = ei.value
    assert e.bank == spec.name
    assert e.limit == quota
    assert e.used == before.used_bytes
    assert e.requested > 0 and e.used + e.requested > e.limit
    after = mem.bank_info(spec.name)
    assert after.count == 30 and after.used_bytes == before.used_bytes
    res = mem.search(spec.name, keys[:3], 40)
    assert res.mask.sum(1).tolist() == [30, 30, 30]
    # raising the quota lets the same add through
    mem.set_quota(spec.name, before.used_bytes + e.requested)
    ids = mem.add(spec.name, keys, vals)
    assert len(ids) == 100
    assert used(mem, spec.name) == before.used_bytes + e.requested
    # a quota below usage is refused (the bank is not fifo), and a full bank
    # still takes deletes
    with pytest.raises(errors.FailedPrecondition, match="below"):
        mem.set_quota(spec.name, 1)
    assert mem.bank_info(spec.name).spec.quota_bytes == mem.bank_info(spec.name).used_bytes
    assert mem.remove(spec.name, ids[:10]) == 10


def test_quota_zero_refuses_first_add(mem, make_bank):
    spec = make_bank(mem, dim=16, value_dim=4, quota_bytes=0)
    with pytest.raises(errors.QuotaExceeded) as ei:
        mem.add(spec.name, gaussian(1, 16, 104), values_for(1, 4, 105))
    assert ei.value.limit == 0 and ei.value.requested > 0
    assert count(mem, spec.name) == 0


# ---- export ------------------------------------------------------------------------------

def export_all(mem, name, chunk_rows=65536):
    ids, keys, vals = [], [], []
    for ch in mem.export(name, chunk_rows=chunk_rows):
        assert len(ch.ids) <= chunk_rows
        ids.append(np.asarray(ch.ids))
        keys.append(np.asarray(ch.keys))
        if ch.values is not None:
            vals.append(np.asarray(ch.values))
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    keys = np.concatenate(keys) if keys else np.zeros((0, 0), np.float32)
    vals = np.concatenate(vals) if vals else None
    return ids, keys, vals


@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_export(mem, make_bank, value_dtype):
    spec = make_bank(mem, dim=16, value_dim=3, value_dtype=value_dtype)
    keys, vals, ids = fill(mem, spec, 700, seed=110)
    mem.remove(spec.name, ids[:100])
    keys, vals, ids = keys[100:], vals[100:], ids[100:]
    chunks = list(mem.export(spec.name, chunk_rows=256))
    assert len(chunks) >= 3
    ex_ids, ex_keys, ex_vals = export_all(mem, spec.name, chunk_rows=256)
    assert ex_vals.dtype == VALUE_DTYPES[value_dtype]
    assert len(ex_ids) == 600 and len(set(ex_ids.tolist())) == 600
    rows = rows_of(ids, ex_ids)
    assert (rows >= 0).all()
    np.testing.assert_array_equal(ex_keys, keys[rows])
    np.testing.assert_array_equal(f32(ex_vals), f32(vals[rows]))


def test_export_key_only_and_empty(mem, make_bank):
    spec = make_bank(mem, dim=8, value_dim=0)
    ex_ids, _, ex_vals = export_all(mem, spec.name)
    assert len(ex_ids) == 0
    keys, _, ids = fill(mem, spec, 50, seed=111)
    ex_ids, ex_keys, ex_vals = export_all(mem, spec.name)
    assert ex_vals is None
    np.testing.assert_array_equal(ex_keys, keys[rows_of(ids, ex_ids)])


# ---- torch inputs ---------------------------------------------------------------------------

def test_torch_inputs(mem, make_bank):
    torch = pytest.importorskip("torch")
    spec = make_bank(mem, dim=16, value_dim=4, value_dtype="bfloat16", metric="ip")
    keys_t = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    vals_t = torch.randn(300, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids = np.asarray(mem.add(spec.name, keys_t, vals_t))
    assert len(ids) == 300
    keys = keys_t.numpy()
    vals = vals_t.float().numpy().astype(BFLOAT16)
    q_t = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    res, _, _ = exact_check(mem, spec.name, [(keys, vals, ids)], q_t.numpy(), 5, "ip")
    res_t = mem.search([spec.name], q_t, 5)
    np.testing.assert_array_equal(res_t.ids, res.ids)
    assert res_t.values.dtype == BFLOAT16
    g = mem.get(spec.name, torch.from_numpy(ids[:4]), keys=True)
    assert g.found.all()
    np.testing.assert_array_equal(g.keys, keys[:4])
    np.testing.assert_array_equal(f32(g.values), f32(vals[:4]))
    # float64 / fp16 tensors are converted, k as a numpy integer
    mem.add(spec.name, keys_t[:2].double(), vals_t[:2].float())
    mem.search(spec.name, q_t.half(), np.int64(2))
    new = torch.ones(2, 4, dtype=torch.bfloat16)
    assert mem.update_values(spec.name, torch.from_numpy(ids[:2]), new) == 2
    np.testing.assert_array_equal(f32(mem.get(spec.name, ids[:2]).values), np.ones((2, 4)))


# ---- big payloads (several gRPC chunks each way) ------------------------------------------

def test_large_batches_span_several_messages(mem, make_bank):
    """Add, search, get and export payloads above streams.CHUNK_BYTES arrive whole
    and in order (the daemon splits them into several messages)."""
    from memoryd.wire import streams

    spec = make_bank(mem, dim=32, value_dim=16)
    n = 40_000
    keys = gaussian(n, 32, 150)
    vals = values_for(n, 16, 151)
    assert keys.nbytes + vals.nbytes > streams.CHUNK_BYTES
    ids = np.asarray(mem.add(spec.name, keys, vals))
    assert len(ids) == n and len(np.unique(ids)) == n
    q = gaussian(1000, 32, 152)
    res, _, _ = exact_check(mem, spec.name, [(keys, vals, ids)], q, 32, "l2", keys=True)
    assert res.keys.nbytes + res.values.nbytes > streams.CHUNK_BYTES
    g = mem.get(spec.name, ids[::-1], keys=True)
    assert g.found.all()
    np.testing.assert_array_equal(g.keys, keys[::-1])
    np.testing.assert_array_equal(g.values, vals[::-1])
    ex_ids, ex_keys, ex_vals = export_all(mem, spec.name)
    rows = rows_of(ids, ex_ids)
    assert sorted(rows.tolist()) == list(range(n))
    np.testing.assert_array_equal(ex_keys, keys[rows])
    np.testing.assert_array_equal(ex_vals, vals[rows])
