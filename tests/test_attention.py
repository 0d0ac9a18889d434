"""KNNAttention against plain dense attention, through LocalMemory and the daemon.

Uses the `mem` fixture of conftest.py (parametrised "local" / "daemon").
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from memoryd.api import BankQuery, BankSpec
from knnlayer.attention import KNNAttention, KNNAttentionConfig, masked_softmax
from knnlayer.retrieval import to_device

D, DK, DV, H = 12, 8, 5, 3


# ---- helpers ------------------------------------------------------------------------

class CountingMemory:
    """Proxy to a backend that counts the calls of each method."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)
        return counted


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def make_bank(mem, name: str, n: int, seed: int, *, value_dim: int = DV, metric: str = "l2",
              value_dtype: str = "float32", kind: str = "domain"):
    """A bank of n unit keys and N(0,1) values; returns (keys, values) as numpy float32."""
    mem.create_bank(BankSpec(name=name, dim=DK, value_dim=value_dim, metric=metric,
                             value_dtype=value_dtype, kind=kind))
    keys = unit_rows(n, DK, seed)
    vals = np.random.default_rng(seed + 1000).standard_normal((n, value_dim)).astype(np.float32)
    if n:
        mem.add(name, keys, vals)
    return keys, vals


def bank_rows(mem, name: str, n: int):
    """Keys (n, DK) and values (n, DV) of ids 0..n-1 as stored, float64 tensors."""
    got = mem.get(name, np.arange(n), values=True, keys=True)
    assert got.found.all()
    return (torch.from_numpy(np.asarray(got.keys, np.float64)),
            torch.from_numpy(np.asarray(got.values.astype(np.float32), np.float64)))


def dense(q: torch.Tensor, scale: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Full softmax attention of unit queries (N, H, dk) over all of K (M, dk), V (M, dv)."""
    q, scale, K, V = q.double(), scale.double(), K.double(), V.double()
    logits = scale[None, :, None] * torch.einsum("nhd,md->nhm", q, K)   # (N, H, M)
    out = torch.einsum("nhm,mv->nhv", logits.softmax(-1), V)           # (N, H, dv)
    return out.reshape(len(q), -1)                                       # (N, H*dv)


def layer(mem, banks, **kw) -> KNNAttention:
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H, topk=8)
    cfg.update(kw)
    return KNNAttention(memory=mem, banks=banks, **cfg)


# ---- (1) equals dense attention when k = bank size --------------------------------------

@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_full_k_equals_dense_attention(mem, metric):
    make_bank(mem, "m", 24, seed=1, metric=metric)
    attn = layer(mem, ["m"], topk=24)
    x = torch.randn(2, 5, D)
    y = attn(x)
    assert y.shape == (2, 5, H * DV)
    K, V = bank_rows(mem, "m", 24)
    ref = dense(attn.queries(x.reshape(-1, D)), attn.scale, K, V).reshape(2, 5, -1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)



class KeysSpy(CountingMemory):
    """Counts calls and records whether each search asked for key vectors."""

    def __init__(self, inner):
        super().__init__(inner)
        self.keys_asked: list[bool] = []

    def search(self, *args, **kwargs):
        self.keys_asked.append(kwargs.get("keys", False))
        return self.inner.search(*args, **kwargs)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_without_gradient_q_dot_k_comes_from_the_scores(mem, metric):
    # 7 keys, k = 10: three results missing per query, masked in both paths
    make_bank(mem, "m", 7, seed=31, metric=metric)
    spy = KeysSpy(mem)
    attn = layer(spy, ["m"], topk=10)
    x = torch.randn(2, 4, D)
    x[1, 2] = 0                                          # a zero query: q . k = 0 in both paths
    y_grad = attn(x)                                     # q needs a gradient: keys fetched
    with torch.no_grad():
        y_scores = attn(x)                               # no gradient: scores only
    attn.requires_grad_(False)
    y_frozen = attn(x)                                   # grad mode on, nothing to train
    assert spy.keys_asked == [True, False, False]
    K, V = bank_rows(mem, "m", 7)
    ref = dense(attn.queries(x.reshape(-1, D)), attn.scale, K, V).reshape(2, 4, -1)
    for y in (y_grad, y_scores, y_frozen):
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)



def test_a_quantised_bank_fetches_keys_even_without_gradient(mem):
    # SQ4 scores are distances to 4-bit codes, not to the stored keys: the
    # no-grad output must still be the grad-path one (q . k of the true keys)
    mem.create_bank(BankSpec(name="sq", dim=DK, value_dim=DV, index="SQ4"))
    mem.add("sq", unit_rows(300, DK, 41),
            np.random.default_rng(42).standard_normal((300, DV)).astype(np.float32))
    spy = KeysSpy(mem)
    attn = layer(spy, ["sq"], topk=6)
    x = torch.randn(3, 2, D)
    y_grad = attn(x)
    with torch.no_grad():
        y_eval = attn(x)
    assert spy.keys_asked == [True, True]
    torch.testing.assert_close(y_eval, y_grad.detach(), rtol=1e-6, atol=1e-6)

def test_output_projection_applies_to_concatenated_heads(mem):
    make_bank(mem, "m", 16, seed=2)
    attn = layer(mem, ["m"], topk=16, out_dim=7)
    x = torch.randn(3, 4, D)
    y = attn(x)
    assert y.shape == (3, 4, 7)
    K, V = bank_rows(mem, "m", 16)
    ref = dense(attn.queries(x.reshape(-1, D)), attn.scale, K, V).float()
    torch.testing.assert_close(y, attn.out_proj(ref).reshape(3, 4, 7), rtol=1e-5, atol=2e-6)


def test_topk_smaller_than_bank_attends_over_true_nearest(mem):
    keys, vals = make_bank(mem, "m", 40, seed=3)
    attn = layer(mem, ["m"], topk=5)
    x = torch.randn(6, D)
    y = attn(x)                                                          # (6, H*DV)
    q = attn.queries(x).double()                                         # (6, H, DK)
    K, V = torch.from_numpy(keys).double(), torch.from_numpy(vals).double()
    sims = torch.einsum("nhd,md->nhm", q, K)                            # (6, H, 40)
    top = sims.topk(5, dim=-1).indices                                   # (6, H, 5)
    logits = attn.scale.double()[None, :, None] * sims.gather(-1, top)  # (6, H, 5)
    ref = torch.einsum("nhk,nhkv->nhv", logits.softmax(-1), V[top]).reshape(6, -1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)


# ---- (2) gradients --------------------------------------------------------------------

def test_gradcheck_float64_through_recomputed_scores(mem):
    # k = bank size: the retrieved set cannot change under gradcheck's perturbations.
    n = 6
    KNNAttention.create_base_bank(mem, "base", n, DK, 3, seed=4)
    torch.manual_seed(0)
    attn = KNNAttention(input_dim=4, key_dim=DK, value_dim=3, num_heads=2, topk=n,
                        memory=mem, banks=["base"], trainable_values=n, sparse_values=False,
                        out_dim=3, gate=True).double()
    with torch.no_grad():
        attn.gate.fill_(0.5)
    names = ["q_proj.weight", "scale", "value_tables.base.weight", "out_proj.weight", "gate"]
    params = dict(attn.named_parameters())

    def f(x, *ps):
        return torch.func.functional_call(attn, dict(zip(names, ps)), (x,))

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    inputs = (x, *[params[k].detach().clone().requires_grad_(True) for k in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_float64_memory_values(mem):
    make_bank(mem, "m", 5, seed=5)
    attn = layer(mem, ["m"], topk=5, num_heads=2).double()
    x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    w = attn.q_proj.weight.detach().clone().requires_grad_(True)
    s = attn.scale.detach().clone().requires_grad_(True)

    def f(x, w, s):
        return torch.func.functional_call(attn, {"q_proj.weight": w, "scale": s}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, s), eps=1e-6, atol=1e-6)


def test_training_updates_projection_and_table_never_the_bank(mem):
    n = 20
    base = ["base", "dom"]
    attn = layer(mem, base, topk=6, trainable_values=n, out_dim=4)
    KNNAttention.create_base_bank(mem, "base", n, DK, DV, values=attn.value_table().weight, seed=6)
    make_bank(mem, "dom", 10, seed=7)
    mem.freeze_bank("dom")
    before = {b: list(mem.export(b)) for b in base}

    dense_params = [p for name, p in attn.named_parameters() if not name.startswith("value_table")]
    opt = torch.optim.Adam(dense_params, lr=1e-2)
    sparse_opt = torch.optim.SparseAdam(list(attn.value_table().parameters()), lr=1e-2)
    table0 = attn.value_table().weight.detach().clone()
    q0 = attn.q_proj.weight.detach().clone()
    for _ in range(2):
        loss = attn(torch.randn(2, 3, D)).square().sum()
        opt.zero_grad()
        sparse_opt.zero_grad()
        loss.backward()
        assert attn.q_proj.weight.grad.abs().sum() > 0
        assert attn.scale.grad.abs().sum() > 0
        g = attn.value_table().weight.grad
        assert g.is_sparse and g.coalesce().values().abs().sum() > 0
        opt.step()
        sparse_opt.step()
    assert not torch.equal(attn.q_proj.weight, q0)
    assert not torch.equal(attn.value_table().weight, table0)
    # the backward and the steps never touched the memory
    for b in base:
        after = list(mem.export(b))
        for c0, c1 in zip(before[b], after, strict=True):
            np.testing.assert_array_equal(c0.ids, c1.ids)
            np.testing.assert_array_equal(c0.keys, c1.keys)
            np.testing.assert_array_equal(c0.values, c1.values)

    # training done: push the table into the bank, read it back into a fresh layer
    assert attn.push_values() == n
    got = mem.get("base", np.arange(n), values=True)
    np.testing.assert_allclose(got.values, attn.value_table().weight.detach().numpy(), rtol=0, atol=0)
    fresh = layer(mem, base, topk=6, trainable_values=n, out_dim=4, seed=99)
    fresh.load_values()
    torch.testing.assert_close(fresh.value_table().weight, attn.value_table().weight, rtol=0, atol=0)


@pytest.mark.parametrize("banks", [["base"], ["base", "dom"], ["dom", "base"]])
def test_table_rows_follow_returned_ids(mem, banks):
    # With the table equal to the bank's values, table path == memory path; the
    # table backs banks[0] only, other banks keep their memory values even
    # where their ids coincide with table rows.
    n = 12
    KNNAttention.create_base_bank(mem, "base", n, DK, DV, seed=8)
    KNNAttention.create_base_bank(mem, "dom", n, DK, DV, seed=80)
    mem_attn = layer(mem, banks, topk=10)
    tab_attn = layer(mem, banks, topk=10, trainable_values=n)
    tab_attn.load_values()
    x = torch.randn(4, D)
    torch.testing.assert_close(tab_attn(x), mem_attn(x), rtol=0, atol=0)


def test_table_too_small_for_bank_ids_raises(mem):
    KNNAttention.create_base_bank(mem, "base", 10, DK, DV, seed=9)
    attn = layer(mem, ["base"], topk=10, trainable_values=4)
    with pytest.raises(ValueError, match="trainable value table has 4 rows"):
        attn(torch.randn(2, D))


# ---- (3) masking -------------------------------------------------------------------------

def test_bank_smaller_than_k_masks_missing(mem):
    make_bank(mem, "small", 3, seed=10)
    attn = layer(mem, ["small"], topk=8)
    x = torch.randn(2, 4, D, requires_grad=True)
    y = attn(x)
    K, V = bank_rows(mem, "small", 3)
    ref = dense(attn.queries(x.reshape(-1, D)), attn.scale, K, V).reshape(2, 4, -1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(attn.q_proj.weight.grad).all()


def test_empty_bank_gives_zeros_without_nan(mem):
    make_bank(mem, "empty", 0, seed=11)
    attn = layer(mem, ["empty"], topk=4, trainable_values=0, out_dim=None)
    x = torch.randn(2, 3, D, requires_grad=True)
    y = attn(x)
    assert torch.equal(y, torch.zeros(2, 3, H * DV))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(attn.scale.grad).all()


def test_empty_bank_merged_with_small_bank(mem):
    make_bank(mem, "empty", 0, seed=12)
    make_bank(mem, "small", 2, seed=13)
    attn = layer(mem, ["empty", "small"], topk=5)
    x = torch.randn(3, D)
    K, V = bank_rows(mem, "small", 2)
    torch.testing.assert_close(attn(x).double(), dense(attn.queries(x), attn.scale, K, V),
                               rtol=1e-5, atol=2e-6)


def test_masked_softmax_all_missing_row():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4, [True] * 4])
    w = masked_softmax(logits, mask)
    torch.testing.assert_close(w[0, :2], logits[0, :2].softmax(-1))
    assert torch.equal(w[0, 2:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(w[1], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(w[2], logits[2].softmax(-1))
    (w * torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[1], torch.zeros(4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda t: masked_softmax(t, mask), (logits.detach().requires_grad_(),))


# ---- (4) several banks == their union ------------------------------------------------

def test_merged_banks_equal_union_bank(mem):
    ka, va = make_bank(mem, "a", 10, seed=14)
    kb, vb = make_bank(mem, "b", 14, seed=15)     # ids 0..13 repeat a's ids 0..9
    mem.create_bank(BankSpec(name="u", dim=DK, value_dim=DV))
    mem.add("u", np.concatenate([ka, kb]), np.concatenate([va, vb]))
    x = torch.randn(4, 5, D)
    for k in (7, 24):
        merged = layer(mem, ["a", "b"], topk=k)
        union = layer(mem, ["u"], topk=k)
        torch.testing.assert_close(merged(x), union(x), rtol=0, atol=0)


# ---- (5) one search per forward --------------------------------------------------------

@pytest.mark.parametrize("T", [1, 9])
def test_one_search_call_per_forward(mem, T):
    n = 16
    KNNAttention.create_base_bank(mem, "base", n, DK, DV, seed=16)
    make_bank(mem, "dom", 5, seed=17)
    counting = CountingMemory(mem)
    for kw in (dict(banks=["base"]), dict(banks=["base", "dom"]),
               dict(banks=["base"], trainable_values=n), dict(banks=["base", "dom"], trainable_values=n)):
        banks = kw.pop("banks")
        attn = layer(counting, banks, topk=6, **kw)
        counting.calls.clear()
        attn(torch.randn(2, T, D)).sum().backward()      # the first also reads the specs, once
        assert counting.calls == {"bank_info": len(banks), "search": 1}, (kw, counting.calls)
        for grad in (True, False):
            counting.calls.clear()
            with torch.set_grad_enabled(grad):
                attn(torch.randn(2, T, D))
            assert counting.calls == {"search": 1}, (kw, grad, counting.calls)


def test_empty_batch_makes_no_call(mem):
    KNNAttention.create_base_bank(mem, "base", 4, DK, DV, seed=22)
    counting = CountingMemory(mem)
    for kw in (dict(), dict(trainable_values=4, out_dim=3)):
        attn = layer(counting, ["base"], topk=2, **kw)
        y = attn(torch.randn(0, 5, D))
        assert y.shape == (0, 5, kw.get("out_dim", H * DV))
    assert counting.calls == {}


def test_remember_writes_one_row_per_position_in_one_add(mem):
    mem.create_bank(BankSpec(name="sess", dim=DK, value_dim=DV, kind="session"))
    counting = CountingMemory(mem)
    attn = layer(counting, ["sess"], topk=4)
    x = torch.randn(2, 3, D)
    ids = attn.remember(x, bank="sess")
    assert counting.calls == {"add": 1}
    assert ids.shape == (2, 3) and sorted(ids.ravel().tolist()) == list(range(6))
    got = mem.get("sess", ids.ravel(), values=True, keys=True)
    with torch.no_grad():
        keys = torch.nn.functional.normalize(attn.key_proj(x.reshape(-1, D)), dim=-1)
        vals = attn.value_proj(x.reshape(-1, D))
    np.testing.assert_allclose(got.keys, keys.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(got.values, vals.numpy(), rtol=0, atol=0)
    np.testing.assert_allclose(np.linalg.norm(got.keys, axis=1), 1.0, rtol=1e-5)
    # the next step reads the session memory back
    y = attn(torch.randn(1, 1, D))
    assert y.shape == (1, 1, H * DV) and torch.isfinite(y).all() and y.abs().sum() > 0


# ---- (6) zero-init gate ----------------------------------------------------------------

def test_zero_init_gate_leaves_output_unchanged(mem):
    make_bank(mem, "m", 10, seed=18)
    attn = layer(mem, ["m"], topk=4, gate=True, out_dim=6)
    x = torch.randn(2, 3, D)
    y = attn(x)
    assert torch.equal(y, torch.zeros(2, 3, 6))
    y.square().add(y).sum().backward()
    assert attn.gate.grad.abs().sum() > 0           # the gate opens on the first step
    assert attn.q_proj.weight.grad.abs().sum() == 0


# ---- (7) state dict ------------------------------------------------------------------------

def test_state_dict_round_trip(mem):
    n = 8
    KNNAttention.create_base_bank(mem, "base", n, DK, DV, seed=19)
    kw = dict(topk=4, trainable_values=n, gate=True, out_dim=6)
    attn = layer(mem, ["base"], **kw)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p))
    buf = io.BytesIO()
    torch.save(attn.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    for key in ("q_proj.weight", "scale", "gate", "value_tables.base.weight", "out_proj.weight",
                "key_proj.weight", "value_proj.weight", "_extra_state"):
        assert key in state, key
    assert state["_extra_state"]["banks"] == ["base"]

    other = layer(mem, ["base"], seed=5, **kw)
    other.load_state_dict(state)
    for (k1, v1), (k2, v2) in zip(attn.state_dict().items(), other.state_dict().items()):
        assert k1 == k2
        if torch.is_tensor(v1):
            assert torch.equal(v1, v2), k1
    x = torch.randn(2, D)
    torch.testing.assert_close(other(x), attn(x), rtol=0, atol=0)

    # a module of other banks (its table kept for "base", the bank it is not bound to)
    wrong = layer(mem, ["elsewhere"], topk=4, value_tables={"base": n}, gate=True, out_dim=6)
    before = {k: v.clone() for k, v in wrong.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match=r"saved bound to banks \['base'\].*\['elsewhere'\]"):
        wrong.load_state_dict(state)
    for k, v in wrong.state_dict().items():                         # nothing half-loaded
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k
    assert "elsewhere" not in [b.name for b in mem.list_banks()]   # nothing created
    wrong.bind(banks=["base"])                                      # explicit re-binding works
    wrong.load_state_dict(state)
    torch.testing.assert_close(wrong(x), attn(x), rtol=0, atol=0)
    # nested in a model: the error still names the banks
    model = torch.nn.Sequential(layer(mem, ["other"], **kw))
    with pytest.raises(ValueError, match="saved bound to banks"):
        model.load_state_dict({f"0.{k}": v for k, v in state.items()})


def test_fixed_scale_is_a_buffer():
    attn = KNNAttention(input_dim=D, key_dim=16, value_dim=DV, num_heads=2, banks=["m"],
                        learn_scale=False)
    assert "scale" not in dict(attn.named_parameters())
    assert torch.equal(attn.state_dict()["scale"], torch.full((2,), 4.0))
    learned = KNNAttention(input_dim=D, key_dim=16, value_dim=DV, num_heads=2, banks=["m"])
    assert isinstance(learned.scale, torch.nn.Parameter) and torch.equal(learned.scale, torch.full((2,), 4.0))


def test_config_validation():
    with pytest.raises(ValueError, match="topk"):
        KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, topk=0, banks=("m",))
    with pytest.raises(ValueError, match="banks must be bank names"):
        KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, banks=("m", 3))
    with pytest.raises(ValueError, match="twice"):
        KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, banks=("m", BankQuery("m", k=2)))
    with pytest.raises(ValueError, match="k of bank 'm'"):
        KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, banks=(BankQuery("m", k=0),))
    with pytest.raises(ValueError, match="name a bank"):
        KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, trainable_values=3)
    with pytest.raises(ValueError, match="positive row count"):
        KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, value_tables={"m": 0})
    cfg = KNNAttentionConfig(input_dim=4, key_dim=4, value_dim=4, num_heads=2, banks="m",
                             trainable_values=5)
    assert cfg.banks == (BankQuery("m"),) and cfg.out_features == 8
    assert cfg.value_tables == {"m": 5}
    # no shared banks: forward needs row banks
    with pytest.raises(ValueError, match="no banks"):
        KNNAttention(input_dim=4, key_dim=4, value_dim=4, memory=object())(torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="no memory"):
        KNNAttention(cfg)(torch.randn(1, 4))


# ---- (8) dtypes ----------------------------------------------------------------------------

@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_half_precision_value_banks(mem, value_dtype):
    make_bank(mem, "h", 12, seed=20, value_dtype=value_dtype)
    attn = layer(mem, ["h"], topk=12)
    x = torch.randn(2, 3, D)
    y = attn(x)
    assert y.dtype == torch.float32
    K, V = bank_rows(mem, "h", 12)                   # the stored (rounded) values
    ref = dense(attn.queries(x.reshape(-1, D)), attn.scale, K, V).reshape(2, 3, -1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-6)


def test_module_in_float64(mem):
    make_bank(mem, "m", 9, seed=21, value_dtype="bfloat16")
    attn = layer(mem, ["m"], topk=9, out_dim=4).double()
    x = torch.randn(2, 3, D, dtype=torch.float64)
    y = attn(x)
    assert y.dtype == torch.float64
    K, V = bank_rows(mem, "m", 9)
    ref = attn.out_proj(dense(attn.queries(x.reshape(-1, D)), attn.scale, K, V)).reshape(2, 3, 4)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_to_device_converts_bfloat16_and_readonly_arrays():
    import ml_dtypes

    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    t = to_device(a, torch.device("cpu"))
    assert t.dtype == torch.bfloat16 and torch.equal(t.float(), torch.arange(6.0).reshape(2, 3))
    ro = np.frombuffer(np.arange(4, dtype=np.float16).tobytes(), np.float16)
    assert not ro.flags.writeable
    t = to_device(ro, torch.device("cpu"), torch.float64)
    assert t.dtype == torch.float64 and torch.equal(t, torch.arange(4.0, dtype=torch.float64))


class _GatedMemory:
    """A memory whose search waits for a signal: shows when a search is in flight."""

    def __init__(self, inner):
        import threading
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def search(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(10), "search was never released"
        return self.inner.search(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_start_returns_while_the_search_runs_and_finish_matches_forward(local_mem, make_bank):
    spec = make_bank(local_mem, dim=8, value_dim=4)
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((40, 8)).astype(np.float32)
    local_mem.add(spec.name, keys / np.linalg.norm(keys, axis=1, keepdims=True),
                  rng.standard_normal((40, 4)).astype(np.float32))
    gated = _GatedMemory(local_mem)
    attn = KNNAttention(input_dim=6, key_dim=8, value_dim=4, num_heads=2, topk=5,
                        memory=gated, banks=[spec.name])
    x = torch.randn(2, 3, 6)
    pending = attn.start(x)                       # must not wait for the search
    assert gated.entered.wait(10)                 # the search is running on a worker...
    assert not pending.retrieved.done()           # ...and has not finished
    gated.release.set()
    y = attn.finish(pending)
    torch.testing.assert_close(y, attn(x))
    y.sum().backward()
    assert attn.q_proj.weight.grad is not None and attn.q_proj.weight.grad.abs().sum() > 0
