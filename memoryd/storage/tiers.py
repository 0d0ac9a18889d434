"""Where a shard's index lives: RAM, memory-mapped from disk, or a GPU.

    ram    the index is an ordinary FAISS index in RAM (the default)
    mmap   the index snapshot is memory-mapped (IO_FLAG_MMAP_IFC: flat codes
           stay on disk and are paged in on demand; graph links and IVF lists
           are read into RAM), rows added since the snapshot go to a small RAM
           index beside it, and both are searched and merged. The row columns
           (ids, keys, values) are memory-mapped too (memoryd.storage.rows). So a
           bank larger than RAM can be searched; merging the RAM part into the
           snapshot (at checkpoints) and removals rebuild the index in RAM.
    gpu    the index is cloned to GPU 0 (faiss-gpu and a CUDA device needed;
           a clear FailedPrecondition otherwise); rows stay in RAM.

Every kind offers what a Shard (memoryd.storage.shard) uses: search,
add_with_ids and ntotal (ram and mmap also add_sa_codes: sealing encodes IVF
rows apart; a GpuIndex has none, so its rows are sealed by add_with_ids);
the Shard writes snapshots from an in-RAM copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memoryd.errors import FailedPrecondition
from memoryd.storage import faiss_index as fx
from memoryd.storage.faiss_index import faiss
from memoryd.topk import merge_topk


class MappedIndex:
    """A read-only memory-mapped snapshot plus a RAM index for newer rows."""

    def __init__(self, snapshot: Path | None, delta: "faiss.Index", spec_index: str, metric: str):
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
        self.base = (fx.configure(faiss.read_index(str(snapshot), flags), spec_index)
                     if snapshot is not None else None)
        self.delta, self.metric = delta, metric

    @property
    def ntotal(self) -> int:
        return (self.base.ntotal if self.base is not None else 0) + self.delta.ntotal

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        extra = {} if params is None else {"params": params}
        parts = [ix.search(queries, k, **extra) for ix in (self.base, self.delta)
                 if ix is not None and ix.ntotal]
        if len(parts) == 1:
            return parts[0]
        dist, ids, _ = merge_topk(parts, list(range(len(parts))), k, self.metric)
        return dist, ids

    def add_with_ids(self, keys: np.ndarray, ids: np.ndarray) -> None:
        self.delta.add_with_ids(keys, ids)   # the mapped snapshot cannot grow in place

    def add_sa_codes(self, codes: np.ndarray, ids: np.ndarray) -> None:
        self.delta.add_sa_codes(codes, ids)  # codes encoded apart (memoryd.storage.segments)


class GpuIndex:
    """A FAISS index cloned to GPU 0; snapshots go through a CPU copy."""

    _resources = None

    def __init__(self, cpu_index: "faiss.Index"):
        fx.require_gpu()
        if GpuIndex._resources is None:
            GpuIndex._resources = faiss.StandardGpuResources()
        try:
            self.index = faiss.index_cpu_to_gpu(GpuIndex._resources, 0, cpu_index)
        except RuntimeError as e:
            raise FailedPrecondition(f"this index cannot live on a GPU: {fx.faiss_reason(e)}") from None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int, params=None):
        return self.index.search(queries, k) if params is None else self.index.search(queries, k, params=params)

    def add_with_ids(self, keys: np.ndarray, ids: np.ndarray) -> None:
        self.index.add_with_ids(keys, ids)

    def cpu(self) -> "faiss.Index":
        return faiss.index_gpu_to_cpu(self.index)


def place(tier: str, index: "faiss.Index", snapshot: Path | None, spec_index: str, metric: str):
    """Put an in-RAM index on `tier`. For mmap, `snapshot` is the file of the
    rows `index` does not hold (None: none yet), and `index` holds the rest."""
    if tier == "mmap":
        return MappedIndex(snapshot, index, spec_index, metric)
    if tier == "gpu":
        return GpuIndex(index)
    return index
