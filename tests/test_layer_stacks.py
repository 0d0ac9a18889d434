"""KNNAttention with stacks (BankQuery options), a value table per bank,
re-binding in place and per-row banks, through LocalMemory and the daemon."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memoryd.api import BankQuery, BankSpec, SessionSpec
from memoryd.errors import BankFrozen
from knnlayer.attention import KNNAttention

D, DK, DV, H = 10, 8, 4, 2


def unit(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, DK)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def new_bank(mem, name: str, n: int, seed: int, metric: str = "l2", kind: str = "domain",
             explicit_ids: bool = True):
    mem.create_bank(BankSpec(name=name, dim=DK, value_dim=DV, metric=metric, kind=kind))
    keys = unit(n, seed)
    vals = np.random.default_rng(seed + 1).standard_normal((n, DV)).astype(np.float32)
    mem.add(name, keys, vals, ids=np.arange(n) if explicit_ids else None)
    return keys, vals


def layer(mem, banks, seed=0, **kw) -> KNNAttention:
    torch.manual_seed(seed)
    cfg = dict(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H, topk=6)
    cfg.update(kw)
    return KNNAttention(memory=mem, banks=banks, **cfg)


def reference(attn: KNNAttention, x: torch.Tensor, stack, values_of) -> torch.Tensor:
    """The layer's output from memory.search's own answer for the same stack:
    softmax of scale * q . k (bias picks rows, never weighs them) over its rows."""
    q = attn.queries(x.reshape(-1, D)).detach()                       # (N, H, dk)
    flat = q.reshape(-1, DK).numpy()
    res = attn.memory.search(stack, flat, attn.config.topk, values=False, keys=True)
    qk = np.einsum("nd,nkd->nk", flat, res.keys)                       # (N*H, k)
    scale = attn.scale.detach().numpy()[np.arange(len(flat)) % H]      # row n*H + h: head h
    logits = np.where(res.ids >= 0, qk * scale[:, None], -np.inf)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    vals = values_of(res.bank, res.ids)                                # (N*H, k, dv)
    out = np.einsum("nk,nkv->nv", w, vals).reshape(*x.shape[:-1], H * DV)
    return torch.from_numpy(out.astype(np.float32))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_stack_options_follow_memory_search(mem, metric):
    base_k, base_v = new_bank(mem, "base", 40, seed=1, metric=metric)
    dom_k, dom_v = new_bank(mem, "dom", 30, seed=2, metric=metric)
    stack = [BankQuery("dom", bias=0.3, k=2), "base"]
    attn = layer(mem, stack)
    x = torch.randn(3, 5, D)
    tables = [dom_v, base_v]

    def values_of(bank, ids):
        out = np.zeros((*ids.shape, DV), np.float32)
        for b, t in enumerate(tables):
            out[bank == b] = t[ids[bank == b]]
        return out

    ref = reference(attn, x, stack, values_of)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=2e-6)
    with torch.no_grad():                      # q . k read off biased scores: bias taken out
        torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=2e-6)
    # the options act: at most 2 per query from dom, and the bias brings it in
    q = attn.queries(x.reshape(-1, D)).detach().reshape(-1, DK).numpy()
    from_dom = (mem.search(stack, q, 6).bank == 0).sum(1)                 # (N*H,)
    unbiased = (mem.search(["dom", "base"], q, 6).bank == 0).sum(1)
    assert from_dom.max() <= 2 and (from_dom > np.minimum(unbiased, 2)).any()
    off = layer(mem, [BankQuery("dom", include=False), "base"])
    torch.testing.assert_close(off(x), layer(mem, ["base"])(x), rtol=0, atol=0)


def test_a_table_per_bank_base_frozen_domain_trains(mem):
    nb, nd = 32, 16
    new_bank(mem, "base", nb, seed=3)
    new_bank(mem, "dom", nd, seed=4)
    attn = layer(mem, ["dom", "base"], value_tables={"base": nb, "dom": nd}, out_dim=D)
    attn.load_values(bank="base")
    attn.load_values(bank="dom")
    checksum = mem.freeze_bank("base").checksum
    base = attn.value_table("base")
    base.weight.requires_grad_(False)
    for p in attn.parameters():                 # dense weights frozen too
        if p is not attn.value_table("dom").weight:
            p.requires_grad_(False)
    dense0 = {n: p.detach().clone() for n, p in attn.named_parameters()}
    opt = torch.optim.SparseAdam([attn.value_table("dom").weight], lr=0.1)
    x = torch.randn(2, 3, D)
    touched = attn.retrieve(attn.queries(x.reshape(-1, D)).detach(), keys=False)
    attn(x).square().sum().backward()
    opt.step()
    assert base.weight.grad is None
    after = dict(attn.named_parameters())
    for n, p0 in dense0.items():
        if n != "value_tables.dom.weight":
            assert torch.equal(after[n], p0), n
    dom_rows = set(touched.ids[touched.mask & (touched.bank == 0)].tolist())
    changed = (after["value_tables.dom.weight"] != dense0["value_tables.dom.weight"]).any(1)
    assert set(torch.nonzero(changed).flatten().tolist()) == dom_rows and dom_rows
    # push writes only the domain bank; the frozen base bank is byte-identical
    before = mem.get("base", np.arange(nb)).values
    assert attn.push_values(bank="dom") == nd
    np.testing.assert_array_equal(mem.get("base", np.arange(nb)).values, before)
    assert mem.bank_info("base").checksum == checksum and checksum.startswith("sha256:")
    with pytest.raises(BankFrozen):
        attn.push_values(bank="base")
    np.testing.assert_array_equal(mem.get("dom", np.arange(nd)).values,
                                  attn.value_table("dom").weight.detach().numpy())


def test_bind_in_place_keeps_tables_by_bank(mem):
    new_bank(mem, "base", 20, seed=5)
    new_bank(mem, "dom", 10, seed=6)
    attn = layer(mem, ["base"], trainable_values=20)
    attn.load_values(bank="base")
    x = torch.randn(2, 4, D)
    y_base = attn(x)
    table = attn.add_value_table("dom", 10)
    attn.load_values(bank="dom")
    attn.bind(banks=[BankQuery("dom", k=3), "base"])
    assert attn.value_table("dom") is table
    both = attn(x)
    assert not torch.allclose(both, y_base)
    values_of = {0: mem.get("dom", np.arange(10)).values, 1: mem.get("base", np.arange(20)).values}
    ref = reference(attn, x, [BankQuery("dom", k=3), "base"],
                    lambda bank, ids: np.where((bank == 0)[..., None], values_of[0][ids % 10],
                                               values_of[1][ids % 20]))
    torch.testing.assert_close(both, ref, rtol=1e-5, atol=2e-6)
    attn.bind(banks=["base"])                     # back: the same output as before
    torch.testing.assert_close(attn(x), y_base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has a value table"):
        attn.add_value_table("dom", 10)
    with pytest.raises(KeyError, match="no trainable value table"):
        attn.value_table("nope")


def test_state_dict_names_missing_value_tables(mem):
    new_bank(mem, "base", 8, seed=13)
    attn = layer(mem, ["base"], value_tables={"base": 8})
    attn.add_value_table("dom", 4)
    state = attn.state_dict()
    assert state["_extra_state"]["tables"] == {"base": 8, "dom": 4}
    fresh = layer(mem, ["base"], value_tables={"base": 8})
    with pytest.raises(ValueError, match=r"value_tables=\{'base': 8, 'dom': 4\}"):
        fresh.load_state_dict(state)
    fresh.add_value_table("dom", 4)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.value_table("dom").weight, attn.value_table("dom").weight)


def test_table_rows_checked_per_bank(mem):
    new_bank(mem, "base", 12, seed=7)
    attn = layer(mem, ["base"], value_tables={"base": 5}, topk=12)
    with pytest.raises(ValueError, match="trainable value table has 5 rows"):
        attn(torch.randn(1, 2, D))


def test_read_is_the_readout_before_projection(mem):
    new_bank(mem, "base", 16, seed=8)
    attn = layer(mem, ["base"], out_dim=D, gate=True)
    with torch.no_grad():
        attn.gate.fill_(1.0)
    x = torch.randn(2, 3, D)
    q = attn.queries(x.reshape(-1, D))
    o = attn.read(q)                                                      # (N, H, dv)
    assert o.shape == (6, H, DV)
    torch.testing.assert_close(attn.project(o.reshape(2, 3, H * DV)), attn(x), rtol=0, atol=0)


# ---- per-row banks: one search for B rows, each with its own session ------------------------

def sessions(mem, B: int, n: int, seed: int) -> list[str]:
    sids = []
    for b in range(B):
        sid = mem.open_session(SessionSpec(dim=DK, value_dim=DV)).session_id
        if n:
            mem.add(sid, unit(n, seed + b),
                    np.random.default_rng(seed + 100 + b).standard_normal((n, DV)).astype(np.float32))
        sids.append(sid)
    return sids


@pytest.mark.parametrize("shared", [(), ("base",)])
def test_row_banks_equal_one_forward_per_row_in_one_search(mem, shared):
    new_bank(mem, "base", 24, seed=9)
    sids = sessions(mem, 3, 7, seed=10)
    attn = layer(mem, list(shared))
    x = torch.randn(3, 4, D)
    calls = []
    search = mem.search
    mem.search = lambda *a, **kw: calls.append(1) or search(*a, **kw)
    try:
        y = attn(x, row_banks=sids)
    finally:
        del mem.search
    assert len(calls) == 1
    for b, sid in enumerate(sids):
        alone = layer(mem, [*shared, sid])
        torch.testing.assert_close(y[b], alone(x[b:b + 1])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="one bank .* per batch row"):
        attn(x, row_banks=sids[:2])


def test_row_banks_with_tables_on_shared_banks_train_them(mem):
    new_bank(mem, "base", 16, seed=11)
    sids = sessions(mem, 2, 5, seed=12)
    attn = layer(mem, ["base"], trainable_values=16, sparse_values=False)
    attn.load_values(bank="base")
    x = torch.randn(2, 3, D)
    y = attn(x, row_banks=sids)
    y.sum().backward()
    assert attn.value_table("base").weight.grad.abs().sum() > 0
    for b, sid in enumerate(sids):
        alone = layer(mem, ["base", sid], trainable_values=16)
        alone.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "_extra_state"},
                              strict=False)
        torch.testing.assert_close(y[b], alone(x[b:b + 1])[0], rtol=0, atol=0)
