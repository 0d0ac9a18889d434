"""The crash loop (tests/crash_loop.py) in the suite: a busy daemon killed 24
times, by SIGKILL at random moments and at the write path's fault points
(MEMORYD_CRASH_AT), checked after each restart: every acknowledged write
there byte for byte, every in-flight one all or nothing, no phantom or
duplicate ids, usage equal to contents, searches right.

About 2 minutes on a 2-core machine (its own timeout: a slow CI host may take
twice that). The long version:
    python tests/crash_loop.py --kills 200 --seed 1
"""
from __future__ import annotations

import os

import pytest

import crash_loop

KILLS = 24
SEED = int(os.environ.get("CRASH_LOOP_SEED", "20240601"))


@pytest.mark.timeout(900)
def test_crash_loop_keeps_every_acknowledged_write_and_tears_none(tmp_path):
    # fault_rate 0.5: about half the kills come from fault points, each point in turn
    s = crash_loop.run(tmp_path / "data", kills=KILLS, seed=SEED, writers=4, fault_rate=0.5,
                       recovery_rate=0.1, verbose=False)
    print(s.line())
    assert not s.violations, (
        f"{len(s.violations)} violations (reproduce: python tests/crash_loop.py --kills {KILLS} "
        f"--seed {SEED} --fault-rate 0.5 --recovery-rate 0.1; data dir {s.data_dir}):\n"
        + "\n".join(s.violations[:20]))
    assert s.kills >= KILLS
    assert sum(s.fault_kills.values()) >= 1, f"no fault point killed the daemon: {s.line()}"
    assert s.acked_total > 0 and s.inflight_all + s.inflight_none > 0, s.line()
