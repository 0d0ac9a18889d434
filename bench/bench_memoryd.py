"""memoryd search overhead: bare FAISS vs LocalMemory vs MemoryClient (daemon).

Same index, same machine, one run. Builds one bank (default 1M x 128-d
clustered unit keys, 128-d fp16 values, HNSW32), then times a batch of 4096
queries with k=32 and values returned:

  faiss      the bank's own FAISS index, searched directly, plus the value
             gather (values[ids]) in this process: the floor
  local      LocalMemory.search (validation, locks, id->row lookup, gather)
  client     MemoryClient.search against `memoryd serve` in another process,
             over its unix socket, the reply through a reply buffer (shared
             memory, the default there)
  socket     the same with reply_buffers=False: the reply streamed through
             the socket (encode, stream, decode)

and single-query (nq=1) latency through the daemon next to a bare gRPC
round trip (Ping) on the same socket. Prints a markdown table.

    python bench/bench_memoryd.py                 # full size (~3 min on 2 cores)
    python bench/bench_memoryd.py --n 100000      # quicker
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memoryd.api import BankSpec  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.daemon.server import spawn  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402
from _datadir import served_copy  # noqa: E402  (bench/, the script's folder)
from _timing import interleaved  # noqa: E402


def clustered_unit(n: int, d: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Keys with structure (a Gaussian mixture on the sphere), as data keys have."""
    x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, d), np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(data_dir: Path, a) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4096, a.dim)).astype(np.float32)
    with LocalMemory(data_dir) as mem:
        mem.create_bank(BankSpec("bench", dim=a.dim, value_dim=a.dim, value_dtype="float16",
                                 index=a.index, kind="base"))
        t = time.perf_counter()
        for start in range(0, a.n, 100_000):
            m = min(a.n, start + 100_000) - start
            mem.add("bench", clustered_unit(m, a.dim, rng, centers),
                    rng.standard_normal((m, a.dim), np.float32))
            print(f"  built {start + m:,}/{a.n:,} rows  {time.perf_counter() - t:.0f}s",
                  file=sys.stderr)
    np.save(data_dir / "queries.npy", clustered_unit(a.nq, a.dim, rng, centers))


def start_daemon(data_dir: Path) -> tuple[subprocess.Popen, str]:
    return spawn(data_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--nq", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--index", default="HNSW32")
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--latency-calls", type=int, default=500)
    p.add_argument("--data-dir", type=Path, help="reuse a bank built by an earlier run")
    a = p.parse_args()

    data_dir = a.data_dir or Path(tempfile.mkdtemp(prefix="bench-memoryd-"))
    if not (data_dir / "queries.npy").exists():
        print(f"building {a.n:,} x {a.dim} {a.index} bank in {data_dir}", file=sys.stderr)
        build(data_dir, a)
    q = np.load(data_dir / "queries.npy")

    # The daemon serves a copy of the data dir (a data dir has one user at a
    # time: bench/_datadir.py) while this process opens the data dir itself,
    # so that the four paths can be timed in interleaved rounds: no path is
    # favoured by warm caches or by a quiet moment of the machine.
    copies = contextlib.ExitStack()
    proc, address = start_daemon(copies.enter_context(served_copy(data_dir)))
    try:
        with LocalMemory(data_dir) as mem, MemoryClient(address) as client, \
                MemoryClient(address, reply_buffers=False) as sock:
            bank = mem.engine.bank("bench")
            index = bank.shards[0].index
            values = bank.shards[0].store.values.data        # ids == rows: assigned 0..n-1

            def bare():
                _, ids = index.search(q, a.k)
                return values[np.maximum(ids, 0)]            # (nq, k, dv)

            paths = {"faiss": bare,
                     "local": lambda: mem.search("bench", q, a.k, values=True),
                     "client": lambda: client.search("bench", q, a.k, values=True),
                     "socket": lambda: sock.search("bench", q, a.k, values=True)}
            times = interleaved(paths, a.repeat)
            one = q[:1]
            lat_search = [_call_ms(lambda: client.search("bench", one, a.k, values=True))
                          for _ in range(a.latency_calls)]
            lat_ping = [_call_ms(lambda: client.ping(b"x")) for _ in range(a.latency_calls)]
    finally:
        proc.terminate()
        proc.wait(60)
        copies.close()
    t_faiss = times["faiss"]
    rows = [("in-process FAISS search + value gather", t_faiss, 1.0),
            ("LocalMemory.search", times["local"], times["local"] / t_faiss),
            ("MemoryClient.search (daemon, unix socket, reply buffer)", times["client"],
             times["client"] / t_faiss),
            ("MemoryClient.search (daemon, unix socket only)", times["socket"],
             times["socket"] / t_faiss)]

    mb = a.nq * a.k * a.dim * 2 / 2**20
    print(f"\n{a.n:,} x {a.dim}-d keys, {a.index}, {a.dim}-d fp16 values; "
          f"{a.nq} queries, k={a.k}, values returned ({mb:.0f} MiB); median of {a.repeat}\n")
    print("| path | time (s) | queries/s | ratio to in-process FAISS |")
    print("|---|---:|---:|---:|")
    for name, t, r in rows:
        print(f"| {name} | {t:.3f} | {a.nq / t:,.0f} | {r:.2f} |")
    print("\nsingle query (nq=1) through the daemon, "
          f"{a.latency_calls} calls:\n")
    print("| call | p50 (ms) | p99 (ms) |")
    print("|---|---:|---:|")
    for name, lat in (("Search nq=1, k=%d, values" % a.k, lat_search), ("Ping (bare gRPC echo)", lat_ping)):
        print(f"| {name} | {np.percentile(lat, 50):.3f} | {np.percentile(lat, 99):.3f} |")


def _call_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


if __name__ == "__main__":
    main()
