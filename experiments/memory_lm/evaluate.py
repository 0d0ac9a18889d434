"""Bits per byte and paired bootstrap confidence intervals.

bpb = summed cross-entropy in nats / ln 2 / bytes scored. Per-window (or
per-document) bits are kept in float64 so deltas can be paired.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def bits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Bits (float64) per leading row: logits (..., T, 256), targets (..., T) -> (...,)."""
    nats = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").view(targets.shape)            # (..., T) float64
    return nats.sum(dim=-1) / LN2


def bpb_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(bits(logits, targets).sum() / targets.numel())


@torch.no_grad()
def window_bits(model, windows: np.ndarray, batch: int) -> np.ndarray:
    """Bits of each window (n,) float64: windows (n, T+1) uint8, scoring targets 1..T."""
    was = model.training
    model.eval()
    out = []
    w = torch.from_numpy(windows.astype(np.int64))
    for s in range(0, len(w), batch):
        chunk = w[s:s + batch]
        out.append(bits(model(chunk[:, :-1]), chunk[:, 1:]).numpy())
    model.train(was)
    return np.concatenate(out)


def bpb(bits_: np.ndarray, nbytes: int) -> float:
    return float(np.sum(bits_) / nbytes)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, unit_bytes: np.ndarray | int,
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """bpb(b) - bpb(a) over paired units (windows / documents) and its 95 % CI.

    Units are resampled with replacement; the statistic is the byte-weighted
    delta sum(b - a) / sum(bytes) of each resample.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nb = np.broadcast_to(np.asarray(unit_bytes, np.float64), a.shape)
    delta = float((b - a).sum() / nb.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    stats = (b - a)[idx].sum(axis=1) / nb[idx].sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"delta": delta, "lo": float(lo), "hi": float(hi), "units": int(len(a))}
