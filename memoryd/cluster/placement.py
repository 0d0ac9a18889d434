"""Where rows and sessions live when memoryd runs as N shard processes.

One rule places everything, with no lookup table to keep or lose:

    a row with id x           lives on shard  x mod N
    session s-<16 hex>        lives on shard  int(hex, 16) mod N

Each shard process (`memoryd serve --shard-index i --num-shards N`) holds one
slice of every bank and assigns only ids = i (mod N) (BankStore.id_step), and
makes session ids = i (mod N); a router sends a caller's explicit ids to the
shard that the same rule names, so every id is unique across the cluster and
get/update/remove reach exactly one shard per id. A promote writes into the
session's own shard's slice of its target, with that shard's ids: the rule
still holds.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import numpy as np

from memoryd.api import int_ok
from memoryd.errors import InvalidArgument

SESSION_ID = re.compile(r"^s-[0-9a-f]{16}$")   # a session's id, also its bank's name
MAX_PROCESSES = 1024                           # shard processes in one cluster


@dataclass(frozen=True)
class Placement:
    """This process's place in the cluster: shard `index` of `count` (0 of 1: alone)."""

    index: int = 0
    count: int = 1

    def validated(self) -> "Placement":
        if not int_ok(self.count) or not 1 <= self.count <= MAX_PROCESSES:
            raise InvalidArgument(f"num-shards must be in 1..{MAX_PROCESSES}; got {self.count!r}")
        if not int_ok(self.index) or not 0 <= self.index < self.count:
            raise InvalidArgument(
                f"shard-index must be in 0..{self.count - 1} (num-shards {self.count}); "
                f"got {self.index!r}")
        return self

    @property
    def id_step(self) -> tuple[int, int]:
        """(step, offset) of the ids this shard's banks assign."""
        return (self.count, self.index)

    def new_session_id(self) -> str:
        """A fresh random session id that session_shard() maps to this shard."""
        r = secrets.randbits(64)
        r -= (r % self.count) - self.index
        if r >= 1 << 64:
            r -= self.count
        return f"s-{r:016x}"


def is_session_id(name: str) -> bool:
    return isinstance(name, str) and SESSION_ID.match(name) is not None


def session_shard(session_id: str, count: int) -> int:
    """The shard holding a session (and its bank)."""
    return int(session_id[2:], 16) % count


def id_shards(ids: np.ndarray, count: int) -> np.ndarray:
    """(n,) shard of each id; negative ids (never stored) map to shard 0, whose
    own check refuses them with the single-process message."""
    return np.where(ids < 0, 0, ids % count).astype(np.int64)


def spread(n: int, count: int, start: int, min_rows: int) -> list[tuple[int, slice]]:
    """(shard, rows) parts of an add of n rows without ids: consecutive pieces of
    at least min_rows rows over as many shards as that allows, beginning at
    shard `start` (a router rotates it, so small adds take turns)."""
    parts = max(1, min(count, -(-n // max(1, min_rows))))
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [((start + j) % count, slice(int(bounds[j]), int(bounds[j + 1])))
            for j in range(parts) if bounds[j + 1] > bounds[j]]

