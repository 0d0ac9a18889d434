"""memoryd ingest into any index: growing segments sealed in the background
(memoryd.storage.segments) against every add going into the index inline.

For each configuration, a fresh bank of --dim-d float32 keys (with --vdim-d
fp16 values) is filled with --rows rows by (a) 1 writer adding batches of
--batch rows and (b) --threads writers adding batches of --small rows, and
timed from the first add to the last one returning (rows/s). Configurations:

    Flat                  no index of its own: the speed to match
    HNSW32, inline        today's path before growing segments (SEAL_ROWS=0):
                          every add inserts into the graph under the write lock
    HNSW32, growing       adds append; the sealer adds them to a copy of the
                          graph off the lock and swaps it in (copy and swap)
    HNSW32, chunked       the same, but sealed in ~20 ms chunks under the write
                          lock (segments.COPY_BYTES = 0: what indexes beyond
                          COPY_BYTES, and the mmap and gpu tiers, do)
    IVF1024,PQ16, inline / growing   trained by a first add of --train rows
                          (timed apart, not in rows/s); growing: encoded off
                          the lock, codes appended under it

After the adds: how many rows were still growing, the time until the
sealer had sealed every one (while a searcher runs), how long it held the
bank's write lock per chunk (segments.HOLDS), and search latency,
p50/p99 of --nq queries, k=--k, one search at a time with --gap seconds
between: "while sealing" (from the last add until all is sealed) and
"idle" (after). The searched queries are rows of the bank plus noise.

    python bench/bench_ingest.py                  # 200k x 128-d: ~15 min on 2 cores
    python bench/bench_ingest.py --rows 50000 --configs flat,hnsw-growing
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memoryd.api import BankSpec  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.storage import segments  # noqa: E402

CONFIGS = {   # name -> (index, growing segments on, copy and swap)
    "flat": ("Flat", True, True),
    "hnsw-inline": ("HNSW32", False, True),
    "hnsw-growing": ("HNSW32", True, True),
    "hnsw-chunked": ("HNSW32", True, False),
    "ivfpq-inline": ("IVF1024,PQ16", False, True),
    "ivfpq-growing": ("IVF1024,PQ16", True, True),
}


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) * 1000 if xs else float("nan")


def run(root: Path, name: str, a, writers: int, batch: int, keys: np.ndarray,
        vals: np.ndarray) -> dict:
    index, growing, copy = CONFIGS[name]
    seal_rows, copy_bytes = segments.SEAL_ROWS, segments.COPY_BYTES
    segments.SEAL_ROWS = seal_rows if growing else 0
    segments.COPY_BYTES = copy_bytes if copy else 0
    out = {"config": name, "index": index, "writers": writers, "batch": batch}
    data_dir = root / f"{name}-{writers}x{batch}-{time.monotonic_ns()}"
    segments.HOLDS.clear()
    try:
        with LocalMemory(data_dir, reap_interval=None) as mem:
            mem.create_bank(BankSpec("b", dim=a.dim, value_dim=a.vdim, value_dtype="float16",
                                     index=index))
            bank = mem.engine.bank("b")
            start = 0
            if not bank.trained:                      # the first add trains: timed apart
                t = time.perf_counter()
                mem.add("b", keys[:a.train], vals[:a.train])
                out["train_s"] = time.perf_counter() - t
                start = a.train
            bounds = list(range(start, len(keys), batch))
            nxt, lock = [0], threading.Lock()

            def writer():
                while True:
                    with lock:
                        i = nxt[0]
                        nxt[0] += 1
                    if i >= len(bounds):
                        return
                    s = bounds[i]
                    mem.add("b", keys[s:s + batch], vals[s:s + batch])

            ts = [threading.Thread(target=writer) for _ in range(writers)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            dt = time.perf_counter() - t0
            out["rows"] = len(keys) - start
            out["rows_s"] = out["rows"] / dt
            out["growing"] = bank.growing_rows()

            rng = np.random.default_rng(7)
            lat_sealing: list[float] = []
            t_end = time.perf_counter()
            while bank.growing_rows():                # searches while the sealer works
                q = keys[rng.integers(0, len(keys), a.nq)] + 0.01
                t = time.perf_counter()
                mem.search("b", q, a.k, values=False)
                lat_sealing.append(time.perf_counter() - t)
                time.sleep(a.gap)
            out["sealed_s"] = time.perf_counter() - t_end
            lat_idle: list[float] = []
            for _ in range(a.idle_searches):
                q = keys[rng.integers(0, len(keys), a.nq)] + 0.01
                t = time.perf_counter()
                mem.search("b", q, a.k, values=False)
                lat_idle.append(time.perf_counter() - t)
                time.sleep(a.gap)
            out.update(sealing=lat_sealing, idle=lat_idle, holds=list(segments.HOLDS))
            out["count"] = mem.bank_info("b").count
    finally:
        segments.SEAL_ROWS, segments.COPY_BYTES = seal_rows, copy_bytes
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vdim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=10_000, help="rows per add, 1 writer")
    ap.add_argument("--small", type=int, default=256, help="rows per add, --threads writers")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--train", type=int, default=20_000, help="the first add of an IVF bank")
    ap.add_argument("--nq", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between searches")
    ap.add_argument("--idle-searches", type=int, default=100)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="','-separated, of: " + ", ".join(CONFIGS) + " (a name twice: run twice)")
    ap.add_argument("--modes", default="",
                    help="writers x rows per add, e.g. '1x10000,8x256' (default: 1x--batch,"
                         "--threads x --small)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((a.rows, a.dim), dtype=np.float32)
    vals = keys[:, :a.vdim].astype(np.float16)
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    print(f"{a.rows:,} rows of {a.dim}-d float32 keys + {a.vdim}-d fp16 values into one bank; "
          f"{os.cpu_count()} cores; SEAL_ROWS={segments.SEAL_ROWS}, INLINE_ROWS="
          f"{segments.INLINE_ROWS}, high water {segments.high_rows()} growing rows, "
          f"sealer on {segments.seal_threads()} thread(s); data dir {root}\n", flush=True)
    with LocalMemory(root / "warm-up", reap_interval=None) as mem:   # page cache, pools, imports
        mem.create_bank(BankSpec("w", dim=a.dim, value_dim=a.vdim, value_dtype="float16"))
        for s in range(0, min(len(keys), 50_000), a.batch):
            mem.add("w", keys[s:s + a.batch], vals[s:s + a.batch])
    results = []
    modes = ([tuple(int(v) for v in m.split("x")) for m in a.modes.split(",")] if a.modes
             else [(1, a.batch), (a.threads, a.small)])
    for name in a.configs.split(","):
        for writers, batch in modes:
            r = run(root, name, a, writers, batch, keys, vals)
            results.append(r)
            print(f"  {name} {writers}x{batch}: {r['rows_s']:,.0f} rows/s, "
                  f"{r['growing']:,} growing, sealed {r['sealed_s']:.1f} s later", flush=True)
    flat = {}                              # mode -> the Flat runs' median rows/s
    for r in results:
        if r["config"] == "flat":
            flat.setdefault((r["writers"], r["batch"]), []).append(r["rows_s"])
    flat = {mode: float(np.median(v)) for mode, v in flat.items()}
    print("\n| config | index | writers x rows | rows/s | vs Flat | growing after the adds "
          "| all sealed after | first add (training) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ref = flat.get((r["writers"], r["batch"]))
        vs = f"{r['rows_s'] / ref:.2f}x" if ref else "-"
        train = f"{r['train_s']:.1f} s" if "train_s" in r else "-"
        print(f"| {r['config']} | {r['index']} | {r['writers']} x {r['batch']:,} | "
              f"{r['rows_s']:,.0f} | {vs} | {r['growing']:,} | {r['sealed_s']:.1f} s | {train} |")
    print(f"\nsearch latency, nq={a.nq}, k={a.k}, one search every ~{a.gap * 1000:.0f} ms (ms)\n")
    print("| config | writers x rows | while sealing p50 | p99 | searches | idle p50 | p99 "
          "| sealing chunks | lock held per chunk p50 | p99 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s, i, h = r["sealing"], r["idle"], r["holds"]
        hold = (f"{len(h)} | {pct(h, 50):.1f} | {pct(h, 99):.1f} | {max(h) * 1000:.1f}" if h
                else "0 | - | - | -")
        while_sealing = f"{pct(s, 50):.1f} | {pct(s, 99):.1f}" if s else "- | -"
        print(f"| {r['config']} | {r['writers']} x {r['batch']:,} | {while_sealing} | {len(s)} | "
              f"{pct(i, 50):.1f} | {pct(i, 99):.1f} | {hold} |")
    bad = [r for r in results if r["count"] != r["rows"] + (a.train if "train_s" in r else 0)]
    assert not bad, "rows lost"


if __name__ == "__main__":
    main()
