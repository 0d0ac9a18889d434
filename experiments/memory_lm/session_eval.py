"""Claim 2: per-session memory written during inference lowers bpb on later spans.

For each held-out long document: prefix = bytes [0, P), eval span = [P, P + S)
in S / T segments. Settings (one FIFO session per document and setting):

    M = 0          no session: the episodic layer attends over its segment only
    M = m > 0      a FIFO session holding the last m prefix rows (the daemon's
                   fifo eviction keeps it at m); each eval segment is scored,
                   then remembered (Transformer-XL-like chunks)
    wrong          the last max(M) prefix rows of ANOTHER document, nothing of
                   its own written (reads only what is not this document)

Every setting scores the same bytes: the span of every document, with the same
local context (the segment). Also reported: the model before phase S (no
episodic layer) on the same bytes.

The episodic layer's input (its block's input) does not depend on session
memory, so the hidden states of prefix and span are computed once per
document (batched), and only the last block runs per setting.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from experiments.memory_lm.evaluate import bits
from experiments.memory_lm.train import open_fifo, session_quota


@torch.no_grad()
def _hidden(model, segs: np.ndarray, upto: int, batch: int) -> torch.Tensor:
    x = torch.from_numpy(segs.astype(np.int64))
    return torch.cat([model.hidden(x[s:s + batch], upto) for s in range(0, len(x), batch)])


@torch.no_grad()
def _fill(blk, bank: str, h: torch.Tensor, batch: int) -> None:
    """remember() the episodic keys/values of segments h (n, T, d) (block inputs) into bank, in order."""
    for s in range(0, len(h), batch):
        blk.episodic.remember(blk.ln1(h[s:s + batch]), bank=bank)   # the keys its local path uses


@torch.no_grad()
def session_eval(model, memory, docs: list[tuple[str, np.ndarray]], cfg, log=print) -> dict:
    c = cfg.model
    T, P, S = c.T, cfg.prefix, cfg.span
    L = c.epi_layer
    epi = model.episodic
    nseg, npre = S // T, P // T
    mems = [m for m in cfg.mems]
    m_max = max(mems)
    settings = [f"M={m}" for m in mems] + [f"wrong(M={m_max})"]
    D = len(docs)
    if D < 2:
        raise ValueError("the wrong-document control needs at least 2 documents")
    blk = model.blocks[L]
    t0 = time.perf_counter()
    quotas = {m: session_quota(memory, c.epi_dk, c.epi_dv, m) for m in mems if m > 0}
    sids = {f"M={m}": [open_fifo(memory, cfg, quotas[m]) for _ in range(D)] for m in mems if m > 0}
    sids[settings[-1]] = [open_fifo(memory, cfg, quotas[m_max]) for _ in range(D)]
    try:
        # span inputs: x_j = doc[P + jT - 1 : P + (j+1)T - 1], targets doc[P + jT : P + (j+1)T]
        span_x = np.stack([[d[P + j * T - 1:P + (j + 1) * T - 1] for j in range(nseg)] for _, d in docs])
        span_y = np.stack([[d[P + j * T:P + (j + 1) * T] for j in range(nseg)] for _, d in docs])
        h_span = _hidden(model, span_x.reshape(-1, T), L, cfg.eval_batch).view(D, nseg, T, c.d)
        # prefix memories: the last m rows of each doc's prefix, into each setting's session
        rows_after_fill = {}
        for i, (_, d) in enumerate(docs):
            pre = d[:P].reshape(npre, T)
            need = -(-m_max // T)
            h_pre = _hidden(model, pre[npre - need:], L, cfg.eval_batch)     # (need, T, d)
            for m in mems:
                if m > 0:
                    _fill(blk, sids[f"M={m}"][i], h_pre[need - (-(-m // T)):], cfg.eval_batch)
            _fill(blk, sids[settings[-1]][(i - 1) % D], h_pre, cfg.eval_batch)  # wrong doc
        for name, ss in sids.items():
            rows_after_fill[name] = [memory.session_info(s).bank.count for s in ss]
        t_fill = time.perf_counter() - t0
        log(f"    prefix memories written: {t_fill:.0f} s")
        # scoring
        y = torch.from_numpy(span_y.astype(np.int64))                       # (D, nseg, T)
        per_doc, digests = {}, {}
        for name in ["no-episodic"] + settings:
            bits_doc = np.zeros(D)
            h = hashlib.sha256()
            saved = blk.episodic
            if name == "no-episodic":
                blk.episodic = None
            try:
                for j in range(nseg):
                    row_banks = None if name in ("no-episodic", "M=0") else list(sids[name])
                    logits = model.forward_from(h_span[:, j], L, row_banks=row_banks)
                    bits_doc += bits(logits, y[:, j]).numpy()
                    h.update(span_y[:, j].tobytes())
                    if row_banks is not None and not name.startswith("wrong"):
                        epi.remember(row_banks=row_banks)
            finally:
                blk.episodic = saved
            per_doc[name] = bits_doc
            digests[name] = h.hexdigest()
            log(f"    {name}: {bits_doc.sum() / (D * nseg * T):.4f} bpb "
                f"[{time.perf_counter() - t0:.0f} s]")
        rows_at_end = {name: [memory.session_info(s).bank.count for s in ss] for name, ss in sids.items()}
    finally:
        for ss in sids.values():
            for s in ss:
                memory.close_session(s)
    nbytes = nseg * T                                                       # per document
    out = {
        "docs": [name for name, _ in docs], "prefix_bytes": P, "span_bytes": S,
        "scored_bytes": int(D * nbytes), "settings": settings,
        "bpb": {k: float(v.sum() / (D * nbytes)) for k, v in per_doc.items()},
        "per_doc_bpb": {k: (v / nbytes).tolist() for k, v in per_doc.items()},
        "scored_sha256": digests,
        "identical_bytes": len(set(digests.values())) == 1,
        "rows_after_fill": rows_after_fill, "rows_at_end": rows_at_end,
        "quota_bytes": quotas,
        "seconds": time.perf_counter() - t0, "fill_seconds": t_fill,
    }
    out["n_boot"] = cfg.n_boot
    log(f"  session eval: {out['seconds']:.0f} s (prefix fill {t_fill:.0f} s)")
    return out
