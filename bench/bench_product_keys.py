"""Product-key search with values vs what FAISS itself does on the same keys.

A product-key bank (memoryd.storage.product_keys) holds n^2 keys, the
products of two tables of n sub-keys. FAISS's MultiIndexQuantizer over the
same two tables finds the same exact top-k (it ranks by L2 over the halves,
which for unit sub-keys orders like q.k); with a vectorised gather of the
winners' values (np.take from a table laid out in its id order) it is the
floor this bench compares against:

  faiss      MultiIndexQuantizer.search + np.take of the values
  bank       ProductKeyBank.search(values=True): the searcher the engine calls
  local      LocalMemory.search(values=True): the whole in-process path
             (validation, lock, merge, gather)

Timed in interleaved rounds (one call of each per round, after a warm-up),
median of --repeat; "first call" is each path's first call in this process
(after one small search has started FAISS's threads). "same top-k": rows
whose id set equals the MultiIndexQuantizer's (rows differ only where two
keys tie within float rounding). Prints a markdown table.

    python bench/bench_product_keys.py            # 1024^2 keys, 4096 and 8192 queries (~1 min)
    PYTHONPATH=/tmp/old python bench/bench_product_keys.py   # another checkout's code
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))   # PYTHONPATH wins
import memoryd  # noqa: E402
from memoryd.api import BankSpec  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.keyspace import subkeys  # noqa: E402
from memoryd.storage.faiss_index import faiss  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def quantizer(sub: np.ndarray) -> "faiss.MultiIndexQuantizer":
    """A MultiIndexQuantizer whose two codebooks are the bank's sub-key tables (2, n, d/2)."""
    _, n, half = sub.shape
    miq = faiss.MultiIndexQuantizer(2 * half, 2, int(np.log2(n)))
    faiss.copy_array_to_vector(np.ascontiguousarray(sub, np.float32).ravel(), miq.pq.centroids)
    miq.is_trained, miq.ntotal = True, n * n
    return miq


def timed(paths: dict, repeat: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(first-call seconds, median wall seconds, median CPU seconds) per path,
    over interleaved rounds. CPU time (all this process's threads) is the
    work itself: on a host shared with other jobs it moves far less than wall
    time, so its ratio is the steadier one there."""
    first = {}
    for name, fn in paths.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, fn in paths.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = lambda d: {name: statistics.median(ts) for name, ts in d.items()}  # noqa: E731
    return first, med(wall), med(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="sub-keys per half (n^2 keys)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--value-dim", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--nq", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    n, dv = a.n, a.value_dim
    rng = np.random.default_rng(0)

    data_dir = Path(tempfile.mkdtemp(prefix="bench-pk-"))
    mem = LocalMemory(data_dir)
    mem.create_bank(BankSpec("pk", dim=a.dim, value_dim=dv, value_dtype="float16",
                             index=f"product-keys:{n}", kind="base"))
    values = rng.standard_normal((n * n, dv)).astype(np.float16)             # (K, dv), row = id
    for s in range(0, n * n, 1 << 18):
        mem.update_values("pk", np.arange(s, min(n * n, s + (1 << 18))), values[s:s + (1 << 18)])
    bank = mem.engine.bank("pk")
    miq = quantizer(subkeys(n, a.dim, 0))
    # MultiIndexQuantizer's id is i1 + i2 * n (the bank's: i1 * n + i2): its
    # value table in its own order, so that its gather is one np.take
    miq_values = np.ascontiguousarray(values.reshape(n, n, dv).transpose(1, 0, 2)).reshape(-1, dv)
    miq.search(unit(rng.standard_normal((64, a.dim))), a.k)                  # start the threads

    rows = []
    for nq in a.nq:
        q = unit(rng.standard_normal((nq, a.dim)))

        def floor():
            _, ids = miq.search(q, a.k)                                      # (nq, k)
            out = np.empty((nq * a.k, dv), np.float16)
            return np.take(miq_values, ids.reshape(-1), axis=0, out=out)     # (nq*k, dv)

        paths = {"faiss": floor,
                 "bank": lambda: bank.search(q, a.k, values=True, keys=False),
                 "local": lambda: mem.search("pk", q, a.k, values=True)}
        first, med, cpu = timed(paths, a.repeat)
        _, ref = miq.search(q, a.k)
        ref = (ref % n) * n + ref // n                                       # bank ids
        got = mem.search("pk", q, a.k, values=True)
        same = np.mean([set(x) == set(y) for x, y in zip(got.ids, ref)])
        vals_ok = np.array_equal(got.values, values[got.ids])
        rows.append((nq, first, med, cpu, same, vals_ok))

    print(f"\nproduct keys: {n}^2 = {n * n:,} keys, key_dim {a.dim}, fp16 {dv}-d values; k={a.k}; "
          f"median of {a.repeat} interleaved rounds; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads; code: {Path(memoryd.__file__).parent.parent}\n")
    print("| queries | path | time (ms) | **ratio to faiss** | CPU (ms) | CPU ratio | "
          "first call (ms) | same top-k | values right |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    names = {"faiss": "MultiIndexQuantizer.search + np.take", "bank": "ProductKeyBank.search, values",
             "local": "LocalMemory.search, values"}
    for nq, first, med, cpu, same, vals_ok in rows:
        for key, label in names.items():
            extra = ("", "") if key == "faiss" else (f"{same:.4f}", "yes" if vals_ok else "NO")
            print(f"| {nq:,} | {label} | {med[key] * 1e3:.1f} | **{med[key] / med['faiss']:.2f}** | "
                  f"{cpu[key] * 1e3:.1f} | {cpu[key] / cpu['faiss']:.2f} | "
                  f"{first[key] * 1e3:.1f} | {extra[0]} | {extra[1]} |")
    print(f"\nload average while it ran: {os.getloadavg()[0]:.1f} "
          f"(this host: {os.cpu_count()} cores)")
    mem.close()
    shutil.rmtree(data_dir)      # 1M fp16 values: rebuilt in seconds, not worth keeping


if __name__ == "__main__":
    main()
