"""KNNAttention's configuration, and what a forward's stack is made of.

    KNNAttentionConfig   the typed config: dims, heads, topk, the shared stack
                         (names or BankQuery), value tables per bank, gate
    Stack                one forward's banks: the shared stack + per-row stacks
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from memoryd.api import MAX_K, BankQuery, RowStacks

# row_banks= of a forward: per batch row, one bank (name or BankQuery) or a stack of them
RowBanks = Sequence["str | BankQuery | Sequence[str | BankQuery]"]


@dataclass
class KNNAttentionConfig:
    input_dim: int
    key_dim: int
    value_dim: int
    num_heads: int = 1
    topk: int = 32
    banks: tuple[BankQuery, ...] = ()     # the shared stack read by forward, in this order
    out_dim: int | None = None            # None: no output projection, y is (..., H*value_dim)
    gate: bool = False                    # y = tanh(gate) * out, gate zero-initialised
    learn_scale: bool = True              # per-head scale trainable (else a fixed buffer)
    scale_init: float | None = None       # None: sqrt(key_dim), as the seed
    value_tables: dict[str, int] = field(default_factory=dict)  # bank -> rows of its table
    trainable_values: int = 0             # >0: short for value_tables={banks[0]: this}
    sparse_values: bool = True            # the tables' gradients are sparse (SparseAdam/SGD)
    bias: bool = False                    # bias in the query / output projections
    eps: float = 1e-6                     # L2-normalisation floor

    def __post_init__(self) -> None:
        items = [self.banks] if isinstance(self.banks, (str, BankQuery)) else list(self.banks)
        if not all(isinstance(b, (str, BankQuery)) and (b if isinstance(b, str) else b.name)
                   for b in items):
            raise ValueError(f"banks must be bank names or BankQuery; got {self.banks!r}")
        self.banks = tuple(b if isinstance(b, BankQuery) else BankQuery(b) for b in items)
        for name in ("input_dim", "key_dim", "value_dim", "num_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or not 1 <= self.topk <= MAX_K:
            raise ValueError(f"topk must be an integer in 1..{MAX_K}; got {self.topk!r}")
        names = self.bank_names
        if len(set(names)) != len(names):
            raise ValueError(f"a bank is named twice: {names}")
        for b in self.banks:
            if b.k is not None and not 1 <= b.k <= MAX_K:
                raise ValueError(f"k of bank '{b.name}' must be in 1..{MAX_K}; got {b.k!r}")
        if self.out_dim is not None and self.out_dim < 1:
            raise ValueError(f"out_dim must be positive or None; got {self.out_dim!r}")
        if self.trainable_values < 0:
            raise ValueError(f"trainable_values must be >= 0; got {self.trainable_values!r}")
        tables = dict(self.value_tables)
        if self.trainable_values:
            if not names:
                raise ValueError("trainable_values backs banks[0]: name a bank")
            tables.setdefault(names[0], self.trainable_values)
        for bank, rows in tables.items():
            if not isinstance(bank, str) or not bank:
                raise ValueError(f"value_tables keys must be bank names; got {bank!r}")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ValueError(f"value table of '{bank}' needs a positive row count; got {rows!r}")
        self.value_tables = tables

    @property
    def bank_names(self) -> list[str]:
        return [b.name for b in self.banks]

    @property
    def out_features(self) -> int:
        return self.out_dim if self.out_dim is not None else self.num_heads * self.value_dim


@dataclass(frozen=True)
class Stack:
    """What one forward searches: the shared stack, and per-row stacks if any."""

    shared: tuple[BankQuery, ...]
    rows: RowStacks | None

    def row_names(self) -> list[str]:
        if self.rows is None:
            return []
        shared = {b.name for b in self.shared}
        return [b.name for s in self.rows.stacks for b in s if b.name not in shared]


def table_key(bank: str) -> str:
    """A bank name as an nn.ModuleDict key (no '.'; bank names never hold '%')."""
    return bank.replace(".", "%")


def as_query(b: str | BankQuery) -> BankQuery:
    return b if isinstance(b, BankQuery) else BankQuery(b)


def query_dict(b: BankQuery) -> dict[str, Any]:
    return {"name": b.name, "k": b.k, "bias": b.bias, "include": b.include}
