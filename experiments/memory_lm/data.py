"""Corpora for the memory experiment: bytes of real Python source on every machine.

    base    CPython stdlib  lib/python3.X/**/*.py   minus test dirs, site-packages, pydoc_data, idlelib
    domain  SymPy           site-packages/sympy/**/*.py   minus tests/   (a hard dependency of torch)
    docs    long stdlib test/*.py files (held out: no test dir is in any training split)

Splits are by file: crc32(relative posix path) % 20 == 0 is val, else train, so
they are deterministic across machines and runs, and disjoint by construction.
Every byte read goes into a sha256 (relative path, NUL, bytes), recorded with
the python and sympy versions, so a later run can tell whether it saw the same text.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VAL_MOD = 20
STDLIB_EXCLUDE = frozenset({"test", "tests", "idle_test", "site-packages", "pydoc_data", "idlelib"})
SYMPY_EXCLUDE = frozenset({"tests"})
SEP = b"\n\n"                                  # between files of one split's stream


def crc(rel: str) -> int:
    return zlib.crc32(rel.encode())


def split_of(rel: str) -> str:
    return "val" if crc(rel) % VAL_MOD == 0 else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def sympy_root() -> Path:
    spec = importlib.util.find_spec("sympy")   # no import: sympy takes a second to load
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sympy is not installed (it is a dependency of torch)")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _list(root: str, exclude: frozenset[str]) -> tuple[str, ...]:
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in exclude)     # pruned: never walked
        rel = Path(folder).relative_to(root)
        out += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    return tuple(sorted(out))


def list_files(root: Path, exclude: frozenset[str]) -> list[str]:
    """Relative posix paths of the .py files under root, no folder of theirs in exclude."""
    return list(_list(str(root), exclude))


def versions() -> dict[str, str]:
    try:
        sympy_v = importlib.metadata.version("sympy")
    except importlib.metadata.PackageNotFoundError:
        sympy_v = "?"
    return {"python": sys.version, "sympy": sympy_v}


@dataclass
class Hasher:
    """sha256 over everything read: (corpus, rel path, bytes) in read order."""

    h: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    files: int = 0
    nbytes: int = 0

    def read(self, corpus: str, root: Path, rel: str, limit: int | None = None) -> bytes:
        data = (root / rel).read_bytes()
        if limit is not None:
            data = data[:limit]
        self.h.update(f"{corpus}/{rel}".encode() + b"\0")
        self.h.update(data)
        self.files += 1
        self.nbytes += len(data)
        return data

    def summary(self) -> dict:
        return {"sha256": self.h.hexdigest(), "files": self.files, "bytes": self.nbytes}


@dataclass
class Corpus:
    name: str
    root: str
    train_files: list[str]
    val_files: list[str]
    train: np.ndarray                 # uint8 stream of the train files (SEP between)
    val: np.ndarray                   # uint8 stream of the val files

    def describe(self) -> dict:
        return {"root": self.root, "train_files": len(self.train_files),
                "val_files": len(self.val_files), "train_bytes": int(self.train.size),
                "val_bytes": int(self.val.size)}


def split_files(files: list[str]) -> tuple[list[str], list[str]]:
    train = [f for f in files if split_of(f) == "train"]
    val = [f for f in files if split_of(f) == "val"]
    return train, val


def _stream(hasher: Hasher, corpus: str, root: Path, files: list[str], budget: int | None) -> np.ndarray:
    """The files' bytes joined by SEP; with a byte budget, files in crc order until it is spent."""
    order = sorted(files, key=crc) if budget is not None else files
    parts, total = [], 0
    for rel in order:
        if budget is not None and total >= budget:
            break
        data = hasher.read(corpus, root, rel)
        parts.append(data)
        total += len(data) + len(SEP)
    return np.frombuffer(SEP.join(parts), dtype=np.uint8).copy()


def load_corpus(name: str, root: Path, exclude: frozenset[str], hasher: Hasher,
                budget: int | None = None) -> Corpus:
    files = list_files(root, exclude)
    train, val = split_files(files)
    tr = _stream(hasher, name, root, train, budget)
    va = _stream(hasher, name, root, val, None if budget is None else max(budget // 8, 4096))
    return Corpus(name, str(root), train, val, tr, va)


# ---- long documents (session memory) -------------------------------------------

def long_docs(n: int, nbytes: int, hasher: Hasher, *, root: Path | None = None) -> list[tuple[str, np.ndarray]]:
    """n stdlib test/*.py files of >= nbytes, chosen by crc32 of their path; first nbytes of each."""
    root = root or stdlib_root()
    cands = sorted((p.relative_to(root).as_posix() for p in (root / "test").glob("*.py")
                    if p.stat().st_size >= nbytes), key=crc)
    if len(cands) < n:
        raise RuntimeError(f"only {len(cands)} stdlib test files of >= {nbytes} bytes; need {n}")
    return [(rel, np.frombuffer(hasher.read("docs", root, rel, nbytes), np.uint8).copy())
            for rel in cands[:n]]


def stream_files(min_bytes: int, hasher: Hasher, *, limit: int | None = None,
                 root: Path | None = None) -> list[tuple[str, np.ndarray]]:
    """stdlib train-split files of >= min_bytes (document streams for phase S), crc order."""
    root = root or stdlib_root()
    train, _ = split_files(list_files(root, STDLIB_EXCLUDE))
    cands = sorted((f for f in train if (root / f).stat().st_size >= min_bytes), key=crc)
    if limit is not None:
        cands = cands[:limit]
    return [(rel, np.frombuffer(hasher.read("streams", root, rel), np.uint8).copy())
            for rel in cands]


# ---- windows ----------------------------------------------------------------------

def random_windows(buf: np.ndarray, batch: int, T: int, rng: np.random.Generator):
    """(x, y) int64 (batch, T): y is x shifted by one byte; uniform random offsets."""
    import torch
    starts = rng.integers(0, buf.size - T - 1, size=batch)
    w = np.stack([buf[s:s + T + 1] for s in starts]).astype(np.int64)        # (B, T+1)
    w = torch.from_numpy(w)
    return w[:, :-1], w[:, 1:]


def fixed_windows(buf: np.ndarray, nbytes: int, T: int) -> np.ndarray:
    """nbytes // T windows (n, T+1) uint8 at evenly spaced offsets over buf (deterministic).
    Each scores T bytes (targets 1..T), so the set scores exactly n*T bytes."""
    n = max(1, nbytes // T)
    if buf.size < T + 1:
        raise ValueError(f"a buffer of {buf.size} bytes has no window of {T + 1}")
    starts = np.linspace(0, buf.size - T - 1, n).astype(np.int64)
    return np.stack([buf[s:s + T + 1] for s in starts])
