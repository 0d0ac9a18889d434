"""Which bank stacks clients search: a small in-memory log for `memctl status`
(kept by each LocalMemory, and by a ShardedMemory for the whole stacks it routes)."""
from __future__ import annotations

import threading
import time

from memoryd.api import StackUse

MAX_STACKS = 256   # distinct (client, stack) pairs kept; the least recent leave first


class StackLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uses: dict[tuple[str, tuple[str, ...]], list] = {}   # key -> [count, last]

    def record(self, client: str, banks: list[str]) -> None:
        key = (client, tuple(banks))
        with self._lock:
            use = self._uses.pop(key, [0, 0.0])       # re-insert: dict order = recency
            use[0] += 1
            use[1] = time.time()
            self._uses[key] = use
            while len(self._uses) > MAX_STACKS:
                del self._uses[next(iter(self._uses))]

    def forget(self, bank: str) -> None:
        """Drop the stacks that name a deleted bank: a bank made again under
        its name is another bank, with no history."""
        with self._lock:
            for key in [k for k in self._uses if bank in k[1]]:
                del self._uses[key]

    def snapshot(self) -> list[StackUse]:
        with self._lock:
            return [StackUse(client=c, banks=b, searches=n, last_used_at=t)
                    for (c, b), (n, t) in reversed(self._uses.items())]
