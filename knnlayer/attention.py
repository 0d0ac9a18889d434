"""KNNAttention: attention over the top-k of large external key/value memories.

    mem = MemoryClient("unix:///run/memoryd.sock")  # or memoryd.engine.LocalMemory("data")
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
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knnlayer import bank_tools
from knnlayer.retrieval import BankFacts, Retrieved, bank_facts, retrieve, search_pool
from memoryd.api import MAX_K, MemoryBackend

EXTRA_STATE_FORMAT = 1


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

    def check_banks(self) -> BankFacts:
        """Read the bound banks' specs; raise ValueError unless each fits this
        module (dim, value_dim) and all share a metric.

        The first forward calls it by itself (one bank_info per bank, once);
        call it after binding to fail early. It learns the metric (to read
        q . k off the scores) and whether all banks are product-key banks,
        whose key vectors are then rebuilt from ids instead of fetched.
        """
        c = self.config
        table_only = self.value_table is not None and len(c.banks) == 1
        self._facts = bank_facts(self._memory(), c.banks, c.key_dim, c.value_dim, table_only)
        return self._facts

    def _bank_facts(self) -> BankFacts:
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
            retrieved = search_pool().submit(self.retrieve, q.detach(), keys)
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

    def retrieve(self, q: torch.Tensor, keys: bool = True) -> Retrieved:
        """One memory.search for all N*H queries q (N, H, dk) (knnlayer.retrieval.retrieve):
        with key vectors when keys, else with q . k read off the scores."""
        c = self.config
        use_table = self.value_table is not None
        return retrieve(self._memory(), c.banks, self._bank_facts, q, c.topk, c.value_dim,
                        keys=keys, values=not use_table or len(c.banks) > 1,
                        table_rows=self.value_table.num_embeddings if use_table else None,
                        dtype=self._dtype())

    def gather_values(self, r: Retrieved) -> torch.Tensor:
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

    # ---- base banks and trainable values (knnlayer.bank_tools) ----------------------
    create_base_bank = staticmethod(bank_tools.create_base_bank)

    def _table(self) -> nn.Embedding:
        if self.value_table is None:
            raise RuntimeError("this KNNAttention has no trainable value table (trainable_values=0)")
        return self.value_table

    def push_values(self, memory: MemoryBackend | None = None, bank: str | None = None) -> int:
        """Write the trained table into `bank` (default banks[0]); returns rows updated."""
        return bank_tools.push_values(memory or self._memory(), bank or self.config.banks[0],
                                      self._table().weight)

    def load_values(self, memory: MemoryBackend | None = None, bank: str | None = None) -> None:
        """Copy the values of ids 0..ntotal-1 of `bank` (default banks[0]) into the table."""
        bank_tools.load_values(memory or self._memory(), bank or self.config.banks[0],
                               self._table().weight)

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


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where mask; 0 elsewhere; an all-masked row is all 0."""
    logits = logits.masked_fill(~mask, float("-inf"))                      # (..., k)
    top = logits.amax(dim=-1, keepdim=True).detach()                       # (..., 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))     # (..., 1)
    e = torch.exp(logits - top)                                            # (..., k), 0 where masked
    total = e.sum(dim=-1, keepdim=True)                                    # (..., 1)
    return e / torch.where(total > 0, total, torch.ones_like(total))       # (..., k)
