"""FanOut: calls on N shard backends, in parallel, with one failure rule.

Every call to a shard goes through `_one`, which names the shard in an
Unavailable (and counts a call past its deadline as one) and reports each
call's time to `on_call` (metrics); `_fan` runs several at once and hands
back each result or exception; `raise_first` picks the error that says
most (an unavailable shard before any other).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from memoryd import errors
from memoryd.api import MemoryBackend


class FanOut:
    def __init__(self, shards: Sequence[MemoryBackend], names: Sequence[str] | None = None,
                 on_call: Callable[[int, str, float, bool], None] | None = None):
        if not shards:
            raise errors.InvalidArgument("a sharded memory needs at least one shard")
        self.shards = list(shards)
        self.n = len(self.shards)
        self.names = list(names) if names is not None else [repr(s) for s in self.shards]
        self._on_call = on_call
        self._pool = ThreadPoolExecutor(max(4, 2 * self.n), thread_name_prefix="memoryd-fanout")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _one(self, q: int, method: str, *args, **kwargs):
        t0 = time.perf_counter()
        ok = False
        try:
            out = getattr(self.shards[q], method)(*args, **kwargs)
            ok = True
            return out
        except errors.Unavailable as e:
            raise errors.Unavailable(f"shard {q} ({self.names[q]}) is unavailable: {e}") from None
        except errors.MemorydError as e:
            if getattr(e, "code", None) == "DEADLINE_EXCEEDED":
                raise errors.Unavailable(f"shard {q} ({self.names[q]}) did not answer in time: "
                                         f"{e}") from None
            raise
        finally:
            if self._on_call is not None:
                self._on_call(q, method, time.perf_counter() - t0, ok)

    def _fan(self, calls: dict[int, tuple]) -> dict[int, Any]:
        """{shard: result or the exception it raised} of calls {shard: (method, args, kwargs)},
        run in parallel (one in the calling thread)."""
        if len(calls) == 1:
            (q, (m, a, kw)), = calls.items()
            try:
                return {q: self._one(q, m, *a, **kw)}
            except Exception as e:  # noqa: BLE001 - handed to _raise_first
                return {q: e}
        futs = {q: self._pool.submit(self._one, q, m, *a, **kw) for q, (m, a, kw) in calls.items()}
        out = {}
        for q, f in futs.items():
            try:
                out[q] = f.result()
            except Exception as e:  # noqa: BLE001
                out[q] = e
        return out

    def _all(self, method: str, *args, skip_missing: bool = False, **kwargs) -> dict[int, Any]:
        """method on every shard; the first failure (unavailable ones first) raised.
        skip_missing: a shard without the bank (NotFound) is left out, unless all lack it."""
        got = self._fan({q: (method, args, kwargs) for q in range(self.n)})
        if skip_missing:
            found = {q: r for q, r in got.items() if not isinstance(r, errors.NotFound)}
            if not found:
                raise got[0]
            got = found
        raise_first(got)
        return got

    def _any(self, method: str, *args, **kwargs):
        """method on the first shard that answers (a call on the shared catalog)."""
        last = None
        for q in range(self.n):
            try:
                return self._one(q, method, *args, **kwargs)
            except errors.Unavailable as e:
                last = e
        raise last


def raise_first(fails: dict[int, Any], note: str = "") -> None:
    """Raise the failure that says most: an unavailable shard first, else the
    lowest shard's; nothing when there is none."""
    fails = {q: e for q, e in fails.items() if isinstance(e, BaseException)}
    if not fails:
        return
    down = sorted(q for q, e in fails.items() if isinstance(e, errors.Unavailable))
    if down:
        first = fails[down[0]]
        raise errors.Unavailable(
            f"{len(down)} shard(s) unavailable ({', '.join(map(str, down))}): {first}{note}")
    e = fails[min(fails)]
    if note and isinstance(e, errors.MemorydError) and not isinstance(e, errors.QuotaExceeded):
        raise type(e)(f"{e}{note}") from None
    raise e
