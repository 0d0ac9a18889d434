"""Timing shared by the benchmarks: every compared path timed in the same run."""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable


def interleaved(paths: dict[str, Callable[[], object]], rounds: int, *,
                shuffle: bool = False) -> dict[str, float]:
    """Median seconds of each path, timed in rounds (one call of each per round),
    after one warm-up call each (page faults, thread pools, reply buffers sized).

    shuffle: each round takes the paths in a new random order. The first call
    after another backend's pays for waking threads and cold caches (~0.2 ms,
    measured), which a fixed order always charges to the same path; that
    matters for millisecond paths, not for ones of hundreds of ms."""
    for fn in paths.values():
        fn()
    rng = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name in (rng.sample(list(paths), len(paths)) if shuffle else list(paths)):
            t = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
