"""End-to-end demo on the embedded defaults: a real daemon, memctl, and the
Python client, with a SQLite catalog in a local data dir (./demo-data).

    ./dev demo

1. starts `memoryd serve --data-dir demo-data` (unix socket, SQLite catalog)
2. memctl: create a frozen base bank and a domain bank, import npy files,
   list, search, status; a write over quota is refused, a resize admits it
3. Python: MemoryClient searches base+domain at once (one merged top-k) and
   checks it against an exact brute-force answer
4. SIGTERM, restart: everything acknowledged is still there
5. the same data dir opened in-process with LocalMemory (no daemon)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "demo-data"
BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def memctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "memctl"), *args]
    print("$ memctl " + " ".join(args), flush=True)
    env = {**os.environ, "MEMCTL_ADDRESS": ADDRESS}  # or --address on each command
    r = subprocess.run(cmd, text=True, capture_output=True, env=env)
    out = (r.stdout + r.stderr).rstrip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if check and r.returncode != 0:
        raise SystemExit(f"memctl failed with exit code {r.returncode}")
    return r


def start_daemon() -> subprocess.Popen:
    print(f"$ memoryd serve --data-dir {DATA.name}", flush=True)
    proc = subprocess.Popen([str(BIN / "memoryd"), "serve", "--data-dir", str(DATA),
                             "--log-level", "warning"])
    from memoryd.daemon.server import wait_serving
    wait_serving(ADDRESS, timeout=60, proc=proc)
    return proc


def stop_daemon(proc: subprocess.Popen) -> None:
    print("$ kill -TERM memoryd   # graceful: finish calls, flush, close", flush=True)
    proc.send_signal(signal.SIGTERM)
    print(f"  memoryd exited with code {proc.wait(120)}", flush=True)


def data(rng, n, d, centers):
    x = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    global ADDRESS
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir()
    ADDRESS = f"unix://{DATA / 'memoryd.sock'}"
    rng = np.random.default_rng(7)
    d = 64
    centers = rng.standard_normal((256, d))
    base_k, base_v = data(rng, 20_000, d, centers), rng.standard_normal((20_000, d)).astype(np.float32)
    med_k, med_v = data(rng, 3_000, d, centers), rng.standard_normal((3_000, d)).astype(np.float32)
    queries = data(rng, 64, d, centers)
    for name, arr in [("base_keys", base_k), ("base_values", base_v), ("med_keys", med_k),
                      ("med_values", med_v), ("queries", queries)]:
        np.save(DATA / f"{name}.npy", arr)

    step("1. the daemon")
    proc = start_daemon()
    try:
        step("2. memctl: banks, import, freeze, search, quota")
        memctl("bank", "create", "wiki", "--kind", "base", "--dim", str(d), "--value-dim", str(d),
               "--value-dtype", "float16", "--quota", "50MB", "--index", "HNSW32")
        memctl("import", "wiki", str(DATA / "base_keys.npy"), str(DATA / "base_values.npy"), "--quiet")
        memctl("bank", "freeze", "wiki")
        memctl("bank", "create", "med", "--kind", "domain", "--dim", str(d), "--value-dim", str(d),
               "--value-dtype", "float16", "--quota", "100KB")
        r = memctl("import", "med", str(DATA / "med_keys.npy"), str(DATA / "med_values.npy"),
                   "--quiet", check=False)
        assert r.returncode != 0, "an import over quota must be refused"
        memctl("bank", "resize", "med", "--quota", "10MB")
        memctl("import", "med", str(DATA / "med_keys.npy"), str(DATA / "med_values.npy"), "--quiet")
        memctl("import", "wiki", str(DATA / "med_keys.npy"), str(DATA / "med_values.npy"),
               "--quiet", check=False)  # frozen: refused
        memctl("bank", "list")
        memctl("search", "wiki,med", str(DATA / "queries.npy"), "-k", "4", "--limit-queries", "2")
        memctl("status")

        step("3. Python: one merged top-k over base + domain, checked against brute force")
        from knnlayer import MemoryClient
        with MemoryClient(ADDRESS) as mem:
            res = mem.search(["wiki", "med"], queries, k=16, values=True)
            union = np.concatenate([base_k, med_k])
            exact = np.argsort(((queries[:, None] - union[None]) ** 2).sum(-1), axis=1)[:, :16]
            got = np.where(res.bank == 0, res.ids, res.ids + len(base_k))
            recall = np.mean([len(set(g) & set(e)) / 16 for g, e in zip(got, exact)])
            print(f"  ids {res.ids.shape} {res.ids.dtype}, scores {res.scores.dtype}, "
                  f"values {res.values.shape} {res.values.dtype}, mask all {res.mask.all()}")
            print(f"  results from base: {(res.bank == 0).sum()}, from med: {(res.bank == 1).sum()}; "
                  f"recall@16 vs exact: {recall:.3f}")
            before = mem.search(["wiki", "med"], queries, k=16, values=True)
            same = all(np.array_equal(getattr(res, f), getattr(before, f))
                       for f in ("ids", "scores", "bank", "values"))
            # the first reply came through the socket; the second, like every later
            # one, through a reply buffer (shared memory), with the same bytes
            print(f"  replies now travel through: {mem.reply_buffers}; same results: {same}")
    finally:
        stop_daemon(proc)

    step("4. restart: everything acknowledged is still there")
    proc = start_daemon()
    try:
        from knnlayer import MemoryClient
        with MemoryClient(ADDRESS) as mem:
            after = mem.search(["wiki", "med"], queries, k=16, values=True)
            same = np.array_equal(before.ids, after.ids) and np.array_equal(before.values, after.values)
            print(f"  counts: {[(b.name, b.count, b.frozen) for b in mem.list_banks()]}")
            print(f"  search results identical after restart: {same}")
            assert same
    finally:
        stop_daemon(proc)

    step("5. embedded: LocalMemory on the same data dir, no daemon")
    from memoryd.engine import LocalMemory
    with LocalMemory(DATA) as mem:
        local = mem.search(["wiki", "med"], queries, k=16, values=True)
        print(f"  LocalMemory gives the daemon's answer: {np.array_equal(local.ids, before.ids)}")
        assert np.array_equal(local.ids, before.ids)
    print("\ndemo finished: data left in", DATA)


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
