"""MemorizingAttention: causal attention over the segment and top-k attention
over memory, in one layer (Memorizing Transformers, Wu et al. 2022).

    m = MemorizingAttention(input_dim=256, key_dim=64, value_dim=64, num_heads=4, topk=32,
                            out_dim=256, gate=True, memory=mem)
    y = m(x, row_banks=sids)     # x (B, T, 256): row b reads its own session bank sids[b]
    m.remember(row_banks=sids)   # and writes the keys/values this forward attended to

Per head h, for the position t of row b (one shared key/value head, H query
heads, as lucidrains' memorizing transformer: one key/value per position is
what memory holds, and every head reads it):
    q_h   = normalize(W_q x_t)_h                   (dk,)
    k_s   = normalize(W_k x_s), v_s = W_v x_s      local keys/values, s <= t
    mem   = top-k of q_h over the banks            (ids, keys, values) from ONE search
    a     = softmax([scale_h q_h . k_j for j in mem] ++ [scale_h q_h . k_s for s <= t])
    o_h   = sum_j a_j v_j + sum_s a_s v_s
    y     = concat_h o_h [-> out_proj] [-> tanh(gate) * y]

Why one softmax (combine="softmax", the default) rather than MemTRM's learned
gate between two softmaxes: a retrieved key competes with the local keys on
the same scale, so the model weighs each memory by its own relevance instead
of trusting memory per head whatever was found; with no memory results the
layer is exactly causal attention (the local terms take all the weight), and
a memory full of distractors costs only the weight they win. MemTRM's gate is
kept as combine="gate": o = sigmoid(g_h) o_mem + (1 - sigmoid(g_h)) o_local
(g zero-initialised; a position with no memory result takes o_local alone).

The write path is the read path: `remember` stores the keys/values the last
forward's local attention used (k_s, v_s), so the local path's loss trains
W_k and W_v, which write the memories. The memory side carries no gradient
(its keys/values are constants, as in MemTRM); the queries and scale do get
one through q . k of the retrieved keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knnlayer.attention import KNNAttention, KNNAttentionConfig, RowBanks, masked_softmax
from knnlayer.retrieval import search_pool
from memoryd.api import MemoryBackend

COMBINES = ("softmax", "gate")


@dataclass
class MemorizingConfig(KNNAttentionConfig):
    combine: str = "softmax"            # "softmax": one over [retrieved; local]; "gate": MemTRM's

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}; got {self.combine!r}")


class MemorizingAttention(KNNAttention):
    """Causal local attention and kNN memory attention, combined in one layer."""

    config_class = MemorizingConfig

    def __init__(self, config: MemorizingConfig | None = None, *,
                 memory: MemoryBackend | None = None, **kwargs: Any):
        super().__init__(config, memory=memory, **kwargs)
        H = self.config.num_heads
        self.mix = nn.Parameter(torch.zeros(H)) if self.config.combine == "gate" else None  # (H,)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None   # (B, T, dk), (B, T, dv)

    def forward(self, x: torch.Tensor, row_banks: RowBanks | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, F): position t attends to positions <= t of its row
        and to the top-k of the shared banks plus row_banks[b] (ONE memory search)."""
        c = self.config
        if x.dim() != 3:
            raise ValueError(f"MemorizingAttention takes x of shape (B, T, D); got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, dk, dv = c.num_heads, c.key_dim, c.value_dim
        q = self.queries(x.reshape(B * T, -1))                    # (B*T, H, dk)
        k_loc = F.normalize(self.key_proj(x), dim=-1, eps=c.eps)  # (B, T, dk)
        v_loc = self.value_proj(x)                                # (B, T, dv)
        self._last = (k_loc.detach(), v_loc.detach())
        pending = None
        if B * T and (c.banks or row_banks is not None):         # memory works meanwhile
            stack = self._stack(B, T, row_banks)
            keys = torch.is_grad_enabled() and q.requires_grad
            pending = search_pool().submit(self._retrieve, stack, q.detach(), keys)
        qh = q.view(B, T, H, dk)                                  # (B, T, H, dk)
        local = torch.einsum("bthd,bsd->bhts", qh, k_loc) * self.scale[:, None, None]  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()   # (T, T)
        causal = causal.expand(B, H, T, T)                        # (B, H, T, T)
        if pending is None:
            w = masked_softmax(local, causal)                     # (B, H, T, T)
            out = torch.einsum("bhts,bsv->bthv", w, v_loc)        # (B, T, H, dv)
        else:
            out = self._with_memory(pending.result(), q, local, causal, v_loc, B, T)
        return self.project(out.reshape(B, T, H * dv))            # (B, T, F)

    def _with_memory(self, r, q, local, causal, v_loc, B: int, T: int) -> torch.Tensor:
        """(B, T, H, dv): local logits (B, H, T, T) combined with the retrieved r."""
        H, dv, k = self.config.num_heads, self.config.value_dim, self.config.topk
        mem = self.memory_logits(q, r).view(B, T, H, k).permute(0, 2, 1, 3)  # (B, H, T, k)
        mmask = r.mask.view(B, T, H, k).permute(0, 2, 1, 3)                   # (B, H, T, k)
        mvals = self.gather_values(r).view(B, T, H, k, dv)                    # (B, T, H, k, dv)
        if self.mix is None:                                      # one softmax over both
            w = masked_softmax(torch.cat([mem, local], -1), torch.cat([mmask, causal], -1))
            return (torch.einsum("bhtk,bthkv->bthv", w[..., :k], mvals)
                    + torch.einsum("bhts,bsv->bthv", w[..., k:], v_loc))      # (B, T, H, dv)
        o_mem = torch.einsum("bhtk,bthkv->bthv", masked_softmax(mem, mmask), mvals)
        o_loc = torch.einsum("bhts,bsv->bthv", masked_softmax(local, causal), v_loc)
        g = torch.sigmoid(self.mix)[:, None]                      # (H, 1)
        found = mmask.any(-1).permute(0, 2, 1)[..., None]         # (B, T, H, 1)
        return torch.where(found, g * o_mem + (1 - g) * o_loc, o_loc)   # (B, T, H, dv)

    # ---- write path ---------------------------------------------------------------
    @torch.no_grad()
    def remember(self, x: torch.Tensor | None = None, bank: str | None = None, *,
                 row_banks: Sequence[str] | None = None) -> np.ndarray:
        """Append the last forward's local keys/values (the ones its attention used),
        one row per position: all to `bank`, or row b's to row_banks[b] (one add
        per row). Given x, its keys/values are computed instead (the same
        projections). Returns the new ids (B, T)."""
        if x is not None:
            c = self.config
            k_loc = F.normalize(self.key_proj(x), dim=-1, eps=c.eps)          # (B, T, dk)
            kv = (k_loc, self.value_proj(x))
        elif self._last is not None:
            kv = self._last
        else:
            raise RuntimeError("remember() needs x, or a forward before it")
        keys, values = kv                                                     # (B, T, dk/dv)
        if (bank is None) == (row_banks is None):
            raise ValueError("remember() takes either bank= or row_banks=")
        if bank is not None:
            return self._write(bank, keys.reshape(-1, keys.shape[-1]),
                               values.reshape(-1, values.shape[-1]), keys.shape[:-1])
        if isinstance(row_banks, str) or len(row_banks) != keys.shape[0]:
            raise ValueError(f"row_banks needs one bank per batch row: {keys.shape[0]}; "
                             f"got {row_banks!r}")
        return np.stack([self._write(b, keys[i], values[i], keys.shape[1:2])
                         for i, b in enumerate(row_banks)])                   # (B, T)
