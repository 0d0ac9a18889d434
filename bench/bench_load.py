"""memoryd under load: N concurrent clients on loopback, a mixed workload, a bounded time.

Starts a real `memoryd serve` subprocess in a temp data dir (listening on
127.0.0.1:0, loopback TCP, by default; --unix: its unix socket, with the
client's default there, reply buffers), creates one base bank through the
daemon (default 100k x 64-d clustered unit keys, HNSW32, 64-d fp16 values;
this process never opens the data dir itself), then for N in --clients
(default 1, 8, 32) runs N client processes (multiprocessing, started once and
reused: one process per client, each with its own MemoryClient made afresh
for every N, so the load generator is not one interpreter's GIL) for
--seconds each. Every client opens its own session (64-d fp32 keys, 64-d
fp16 values, FIFO under a 64 MiB quota), then loops over a random mix
(--mix, default search=70,append=20,admin=10):

  search   k=--k over [base, its own session], --nq queries (default 8, k=16),
           values returned
  append   --append-rows (16) rows into its own session
  admin    one of bank_info(base), list_banks(), stats(), in turn

Each call is timed in the client (time.monotonic around the MemoryClient
call); any exception counts as an error, kept with its class and status
code. When the time is up every client closes its session (so what the
sessions held can be freed) and its client. The whole sweep over N is one
run; --runs (3) runs follow one another against the same daemon.

Reading the tables:

  ops/s       calls completed per second by all N clients together (over the
              measured window: from the common start to the last call's end)
  p50 / p99   per call kind, ms, over all calls of that kind in that row
  errors      must be 0; any error makes the exit code non-zero (and the
              errors are listed by kind, class and status code)
  RSS         the daemon's VmRSS (/proc/<pid>/status), MiB, when the row's
              clients start (before they connect) and once they have all
              closed their sessions and gone

After the runs: the daemon's RSS after each run (read --settle seconds after
its last client left), its thread count, the sessions still open (must be 0),
and the growth from run 1's end to run 3's end. Run 1 warms the daemon (gRPC
and RPC worker threads, malloc arenas, FAISS scratch, catalog caches), so the
check is between the last two runs: RSS may grow by at most --max-growth-mib
(default 16 MiB) from the end of run R-1 to the end of run R, else the exit
code is non-zero; so do sessions still open after a run. Why 16 MiB: glibc
keeps freed memory in per-thread arenas, and which of the 16+ daemon threads
serves which call changes from run to run, so the RSS of an idle-again daemon
moves by a few MiB either way (-7 to +4 MiB in trial runs here); a leak is
what keeps growing. With the defaults a run makes ~8k calls (the summary
prints them), so 16 MiB catches a leak of more than ~2 KiB per call (the
summary prints that figure for the run at hand). Whole sessions that were not
freed would show only if their data were large: one run writes ~10 MiB into
sessions here (printed as "session data written"), under the bound, which is
why the count of open sessions is checked directly.

The load generator and the daemon share the machine's cores, so on a small
machine the throughput is a lower bound of what the daemon serves, and the
latencies include waiting for a core.

    python bench/bench_load.py                         # ~2.5 min on 2 busy cores
    python bench/bench_load.py --seconds 3 --runs 1    # a quick look
    python bench/bench_load.py --clients 1,4 --mix search=100 --unix
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from memoryd.api import BankQuery, BankSpec, SessionSpec  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402

BASE = "base"
KINDS = ("search", "append", "admin")
ADMIN_CALLS = ("bank_info", "list_banks", "stats")
SESSION_QUOTA = 64 << 20
CALL_TIMEOUT_S = 60.0                 # a hung call becomes DEADLINE_EXCEEDED, an error


def clustered_unit(n: int, d: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """Keys with structure (a Gaussian mixture on the sphere), as data keys have."""
    x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, d), np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix: want e.g. search=70,append=20,admin=10; "
                                             f"got {part!r}")
        mix[name] = float(weight)
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix: the weights must add up to more than 0")
    return mix


# ---- the daemon -------------------------------------------------------------------

def start_daemon(data_dir: Path, unix: bool, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`memoryd serve` on 127.0.0.1:0 or on its unix socket; the address is read
    from its 'memoryd started' log line (logged once it serves). Not
    memoryd.daemon.server.wait_serving: that module would load the engine
    (faiss) in every client process, which only needs the client."""
    listen = [] if unix else ["--listen", "127.0.0.1:0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORYD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "memoryd.daemon.cli", "serve",
                                 "--data-dir", str(data_dir), "--log-level", "info", *listen],
                                stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 120
    address = None
    while address is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_daemon(proc)
            raise RuntimeError(f"memoryd did not start:\n{log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "memoryd started":
                address = entry["fields"]["address"]
        time.sleep(0.05)
    with MemoryClient(address, timeout=10) as probe:
        probe.ping(b"x")
    return proc, address


def stop_daemon(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (KiB) and Threads of a live process, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
            out[key] = int(value.split()[0])
    return out


def rss_mib(pid: int) -> float:
    return proc_status(pid)["VmRSS"] / 1024


def build(client: MemoryClient, a) -> None:
    """The base bank, written through the daemon (the data dir is the daemon's alone)."""
    if any(b.name == BASE for b in client.list_banks()):
        return
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4096, a.dim)).astype(np.float32)
    client.create_bank(BankSpec(BASE, dim=a.dim, value_dim=a.dim, value_dtype="float16",
                                index=a.index, kind="base"))
    t = time.perf_counter()
    for start in range(0, a.n, 25_000):
        m = min(a.n, start + 25_000) - start
        client.add(BASE, clustered_unit(m, a.dim, rng, centers),
                   rng.standard_normal((m, a.dim), np.float32).astype(np.float16))
        print(f"  built {start + m:,}/{a.n:,} rows  {time.perf_counter() - t:.0f}s",
              file=sys.stderr)


# ---- one client (a process of its own) --------------------------------------------

def client_main(conn, address: str, index: int) -> None:
    """Serve jobs from the parent: ('prepare', job) -> 'ready'; ('go', start_at) ->
    results; None -> exit. One fresh MemoryClient and session per job."""
    try:
        conn.send("up")                         # imports done
        while True:
            msg = conn.recv()
            if msg is None:
                return
            _, job = msg
            try:
                conn.send(run_client(conn, address, index, job))
            except Exception:  # noqa: BLE001 - the parent reports it and fails the run
                conn.send({"fatal": traceback.format_exc()})
    except (EOFError, KeyboardInterrupt):
        return


def run_client(conn, address: str, index: int, job: dict) -> dict:
    rng = np.random.default_rng([job["seed"], index])
    dim, nq, k, rows = job["dim"], job["nq"], job["k"], job["append_rows"]
    kinds = list(job["mix"])
    weights = np.array([job["mix"][kk] for kk in kinds], float)
    weights /= weights.sum()
    centers = rng.standard_normal((256, dim)).astype(np.float32)
    # Inputs drawn up front, so the loop times calls, not numpy.
    pool = 64
    queries = [clustered_unit(nq, dim, rng, centers) for _ in range(pool)]
    appends = [(clustered_unit(rows, dim, rng, centers),
                rng.standard_normal((rows, dim), np.float32).astype(np.float16))
               for _ in range(pool)]
    plan = rng.choice(len(kinds), size=1 << 16, p=weights)

    lat: dict[str, list[float]] = {name: [] for name in (*KINDS, *ADMIN_CALLS)}
    errs: Counter = Counter()
    samples: dict[str, str] = {}

    def failed(kind: str, e: Exception) -> None:
        key = f"{kind} {type(e).__name__} {getattr(e, 'code', '?')}"
        errs[key] += 1
        samples.setdefault(key, str(e)[:300])

    client = MemoryClient(address, timeout=CALL_TIMEOUT_S, reply_buffers=job["unix"] or None,
                          client_name=f"bench-load-{index}")
    sid = None
    try:
        try:
            sid = client.open_session(SessionSpec(
                dim=dim, value_dim=dim, value_dtype="float16", ttl_idle_s=600,
                quota_bytes=SESSION_QUOTA, eviction="fifo")).session_id
            stack = [BankQuery(BASE), BankQuery(sid)]
            client.append(sid, *appends[0])                     # warm-up, not timed
            client.search(stack, queries[0], k, values=True)
        except Exception as e:  # noqa: BLE001
            failed("setup", e)
            stack = [BankQuery(BASE)]
        admin = [lambda: client.bank_info(BASE), client.list_banks, client.stats]
        conn.send("ready")
        _, start_at = conn.recv()
        while time.monotonic() < start_at:
            time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
        end_at = start_at + job["seconds"]
        i = n_admin = 0
        last = start_at
        while True:
            t0 = time.monotonic()
            if t0 >= end_at:
                break
            kind = kinds[plan[i % len(plan)]]
            sub = kind
            try:
                if kind == "search":
                    r = client.search(stack, queries[i % pool], k, values=True)
                    if r.values is None or r.values.shape != (nq, k, dim):
                        raise AssertionError(f"values shape {getattr(r.values, 'shape', None)}")
                elif kind == "append":
                    if sid is None:
                        raise RuntimeError("no session (open_session failed)")
                    client.append(sid, *appends[i % pool])
                else:
                    sub = ADMIN_CALLS[n_admin % 3]
                    n_admin += 1
                    admin[(n_admin - 1) % 3]()
                last = time.monotonic()
                ms = (last - t0) * 1e3
                lat[kind].append(ms)
                if sub != kind:
                    lat[sub].append(ms)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                last = time.monotonic()
                failed(kind if sub == kind else f"{kind}:{sub}", e)
            i += 1
    finally:
        released = 0
        if sid is not None:
            try:
                released = client.close_session(sid)
            except Exception as e:  # noqa: BLE001
                failed("close_session", e)
        client.close()
    return {"lat": {kk: np.asarray(v, np.float32) for kk, v in lat.items()},
            "errors": dict(errs), "samples": samples, "last": last - start_at,
            "appended_rows": len(lat["append"]) * rows, "released": released}


# ---- the parent ---------------------------------------------------------------------

class Clients:
    """max(N) client processes, started once and reused by every run."""

    def __init__(self, count: int, address: str):
        # forkserver, its server having imported the client once: each client is a
        # fork of it (no channel or thread of this process inherited, as with
        # spawn), without spawn's ~1-2 s of imports per client on a loaded machine.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "knnlayer.client", "memoryd.api"])
        self.conns, self.procs = [], []
        for index in range(count):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(child, address, index), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for index, c in enumerate(self.conns):     # no load while others still import
            if self._recv(c, index, 300) != "up":
                raise RuntimeError(f"client {index} did not start")

    def step(self, n: int, job: dict, timeout: float) -> list[dict]:
        """Run job on the first n clients, all starting at the same moment."""
        conns = self.conns[:n]
        for c in conns:
            c.send(("prepare", job))
        results: list[dict | None] = [None] * n
        for i, c in enumerate(conns):
            msg = self._recv(c, i, timeout)
            if msg != "ready":
                results[i] = msg                   # failed before it was ready
        start_at = time.monotonic() + 0.2
        for i, c in enumerate(conns):
            if results[i] is None:
                c.send(("go", start_at))
        for i, c in enumerate(conns):
            if results[i] is None:
                results[i] = self._recv(c, i, job["seconds"] + timeout)
        return results  # type: ignore[return-value]

    def _recv(self, conn, index: int, timeout: float):
        try:
            if not conn.poll(timeout):
                raise RuntimeError(f"client {index} gave no answer within {timeout:.0f} s")
            return conn.recv()
        except (EOFError, OSError):
            self.procs[index].join(5)
            raise RuntimeError(f"client {index} died (exit code "
                               f"{self.procs[index].exitcode})") from None

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def fmt_lat(x: np.ndarray) -> str:
    return f"{pct(x, 50):.2f} / {pct(x, 99):.2f}" if len(x) else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="rows of the base bank")
    p.add_argument("--dim", type=int, default=64, help="key and value dim")
    p.add_argument("--index", default="HNSW32", help="faiss index_factory spec of the base bank")
    p.add_argument("--clients", default="1,8,32", help="the N of the sweep, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per N")
    p.add_argument("--runs", type=int, default=3, help="sweeps, one after the other")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("search=70,append=20,admin=10"))
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--nq", type=int, default=8, help="queries per search")
    p.add_argument("--append-rows", type=int, default=16)
    p.add_argument("--unix", action="store_true",
                   help="the daemon's unix socket (reply buffers) instead of 127.0.0.1 TCP")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds after a run before its RSS is read")
    p.add_argument("--max-growth-mib", type=float, default=16.0,
                   help="RSS growth allowed from the end of run R-1 to the end of run R")
    p.add_argument("--data-dir", type=Path, help="keep the daemon's data dir (reused if it has the bank)")
    a = p.parse_args()
    ns = [int(x) for x in a.clients.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    data_dir = a.data_dir or tmp / "data"
    log_path = tmp / "memoryd.log"
    proc, address = start_daemon(data_dir, a.unix, log_path)
    pid = proc.pid
    failures: list[str] = []
    clients = None
    try:
        with MemoryClient(address, timeout=600) as admin:
            print(f"daemon pid {pid} at {address}; building {a.n:,} x {a.dim} {a.index} bank",
                  file=sys.stderr)
            build(admin, a)
            t = time.perf_counter()
            clients = Clients(max(ns), address)
            job = {"seed": 0, "dim": a.dim, "nq": a.nq, "k": a.k, "append_rows": a.append_rows,
                   "mix": a.mix, "seconds": a.seconds, "unix": a.unix}
            print(f"  {max(ns)} client processes started; daemon RSS {rss_mib(pid):.0f} MiB",
                  file=sys.stderr)
            rows_per_run, after = [], []
            pooled: dict[int, dict[str, list[np.ndarray]]] = {n: {} for n in ns}
            all_errors: Counter = Counter()
            samples: dict[str, str] = {}
            transport = "unix socket, reply buffers" if a.unix else "loopback TCP 127.0.0.1"
            row_bytes = a.dim * 4 + a.dim * 2 + 8           # fp32 key + fp16 value + id
            for run in range(1, a.runs + 1):
                table, appended, calls = [], 0, 0
                for n in ns:
                    job["seed"] = run * 1000 + n
                    rss0 = rss_mib(pid)
                    t_step = time.perf_counter()
                    results = clients.step(n, job, timeout=120)
                    rss1 = rss_mib(pid)
                    print(f"  run {run} N={n}: {time.perf_counter() - t_step:.1f} s",
                          file=sys.stderr)
                    lat: dict[str, list[np.ndarray]] = {}
                    errs: Counter = Counter()
                    window = 0.0
                    for i, r in enumerate(results):
                        if "fatal" in r:
                            errs["client crashed"] += 1
                            samples.setdefault("client crashed", r["fatal"][-600:])
                            continue
                        for kk, v in r["lat"].items():
                            lat.setdefault(kk, []).append(v)
                            pooled[n].setdefault(kk, []).append(v)
                        errs.update(r["errors"])
                        for kk, s in r["samples"].items():
                            samples.setdefault(kk, s)
                        window = max(window, r["last"])
                        appended += r["appended_rows"]
                    cat = {kk: np.concatenate(v) for kk, v in lat.items()}
                    ops = sum(len(cat.get(kk, ())) for kk in KINDS)
                    nerr = sum(errs.values())
                    calls += ops + nerr
                    all_errors.update(errs)
                    table.append((n, ops, ops / window if window else 0.0,
                                  *(fmt_lat(cat.get(kk, np.empty(0))) for kk in KINDS),
                                  nerr, rss0, rss1))
                time.sleep(a.settle)
                st = proc_status(pid)
                open_sessions = len(admin.list_sessions())
                after.append((run, st["VmRSS"] / 1024, st["RssAnon"] / 1024,
                              st.get("RssShmem", 0) / 1024, st["Threads"], open_sessions))
                rows_per_run.append((appended, calls))
                if open_sessions:
                    failures.append(f"run {run}: {open_sessions} sessions still open after it")
                print(f"\nrun {run} of {a.runs}: {a.seconds:g} s per N, {transport}; "
                      f"mix {','.join(f'{kk}={w:g}' for kk, w in a.mix.items())}; "
                      f"search k={a.k} nq={a.nq} values over [base, own session]; "
                      f"append {a.append_rows} rows\n")
                print("| N | ops | ops/s | search p50 / p99 (ms) | append p50 / p99 (ms) "
                      "| admin p50 / p99 (ms) | errors | daemon RSS start -> end (MiB) |")
                print("|---:|---:|---:|---:|---:|---:|---:|---:|")
                for n, ops, rate, s, ap, ad, nerr, r0, r1 in table:
                    print(f"| {n} | {ops:,} | {rate:,.0f} | {s} | {ap} | {ad} | {nerr} "
                          f"| {r0:.0f} -> {r1:.0f} |")
                sys.stdout.flush()

            print(f"\nafter each run (+{a.settle:g} s), daemon /proc/{pid}/status:\n")
            print("| run | calls | session data written (MiB) | VmRSS (MiB) | RssAnon (MiB) "
                  "| RssShmem (MiB) | threads | sessions open |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for (run, rss, anon, shm, threads, nopen), (rows, ncalls) in zip(after, rows_per_run):
                print(f"| {run} | {ncalls:,} | {rows * row_bytes / 2**20:.1f} | {rss:.0f} "
                      f"| {anon:.0f} | {shm:.0f} | {threads} | {nopen} |")
            hwm = proc_status(pid)["VmHWM"] / 1024
            print(f"\ndaemon peak RSS (VmHWM): {hwm:.0f} MiB")
            if len(after) >= 2:
                first, prev, last = after[0][1], after[-2][1], after[-1][1]
                verdict = "ok" if last - prev <= a.max_growth_mib else "OVER THE BOUND"
                print(f"RSS growth, end of run 1 -> end of run {len(after)}: "
                      f"{last - first:+.1f} MiB; end of run {len(after) - 1} -> end of run "
                      f"{len(after)}: {last - prev:+.1f} MiB (bound {a.max_growth_mib:g} MiB: "
                      f"{verdict}; it catches a leak of more than "
                      f"{a.max_growth_mib * 2**20 / max(1, rows_per_run[-1][1]) / 1024:.1f} KiB "
                      f"per call of the last run)")
                if last - prev > a.max_growth_mib:
                    failures.append(f"RSS grew {last - prev:+.1f} MiB between the last two runs")

            print("\nadmin calls by kind, all runs pooled, p50 / p99 (ms):\n")
            print("| N | " + " | ".join(ADMIN_CALLS) + " |")
            print("|---:|" + "---:|" * len(ADMIN_CALLS))
            for n in ns:
                cells = [fmt_lat(np.concatenate(pooled[n][c])) if c in pooled[n] else "-"
                         for c in ADMIN_CALLS]
                print(f"| {n} | " + " | ".join(cells) + " |")
            total_errors = sum(all_errors.values())
            print(f"\nerrors: {total_errors}")
            for key, count in sorted(all_errors.items()):
                print(f"  {count} x {key}: {samples.get(key, '')}")
            if total_errors:
                failures.append(f"{total_errors} errors")
            print(f"\n(wall {time.perf_counter() - t:.0f} s after the build)", file=sys.stderr)
    finally:
        if clients is not None:
            clients.close()
        code = stop_daemon(proc)
        if code != 0:
            failures.append(f"memoryd exited with code {code}; log {log_path}")
        if not failures:
            shutil.rmtree(tmp, ignore_errors=True)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    if failures:
        print(f"daemon log kept: {log_path}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
