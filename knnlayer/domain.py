"""Domain banks: memory for a vertical, stacked beside a frozen base bank.

A domain bank needs keys where the model's queries on domain text actually
land, values that do not disturb the trained model on the first step, and a
record of which query projection its keys belong to:

    q = attn.queries(x_domain).detach()          # (N, H, dk) the model's own queries
    keys = data_keys(q, 4096)                    # (4096, dk) spherical k-means centroids
                                                 # (or random_keys(4096, dk, seed=0))
    values = readout_values(attn, keys)          # (4096, dv) what memory says there now
    create_domain_bank(mem, "med", keys, values, value_dim=attn.config.value_dim,
                       key_version=key_version(attn))
    attn.add_value_table("med", 4096)            # train its values in the model...
    attn.load_values(bank="med")
    attn.bind(banks=[*attn.banks, "med"])
    fit_values(attn, "med", q)                   # ...fitted first: outputs change less
    ...
    stale_banks(attn)                            # ["med"] once q_proj has moved on

Model side only: torch and numpy, no faiss, engine or storage (a model on a
remote memory must not load them; tests/test_layout.py checks).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knnlayer.attention import masked_softmax
from memoryd.api import CHUNK_ROWS, BankInfo, BankSpec, MemoryBackend
from memoryd.arrays import matrix, to_numpy
from memoryd.errors import InvalidArgument
from memoryd.keyspace import is_product_keys

UNIT_TOL = 1e-3          # |norm - 1| allowed for a key the layer takes as unit
KEY_VERSION_CHARS = 16   # hex characters of key_version: 64 bits
_SIM_BLOCK = 1 << 24     # similarity entries per k-means assignment block (64 MiB fp32)


# ---- keys ------------------------------------------------------------------------

def random_keys(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n seeded random unit keys (n, dim) float32, uniform on the sphere.

        random_keys(4, 128, seed=1)   # the same 4 keys on every call and machine
    """
    _check_count(n, "n", minimum=1)
    _check_count(dim, "dim", minimum=1)
    keys = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def data_keys(queries: Any, n: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """n unit keys (n, dim) float32 where `queries` cluster: spherical k-means.

    queries: (M, dim) or (..., dim), e.g. `attn.queries(x).detach()` (N, H, dk)
    on domain text, pooled over heads; rows are normalised (the layer's
    queries already are), a zero row is refused. Cosine k-means: each point
    goes to the centroid of largest q . c, a centroid is the normalised sum of
    its points. Starts from n seeded rows of queries (n different rows, which
    may still be copies of one point); a cluster left empty is re-seeded at
    the point worst served by the new centroids (the objective gains most
    there), one empty cluster at a time, so two never land on copies of one
    point. Stops early once no point moves. (More keys than distinct queries
    leave some keys duplicated.)

        keys = data_keys(attn.queries(x_med).detach(), 4096)   # (4096, dk)
    """
    x = _unit_rows(queries)                                        # (M, d)
    _check_count(n, "n", minimum=1)
    _check_count(iters, "iters", minimum=0)
    if n > x.shape[0]:
        raise InvalidArgument(f"data_keys needs at least n={n} queries; got {x.shape[0]}")
    g = torch.Generator().manual_seed(int(seed))
    c = x[torch.randperm(x.shape[0], generator=g)[:n]].clone()     # (n, d)
    assign = None
    for _ in range(iters):
        new = _nearest(x, c)                                       # (M,)
        if assign is not None and torch.equal(new, assign):
            break                                                  # converged: c is the mean of new
        assign = new
        c = _centroids(x, assign, n)                               # (n, d)
    return c.numpy()


def _centroids(x: torch.Tensor, assign: torch.Tensor, n: int) -> torch.Tensor:
    """Normalised cluster sums (n, d); each empty cluster re-seeded at the point
    worst served so far (its cosine to its centroid, or to an earlier re-seed)."""
    sums = torch.zeros(n, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)   # (n, d)
    c = F.normalize(sums, dim=1)                                                # (n, d)
    empty = (torch.bincount(assign, minlength=n) == 0).nonzero().flatten().tolist()
    if empty:
        served = _own_cosine(x, c, assign)                                      # (M,)
        for j in empty:
            w = int(torch.argmin(served))
            c[j] = x[w]
            served = torch.maximum(served, x @ x[w])                            # (M,)
    return c


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The centroid of largest cosine (M,) per row, in blocks of bounded memory."""
    step = max(1, _SIM_BLOCK // c.shape[0])
    return torch.cat([(x[s:s + step] @ c.T).argmax(dim=1)                       # (m, n) -> (m,)
                      for s in range(0, x.shape[0], step)])


def _own_cosine(x: torch.Tensor, c: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """x[i] . c[assign[i]] (M,), in blocks (c[assign] is as big as x)."""
    step = max(1, _SIM_BLOCK // x.shape[1])
    return torch.cat([(x[s:s + step] * c[assign[s:s + step]]).sum(dim=1)
                      for s in range(0, x.shape[0], step)])


def _unit_rows(queries: Any) -> torch.Tensor:
    """queries (..., d) as normalised float32 rows (M, d) on the CPU."""
    a = to_numpy(queries)
    if a.ndim < 2:
        raise InvalidArgument(f"queries must be (M, dim) or (..., dim); got shape {a.shape}")
    x = torch.from_numpy(matrix(a.reshape(-1, a.shape[-1]), "queries", a.shape[-1],
                                np.dtype(np.float32)))             # (M, d)
    norms = x.norm(dim=1)                                          # (M,)
    if (norms < 1e-6).any():
        raise InvalidArgument(f"queries contain {int((norms < 1e-6).sum())} zero rows: "
                              "they have no direction to cluster")
    return x / norms[:, None]


# ---- which projection the keys belong to ---------------------------------------------

def key_version(module: nn.Module) -> str:
    """A short stable hash (16 hex chars of sha256) of the query projection.

    A domain bank's keys are points in the space q_proj maps into; once
    q_proj trains on, they are stale. The hash covers q_proj's weight and
    bias: their exact bytes, dtype and shape (so a cast to bf16 is a new
    version too). module: a KNNAttention (its q_proj) or the nn.Linear itself.

        key_version(attn)   # e.g. '9c1f03a2b4d5e6f7'; equal for an equal q_proj
    """
    proj = getattr(module, "q_proj", module)
    if not isinstance(proj, nn.Linear):
        raise InvalidArgument(f"key_version needs a KNNAttention or its q_proj (nn.Linear); "
                              f"got {type(module).__name__}")
    h = hashlib.sha256()
    for name, t in (("weight", proj.weight), ("bias", proj.bias)):
        if t is not None:
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:KEY_VERSION_CHARS]


def stale_banks(attn: nn.Module) -> list[str]:
    """Bound banks whose recorded key_version is set and is not key_version(attn).

    One bank_info per bank. A bank without a version (base banks of random
    keys, sessions) is never stale: its keys do not depend on q_proj.

        if stale_banks(attn): ...    # rebuild those domain banks' keys
    """
    memory = _memory_of(attn)
    mine = key_version(attn)
    return [name for name in attn.banks
            if (v := memory.bank_info(name).spec.key_version) and v != mine]


# ---- values ------------------------------------------------------------------------

@torch.no_grad()
def readout_values(attn: nn.Module, keys: Any) -> np.ndarray:
    """The layer's current memory readout at each key (n, value_dim) float32.

    Query = key in every head; the per-head softmax-weighted readout
    (`attn.read`, before out_proj and gate) averaged over heads, over the
    banks the layer reads NOW. Call it before binding the new bank: a bank
    whose values are these, stacked beside, hands each query near a key
    about what memory already said there. Outputs then change less than with
    zero or random values at the same keys, but not by nothing: a query that
    retrieves domain keys gets a smoothed readout (an average of readouts at
    nearby keys), and is exact only where it retrieves one key alone (topk=1
    at a key). With keys the queries rarely reach (random keys) readout
    values are no better than zeros. tests/test_domain.py measures both.
    (Heads differ here only by their scale, so the average loses little.)

        values = readout_values(attn, keys)   # (n, dv), then create_domain_bank(...)
    """
    read = getattr(attn, "read", None)
    if read is None:
        raise RuntimeError("readout_values needs KNNAttention.read(q) (the memory readout "
                           "before out_proj and gate)")
    c = attn.config
    k = torch.from_numpy(_unit_keys(keys, c.key_dim))                          # (n, dk)
    w = attn.q_proj.weight
    step = max(1, CHUNK_ROWS // c.num_heads)       # one search of <= CHUNK_ROWS queries a piece
    out = []
    for s in range(0, k.shape[0], step):
        q = k[s:s + step].to(w.device, w.dtype)                               # (m, dk)
        q = q[:, None, :].expand(-1, c.num_heads, -1).contiguous()           # (m, H, dk)
        out.append(read(q).float().mean(dim=1).cpu())                         # (m, dv)
    return torch.cat(out).numpy() if out else np.zeros((0, c.value_dim), np.float32)


def fit_values(attn: nn.Module, bank: str, queries: torch.Tensor, steps: int = 100,
               lr: float = 0.05) -> dict[str, float]:
    """Fit the value table of `bank` (stacked in attn, with a table) so that on
    `queries` (N, H, dk) the layer's readout equals its readout with `bank`
    left out, as closely as any values can (readout_values alone does not:
    a query near several domain keys gets an average of their values).

    The retrieved set and softmax weights depend on keys only, so they are
    searched once, and the fit is a least-squares problem in the table's
    rows: `steps` of Adam (SparseAdam for a sparse table) reach its optimum
    (tests/test_domain.py checks against torch.linalg.lstsq); other tables
    are untouched, and so is the bank in memory (push_values writes it).
    What values cannot undo is the softmax weight the new keys win: measured
    there, 0.67 -> 0.56 of the readout moves. A smaller share of the top-k
    (BankQuery(bank, k=...)) is the other lever.
    Returns the relative readout change {"before": ..., "after": ...} =
    |read - read_without| / |read_without| on the queries.

        attn.add_value_table("med", n); attn.load_values(bank="med")   # readout_values init
        attn.bind(banks=["med", "base"])
        fit_values(attn, "med", attn.queries(x_domain).detach())
    """
    stack = list(attn.config.banks)
    names = [b.name for b in stack]
    if bank not in names:
        raise ValueError(f"bank '{bank}' is not in the layer's stack {names}")
    table = attn.value_table(bank)
    q = queries.detach().to(table.weight.device, table.weight.dtype)             # (N, H, dk)
    without = [replace(b, include=False) if b.name == bank else b for b in stack]
    others = [t.weight for t in attn.value_tables.values() if t is not table]
    trainable = [w.requires_grad for w in others]
    try:
        attn.bind(banks=without)
        with torch.no_grad():
            target = attn.read(q)                                                 # (N, H, dv)
        attn.bind(banks=stack)
        with torch.no_grad():
            r = attn.retrieve(q, keys=False)
            weights = masked_softmax(attn.memory_logits(q, r), r.mask)            # (N, H, k)
        for w in others:
            w.requires_grad_(False)
        table.weight.requires_grad_(True)
        opt = (torch.optim.SparseAdam if table.sparse else torch.optim.Adam)([table.weight], lr=lr)
        norm = target.norm().clamp_min(1e-12)
        change = []
        for _ in range(steps + 1):
            out = torch.einsum("nhk,nhkv->nhv", weights, attn.gather_values(r))  # (N, H, dv)
            loss = (out - target).square().sum()
            change.append(float(loss.detach().sqrt() / norm))
            if len(change) > steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        table.weight.grad = None
    finally:
        attn.bind(banks=stack)
        for w, t in zip(others, trainable):
            w.requires_grad_(t)
    return {"before": change[0], "after": change[-1]}


# ---- the bank ----------------------------------------------------------------------

def create_domain_bank(memory: MemoryBackend, name: str, keys: Any, values: Any = None, *,
                       value_dim: int, value_dtype: str = "float32", index: str = "Flat",
                       metric: str = "l2", quota_bytes: int | None = None,
                       key_version: str = "", tenant: str = "default") -> BankInfo:
    """Create domain bank `name` holding keys (n, dim) with ids 0..n-1; its BankInfo.

    Ids 0..n-1 let a trainable value table of n rows back the bank
    (KNNAttention(value_tables={name: n}), push_values / load_values).
    values: (n, value_dim), e.g. readout_values(attn, keys); None: zeros
    (value_dim 0: a keys-only bank). Keys must be unit rows (the layer
    assumes it).
    Rows go in pieces of CHUNK_ROWS; if a piece fails (e.g. over quota) the
    bank is deleted again and the error raised: all rows or no bank.

        create_domain_bank(mem, "med", keys, values, value_dim=128,
                           key_version=key_version(attn))
    """
    if isinstance(index, str) and is_product_keys(index):
        raise InvalidArgument("a domain bank holds the keys it is given; a product-key bank "
                              "makes its own: use a faiss index (Flat, HNSW32, IVF...)")
    a = to_numpy(keys)
    if a.ndim != 2:
        raise InvalidArgument(f"keys must be a 2-d array (n, dim); got shape {a.shape}")
    spec = BankSpec(name=name, dim=a.shape[1], value_dim=value_dim, kind="domain",
                    value_dtype=value_dtype, metric=metric, index=index,
                    quota_bytes=quota_bytes, tenant=tenant, key_version=key_version).validated()
    k = _unit_keys(a, spec.dim)                                                # (n, dim)
    v = _domain_values(values, k.shape[0], spec.value_dim)                     # (n, dv) | None
    memory.create_bank(spec)
    try:
        for s in range(0, k.shape[0], CHUNK_ROWS):
            e = min(k.shape[0], s + CHUNK_ROWS)
            memory.add(name, k[s:e], _piece(v, s, e, spec.value_dim),
                       ids=np.arange(s, e, dtype=np.int64))
    except Exception:
        with contextlib.suppress(Exception):   # the add's error is the one to report
            memory.delete_bank(name)           # a half-filled bank would pass for a whole one
        raise
    return memory.bank_info(name)


def _domain_values(values: Any, n: int, value_dim: int) -> np.ndarray | None:
    """values (n, value_dim) float32, checked before the bank exists (no piece
    may fail half-way for a bad shape or a NaN), or None: zeros / keys only."""
    if value_dim == 0:
        if values is not None:
            raise InvalidArgument("a keys-only bank (value_dim=0) takes no values")
        return None
    if values is None:
        return None                # zeros, made a piece at a time by _piece
    v = matrix(values, "values", value_dim, np.dtype(np.float32), allow_empty=True)
    if v.shape[0] != n:
        raise InvalidArgument(f"values have {v.shape[0]} rows; keys have {n}")
    return v


def _piece(v: np.ndarray | None, start: int, end: int, value_dim: int) -> np.ndarray | None:
    """Values of rows start..end-1 (zeros when none were given), or None: keys only."""
    if v is not None:
        return v[start:end]
    return np.zeros((end - start, value_dim), np.float32) if value_dim else None


def _unit_keys(keys: Any, dim: int) -> np.ndarray:
    """keys as a finite (n, dim) float32 array of unit rows, or InvalidArgument."""
    k = matrix(keys, "keys", dim, np.dtype(np.float32), allow_empty=True)     # (n, dim)
    off = np.abs(np.linalg.norm(k, axis=1) - 1) > UNIT_TOL                     # (n,)
    if off.any():
        raise InvalidArgument(f"{int(off.sum())} of {len(k)} keys are not unit vectors "
                              f"(|norm - 1| > {UNIT_TOL}): the layer's queries and keys are unit")
    return k


def _memory_of(attn: nn.Module) -> MemoryBackend:
    memory = getattr(attn, "memory", None)
    if memory is None:
        raise RuntimeError("this KNNAttention has no memory: pass memory=... or call bind(memory)")
    return memory


def _check_count(v: Any, what: str, *, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise InvalidArgument(f"{what} must be an integer >= {minimum}; got {v!r}")
