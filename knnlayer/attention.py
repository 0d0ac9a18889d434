"""KNNAttention: attention over the top-k of large external key/value memories.

    mem = MemoryClient("unix:///run/memoryd.sock")  # or memoryd.engine.LocalMemory("data")
    attn = KNNAttention(input_dim=512, key_dim=128, value_dim=64, num_heads=8, topk=32,
                        memory=mem, banks=[BankQuery("med", bias=0.05, k=8), "base"],
                        value_tables={"base": 2**20, "med": 16384})
    y = attn(x)                  # (B, T, 512) -> (B, T, 8*64), or (B, T, out_dim)
    y = attn(x, row_banks=sids)  # + each batch row's own bank (a session), still ONE search
    loss.backward()              # gradients reach the query projection, scale, gate (and tables)
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

Banks: a stack of names or `BankQuery(name, k=, bias=, include=)`, with the
semantics of `MemoryBackend.search` (each bank's own k, a score bias in its
favour, banks left out but kept in place). `row_banks=` at forward adds one
bank (or stack) per batch row after the shared ones: one search with
per-row stacks (api.RowStacks), e.g. B documents each with its own session.

Values come from the memory (frozen: no gradient), or, for any bank named in
`value_tables={bank: ntotal}`, from a trainable table of ntotal rows (a
sparse nn.Embedding, as product-key memory does): the ids that bank returns
(0..ntotal-1, see `create_base_bank`) index the table's rows and gradients
flow into it. Each bank has its own table, so a frozen base table and a
training domain table sit side by side (`value_table("base").weight
.requires_grad_(False)`); `push_values(bank=)` writes a trained table into
its bank, `load_values(bank=)` reads it back; `bind(banks=)` re-binds the
module in place and keeps the tables by bank name. (`trainable_values=N` is
short for `value_tables={banks[0]: N}`; tables back shared banks only: a
row bank's results carry the memory's values.)

Gate: with `gate=True` a zero-initialised vector g (one entry per output
feature) scales the output, y = tanh(g) * out, so inserting the layer into a
trained residual model leaves its output unchanged at step 0 (the gate's own
gradient is `out`, so it opens on the first step).

The first forward reads the bound banks' specs once (`check_banks`: dims, the
metric, whether they are product-key banks, whose key vectors are then rebuilt
from ids instead of fetched); a row bank's spec is read the first time it is
named. Every forward after that is one memory request.

The bank binding (the stack read) is explicit configuration, kept in the
state dict as extra state. Loading a state dict saved for other banks raises;
nothing here ever creates or re-binds a bank silently.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knnlayer import bank_tools
from knnlayer.config import (KNNAttentionConfig, RowBanks, Stack, as_query, query_dict,
                             table_key)
from knnlayer.retrieval import BankFacts, Retrieved, bank_facts, retrieve, search_pool
from memoryd.api import BankQuery, BankSpec, MemoryBackend, RowStacks

__all__ = ["KNNAttention", "KNNAttentionConfig", "Pending", "RowBanks", "masked_softmax"]

EXTRA_STATE_FORMAT = 2          # 1: {"banks": [names]}; 2: + each bank's options, the tables
ROW_SPECS = 4096                # row banks (sessions) whose specs are kept, least recent out


class KNNAttention(nn.Module):
    """Multi-head attention over the top-k entries of external memory banks."""

    config_class = KNNAttentionConfig

    def __init__(self, config: KNNAttentionConfig | None = None, *,
                 memory: MemoryBackend | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword fields, not both")
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
        self.value_tables = nn.ModuleDict()                       # table key -> weight (rows, dv)
        for bank, rows in c.value_tables.items():
            self.value_tables[table_key(bank)] = nn.Embedding(rows, dv, sparse=c.sparse_values)
        self.out_proj = nn.Linear(H * dv, c.out_dim, bias=c.bias) if c.out_dim else None
        self.gate = nn.Parameter(torch.zeros(c.out_features)) if c.gate else None  # (F,)
        # write path (remember): its outputs are stored detached
        self.key_proj = nn.Linear(c.input_dim, dk, bias=c.bias)
        self.value_proj = nn.Linear(c.input_dim, dv, bias=c.bias)
        self._specs: dict[str, BankSpec] = {}              # shared banks' specs, on first use
        self._row_specs: OrderedDict[str, BankSpec] = OrderedDict()   # row banks', LRU
        self._facts: dict[tuple, BankFacts] = {}
        self._row_stack: tuple[tuple, Stack] | None = None   # the last per-row stack built
        # refuse a state dict of other banks before any of this module's tensors is copied
        self.register_load_state_dict_pre_hook(_check_bank_binding)

    # ---- binding -------------------------------------------------------------------
    @property
    def banks(self) -> list[str]:
        """Names of the shared stack, in order."""
        return self.config.bank_names

    def bind(self, memory: MemoryBackend | None = None,
             banks: Sequence[str | BankQuery] | None = None) -> None:
        """Point the module at another memory and/or another stack, in place.

        Value tables stay, by bank name: a table whose bank leaves the stack is
        kept (and used again once the bank is back)."""
        if memory is not None:
            self.memory = memory
            self._row_specs.clear()
        if banks is not None:
            self.config = replace(self.config, banks=tuple(banks), trainable_values=0)
        self._specs.clear()
        self._facts.clear()

    def check_banks(self) -> BankFacts:
        """Read the shared banks' specs; raise ValueError unless each fits this
        module (dim, value_dim) and all share a metric.

        The first forward calls it by itself (one bank_info per bank, once);
        call it after binding to fail early. It learns the metric (to read
        q . k off the scores) and whether all banks are product-key banks,
        whose key vectors are then rebuilt from ids instead of fetched.
        """
        self._specs.clear()
        self._facts.clear()
        return self._bank_facts(())

    def _bank_facts(self, row_names: Sequence[str]) -> BankFacts:
        key = tuple(sorted(set(row_names)))
        facts = self._facts.get(key)
        if facts is None:
            specs = [self._spec(n, self._specs) for n in self.banks]
            specs += [self._spec(n, self._row_specs) for n in key]
            facts = bank_facts(specs, self.config.key_dim, self.config.value_dim,
                               frozenset(self.config.value_tables), plain=not row_names)
            if not row_names:         # per-row sets change with every batch: not kept
                self._facts[key] = facts
        return facts

    def _spec(self, name: str, cache: dict[str, BankSpec]) -> BankSpec:
        spec = cache.get(name)
        if spec is None:
            spec = cache[name] = self._memory().bank_info(name).spec
            if isinstance(cache, OrderedDict) and len(cache) > ROW_SPECS:
                cache.popitem(last=False)
        elif isinstance(cache, OrderedDict):
            cache.move_to_end(name)
        return spec

    def _memory(self) -> MemoryBackend:
        if self.memory is None:
            raise RuntimeError("KNNAttention has no memory: pass memory=... or call bind(memory)")
        return self.memory

    def get_extra_state(self) -> dict[str, Any]:
        return {"format": EXTRA_STATE_FORMAT, "banks": self.banks,
                "stack": [query_dict(b) for b in self.config.banks],
                "tables": dict(self.config.value_tables)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._check_saved_banks(state)

    def _check_saved_banks(self, state: Any) -> None:
        saved = list(state.get("banks", ())) if isinstance(state, dict) else None
        if saved != self.banks:
            raise ValueError(
                f"KNNAttention state was saved bound to banks {saved}, but this module reads "
                f"{self.banks}. Banks are never re-created or re-bound silently: construct the "
                f"module with banks={saved} (or call bind(banks=...)) before loading")
        tables = state.get("tables") if isinstance(state, dict) else None
        if tables is not None and dict(tables) != self.config.value_tables:
            raise ValueError(
                f"KNNAttention state was saved with value tables {dict(tables)}, but this module "
                f"has {self.config.value_tables}: construct it with value_tables={dict(tables)} "
                f"(or add_value_table) before loading")

    # ---- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, row_banks: RowBanks | None = None) -> torch.Tensor:
        return self.finish(self.start(x, row_banks=row_banks, background=False))

    def start(self, x: torch.Tensor, *, row_banks: RowBanks | None = None,
              background: bool = True) -> "Pending":
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
        stack = self._stack(x.shape[0] if x.dim() > 1 else 1,
                            math.prod(x.shape[1:-1]), row_banks)
        # key vectors only when a gradient must reach q through q . k
        keys = torch.is_grad_enabled() and q.requires_grad
        if background:
            retrieved = search_pool().submit(self._retrieve, stack, q.detach(), keys)
        else:
            retrieved = Future()
            retrieved.set_result(self._retrieve(stack, q.detach(), keys))
        return Pending(lead=tuple(x.shape[:-1]), q=q, retrieved=retrieved)

    def finish(self, pending: "Pending") -> torch.Tensor:
        """The attention output (B, T, F) for a `start`ed search."""
        out = self.attend(pending.q, pending.retrieved.result())  # (N, H, dv)
        c = self.config
        return self.project(out.reshape(*pending.lead, c.num_heads * c.value_dim))  # (B, T, F)

    def read(self, q: torch.Tensor, row_banks: RowBanks | None = None) -> torch.Tensor:
        """The memory readout (N, H, dv) of unit queries q (N, H, dk): per head, the
        softmax-weighted values of the top-k, before out_proj and gate."""
        stack = self._stack(q.shape[0], 1, row_banks)    # row_banks[n]: q[n]
        keys = torch.is_grad_enabled() and q.requires_grad
        return self.attend(q, self._retrieve(stack, q.detach(), keys))

    def attend(self, q: torch.Tensor, r: Retrieved) -> torch.Tensor:
        """Per-head attention (N, H, dv) over retrieved results, for queries q (N, H, dk)."""
        weights = masked_softmax(self.memory_logits(q, r), r.mask)   # (N, H, k)
        return torch.einsum("nhk,nhkv->nhv", weights, self.gather_values(r))  # (N, H, dv)

    def memory_logits(self, q: torch.Tensor, r: Retrieved) -> torch.Tensor:
        """scale_h * q . k (N, H, k) of the retrieved keys (masked entries arbitrary)."""
        qk = (torch.einsum("nhd,nhkd->nhk", q, r.keys) if r.keys is not None
              else r.qk)                                          # (N, H, k)
        return self.scale[:, None] * qk                           # (N, H, k)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """(..., H*dv) -> [out_proj] -> [tanh(gate) *] (..., F)."""
        if self.out_proj is not None:
            out = self.out_proj(out)                              # (..., out_dim)
        if self.gate is not None:
            out = torch.tanh(self.gate) * out                     # (..., F)
        return out

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Unit queries (N, H, dk) of inputs (N, input_dim)."""
        c = self.config
        q = self.q_proj(x).view(-1, c.num_heads, c.key_dim)       # (N, H, dk)
        return F.normalize(q, dim=-1, eps=c.eps)                  # (N, H, dk)

    def _stack(self, batch: int, positions: int, row_banks: RowBanks | None) -> "Stack":
        """The search's banks for `batch` rows of `positions` inputs each: the
        shared stack, or per-row stacks [*shared, *row_banks[b]] for row b."""
        shared = self.config.banks
        if row_banks is None:
            if not shared:
                raise ValueError("this KNNAttention has no banks: bind(banks=...) or pass row_banks")
            return Stack(shared, None)
        if isinstance(row_banks, (str, BankQuery)) or len(row_banks) != batch:
            raise ValueError(f"row_banks needs one bank (or stack) per batch row: {batch}; "
                             f"got {row_banks!r}")
        per_row = tuple(tuple([r] if isinstance(r, (str, BankQuery)) else r) for r in row_banks)
        key = (shared, per_row, positions)
        if self._row_stack is not None and self._row_stack[0] == key:
            return self._row_stack[1]      # a decode loop names the same sessions every step
        rows = positions * self.config.num_heads                  # query rows per batch row
        stack = Stack(shared, RowStacks(stacks=[shared + tuple(map(as_query, r)) for r in per_row],
                                        rows=[rows] * len(per_row)))
        self._row_stack = (key, stack)     # (validating B stacks costs ~10 us a row)
        return stack

    def _retrieve(self, stack: "Stack", q: torch.Tensor, keys: bool) -> Retrieved:
        """One memory.search for all N*H queries q (N, H, dk) (knnlayer.retrieval.retrieve):
        with key vectors when keys, else with q . k read off the scores."""
        c = self.config
        tables = {i: c.value_tables[b.name] for i, b in enumerate(c.banks)
                  if b.name in c.value_tables and b.include}
        all_tabled = stack.rows is None and len(tables) == sum(b.include for b in c.banks)
        return retrieve(self._memory(), stack.rows or list(stack.shared),
                        lambda: self._bank_facts(stack.row_names()), q, c.topk, c.value_dim,
                        keys=keys, values=not all_tabled, tables=tables, dtype=self._dtype())

    def retrieve(self, q: torch.Tensor, keys: bool = True) -> Retrieved:
        """The shared stack's top-k for queries q (N, H, dk) (see `_retrieve`)."""
        return self._retrieve(self._stack(q.shape[0], 1, None), q, keys)

    def gather_values(self, r: Retrieved) -> torch.Tensor:
        """Values (N, H, k, dv) of the retrieved rows: each table's (trainable) or memory's."""
        c = self.config
        out = r.values                                            # (N, H, k, dv) or None
        for pos, b in enumerate(c.banks):
            if b.name not in c.value_tables or not b.include:
                continue
            table = self.value_table(b.name)
            mine = r.bank == pos                                  # (N, H, k)
            rows = torch.where(mine, r.ids, torch.zeros_like(r.ids))             # (N, H, k)
            vals = F.embedding(rows, table.weight, sparse=table.sparse)          # (N, H, k, dv)
            if out is None:
                out = torch.zeros_like(vals)
            out = torch.where(mine[..., None], vals, out.to(vals.dtype))         # (N, H, k, dv)
        return out

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
        flat = x.reshape(-1, c.input_dim)                                      # (B*T, D)
        keys = F.normalize(self.key_proj(flat), dim=-1, eps=c.eps)             # (B*T, dk)
        return self._write(bank, keys, self.value_proj(flat), x.shape[:-1])

    def _write(self, bank: str, keys: torch.Tensor, values: torch.Tensor,
               lead: Sequence[int]) -> np.ndarray:
        ids = self._memory().add(bank, keys.detach().float().cpu(),
                                 values.detach().float().cpu())                # (n,)
        return np.asarray(ids).reshape(tuple(lead))

    # ---- base banks and trainable values (knnlayer.bank_tools) ----------------------
    create_base_bank = staticmethod(bank_tools.create_base_bank)

    def value_table(self, bank: str | None = None) -> nn.Embedding:
        """The trainable table backing `bank` (default: the first bank that has one)."""
        tables = self.config.value_tables
        if bank is None:
            bank = next((b for b in self.banks if b in tables), next(iter(tables), None))
        if bank is None or bank not in tables:
            raise KeyError(f"no trainable value table backs bank {bank!r}; tables: {list(tables)}")
        return self.value_tables[table_key(bank)]

    def add_value_table(self, bank: str, rows: int) -> nn.Embedding:
        """A new trainable table of `rows` zero rows backing `bank` (fill it with
        load_values(bank=...)); it lands on this module's device and dtype."""
        if bank in self.config.value_tables:
            raise ValueError(f"bank '{bank}' already has a value table")
        tables = {**self.config.value_tables, bank: rows}
        self.config = replace(self.config, value_tables=tables, trainable_values=0)
        w = self.q_proj.weight
        table = nn.Embedding(rows, self.config.value_dim, sparse=self.config.sparse_values)
        nn.init.zeros_(table.weight)
        self.value_tables[table_key(bank)] = table.to(w.device, w.dtype)
        self._facts.clear()
        return self.value_tables[table_key(bank)]

    def push_values(self, memory: MemoryBackend | None = None, bank: str | None = None) -> int:
        """Write the trained table of `bank` into that bank; returns rows updated."""
        table = self.value_table(bank)
        return bank_tools.push_values(memory or self._memory(), bank or self._table_bank(table),
                                      table.weight)

    def load_values(self, memory: MemoryBackend | None = None, bank: str | None = None) -> None:
        """Copy the values of ids 0..ntotal-1 of `bank` into its table."""
        table = self.value_table(bank)
        bank_tools.load_values(memory or self._memory(), bank or self._table_bank(table),
                               table.weight)

    def _table_bank(self, table: nn.Embedding) -> str:
        return next(b for b in self.config.value_tables
                    if self.value_tables[table_key(b)] is table)

    def extra_repr(self) -> str:
        c = self.config
        return (f"heads={c.num_heads}, key_dim={c.key_dim}, value_dim={c.value_dim}, topk={c.topk}, "
                f"banks={self.banks}, tables={c.value_tables or None}, gate={c.gate}")


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
