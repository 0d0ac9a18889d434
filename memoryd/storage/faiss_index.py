"""FAISS index construction, training and size accounting for one bank.

The one module that imports faiss (with its install hint). A bank's index
spec is parsed by memoryd.keyspace.IndexSpec. Ids are always explicit 64-bit
ids: IVF indexes store them natively, everything else is wrapped in an
IndexIDMap (never positional ids).
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from memoryd.errors import FailedPrecondition, InvalidArgument, NeedsTraining
from memoryd.keyspace import MAX_EF, IndexSpec

# How to get faiss, as the README's install line says it (./dev installs the cpu extra).
INSTALL_HINT = ("pip install -e '.[cpu]' in the memoryd checkout (CPU hosts), "
                "or -e '.[gpu]' (faiss-gpu, CUDA hosts)")
GPU_HINT = ("tier gpu needs a CUDA device and faiss-gpu (pip install -e '.[gpu]' in the "
            "memoryd checkout); this host has none: use ram or mmap")

# FAISS's OpenMP threads must sleep between searches, not spin: libgomp's
# default keeps a finished region's threads spinning, and on a host whose
# cores are shared (a daemon beside its models) a spinning or descheduled
# team member stalls the next region: a Flat nq=1 search on 2 threads took
# 24 ms spinning vs 2.9 ms passive here. libgomp reads the policy once, when
# it loads: faiss wheels bundle their own, loaded by `import faiss`, so the
# policy is set around that import only (a torch imported later keeps its
# own default; a policy the user set wins). Where torch was imported FIRST,
# its libgomp (loaded RTLD_GLOBAL) also serves faiss, with torch's policy:
# export OMP_WAIT_POLICY=PASSIVE before importing torch to change that;
# decode-sized searches run on one thread anyway (threads_for, below).
_USER_POLICY = os.environ.get("OMP_WAIT_POLICY")
if _USER_POLICY is None:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
try:
    import faiss
except ImportError as e:  # pragma: no cover - exercised only without faiss
    raise ImportError(f"faiss is not installed: {INSTALL_HINT}") from e
finally:
    if _USER_POLICY is None:
        del os.environ["OMP_WAIT_POLICY"]

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
# Defaults that make approximate indexes useful out of the box; a spec's own
# "|param=..." part overrides them.
DEFAULT_EF_SEARCH = 64
DEFAULT_NPROBE = 16


def faiss_reason(e: Exception) -> str:
    """FAISS's own sentence, without its C++ file/line prefix."""
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    m = re.search(r" at \S+:\d+: (.*)$", text)
    return m.group(1) if m else text


def _inner(index: "faiss.Index") -> "faiss.Index":
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _hnsw(index: "faiss.Index"):
    """The HNSW graph of an index (through IDMap and transforms: "PCA64,HNSW32"), or None."""
    inner = _inner(index)
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return getattr(inner, "hnsw", None)


def _ivf(index: "faiss.Index"):
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def build(dim: int, spec_text: str, metric: str) -> "faiss.Index":
    """An empty index for spec, or InvalidArgument with FAISS's own reason."""
    spec = IndexSpec.parse(spec_text)
    try:
        index = faiss.index_factory(dim, spec.factory, METRICS[metric])
    except (RuntimeError, ValueError) as e:
        raise InvalidArgument(
            f"faiss cannot build index {spec.factory!r} for dim {dim}: {faiss_reason(e)}") from None
    if not _has_native_ids(index):
        index = faiss.IndexIDMap(index)
    _apply_params(index, spec)
    return index


def check_graph(index: "faiss.Index") -> None:
    """InvalidArgument for an HNSW graph with M < 2: faiss aborts (M=0) or
    segfaults (M=1) on the first add. memoryd.keyspace.check_index refuses such
    specs at creation. A bank made before that still opens (build() does not
    check: it is empty, its first add crashed) and can be deleted; its adds are
    refused where planning them asks bytes_per_vector, and the add planning of
    the others (HNSW<M> over keys kept in the rows) should call this too."""
    graphs = [_hnsw(index)]
    ivf = _ivf(index)
    if ivf is not None:
        graphs.append(getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None))
    for g in graphs:
        if g is None:
            continue
        try:
            ok = g.nb_neighbors(0) >= 4 and g.nb_neighbors(1) >= 2     # 2M at level 0, M above
        except RuntimeError:
            ok = False
        if not ok:
            raise InvalidArgument("this bank's HNSW graph has M < 2 links per node, which faiss "
                                  "cannot add to (made before memoryd checked it): delete it")


def _has_native_ids(index: "faiss.Index") -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, TypeError):
        return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))


def _apply_params(index: "faiss.Index", spec: IndexSpec) -> None:
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, DEFAULT_EF_SEARCH)
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, max(ivf.nprobe, DEFAULT_NPROBE))
    if spec.params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, spec.params)
        except (RuntimeError, ValueError) as e:
            raise InvalidArgument(
                f"bad search parameters {spec.params!r} for {spec.factory!r}: "
                f"{faiss_reason(e)}") from None
    _clamp_params(index)


def _clamp_params(index: "faiss.Index") -> None:
    """Search parameters into the ranges check_index enforces at creation, for
    banks made before it: nprobe 0 failed every search, efSearch 0 returned one
    result, efSearch 2**31-1 allocated ~24 GB a search."""
    ivf = _ivf(index)
    graphs = [_hnsw(index)]
    if ivf is not None:
        ivf.nprobe = min(max(ivf.nprobe, 1), max(ivf.nlist, 1))
        graphs.append(getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None))
    for g in graphs:
        if g is not None:
            g.efSearch = min(max(g.efSearch, 1), MAX_EF)
            g.efConstruction = min(max(g.efConstruction, 1), MAX_EF)


def min_training_rows(index: "faiss.Index") -> int:
    """The fewest vectors FAISS accepts to train this index (0 if none needed)."""
    if index.is_trained:
        return 0
    need = 1
    try:
        need = max(need, faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, TypeError):
        pass
    pq = getattr(_inner(index), "pq", None)
    if pq is not None:
        need = max(need, 1 << pq.nbits)
    return need


def train(index: "faiss.Index", keys: np.ndarray, spec_text: str) -> None:
    """Train in place on keys; NeedsTraining when there are too few."""
    need = min_training_rows(index)
    if len(keys) < need:
        raise NeedsTraining(
            f"index {spec_text!r} must be trained on at least {need} vectors and the "
            f"first add brings {len(keys)}: send a larger first batch")
    try:
        index.train(keys)
    except RuntimeError as e:
        raise NeedsTraining(
            f"training index {spec_text!r} on {len(keys)} vectors failed: "
            f"{faiss_reason(e)}") from None


def fixed_bytes(index: "faiss.Index") -> int:
    """Bytes an empty (trained) index holds: centroids, codebooks, headers."""
    return int(faiss.serialize_index(index).nbytes)


def code_bytes(index: "faiss.Index", dim: int) -> int:
    """Bytes of one vector's code (what IO_FLAG_MMAP_IFC leaves on disk)."""
    try:
        return int(_inner(index).sa_code_size())
    except RuntimeError:
        return dim * 4


def bytes_per_vector(index: "faiss.Index", dim: int) -> int:
    """Bytes the index adds per stored vector: its code, its id, graph links."""
    inner = _inner(index)
    try:
        code = int(inner.sa_code_size())
    except RuntimeError:
        code = getattr(inner, "code_size", 0) or dim * 4
    per = code + 8  # the 64-bit id (IDMap array or IVF list entry)
    check_graph(index)
    hnsw = _hnsw(index)
    if hnsw is not None:
        m0, m1 = hnsw.nb_neighbors(0), hnsw.nb_neighbors(1)
        # level-0 links, expected upper-level links (a vector reaches level 1
        # with probability ~1/M, so ~4 bytes), its level and offset entries.
        per += 4 * m0 + 4 * m1 // max(1, m1) + 4 + 8
    return per


def costly_add(index: "faiss.Index") -> bool:
    """True when adding a row costs more than copying it (anything but a Flat
    index: a graph insert, an IVF assignment, a PQ encoding): such indexes take
    their new rows through a growing segment (memoryd.storage.segments)."""
    return type(_inner(index)) not in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP)


# IVF indexes whose codes can be computed apart from the index (sa_encode on
# the trained template, off the bank's lock) and appended to it after
# (add_sa_codes, a copy into the inverted lists): results equal add_with_ids.
# Not the fast-scan kinds (IVF..,PQ4x4fs: add_sa_codes corrupts the heap in
# faiss 1.15), nor anything behind an IDMap or a transform (no sa_encode there).
_ENCODED_APART = (faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)


def encodes_apart(index: "faiss.Index") -> bool:
    return type(_inner(index)) in _ENCODED_APART


def supports_remove(index: "faiss.Index") -> bool:
    return _hnsw(index) is None     # also "PCA64,HNSW32": remove_ids is not implemented


def search_params(index: "faiss.Index", k: int):
    """SearchParameters for a top-k search of index, or None (its own settings).

    faiss's HNSW search keeps efSearch candidates, so with efSearch < k it
    returns fewer than k results although the index holds more (efSearch=8,
    k=1000: 373): an HNSW search runs with max(efSearch, k) candidates (k is at
    most api.MAX_K = MAX_EF). Shards pass this to index.search(..., params=).
    """
    hnsw = _hnsw(index)
    if hnsw is None or hnsw.efSearch >= k:
        return None
    return faiss.SearchParametersHNSW(efSearch=int(k))


def empty_like(index: "faiss.Index") -> "faiss.Index":
    """A copy keeping training (quantizers, codebooks) but no vectors."""
    clone = faiss.clone_index(index)
    clone.reset()
    return clone


def num_gpus() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def require_gpu() -> None:
    """FailedPrecondition, with the install hint, unless faiss sees a GPU."""
    if num_gpus() == 0:
        raise FailedPrecondition(GPU_HINT)


def configure(index: "faiss.Index", spec_text: str) -> "faiss.Index":
    """Apply the spec's search parameters to an index read back from disk."""
    _apply_params(index, IndexSpec.parse(spec_text))
    return index


# ---- OpenMP threads per search ------------------------------------------------------
# FAISS runs every search on all its threads. A decode-sized search (a few
# queries) then pays to wake the others and waits for the slowest, and on
# shared cores one descheduled team member stalls the region: 8 product-key
# queries on 2 threads had a p99 of 24 ms (spinning) where one thread had 0.7
# ms, and a single query over a Flat index is slower on 2 threads than on 1
# (faiss splits one query badly: 2.9 vs 1.3 ms, 100k x 64-d). So a search
# takes one thread per WORK_PER_THREAD multiply-adds, one for a single query,
# and at most the calling thread's own count (OMP_NUM_THREADS or the cores,
# unless the caller set another). omp_set_num_threads sets the CALLING
# thread's count only (libgomp keeps one per thread; tests/test_search_threads.py),
# so searches on concurrent RPC or pool threads each get theirs; it is put
# back after the search.
WORK_PER_THREAD = 8_000_000   # multiply-adds: ~2 ms of one core, far above a wake-up
THREADS_PER_SIZE = True       # False: faiss's default, all threads (benchmarks compare)


def threads_for(nq: int, work_per_query: int) -> int:
    """OpenMP threads for a search of nq queries costing work_per_query multiply-adds each."""
    most = faiss.omp_get_max_threads()          # this thread's count: the ceiling
    if not THREADS_PER_SIZE:
        return most
    if nq <= 1:
        return 1
    return max(1, min(most, nq * work_per_query // WORK_PER_THREAD))


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """Run the block's faiss calls on n OpenMP threads (this thread's setting only)."""
    before = faiss.omp_get_max_threads()
    if n == before:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def work_per_query(index: "faiss.Index", rows: int, dim: int) -> int:
    """Rough multiply-adds one query costs in index holding rows vectors (threads_for)."""
    hnsw = _hnsw(index)
    if hnsw is not None:      # ~efSearch nodes visited, each with its level-0 links
        return max(1, hnsw.efSearch) * hnsw.nb_neighbors(0) * dim
    try:
        ivf = faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return max(1, rows) * dim           # flat-like: every vector (an upper bound for codes)
    return ivf.nlist * dim + max(1, ivf.nprobe * rows // max(1, ivf.nlist)) * dim
