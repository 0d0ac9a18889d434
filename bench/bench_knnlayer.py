"""KNN attention benchmark: KNNAttention vs dense memory attention vs self-attention.

One run, one machine, printed as markdown tables and drawn into
bench/knnlayer.png. Every timing is a forward pass under torch.no_grad()
(inference) of B*T = 512 positions x H = 8 heads = 4096 queries, key_dim 128,
value_dim 64, k = 32, unless a table says otherwise.

1. Memory attention over K slots: KNNAttention vs dense attention (softmax
   over all K slots, in torch, chunked over queries and key blocks):
   a. random unit keys (the base bank): product keys (exact top-k at ~sqrt(K)
      cost) and a Flat bank holding the SAME keys and values, K = 10k, 100k,
      1M, and 10M with product keys only (Flat would take ~70 s a forward and
      10 GB; dense at 10M is timed on 1/16 of the queries and scaled).
   b. keys derived from data, from text found on this machine
      (bench/_knn_data.py), K = 10k, 100k, 1M: by default (--text-keys tokens)
      the last-layer hidden states of all-MiniLM-L6-v2, one key per token, as a
      kNN-memory transformer stores them (~40k sentences make 1M keys); queries
      are token states from held-out documents, one per sentence. With
      --text-keys sentences, sentence embeddings instead (K up to ~760k, the
      corpus' size; default 10k, 100k, 300k). PCA'd to 128-d and unit length.
      Flat vs IVF vs HNSW32 with nprobe/efSearch swept on the bank's own index
      and the smallest setting reaching recall@32 >= 0.95 kept (full sweep at
      the largest K); also how many queries have near ties at the top-32
      boundary, recall counting those ties as hits, and the share of queries
      an index all but misses (recall < 0.5: the whole output is off).
   Recall@32 is against the exact top-32 (from the dense pass); the relative
   error ||y - y_exact|| / ||y_exact|| is against exact top-32 attention
   (the same layer on the exact neighbours): what an index can get right. How
   far top-32 attention itself is from dense attention is a separate table.
2. Sequence length N: KNNAttention over a fixed product-key memory (K = 1M),
   run in chunks of 2048 positions, vs standard self-attention (qkv
   projection + scaled_dot_product_attention, flash kernel, 8 heads of 64),
   B = 1, N = 1k..64k; standard attention stops where it would pass
   --seq-limit (60) seconds.
3. The same layer forward with memory=LocalMemory vs memory=MemoryClient to a
   `memoryd serve` subprocess on a copy of its data dir (unix socket): replies
   through reply buffers (shared memory, the default) and through the socket
   alone; under no_grad and with grad (key vectors for Flat banks); the bare
   search beside it.

    python bench/bench_knnlayer.py            # full run: ~15 min on 2 cores once token states are cached
    python bench/bench_knnlayer.py --quick    # smoke run: ~1.5 min once the corpus is cached
    python bench/bench_knnlayer.py --parts text --data-sizes 10k,100k,300k,750k   # one part, other sizes
    python bench/bench_knnlayer.py --parts text --text-keys sentences           # sentence-embedding keys

Banks go to a temp dir (or --data-dir, where banks of the right size are
reused). The first run also builds the text corpus (~2-3 min) and runs the
model on it (token keys, 1M tokens of ~40k sentences: ~1.5-3 min on 2 cores;
sentence keys, 300k sentences: ~12 min on 2 quiet cores, much longer on a busy
machine); all are cached under bench/out/ (git-ignored).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memoryd.api import BankSpec  # noqa: E402
from memoryd.errors import NotFound  # noqa: E402
from memoryd.storage.faiss_index import faiss  # noqa: E402
from memoryd.engine import LocalMemory  # noqa: E402
from memoryd.daemon.server import spawn  # noqa: E402
from knnlayer.attention import KNNAttention  # noqa: E402
from knnlayer.client import MemoryClient  # noqa: E402
from _datadir import served_copy  # noqa: E402  (bench/)

HERE = Path(__file__).resolve().parent
ROWS = 65536


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- timing ----------------------------------------------------------------------------
def interleaved(paths: dict, repeat: int, est: dict[str, float] | None = None,
                min_round: float = 0.5, max_inner: int = 5) -> dict[str, float]:
    """Seconds of each path, timed in rounds (each path in turn, every round).

    A path whose estimated time `est[name]` (from its warm-up call; every path
    must have been called once before) is short is called up to `max_inner`
    times a round (about `min_round` seconds), in sub-rounds that alternate
    the fast paths, so they get enough samples while slow paths next to them
    run `repeat` times only. Returns the median of each path's samples, or
    the smaller of two: this machine is shared, and of two samples the
    smaller is the one a neighbour's burst did not hit.
    """
    est = est or {}
    inner = {name: max(1, min(max_inner, int(min_round / max(est.get(name, min_round), 1e-3))))
             for name in paths}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for j in range(max(inner.values())):
            for name, fn in paths.items():
                if j < inner[name]:
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) if len(ts) >= 3 else min(ts) for name, ts in times.items()}


def timed(fn):
    """(result, seconds) of one call."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def repeats_for(seconds: float, a) -> int:
    """Fewer rounds for slow paths: the run has a time budget."""
    if seconds < 1.0:
        return a.repeat
    if seconds < 8.0:
        return max(1, min(a.repeat, 3))
    if seconds < 40.0:
        return max(1, min(a.repeat, 2))
    return 1


# ---- the layer, dense attention, exact references ----------------------------------------
class Recorder:
    """A memory that remembers the last SearchResult (to score what the layer retrieved)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def search(self, *args, **kwargs):
        self.last = self.inner.search(*args, **kwargs)
        return self.last

    def __getattr__(self, name):
        return getattr(self.inner, name)


def make_layer(memory, bank: str, input_dim: int, a, identity: bool = False) -> KNNAttention:
    torch.manual_seed(0)   # every layer of a table has the same weights
    layer = KNNAttention(input_dim=input_dim, key_dim=a.key_dim, value_dim=a.value_dim,
                         num_heads=a.heads, topk=a.k, memory=memory, banks=[bank]).eval()
    if identity:           # head h's query is input slice h (already a unit key-space vector)
        with torch.no_grad():
            layer.q_proj.weight.copy_(torch.eye(input_dim))
    layer.check_banks()    # as documented: checks dims; product-key banks' keys are then rebuilt from ids
    return layer


def retrieved_ids(layer: KNNAttention, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """One forward through a recording memory: (output, ids (N*H, k))."""
    rec = Recorder(layer.memory)
    layer.memory = rec
    try:
        y = layer(x)
    finally:
        layer.memory = rec.inner
    return y, rec.last.ids


def scaled_queries(layer: KNNAttention, x: torch.Tensor) -> torch.Tensor:
    """(N*H, dk) unit queries times their head's scale, rows in (position, head) order."""
    q = layer.queries(x.reshape(-1, layer.config.input_dim))            # (N, H, dk)
    return (q * layer.scale[None, :, None]).reshape(-1, q.shape[-1])    # (N*H, dk)


def dense_attention(qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    topk: int = 0, block: int = 1 << 26):
    """softmax(qs keys^T) values over ALL K slots, in torch.

    qs (M, dk) already scaled; keys (K, dk); values (K, dv) float32. Chunked
    over queries (512 rows) and, for large K, over blocks of keys with an
    online softmax (running max, sum and output, as flash attention does), so
    the logits in flight stay at `block` floats (256 MB) and every matmul is
    large enough to run near the cores' peak. With topk, also returns the ids
    of the exact top-k per query and the share of the softmax mass they hold.
    """
    M, K = qs.shape[0], keys.shape[0]
    rows = min(M, 512)
    kb = max(4096, block // rows)
    out = torch.empty(M, values.shape[1])
    top_ids = torch.empty(M, topk, dtype=torch.long) if topk else None
    mass = torch.empty(M) if topk else None
    for s in range(0, M, rows):
        q = qs[s:s + rows]
        m = torch.full((len(q), 1), -math.inf)                               # running max
        z = torch.zeros(len(q), 1)                                           # running sum
        acc = torch.zeros(len(q), values.shape[1])                           # running output
        tv = ti = None
        for b in range(0, K, kb):
            logits = torch.mm(q, keys[b:b + kb].T)                           # (rows, kb)
            if topk:
                bv, bi = logits.topk(min(topk, logits.shape[1]), dim=1)
                bi += b
                if tv is not None:
                    bv, j = torch.cat([tv, bv], 1).topk(topk, dim=1)
                    bi = torch.cat([ti, bi], 1).gather(1, j)
                tv, ti = bv, bi
            new_m = torch.maximum(m, logits.amax(1, keepdim=True))
            logits.sub_(new_m).exp_()                                        # in place
            corr = torch.exp(m - new_m)
            z = z * corr + logits.sum(1, keepdim=True)
            acc = acc * corr + torch.mm(logits, values[b:b + kb])
            m = new_m
            del logits
        out[s:s + rows] = acc / z
        if topk:
            top_ids[s:s + rows] = ti
            mass[s:s + rows] = (torch.exp(tv - m).sum(1, keepdim=True) / z)[:, 0]
    return (out, top_ids, mass) if topk else out


def topk_attention(qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """Exact top-k attention: softmax over the given ids only. (M, dv)."""
    kk = keys[ids]                                                        # (M, k, dk)
    w = torch.softmax(torch.einsum("md,mkd->mk", qs, kk), dim=1)          # (M, k)
    return torch.einsum("mk,mkv->mv", w, values[ids])


def recall(ids: np.ndarray, exact: np.ndarray) -> float:
    """Mean |retrieved & exact| / k over queries."""
    ids = np.asarray(ids).reshape(exact.shape)
    hit = (ids[:, :, None] == exact[:, None, :]).any(-1)
    return float(hit.sum(1).mean() / exact.shape[1])


def cosine(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(F.cosine_similarity(y.reshape(ref.shape), ref, dim=1).mean())


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(y.reshape(ref.shape) - ref) / torch.linalg.norm(ref))


def bank_rows(mem, bank: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All keys (K, dk) and values (K, dv) float32 of a bank with ids 0..count-1."""
    info = mem.bank_info(bank).spec
    keys = torch.empty(count, info.dim)
    values = torch.empty(count, info.value_dim)
    for s in range(0, count, ROWS):
        e = min(count, s + ROWS)
        got = mem.get(bank, np.arange(s, e, dtype=np.int64), values=True, keys=True)
        assert got.found.all()
        keys[s:e] = torch.from_numpy(got.keys)
        values[s:e] = torch.from_numpy(got.values.astype(np.float32))
    return keys, values


def exists(mem, bank: str, count: int) -> bool:
    try:
        return mem.bank_info(bank).count == count
    except NotFound:
        return False


# ---- part 1a + 2 + 3: random keys ------------------------------------------------------
def square(k: int) -> int:
    n = math.isqrt(k)
    return n * n if k - n * n <= (n + 1) ** 2 - k else (n + 1) ** 2


def build_random(data_dir: Path, a) -> None:
    with LocalMemory(data_dir) as mem:
        for K in sorted(set(a.sizes + a.pk_only_sizes + [a.seq_bank])):
            pk = f"pk-{K}"
            if not exists(mem, pk, K):
                t = time.perf_counter()
                KNNAttention.create_base_bank(mem, pk, K, a.key_dim, a.value_dim, seed=0,
                                              index="product-keys", value_dtype="float16")
                log(f"  built {pk} (product keys {math.isqrt(K)}^2) in {time.perf_counter() - t:.0f}s")
            flat = f"flat-{K}"
            if K in a.sizes and not exists(mem, flat, K):
                t = time.perf_counter()
                mem.create_bank(BankSpec(flat, dim=a.key_dim, value_dim=a.value_dim, kind="base",
                                         index="Flat", value_dtype="float16"))
                for s in range(0, K, ROWS):   # the product-key bank's own keys and values
                    ids = np.arange(s, min(K, s + ROWS), dtype=np.int64)
                    got = mem.get(pk, ids, values=True, keys=True)
                    mem.add(flat, got.keys, got.values, ids=ids)
                log(f"  built {flat} (same keys and values) in {time.perf_counter() - t:.0f}s")


def part_random(mem, a) -> list[dict]:
    rows = []
    torch.manual_seed(1)
    x = torch.randn(1, a.positions, a.input_dim)
    for K in sorted(set(a.sizes + a.pk_only_sizes)):
        t0 = time.perf_counter()
        pk = make_layer(mem, f"pk-{K}", a.input_dim, a)
        flat = make_layer(mem, f"flat-{K}", a.input_dim, a) if K in a.sizes else None
        keys, values = bank_rows(mem, f"pk-{K}", K)
        # dense over all queries, or (huge K) over the first positions and scaled up
        sub = a.positions if K <= a.dense_full_max else max(1, a.positions // a.dense_subset)
        xs = x[:, :sub]
        qs = scaled_queries(pk, xs)                                   # (sub*H, dk)
        (y_dense, exact, mass), t_ref = timed(lambda: dense_attention(qs, keys, values, topk=a.k))
        y_top = topk_attention(qs, keys, values, exact)
        nq = sub * a.heads
        (y_pk, ids_pk), t_pk = timed(lambda: retrieved_ids(pk, x))    # also the warm-up
        res = {"K": K, "nq_dense": nq, "mass": float(mass.mean()),
               "dense_vs_top": cosine(y_top, y_dense)}
        paths = {"dense": lambda: dense_attention(scaled_queries(pk, xs), keys, values),
                 "product keys": lambda: pk(x)}
        est = {"dense": t_ref, "product keys": t_pk}
        y_flat = ids_flat = None
        if flat is not None:
            (y_flat, ids_flat), est["Flat"] = timed(lambda: retrieved_ids(flat, x))
            paths["Flat"] = lambda: flat(x)
        times = interleaved(paths, repeats_for(sum(est.values()), a), est)
        scale_up = a.positions / sub
        t_dense = times["dense"] * scale_up
        rows.append({**res, "path": "dense (all K slots)", "time": t_dense, "speedup": 1.0,
                     "recall": None, "err": None, "measured_on": nq})
        for name, y, ids in (("Flat", y_flat, ids_flat), ("product keys", y_pk, ids_pk)):
            if y is None:
                continue
            y_sub = y.reshape(a.positions * a.heads, -1)[:nq]
            rows.append({**res, "path": f"KNNAttention, {name}", "time": times[name],
                         "speedup": t_dense / times[name],
                         "recall": recall(np.asarray(ids)[:nq], exact.numpy()),
                         "err": rel_err(y_sub, y_top), "measured_on": a.positions * a.heads})
        log(f"  random K={K:,}: dense {t_dense:.2f}s" + (" (scaled)" if sub < a.positions else "")
            + "".join(f", {n} {times[n]:.3f}s" for n in paths if n != "dense")
            + f"  [{time.perf_counter() - t0:.0f}s]")
        del keys, values
        gc.collect()
    return rows


class SelfAttention(nn.Module):
    """Standard multi-head self-attention: qkv projection + SDPA (flash kernel on CPU)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)                  # (B, H, N, hd)
        return o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)


def part_seq(mem, a) -> list[dict]:
    layer = make_layer(mem, f"pk-{a.seq_bank}", a.input_dim, a)
    torch.manual_seed(0)
    std = SelfAttention(a.input_dim, a.heads, a.value_dim).eval()
    rows, last_std = [], None
    for N in a.seq:
        torch.manual_seed(2)
        x = torch.randn(1, N, a.input_dim)

        def knn():   # in chunks of positions: each position's reads are independent
            return torch.cat([layer(x[:, s:s + a.seq_chunk]) for s in range(0, N, a.seq_chunk)], 1)

        paths = {"knn": knn}
        _, est = timed(knn)                                        # warm-up
        est = {"knn": est}
        predicted = None
        if last_std is not None:
            predicted = last_std[1] * (N / last_std[0]) ** 2
        if predicted is None or predicted <= a.seq_limit:
            paths["std"] = lambda: std(x)
            if predicted is None or predicted < 2:                 # cheap: warm it up too
                _, est["std"] = timed(paths["std"])
            else:
                est["std"] = predicted
        times = interleaved(paths, repeats_for(sum(est.values()), a), est)
        if "std" in times:
            last_std = (N, times["std"])
        rows.append({"N": N, "knn": times["knn"], "std": times.get("std"),
                     "predicted": predicted if "std" not in times else None})
        log(f"  seq N={N:,}: knn {times['knn']:.2f}s, standard "
            + (f"{times['std']:.2f}s" if "std" in times else f"skipped (predicted {predicted:.0f}s)"))
        del x
    return rows


def start_daemon(data_dir: Path) -> tuple[subprocess.Popen, str]:
    return spawn(data_dir)


def part_remote(mem, data_dir: Path, a) -> list[dict]:
    """The same layer over LocalMemory and over a daemon subprocess on a copy of its
    data dir (`served`: a data dir has one user at a time, bench/_datadir.py).

    Remote twice: with reply buffers (shared memory, the default over a unix
    socket) and with every reply through the socket. The layer ratio is under
    no_grad (inference: q.k read off the scores, no key vectors); "with grad"
    times the training forward, where Flat banks' fp32 key vectors travel too.
    """
    t = time.perf_counter()
    proc, address = start_daemon(data_dir)
    log(f"  daemon serving {data_dir} after {time.perf_counter() - t:.0f}s")
    rows = []
    torch.manual_seed(1)
    x = torch.randn(1, a.positions, a.input_dim)
    try:
        with MemoryClient(address) as shm_client, \
                MemoryClient(address, reply_buffers=False) as sock_client:
            banks = [f"pk-{K}" for K in sorted(set(a.sizes + a.pk_only_sizes))]
            banks += [f"flat-{K}" for K in a.remote_flat]
            first = True
            for bank in banks:
                local = make_layer(mem, bank, a.input_dim, a)
                remote = make_layer(shm_client, bank, a.input_dim, a)
                sock = make_layer(sock_client, bank, a.input_dim, a)
                q = local.queries(x.reshape(-1, a.input_dim)).reshape(-1, a.key_dim).numpy()

                def grad(layer):
                    with torch.enable_grad():
                        return layer(x)
                paths = {"local": lambda: local(x), "remote": lambda: remote(x),
                         "remote socket": lambda: sock(x),
                         "grad local": lambda: grad(local), "grad remote": lambda: grad(remote),
                         "values local": lambda: mem.search(bank, q, a.k, values=True),
                         "values remote": lambda: shm_client.search(bank, q, a.k, values=True),
                         "values socket": lambda: sock_client.search(bank, q, a.k, values=True)}
                est, outs = {}, {}
                for name, fn in paths.items():      # warm-up (the first bank: a few calls)
                    for _ in range(3 if first else 2):   # 2: the reply buffer opens after the 1st
                        outs[name], est[name] = timed(fn)
                first = False
                times = interleaved(paths, repeats_for(sum(est.values()), a), est)
                kind, K = bank.split("-")
                rows.append({"bank": bank, "kind": "product keys" if kind == "pk" else "Flat",
                             "K": int(K), **{n.replace(" ", "_"): t for n, t in times.items()},
                             "ratio": times["remote"] / times["local"],
                             "socket_ratio": times["remote socket"] / times["local"],
                             "grad_ratio": times["grad remote"] / times["grad local"],
                             "values_ratio": times["values remote"] / times["values local"],
                             "values_socket_ratio": times["values socket"] / times["values local"],
                             "same": all(torch.equal(outs["local"], outs[n])
                                         for n in ("remote", "remote socket"))
                                     and torch.equal(outs["grad local"], outs["grad remote"]),
                             "transport": shm_client.reply_buffers})
                log(f"  remote {bank}: " + ", ".join(f"{n} {t:.3f}s" for n, t in times.items())
                    + f"; layer ratio {rows[-1]['ratio']:.2f} (socket {rows[-1]['socket_ratio']:.2f})")
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


# ---- part 1b: keys from text -------------------------------------------------------------
TIE_TOL = 1e-4      # scores this close to the exact k-th count as ties (part 1b tie column)


def nlist_for(K: int) -> int:
    """IVF lists: ~4 sqrt(K) as a power of two, with >= 39 training points per list."""
    n = 2 ** round(math.log2(4 * math.sqrt(K)))
    while n > 16 and K / n < 39:
        n //= 2
    return n


def part_text(data_dir: Path, a) -> tuple[list[dict], list[dict], dict]:
    import _knn_data as kd
    kmax = max(a.data_sizes)
    nq = a.positions * a.heads
    keys_all, queries, info = kd.text_keys(a.text_keys, kmax, nq, a.key_dim, log)   # (kmax, dk), (nq, dk)
    rng = np.random.default_rng(7)
    values_all = rng.standard_normal((kmax, a.value_dim), dtype=np.float32).astype(np.float16)
    info["tie_tol"] = TIE_TOL
    log(f"  text keys ready ({a.text_keys}): {kmax:,} keys from {info['key_sentences']:,} sentences, "
        f"{nq:,} queries from {info['query_sentences']:,} held-out sentences, PCA-{a.key_dim} keeps "
        f"{info['pca_explained']:.0%} of the variance, {info['duplicate_keys']:,} duplicate keys  "
        f"[{info['prep_s']:.0f}s]")
    # x: position n carries H held-out query vectors, one per head; q_proj = identity
    x = torch.from_numpy(queries).reshape(1, a.positions, a.heads * a.key_dim)
    prefix = {"tokens": "tok", "sentences": "sent"}[a.text_keys]
    rows, sweep = [], []
    info["build_s"] = {}
    with LocalMemory(data_dir) as mem:
        for K in sorted(a.data_sizes):
            t1 = time.perf_counter()
            nlist = nlist_for(K)
            specs = {"Flat": "Flat", "IVF": f"IVF{nlist},Flat", "HNSW32": a.hnsw_spec}
            # a bank is reused only if it holds these very keys and values, built by the
            # same spec: its name ends in their hash (the PCA, hence the keys, depends on
            # the largest K and the key kind)
            h = hashlib.sha1(keys_all[:K])                   # contiguous rows: no copy
            h.update(values_all[:K])
            digest = h.hexdigest()[:8]
            banks = {name: f"{prefix}-{name.lower()}-{K}-{digest}"
                           f"{hashlib.sha1(spec.encode()).hexdigest()[:4]}"
                     for name, spec in specs.items()}
            layers = {}
            for name, spec in specs.items():
                bank = banks[name]
                for old in mem.list_banks():                    # stale: same index and K, other keys
                    if old.name.startswith(f"{prefix}-{name.lower()}-{K}-") and old.name != bank:
                        mem.delete_bank(old.name)
                if not exists(mem, bank, K):
                    t = time.perf_counter()
                    mem.create_bank(BankSpec(bank, dim=a.key_dim, value_dim=a.value_dim,
                                             kind="domain", index=spec, value_dtype="float16"))
                    mem.add(bank, keys_all[:K], values_all[:K], ids=np.arange(K, dtype=np.int64))
                    info["build_s"][f"{spec} K={K}"] = time.perf_counter() - t
                    log(f"  built {bank} ({spec}) in {time.perf_counter() - t:.0f}s")
                layers[name] = make_layer(mem, bank, a.heads * a.key_dim, a, identity=True)
            keys = torch.from_numpy(keys_all[:K])
            values = torch.from_numpy(values_all[:K].astype(np.float32))
            lay = layers["Flat"]
            qs = scaled_queries(lay, x)
            (y_dense, exact, mass), t_ref = timed(lambda: dense_attention(qs, keys, values, topk=a.k))
            exact_np = exact.numpy()
            y_top = topk_attention(qs, keys, values, exact)
            # near ties at the top-k boundary: exact (k+1)-best scores of the unit queries
            top = kd.top_scores(keys_all[:K], queries, a.k + 1)                 # (nq, k+1)
            kth = top[:, a.k - 1]

            def tie_recall(ids):
                return kd.tie_recall(keys_all[:K], queries, ids, kth, TIE_TOL)

            res = {"K": K, "mass": float(mass.mean()), "dense_vs_top": cosine(y_top, y_dense),
                   "tie_frac": float((kth - top[:, a.k] < TIE_TOL).mean()),
                   "kth_score": float(np.median(kth))}
            # sweep the approximate indexes' search parameter on the bank's own index
            chosen = {}
            for name, param, grid in (("IVF", "nprobe", [p for p in a.nprobe if p <= nlist]),
                                      ("HNSW32", "efSearch", a.ef_search)):
                index = mem.engine.bank(banks[name]).shards[0].index
                pick = None
                for v in grid:
                    faiss.ParameterSpace().set_index_parameters(index, f"{param}={v}")
                    t = time.perf_counter()
                    y, ids = retrieved_ids(layers[name], x)
                    dt = time.perf_counter() - t
                    r = recall(ids, exact_np)
                    sweep.append({"K": K, "index": specs[name], "param": param, "value": v,
                                  "time": dt, "recall": r, "err": rel_err(y, y_top),
                                  "recall_ties": tie_recall(ids), "lost": kd.lost_share(ids, exact_np)})
                    if pick is None and r >= a.target_recall:
                        pick = v
                        if not (a.full_sweep or K == kmax):   # the largest K: the whole curve
                            break
                pick = pick if pick is not None else grid[-1]
                faiss.ParameterSpace().set_index_parameters(index, f"{param}={pick}")
                sep = "," if "|" in specs[name] else "|"      # ParameterSpace: a,b after one '|'
                chosen[name] = f"{specs[name]}{sep}{param}={pick}"
            outs, est = {}, {"dense": t_ref}
            for name in layers:                                     # warm-up + scores
                outs[name], est[name] = timed(lambda: retrieved_ids(layers[name], x))
            paths = {"dense": lambda: dense_attention(scaled_queries(lay, x), keys, values)}
            paths.update({name: (lambda l=layers[name]: l(x)) for name in layers})
            times = interleaved(paths, repeats_for(sum(est.values()), a), est)
            rows.append({**res, "path": "dense (all K slots)", "spec": "", "time": times["dense"],
                         "speedup": 1.0, "recall": None, "err": None})
            for name in layers:
                y, ids = outs[name]
                rows.append({**res, "path": f"KNNAttention, {name}",
                             "spec": chosen.get(name, "Flat"), "time": times[name],
                             "speedup": times["dense"] / times[name],
                             "recall": recall(ids, exact_np), "err": rel_err(y, y_top),
                             "recall_ties": tie_recall(ids), "lost": kd.lost_share(ids, exact_np)})
            log(f"  text K={K:,}: " + ", ".join(f"{n} {t:.3f}s" for n, t in times.items())
                + f"  {chosen}  [{time.perf_counter() - t1:.0f}s]")
    return rows, sweep, info


# ---- report ------------------------------------------------------------------------------
def md_cell(text: str) -> str:
    """text for a markdown table cell: its '|' escaped."""
    return text.replace("|", "\\|")


def fmt_k(K: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if K >= div:
            v = K / div
            return f"{v:.0f}{unit}" if abs(v - round(v)) < 0.02 else f"{v:.1f}{unit}"
    return str(K)


def print_tables(a, rand, text, sweep, info, seq, remote, wall) -> None:
    nq = a.positions * a.heads
    print(f"\nKNN attention benchmark: {nq:,} queries per forward (B*T = {a.positions} positions x "
          f"H = {a.heads} heads), key_dim {a.key_dim}, value_dim {a.value_dim}, k = {a.k}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward under no_grad; "
          f"paths timed in interleaved rounds (up to {a.repeat}; fast paths several times a round), "
          f"median of the samples (of 2: the smaller). Total run {wall / 60:.1f} min.\n")
    if rand:
        print("**1a. Random unit keys (base bank)**: product keys vs a Flat bank holding the same "
              "keys and fp16 values; dense = softmax over all K slots.\n")
        print("| K | path | time (s) | x faster than dense | recall@32 | rel. error vs exact top-32 |")
        print("|---:|---|---:|---:|---:|---:|")
        for r in rand:
            dense = r["path"].startswith("dense")
            t = f"{r['time']:.3f}" + ("†" if dense and r["measured_on"] < nq else "")
            extra = ("1 | | |" if dense else
                     f"{r['speedup']:,.0f} | {r['recall']:.4f} | {r['err']:.1e} |")
            print(f"| {r['K']:,} | {r['path']} | {t} | {extra}")
        if any(r["measured_on"] < nq for r in rand if r["path"].startswith("dense")):
            sub = [r for r in rand if r["path"].startswith("dense") and r["measured_on"] < nq]
            print(f"\n† timed on the first {sub[0]['measured_on']:,} of the {nq:,} queries and scaled "
                  f"x{nq // sub[0]['measured_on']} (dense cost is linear in queries); recall and "
                  "error at that K are over those queries. Flat is not run at that size.")
    if text:
        print_text_tables(a, text, sweep, info)
    if rand or text:
        print("\n**What top-32 attention leaves out** (dense softmax over all K vs softmax over the "
              "exact top-32, same scale sqrt(key_dim)):\n")
        print("| keys | K | dense softmax mass on the exact top-32 | cosine(top-32 output, dense output) |")
        print("|---|---:|---:|---:|")
        seen = set()
        for kind, rs in (("random", rand), ("text", text)):
            for r in rs:
                if (kind, r["K"]) not in seen:
                    seen.add((kind, r["K"]))
                    print(f"| {kind} | {r['K']:,} | {r['mass']:.2%} | {r['dense_vs_top']:.3f} |")
    if seq:
        print(f"\n**2. Sequence length** (B = 1, N positions, H = {a.heads}): KNNAttention over "
              f"product keys K = {a.seq_bank:,} (run in chunks of {a.seq_chunk:,} positions) vs "
              f"standard self-attention (qkv projection + scaled_dot_product_attention, {a.heads} "
              f"heads of {a.value_dim}).\n")
        print("| N | KNN attention (s) | standard attention (s) | standard / KNN |")
        print("|---:|---:|---:|---:|")
        for r in seq:
            std = (f"{r['std']:.3f}" if r["std"] is not None
                   else f"skipped (~{r['predicted']:.0f} predicted)")
            ratio = f"{r['std'] / r['knn']:.2f}" if r["std"] is not None else ""
            print(f"| {r['N']:,} | {r['knn']:.3f} | {std} | {ratio} |")
        for key, name in (("knn", "KNN"), ("std", "standard")):
            pts = [(r["N"], r[key]) for r in seq if r[key] is not None]
            if len(pts) >= 3:
                big = pts[len(pts) // 2:]
                slope = np.polyfit(np.log([p[0] for p in big]), np.log([p[1] for p in big]), 1)[0]
                print(f"\n{name}: log-log slope over N >= {big[0][0]:,}: {slope:.2f}", end="")
        print()
    if remote:
        mb_v = nq * a.k * (2 * a.value_dim + 16) / 2**20
        mb_k = nq * a.k * 4 * a.key_dim / 2**20
        print(f"\n**3. Remote vs in-process**: the same layer forward ({nq:,} queries, k = {a.k}) "
              "with memory=LocalMemory vs memory=MemoryClient to a `memoryd serve` subprocess on "
              "a copy of the same data dir, over its unix socket: replies through reply buffers (shared "
              "memory, the default there) and, beside it, through the socket alone "
              "(`reply_buffers=False`). Under no_grad the layer reads q.k off the returned scores "
              f"and fetches fp16 values, ids and scores ({mb_v:.0f} MiB a reply); with grad, "
              f"Flat banks also return fp32 key vectors (+{mb_k:.0f} MiB) and product keys are "
              "rebuilt from ids. Last columns: the bare search (values only), remote / local.\n")
        print("| bank | K | LocalMemory (ms) | MemoryClient (ms) | **layer ratio** | socket only "
              "| with grad (ms) | with grad ratio | search ratio (socket only) | same output |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in remote:
            print(f"| {r['kind']} | {r['K']:,} | {r['local'] * 1e3:.0f} | {r['remote'] * 1e3:.0f} | "
                  f"**{r['ratio']:.2f}** | {r['socket_ratio']:.2f} | "
                  f"{r['grad_local'] * 1e3:.0f} -> {r['grad_remote'] * 1e3:.0f} | "
                  f"{r['grad_ratio']:.2f} | {r['values_ratio']:.2f} ({r['values_socket_ratio']:.2f}) | "
                  f"{'yes' if r['same'] else 'NO'} |")
        print(f"\nReplies travelled through: {remote[0]['transport']}.")

def print_text_tables(a, text, sweep, info) -> None:
    """Part 1b of print_tables: keys from text (token states or sentence embeddings)."""
    nq = a.positions * a.heads
    kmax = max(r["K"] for r in text)
    where = (f"{info['memory_sentences']:,} unique sentences in Python docstrings/comments, man pages "
             "and /usr/share/doc on this machine")
    pca = (f"PCA to {a.key_dim}-d (keeps {info['pca_explained']:.0%} of the variance) and unit length")
    if info.get("kind", "sentences") == "tokens":
        print(f"\n**1b. Keys from text: token hidden states.** One key per token: the last-layer "
              f"outputs of all-MiniLM-L6-v2 for the real tokens ([CLS], [SEP], padding dropped) of "
              f"{info['key_sentences']:,} sentences ({kmax / info['key_sentences']:.1f} tokens a "
              f"sentence; a smaller K is the first K tokens), of {where}; {pca}. Queries: {nq:,} "
              f"token states, one at a random position of each of {info['query_sentences']:,} "
              f"sentences from held-out documents (none dropped). {info['duplicate_keys']:,} "
              "exact duplicate keys.", end="")
    else:
        print(f"\n**1b. Keys from text: sentence embeddings.** all-MiniLM-L6-v2 embeddings of "
              f"{kmax:,} sentences (of {where}); {pca}. Queries: {nq:,} sentences from held-out "
              "documents.", end="")
    print(f" Search parameter: the smallest reaching recall@32 >= {a.target_recall}.\n")
    tol = info.get("tie_tol")          # absent in results of older runs: no tie/lost columns
    tie_col = f" recall@32, ties within {tol:g} count | queries with recall < 0.5 |" if tol else ""
    print(f"| K | path | index | time (s) | x faster than dense | recall@32 |{tie_col} "
          "rel. error vs exact top-32 |")
    print("|---:|---|---|---:|---:|---:|" + ("---:|---:|" if tol else "") + "---:|")
    for r in text:
        dense = r["path"].startswith("dense")
        spec = f"`{r['spec']}`".replace("|", "\\|") if r["spec"] else ""
        ties = (" | |" if dense else f" {r['recall_ties']:.4f} | {r['lost']:.2%} |") if tol else ""
        print(f"| {r['K']:,} | {r['path']} | {spec} | {r['time']:.3f} | "
              + ("1 | |" + ties + " |" if dense else
                 f"{r['speedup']:,.1f} | {r['recall']:.4f} |{ties} {r['err']:.1e} |"))
    if tol:
        print(f"\nNear ties at the top-32 boundary: queries whose exact 32nd and 33rd scores differ "
              f"by less than {tol:g}: " + ", ".join(
                  f"{r['tie_frac']:.1%} at K = {fmt_k(r['K'])} (median 32nd score {r['kth_score']:.3f})"
                  for r in text if r["path"].startswith("dense")) + ". The ties column counts a "
              f"retrieved key as a hit when its score is within {tol:g} of the exact 32nd.")
    print(f"\nSweep at K = {kmax:,} (one forward each; time includes the whole layer):\n")
    print("| index | setting | time (s) | recall@32 |" + (" with ties | recall < 0.5 |" if tol else "")
          + " rel. error |")
    print("|---|---|---:|---:|" + ("---:|---:|" if tol else "") + "---:|")
    for s in sweep:
        if s["K"] == kmax:
            ties = f" {s['recall_ties']:.3f} | {s['lost']:.2%} |" if tol else ""
            print(f"| {md_cell(s['index'])} | {s['param']}={s['value']} | {s['time']:.3f} | "
                  f"{s['recall']:.3f} |{ties} {s['err']:.1e} |")


def plot(path: Path, a, rand, text, sweep, seq, remote) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, ax = plt.subplots(2, 3, figsize=(17, 10))

    def log_axis(axis, which="xy", k_x=True):
        for w in which:
            a_ = axis.xaxis if w == "x" else axis.yaxis
            a_.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            a_.set_major_formatter(FuncFormatter(
                (lambda v, _: fmt_k(int(round(v)))) if w == "x" and k_x else (lambda v, _: f"{v:,.4g}")))
            a_.set_minor_formatter(NullFormatter())
    nq = a.positions * a.heads

    def by_path(rows, key="time"):
        out = {}
        for r in rows:
            out.setdefault(r["path"], []).append((r["K"], r[key]))
        return out

    styles = {"dense (all K slots)": ("k", "o", "-"), "KNNAttention, Flat": ("tab:blue", "s", "-"),
              "KNNAttention, product keys": ("tab:red", "^", "-"),
              "KNNAttention, IVF": ("tab:green", "D", "-"), "KNNAttention, HNSW32": ("tab:purple", "v", "-")}

    def curves(axis, rows, title):
        for name, pts in by_path(rows).items():
            c, m, ls = styles.get(name, ("gray", "x", "-"))
            axis.plot(*zip(*pts), color=c, marker=m, ls=ls, label=name.replace("KNNAttention, ", "KNN: "))
        axis.set_xscale("log")
        axis.set_yscale("log")
        log_axis(axis)
        axis.set_xlabel("memory slots K")
        axis.set_ylabel("forward time (s)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)

    if rand:
        curves(ax[0, 0], rand, f"1a. random keys: {nq} queries, k={a.k}")
        for r in rand:
            if r["path"].endswith("product keys"):
                ax[0, 0].annotate(f"{r['speedup']:,.0f}x", (r["K"], r["time"]), textcoords="offset points",
                                  xytext=(4, -12), fontsize=8, color="tab:red")
    if text:
        what = {"tokens": "token hidden states", "sentences": "sentence embeddings"}.get(
            getattr(a, "text_keys", "sentences"), "text")
        curves(ax[0, 1], text, f"1b. keys from text: {what} (recall@32 >= {a.target_recall:.2f})")
        for r in text:
            if r["path"].endswith(("IVF", "HNSW32")):
                ax[0, 1].annotate(f"{r['speedup']:,.0f}x", (r["K"], r["time"]), textcoords="offset points",
                                  xytext=(4, 4), fontsize=8, color=styles[r["path"]][0])
    if sweep:
        kmax = max(s["K"] for s in sweep)
        dense = [r["time"] for r in text if r["K"] == kmax and r["path"].startswith("dense")][0]
        axis = ax[0, 2]
        for spec, c in (("IVF", "tab:green"), ("HNSW32", "tab:purple")):
            pts = [s for s in sweep if s["K"] == kmax and s["index"].startswith(spec)]
            if pts:
                axis.plot([dense / s["time"] for s in pts], [s["recall"] for s in pts], marker="o",
                          color=c, label=pts[0]["index"])
                for s in pts:
                    axis.annotate(str(s["value"]), (dense / s["time"], s["recall"]), fontsize=7,
                                  textcoords="offset points", xytext=(3, -9))
        axis.axhline(a.target_recall, color="gray", ls="--", lw=1, label=f"recall {a.target_recall}")
        axis.axvline(20, color="gray", ls=":", lw=1, label="20x")
        axis.set_xscale("log")
        log_axis(axis, "x", k_x=False)
        axis.set_xlabel("x faster than dense (whole layer)")
        axis.set_ylabel("recall@32")
        axis.set_title(f"1b. recall vs speed-up at K={fmt_k(kmax)} (labels: nprobe, efSearch)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    if seq:
        axis = ax[1, 0]
        kn = [(r["N"], r["knn"]) for r in seq]
        st = [(r["N"], r["std"]) for r in seq if r["std"] is not None]
        axis.plot(*zip(*kn), "o-", color="tab:red", label=f"KNN attention (product keys K={fmt_k(a.seq_bank)})")
        if st:
            axis.plot(*zip(*st), "s-", color="k", label="standard self-attention (SDPA)")
        ns = np.array([seq[0]["N"], seq[-1]["N"]], float)   # reference slopes through the last points
        axis.plot(ns, kn[-1][1] * ns / kn[-1][0], ":", color="tab:red", lw=1, label="slope 1 (linear)")
        if st:
            axis.plot(ns, st[-1][1] * (ns / st[-1][0]) ** 2, ":", color="k", lw=1, label="slope 2 (quadratic)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        log_axis(axis, "y")
        axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}k"))
        axis.set_xlabel("sequence length N")
        axis.set_ylabel("forward time (s)")
        axis.set_title(f"2. cost vs sequence length (B=1, H={a.heads})")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    if remote:
        axis = ax[1, 1]
        labels = [f"{'PK' if r['kind'] == 'product keys' else 'Flat'} {fmt_k(r['K'])}" for r in remote]
        xs = np.arange(len(remote))
        bars = (("ratio", "layer, reply buffers", "tab:red"),
                ("socket_ratio", "layer, socket only", "tab:orange"),
                ("grad_ratio", "layer with grad, reply buffers", "tab:gray"))
        for i, (key, name, c) in enumerate(bars):
            vals = [r[key] for r in remote]
            off = (i - 1) * 0.27
            axis.bar(xs + off, vals, width=0.26, color=c, label=name)
            for xi, v in zip(xs + off, vals):
                axis.annotate(f"{v:.2f}", (xi, v), ha="center", fontsize=7,
                              textcoords="offset points", xytext=(0, 2))
        axis.set_xticks(xs, labels)
        axis.axhline(1.25, color="k", ls="--", lw=1, label="target 1.25 (layer)")
        axis.axhline(1.0, color="k", lw=0.5)
        axis.set_ylim(0, max(1.5, 1.15 * max(r[key] for r in remote for key, _, _ in bars)))
        axis.set_ylabel("MemoryClient time / LocalMemory time")
        axis.set_title(f"3. remote (daemon, unix socket) / in-process, {nq} queries")
        axis.legend(fontsize=8, loc="upper right")
        axis.tick_params(axis="x", labelsize=8)
    axis = ax[1, 2]
    if rand or text:
        for kind, rows, c in (("random", rand, "tab:red"), ("text", text, "tab:purple")):
            pts = sorted({(r["K"], r["mass"], r["dense_vs_top"]) for r in rows})
            if pts:
                ks = [p_[0] for p_ in pts]
                axis.plot(ks, [p_[1] for p_ in pts], "o-", color=c,
                          label=f"{kind} keys: dense softmax mass on the exact top-{a.k}")
                axis.plot(ks, [p_[2] for p_ in pts], "s--", color=c,
                          label=f"{kind} keys: cosine(top-{a.k} output, dense output)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        log_axis(axis)
        axis.set_xlabel("memory slots K")
        axis.set_ylabel("share of mass / cosine")
        axis.set_title(f"top-{a.k} attention is not dense attention (scale sqrt(key_dim))")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"KNNAttention benchmark ({torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
                 f"faiss {faiss.__version__})", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"  wrote {path}")


# ---- main --------------------------------------------------------------------------------
def ints(text: str) -> list[int]:
    out = []
    for t in text.split(","):
        t = t.strip().lower().replace("_", "")
        mult = 1_000_000 if t.endswith("m") else 1_000 if t.endswith("k") else 1
        out.append(int(float(t.rstrip("mk")) * mult))
    return [v for v in out if v]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a 1-2 minute smoke run")
    p.add_argument("--sizes", type=ints, default=None, help="K of part 1a (rounded to squares): 10k,100k,1M")
    p.add_argument("--pk-only-sizes", type=ints, default=None, help="K with product keys only: 10M")
    p.add_argument("--data-sizes", type=ints, default=None,
                   help="K of part 1b: 10k,100k,1M for token keys, 10k,100k,300k for sentence keys "
                        "(the corpus has ~760k memory sentences)")
    p.add_argument("--hnsw-spec", default="HNSW32|efConstruction=120",
                   help="memoryd index spec of the HNSW text banks; efConstruction=120 (faiss: 40) "
                        "halves the queries HNSW all but misses on token keys, for ~2.5x the build")
    p.add_argument("--text-keys", choices=["tokens", "sentences"], default="tokens",
                   help="part 1b keys: last-layer token states (one key per token, default) or "
                        "sentence embeddings")
    p.add_argument("--seq", type=ints, default=None, help="N of part 2: 1k,2k,...,64k")
    p.add_argument("--seq-bank", type=lambda t: ints(t)[0], default=None, help="product-key K of part 2 (1M)")
    p.add_argument("--seq-limit", type=float, default=60.0, help="skip standard attention above (s)")
    p.add_argument("--seq-chunk", type=int, default=2048, help="positions per KNN forward in part 2")
    p.add_argument("--remote-flat", type=ints, default=None, help="Flat banks timed remotely (10k,100k)")
    p.add_argument("--positions", type=int, default=512, help="B*T positions per forward")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--input-dim", type=int, default=512)
    p.add_argument("--key-dim", type=int, default=128)
    p.add_argument("--value-dim", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5, help="rounds for fast paths (fewer for slow ones)")
    p.add_argument("--dense-full-max", type=int, default=2_000_000,
                   help="above this K, dense is timed on 1/--dense-subset of the queries and scaled")
    p.add_argument("--dense-subset", type=int, default=16)
    p.add_argument("--nprobe", type=ints, default=[1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 1024])
    p.add_argument("--ef-search", type=ints, default=[16, 24, 32, 40, 48, 56, 64, 96, 128, 256, 512])
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--full-sweep", action="store_true", help="sweep every K past the target (always at the largest)")
    p.add_argument("--parts", default="random,text,seq,remote")
    p.add_argument("--data-dir", type=Path, help="bank folder (default: a temp dir); banks are reused")
    p.add_argument("--png", type=Path, default=HERE / "knnlayer.png")
    p.add_argument("--replot", action="store_true",
                   help="print the tables and redraw --png from the numbers of the run that drew "
                        "it (saved as bench/out/<png name>.json)")
    a = p.parse_args()
    if a.replot:
        return replot(a.png)
    q = a.quick
    a.sizes = [square(k) for k in (a.sizes or ([10_000, 100_000] if q else [10_000, 100_000, 1_000_000]))]
    a.pk_only_sizes = [square(k) for k in (a.pk_only_sizes if a.pk_only_sizes is not None
                                           else ([] if q else [10_000_000]))]
    a.data_sizes = a.data_sizes or ([10_000, 20_000] if q else [10_000, 100_000, 1_000_000]
                                    if a.text_keys == "tokens" else [10_000, 100_000, 300_000])
    a.seq = a.seq or ([1024, 2048, 4096, 8192] if q else [1024 << i for i in range(7)])
    a.seq_bank = square(a.seq_bank or (100_000 if q else 1_000_000))
    a.remote_flat = [square(k) for k in (a.remote_flat if a.remote_flat is not None else a.sizes[:2])]
    a.remote_flat = [k for k in a.remote_flat if k in a.sizes]
    if q:
        a.repeat = min(a.repeat, 3)
        a.full_sweep = True
    parts = set(a.parts.split(","))
    torch.set_grad_enabled(False)
    root = a.data_dir or Path(tempfile.mkdtemp(prefix="bench-knnlayer-"))
    log(f"banks in {root}")
    t0 = time.perf_counter()
    rand = text = sweep = seq = remote = []
    info: dict = {}
    try:
        if parts & {"random", "seq", "remote"}:
            build_random(root / "random", a)        # closed: index snapshots written
            copies = contextlib.ExitStack()          # the daemon's: copied while closed
            served = copies.enter_context(served_copy(root / "random")) if "remote" in parts \
                else None
            mem = LocalMemory(root / "random")
            try:
                if "random" in parts:
                    rand = part_random(mem, a)
                if "seq" in parts:
                    seq = part_seq(mem, a)
                if "remote" in parts:
                    remote = part_remote(mem, served, a)
            finally:
                mem.close()
                copies.close()
        if "text" in parts:
            text, sweep, info = part_text(root / "text", a)
    finally:
        if a.data_dir is None:                  # a few GB of banks: not left behind in /tmp
            shutil.rmtree(root, ignore_errors=True)
    wall = time.perf_counter() - t0
    results = HERE / "out" / f"{a.png.stem}.json"       # the numbers behind the figure, for --replot
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in vars(a).items()},
                                   "rand": rand, "text": text, "sweep": sweep, "info": info,
                                   "seq": seq, "remote": remote, "wall": wall}, indent=1))
    print_tables(a, rand, text, sweep, info, seq, remote, wall)
    plot(a.png, a, rand, text, sweep, seq, remote)


def replot(png: Path) -> None:
    """Tables and figure again from the saved results of the last run that drew png."""
    r = json.loads((HERE / "out" / f"{png.stem}.json").read_text())
    a = argparse.Namespace(**r["args"])
    print_tables(a, r["rand"], r["text"], r["sweep"], r["info"], r["seq"], r["remote"], r["wall"])
    plot(png, a, r["rand"], r["text"], r["sweep"], r["seq"], r["remote"])


if __name__ == "__main__":
    main()
