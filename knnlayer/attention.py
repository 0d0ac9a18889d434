"""KNNAttention: attention over the top-k of large external key/value memories.

    mem = LocalMemory("data")                      # or MemoryClient("unix:///run/memoryd.sock")
    attn = KNNAttention(input_dim=512, key_dim=128, value_dim=64, num_heads=8, topk=32,
                        memory=mem, banks=["base", "med"])
    y = attn(x)                  # (B, T, 512) -> (B, T, 8*64), or (B, T, out_dim)
    loss.backward()              # gradients reach the query projection, scale, gate (and table)
    attn.remember(x, bank="session-42")   # write path: append keys/values of x

Forward, per head h (the seed's idea, implemented as meant):
    q_h    = normalize(W_q x)_h                      unit query, (key_dim,)
    ids    = top-k of q_h over the union of `banks`  ONE memory.search for all B*T*H queries
    s_j    = scale_h * (q_h . k_j)                   recomputed in torch from the returned key
                                                     vectors: FAISS distances carry no gradient
                                                     (when q needs no gradient, q . k is read
                                                     off the returned scores instead, and no key
                                                     vector is fetched, unless an index
                                                     quantises keys, e.g. PQ: its scores are
                                                     approximate)
    a      = softmax over the retrieved j            missing results (id -1) masked out;
                                                     a row with no result gives zeros, no NaN
    o_h    = sum_j a_j v_j
    y      = concat_h o_h  [-> out_proj]  [-> tanh(gate) * y]

Keys in banks are unit vectors, so an l2 bank (squared distance 2 - 2 q.k) and
an ip bank rank the same way, and `scale_h * (q . k)` is the seed's
`sqrt_dk - d2 * sqrt_dk / 2` with scale_h = sqrt(key_dim) at init.

Values come from the memory (frozen: no gradient), or, with
`trainable_values=ntotal`, from a trainable table of ntotal rows (a sparse
nn.Embedding, as product-key memory does) that backs the FIRST bank named:
the ids that bank returns (0..ntotal-1, see `create_base_bank`) index the
table's rows and gradients flow into it. Results from the other banks keep
their memory values. `push_values` writes the trained table into the bank when
training ends; `load_values` reads it back.

Gate: with `gate=True` a zero-initialised vector g (one entry per output
feature) scales the output, y = tanh(g) * out, so inserting the layer into a
trained residual model leaves its output unchanged at step 0 (the gate's own
gradient is `out`, so it opens on the first step).

The first forward reads the bound banks' specs once (`check_banks`: dims, the
metric, whether they are product-key banks, whose key vectors are then rebuilt
from ids instead of fetched); every forward after that is one memory request.

The bank binding (names of the banks read) is explicit configuration, kept in
the state dict as extra state. Loading a state dict saved for other banks
raises; nothing here ever creates or re-binds a bank silently.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memoryd.api import MAX_K, BankSpec, MemoryBackend, SearchResult
from memoryd.arrays import BFLOAT16

EXTRA_STATE_FORMAT = 1
_ROWS_PER_CALL = 65536       # rows per add/update/get call in the bank helpers


@dataclass
class KNNAttentionConfig:
    input_dim: int
    key_dim: int
    value_dim: int
    num_heads: int = 1
    topk: int = 32
    banks: tuple[str, ...] = ()           # banks read by forward, in this order
    out_dim: int | None = None            # None: no output projection, y is (..., H*value_dim)
    gate: bool = False                    # y = tanh(gate) * out, gate zero-initialised
    learn_scale: bool = True              # per-head scale trainable (else a fixed buffer)
    scale_init: float | None = None       # None: sqrt(key_dim), as the seed
    trainable_values: int = 0             # >0: a table of that many rows backs banks[0]
    sparse_values: bool = True            # the table's gradient is sparse (use SparseAdam/SGD)
    bias: bool = False                    # bias in the query / output projections
    eps: float = 1e-6                     # L2-normalisation floor

    def __post_init__(self) -> None:
        if isinstance(self.banks, str):
            self.banks = (self.banks,)
        self.banks = tuple(self.banks)
        for name in ("input_dim", "key_dim", "value_dim", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or not 1 <= self.topk <= MAX_K:
            raise ValueError(f"topk must be an integer in 1..{MAX_K}; got {self.topk!r}")
        if not self.banks or not all(isinstance(b, str) and b for b in self.banks):
            raise ValueError(f"banks must name at least one bank; got {self.banks!r}")
        if len(set(self.banks)) != len(self.banks):
            raise ValueError(f"a bank is named twice: {list(self.banks)}")
        if self.out_dim is not None and self.out_dim < 1:
            raise ValueError(f"out_dim must be positive or None; got {self.out_dim!r}")
        if self.trainable_values < 0:
            raise ValueError(f"trainable_values must be >= 0; got {self.trainable_values!r}")

    @property
    def out_features(self) -> int:
        return self.out_dim if self.out_dim is not None else self.num_heads * self.value_dim


class KNNAttention(nn.Module):
    """Multi-head attention over the top-k entries of external memory banks."""

    def __init__(self, config: KNNAttentionConfig | None = None, *,
                 memory: MemoryBackend | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = KNNAttentionConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a KNNAttentionConfig or keyword fields, not both")
        self.config = config
        self.memory = memory
        c = config
        H, dk, dv = c.num_heads, c.key_dim, c.value_dim
        # read path (trained)
        self.q_proj = nn.Linear(c.input_dim, H * dk, bias=c.bias)
        scale = torch.full((H,), c.scale_init if c.scale_init is not None else math.sqrt(dk))
        if c.learn_scale:
            self.scale = nn.Parameter(scale)                      # (H,)
        else:
            self.register_buffer("scale", scale)                  # (H,)
        self.value_table = (nn.Embedding(c.trainable_values, dv, sparse=c.sparse_values)
                            if c.trainable_values else None)      # weight (ntotal, dv)
        self.out_proj = nn.Linear(H * dv, c.out_dim, bias=c.bias) if c.out_dim else None
        self.gate = nn.Parameter(torch.zeros(c.out_features)) if c.gate else None  # (F,)
        # write path (remember): its outputs are stored detached
        self.key_proj = nn.Linear(c.input_dim, dk, bias=c.bias)
        self.value_proj = nn.Linear(c.input_dim, dv, bias=c.bias)
        self._facts: BankFacts | None = None      # learnt by check_banks, on first use
        # refuse a state dict of other banks before any of this module's tensors is copied
        self.register_load_state_dict_pre_hook(_check_bank_binding)

    # ---- binding -------------------------------------------------------------------
    @property
    def banks(self) -> list[str]:
        return list(self.config.banks)

    def bind(self, memory: MemoryBackend | None = None, banks: Sequence[str] | None = None) -> None:
        """Point the module at another memory and/or other banks, explicitly."""
        if memory is not None:
            self.memory = memory
        if banks is not None:
            self.config = replace(self.config, banks=tuple(banks))  # re-validated
        self._facts = None

    def check_banks(self) -> "BankFacts":
        """Read the bound banks' specs; raise ValueError unless each fits this
        module (dim, value_dim) and all share a metric.

        The first forward calls it by itself (one bank_info per bank, once);
        call it after binding to fail early. It learns the metric (to read
        q . k off the scores) and whether all banks are product-key banks,
        whose key vectors are then rebuilt from ids instead of fetched.
        """
        from memoryd.faiss_index import exact_scores
        from memoryd.product_keys import is_product_keys, subkeys
        c = self.config
        specs = [self._memory().bank_info(name).spec for name in c.banks]
        for i, (name, spec) in enumerate(zip(c.banks, specs)):
            if spec.dim != c.key_dim:
                raise ValueError(f"bank '{name}' holds {spec.dim}-d keys; this layer has key_dim {c.key_dim}")
            needs_values = not (self.value_table is not None and i == 0 and len(c.banks) == 1)
            if needs_values and spec.value_dim != c.value_dim:
                raise ValueError(f"bank '{name}' holds {spec.value_dim}-d values; "
                                 f"this layer has value_dim {c.value_dim}")
        metrics = {s.metric for s in specs}
        if len(metrics) > 1:
            raise ValueError(f"banks {list(c.banks)} mix metrics {sorted(metrics)}; "
                             "one search needs one metric")
        product = all(is_product_keys(s.index) for s in specs)
        tables = [subkeys(*_n_dim_seed(s)) for s in specs] if product else None
        exact = all(is_product_keys(s.index) or exact_scores(s.index) for s in specs)
        self._facts = BankFacts(metric=specs[0].metric, pk_tables=tables, exact_scores=exact)
        return self._facts

    def _bank_facts(self) -> "BankFacts":
        return self._facts if self._facts is not None else self.check_banks()

    def _memory(self) -> MemoryBackend:
        if self.memory is None:
            raise RuntimeError("KNNAttention has no memory: pass memory=... or call bind(memory)")
        return self.memory

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT, "banks": list(self.config.banks)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_saved_banks(state)

    def _check_saved_banks(self, state: Any) -> None:
        saved = list(state.get("banks", ())) if isinstance(state, dict) else None
        if saved != self.banks:
            raise ValueError(
                f"KNNAttention state was saved bound to banks {saved}, but this module reads "
                f"{self.banks}. Banks are never re-created or re-bound silently: construct the "
                f"module with banks={saved} (or call bind(banks=...)) before loading")

    # ---- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x, background=False))

    def start(self, x: torch.Tensor, *, background: bool = True) -> "Pending":
        """Project x to queries and send the one memory search for all of them.

        With background=True the search runs on a worker thread (FAISS and gRPC
        release the GIL) and this returns at once, so the caller can run
        another part of the model meanwhile and then call `finish`:

            pending = attn.start(x)      # memory works...
            h = mlp(x)                   # ...while this runs
            y = attn.finish(pending)
        """
        c = self.config
        q = self.queries(x.reshape(-1, c.input_dim))              # (N, H, dk), N = B*T
        # key vectors only when a gradient must reach q through q . k
        keys = torch.is_grad_enabled() and q.requires_grad
        if background:
            retrieved = _search_pool().submit(self.retrieve, q.detach(), keys)
        else:
            retrieved = Future()
            retrieved.set_result(self.retrieve(q.detach(), keys))
        return Pending(lead=tuple(x.shape[:-1]), q=q, retrieved=retrieved)

    def finish(self, pending: "Pending") -> torch.Tensor:
        """The attention output (B, T, F) for a `start`ed search."""
        c = self.config
        q, r = pending.q, pending.retrieved.result()              # q: (N, H, dk)
        qk = (torch.einsum("nhd,nhkd->nhk", q, r.keys) if r.keys is not None
              else r.qk)                                          # (N, H, k)
        logits = self.scale[:, None] * qk                         # (N, H, k)
        weights = masked_softmax(logits, r.mask)                  # (N, H, k)
        values = self.gather_values(r)                            # (N, H, k, dv)
        out = torch.einsum("nhk,nhkv->nhv", weights, values)      # (N, H, dv)
        out = out.reshape(*pending.lead, c.num_heads * c.value_dim)  # (B, T, H*dv)
        if self.out_proj is not None:
            out = self.out_proj(out)                              # (B, T, out_dim)
        if self.gate is not None:
            out = torch.tanh(self.gate) * out                     # (B, T, F)
        return out

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Unit queries (N, H, dk) of inputs (N, input_dim)."""
        c = self.config
        q = self.q_proj(x).view(-1, c.num_heads, c.key_dim)       # (N, H, dk)
        return F.normalize(q, dim=-1, eps=c.eps)                  # (N, H, dk)

    def retrieve(self, q: torch.Tensor, keys: bool = True) -> "Retrieved":
        """One memory.search for all N*H queries; results on q's device, module dtype.

        keys=True: with the key vectors (fetched, or rebuilt for product keys);
        False: with q . k read off the scores instead (ip: the score; l2:
        (|q|^2 + 1 - d) / 2, keys being unit vectors), for a q without gradient,
        unless a bank's index quantises its keys (its scores are then not q . k).
        The only host sync of the forward is moving the queries to the host;
        results travel back through pinned memory without blocking.
        """
        c = self.config
        N, H, dk = q.shape
        k, dv = c.topk, c.value_dim
        dtype, device = self._dtype(), q.device
        use_table = self.value_table is not None
        mem_values = not use_table or len(c.banks) > 1
        if N == 0:                                                # nothing to ask
            return Retrieved(ids=torch.zeros(0, H, k, dtype=torch.long, device=device),
                             mask=torch.zeros(0, H, k, dtype=torch.bool, device=device),
                             from_table=torch.zeros(0, H, k, dtype=torch.bool, device=device)
                             if use_table else None,
                             keys=torch.zeros(0, H, k, dk, dtype=dtype, device=device),
                             qk=None,
                             values=torch.zeros(0, H, k, dv, dtype=dtype, device=device)
                             if mem_values else None)
        flat = q.detach().reshape(N * H, dk).to("cpu", torch.float32).numpy()  # (N*H, dk) host sync
        facts = self._bank_facts()
        keys = keys or not facts.exact_scores                     # quantised: scores are not q . k
        tables = facts.pk_tables
        res: SearchResult = self._memory().search(c.banks, flat, k, values=mem_values,
                                                  keys=keys and tables is None)
        ids = res.ids.reshape(N, H, k)                            # (N, H, k) host int64
        mask = ids >= 0                                           # (N, H, k) host bool
        key_vectors = qk = None
        if keys:
            key_vectors = (res.keys if tables is None
                           else _rebuild_keys(tables, res.ids, res.bank, dk))  # (N*H, k, dk)
        else:
            qk = np.where(mask, _dot_of_scores(res.scores, facts.metric, flat).reshape(N, H, k),
                          np.float32(0))                          # (N, H, k)
        from_table = None
        if use_table:
            from_table = mask & (res.bank.reshape(N, H, k) == 0)  # (N, H, k) host bool
            bad = from_table & (ids >= self.value_table.num_embeddings)
            if bad.any():
                raise ValueError(
                    f"bank '{c.banks[0]}' returned id {int(ids[bad].max())}, but the trainable "
                    f"value table has {self.value_table.num_embeddings} rows (ids 0..ntotal-1)")
        if mem_values:
            if res.values is None or res.values.shape[-1] != dv:
                got = None if res.values is None else res.values.shape[-1]
                raise ValueError(f"banks {list(c.banks)} returned {got}-d values; "
                                 f"this layer has value_dim {dv}")
        return Retrieved(
            ids=to_device(np.where(mask, ids, 0), device),                      # (N, H, k)
            mask=to_device(mask, device),                                       # (N, H, k)
            from_table=None if from_table is None else to_device(from_table, device),
            keys=(to_device(key_vectors.reshape(N, H, k, dk), device, dtype)   # (N, H, k, dk)
                  if key_vectors is not None else None),
            qk=to_device(qk, device, dtype) if qk is not None else None,       # (N, H, k)
            values=(to_device(res.values.reshape(N, H, k, dv), device, dtype)   # (N, H, k, dv)
                    if mem_values else None))

    def gather_values(self, r: "Retrieved") -> torch.Tensor:
        """Values (N, H, k, dv) of the retrieved rows: the table's (trainable) or memory's."""
        if self.value_table is None:
            return r.values                                       # (N, H, k, dv), no grad
        w = self.value_table.weight
        rows = torch.where(r.from_table, r.ids, torch.zeros_like(r.ids))       # (N, H, k)
        table = F.embedding(rows, w, sparse=self.value_table.sparse)          # (N, H, k, dv)
        other = r.values if r.values is not None else torch.zeros_like(table)  # (N, H, k, dv)
        return torch.where(r.from_table[..., None], table, other.to(table.dtype))  # (N, H, k, dv)

    def _dtype(self) -> torch.dtype:
        return self.q_proj.weight.dtype

    # ---- write path ---------------------------------------------------------------
    @torch.no_grad()
    def remember(self, x: torch.Tensor, bank: str) -> np.ndarray:
        """Append one key/value row per position of x to `bank`, in one memory.add.

        keys = normalize(key_proj(x)), values = value_proj(x), both detached.
        Returns the new ids, shaped like x without its last dim (e.g. (B, T)).
        """
        c = self.config
        lead = x.shape[:-1]
        flat = x.reshape(-1, c.input_dim)                                      # (B*T, D)
        keys = F.normalize(self.key_proj(flat), dim=-1, eps=c.eps)             # (B*T, dk)
        values = self.value_proj(flat)                                         # (B*T, dv)
        ids = self._memory().add(bank, keys.float(), values.float())           # (B*T,)
        return np.asarray(ids).reshape(lead)

    # ---- base banks and trainable values ---------------------------------------------
    @staticmethod
    def create_base_bank(memory: MemoryBackend, name: str, ntotal: int, key_dim: int,
                         value_dim: int, *, values: Any = None, seed: int = 0,
                         kind: str = "base", index: str = "Flat", metric: str = "l2",
                         value_dtype: str = "float32", **spec: Any):
        """Create bank `name` holding `ntotal` seeded random unit keys with ids 0..ntotal-1.

        index="product-keys" makes a product-key bank (exact top-k at ~sqrt(ntotal)
        cost; ntotal must be a square): its keys are the product of two seeded
        sub-key tables built by the bank, so only the values are sent.

        values: an (ntotal, value_dim) array/tensor (e.g. `attn.value_table.weight`,
        so the bank starts equal to the table), or None for seeded N(0, 1) values;
        value_dim=0 makes a keys-only bank (values must then be None).
        Rows are added in chunks; returns the BankInfo after the adds.
        """
        if values is not None and value_dim == 0:
            raise ValueError("a keys-only bank (value_dim=0) takes no values")
        if values is not None:
            values = values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
            if values.shape != (ntotal, value_dim):
                raise ValueError(f"values must be ({ntotal}, {value_dim}); got {tuple(values.shape)}")
        rng = np.random.default_rng(seed)
        product = index.startswith("product-keys")
        if product:  # keys = product of 2 x sqrt(ntotal) seeded sub-keys, made by the bank
            n = math.isqrt(ntotal)
            if n * n != ntotal:
                raise ValueError(f"product keys need a square ntotal (n^2); got {ntotal}")
            if index == "product-keys":
                index = f"product-keys:{n}|seed={seed}"
        memory.create_bank(BankSpec(name=name, dim=key_dim, value_dim=value_dim, kind=kind,
                                    index=index, metric=metric, value_dtype=value_dtype, **spec))
        for start in range(0, ntotal, _ROWS_PER_CALL):
            end = min(ntotal, start + _ROWS_PER_CALL)
            ids = np.arange(start, end, dtype=np.int64)
            if value_dim == 0:
                vals = None
            elif values is None:
                vals = rng.standard_normal((end - start, value_dim), dtype=np.float32)  # (n, dv)
            else:
                vals = values[start:end]                                          # (n, dv)
            if product:
                if vals is not None:
                    memory.update_values(name, ids, vals)
                continue
            keys = rng.standard_normal((end - start, key_dim), dtype=np.float32)  # (n, dk)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True)
            memory.add(name, keys, vals, ids=ids)
        return memory.bank_info(name)

    def _table(self) -> nn.Embedding:
        if self.value_table is None:
            raise RuntimeError("this KNNAttention has no trainable value table (trainable_values=0)")
        return self.value_table

    @torch.no_grad()
    def push_values(self, memory: MemoryBackend | None = None, bank: str | None = None) -> int:
        """Write the trained table into `bank` (default banks[0]); returns rows updated."""
        memory = memory or self._memory()
        bank = bank or self.config.banks[0]
        w = self._table().weight                                                # (ntotal, dv)
        updated = 0
        for start in range(0, w.shape[0], _ROWS_PER_CALL):
            end = min(w.shape[0], start + _ROWS_PER_CALL)
            updated += memory.update_values(bank, np.arange(start, end, dtype=np.int64),
                                            w[start:end].float())
        if updated != w.shape[0]:
            raise ValueError(f"bank '{bank}' holds only {updated} of ids 0..{w.shape[0] - 1}")
        return updated

    @torch.no_grad()
    def load_values(self, memory: MemoryBackend | None = None, bank: str | None = None) -> None:
        """Copy the values of ids 0..ntotal-1 of `bank` (default banks[0]) into the table."""
        memory = memory or self._memory()
        bank = bank or self.config.banks[0]
        w = self._table().weight                                                # (ntotal, dv)
        for start in range(0, w.shape[0], _ROWS_PER_CALL):
            end = min(w.shape[0], start + _ROWS_PER_CALL)
            got = memory.get(bank, np.arange(start, end, dtype=np.int64), values=True)
            if not got.found.all():
                missing = start + int(np.flatnonzero(~got.found)[0])
                raise ValueError(f"bank '{bank}' has no row with id {missing}")
            w[start:end].copy_(to_device(got.values, w.device, w.dtype))

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.num_heads}, key_dim={c.key_dim}, value_dim={c.value_dim}, topk={c.topk}, "
                f"banks={list(c.banks)}, table={c.trainable_values or None}, gate={c.gate}")


def _check_bank_binding(module: KNNAttention, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + "_extra_state"
    if key in state_dict:          # absent: load_state_dict reports the missing key itself
        module._check_saved_banks(state_dict[key])


@dataclass
class Pending:
    """A started forward: the queries (with their graph) and the search in flight."""

    lead: tuple[int, ...]             # x.shape[:-1], e.g. (B, T)
    q: torch.Tensor                   # (N, H, dk) unit queries, N = prod(lead)
    retrieved: Future                 # -> Retrieved


_POOL: ThreadPoolExecutor | None = None


def _search_pool() -> ThreadPoolExecutor:
    """Threads for background searches, shared by every layer of the process."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="knnlayer-search")
    return _POOL


@dataclass(frozen=True)
class BankFacts:
    """What forward needs to know of its banks, read once by check_banks."""

    metric: str                            # "l2" or "ip", shared by all banks
    # Sub-key tables when all banks are product-key banks, else None. Product
    # keys are a pure function of (n, seed), so their vectors are rebuilt from
    # the returned ids instead of crossing the wire (4096 queries x k=32 x
    # 128-d fp32 keys would be 64 MiB).
    pk_tables: list[np.ndarray] | None
    # Whether every bank's scores are exact distances of the returned keys
    # (Flat, HNSW, IVF..,Flat, product keys): then q . k may be read off the
    # scores. A quantised index (PQ, SQ) scores approximately: keys are fetched.
    exact_scores: bool = True


def _dot_of_scores(scores: np.ndarray, metric: str, queries: np.ndarray) -> np.ndarray:
    """q . k (nq, k) from search scores (nq, k) of queries (nq, dk): ip scores are
    q . k; l2 scores are |q - k|^2 = |q|^2 + 1 - 2 q . k for the unit keys of
    this layer (|q| is 1 too, except for a zero query row, whose q . k is 0)."""
    if metric == "ip":
        return scores
    q_sq = np.einsum("nd,nd->n", queries, queries)[:, None]               # (nq, 1)
    return 0.5 * (q_sq + 1.0 - scores)


@dataclass
class Retrieved:
    """One search's results as tensors on the compute device."""

    ids: torch.Tensor                 # (N, H, k) int64, 0 where missing
    mask: torch.Tensor                # (N, H, k) bool, True where a result exists
    from_table: torch.Tensor | None   # (N, H, k) bool, rows of banks[0] read from the table
    keys: torch.Tensor | None         # (N, H, k, dk) module dtype, zeros where missing
    qk: torch.Tensor | None           # (N, H, k) q . k from the scores when keys is None
    values: torch.Tensor | None       # (N, H, k, dv) module dtype, None when all from the table


def _n_dim_seed(spec: BankSpec) -> tuple[int, int, int]:
    from memoryd.product_keys import parse
    n, seed = parse(spec.index)
    return n, spec.dim, seed


def _rebuild_keys(tables: list[np.ndarray], ids: np.ndarray, bank: np.ndarray, dk: int) -> np.ndarray:
    """Key vectors (nq, k, dk) of product-key results; zeros where missing."""
    from memoryd.product_keys import key_vectors
    out = np.zeros((*ids.shape, dk), np.float32)                           # (nq, k, dk)
    for b, sub in enumerate(tables):
        sel = bank == b
        if sel.any():
            out[sel] = key_vectors(sub, ids[sel])
    return out


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where mask; 0 elsewhere; an all-masked row is all 0."""
    logits = logits.masked_fill(~mask, float("-inf"))                      # (..., k)
    top = logits.amax(dim=-1, keepdim=True).detach()                       # (..., 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))     # (..., 1)
    e = torch.exp(logits - top)                                            # (..., k), 0 where masked
    total = e.sum(dim=-1, keepdim=True)                                    # (..., 1)
    return e / torch.where(total > 0, total, torch.ones_like(total))       # (..., k)


def to_device(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy (float32/16, ml_dtypes bfloat16, int, bool) -> tensor on device, without a sync.

    On CUDA the rows are copied once into pinned host memory and sent with
    non_blocking=True; on CPU a writable array is used in place.
    """
    bf16 = a.dtype == BFLOAT16
    raw = a.view(np.int16) if bf16 else a                                  # torch has no ml_dtypes
    if device.type == "cuda":
        host = torch.empty(raw.shape, dtype=_TORCH_OF[raw.dtype], pin_memory=True)
        host.numpy()[...] = raw
        t = host.to(device, non_blocking=True)
    else:
        if not raw.flags.writeable or not raw.flags.c_contiguous:          # e.g. a wire buffer
            raw = np.array(raw)
        t = torch.from_numpy(raw)
        if t.device != device:
            t = t.to(device)
    if bf16:
        t = t.view(torch.bfloat16)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


_TORCH_OF = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
             np.dtype(np.float64): torch.float64, np.dtype(np.int16): torch.int16,
             np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
             np.dtype(np.bool_): torch.bool}
