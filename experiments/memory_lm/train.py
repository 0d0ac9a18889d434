"""The training phases: P (pretrain with the base bank), the four fine-tune arms, S (episodic).

    pretrain(model, buf, cfg)                          phase P
    make_arm(name, p_model, memory, dom_buf, cfg)      -> Arm (model, optimisers, what trains)
    finetune(arm, cfg, dom_buf, evaluate_fn)           200 steps on SymPy, evals along the way
    train_session(model, memory, streams, cfg)         phase S: only the episodic module trains
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from knnlayer.bank_tools import create_base_bank
from knnlayer.domain import create_domain_bank, data_keys, key_version, readout_values
from memoryd.api import SessionSpec
from memoryd.keyspace import key_vectors, subkeys_of

from experiments.memory_lm import lora
from experiments.memory_lm.data import random_windows
from experiments.memory_lm.model import GPT, clone


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _is_table(name: str) -> bool:
    return ".value_tables." in name


# ---- phase P ----------------------------------------------------------------------

def pretrain(model: GPT, buf: np.ndarray, cfg, log=print) -> dict:
    rng = np.random.default_rng(cfg.seed)
    dense = [(n, p) for n, p in model.named_parameters() if not _is_table(n)]
    decay = [p for n, p in dense if p.dim() >= 2]
    other = [p for n, p in dense if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.p_wd},
                             {"params": other, "weight_decay": 0.0}],
                            lr=cfg.p_lr, betas=(0.9, 0.95))
    table = model.knowledge.value_table("base")
    sopt = torch.optim.SparseAdam([table.weight], lr=cfg.p_table_lr)
    losses, t0 = [], time.perf_counter()
    model.train()
    for step in range(cfg.p_steps):
        lr = cosine_lr(step, cfg.p_steps, cfg.p_lr, cfg.p_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = random_windows(buf, cfg.batch, cfg.model.T, rng)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        sopt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in dense], 1.0)
        opt.step()
        sopt.step()
        losses.append(loss.item())
        if step % max(1, cfg.p_steps // 10) == 0 or step == cfg.p_steps - 1:
            log(f"  P step {step:5d}  loss {losses[-1] / math.log(2):.3f} bpb  lr {lr:.2e}  "
                f"{time.perf_counter() - t0:.0f} s")
    return {"steps": cfg.p_steps, "seconds": time.perf_counter() - t0,
            "train_bpb_last50": float(np.mean(losses[-50:]) / math.log(2)),
            **({} if model.knowledge.gate is None else {
                "gate_norm": float(model.knowledge.gate.detach().norm()),
                "gate_abs_mean": float(model.knowledge.gate.detach().abs().mean())})}


@torch.no_grad()
def knowledge_inputs(model: GPT, x: torch.Tensor) -> torch.Tensor:
    """What the knowledge layer reads (B, T, d): ln2 of its block's residual [-> query norm]."""
    c = model.cfg
    h = model.hidden(x, c.know_layer)
    blk = model.blocks[c.know_layer]
    a = blk.attn(blk.ln1(h))
    if blk.episodic is not None:
        a = a + blk.episodic(blk.ln1(h))
    return blk.knowledge_input(blk.ln2(h + a))


@torch.no_grad()
def knowledge_queries(model: GPT, windows: torch.Tensor, batch: int) -> torch.Tensor:
    """The knowledge layer's unit queries (N, H, dk) on windows (n, T) (no search needed)."""
    out = []
    for s in range(0, len(windows), batch):
        h2 = knowledge_inputs(model, windows[s:s + batch])
        out.append(model.knowledge.queries(h2.reshape(-1, model.cfg.d)))
    return torch.cat(out)


@torch.no_grad()
def slot_coverage(model: GPT, windows: np.ndarray, batch: int) -> dict:
    """Fraction of the base bank's slots in any top-k on these windows."""
    w = torch.from_numpy(windows[:, :-1].astype(np.int64))
    hit = np.zeros(model.cfg.base_slots, bool)
    for s in range(0, len(w), batch):
        q = knowledge_queries(model, w[s:s + batch], batch)
        r = model.knowledge.retrieve(q, keys=False)
        ids = r.ids[r.mask].numpy()
        hit[ids] = True
    return {"slots_hit": int(hit.sum()), "fraction": float(hit.mean())}


# ---- fine-tune arms -----------------------------------------------------------------

@dataclass
class Arm:
    name: str
    model: GPT
    optimizers: list
    trainable: int
    notes: str = ""
    domain_bank: str | None = None
    touched: set = field(default_factory=set)      # domain table rows with a gradient
    setup_seconds: float = 0.0


def _domain_arm(name: str, p_model: GPT, memory, keys: np.ndarray | None, cfg, bank: str) -> Arm:
    """A domain bank stacked before base, values = the P model's readout at its keys.

    keys None: a product-key bank of domain_slots seeded random keys (kind domain), whose
    keys are known from its spec (memoryd.keyspace); else a faiss bank (cfg.domain_index)
    holding `keys`, made by knnlayer.domain.create_domain_bank."""
    attn_p = p_model.knowledge
    c = cfg.model
    if keys is None:
        n = math.isqrt(cfg.domain_slots)
        index = f"product-keys:{n}|seed={cfg.domain_seed}"
        keys = key_vectors(subkeys_of(index, c.know_dk), np.arange(cfg.domain_slots))
        values = readout_values(attn_p, keys)                # function-preserving init
        create_base_bank(memory, bank, cfg.domain_slots, c.know_dk, c.know_dv, index=index,
                         kind="domain", values=values)
    else:
        values = readout_values(attn_p, keys)                # function-preserving init
        create_domain_bank(memory, bank, keys, values, value_dim=c.know_dv,
                           index=cfg.domain_index, key_version=key_version(attn_p))
    m = clone(p_model, memory)
    for p in m.parameters():
        p.requires_grad_(False)
    attn = m.knowledge
    attn.bind(banks=[bank, "base"])                          # stacked: domain first
    table = attn.add_value_table(bank, cfg.domain_slots)
    attn.load_values(bank=bank)                              # the table starts as the bank
    table.weight.requires_grad_(True)
    arm = Arm(name, m, [torch.optim.SparseAdam([table.weight], lr=cfg.lr_domain)],
              trainable=table.weight.numel(), domain_bank=bank)
    table.weight.register_hook(lambda g: arm.touched.update(
        g.coalesce().indices()[0].tolist()) if g.is_sparse else None)
    return arm


def make_arm(name: str, p_model: GPT, memory, dom_buf: np.ndarray, cfg) -> Arm:
    t0 = time.perf_counter()
    if name == "dense":
        m = clone(p_model, memory)
        dense = [p for n, p in m.named_parameters() if not _is_table(n)]
        table = m.knowledge.value_table("base")
        table.weight.requires_grad_(True)
        arm = Arm(name, m, [torch.optim.AdamW(dense, lr=cfg.lr_dense, betas=(0.9, 0.95),
                                              weight_decay=0.0),
                            torch.optim.SparseAdam([table.weight], lr=cfg.lr_dense_table)],
                  trainable=sum(p.numel() for p in dense) + table.weight.numel(),
                  notes="all dense params + a module copy of the base value table (the bank stays frozen)")
    elif name == "lora":
        m = clone(p_model, memory)
        params = lora.add_lora(m, cfg.lora_r, cfg.lora_alpha)
        arm = Arm(name, m, [torch.optim.AdamW(params, lr=cfg.lr_lora, weight_decay=0.0)],
                  trainable=sum(p.numel() for p in params),
                  notes=f"r={cfg.lora_r}, alpha={cfg.lora_alpha} on qkv/o/fc1/fc2 of every block")
    elif name == "domain_random":
        arm = _domain_arm(name, p_model, memory, None, cfg, "domain-random")
        arm.notes = (f"product-key bank of {cfg.domain_slots} = {math.isqrt(cfg.domain_slots)}^2 "
                     f"seeded random keys (seed {cfg.domain_seed})")
    elif name == "domain_data":
        rng = np.random.default_rng(cfg.seed + 7)
        T = cfg.model.T
        n_pos = -(-cfg.kmeans_queries // cfg.model.know_heads)
        x, _ = random_windows(dom_buf, max(1, -(-n_pos // T)), T, rng)
        q = knowledge_queries(p_model, x, cfg.eval_batch)                  # (N, H, dk)
        q = q.reshape(-1, q.shape[-1])[:cfg.kmeans_queries]
        tk = time.perf_counter()
        keys = data_keys(q, cfg.domain_slots, iters=cfg.kmeans_iters, seed=cfg.domain_seed)
        arm = _domain_arm(name, p_model, memory, keys, cfg, "domain-data")
        arm.notes = (f"{cfg.domain_index} bank of {cfg.domain_slots} spherical k-means centroids of {len(q)} "
                     f"knowledge-layer queries on SymPy train ({cfg.kmeans_iters} iters, "
                     f"{time.perf_counter() - tk:.1f} s)")
    else:
        raise ValueError(f"unknown arm {name!r}")
    arm.setup_seconds = time.perf_counter() - t0
    return arm


def finetune(arm: Arm, dom_buf: np.ndarray, cfg, on_eval, log=print) -> dict:
    """Train arm on SymPy windows; on_eval(step, model) at each cfg.ft_evals step."""
    rng = np.random.default_rng(cfg.seed + 1)                 # same batches for every arm
    m = arm.model
    evals = set(cfg.ft_evals)
    t_train = 0.0
    m.train()
    for step in range(cfg.ft_steps + 1):
        if step in evals:
            on_eval(step, m)
            m.train()
        if step == cfg.ft_steps:
            break
        t0 = time.perf_counter()
        x, y = random_windows(dom_buf, cfg.batch, cfg.model.T, rng)
        loss = lm_loss(m(x), y)
        for o in arm.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in arm.optimizers:
            o.step()
        t_train += time.perf_counter() - t0
    log(f"  {arm.name}: {cfg.ft_steps} steps in {t_train:.0f} s "
        f"({t_train / max(1, cfg.ft_steps):.2f} s/step)")
    return {"train_seconds": t_train}


# ---- phase S ------------------------------------------------------------------------

def session_quota(memory, dim: int, value_dim: int, rows: int) -> int:
    """quota_bytes of a FIFO session that holds exactly `rows` rows (probed on a scratch session)."""
    s = memory.open_session(SessionSpec(dim=dim, value_dim=value_dim))
    try:
        k = np.zeros((2, dim), np.float32)
        k[:, 0] = 1.0
        v = np.zeros((2, value_dim), np.float32)
        memory.append(s.session_id, k[:1], v[:1])
        u1 = memory.session_info(s.session_id).bank.used_bytes
        memory.append(s.session_id, k[1:], v[1:])
        u2 = memory.session_info(s.session_id).bank.used_bytes
    finally:
        memory.close_session(s.session_id)
    row = u2 - u1
    return (u1 - row) + rows * row


def open_fifo(memory, cfg, quota: int) -> str:
    c = cfg.model
    return memory.open_session(SessionSpec(dim=c.epi_dk, value_dim=c.epi_dv, quota_bytes=quota,
                                           eviction="fifo")).session_id


def train_session(model: GPT, memory, streams: list[tuple[str, np.ndarray]], cfg, log=print) -> dict:
    """Phase S: B document streams, one session per row (cleared at each file's end)."""
    c = cfg.model
    for p in model.parameters():
        p.requires_grad_(False)
    epi = model.add_episodic(memory)
    params = [p for p in epi.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.s_lr, weight_decay=0.0)
    quota = session_quota(memory, c.epi_dk, c.epi_dv, cfg.s_fifo_rows)
    rng = np.random.default_rng(cfg.seed + 2)
    order = list(rng.permutation(len(streams)))
    B, T = cfg.batch, c.T
    cursor = [[order.pop(), 0] for _ in range(B)]           # (file index, position) per row
    sids = [open_fifo(memory, cfg, quota) for _ in range(B)]
    opened, losses, t0 = B, [], time.perf_counter()
    model.train()
    try:
        for step in range(cfg.s_steps):
            xs, ys = [], []
            for b in range(B):
                f, pos = cursor[b]
                if pos + T + 1 > streams[f][1].size:         # file done: next file, fresh memory
                    memory.close_session(sids[b])
                    if not order:
                        order = list(rng.permutation(len(streams)))
                    cursor[b] = [order.pop(), 0]
                    sids[b] = open_fifo(memory, cfg, quota)
                    opened += 1
                    f, pos = cursor[b]
                w = streams[f][1][pos:pos + T + 1].astype(np.int64)
                cursor[b][1] += T
                xs.append(w[:-1])
                ys.append(w[1:])
            x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            with torch.no_grad():
                h = model.hidden(x, c.epi_layer)
            loss = lm_loss(model.forward_from(h, c.epi_layer, row_banks=list(sids)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            epi.remember(row_banks=list(sids))
            losses.append(loss.item())
            if step % max(1, cfg.s_steps // 10) == 0 or step == cfg.s_steps - 1:
                log(f"  S step {step:4d}  loss {losses[-1] / math.log(2):.3f} bpb  "
                    f"{time.perf_counter() - t0:.0f} s")
        rows_now = [memory.session_info(s).bank.count for s in sids]
    finally:
        for s in sids:
            memory.close_session(s)
    return {"steps": cfg.s_steps, "seconds": time.perf_counter() - t0,
            "train_bpb_last50": float(np.mean(losses[-50:]) / math.log(2)),
            "sessions_opened": opened, "fifo_rows": cfg.s_fifo_rows, "quota_bytes": quota,
            "rows_at_end": rows_now, "trainable": sum(p.numel() for p in params),
            "gate_norm": float(epi.gate.detach().norm())}
