"""Product-key banks: exact top-k over n^2 keys, checked against brute force."""
import math

import numpy as np
import pytest

from memoryd import keyspace
from memoryd.errors import FailedPrecondition, InvalidArgument, QuotaExceeded
from memoryd.engine import LocalMemory


def all_keys(n: int, dim: int, seed: int) -> np.ndarray:
    """Every key of a product-key bank, row = id: (n^2, dim)."""
    c = keyspace.subkeys(n, dim, seed)
    i, j = np.divmod(np.arange(n * n), n)
    return np.concatenate([c[0][i], c[1][j]], axis=1) / math.sqrt(2)


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_exact_topk_against_brute_force(mem, make_bank, metric, k):
    n, dim = 12, 16
    spec = make_bank(mem, dim=dim, value_dim=4, metric=metric, index=f"product-keys:{n}|seed=3")
    keys = all_keys(n, dim, 3).astype(np.float64)
    q = unit(np.random.default_rng(0).standard_normal((50, dim)))
    res = mem.search(spec.name, q, k, keys=True)
    ip = q.astype(np.float64) @ keys.T                                    # (50, n^2)
    ref = np.argsort(-ip, axis=1, kind="stable")[:, :k]
    got_ip = np.take_along_axis(ip, res.ids, axis=1)
    ref_ip = np.take_along_axis(ip, ref, axis=1)
    np.testing.assert_allclose(got_ip, ref_ip, rtol=0, atol=1e-5)        # same top-k (ties aside)
    want = ref_ip if metric == "ip" else 2 - 2 * ref_ip                   # unit q: |q-k|^2
    np.testing.assert_allclose(res.scores, want, atol=1e-4)
    np.testing.assert_allclose(res.keys, keys[res.ids], atol=1e-6)
    assert res.mask.all() and (res.bank == 0).all()


def test_k_above_size_masks_and_values_follow_ids(mem, make_bank):
    spec = make_bank(mem, dim=8, value_dim=3, value_dtype="float16", index="product-keys:3")
    ids = np.arange(9)
    vals = np.arange(27, dtype=np.float32).reshape(9, 3)
    assert mem.update_values(spec.name, ids, vals) == 9
    res = mem.search(spec.name, unit(np.ones((2, 8))), 12)
    assert res.mask[:, :9].all() and not res.mask[:, 9:].any()
    assert (res.ids[:, 9:] == -1).all()
    np.testing.assert_array_equal(res.values[:, :9].astype(np.float32), vals[res.ids[:, :9]])
    assert res.values.dtype == np.float16
    got = mem.get(spec.name, [4, 99], keys=True)
    assert got.found.tolist() == [True, False]
    np.testing.assert_allclose(got.keys[0], all_keys(3, 8, 0)[4], atol=1e-6)


def test_keys_are_fixed(mem, make_bank):
    spec = make_bank(mem, dim=8, value_dim=2, index="product-keys:4")
    with pytest.raises(FailedPrecondition, match="product keys"):
        mem.add(spec.name, unit(np.ones((1, 8))), np.ones((1, 2)))
    with pytest.raises(FailedPrecondition, match="product keys"):
        mem.remove(spec.name, [0])
    info = mem.bank_info(spec.name)
    assert info.count == 16 and info.used_bytes > 0


def test_fifo_quota_below_usage_is_a_precondition_not_a_crash(mem, make_bank):
    """A fifo product-key bank cannot evict its fixed keys: lowering its quota
    below usage is FAILED_PRECONDITION (it was AttributeError -> INTERNAL)."""
    spec = make_bank(mem, dim=8, value_dim=2, index="product-keys:4", eviction="fifo")
    used = mem.bank_info(spec.name).used_bytes
    with pytest.raises(FailedPrecondition, match="product keys.*evict"):
        mem.set_quota(spec.name, used - 1)
    info = mem.bank_info(spec.name)
    assert (info.count, info.used_bytes, info.spec.quota_bytes) == (16, used, None)
    assert mem.set_quota(spec.name, used).spec.quota_bytes == used      # at usage: fine


def test_product_key_bank_declares_every_bank_operation():
    """Both bank kinds implement the whole declared interface (an abstract
    method left out would make the class impossible to build)."""
    from memoryd.storage import Bank, BankStore, ProductKeyBank
    assert BankStore.__abstractmethods__ >= {
        "plan_add", "add", "add_cost", "remove", "oldest_ids", "update_values", "searchers",
        "gather", "export_chunks", "set_tier", "checksum", "nbytes", "tier_bytes", "count"}
    for cls in (Bank, ProductKeyBank):
        assert issubclass(cls, BankStore) and not cls.__abstractmethods__, cls


@pytest.mark.parametrize("index,dim,match", [
    ("product-keys", 8, "product-keys:<n>"),
    ("product-keys:1", 8, "2.."),
    ("product-keys:4", 7, "even"),
    ("product-keys:x", 8, "product-keys:<n>"),
])
def test_bad_specs(mem, make_bank, index, dim, match):
    with pytest.raises(InvalidArgument, match=match):
        make_bank(mem, dim=dim, index=index)


def test_quota_is_checked_at_creation(mem, make_bank):
    with pytest.raises(QuotaExceeded):
        make_bank(mem, dim=8, value_dim=64, index="product-keys:64", quota_bytes=10_000)
    assert mem.list_banks() == []


def test_values_and_checksum_survive_reopen(tmp_path):
    with LocalMemory(tmp_path) as mem:
        from memoryd.api import BankSpec
        mem.create_bank(BankSpec("pk", dim=8, value_dim=2, index="product-keys:5|seed=9"))
        mem.update_values("pk", [3, 24], [[1, 2], [3, 4]])
        frozen = mem.freeze_bank("pk")
        before = mem.search("pk", unit(np.ones((3, 8))), 6)
    with LocalMemory(tmp_path) as mem:
        after = mem.search("pk", unit(np.ones((3, 8))), 6)
        np.testing.assert_array_equal(before.ids, after.ids)
        np.testing.assert_array_equal(mem.get("pk", [3, 24]).values, [[1, 2], [3, 4]])
        chunks = list(mem.export("pk", chunk_rows=10))
        assert sum(len(c.ids) for c in chunks) == 25
        assert mem.bank_info("pk").checksum == frozen.checksum


def test_layer_over_a_product_key_base_bank(mem):
    torch = pytest.importorskip("torch")
    from knnlayer import KNNAttention

    KNNAttention.create_base_bank(mem, "pk-base", 64, 8, 4, index="product-keys", seed=1)
    info = mem.bank_info("pk-base")
    assert info.count == 64 and info.spec.index == "product-keys:8|seed=1"
    attn = KNNAttention(input_dim=6, key_dim=8, value_dim=4, num_heads=2, topk=64,
                        memory=mem, banks=["pk-base"])
    x = torch.randn(2, 3, 6)
    y = attn(x)                                                         # (2, 3, 8)
    # k = bank size: the layer is dense softmax attention over all 64 keys
    keys = torch.from_numpy(all_keys(8, 8, 1)).float()                  # (64, 8)
    vals = torch.from_numpy(mem.get("pk-base", np.arange(64)).values).float()
    q = torch.nn.functional.normalize(attn.q_proj(x).view(2, 3, 2, 8), dim=-1)
    ref = torch.softmax(attn.scale.view(1, 1, 2, 1) * q @ keys.T, dim=-1) @ vals
    torch.testing.assert_close(y, ref.reshape(2, 3, 8), atol=1e-5, rtol=1e-5)


def test_layer_rebuilds_product_keys_instead_of_fetching_them(mem):
    torch = pytest.importorskip("torch")
    from knnlayer import KNNAttention

    KNNAttention.create_base_bank(mem, "pk-a", 49, 8, 4, index="product-keys", seed=3)
    KNNAttention.create_base_bank(mem, "pk-b", 16, 8, 4, index="product-keys", seed=4)
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(mem, name)

        def search(self, *args, **kwargs):
            seen.append(kwargs.get("keys"))
            return mem.search(*args, **kwargs)

    attn = KNNAttention(input_dim=6, key_dim=8, value_dim=4, num_heads=2, topk=9,
                        memory=Spy(), banks=["pk-a", "pk-b"])
    x = torch.randn(2, 3, 6)
    y = attn(x)                             # q needs a gradient: key vectors, rebuilt from ids
    with torch.no_grad():
        y_scores = attn(x)                  # no gradient: q . k read off the scores
    assert seen == [False, False]           # product keys never travel
    # reference: the same attention over key vectors fetched from the banks
    q = attn.queries(x.reshape(-1, 6)).detach()                               # (6, 2, 8)
    r = mem.search(["pk-a", "pk-b"], q.reshape(-1, 8).numpy(), 9, values=True, keys=True)
    keys = torch.from_numpy(r.keys).reshape(6, 2, 9, 8)                       # (N, H, k, dk)
    vals = torch.from_numpy(r.values).reshape(6, 2, 9, 4)                     # (N, H, k, dv)
    w = torch.softmax(attn.scale.detach().view(1, 2, 1) * torch.einsum("nhd,nhkd->nhk", q, keys), -1)
    ref = torch.einsum("nhk,nhkv->nhv", w, vals).reshape(2, 3, 8)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_scores, ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert attn.q_proj.weight.grad.abs().sum() > 0
