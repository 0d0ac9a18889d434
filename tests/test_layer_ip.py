"""The layers on banks LARGER than k, inner-product banks above all, against a
brute-force float64 reference (top-k over the union of the stack by q . k,
then softmax of scale * q . k), through LocalMemory and the daemon.

With k >= the bank size, which rows are retrieved does not depend on the
merge order, so a merge that keeps the worst k of an ip search instead of
the best passes every test of that kind; here k is always smaller than the
stack, the stacks are sharded (a merge over shards), two banks (a merge over
banks) and per-row stacks (the row-stack merge). Keys are unit vectors, as
the layers assume, so l2 and ip rank alike: the reference is the same for
both metrics, and both are run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memoryd.api import BankQuery, BankSpec, SessionSpec
from knnlayer.attention import KNNAttention
from knnlayer.memorizing import MemorizingAttention

D, DK, DV, H = 12, 8, 5, 3
METRICS = ["l2", "ip"]


def unit(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, DK))
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def new_bank(mem, name: str, n: int, seed: int, metric: str, shards: int = 1):
    mem.create_bank(BankSpec(name=name, dim=DK, value_dim=DV, metric=metric, shards=shards))
    keys = unit(n, seed)
    vals = np.random.default_rng(seed + 1).standard_normal((n, DV)).astype(np.float32)
    mem.add(name, keys, vals)
    return keys, vals


def new_session(mem, n: int, seed: int, metric: str):
    sid = mem.open_session(SessionSpec(dim=DK, value_dim=DV, metric=metric)).session_id
    keys = unit(n, seed)
    vals = np.random.default_rng(seed + 1).standard_normal((n, DV)).astype(np.float32)
    mem.append(sid, keys, vals)
    return sid, keys, vals


def inputs(B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T, D) inputs of their own seed: the tests assert their data has no near ties."""
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def knn(mem, banks, topk: int, seed: int = 0, **kw) -> KNNAttention:
    torch.manual_seed(seed)
    return KNNAttention(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H, topk=topk,
                        memory=mem, banks=banks, **kw)


def top_candidates(q: np.ndarray, stack, k: int):
    """Exact top-k over a stack by q . k, float64.

    q (n, dk); stack: [(keys, values, cap)] (cap: the bank's own k, None: k).
    Returns (sims (n, k), values (n, k, dv)) best first, and the smallest gap
    between the k-th and the (k+1)-th candidate (near ties make the reference
    ambiguous: the tests assert their data has none).
    """
    sims, vals, gaps = [], [], []
    for keys, values, cap in stack:
        s = q @ np.asarray(keys, np.float64).T                          # (n, m)
        take = min(cap or k, s.shape[1])
        order = np.argsort(-s, axis=1, kind="stable")
        if take < s.shape[1]:                                            # the bank's own cut
            srt = np.take_along_axis(s, order, 1)
            gaps.append((srt[:, take - 1] - srt[:, take]).min())
        order = order[:, :take]
        sims.append(np.take_along_axis(s, order, 1))
        vals.append(np.asarray(values, np.float64)[order])               # (n, take, dv)
    s, v = np.concatenate(sims, 1), np.concatenate(vals, 1)
    assert sum(len(keys) for keys, _, _ in stack) > k, "the reference is for stacks larger than k"
    order = np.argsort(-s, axis=1, kind="stable")
    if s.shape[1] > k:                                                   # the merge's cut
        srt = np.take_along_axis(s, order, 1)
        gaps.append((srt[:, k - 1] - srt[:, k]).min())
    gap = float(min(gaps))
    top = order[:, :k]
    return np.take_along_axis(s, top, 1), np.take_along_axis(v, top[..., None], 1), gap


def softmax_readout(sims: np.ndarray, vals: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """sum_j softmax(scale * sims)_j v_j per query row (n, dv); scale (n,)."""
    logits = sims * scale[:, None]
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return np.einsum("nk,nkv->nv", w, vals)


def reference(attn: KNNAttention, x: torch.Tensor, stack, k: int) -> tuple[torch.Tensor, float]:
    """(the layer's exact output (.., H*dv), smallest top-k gap)."""
    q = attn.queries(x.reshape(-1, D)).detach().double().reshape(-1, DK).numpy()   # (N*H, dk)
    scale = attn.scale.detach().double().numpy()[np.arange(len(q)) % H]
    sims, vals, gap = top_candidates(q, stack, k)
    out = softmax_readout(sims, vals, scale).reshape(*x.shape[:-1], H * DV)
    return torch.from_numpy(out), gap


def check_forward(attn, x, ref):
    """Output with a gradient (keys fetched) and without (q . k off the scores)."""
    y = attn(x)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(attn(x).double(), ref, rtol=1e-5, atol=1e-5)
    return y


# ---- one bank, k < its size ------------------------------------------------------------------

@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("metric", METRICS)
def test_one_bank_larger_than_k(mem, metric, shards):
    keys, vals = new_bank(mem, "m", 60, seed=1, metric=metric, shards=shards)
    attn = knn(mem, ["m"], topk=5)
    x = inputs(2, 4, seed=11)
    ref, gap = reference(attn, x, [(keys, vals, None)], 5)
    assert gap > 1e-5
    check_forward(attn, x, ref)
    # and it is not what the bottom of the bank (the wrong merge direction) gives
    q = attn.queries(x.reshape(-1, D)).detach().double().reshape(-1, DK).numpy()
    worst = softmax_readout(*_bottom(q, keys, vals, 5), attn.scale.detach().double().numpy()
                            [np.arange(len(q)) % H]).reshape(2, 4, H * DV)
    assert not torch.allclose(ref, torch.from_numpy(worst), atol=1e-3)


def _bottom(q, keys, vals, k):
    s = q @ np.asarray(keys, np.float64).T
    order = np.argsort(s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.asarray(vals, np.float64)[order]


# ---- two banks: one merged top-k ---------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_stack_of_two_banks_larger_than_k(mem, metric):
    ka, va = new_bank(mem, "a", 30, seed=2, metric=metric)
    kb, vb = new_bank(mem, "b", 25, seed=3, metric=metric, shards=2)
    x = inputs(3, 2, seed=12)
    attn = knn(mem, ["a", "b"], topk=6)
    ref, gap = reference(attn, x, [(ka, va, None), (kb, vb, None)], 6)
    assert gap > 1e-5
    check_forward(attn, x, ref)
    # both banks really contribute to the top-k of some queries
    q = attn.queries(x.reshape(-1, D)).detach().reshape(-1, DK).numpy()
    res = mem.search(["a", "b"], q, 6, values=False)
    assert (res.bank == 0).any() and (res.bank == 1).any() and (res.ids >= 0).all()
    # per-bank caps: at most 2 from a, the rest from b, still the best of each
    capped = knn(mem, [BankQuery("a", k=2), "b"], topk=6)
    ref_c, gap_c = reference(capped, x, [(ka, va, 2), (kb, vb, None)], 6)
    assert gap_c > 1e-5
    check_forward(capped, x, ref_c)


# ---- per-row stacks ------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", METRICS)
def test_row_banks_larger_than_k(mem, metric):
    kb, vb = new_bank(mem, "base", 30, seed=4, metric=metric, shards=2)
    rows = [new_session(mem, 12, seed=10 + b, metric=metric) for b in range(3)]
    sids = [r[0] for r in rows]
    attn = knn(mem, ["base"], topk=5)
    x = inputs(3, 4, seed=13)
    y = attn(x, row_banks=sids)
    with torch.no_grad():
        y_eval = attn(x, row_banks=sids)
    for b, (sid, ks, vs) in enumerate(rows):
        ref, gap = reference(attn, x[b:b + 1], [(kb, vb, None), (ks, vs, None)], 5)
        assert gap > 1e-5, b
        torch.testing.assert_close(y[b:b + 1].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_eval[b:b + 1].double(), ref, rtol=1e-5, atol=1e-5)
    # row banks alone (no shared bank): each row's own session only
    alone = knn(mem, [], topk=4)
    y2 = alone(x, row_banks=sids)
    for b, (sid, ks, vs) in enumerate(rows):
        ref, gap = reference(alone, x[b:b + 1], [(ks, vs, None)], 4)
        assert gap > 1e-5, b
        torch.testing.assert_close(y2[b:b + 1].double(), ref, rtol=1e-5, atol=1e-5)


# ---- MemorizingAttention: memory top-k (k < bank) and local in one softmax ----------------------

@pytest.mark.parametrize("metric", METRICS)
def test_memorizing_attention_bank_larger_than_k(mem, metric):
    keys, vals = new_bank(mem, "m", 40, seed=5, metric=metric)
    torch.manual_seed(0)
    m = MemorizingAttention(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H, topk=4,
                            memory=mem, banks=["m"]).double()
    x = inputs(2, 5, seed=14).double()
    B, T = x.shape[:2]
    q = torch.nn.functional.normalize(m.q_proj(x).view(B, T, H, DK), dim=-1)       # (B, T, H, dk)
    k_loc = torch.nn.functional.normalize(m.key_proj(x), dim=-1)                   # (B, T, dk)
    v_loc = m.value_proj(x)                                                        # (B, T, dv)
    sims, mvals, gap = top_candidates(q.detach().reshape(-1, DK).numpy(), [(keys, vals, None)], 4)
    assert gap > 1e-5
    sims = torch.from_numpy(sims).view(B, T, H, 4)
    mvals = torch.from_numpy(mvals).view(B, T, H, 4, DV)
    loc = torch.einsum("bthd,bsd->bths", q, k_loc)                                 # (B, T, H, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, None, :]
    logits = (torch.cat([sims, loc.masked_fill(~causal, -torch.inf)], -1)
              * m.scale[None, None, :, None])
    w = logits.softmax(-1)
    ref = (torch.einsum("bthk,bthkv->bthv", w[..., :4], mvals)
           + torch.einsum("bths,bsv->bthv", w[..., 4:], v_loc)).reshape(B, T, H * DV)
    torch.testing.assert_close(m(x), ref, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
