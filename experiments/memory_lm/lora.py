"""LoRA by hand (peft would pull in transformers): y = W x + b + (alpha / r) B A x, B = 0 at init."""
from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("qkv", "o", "fc1", "fc2")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.r, self.scaling = r, alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scaling


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0,
             targets: tuple[str, ...] = TARGETS) -> list[nn.Parameter]:
    """Freeze every parameter of model, wrap the target Linears of every block; the LoRA params."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for blk in model.blocks:
        for owner, name in [(blk.attn, "qkv"), (blk.attn, "o"), (blk, "fc1"), (blk, "fc2")]:
            if name in targets:
                wrapped = LoRALinear(getattr(owner, name), r, alpha)
                setattr(owner, name, wrapped)
                params += [wrapped.A, wrapped.B]
    return params
