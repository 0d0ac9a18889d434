"""Product-key search against brute force over every key, and OpenMP threads
per search (memoryd.storage.faiss_index.threads_for / omp_threads)."""
import threading

import numpy as np
import pytest

from memoryd import keyspace
from memoryd.api import BankSpec
from memoryd.storage import ProductKeyBank
from memoryd.storage import faiss_index as fx


def pk_bank(tmp_path, n, dim, metric, seed=0):
    spec = BankSpec("pk", dim=dim, value_dim=3, index=f"product-keys:{n}|seed={seed}",
                    metric=metric)
    return ProductKeyBank(tmp_path / f"pk-{n}-{dim}-{metric}", spec)


def brute_force(bank, q, k):
    """(scores, ids) of the exact top-k over all n^2 keys in float64, ties by id."""
    keys = keyspace.key_vectors(bank.sub, np.arange(bank.count)).astype(np.float64)  # (K, dim)
    ip = q.astype(np.float64) @ keys.T                                                 # (nq, K)
    ids = np.argsort(-ip, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(ip, ids, axis=1)
    if bank.spec.metric == "l2":
        best = (q.astype(np.float64) ** 2).sum(1, keepdims=True) + 1 - 2 * best
    return best, ids


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("n,dim,k", [(2, 4, 3), (3, 8, 9), (16, 8, 32), (33, 16, 40),
                                     (64, 32, 32), (100, 64, 5)])
def test_product_keys_equal_brute_force_over_all_keys(tmp_path, metric, n, dim, k):
    bank = pk_bank(tmp_path, n, dim, metric, seed=n)
    rng = np.random.default_rng(n)
    q = rng.standard_normal((60, dim)).astype(np.float32)
    if metric == "ip":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    D, I = bank.top_k(q, k)                                                      # (nq, k)
    m = min(k, n * n)
    ref_d, ref_i = brute_force(bank, q, m)
    np.testing.assert_allclose(D[:, :m], ref_d, rtol=0, atol=2e-5)
    # the same keys: where a score is not tied (to float32 rounding) with a
    # neighbour in the reference, the id is the reference's
    gap = np.diff(ref_d, axis=1)
    alone = np.ones_like(ref_d, bool)
    alone[:, 1:] &= np.abs(gap) > 1e-5
    alone[:, :-1] &= np.abs(gap) > 1e-5
    if m < n * n:   # the m-th may tie the (m+1)-th, which the reference cut
        nxt, _ = brute_force(bank, q, m + 1)
        alone[:, -1] &= np.abs(nxt[:, -1] - ref_d[:, -1]) > 1e-5
    assert (I[:, :m][alone] == ref_i[alone]).all()
    assert all(len(set(row)) == m for row in I[:, :m].tolist())          # no key twice
    if m < k:       # fewer keys than k: padded
        assert (I[:, m:] == -1).all()
        assert np.isinf(D[:, m:]).all()


def test_product_key_results_do_not_depend_on_batch_or_threads(tmp_path, monkeypatch):
    """Ties included: one query alone on one thread, or in a batch on every
    thread, gets the same ids in the same order."""
    bank = pk_bank(tmp_path, 64, 16, "ip")
    rng = np.random.default_rng(1)
    q = rng.standard_normal((300, 16)).astype(np.float32)
    q[:100, 8:] = 0          # second half zero: every b ties, the order is the tie rule's
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    monkeypatch.setattr(fx, "WORK_PER_THREAD", 1)           # the batch: all threads
    D, I = bank.top_k(q, 32)
    for i in (0, 1, 150, 299):
        d1, i1 = bank.top_k(q[i:i + 1], 32)                 # one query: one thread
        np.testing.assert_array_equal(i1[0], I[i])
        np.testing.assert_array_equal(d1[0], D[i])


def test_product_key_gather_pads_missing_ids_with_zeros(tmp_path):
    bank = pk_bank(tmp_path, 3, 8, "ip").create()
    bank.update_values(np.arange(9), np.arange(27, dtype=np.float32).reshape(9, 3))
    found, keys, vals = bank.gather(np.array([[4, -1], [8, 9]]), keys=True, values=True)
    assert found.tolist() == [[True, False], [True, False]]
    np.testing.assert_array_equal(vals[0, 0], [12, 13, 14])
    assert not vals[0, 1].any() and not vals[1, 1].any() and not keys[1, 1].any()
    np.testing.assert_array_equal(keys[1, 0], keyspace.key_vectors(bank.sub, np.array(8)))


def test_threads_per_request_size():
    work = 1_000_000
    assert fx.threads_for(1, 10**12) == 1                   # one query: never split
    assert fx.threads_for(8, work) == 1                     # decode-sized: one thread
    most = fx.faiss.omp_get_max_threads()
    assert fx.threads_for(10**6, work) == most              # a big batch: all of them
    with fx.omp_threads(1):                                  # the caller's count is the ceiling
        assert fx.threads_for(10**6, work) == 1


def test_omp_threads_is_per_thread_and_restored():
    """omp_set_num_threads sets the calling thread's count only (libgomp
    keeps one per thread): concurrent searches choose their own."""
    seen, ready = {}, threading.Barrier(2)

    def worker(n):
        before = fx.faiss.omp_get_max_threads()
        with fx.omp_threads(n):
            ready.wait()                 # both inside at once
            seen[n] = fx.faiss.omp_get_max_threads()
            ready.wait()
        seen[-n] = fx.faiss.omp_get_max_threads() == before

    threads = [threading.Thread(target=worker, args=(n,)) for n in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {1: 1, 3: 3, -1: True, -3: True}
