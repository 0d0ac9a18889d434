"""Facts about a bank's keys that both sides need, in pure numpy (no faiss).

The daemon's storage builds indexes from these; the model-side layer reads
them off a BankSpec to know, without loading the storage engine, whether a
bank's scores are exact q.k and how to rebuild product keys from ids.

Index specs: a faiss `index_factory` string, optionally followed by search
parameters after a '|' (faiss ParameterSpace syntax), e.g.
"HNSW32|efSearch=128" or "IVF1024,Flat|nprobe=32"; or "product-keys:<n>"
with an optional "|seed=<s>" for a product-key bank.

check_index() is what a bank's spec must pass at creation (BankSpec.validated):
only the index_factory parts memoryd can run end to end (explicit ids, later
adds, search, snapshots), each bounded, so that no spec can crash the daemon
(faiss aborts on HNSW0, segfaults on HNSW1), make every add or search fail
(NSG: no adds after the first; nprobe=0) or make one call allocate without
bound (efSearch=2**31-1: ~24 GB a search). Parts (comma-separated, no
parentheses):

    transforms   PCA<d>, PCAR<d>, PCAW<d>, PCAWR<d>, OPQ<m>[_<d>], RR<d>
                 (an output dim in 1..the input dim)
    Flat | HNSW<M>[_Flat|_SQ<b>|_PQ<m>[x<b>]]   M in 2..MAX_HNSW_M
    IVF<nlist>[_HNSW<M>] | IMI2x<b>             nlist in 1..MAX_NLIST (IMI: 2^(2b)), then an
                                                encoding: Flat, SQ<b>, PQ<m>[x<b>][fs|np], RaBitQ
    PQ<m>[x<b>][fs|np] (m divides the dim, b in 1..MAX_PQ_BITS), SQ4|SQ6|SQ8|SQfp16|SQbf16,
    LSH[r][t], RaBitQ

and whatever a part allocates at creation or training (PQ codebooks: dim *
2^b floats; transforms: dim * dim; IVF centroids: nlist * dim) must stay
within MAX_INDEX_BYTES. Search parameters: nprobe in 1..nlist; efSearch,
efConstruction, quantizer_efSearch in 1..MAX_EF (faiss searches with
max(efSearch, k) candidates, so an efSearch below k is raised to k: k results
whenever the bank holds k); max_codes in 0..2^53 (0: no limit); plain decimal
integers, each at most once. Anything else is InvalidArgument naming the part.

Product keys (Lample et al. 2019; DESIGN lesson 12): K = n^2 fixed unit keys

    key(i * n + j) = concat(c1[i], c2[j]) / sqrt(2)

from two tables of n seeded random unit sub-keys, one per half of the key.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from memoryd.errors import InvalidArgument

PRODUCT_KEYS = "product-keys"
MAX_SUBKEYS = 1 << 16
_PRODUCT_SPEC = re.compile(r"^product-keys:(\d+)(?:\|seed=(\d+))?$")

# index_factory parts that keep the stored vectors as they are: such an index's
# scores are the exact distances of the keys it returns (approximate search
# only chooses WHICH keys). Quantisers (PQ, SQ, ...) and transforms (PCA, ...)
# change the distances themselves.
_EXACT_PART = re.compile(r"^(IDMap2?|IVF\d+(_HNSW\d+)?|HNSW\d+|Flat|FlatIP|FlatL2)$")


@dataclass(frozen=True)
class IndexSpec:
    factory: str         # the index_factory part
    params: str          # ParameterSpace string, may be empty

    @classmethod
    def parse(cls, text: str) -> "IndexSpec":
        factory, _, params = text.partition("|")
        factory = factory.strip()
        if not factory:
            raise InvalidArgument(f"empty faiss index spec in {text!r}")
        return cls(factory, params.strip())


MAX_INDEX_SPEC = 256          # characters of an index spec
MAX_HNSW_M = 256              # HNSW links per node (faiss needs >= 2)
MAX_NLIST = 1 << 20           # IVF lists
MAX_PQ_BITS = 16              # bits per PQ sub-code (faiss refuses > 24; 2^b rows to train)
MAX_EF = 4096                 # efSearch / efConstruction (= api.MAX_K: faiss uses max(ef, k))
MAX_MAX_CODES = 1 << 53
MAX_INDEX_BYTES = 1 << 30     # what an index part may allocate at creation or training
_HNSW_M = (2, MAX_HNSW_M)

_INT = re.compile(r"^[0-9]{1,12}$")
_PQ = re.compile(r"^PQ([0-9]{1,6})(?:x([0-9]{1,3}))?(fs|fsr|np)?$")
_SQ = re.compile(r"^SQ(4|6|8|fp16|bf16)$")
_TRANSFORM = re.compile(r"^(PCAW?R?|OPQ|RR)([0-9]{1,6})(?:_([0-9]{1,6}))?$")
_HNSW = re.compile(r"^HNSW([0-9]{1,6})(?:_(.+))?$")
_IVF = re.compile(r"^IVF([0-9]{1,9})(?:_HNSW([0-9]{1,6}))?$")
_IMI = re.compile(r"^IMI2x([0-9]{1,3})$")
_LSH = re.compile(r"^LSH(r?)(t?)$")
# search parameters: name -> (lowest, highest); nprobe's highest is the spec's nlist
PARAMS = {"nprobe": (1, MAX_NLIST), "efSearch": (1, MAX_EF), "efConstruction": (1, MAX_EF),
          "quantizer_efSearch": (1, MAX_EF), "max_codes": (0, MAX_MAX_CODES)}
SUPPORTED = ("Flat, HNSW<M>[_Flat|_SQ<b>|_PQ<m>], IVF<nlist>[_HNSW<M>] or IMI2x<b> followed by "
             "Flat|SQ<b>|PQ<m>[x<b>]|RaBitQ, PQ<m>[x<b>], SQ4|SQ6|SQ8|SQfp16|SQbf16, LSH, RaBitQ, "
             "after optional transforms PCA<d>|OPQ<m>[_<d>]|RR<d>")


def _bad(text: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"bad index spec {text!r}: {why}")


def _bounded(text: str, what: str, n: int, lo: int, hi: int, hint: str = "") -> int:
    if not lo <= n <= hi:
        raise _bad(text, f"{what} must be in {lo}..{hi}; got {n}{hint}")
    return n


def _bytes_ok(text: str, what: str, nbytes: int) -> None:
    if nbytes > MAX_INDEX_BYTES:
        raise _bad(text, f"{what} would allocate {nbytes:,} bytes, above the {MAX_INDEX_BYTES:,} "
                         "an index part may take: use a smaller dim, fewer bits or lists")


def _check_pq(text: str, m: re.Match, d: int) -> None:
    sub, nbits = int(m.group(1)), int(m.group(2) or 8)
    _bounded(text, f"PQ sub-quantizers of a {d}-d vector", sub, 1, d)
    if d % sub:
        raise _bad(text, f"PQ{sub} splits the {d}-d vector in {sub} equal parts: {sub} must divide {d}")
    _bounded(text, "PQ bits per code", nbits, 1, MAX_PQ_BITS)
    if m.group(3) in ("fs", "fsr") and nbits != 4:
        raise _bad(text, f"fast-scan PQ (fs) codes have 4 bits; got {nbits}")
    _bytes_ok(text, f"the PQ codebook ({d} x 2^{nbits} floats)", 4 * d * (1 << nbits))


def _check_encoding(text: str, part: str, d: int, ivf: bool) -> bool:
    """True when part is a vector encoding (after IVF, HNSW_ or alone) within bounds."""
    if part == "Flat" or _SQ.match(part) or (part == "RaBitQ"):
        return True
    m = _PQ.match(part)
    if m:
        if ivf and m.group(3) == "np":
            raise _bad(text, "PQ...np is for a flat PQ index, not inside IVF")
        _check_pq(text, m, d)
        return True
    return False


def check_index(text: str, dim: int) -> None:
    """InvalidArgument unless the index spec `text` (for dim-d keys) is one memoryd
    can build and run within bounds (see the module doc); product keys included."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("index spec must be a non-empty faiss index_factory string")
    if len(text) > MAX_INDEX_SPEC:
        raise InvalidArgument(f"index spec is {len(text)} characters; at most {MAX_INDEX_SPEC}")
    if is_product_keys(text):
        parse_product_keys(text)
        return
    spec = IndexSpec.parse(text)
    if "(" in spec.factory or ")" in spec.factory:
        raise _bad(text, "nested index specs (parentheses) are not supported")
    parts = [p.strip() for p in spec.factory.split(",")]
    d, nlist, main, encoded = dim, None, None, False
    for i, part in enumerate(parts):
        if not part:
            raise _bad(text, "an empty part between commas")
        if part.startswith("IDMap"):
            raise _bad(text, f"{part}: memoryd keeps explicit ids itself (an IDMap over an IVF "
                             "index would mix up ids on removal); leave it out")
        if part.startswith(("ITQ", "L2norm")):
            raise _bad(text, f"{part}: faiss cannot copy this transform (clone_index), which "
                             "every bank does; use PCA<d> or RR<d>, or metric ip with unit keys")
        if part.startswith(("NSG", "NNDescent")):
            raise _bad(text, f"{part}: graph indexes built in one go (NSG, NNDescent) take no "
                             "later adds; use HNSW<M> for a graph index")
        if part.startswith(("RFlat", "Refine")):
            raise _bad(text, f"{part}: refinement indexes cannot hold explicit ids; use Flat or "
                             "HNSW<M>_Flat for exact scores")
        if main is None:
            m = _TRANSFORM.match(part)
            if m:
                kind, n = m.group(1), int(m.group(2))
                if kind == "OPQ":
                    out = int(m.group(3) or d)
                    _bounded(text, f"{part}'s sub-quantizers", n, 1, out)
                    if out % n:
                        raise _bad(text, f"{part}: {n} must divide the output dim {out}")
                elif m.group(3):
                    raise _bad(text, f"unknown transform {part!r}")
                else:
                    out = n
                _bounded(text, f"{part}'s output dim", out, 1, d, f" (input dim {d})")
                _bytes_ok(text, f"{part} ({d} x {d} floats to train)", 4 * d * max(d, out))
                d = out
                continue
            m = _HNSW.match(part)
            if m:
                _bounded(text, "HNSW's M (links per node)", int(m.group(1)), *_HNSW_M)
                if m.group(2) is not None and not _check_encoding(text, m.group(2), d, False):
                    raise _bad(text, f"unknown HNSW storage {m.group(2)!r} in {part!r}")
                main, encoded = "HNSW", True
                continue
            m = _IVF.match(part)
            if m:
                nlist = _bounded(text, "IVF's nlist", int(m.group(1)), 1, MAX_NLIST)
                if m.group(2) is not None:
                    _bounded(text, "the IVF quantizer's HNSW M", int(m.group(2)), *_HNSW_M)
                _bytes_ok(text, f"IVF{nlist}'s centroids ({nlist} x {d} floats)", 4 * nlist * d)
                main = "IVF"
                continue
            m = _IMI.match(part)
            if m:
                bits = _bounded(text, "IMI's bits per half", int(m.group(1)), 1, 10)
                nlist = 1 << (2 * bits)
                _bytes_ok(text, f"{part}'s centroids", 4 * (1 << bits) * d)
                main = "IVF"
                continue
            m = _LSH.match(part)
            if m:
                if m.group(1):
                    _bytes_ok(text, f"{part}'s rotation ({d} x {d} floats)", 4 * d * d)
                main, encoded = "LSH", True
                continue
            if _check_encoding(text, part, d, False):
                main, encoded = part, True
                continue
        elif main == "IVF" and not encoded and _check_encoding(text, part, d, True):
            encoded = True
            continue
        elif main == "HNSW" and i == len(parts) - 1 and _check_encoding(text, part, d, False):
            continue                                    # "HNSW32,SQ8" = HNSW32_SQ8
        raise _bad(text, f"{part!r} is not an index part memoryd supports here; supported: "
                         f"{SUPPORTED}")
    if main is None:
        raise _bad(text, "no index part (only transforms)")
    if main == "IVF" and not encoded:
        raise _bad(text, "an IVF index needs an encoding after it, e.g. 'IVF1024,Flat'")
    check_params(text, spec.params, nlist)


def check_params(text: str, params: str, nlist: int | None = None) -> dict[str, int]:
    """The search parameters of a spec, {name: value}, or InvalidArgument (module doc)."""
    out: dict[str, int] = {}
    if not params:
        return out
    for item in params.split(","):
        name, eq, value = item.partition("=")
        if not eq or name not in PARAMS:
            raise _bad(text, f"search parameter {item!r} is not name=value with name one of "
                             f"{', '.join(PARAMS)}")
        if name in out:
            raise _bad(text, f"search parameter {name} is given twice")
        if not _INT.match(value):
            raise _bad(text, f"search parameter {name} must be a plain non-negative integer; "
                             f"got {value!r}")
        lo, hi = PARAMS[name]
        if name == "nprobe":
            if nlist is None:
                raise _bad(text, "nprobe applies to IVF indexes only")
            hi = nlist
        out[name] = _bounded(text, f"search parameter {name}", int(value), lo, hi)
    return out


def is_product_keys(index: str) -> bool:
    return index.strip().startswith(PRODUCT_KEYS)


def exact_scores(index: str) -> bool:
    """Whether the scores of a bank with this index spec are exact for the keys it returns."""
    if is_product_keys(index):
        return True
    factory = IndexSpec.parse(index).factory
    return all(_EXACT_PART.match(part.strip()) for part in factory.split(","))


def parse_product_keys(index: str) -> tuple[int, int]:
    """(n sub-keys per half, seed) of a product-keys spec."""
    m = _PRODUCT_SPEC.match(index.replace(" ", ""))
    if not m:
        raise InvalidArgument(
            f"bad product-keys spec {index!r}: use 'product-keys:<n>[|seed=<s>]', e.g. "
            "'product-keys:1024' for 1024^2 = 1,048,576 keys")
    n, seed = int(m.group(1)), int(m.group(2) or 0)
    if not 2 <= n <= MAX_SUBKEYS:
        raise InvalidArgument(f"product keys need 2..{MAX_SUBKEYS} sub-keys per half; got {n}")
    return n, seed


def subkeys(n: int, dim: int, seed: int) -> np.ndarray:
    """(2, n, dim/2) seeded random unit sub-keys: the whole key set."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((2, n, dim // 2), dtype=np.float32)
    return c / np.linalg.norm(c, axis=2, keepdims=True)


def subkeys_of(index: str, dim: int) -> np.ndarray:
    """The sub-key tables (2, n, dim/2) of a product-key bank's spec."""
    n, seed = parse_product_keys(index)
    return subkeys(n, dim, seed)


def key_vectors(sub: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(..., dim) keys of valid ids of the bank whose sub-key tables are sub (2, n, dim/2)."""
    n = sub.shape[1]
    return np.concatenate([sub[0][ids // n], sub[1][ids % n]], axis=-1) / np.float32(math.sqrt(2.0))
