"""Per-row bank stacks: ONE RowStacks search vs B separate searches.

B documents (training) or B conversations (decode), each with its own small
session bank (Flat, --session-rows rows), all sharing one product-key base
bank (--subkeys^2 keys). Every row of a document brings T*H queries; each
query searches [its session, base], k=--k, values returned. Two ways to ask:

  one request   search(RowStacks([[s_0, base], ..., [s_B-1, base]], [T*H]*B), all B*T*H queries)
  B requests    search([s_i, base], queries of document i) for each i

on two backends: LocalMemory in this process, and a `memoryd serve` daemon
(MemoryClient, unix socket, reply buffers) on the same data dir. The paths
are timed in interleaved rounds, median of --repeat; speed-up = the B
requests' time / the one request's. One RowStacks request searches the base
bank once with all B*T*H queries (and each session once with its own).

Prints a markdown table.

    python bench/bench_row_stacks.py               # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from knnlayer.bank_tools import create_base_bank  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402
from memoryd.api import RowStacks, SessionSpec  # noqa: E402
from memoryd.daemon.server import spawn  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from _datadir import served_copy  # noqa: E402  (bench/, the script's folder)
from _timing import interleaved  # noqa: E402

BASE = "base"
CASES = (("train", 1, 64, 4), ("train", 8, 64, 4), ("train", 64, 64, 4),   # (mode, B, T, H)
         ("decode", 1, 1, 8), ("decode", 8, 1, 8), ("decode", 64, 1, 8))


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)                      # (n, d)


def build(data_dir: Path, a) -> list[str]:
    """The base bank and max(B) sessions of --session-rows rows; their ids."""
    rng = np.random.default_rng(0)
    with LocalMemory(data_dir, reap_interval=None) as mem:
        create_base_bank(mem, BASE, a.subkeys ** 2, a.dim, a.dim, index="product-keys",
                         metric="ip", value_dtype="float16")
        spec = SessionSpec(dim=a.dim, value_dim=a.dim, value_dtype="float16", metric="ip")
        sids = []
        for _ in range(max(b for _, b, _, _ in CASES)):
            sid = mem.open_session(spec).session_id
            mem.append(sid, unit(rng, a.session_rows, a.dim),
                       rng.standard_normal((a.session_rows, a.dim), np.float32))
            sids.append(sid)
    return sids


def paths_for(mem, sids: list[str], q: np.ndarray, per: int, k: int) -> dict:
    """{'one': one RowStacks request, 'sep': B requests} over mem."""
    b = len(sids)
    rs = RowStacks(stacks=[[s, BASE] for s in sids], rows=[per] * b)
    return {"one": lambda: mem.search(rs, q, k, values=True),
            "sep": lambda: [mem.search([s, BASE], q[i * per:(i + 1) * per], k, values=True)
                            for i, s in enumerate(sids)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64, help="key dim = value dim (fp16 values)")
    p.add_argument("--subkeys", type=int, default=256, help="base bank: subkeys^2 product keys")
    p.add_argument("--session-rows", type=int, default=2048, help="rows of each session bank")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeat", type=int, default=7, help="timed rounds of train (median; decode: 4x)")
    a = p.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="bench-rowstacks-"))
    print(f"building {a.subkeys ** 2:,} product keys + sessions in {data_dir}", file=sys.stderr)
    sids = build(data_dir, a)
    rng = np.random.default_rng(1)
    copies = contextlib.ExitStack()    # the daemon's own copy: one user per data dir
    proc, address = spawn(copies.enter_context(served_copy(data_dir)))
    rows = []
    try:
        with LocalMemory(data_dir, reap_interval=None) as mem, MemoryClient(address) as client:
            assert client.reply_buffers == "shared memory", client.reply_buffers
            for mode, b, t, h in CASES:
                per = t * h
                q = unit(rng, b * per, a.dim)                                 # (B*T*H, dim)
                paths = {f"{where} {how}": fn
                         for where, m in (("local", mem), ("daemon", client))
                         for how, fn in paths_for(m, sids[:b], q, per, a.k).items()}
                # decode steps take milliseconds: more rounds, for a median above the noise
                repeat = a.repeat if mode == "train" else (40 if b == 1 else 4) * a.repeat
                rows.append((mode, b, t, h, interleaved(paths, repeat, shuffle=True)))
                print(f"  {mode} B={b} done", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(60)
        copies.close()
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"\nbase: {a.subkeys ** 2:,} product keys ({a.dim}-d, ip, fp16 values); each of B "
          f"sessions: {a.session_rows} rows Flat; k={a.k}, values returned; median of "
          f"{a.repeat} (train) / {4 * a.repeat} (decode; B=1: {40 * a.repeat}) rounds\n")
    print("| mode | B | T x H | nq | in-process: 1 request (ms) | B requests (ms) | speed-up "
          "| daemon: 1 request (ms) | B requests (ms) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, b, t, h, tm in rows:
        lo, ls, do, ds = (tm[x] * 1e3 for x in ("local one", "local sep", "daemon one", "daemon sep"))
        print(f"| {mode} | {b} | {t} x {h} | {b * t * h:,} | {lo:.2f} | {ls:.2f} | {ls / lo:.2f} "
              f"| {do:.2f} | {ds:.2f} | {ds / do:.2f} |")


if __name__ == "__main__":
    main()
