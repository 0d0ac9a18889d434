"""memoryd capacity on paper: what --keys keys (default 1e9) cost by tier, and
how many shard pods of --pod-ram hold them.

The bytes per key are memoryd's own accounting, not guesses: for each kind of
bank, one real bank (memoryd.engine.LocalMemory, in a temp dir) is filled to
--rows/2 rows, closed and reopened (everything in checkpoint files, nothing in
the log), then to --rows, closed and reopened again. BankInfo of the two gives,
by difference, the bytes one more key adds (charged = used_bytes, data_bytes,
tier_bytes ram/disk/gpu) and, by what is left, the bytes a bank holds whatever
its size (trained centroids, codebooks, headers): a shard pod holds one such
fixed part per bank.

IVF65536,PQ16 cannot be trained on a small sample (faiss wants >= 39 points a
centroid: 2.6M here), so it is measured as IVF<--measure-nlist>,PQ16 (the same
16 B PQ code and 8 B id per key) and extrapolated: the per-key charge is
memoryd's fx.bytes_per_vector for the target spec (checked against the measured
bank for the measured one; the list number it counts takes 2 B at 65536 lists,
1 B at 256), and the fixed part gets (65536 - nlist) more centroids of dim
float32 each, analytically, in RAM and in both copies on disk (the bank's
trained.faiss and its index snapshot). The table marks those rows.

Sizing: a pod's usable RAM is --pod-ram x --headroom (the rest: the daemon
itself, search buffers, a checkpoint's working copies); shards = what RAM (or,
for the mmap tier, the PVC) needs; a PVC is the steady disk x 2 (a checkpoint
after updates or removes writes a whole new generation of the row files
before the old one goes) + the most the write-ahead log holds between
checkpoints (a quarter of the bank: memoryd.storage.wal.checkpoint_due).

    python bench/bench_capacity.py                       # 128-d keys, 128 fp16 values: ~1 min
    python bench/bench_capacity.py --dim 768 --value-dim 0 --pod-ram 512GiB
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memoryd.api import BankSpec  # noqa: E402
from memoryd.arrays import VALUE_DTYPES  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.sizes import format_size, parse_size  # noqa: E402
from memoryd.storage import wal as wal_mod  # noqa: E402

TIERS = ("ram", "disk", "gpu")
CHECKPOINT_COPIES = 2      # row files: the current generation + the one a checkpoint writes


def keys(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def values(k: np.ndarray, vdim: int, dtype: str) -> np.ndarray | None:
    if not vdim:
        return None
    reps = -(-vdim // k.shape[1])
    return np.tile(k, (1, reps))[:, :vdim].astype(VALUE_DTYPES[dtype])


def snapshot(mem_dir: Path) -> dict[str, int]:
    with LocalMemory(mem_dir, reap_interval=None) as mem:   # reopened: all in checkpoint files
        info = mem.bank_info("b")
    out = {"count": info.count, "used": info.used_bytes, "data": info.data_bytes}
    out.update({t: info.tier_bytes.get(t, 0) for t in TIERS})
    return out


def measure(root: Path, label: str, index: str, tier: str, rows: int, dim: int, vdim: int,
            vdtype: str, batch: int) -> dict:
    """Per-key and fixed bytes of one kind of bank, by difference of two sizes."""
    data_dir = root / label.replace(",", "_").replace(" ", "_")
    half = rows // 2
    t0 = time.perf_counter()
    with LocalMemory(data_dir, reap_interval=None) as mem:
        mem.create_bank(BankSpec("b", dim=dim, value_dim=vdim, value_dtype=vdtype,
                                 index=index, tier=tier))
        # the first add trains an IVF index: all of the first half in one batch
        k = keys(half, dim, 0)
        mem.add("b", k, values(k, vdim, vdtype))
    a = snapshot(data_dir)
    with LocalMemory(data_dir, reap_interval=None) as mem:
        for start in range(half, rows, batch):
            k = keys(min(batch, rows - start), dim, start)
            mem.add("b", k, values(k, vdim, vdtype))
    b = snapshot(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    dn = b["count"] - a["count"]
    per = {f: (b[f] - a[f]) / dn for f in ("used", "data", *TIERS)}
    fixed = {f: max(0.0, b[f] - b["count"] * per[f]) for f in ("used", *TIERS)}
    return {"label": label, "index": index, "tier": tier, "per": per, "fixed": fixed,
            "seconds": time.perf_counter() - t0, "note": ""}


def extrapolate_nlist(r: dict, measured: int, target: int, dim: int, metric: str = "l2") -> dict:
    """r (an IVF<measured> bank) as IVF<target>: the fixed part with target coarse
    centroids, and the per-key charge of memoryd's accounting for the target spec
    (fx.bytes_per_vector counts faiss's sa_code_size, which includes the list
    number: 1 byte up to 256 lists, 2 up to 65536)."""
    from memoryd.storage import faiss_index as fx

    spec_m, spec_t = r["index"], r["index"].replace(f"IVF{measured},", f"IVF{target},")
    bpv_m = fx.bytes_per_vector(fx.build(dim, spec_m, metric), dim)
    bpv_t = fx.bytes_per_vector(fx.build(dim, spec_t, metric), dim)
    measured_index = r["per"]["used"] - r["per"]["data"]
    if abs(measured_index - bpv_m) > 0.5:
        raise SystemExit(f"{spec_m}: the bank charged {measured_index:.1f} B/key for its index, "
                         f"bytes_per_vector says {bpv_m}: the extrapolation's premise is wrong")
    per = dict(r["per"])
    per["used"] += bpv_t - bpv_m
    if r["tier"] == "ram":          # mmap: the codes are mapped, RAM holds the ids (8 B)
        per["ram"] += bpv_t - bpv_m
    extra = (target - measured) * dim * 4          # float32 centroids of the flat quantizer
    fixed = dict(r["fixed"])
    fixed["used"] += extra
    fixed["ram"] += extra                          # the quantizer is never mapped
    fixed["disk"] += 2 * extra                     # trained.faiss + the index snapshot
    label = r["label"].replace(f"IVF{measured},", f"IVF{target},")
    return {**r, "label": label, "fixed": fixed, "per": per,
            "note": f"measured as {spec_m} ({bpv_m} B/key for the index); {spec_t} charges "
                    f"{bpv_t} (its list number takes {bpv_t - bpv_m} B more in "
                    f"fx.bytes_per_vector) and holds {target - measured:,} x {dim} float32 "
                    f"centroids more ({format_size(extra)}), added analytically to RAM and to "
                    f"both copies on disk (trained.faiss, the index snapshot)"}


def daemon_rss(root: Path) -> int | None:
    """VmRSS of an idle `memoryd serve` on an empty data dir (bytes), or None."""
    data_dir = root / "rss"
    sock = f"unix://{data_dir}/memoryd.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "memoryd.daemon.cli", "serve",
                             "--data-dir", str(data_dir), "--listen", sock, "--log-level", "error"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ok = subprocess.run([sys.executable, "-m", "memoryd.daemon.cli", "health", "--address",
                             sock, "--wait", "60"], env=env, capture_output=True).returncode == 0
        if not ok:
            return None
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def log_bound(bank_bytes: float) -> float:
    """The most a bank's write-ahead log holds: a checkpoint is due past
    max(CHECKPOINT_LOG_BYTES, bank_bytes / 4) (memoryd.storage.wal.checkpoint_due)."""
    return max(wal_mod.CHECKPOINT_LOG_BYTES, bank_bytes / 4)


def plan(r: dict, n_keys: int, usable_ram: float, pvc_max: int) -> dict:
    """Shards (pods) for n_keys keys of kind r: enough RAM, and a PVC no larger than pvc_max."""
    per, fixed = r["per"], r["fixed"]

    def pvc(keys_per_shard: float) -> float:
        return (CHECKPOINT_COPIES * (keys_per_shard * per["disk"] + fixed["disk"])
                + log_bound(keys_per_shard * per["used"] + fixed["used"]))

    shards, binding = 1, "-"
    for _ in range(100_000):
        kps = n_keys / shards
        ram_ok = kps * per["ram"] + fixed["ram"] <= usable_ram
        disk_ok = pvc(kps) <= pvc_max
        if ram_ok and disk_ok:
            break
        binding = "RAM" if not ram_ok else "PVC"
        shards = max(shards + 1, math.ceil(shards * 1.01))
    kps = math.ceil(n_keys / shards)
    return {"shards": shards, "keys_per_shard": kps, "binding": binding,
            "ram": kps * per["ram"] + fixed["ram"], "gpu": kps * per["gpu"] + fixed["gpu"],
            "disk": kps * per["disk"] + fixed["disk"], "pvc": pvc(kps),
            "total": {t: n_keys * per[t] + shards * fixed[t] for t in ("used", *TIERS)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python bench/bench_capacity.py --dim 256")
    ap.add_argument("--keys", type=float, default=1e9, help="keys to plan for (default 1e9)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--value-dim", type=int, default=128, help="0: keys only")
    ap.add_argument("--value-dtype", default="float16", choices=list(VALUE_DTYPES))
    ap.add_argument("--rows", type=int, default=20_000, help="rows of each measured bank")
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--nlist", type=int, default=65536, help="IVF lists planned for")
    ap.add_argument("--measure-nlist", type=int, default=256,
                    help="IVF lists of the measured bank (<= rows/2/39 trains cleanly)")
    ap.add_argument("--pod-ram", default="256GiB", help="RAM of one shard pod (memory limit)")
    ap.add_argument("--headroom", type=float, default=0.7, help="share of --pod-ram for banks")
    ap.add_argument("--pvc-max", default="16TiB", help="largest PVC one pod may have")
    ap.add_argument("--no-rss", action="store_true", help="skip the idle daemon's RSS")
    a = ap.parse_args()
    n_keys = int(a.keys)
    pod_ram, pvc_max = parse_size(a.pod_ram), parse_size(a.pvc_max)
    usable = pod_ram * a.headroom
    vbytes = a.value_dim * VALUE_DTYPES[a.value_dtype].itemsize
    row = 8 + 4 * a.dim + vbytes
    root = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    m = a.measure_nlist
    kinds = [("Flat", "Flat", "ram"), ("HNSW32", "HNSW32", "ram"),
             (f"IVF{m},PQ16", f"IVF{m},PQ16", "ram"), ("Flat on mmap", "Flat", "mmap"),
             (f"IVF{m},PQ16 on mmap", f"IVF{m},PQ16", "mmap")]
    print(f"capacity on paper: {n_keys:,} keys of {a.dim}-d float32, "
          f"{a.value_dim}-d {a.value_dtype} values (the rows alone: {row} B a key = "
          f"8 id + {4 * a.dim} key + {vbytes} value); measured on banks of "
          f"{a.rows // 2:,} and {a.rows:,} rows in {root}\n")
    results = []
    try:
        for label, index, tier in kinds:
            r = measure(root, label, index, tier, a.rows, a.dim, a.value_dim, a.value_dtype,
                        a.batch)
            if index.startswith("IVF"):
                r = extrapolate_nlist(r, m, a.nlist, a.dim)
            results.append(r)
        rss = None if a.no_rss else daemon_rss(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print("### Bytes per key (memoryd's accounting: BankInfo.used_bytes, data_bytes, tier_bytes)\n")
    print("| bank | charged B/key | data B/key | index B/key | RAM B/key | disk B/key | GPU B/key "
          "| fixed per bank (RAM / disk) | measured in |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        p, f = r["per"], r["fixed"]
        mark = " *" if r["note"] else ""
        print(f"| {r['label']}{mark} | {p['used']:.1f} | {p['data']:.1f} | "
              f"{p['used'] - p['data']:.1f} | {p['ram']:.1f} | {p['disk']:.1f} | {p['gpu']:.1f} | "
              f"{format_size(int(f['ram']))} / {format_size(int(f['disk']))} | "
              f"{r['seconds']:.1f} s |")
    notes = sorted({r["note"] for r in results if r["note"]})
    for n in notes:
        print(f"\n\\* {n}.")
    print("\nGPU: 0 for every bank here (a `gpu` bank keeps its rows in RAM and its index's "
          "bytes, the index column, on the GPU; no faiss-gpu on this host).")

    print(f"\n### {n_keys:,} keys in total (all shards; fixed parts once per shard)\n")
    plans = [plan(r, n_keys, usable, pvc_max) for r in results]
    print("| bank | charged | RAM | disk | GPU |")
    print("|---|---:|---:|---:|---:|")
    for r, p in zip(results, plans):
        t = p["total"]
        print(f"| {r['label']} | {format_size(int(t['used']))} | {format_size(int(t['ram']))} | "
              f"{format_size(int(t['disk']))} | {format_size(int(t['gpu']))} |")

    print(f"\n### Shard pods of {format_size(pod_ram)} RAM ({a.headroom:g} usable: "
          f"{format_size(int(usable))}), PVC at most {format_size(pvc_max)}\n")
    print("| bank | shards | keys per shard | RAM per pod (banks) | memory limit | disk per pod "
          "| PVC per pod (disk x2 + log) | bound by |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, p in zip(results, plans):
        limit = format_size(pod_ram) if p["ram"] > 0.05 * usable else "(page cache)"
        print(f"| {r['label']} | {p['shards']} | {p['keys_per_shard']:,} | "
              f"{format_size(int(p['ram']))} | {limit} | {format_size(int(p['disk']))} | "
              f"{format_size(int(p['pvc']))} | {p['binding']} |")
    print("\nThe mmap tier keeps rows and flat codes on the PVC and pages them in: its RAM is "
          "what is not mapped (IVF lists' ids, the coarse quantizer; nothing for Flat), and a "
          "search touches pages at the speed of the disk unless the page cache holds them: "
          "size RAM for the hot part, the PVC for the whole.")
    if rss is not None:
        print(f"\nAn idle `memoryd serve` (empty data dir) holds {format_size(rss)} RSS "
              f"(python, grpc, faiss, numpy): part of the {1 - a.headroom:.0%} headroom.")


if __name__ == "__main__":
    main()
