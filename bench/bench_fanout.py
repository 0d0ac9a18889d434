"""Fan-out overhead: 4 local shard processes behind the router vs 1 process, same keys.

    python bench/bench_fanout.py                 # ~3 min on 2 cores
    python bench/bench_fanout.py --keys 400000 --shards 4 --rounds 5

Both sides are real `memoryd serve` processes on 127.0.0.1 (TCP), the shards
on one shared SQLite catalog (the cluster's PostgreSQL is not what is timed
here: a search never reads the catalog). The same keys go into one bank on
the single daemon and into one bank over N shards (each shard a slice); the
same queries are timed in interleaved rounds (median) through:

  * 1 process          MemoryClient -> memoryd serve
  * router (N shards)  MemoryClient -> memoryd route -> N x memoryd serve
  * in-process router  MemoryClient.sharded([...]) -> N x memoryd serve (no hop)

and recall@k of each against exact top-k (numpy) is printed beside the time
ratio. All processes share this host's cores, so the N shards split the same
compute that the one process does alone: the ratio is what routing, merging
and the extra hop cost, not a speed-up (on N machines each shard would get
its own cores). Index: Flat (exact) and HNSW32 (approximate, where a sharded
bank searches N smaller graphs), built inline (MEMORYD_SEAL_ROWS=0) so that no
search runs while a growing segment is sealed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _timing import interleaved  # noqa: E402

from knnlayer.client import MemoryClient  # noqa: E402
from memoryd.api import BankSpec  # noqa: E402
from memoryd.daemon.server import wait_serving  # noqa: E402

DIM = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memoryd(*args: str, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "memoryd"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "memoryd.daemon.cli"]
    with open(log, "wb") as f:
        # indexes built at each add (no growing segments, memoryd.storage.segments):
        # every search then sees a whole index, so the fan-out is timed, not sealing
        return subprocess.Popen([*cmd, *args], stdout=f, stderr=f,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
                                     "MEMORYD_SEAL_ROWS": "0"})


def serve(root: Path, name: str, *extra: str) -> tuple[subprocess.Popen, str]:
    addr = f"127.0.0.1:{free_port()}"
    p = memoryd("serve", "--data-dir", str(root / name), "--listen", addr, "--shm-dir", "off",
                *extra, log=root / f"{name}.log")
    wait_serving(addr, timeout=60, proc=p)
    return p, addr


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, exact)]))


def exact_topk(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = []
    kn = (keys ** 2).sum(1)
    for i in range(0, len(q), 512):
        d = kn[None, :] - 2 * q[i:i + 512] @ keys.T
        out.append(np.argsort(d, axis=1)[:, :k])
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--nq", type=int, nargs="+", default=[32, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--index", nargs="+", default=["Flat", "HNSW32"])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((a.keys, DIM)).astype(np.float32)
    vals = rng.standard_normal((a.keys, 16)).astype(np.float16)
    queries = {nq: (keys[rng.choice(a.keys, nq)] + 0.5 * rng.standard_normal((nq, DIM)))
               .astype(np.float32) for nq in a.nq}
    exact = {nq: exact_topk(keys, q, a.k) for nq, q in queries.items()}
    root = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    procs: list[subprocess.Popen] = []
    try:
        one, one_addr = serve(root, "single")
        procs.append(one)
        catalog = f"sqlite:///{root / 'cluster-catalog.db'}"
        shard_addrs = []
        for i in range(a.shards):
            p, addr = serve(root, f"shard{i}", "--shard-index", str(i), "--num-shards",
                            str(a.shards), "--catalog-url", catalog)
            procs.append(p)
            shard_addrs.append(addr)
        router_addr = f"127.0.0.1:{free_port()}"
        router = memoryd("route", "--listen", router_addr, "--shards", ",".join(shard_addrs),
                         log=root / "router.log")
        procs.append(router)
        wait_serving(router_addr, timeout=60, proc=router)
        single, routed = MemoryClient(one_addr), MemoryClient(router_addr)
        inproc = MemoryClient.sharded(shard_addrs)
        print(f"fan-out: {a.keys:,} keys x {DIM}-d (+16 fp16 values), k={a.k}, "
              f"{a.shards} shard processes vs 1, all on this host ({os.cpu_count()} cores); "
              f"median of {a.rounds} interleaved rounds\n")
        print("| index | queries | 1 process | router (N shards) | ratio | in-process router | "
              "ratio | recall@k 1 / N |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for index in a.index:
            name = "b-" + re.sub(r"[^a-z0-9]+", "-", index.lower())
            for mem in (single, routed):
                mem.create_bank(BankSpec(name, dim=DIM, value_dim=16, value_dtype="float16",
                                         index=index))
                for s in range(0, a.keys, 50_000):
                    mem.add(name, keys[s:s + 50_000], vals[s:s + 50_000],
                            ids=np.arange(s, min(s + 50_000, a.keys)))
            for nq, q in queries.items():
                paths = {
                    "one": lambda m=single: m.search(name, q, a.k),
                    "router": lambda m=routed: m.search(name, q, a.k),
                    "inproc": lambda m=inproc: m.search(name, q, a.k),
                }
                t = interleaved(paths, a.rounds, shuffle=True)
                r1 = recall(single.search(name, q, a.k).ids, exact[nq])
                rn = recall(routed.search(name, q, a.k).ids, exact[nq])
                print(f"| {index} | {nq} | {t['one'] * 1e3:.1f} ms | {t['router'] * 1e3:.1f} ms | "
                      f"**{t['router'] / t['one']:.2f}x** | {t['inproc'] * 1e3:.1f} ms | "
                      f"{t['inproc'] / t['one']:.2f}x | {r1:.3f} / {rn:.3f} |", flush=True)
        for m in (single, routed, inproc):
            m.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
