"""memoryd session memory: append throughput with read-your-writes, in-process vs daemon.

Sessions are the write path of inference: a model appends what it just saw
(keys + values) and its next search, naming the session next to a base bank,
must find it. Two backends, each with its own copy of one data dir (a base
bank of 100k x 128-d clustered unit keys, HNSW32, 128-d fp16 values):

  local      LocalMemory in this process
  daemon     MemoryClient -> `memoryd serve` in another process, unix socket

(1) Throughput. A round opens a fresh session, appends --batches batches of
    --batch memories (128-d fp32 keys + 128-d fp16 values, default), and
    closes it; only the appends are timed (open/close are not). Each backend
    runs it twice: appends alone, and each append followed at once by a
    read-your-writes search -- --verify rows of the batch just appended
    (first, last and random ones) as queries, k=1, banks [session, base] --
    asserting that every query finds its own row (same id, from the
    session). The four paths are timed in interleaved rounds, median of
    --repeat.

(2) Latency an append adds to the next search. A session fills batch by
    batch; after each append comes a search (nq queries, k=32, values,
    banks [session, base]) -- "after append" -- and then the same search
    again with other queries -- "no append before it" -- so both see the same
    session size. p50/p99 over --latency-samples appends, per backend and nq.

Prints markdown tables.

    python bench/bench_sessions.py                       # ~1 min on 2 cores
    python bench/bench_sessions.py --data-dir /tmp/bs    # keep the base bank for reruns
    python bench/bench_sessions.py --py-spy daemon.txt  # sample the daemon's threads (py-spy on PATH)
"""
from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memoryd.api import BankSpec, SessionSpec  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.daemon.server import spawn  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402

BASE = "base"


def clustered_unit(n: int, d: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Keys with structure (a Gaussian mixture on the sphere), as data keys have."""
    x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, d), np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(root: Path, a) -> None:
    """root/local: the base bank; root/daemon: a copy of it (each backend owns a data dir)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4096, a.dim)).astype(np.float32)
    t = time.perf_counter()
    with LocalMemory(root / "local", reap_interval=None) as mem:
        mem.create_bank(BankSpec(BASE, dim=a.dim, value_dim=a.dim, value_dtype=a.value_dtype,
                                 index=a.index, kind="base"))
        for start in range(0, a.n, 50_000):
            m = min(a.n, start + 50_000) - start
            mem.add(BASE, clustered_unit(m, a.dim, rng, centers),
                    rng.standard_normal((m, a.dim), np.float32))
            print(f"  built {start + m:,}/{a.n:,} rows  {time.perf_counter() - t:.0f}s", file=sys.stderr)
    np.save(root / "centers.npy", centers)
    shutil.copytree(root / "local", root / "daemon")


def start_daemon(data_dir: Path) -> tuple[subprocess.Popen, str]:
    return spawn(data_dir)


def start_py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling every thread of the daemon (cProfile would see only its
    main thread; RPCs run in a thread pool). Stopped with SIGINT, it writes
    `out`: raw collapsed stacks for .txt, speedscope for .json, else an SVG."""
    exe = shutil.which("py-spy")
    if exe is None:
        sys.exit("--py-spy: no py-spy on PATH (pip install py-spy)")
    fmt = {".txt": "raw", ".json": "speedscope"}.get(out.suffix, "flamegraph")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--threads", "--rate", "100",
                             "--format", fmt, "--output", str(out)])


def close_leftover_sessions(mem) -> None:
    """A run killed half-way leaves sessions in a reused data dir: end them."""
    for s in mem.list_sessions():
        mem.close_session(s.session_id)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="rows of the base bank")
    p.add_argument("--dim", type=int, default=128, help="key dim = value dim")
    p.add_argument("--value-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--index", default="HNSW32", help="base bank index (session banks are Flat)")
    p.add_argument("--batch", type=int, default=1024, help="memories per append")
    p.add_argument("--batches", type=int, default=32, help="appends per session (one timed round)")
    p.add_argument("--verify", type=int, default=8,
                   help="rows of each batch searched back (k=1) in the read-your-writes loop")
    p.add_argument("--repeat", type=int, default=15, help="throughput rounds (median)")
    p.add_argument("--k", type=int, default=32, help="k of the latency searches")
    p.add_argument("--nq", default="1,32", help="query counts of the latency searches")
    p.add_argument("--latency-samples", type=int, default=256,
                   help="appends per (backend, nq) in the latency part")
    p.add_argument("--data-dir", type=Path, help="reuse the base bank built by an earlier run")
    p.add_argument("--py-spy", type=Path, metavar="OUT",
                   help="profile the daemon with py-spy (all threads) for the whole run")
    a = p.parse_args()
    nqs = [int(x) for x in a.nq.split(",")]

    root = a.data_dir or Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    if not (root / "centers.npy").exists():
        print(f"building {a.n:,} x {a.dim} {a.index} base bank in {root}", file=sys.stderr)
        build(root, a)
    rng = np.random.default_rng(1)
    centers = np.load(root / "centers.npy")
    vdt = np.dtype(a.value_dtype)
    batches = [(clustered_unit(a.batch, a.dim, rng, centers),
                rng.standard_normal((a.batch, a.dim), np.float32).astype(vdt))
               for _ in range(a.batches)]
    queries = clustered_unit(8192, a.dim, rng, centers)
    # rows searched back after each append: first, last, and random ones between
    probe = np.unique(np.concatenate([[0, a.batch - 1],
                                      rng.choice(a.batch, max(a.verify - 2, 0), replace=False)]))[:a.verify]
    spec = SessionSpec(dim=a.dim, value_dim=a.dim, value_dtype=a.value_dtype)
    per_round = a.batch * a.batches
    row_bytes = a.dim * 4 + a.dim * vdt.itemsize

    def fill(mem, ryw: bool) -> float:
        """Seconds for one session's appends (with or without read-your-writes search)."""
        sid = mem.open_session(spec).session_id
        try:
            t = time.perf_counter()
            for keys, vals in batches:
                ids = mem.append(sid, keys, vals)
                if ryw:
                    r = mem.search([sid, BASE], keys[probe], 1, values=False)
                    if not ((r.ids[:, 0] == ids[probe]).all() and (r.bank[:, 0] == 0).all()):
                        raise AssertionError(f"read-your-writes failed: got ids {r.ids[:, 0]} "
                                             f"banks {r.bank[:, 0]}, appended {ids[probe]}")
            return time.perf_counter() - t
        finally:
            mem.close_session(sid)

    proc, address = start_daemon(root / "daemon")
    spy = start_py_spy(proc.pid, a.py_spy) if a.py_spy else None
    try:
        with LocalMemory(root / "local") as local, MemoryClient(address) as client:
            close_leftover_sessions(local)
            close_leftover_sessions(client)
            backends = {"local": local, "daemon": client}

            # (1) throughput, interleaved rounds
            paths = {(b, ryw): (lambda m=m, ryw=ryw: fill(m, ryw))
                     for ryw in (False, True) for b, m in backends.items()}
            for fn in paths.values():
                fn()  # warm-up
            times: dict = {key: [] for key in paths}
            t0 = time.perf_counter()
            for _ in range(a.repeat):
                for key, fn in paths.items():
                    times[key].append(fn())
            print(f"  throughput: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            med = {key: statistics.median(ts) for key, ts in times.items()}

            # (2) latency of the search right after an append, interleaved per append
            t0 = time.perf_counter()
            lat = {(b, nq, what): [] for b in backends for nq in nqs
                   for what in ("append", "after", "steady")}
            qpos = 0
            for nq in nqs:
                done = 0
                while done < a.latency_samples:
                    sids = {b: m.open_session(spec).session_id for b, m in backends.items()}
                    for keys, vals in batches[: a.latency_samples - done]:
                        for b, m in backends.items():
                            banks = [sids[b], BASE]
                            q1 = queries[qpos % 8192: qpos % 8192 + nq]
                            q2 = queries[(qpos + nq) % 8192: (qpos + nq) % 8192 + nq]
                            lat[b, nq, "append"].append(_call_ms(lambda: m.append(sids[b], keys, vals)))
                            lat[b, nq, "after"].append(_call_ms(lambda: m.search(banks, q1, a.k)))
                            lat[b, nq, "steady"].append(_call_ms(lambda: m.search(banks, q2, a.k)))
                        qpos = (qpos + 2 * nq) % (8192 - 2 * nq)
                        done += 1
                    for b, m in backends.items():
                        m.close_session(sids[b])
            print(f"  latency: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(120)
        proc.terminate()
        proc.wait(120)
        if a.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)

    vname = "fp16" if vdt == np.float16 else "fp32"
    print(f"\nbase bank: {a.n:,} x {a.dim}-d keys, {a.index}, {a.dim}-d {vname} values; "
          f"sessions: Flat, {a.dim}-d fp32 keys + {a.dim}-d {vname} values "
          f"({row_bytes} B/memory)\n")
    print(f"appends of {a.batch:,} memories, {a.batches} per session ({per_round:,} memories, timed), "
          f"median of {a.repeat} interleaved rounds; read-your-writes: after each append, "
          f"{len(probe)} of its rows searched back (k=1, banks [session, base]) and checked\n")
    print("| path | read-your-writes search | s per round | memories/s | MiB/s | daemon / in-process |")
    print("|---|---|---:|---:|---:|---:|")
    for ryw in (False, True):
        for b, label in (("local", "LocalMemory.append (in-process)"),
                         ("daemon", "MemoryClient.append (daemon, unix socket)")):
            t = med[b, ryw]
            ratio = "" if b == "local" else f"{med['local', ryw] / t:.0%}"
            print(f"| {label} | {'yes' if ryw else 'no'} | {t:.3f} | {per_round / t:,.0f} | "
                  f"{per_round * row_bytes / t / 2**20:,.0f} | {ratio} |")

    print(f"\nsearch (k={a.k}, values, banks [session, base]) right after an append of "
          f"{a.batch:,} vs with no append before it; sessions of up to {a.batches * a.batch:,} "
          f"memories; {a.latency_samples} appends per row\n")
    print("| backend | nq | append p50 / p99 (ms) | search after append p50 / p99 (ms) | "
          "search, no append before p50 / p99 (ms) | added by the append p50 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for b, label in (("local", "LocalMemory"), ("daemon", "MemoryClient (daemon)")):
        for nq in nqs:
            ap, af, st = (np.array(lat[b, nq, w]) for w in ("append", "after", "steady"))
            print(f"| {label} | {nq} | {_pp(ap)} | {_pp(af)} | {_pp(st)} | "
                  f"{np.percentile(af, 50) - np.percentile(st, 50):+.3f} |")

    print()
    for ryw in (False, True):
        rate = per_round / med["daemon", ryw]
        share = med["local", ryw] / med["daemon", ryw]
        tag = "with" if ryw else "without"
        print(f"targets ({tag} read-your-writes search): daemon >= 100,000 memories/s: "
              f"{'met' if rate >= 100_000 else 'MISSED'} ({rate:,.0f}); daemon >= 50% of in-process: "
              f"{'met' if share >= 0.5 else 'MISSED'} ({share:.0%})")


def _pp(ms: np.ndarray) -> str:
    return f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}"


def _call_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


if __name__ == "__main__":
    main()
