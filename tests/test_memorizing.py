"""MemorizingAttention (local + memory attention in one layer) against exact
references, through LocalMemory and the daemon (the `mem` fixture)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memoryd.api import BankSpec
from knnlayer.memorizing import MemorizingAttention, MemorizingConfig

D, DK, DV, H = 10, 8, 6, 2


def layer(mem, banks=(), seed=0, **kw) -> MemorizingAttention:
    torch.manual_seed(seed)
    cfg = dict(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H, topk=4)
    cfg.update(kw)
    return MemorizingAttention(memory=mem, banks=list(banks), **cfg)


def new_bank(mem, name: str, n: int = 0, seed: int = 0, metric: str = "l2"):
    mem.create_bank(BankSpec(name=name, dim=DK, value_dim=DV, metric=metric, kind="domain"))
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DK)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    vals = rng.standard_normal((n, DV)).astype(np.float32)
    if n:
        mem.add(name, keys, vals)
    return torch.from_numpy(keys).double(), torch.from_numpy(vals).double()


def local_parts(m: MemorizingAttention, x: torch.Tensor):
    """q (B, T, H, dk), local k (B, T, dk), v (B, T, dv), recomputed by hand."""
    B, T, _ = x.shape
    q = F.normalize(m.q_proj(x).view(B, T, H, DK), dim=-1)
    return q, F.normalize(m.key_proj(x), dim=-1), m.value_proj(x)


def causal_sdpa(m, x) -> torch.Tensor:
    """torch's causal SDPA with the layer's projections and per-head scale: (B, T, H*dv)."""
    q, k, v = local_parts(m, x)
    B, T = x.shape[:2]
    qs = (q * m.scale[None, None, :, None]).transpose(1, 2)           # (B, H, T, dk)
    ks = k[:, None].expand(B, H, T, DK)
    vs = v[:, None].expand(B, H, T, DV)
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=1.0)  # (B, H, T, dv)
    return o.transpose(1, 2).reshape(B, T, H * DV)


# ---- equivalences ----------------------------------------------------------------------

@pytest.mark.parametrize("combine", ["softmax", "gate"])
def test_empty_memory_equals_causal_sdpa(mem, combine):
    new_bank(mem, "empty")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    for m in (layer(mem, ["empty"], combine=combine).double(),    # a bank with nothing in it
              layer(mem, (), combine=combine).double()):            # no bank at all
        torch.testing.assert_close(m(x), causal_sdpa(m, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_k_equal_bank_size_is_dense_attention_over_memory_and_local(mem, metric):
    n = 5
    keys, vals = new_bank(mem, "m", n, seed=3, metric=metric)
    m = layer(mem, ["m"], topk=n).double()
    with torch.no_grad():
        m.scale.copy_(torch.tensor([2.0, 5.0]))
    x = torch.randn(2, 6, D, dtype=torch.float64)
    q, k, v = local_parts(m, x)
    B, T = x.shape[:2]
    mem_logits = torch.einsum("bthd,nd->bhtn", q, keys)                       # (B, H, T, n)
    loc_logits = torch.einsum("bthd,bsd->bhts", q, k)                         # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logits = torch.cat([mem_logits, loc_logits.masked_fill(~causal, -torch.inf)], -1)
    w = torch.softmax(logits * m.scale[None, :, None, None], -1)
    ref = (torch.einsum("bhtn,nv->bthv", w[..., :n], vals)
           + torch.einsum("bhts,bsv->bthv", w[..., n:], v)).reshape(B, T, H * DV)
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)      # keys stored as float32
    with torch.no_grad():                                           # q . k off the scores
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=2e-6)


def test_gate_combine_mixes_two_softmaxes(mem):
    n = 4
    keys, vals = new_bank(mem, "m", n, seed=4)
    m = layer(mem, ["m"], topk=n, combine="gate").double()
    with torch.no_grad():
        m.mix.copy_(torch.tensor([0.7, -1.2]))
    x = torch.randn(1, 5, D, dtype=torch.float64)
    q, _, _ = local_parts(m, x)
    o_loc = causal_sdpa(m, x).view(1, 5, H, DV)
    w = torch.softmax(torch.einsum("bthd,nd->bthn", q, keys) * m.scale[None, None, :, None], -1)
    o_mem = torch.einsum("bthn,nv->bthv", w, vals)
    g = torch.sigmoid(m.mix)[:, None]
    torch.testing.assert_close(m(x), (g * o_mem + (1 - g) * o_loc).reshape(1, 5, H * DV),
                               rtol=1e-12, atol=1e-12)


def test_zero_gate_is_the_identity_on_the_residual(mem):
    new_bank(mem, "m", 6, seed=5)
    m = layer(mem, ["m"], gate=True, out_dim=D)
    x = torch.randn(2, 4, D)
    y = x + m(x)
    assert torch.equal(y, x)
    y.sum().backward()
    assert m.gate.grad is not None and m.gate.grad.abs().sum() > 0       # it opens on step 1


# ---- training and the write path -------------------------------------------------------

def test_local_path_trains_the_projections_that_write_memories(mem):
    new_bank(mem, "m", 6, seed=6)
    m = layer(mem, ["m"])
    m(torch.randn(2, 5, D)).square().sum().backward()
    for p in (m.key_proj.weight, m.value_proj.weight, m.q_proj.weight, m.scale):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_remember_stores_what_forward_attended_to(mem):
    new_bank(mem, "s")
    m = layer(mem, ["s"])
    x = torch.randn(2, 3, D)
    m(x)
    with CountCalls(mem, "add") as calls:
        ids = m.remember(bank="s")
    assert ids.shape == (2, 3) and calls.n == 1
    _, k, v = local_parts(m, x)
    got = mem.get("s", ids.reshape(-1), values=True, keys=True)
    np.testing.assert_allclose(got.keys, k.detach().reshape(-1, DK).numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(got.values, v.detach().reshape(-1, DV).numpy(), rtol=0, atol=0)
    # the next segment reads them: with k = all rows, memory holds exactly those
    y = m(torch.randn(2, 3, D))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="either bank= or row_banks="):
        m.remember()
    with pytest.raises(RuntimeError, match="needs x, or a forward"):
        layer(mem, ["s"]).remember(bank="s")


def test_one_search_per_forward_and_none_without_banks(mem):
    new_bank(mem, "m", 8, seed=7)
    with CountCalls(mem, "search") as calls:
        layer(mem, ["m"])(torch.randn(3, 4, D))
        assert calls.n == 1
        layer(mem, ())(torch.randn(3, 4, D))
        assert calls.n == 1


def test_config_checks():
    with pytest.raises(ValueError, match="combine"):
        MemorizingConfig(input_dim=4, key_dim=4, value_dim=4, combine="sum")
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        MemorizingAttention(input_dim=4, key_dim=4, value_dim=4)(torch.randn(3, 4))


class CountCalls:
    """Count calls of one method of a backend (works for LocalMemory and MemoryClient)."""

    def __init__(self, mem, method: str):
        self.mem, self.method, self.n = mem, method, 0

    def __enter__(self):
        inner = getattr(self.mem, self.method)

        def counted(*a, **kw):
            self.n += 1
            return inner(*a, **kw)
        setattr(self.mem, self.method, counted)
        return self

    def __exit__(self, *exc):
        delattr(self.mem, self.method)
