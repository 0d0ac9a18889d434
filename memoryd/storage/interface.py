"""The bank interface: everything the engine may call on one bank.

`Bank` (FAISS shards over row files) and `ProductKeyBank` (fixed product
keys) implement it; the engine (memoryd.engine) reaches a bank through
nothing else (it also asks storage.faiss_index whether there is a GPU, and
dedups session keys with a flat faiss index). An operation a kind of bank cannot do raises FailedPrecondition
(e.g. adding keys to a product-key bank), never AttributeError: every method
below is abstract, so a bank class that forgets one cannot be built.

Durability: every write method below is one record of the bank's
write-ahead log (memoryd.storage.wal), logged before it is applied: all of
it survives a crash or none of it does. `lsn` is the last record applied;
`sync(lsn)` returns once it is on disk (called outside the lock: group
commit). StorageFull / StorageUnwritable mean nothing was applied.

Locking: each bank carries a readers/writer lock (`lock`). The engine holds
`lock.write()` around writes (from plan_add to add, with the quota
reservation between them) and `lock.read()` around reads; the methods here
take no lock themselves, but seal_now (and the background sealer of
memoryd.storage.segments, which takes it a chunk at a time).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from memoryd.api import BankSpec, ExportChunk, ShardSearch
from memoryd.storage.locks import RWLock


@dataclass
class AddPlan:
    """An add checked and ready (ids chosen, index trained if it had to be),
    not yet applied: the engine reserves its bytes in between."""

    ids: np.ndarray                    # (n,) int64
    keys: np.ndarray                   # (n, dim) float32
    values: np.ndarray | None          # (n, value_dim) in the bank's value dtype
    row_bytes: int                     # what one row costs once the plan is applied
    detail: Any = field(default=None, repr=False)   # the bank's own (e.g. a trained index)
    scores: np.ndarray | None = None   # (n,) float32: a session append's scores
    evict: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # ^ fifo: the oldest ids this add removes to make room, in the same log record
    moved_from: tuple[str, np.ndarray] | None = None   # a promote's (source bank, ids)


class BankStore(ABC):
    """One bank on disk and in memory (see the module doc for locking)."""

    def __init__(self, path: Path, spec: BankSpec):
        self.path, self.spec = Path(path), spec
        self.lock = RWLock()
        self.frozen = False            # mirrors the catalog; set by the engine
        # (step, offset): ids the bank assigns are = offset (mod step), so the
        # slices of one bank on N shard processes never assign the same id
        # (memoryd.cluster.placement); (1, 0) on a single process
        self.id_step: tuple[int, int] = (1, 0)
        self.lsn = 0                   # the last log record applied
        # (source bank, ids) of promotes-with-move found in the log on open: the
        # engine makes sure those ids left the source (engine.banks._redo_moves)
        self.replayed_moves: list[tuple[str, np.ndarray]] = []

    # ---- life cycle -----------------------------------------------------------
    @abstractmethod
    def create(self) -> "BankStore":
        """Make the bank's files (its folder must not exist)."""

    @abstractmethod
    def open(self) -> "BankStore":
        """Load the bank from its files, rolling back a write torn by a crash."""

    @abstractmethod
    def checkpoint(self) -> None:
        """Write the bank's files (fsync'd, switched atomically) and empty its log."""

    @abstractmethod
    def close(self) -> None:
        """Release open files (after a checkpoint, or without one: the log keeps it all)."""

    @abstractmethod
    def snapshot_to(self, dest: Path) -> None:
        """Checkpoint, then put the checkpoint's files in dest (a new folder): a
        bank folder that open() loads as this bank is now."""

    @abstractmethod
    def sync(self, lsn: int) -> None:
        """Return once log record lsn is on disk (fsync'd)."""

    @abstractmethod
    def delete_files(self) -> None: ...

    @abstractmethod
    def set_tier(self, tier: str) -> None:
        """Move the bank to tier (memoryd.storage.tiers), live."""

    @abstractmethod
    def checksum(self) -> str:
        """'sha256:...' over what the bank holds: what a frozen bank promises."""

    # ---- sizes ----------------------------------------------------------------------
    @property
    @abstractmethod
    def count(self) -> int: ...

    @property
    @abstractmethod
    def trained(self) -> bool: ...

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the bank holds and is charged for (0 when empty)."""

    @abstractmethod
    def tier_bytes(self) -> dict[str, int]:
        """Where nbytes() sits ({"ram"|"disk"|"gpu": bytes}), and the files on disk."""

    @abstractmethod
    def split_bytes(self) -> dict[str, int]:
        """nbytes() split: {"data": ids, keys, values; "index": what the index adds}."""

    # ---- growing segments (memoryd.storage.segments; none by default) ---------------
    def growing_rows(self) -> int:
        """Rows written but not in the bank's index yet (searched exactly meanwhile)."""
        return 0

    def seal_now(self) -> int:
        """Put every growing row into the index now (takes the lock itself: the
        caller must not hold it); the rows sealed."""
        return 0

    # ---- writes (the caller holds lock.write()) --------------------------------------
    @abstractmethod
    def plan_add(self, keys: np.ndarray, values: np.ndarray | None,
                 ids: np.ndarray | None, scores: np.ndarray | None = None) -> AddPlan:
        """Check an add (ids new and valid; InvalidArgument, NeedsTraining) and
        prepare it; nothing is written."""

    @abstractmethod
    def add_cost(self, plan: AddPlan) -> int:
        """Bytes the bank would grow by if plan were applied now."""

    @abstractmethod
    def add(self, plan: AddPlan) -> None:
        """Apply plan: all of its rows, on every shard, or (after a crash) none."""

    @abstractmethod
    def update_values(self, ids: np.ndarray, values: np.ndarray) -> int:
        """Overwrite the values of the ids held; how many were."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the ids held; how many were."""

    @abstractmethod
    def oldest_ids(self, nbytes: int, row_bytes: int | None = None) -> np.ndarray:
        """The oldest ids (smallest) worth nbytes at row_bytes each (default:
        what a row costs now): what fifo eviction removes."""

    # ---- reads (the caller holds lock.read()) ------------------------------------------
    @abstractmethod
    def searchers(self) -> list[ShardSearch]:
        """The pieces a search fans out to, each answering with its payload."""

    @abstractmethod
    def gather(self, ids: np.ndarray, *, keys: bool, values: bool
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(found, keys, values) for any-shaped ids; zeros where not found."""

    @abstractmethod
    def scores_of(self, ids: np.ndarray) -> np.ndarray:
        """(n,) float32 scores a session append gave ids; NaN where none."""

    @abstractmethod
    def export_chunks(self, chunk_rows: int) -> Iterator[ExportChunk]: ...
