"""The memory workflow end to end, on a tiny byte-level model, through a real
daemon (a few seconds on 2 cores; experiments/memory_lm is the full-size,
measured version of the same steps):

1. pre-train a model whose knowledge layer reads a product-key base bank
   (its values a trainable table in the model), push the values into the
   daemon, freeze the bank, print its checksum;
2. fine-tune for a domain: `memctl bank create sympy --kind domain ...`, keys
   from the model's own queries on domain text (k-means), values initialised
   to the layer's readout there, then train ONLY that bank's values, with base
   and every dense weight frozen; push; the base bank is byte-identical;
3. inference with sessions: one session per document (per batch row), read
   and written by a local+memory layer (MemorizingAttention) in one request
   per forward; later segments read what earlier ones wrote, far outside the
   64-byte context; the sessions are then promoted into a long-term bank.

    python examples/memory_workflow.py [--steps 60]
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knnlayer import (BankQuery, BankSpec, KNNAttention, MemorizingAttention, MemoryClient,
                      SessionSpec, create_base_bank, data_keys, key_version, readout_values)
from memoryd.daemon.server import spawn

T, D, DK, DV, HEADS = 64, 64, 32, 32, 2
BASE_ROWS, DOMAIN_ROWS = 32 ** 2, 256


class TinyLM(nn.Module):
    """Bytes -> [episodic: local + session memory] -> [MLP + knowledge memory] -> bytes."""

    def __init__(self, mem: MemoryClient):
        super().__init__()
        self.emb, self.pos = nn.Embedding(256, D), nn.Embedding(T, D)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.episodic = MemorizingAttention(input_dim=D, key_dim=DK, value_dim=DV,
                                            num_heads=HEADS, topk=8, out_dim=D,
                                            memory=mem, banks=["notes"])
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.knowledge = KNNAttention(input_dim=D, key_dim=DK, value_dim=DV, num_heads=HEADS,
                                      topk=8, out_dim=D, memory=mem, banks=["base"],
                                      value_tables={"base": BASE_ROWS})
        self.head = nn.Linear(D, 256)

    def forward(self, idx: torch.Tensor, sessions: list[str] | None = None) -> torch.Tensor:
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))             # (B, T, D)
        x = x + self.episodic(self.ln1(x), row_banks=sessions)                # (B, T, D)
        h = self.ln2(x)                                                       # knowledge input
        x = x + self.mlp(h) + self.knowledge(h)                               # (B, T, D)
        return self.head(self.lnf(x))                                         # (B, T, 256)

    def knowledge_inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """What the knowledge layer reads for idx (B, T): (B, T, D)."""
        seen = []
        hook = self.knowledge.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            self(idx)
        finally:
            hook.remove()
        return seen[0]


def corpus(root: Path, limit: int) -> bytes:
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts)
    return b"".join(p.read_bytes() for p in files)[:limit]


def batches(data: bytes, n: int, B: int, seed: int):
    rng = np.random.default_rng(seed)
    arr = np.frombuffer(data, np.uint8)
    for _ in range(n):
        starts = rng.integers(0, len(arr) - T - 1, B)
        w = torch.from_numpy(np.stack([arr[s:s + T + 1] for s in starts]).astype(np.int64))
        yield w[:, :-1], w[:, 1:]                                              # (B, T) each


def bpb(model: TinyLM, data: bytes, n: int = 8) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                  for x, y in batches(data, n, 8, seed=123)]
    return float(np.mean(losses)) / math.log(2)


def train(model: TinyLM, data: bytes, steps: int, dense: list, sparse: list, lr: float) -> None:
    opts = ([torch.optim.AdamW(dense, lr=lr)] if dense else []) + \
           ([torch.optim.SparseAdam(sparse, lr=lr)] if sparse else [])
    for x, y in batches(data, steps, 8, seed=len(data)):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()


def digest(mem: MemoryClient, bank: str) -> str:
    """sha256 of a bank's exported ids, keys and values: byte identity."""
    h = hashlib.sha256()
    for c in mem.export(bank):
        for a in (c.ids, c.keys, c.values):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def memctl(address: str, *args: str) -> None:
    print("$ memctl " + " ".join(args))
    out = subprocess.run([sys.executable, "-m", "memctl.cli", "--address", address, *args],
                         capture_output=True, text=True, check=True).stdout
    print("  " + out.strip().replace("\n", "\n  "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps of phases 1 and 2")
    ap.add_argument("--segments", type=int, default=12, help="64-byte segments per document")
    args = ap.parse_args()
    torch.manual_seed(0)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    import sympy
    base_text = corpus(stdlib / "json", 400_000) + corpus(stdlib / "email", 400_000)
    domain_text = corpus(Path(sympy.__file__).parent / "core", 400_000)
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = spawn(Path(tmp) / "data")
        try:
            mem = MemoryClient(address)
            run(mem, address, base_text, domain_text, stdlib, args.steps, args.segments)
            mem.close()
        finally:
            proc.terminate()
            proc.wait(60)


def run(mem, address, base_text, domain_text, stdlib, steps, segments) -> None:
    print("== 1. pre-train with a product-key base bank")
    create_base_bank(mem, "base", BASE_ROWS, DK, DV, index="product-keys", seed=0)
    mem.create_bank(BankSpec(name="notes", dim=DK, value_dim=DV, kind="domain"))
    model = TinyLM(mem)
    model.knowledge.load_values(bank="base")
    table = model.knowledge.value_table("base").weight
    dense = [p for p in model.parameters() if p is not table]
    train(model, base_text, steps, dense, [table], lr=3e-3)
    model.knowledge.push_values(bank="base")
    info = mem.freeze_bank("base")
    base_digest = digest(mem, "base")
    print(f"base bank frozen: checksum {info.checksum}; export sha256 {base_digest}")
    before = {"base": bpb(model, base_text), "domain": bpb(model, domain_text)}
    print(f"bpb after pre-training: base text {before['base']:.3f}, domain text "
          f"{before['domain']:.3f}")

    print("== 2. fine-tune a domain bank; base and every dense weight frozen")
    attn = model.knowledge
    memctl(address, "bank", "create", "sympy", "--kind", "domain", "--dim", str(DK),
           "--value-dim", str(DV), "--key-version", key_version(attn), "--quota", "1MB")
    x, _ = next(batches(domain_text, 1, 64, seed=7))                          # (64, T)
    with torch.no_grad():
        h = model.knowledge_inputs(x)                                         # (64, T, D)
        keys = data_keys(attn.queries(h.reshape(-1, D)), DOMAIN_ROWS, seed=0)   # (n, dk)
        values = readout_values(attn, keys)                                   # (n, dv)
    mem.add("sympy", keys, values, ids=np.arange(DOMAIN_ROWS))
    memctl(address, "bank", "show", "sympy")
    attn.add_value_table("sympy", DOMAIN_ROWS)
    attn.load_values(bank="sympy")
    attn.bind(banks=[BankQuery("sympy", k=4), "base"])
    for p in model.parameters():
        p.requires_grad_(False)
    dom = attn.value_table("sympy").weight.requires_grad_(True)
    train(model, domain_text, steps, [], [dom], lr=1e-2)
    attn.push_values(bank="sympy")
    after = {"base": bpb(model, base_text), "domain": bpb(model, domain_text)}
    same = digest(mem, "base") == base_digest
    print(f"bpb with the domain bank stacked: base text {after['base']:.3f} "
          f"({after['base'] - before['base']:+.3f}), domain text {after['domain']:.3f} "
          f"({after['domain'] - before['domain']:+.3f}); base bank byte-identical: {same}")
    if not same:
        raise SystemExit("the frozen base bank changed")

    print("== 3. inference with one session per document")
    docs = [p.read_bytes()[:T * (segments + 1)] for p in sorted((stdlib / "test").glob("test_*.py"))[:2]]
    sids = [mem.open_session(SessionSpec(dim=DK, value_dim=DV, quota_bytes=2 ** 20,
                                         eviction="fifo")).session_id for _ in docs]
    segs = torch.tensor(np.stack([np.frombuffer(d, np.uint8) for d in docs]).astype(np.int64))
    with torch.no_grad():
        for s in range(segs.shape[1] // T - 1):                   # segment s, row b: doc b
            x = segs[:, s * T:(s + 1) * T]                                        # (B, T)
            model(x, sessions=sids)                                               # reads...
            model.episodic.remember(row_banks=sids)                               # ...writes
    rows = [mem.session_info(sid).bank.count for sid in sids]
    print(f"sessions {sids} hold {rows} rows after {segs.shape[1] // T - 1} segments each")
    for sid in sids:
        r = mem.promote_session(sid, "notes", dedup=0.999, move=True)
        print(f"promoted {r.promoted} memories of {sid} into 'notes' ({r.duplicates} duplicates)")
        mem.close_session(sid)
    print(f"'notes' now holds {mem.bank_info('notes').count} rows")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
