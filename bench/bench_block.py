"""Training-step time of one transformer block with the memory layers vs without.

One pre-LN block (d=256, 4 heads, T=256, B=8: 2,048 tokens per step, the
shape of experiments/memory_lm), forward + backward + optimiser step, timed
in interleaved rounds (one step of each variant per round, median):

  plain        causal attention + MLP
  knowledge    + KNNAttention beside the MLP: 256^2 product-key base bank,
               4 heads x 64-d, k=16, its values a trainable table (SparseAdam)
  episodic     MemorizingAttention in place of the attention: local + memory in
               one softmax, each batch row reading its own session bank (4,096
               rows, Flat) in ONE request, k=32, and writing the segment back
               (remember; FIFO sessions keep their size)

the memory variants both in-process (LocalMemory) and through the daemon
(MemoryClient over its unix socket). Prints a markdown table.

    python bench/bench_block.py [--rounds 9]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from knnlayer import KNNAttention, MemorizingAttention, MemoryClient, SessionSpec  # noqa: E402
from knnlayer.bank_tools import create_base_bank  # noqa: E402
from memoryd.daemon.server import spawn  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from _timing import interleaved  # noqa: E402  (bench/, the script's folder)

B, T, D, H, DK, DV = 8, 256, 256, 4, 64, 64
BASE_ROWS, SESSION_ROWS = 256 ** 2, 4096


class Block(nn.Module):
    def __init__(self, variant: str, mem=None, sessions=None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.sessions = sessions
        self.attn = self.qkv = self.knowledge = None
        if variant == "episodic":
            self.attn = MemorizingAttention(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H,
                                            topk=32, out_dim=D, memory=mem)
        else:
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        if variant == "knowledge":
            self.knowledge = KNNAttention(input_dim=D, key_dim=DK, value_dim=DV, num_heads=H,
                                          topk=16, out_dim=D, memory=mem, banks=["base"],
                                          value_tables={"base": BASE_ROWS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)                                                    # (B, T, D)
        if self.attn is not None:
            x = x + self.attn(h, row_banks=self.sessions)
            self.attn.remember(row_banks=self.sessions)
        else:
            q, k, v = self.qkv(h).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        h = self.ln2(x)
        return x + self.mlp(h) + (self.knowledge(h) if self.knowledge is not None else 0)


def optimisers(block: Block) -> list[torch.optim.Optimizer]:
    sparse = ([block.knowledge.value_table("base").weight] if block.knowledge is not None else [])
    dense = [p for p in block.parameters() if all(p is not s for s in sparse)]
    return [torch.optim.AdamW(dense, lr=1e-4)] + ([torch.optim.SparseAdam(sparse)] if sparse else [])


def banks(mem) -> list[str]:
    """The base bank and B session banks of SESSION_ROWS rows each; the session ids."""
    create_base_bank(mem, "base", BASE_ROWS, DK, DV, index="product-keys", seed=0)
    rng = np.random.default_rng(1)
    sids = []
    for _ in range(B):
        sid = mem.open_session(SessionSpec(dim=DK, value_dim=DV, eviction="fifo")).session_id
        keys = rng.standard_normal((SESSION_ROWS, DK), np.float32)
        mem.add(sid, keys / np.linalg.norm(keys, axis=1, keepdims=True),
                rng.standard_normal((SESSION_ROWS, DV), np.float32))
        # FIFO at the size it has now: remember() then keeps it at SESSION_ROWS rows
        mem.set_quota(sid, mem.bank_info(sid).used_bytes)
        sids.append(sid)
    return sids


def step_fn(block: Block):
    opts = optimisers(block)
    x = torch.randn(B, T, D)

    def step() -> None:
        loss = block(x).square().mean()
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        proc, address = spawn(Path(tmp) / "daemon")
        try:
            with LocalMemory(Path(tmp) / "local") as local, MemoryClient(address) as client:
                s_local, s_client = banks(local), banks(client)
                steps = {
                    "plain": step_fn(Block("plain")),
                    "knowledge, in-process": step_fn(Block("knowledge", local)),
                    "knowledge, daemon": step_fn(Block("knowledge", client)),
                    "episodic, in-process": step_fn(Block("episodic", local, s_local)),
                    "episodic, daemon": step_fn(Block("episodic", client, s_client)),
                }
                times = interleaved(steps, a.rounds)
        finally:
            proc.terminate()
            proc.wait(60)
    plain = times["plain"]
    print(f"\nTraining step of one block, B={B} T={T} d={D} ({B * T:,} tokens), "
          f"median of {a.rounds} interleaved rounds, torch threads {torch.get_num_threads()}\n")
    print("| block | step (ms) | vs plain |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.0f} | {t / plain:.2f}x |")


if __name__ == "__main__":
    main()
