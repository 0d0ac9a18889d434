"""The readers/writer lock every bank carries (searches share it, writes take it alone)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class RWLock:
    """Many readers or one writer, neither starving the other.

    A waiting writer holds back readers that come after it; and when a
    writer lets go, the readers waiting by then go in before the next
    writer (their turn), so a thread that writes in a loop cannot keep
    searches and bank_info out (with the GIL, the releasing writer would
    otherwise take the lock back before the woken readers run).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._readers_turn = False
        self._last_write = 0.0         # monotonic time a writer last let go (write_background)

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._waiting_readers += 1
            while self._writer or (self._waiting_writers and not self._readers_turn):
                self._cond.wait()
            self._waiting_readers -= 1
            self._readers += 1
            if not self._waiting_readers:      # every reader of this turn is in
                self._readers_turn = False
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers or self._readers_turn:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            self._release_write(time.monotonic())

    def _release_write(self, now: float | None) -> None:
        with self._cond:
            self._writer = False
            if now is not None:
                self._last_write = now
            self._readers_turn = self._waiting_readers > 0
            self._cond.notify_all()

    @contextmanager
    def write_background(self, quiet: float, timeout: float) -> Iterator[bool]:
        """The write lock for background work (sealing a growing segment), behind
        every writer: taken once no writer holds or waits for it and none has let
        go of it for `quiet` seconds, so a thread writing in a loop is not held
        up by it. Yields True with the lock held, or False (not held) when that
        moment did not come within `timeout`. Its own release counts as no write;
        readers waiting then go first, as after any writer."""
        deadline, held = time.monotonic() + timeout, False
        with self._cond:
            while True:
                now = time.monotonic()
                busy = self._writer or self._waiting_writers
                calm = now - self._last_write
                if not busy and calm >= quiet:
                    held = True
                    break
                if now >= deadline:
                    break
                self._cond.wait(deadline - now if busy else min(deadline - now, quiet - calm))
            if held:          # now queue as a writer: new readers wait, the ones in finish
                self._waiting_writers += 1
                while self._writer or self._readers or self._readers_turn:
                    self._cond.wait()
                self._waiting_writers -= 1
                self._writer = True
        if not held:
            yield False
            return
        try:
            yield True
        finally:
            self._release_write(None)
