"""memoryd storage: what a bank holds against the data in it, and what the
write-ahead log costs.

(1) Footprint. For each index, one bank of --rows x --dim keys with --vdim
    fp16 values, filled in batches and checkpointed (closed and reopened,
    so nothing is left in the log): the bytes it is charged (used_bytes),
    split into data (ids, keys, values: each held once) and what the index
    adds, the RAM and disk bytes it reports, and each over the data itself
    (8 + 4*dim + 2*vdim bytes a row). Target for Flat: <= 1.1x in RAM and
    on disk. The row "before the log" is what the same Flat bank cost when
    every key was held twice (the row file and the FAISS index's codes,
    plus the index's id): 8 + 4*dim + 2*vdim + 4*dim + 8 bytes a row.

(2) Ingest under the two acknowledgement levels (memoryd.storage.wal): rows/s
    for --threads writers adding --batch rows at a time into one Flat bank,
    ack=applied vs ack=durable, and how many fsyncs the durable run made
    (group commit: far fewer than writes when writers overlap). Interleaved
    rounds, median of --repeat.

    python bench/bench_storage.py                  # 1M x 128-d, fp16 values: ~3 min, ~3 GB RAM
    python bench/bench_storage.py --rows 100000    # quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memoryd.api import BankSpec  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.sizes import format_size  # noqa: E402
from memoryd.storage import wal as wal_mod  # noqa: E402

MiB = 1 << 20


def keys(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def footprint(root: Path, index: str, rows: int, dim: int, vdim: int, batch: int) -> dict:
    data_dir = root / f"fp-{index.replace(',', '_')}"
    with LocalMemory(data_dir, reap_interval=None) as mem:
        mem.create_bank(BankSpec("b", dim=dim, value_dim=vdim, value_dtype="float16", index=index))
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            k = keys(n, dim, start)
            mem.add("b", k, k[:, :vdim].astype(np.float16))
    with LocalMemory(data_dir, reap_interval=None) as mem:   # reopened: all in checkpoint files
        info = mem.bank_info("b")
    data = rows * (8 + 4 * dim + 2 * vdim)
    return {"index": index, "used": info.used_bytes, "data": info.data_bytes,
            "overhead": info.index_bytes, "ram": info.tier_bytes.get("ram", 0),
            "disk": info.tier_bytes.get("disk", 0), "truth": data}


def ingest(root: Path, ack: str, rows: int, dim: int, vdim: int, batch: int, threads: int,
           round_: int) -> tuple[float, int, int]:
    """(rows/s, writes, fsyncs) of threads writers adding rows in batches."""
    data_dir = root / f"ingest-{ack}-{round_}"
    calls = [0]
    real = os.fdatasync

    def counted(fd):
        calls[0] += 1
        real(fd)

    wal_mod.os.fdatasync = counted
    try:
        with LocalMemory(data_dir, reap_interval=None) as mem:
            mem.create_bank(BankSpec("b", dim=dim, value_dim=vdim, value_dtype="float16"))
            per = rows // threads // batch
            k = keys(batch, dim, 1)
            v = k[:, :vdim].astype(np.float16)

            def writer():
                for _ in range(per):
                    mem.add("b", k, v, ack=ack)

            ts = [threading.Thread(target=writer) for _ in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            dt = time.perf_counter() - t0
    finally:
        wal_mod.os.fdatasync = real
    return per * threads * batch / dt, per * threads, calls[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python bench/bench_storage.py --rows 100000")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vdim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--indexes", default="Flat;HNSW32;IVF1024,PQ16",
                    help="';'-separated index specs for the footprint table")
    ap.add_argument("--ingest-rows", type=int, default=200_000)
    ap.add_argument("--ingest-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    print(f"footprint: {a.rows:,} x {a.dim}-d float32 keys, {a.vdim}-d float16 values "
          f"(data: {format_size(a.rows * (8 + 4 * a.dim + 2 * a.vdim))}); data dir {root}\n")
    print("| index | charged | data | index adds | RAM | disk | charged / data | RAM / data | disk / data |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    before = a.rows * (8 + 4 * a.dim + 2 * a.vdim + 4 * a.dim + 8)
    truth = a.rows * (8 + 4 * a.dim + 2 * a.vdim)
    print(f"| Flat, before the log | {format_size(before)} | {format_size(truth)} | "
          f"{format_size(before - truth)} | | | {before / truth:.2f}x | | |")
    for index in a.indexes.split(";"):
        r = footprint(root, index, a.rows, a.dim, a.vdim, a.batch)
        t = r["truth"]
        print(f"| {index} | {format_size(r['used'])} | {format_size(r['data'])} | "
              f"{format_size(r['overhead'])} | {format_size(r['ram'])} | {format_size(r['disk'])} | "
              f"{r['used'] / t:.3f}x | {r['ram'] / t:.3f}x | {r['disk'] / t:.3f}x |", flush=True)
    print(f"\ningest: {a.threads} writers, batches of {a.ingest_batch} rows, "
          f"{a.ingest_rows:,} rows per run, median of {a.repeat} interleaved rounds\n")
    results = {"applied": [], "durable": []}
    for i in range(a.repeat):
        for ack in ("applied", "durable"):
            results[ack].append(ingest(root, ack, a.ingest_rows, a.dim, a.vdim, a.ingest_batch,
                                       a.threads, i))
    print("| ack | rows/s | writes | fsyncs | writes per fsync |")
    print("|---|---:|---:|---:|---:|")
    for ack, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        writes, syncs = runs[-1][1], runs[-1][2]
        per = f"{writes / syncs:.1f}" if syncs else "-"
        print(f"| {ack} | {rate:,.0f} | {writes} | {syncs} | {per} |")
    applied = statistics.median(r[0] for r in results["applied"])
    durable = statistics.median(r[0] for r in results["durable"])
    print(f"\ndurable / applied throughput: {durable / applied:.2f}")


if __name__ == "__main__":
    main()
