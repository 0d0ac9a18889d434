"""FAISS index construction, training and size accounting for one bank.

The one module that imports faiss (with its install hint). A bank's index
spec is parsed by memoryd.keyspace.IndexSpec. Ids are always explicit 64-bit
ids: IVF indexes store them natively, everything else is wrapped in an
IndexIDMap (never positional ids).
"""
from __future__ import annotations

import re

import numpy as np

from memoryd.errors import FailedPrecondition, InvalidArgument, NeedsTraining
from memoryd.keyspace import IndexSpec

# How to get faiss, as the README's install line says it (./dev installs the cpu extra).
INSTALL_HINT = ("pip install -e '.[cpu]' in the memoryd checkout (CPU hosts), "
                "or -e '.[gpu]' (faiss-gpu, CUDA hosts)")
GPU_HINT = ("tier gpu needs a CUDA device and faiss-gpu (pip install -e '.[gpu]' in the "
            "memoryd checkout); this host has none: use ram or mmap")

try:
    import faiss
except ImportError as e:  # pragma: no cover - exercised only without faiss
    raise ImportError(f"faiss is not installed: {INSTALL_HINT}") from e

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


def _has_native_ids(index: "faiss.Index") -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, TypeError):
        return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2))


def _apply_params(index: "faiss.Index", spec: IndexSpec) -> None:
    inner = _inner(index)
    hnsw = getattr(inner, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, DEFAULT_EF_SEARCH)
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(ivf.nlist, max(ivf.nprobe, DEFAULT_NPROBE))
    except (RuntimeError, TypeError):
        pass
    if spec.params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, spec.params)
        except (RuntimeError, ValueError) as e:
            raise InvalidArgument(
                f"bad search parameters {spec.params!r} for {spec.factory!r}: "
                f"{faiss_reason(e)}") from None


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
    hnsw = getattr(inner, "hnsw", None)
    if hnsw is not None:
        m0, m1 = hnsw.nb_neighbors(0), hnsw.nb_neighbors(1)
        # level-0 links, expected upper-level links (a vector reaches level 1
        # with probability ~1/M, so ~4 bytes), its level and offset entries.
        per += 4 * m0 + 4 * m1 // max(1, m1) + 4 + 8
    return per


def supports_remove(index: "faiss.Index") -> bool:
    return getattr(_inner(index), "hnsw", None) is None


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
