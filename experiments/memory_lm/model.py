"""A byte-level GPT with the project's two memory layers.

    block i:   x = x + attn(ln1 x) [+ episodic(ln1 x, row_banks)]      episodic: layer `epi_layer`
               x = x + mlp(ln2 x)  [+ knowledge(ln2 x)]                 knowledge: layer `know_layer`

- knowledge layer (claim 1): knnlayer.KNNAttention over the product-key base
  bank with a trainable value table (PKM-style: query BatchNorm on its input,
  no gate), beside the MLP (the memory-layer slot; the MLP stays intact). Its
  search overlaps the MLP (start/finish).
- episodic layer (claim 2): knnlayer.MemorizingAttention beside the attention
  of the last block, zero gate, so adding it leaves the model exactly as it was.
  It attends causally over its segment AND over the top-k of the row's session
  in one softmax; remember() stores the keys/values its local path used.

Both memory layers read inputs that do not depend on session memory
(episodic reads the input of its block; everything before it is
session-free), so a document's prefix memories can be computed in one
batched pass (session_eval).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from knnlayer import KNNAttention, MemorizingAttention

VOCAB = 256


@dataclass
class ModelConfig:
    T: int = 256
    d: int = 256
    L: int = 4
    heads: int = 4
    mlp_mult: int = 4
    # knowledge layer (base bank + domain banks)
    know_layer: int = 2                  # 0-based: "layer 3"
    know_heads: int = 4
    know_dk: int = 64
    know_dv: int = 64
    know_topk: int = 16
    know_gate: bool = False              # trained from scratch with the model: no zero gate (see run.DEVIATIONS)
    know_query_bn: bool = True           # PKM's query BatchNorm, on the knowledge layer's input
    base_slots: int = 256 ** 2           # product keys n^2
    # episodic layer (sessions)
    epi_layer: int = 3                   # 0-based: "layer 4"
    epi_heads: int = 2                   # query heads: each is a session search per position
    epi_dk: int = 64
    epi_dv: int = 64
    epi_topk: int = 32
    epi_combine: str = "softmax"         # MemorizingAttention's: one softmax, or "gate" (MemTRM)

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)                               # (B, T, D) each
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)          # (B, h, T, D/h)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class QueryNorm(nn.BatchNorm1d):
    """PKM's query BatchNorm (no affine) on the knowledge layer's input, (B, T, d) -> (B, T, d).
    After phase P it is frozen: eval mode for good, so no later phase moves its statistics."""

    def __init__(self, d: int):
        super().__init__(d, affine=False)
        self.frozen = False

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, cfg.heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.mlp_mult * d)
        self.fc2 = nn.Linear(cfg.mlp_mult * d, d)
        self.knowledge: KNNAttention | None = None
        self.know_norm: QueryNorm | None = None
        self.episodic: nn.Module | None = None

    def knowledge_input(self, h2: torch.Tensor) -> torch.Tensor:
        return h2 if self.know_norm is None else self.know_norm(h2)

    def forward(self, x: torch.Tensor, row_banks=None) -> torch.Tensor:
        h = self.ln1(x)
        a = self.attn(h)
        if self.episodic is not None:
            a = a + self.episodic(h, row_banks=row_banks)
        x = x + a
        h2 = self.ln2(x)
        pending = (self.knowledge.start(self.knowledge_input(h2))
                   if self.knowledge is not None else None)
        m = self.fc2(F.gelu(self.fc1(h2)))                   # runs while memory searches
        if pending is not None:
            m = m + self.knowledge.finish(pending)
        return x + m


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, memory=None, base_bank: str = "base"):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d)
        self.pos = nn.Embedding(cfg.T, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.L))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.apply(_init)
        if memory is not None:
            self.blocks[cfg.know_layer].knowledge = KNNAttention(
                input_dim=cfg.d, key_dim=cfg.know_dk, value_dim=cfg.know_dv,
                num_heads=cfg.know_heads, topk=cfg.know_topk, out_dim=cfg.d, gate=cfg.know_gate,
                banks=[base_bank], value_tables={base_bank: cfg.base_slots}, memory=memory)
            if cfg.know_query_bn:
                self.blocks[cfg.know_layer].know_norm = QueryNorm(cfg.d)

    @property
    def knowledge(self) -> KNNAttention:
        return self.blocks[self.cfg.know_layer].knowledge

    def freeze_query_norm(self) -> None:
        norm = self.blocks[self.cfg.know_layer].know_norm
        if norm is not None:
            norm.frozen = True
            norm.eval()

    @property
    def episodic(self):
        return self.blocks[self.cfg.epi_layer].episodic

    def add_episodic(self, memory) -> nn.Module:
        """The episodic layer beside the attention of block epi_layer, zero gate."""
        c = self.cfg
        m = MemorizingAttention(input_dim=c.d, key_dim=c.epi_dk, value_dim=c.epi_dv,
                                num_heads=c.epi_heads, topk=c.epi_topk, out_dim=c.d, gate=True,
                                combine=c.epi_combine, memory=memory)
        self.blocks[c.epi_layer].episodic = m
        return m

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        return self.tok(idx) + self.pos(torch.arange(T, device=idx.device))[None]

    def hidden(self, idx: torch.Tensor, upto: int) -> torch.Tensor:
        """The input of block `upto` (B, T, d)."""
        x = self.embed(idx)
        for blk in self.blocks[:upto]:
            x = blk(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x) @ self.tok.weight.T                    # tied output embedding

    def forward_from(self, x: torch.Tensor, start: int, row_banks=None) -> torch.Tensor:
        for i, blk in enumerate(self.blocks[start:], start):
            x = blk(x, row_banks=row_banks if i == self.cfg.epi_layer else None)
        return self.head(x)

    def forward(self, idx: torch.Tensor, row_banks=None) -> torch.Tensor:
        return self.forward_from(self.embed(idx), 0, row_banks)    # (B, T, 256)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


def clone(model: GPT, memory, banks=None) -> GPT:
    """A fresh GPT with model's weights (never deepcopy: the memory client holds a channel)."""
    new = GPT(model.cfg, memory)
    extra = {k: v for k, v in model.knowledge.config.value_tables.items()
             if k not in new.knowledge.config.value_tables}
    if banks is not None or model.knowledge.banks != new.knowledge.banks:
        new.knowledge.bind(banks=banks if banks is not None else model.knowledge.config.banks)
    for bank, rows in extra.items():
        new.knowledge.add_value_table(bank, rows)
    if model.episodic is not None:
        new.add_episodic(memory)
    new.load_state_dict(model.state_dict())
    src = model.blocks[model.cfg.know_layer].know_norm
    if src is not None and src.frozen:
        new.freeze_query_norm()
    return new


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer except value tables (copies)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and ".value_tables." not in k}
