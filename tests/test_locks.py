"""The bank's readers/writer lock (memoryd.storage.locks.RWLock): exclusive
writes, shared reads, and neither side starved by a loop of the other."""
from __future__ import annotations

import threading
import time

from memoryd.storage.locks import RWLock


def test_a_writer_in_a_loop_lets_waiting_readers_in():
    lock, stop, writes, waits = RWLock(), threading.Event(), [0], []

    def writer():
        while not stop.is_set():
            with lock.write():
                writes[0] += 1
                time.sleep(0.001)

    def reader():
        for _ in range(50):
            before = writes[0]
            with lock.read():
                waits.append(writes[0] - before)          # writes that went before us
            time.sleep(0.001)

    w, r = threading.Thread(target=writer), threading.Thread(target=reader)
    w.start()
    r.start()
    r.join(20)                                             # starved: it never gets in
    stop.set()
    w.join()
    r.join()
    assert len(waits) == 50 and max(waits) <= 3, waits     # one turn, not a starvation


def test_readers_in_a_loop_let_a_waiting_writer_in():
    lock, stop, inside, seen = RWLock(), threading.Event(), [0], []

    def reader():
        while not stop.is_set():
            with lock.read():
                inside[0] += 1
                time.sleep(0.001)
                inside[0] -= 1

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for r in readers:
        r.start()
    try:
        for _ in range(20):
            with lock.write():
                seen.append(inside[0])                     # no reader inside a write
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert seen == [0] * 20
