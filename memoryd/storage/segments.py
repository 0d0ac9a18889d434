"""Growing segments: ingest at the speed of a Flat bank into any index.

Adding a row to an HNSW graph costs ~50x appending it (HNSW32, 128-d, here:
~8k rows/s on one core; a Flat bank takes ~400k rows/s in adds of 10k), and an IVF or PQ
add assigns and encodes every row. So, as in Milvus and Qdrant, a write to
such a bank only appends its rows (the log record, the row columns: what
makes it durable) and leaves them *growing*: the rows past the prefix its
shard's index holds (Shard.indexed). A search answers from both, the index's
top-k over the sealed rows and an exact top-k (FAISS's brute-force kernel)
over the growing ones, merged in the metric's direction, so a write is
searchable at once and an exact index (IVF probing every list) stays exact.
The process's one background thread, the Sealer below, then *seals* growing
rows: adds them to the shard's one index, in chunks, and nothing else changes
(no log record: the rows were already the truth, and a checkpoint records the
rows its index snapshot covers, `index_rows`; a reopen leaves the rest growing
and seals them here, instead of re-adding them before the bank opens).

How rows are sealed, and why (FAISS indexes must not be searched while they
are added to, so what takes time happens off the bank's lock where it can):
  * IVF-Flat/PQ/SQ (fx.encodes_apart): the rows are encoded OFF the lock with
    the trained template (the list assignment and the code: all of the cost),
    and the codes appended under it (add_sa_codes: a copy, ~ms).
  * any other index in RAM of at most COPY_BYTES (HNSW* above all): the index
    is copied under the READ lock (searches go on; ~0.1 s per GB), the rows
    added to the copy OFF the lock, and the copy swapped in under the write
    lock (µs). A graph cannot be built in pieces and merged, and searching a
    pile of small graphs would cost what one graph saves: so one index, copied.
    A step seals max(SEAL_ROWS, a quarter of the index's rows), so the copy
    costs ~1% of the adds; it needs that much RAM for its time (one step at a
    time per process: at most COPY_BYTES more, not charged to any quota).
  * larger indexes, and the mmap and gpu tiers: chunks added under the write
    lock, sized to hold it ~CHUNK_S (20 ms): a search waits at most about that,
    and the readers waiting when a chunk ends go in before the next (RWLock).
    Searches and chunks then take turns, so a heavy search load slows sealing.
  A remove or a reload meanwhile that moves rows of a step (Shard._moved_since)
  throws the step away; the next one starts afresh from the rows as they are.
  The chunks under the lock yield to writers: below high_rows() growing rows
  of a bank, one is taken only when no writer holds or waits for the lock and
  none let go of it for QUIET_S (RWLock.write_background), so an ingest loop
  is not slowed down; past high_rows() they queue like any writer (the exact
  search over growing rows costs in proportion to them: 32 queries over 131k
  growing 128-d rows take ~85 ms on one core here). Off-lock steps need the
  write lock only for their last µs-to-ms, queued like any writer.
  The sealer runs on SEAL_THREADS OpenMP threads (half the cores), leaving the
  rest to ingest and searches.

Which banks grow: every index whose add is costly (fx.costly_add: all but
Flat), once a shard holds more than INLINE_ROWS rows; smaller shards are
indexed inline as before (an add of a few thousand rows costs a few tens of
ms, and their searches are the index's own, as tests of search parameters
expect). SEAL_ROWS = 0 (env MEMORYD_SEAL_ROWS=0) turns growing segments off:
every add goes into the index inline, as before they existed.

When: the Sealer seals the bank with the most growing rows first, once it has
>= SEAL_ROWS of them or has had no write for IDLE_S; it works on one bank for
about STEP_S (a step off the lock is not cut short), then chooses again. A failure is logged and that bank retried
after RETRY_S; the thread never dies of it. It exits when no bank has growing
rows (and is started again by the next one); Bank.close() drops its bank.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Protocol


class Bank(Protocol):
    """What the sealer asks of a bank (memoryd.storage.bank.Bank; a Protocol,
    so this module imports no bank and no cycle forms)."""

    last_write: float                                   # time.monotonic() of its last write

    def growing_rows(self) -> int: ...
    def seal_step(self, background: bool = True, budget_s: float = ...) -> int: ...

log = logging.getLogger("memoryd")

SEAL_ROWS = int(os.environ.get("MEMORYD_SEAL_ROWS", "32768"))  # 0: no growing segments
INLINE_ROWS = int(os.environ.get("MEMORYD_INLINE_ROWS", "4096"))  # a shard up to this many
                        # rows indexes its adds inline
HIGH_ROWS = 0           # growing rows of a bank past which sealing stops yielding (0: 4 x SEAL_ROWS)
IDLE_S = 1.0            # a bank without writes for this long is sealed whatever it holds
QUIET_S = 0.005         # the lock must have been free of writers this long (yielding)
CHUNK_S = 0.02          # the write lock held per chunk, about
MIN_CHUNK, MAX_CHUNK = 16, 65536
FIRST_CHUNK = 128       # rows of a shard's first chunk (then sized from its rate)
ENCODE_ROWS = 16384     # rows encoded off the lock per step (encodes_apart)
COPY_BYTES = 1 << 30    # an index up to this size is sealed by copy-and-swap (Shard.copies)
STEP_S = 0.5            # the sealer's time on one bank before it chooses again
RETRY_S = 5.0           # after a failure
LINGER_S = 2.0          # the thread waits this long for work before it exits
SEAL_THREADS = 0        # OpenMP threads of the sealer (0: half this thread's, at least 1)

# seconds the write lock was held per sealing chunk, the most recent (metrics, benches)
HOLDS: deque = deque(maxlen=8192)


def enabled() -> bool:
    return SEAL_ROWS > 0


def high_rows() -> int:
    return HIGH_ROWS or 4 * SEAL_ROWS


def seal_threads() -> int:
    if SEAL_THREADS:
        return SEAL_THREADS
    from memoryd.storage.faiss_index import faiss
    return max(1, faiss.omp_get_max_threads() // 2)


def next_chunk(rows: int, seconds: float) -> int:
    """Rows of the next chunk: what holds the lock ~CHUNK_S at the rate just seen."""
    rate = rows / max(seconds, 1e-4)
    return int(min(MAX_CHUNK, max(MIN_CHUNK, rate * CHUNK_S)))


class Sealer:
    """The one background sealing thread of a process (see the module doc)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._banks: dict["Bank", None] = {}      # banks that may have growing rows
        self._retry: dict["Bank", float] = {}     # bank -> not before (after a failure)
        self._thread: threading.Thread | None = None
        self.sealed = 0                           # rows sealed by this thread (metrics, tests)
        self.failures = 0

    def wake(self, bank: "Bank") -> None:
        """bank has growing rows (called by the bank after a write, an open)."""
        with self._cond:
            self._banks[bank] = None
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memoryd-sealer",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def forget(self, bank: "Bank") -> None:
        """bank is closed or deleted: never touched again."""
        with self._cond:
            self._banks.pop(bank, None)
            self._retry.pop(bank, None)
            self._cond.notify()

    def _choose(self, now: float) -> tuple["Bank | None", float]:
        """(the bank to seal now or None, seconds until one may be due)."""
        best, most, wait = None, 0, min(IDLE_S, 1.0)
        for bank in list(self._banks):
            growing = bank.growing_rows()
            if not growing:
                del self._banks[bank]
                continue
            not_before = self._retry.get(bank, 0.0)
            if not_before > now:
                wait = min(wait, not_before - now)
                continue
            idle = now - bank.last_write
            if growing >= SEAL_ROWS or idle >= IDLE_S:
                if growing > most:
                    best, most = bank, growing
            else:
                wait = min(wait, IDLE_S - idle)
        return best, wait

    def _run(self) -> None:
        from memoryd.storage import faiss_index as fx
        with fx.omp_threads(seal_threads()):       # this thread's own OpenMP count
            while True:
                with self._cond:
                    bank, wait = self._choose(time.monotonic())
                    if bank is None:
                        if not self._banks:
                            self._cond.wait(LINGER_S)
                            if not self._banks:
                                self._thread = None
                                return
                        else:
                            self._cond.wait(max(wait, 0.01))
                        continue
                try:
                    self.sealed += bank.seal_step(background=True, budget_s=STEP_S)
                    with self._cond:
                        self._retry.pop(bank, None)
                except Exception:           # never the daemon's end: log, retry later
                    self.failures += 1
                    log.exception("bank %s: sealing its growing rows failed; retrying in %.0f s",
                                  bank.spec.name, RETRY_S)
                    with self._cond:
                        if bank in self._banks:
                            self._retry[bank] = time.monotonic() + RETRY_S


SEALER = Sealer()


def _after_fork() -> None:          # a forked child has no sealer thread: start afresh
    global SEALER
    SEALER = Sealer()


os.register_at_fork(after_in_child=_after_fork)
