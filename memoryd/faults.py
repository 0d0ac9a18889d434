"""Crash points for tests: MEMORYD_CRASH_AT=<name> kills the process there.

The crash tests (tests/test_crash.py) start a process with this variable set,
let it die at the named step of a multi-step write with os._exit (no
cleanup, no flush: like a power cut for the process), then reopen the data
dir and check that the write is all there or not there at all. Unset, a
point costs one comparison.
"""
from __future__ import annotations

import os

CRASH_EXIT = 70
_CRASH_AT = os.environ.get("MEMORYD_CRASH_AT")


def point(name: str) -> None:
    if _CRASH_AT == name:
        os._exit(CRASH_EXIT)
