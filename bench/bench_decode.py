"""Decode-step search latency: in process (LocalMemory) vs through the daemon.

One decode step of a KNN-attention model is one search of B * T * H queries
(T = 1, H = 8 heads) for k = 32 neighbours with values. Over a base bank of
1024^2 product keys (key_dim 128, fp16 64-d values) this times, step after
step, the same queries through

  local      LocalMemory.search in this process
  daemon     MemoryClient.search to `memoryd serve` (a subprocess on a
             copy of the data dir), unix socket, reply buffers on (the default):
             the unary SearchOne, as the client picks it for these replies
  stream     the same through the streaming Search (a second client told
             never to use SearchOne: the path before it)

alternating which goes first, and prints p50/p99 of each and the daemon's
extra time over local. Then the Flat nq=1 case (a 100k x 64-d Flat bank, one query, k =
32): FAISS's default threads (every search on all OpenMP threads) vs
threads per request size (memoryd.storage.faiss_index.threads_for), in
process, interleaved, and through the daemon. A bare gRPC round trip (Ping)
on the same socket is the floor of any daemon call.

    python bench/bench_decode.py                 # ~1.5 min on 2 cores
    PYTHONPATH=/tmp/old python bench/bench_decode.py   # another checkout's code
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))   # PYTHONPATH wins
import memoryd  # noqa: E402
from memoryd.api import BankSpec  # noqa: E402
from memoryd.daemon.server import spawn  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.storage import faiss_index as fx  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402
from _datadir import served_copy  # noqa: E402  (bench/, the script's folder)

HEADS = 8


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(data_dir: Path, a) -> None:
    rng = np.random.default_rng(0)
    n = a.subkeys
    with LocalMemory(data_dir) as mem:
        mem.create_bank(BankSpec("pk", dim=128, value_dim=64, value_dtype="float16",
                                 index=f"product-keys:{n}", kind="base"))
        for s in range(0, n * n, 1 << 18):
            ids = np.arange(s, min(n * n, s + (1 << 18)))
            mem.update_values("pk", ids, rng.standard_normal((len(ids), 64)).astype(np.float16))
        mem.create_bank(BankSpec("flat", dim=64, value_dim=64, value_dtype="float16",
                                 index="Flat", kind="base"))
        mem.add("flat", unit(rng.standard_normal((a.flat_rows, 64))),
                rng.standard_normal((a.flat_rows, 64)).astype(np.float16))


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def alternating(paths: dict, steps: int, make_args, warmup: int = 20) -> dict[str, np.ndarray]:
    """Milliseconds per call of each path; every step calls each path once on
    the same fresh arguments, the first path changing from step to step."""
    names = list(paths)
    out = {name: [] for name in names}
    for step in range(warmup + steps):
        args = make_args()
        order = names[step % len(names):] + names[:step % len(names)]
        for name in order:
            t = ms(lambda: paths[name](*args))
            if step >= warmup:
                out[name].append(t)
    return {name: np.array(ts) for name, ts in out.items()}


def pct(ts: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def set_per_size(on: bool) -> None:
    if hasattr(fx, "THREADS_PER_SIZE"):   # code before it: always faiss's default
        fx.THREADS_PER_SIZE = on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subkeys", type=int, default=1024, help="product keys: n^2 keys")
    p.add_argument("--flat-rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--flat-calls", type=int, default=200)
    p.add_argument("--data-dir", type=Path,
                   help="build the banks here once and reuse them (default: a temporary dir)")
    a = p.parse_args()

    data_dir = a.data_dir or Path(tempfile.mkdtemp(prefix="bench-decode-"))
    if not (data_dir / "catalog.db").exists():
        print(f"building the banks in {data_dir}", file=sys.stderr)
        build(data_dir, a)
    rng = np.random.default_rng(1)
    copies = contextlib.ExitStack()    # the daemon's own copy: one user per data dir
    proc, address = spawn(copies.enter_context(served_copy(data_dir)))
    try:
        with LocalMemory(data_dir) as mem, MemoryClient(address) as client, \
                MemoryClient(address) as streaming:
            assert client.reply_buffers == "shared memory", client.reply_buffers
            paths = {"local": lambda q: mem.search("pk", q, a.k, values=True),
                     "daemon": lambda q: client.search("pk", q, a.k, values=True)}
            if hasattr(streaming, "_route"):   # code before SearchOne: "daemon" streams
                streaming._route.unary = False
                paths["stream"] = lambda q: streaming.search("pk", q, a.k, values=True)
            decode = {}
            for b in a.batch:
                nq = b * HEADS
                decode[b] = alternating(paths, a.steps,
                                        lambda: (unit(rng.standard_normal((nq, 128))),))

            def local_flat(per_size: bool):
                def run(q):
                    set_per_size(per_size)
                    try:
                        return mem.search("flat", q, a.k, values=True)
                    finally:
                        set_per_size(True)
                return run

            one = lambda: (unit(rng.standard_normal((1, 64))),)              # noqa: E731
            flat = alternating({"default": local_flat(False), "per_size": local_flat(True)},
                               a.flat_calls, one)
            # its own loop: interleaved with the in-process calls, the two
            # processes' copies of the 25.6 MB index evict each other from
            # the cache (+2-3 ms a call measured here)
            flat.update(alternating(
                {"daemon": lambda q: client.search("flat", q, a.k, values=True)}, a.flat_calls, one))
            ping = alternating({"ping": lambda: client.ping(b"x")}, a.steps, lambda: ())["ping"]
    finally:
        proc.terminate()
        proc.wait(60)
        copies.close()
        if a.data_dir is None:          # built in seconds: not worth keeping
            shutil.rmtree(data_dir, ignore_errors=True)

    print(f"\ncode: {Path(memoryd.__file__).parent.parent}; faiss {fx.faiss.__version__}, "
          f"{fx.faiss.omp_get_max_threads()} OpenMP threads; per-size threads: "
          f"{'yes' if hasattr(fx, 'THREADS_PER_SIZE') else 'no (code before them)'}")
    print(f"\ndecode step: B x T=1 x {HEADS} heads queries, k={a.k}, values; "
          f"{a.subkeys}^2 = {a.subkeys ** 2:,} product keys, key_dim 128, fp16 64-d values; "
          f"{a.steps} steps, the paths alternating\n")
    streamed = "stream" in next(iter(decode.values()))
    head = "| B | nq | LocalMemory p50 / p99 (ms) |"
    if streamed:
        head += " daemon, Search (stream) p50 / p99 | extra p50 / p99 |"
    head += f" daemon{', SearchOne' if streamed else ''} p50 / p99 (ms) | extra p50 / p99 (ms) |"
    print(head)
    print("|---:|---:|---:|" + "---:|---:|" * (2 if streamed else 1))
    for b, t in decode.items():
        l50, l99 = pct(t["local"])
        row = f"| {b} | {b * HEADS} | {l50:.2f} / {l99:.2f} |"
        for name in ("stream", "daemon") if streamed else ("daemon",):
            d50, d99 = pct(t[name])
            row += f" {d50:.2f} / {d99:.2f} | {d50 - l50:+.2f} / {d99 - l99:+.2f} |"
        print(row)
    print(f"\nFlat nq=1: {a.flat_rows:,} x 64-d Flat bank, k={a.k}, values; {a.flat_calls} calls "
          "each; the two in-process rows interleaved, the daemon's after them\n")
    print("| path | p50 (ms) | p99 (ms) |")
    print("|---|---:|---:|")
    per_size = hasattr(fx, "THREADS_PER_SIZE")
    for name, label in (("default", "LocalMemory, faiss's default threads (all)"),
                        ("per_size", "LocalMemory, threads per request size"),
                        ("daemon", "daemon (its threads per request size)" if per_size
                         else "daemon (faiss's default threads)")):
        if name == "per_size" and not per_size:
            continue                         # the code before them: the same as default
        p50, p99 = pct(flat[name])
        print(f"| {label} | {p50:.2f} | {p99:.2f} |")
    p50, p99 = pct(ping)
    print(f"| Ping (bare gRPC round trip, same socket) | {p50:.2f} | {p99:.2f} |")
    print(f"\nload average while it ran: {os.getloadavg()[0]:.1f} "
          f"(this host: {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
