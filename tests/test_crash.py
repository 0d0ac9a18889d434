"""Crash tests: a child process (`python -c`) opens a LocalMemory, populates it
(acknowledged writes, never closed), then runs one more step with
MEMORYD_CRASH_AT naming a point inside it, and dies there with
memoryd.faults.CRASH_EXIT (os._exit: no cleanup, no flush). The parent then
reopens the data dir and checks that the step is all there or not at all,
that everything acknowledged before it is intact, and that the catalog's
byte counts equal what the banks really hold (DESIGN lesson 9).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memoryd import faults
from memoryd.api import BankSpec
from memoryd.engine import LocalMemory
from daemon_util import ROOT, daemon_env
from reference import gaussian

TESTS = Path(__file__).resolve().parent
DIM, VDIM = 8, 4

CHILD = r'''
import json, os, signal, sys
import numpy as np
from memoryd import faults
from memoryd.api import BankSpec, SessionSpec
from memoryd.engine import LocalMemory
from reference import gaussian

DIM, VDIM = 8, 4
args = json.loads(sys.argv[1])
armed, faults._CRASH_AT = faults._CRASH_AT, None    # populate without tripping the point
mem = LocalMemory(args["dir"], reap_interval=None)
log = {}

def record(**kw):
    log.update({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in kw.items()})
    with open(args["log"] + ".tmp", "w") as f:
        json.dump(log, f)
    os.replace(args["log"] + ".tmp", args["log"])

def data(n, seed):
    return gaussian(n, DIM, seed), gaussian(n, VDIM, seed + 1000)

def session_with_scores():
    mem.create_bank(BankSpec("target", dim=DIM, value_dim=VDIM, kind="domain", shards=2))
    t_ids = mem.add("target", *data(10, 1))
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM)).session_id
    s_ids = mem.append(sid, *data(12, 2), scores=np.arange(12, dtype=np.float32))
    record(target_ids=t_ids, sid=sid, session_ids=s_ids)
    return sid

scenario = args["scenario"]
if scenario == "multi_shard_add":
    mem.create_bank(BankSpec("multi", dim=DIM, value_dim=VDIM, shards=4))
    mem.create_bank(BankSpec("single", dim=DIM, value_dim=VDIM))
    ids = [mem.add("multi", *data(20, s)) for s in (1, 2, 3)]
    single = mem.add("single", *data(10, 9))
    record(multi_ids=np.concatenate(ids), single_ids=single)
    faults._CRASH_AT = armed
    mem.add("multi", *data(40, 4))                     # dies between shards
elif scenario == "promote":
    sid = session_with_scores()
    faults._CRASH_AT = armed
    mem.promote_session(sid, "target", min_score=6, move=True)
elif scenario == "acknowledged":
    mem.create_bank(BankSpec("flat", dim=DIM, value_dim=VDIM))
    mem.create_bank(BankSpec("hnsw", dim=DIM, value_dim=VDIM, index="HNSW32", shards=2))
    mem.create_bank(BankSpec("mapped", dim=DIM, value_dim=VDIM, tier="mmap"))
    out = {}
    for name, seed in (("flat", 1), ("hnsw", 2), ("mapped", 3)):
        a = mem.add(name, *data(30, seed))
        b = mem.add(name, *data(5, seed + 10))
        out[name] = np.concatenate([a, b])
    mem.remove("flat", out["flat"][:3])
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, ttl_idle_s=3600))
    s_ids = mem.append(sid.session_id, *data(6, 4), scores=np.arange(6, dtype=np.float32))
    record(**out, sid=sid.session_id, session_ids=s_ids)
    if args["how"] == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(faults.CRASH_EXIT)
print("the step finished without crashing", flush=True)
sys.exit(3)
'''


def run_child(tmp_path: Path, scenario: str, crash_at: str | None, **extra) -> tuple[Path, dict, int]:
    data_dir, log = tmp_path / "data", tmp_path / "child.json"
    env = daemon_env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    if crash_at:
        env["MEMORYD_CRASH_AT"] = crash_at
    args = json.dumps({"dir": str(data_dir), "log": str(log), "scenario": scenario, **extra})
    proc = subprocess.run([sys.executable, "-c", CHILD, args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert log.exists(), f"child died before populating (rc {proc.returncode}):\n{proc.stderr}"
    return data_dir, json.loads(log.read_text()), proc.returncode


def data(n, seed):
    return gaussian(n, DIM, seed), gaussian(n, VDIM, seed + 1000)


def rows(mem, bank):
    """(ids, keys, values) in id order."""
    chunks = list(mem.export(bank))
    ids = np.concatenate([c.ids for c in chunks])
    keys = np.concatenate([c.keys for c in chunks])
    vals = np.concatenate([c.values for c in chunks])
    o = np.argsort(ids)
    return ids[o], keys[o], vals[o]


def assert_catalog_true(mem):
    """Every bank's catalog bytes/count are what it holds; tenants sum them."""
    for info in mem.list_banks():
        bank = mem.engine.bank(info.name)
        assert (info.used_bytes, info.count) == (bank.nbytes(), bank.count), info.name
    for t in mem.list_tenants():
        assert t.used_bytes == sum(b.used_bytes for b in mem.list_banks(t.name)), t.name


def sort_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_multi_shard_add_killed_between_shards_is_all_or_nothing(tmp_path):
    """The add was logged (one record for all 4 shards) and died while being
    applied: recovery replays the record whole, on every shard."""
    data_dir, log, rc = run_child(tmp_path, "multi_shard_add", "bank.add:between-shards")
    assert rc == faults.CRASH_EXIT
    with LocalMemory(data_dir, reap_interval=None) as mem:
        ids, keys, vals = rows(mem, "multi")
        old_ids = np.array(log["multi_ids"])
        torn_k, torn_v = data(40, 4)
        want_ids = np.concatenate([old_ids, np.arange(60, 100)])
        want_k = np.concatenate([data(20, s)[0] for s in (1, 2, 3)] + [torn_k])
        want_v = np.concatenate([data(20, s)[1] for s in (1, 2, 3)] + [torn_v])
        o = np.argsort(want_ids)
        np.testing.assert_array_equal(ids, want_ids[o])
        np.testing.assert_array_equal(keys, want_k[o])
        np.testing.assert_array_equal(vals, want_v[o])
        assert mem.bank_info("multi").count == 100
        r = mem.search("multi", torn_k, 1, values=False)       # the index has them too
        np.testing.assert_array_equal(r.ids[:, 0], np.arange(60, 100))
        np.testing.assert_array_equal(rows(mem, "single")[0], np.sort(log["single_ids"]))
        assert_catalog_true(mem)
        # the same rows in a fresh bank cost the same bytes
        mem.create_bank(BankSpec("twin", dim=DIM, value_dim=VDIM, shards=4))
        mem.add("twin", want_k, want_v, ids=want_ids)
        assert mem.bank_info("twin").used_bytes == mem.bank_info("multi").used_bytes
        # and the bank takes writes again, with new ids
        new = mem.add("multi", *data(10, 5))
        assert mem.get("multi", new).found.all() and mem.bank_info("multi").count == 110
        assert new.min() == 100
        assert_catalog_true(mem)
    with LocalMemory(data_dir, reap_interval=None) as mem:
        assert mem.bank_info("multi").count == 110
        assert_catalog_true(mem)


def test_promote_killed_after_selecting_leaves_target_unchanged(tmp_path):
    data_dir, log, rc = run_child(tmp_path, "promote", "promote:selected")
    assert rc == faults.CRASH_EXIT
    with LocalMemory(data_dir, reap_interval=None) as mem:
        t_ids, t_keys, _ = rows(mem, "target")
        np.testing.assert_array_equal(t_ids, np.sort(log["target_ids"]))
        np.testing.assert_array_equal(t_keys, data(10, 1)[0][np.argsort(log["target_ids"])])
        sid = log["sid"]
        s_ids, s_keys, _ = rows(mem, sid)
        np.testing.assert_array_equal(s_ids, np.sort(log["session_ids"]))
        np.testing.assert_array_equal(s_keys, data(12, 2)[0])
        assert_catalog_true(mem)
        # the promotion can simply be run again
        res = mem.promote_session(sid, "target", min_score=6, move=True)
        assert res.promoted == 6 and mem.bank_info("target").count == 16
        assert mem.session_info(sid).bank.count == 6


def test_promote_killed_after_adding_finishes_the_move(tmp_path):
    """Killed after the target's record (naming the rows that leave the
    session) and before the session's remove: recovery finishes the move."""
    data_dir, log, rc = run_child(tmp_path, "promote", "promote:added")
    assert rc == faults.CRASH_EXIT
    with LocalMemory(data_dir, reap_interval=None) as mem:
        keys, vals = data(12, 2)
        chosen = np.arange(12) >= 6                           # scores 0..11, min_score 6
        t_ids, t_keys, t_vals = rows(mem, "target")
        assert len(t_ids) == 10 + chosen.sum()
        new = ~np.isin(t_ids, log["target_ids"])
        np.testing.assert_array_equal(sort_rows(t_keys[new]), sort_rows(keys[chosen]))
        np.testing.assert_array_equal(sort_rows(t_vals[new]), sort_rows(vals[chosen]))
        s_ids, s_keys, _ = rows(mem, log["sid"])              # moved: gone from the session
        np.testing.assert_array_equal(s_ids, np.array(log["session_ids"])[~chosen])
        np.testing.assert_array_equal(s_keys, keys[~chosen])
        assert_catalog_true(mem)
    with LocalMemory(data_dir, reap_interval=None) as mem:    # and it stays finished
        assert mem.session_info(log["sid"]).bank.count == 6
        assert mem.bank_info("target").count == 16
        assert_catalog_true(mem)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_acknowledged_writes_survive_a_kill(tmp_path, how):
    data_dir, log, rc = run_child(tmp_path, "acknowledged", None, how=how)
    assert rc == (faults.CRASH_EXIT if how == "exit" else -signal.SIGKILL)
    with LocalMemory(data_dir, reap_interval=None) as mem:
        for name, seed in (("flat", 1), ("hnsw", 2), ("mapped", 3)):
            want_ids = np.array(log[name])
            k = np.concatenate([data(30, seed)[0], data(5, seed + 10)[0]])
            v = np.concatenate([data(30, seed)[1], data(5, seed + 10)[1]])
            if name == "flat":                               # its first 3 rows were removed
                want_ids, k, v = want_ids[3:], k[3:], v[3:]
            ids, keys, vals = rows(mem, name)
            o = np.argsort(want_ids)
            np.testing.assert_array_equal(ids, want_ids[o], err_msg=name)
            np.testing.assert_array_equal(keys, k[o], err_msg=name)
            np.testing.assert_array_equal(vals, v[o], err_msg=name)
            r = mem.search(name, k, 1, values=False)          # the index has them all
            np.testing.assert_array_equal(r.ids[:, 0], want_ids, err_msg=name)
        assert not mem.get("flat", log["flat"][:3]).found.any()
        sid = log["sid"]
        s_ids, s_keys, _ = rows(mem, sid)
        np.testing.assert_array_equal(s_ids, log["session_ids"])
        np.testing.assert_array_equal(s_keys, data(6, 4)[0])
        mem.create_bank(BankSpec("dest", dim=DIM, value_dim=VDIM))
        res = mem.promote_session(sid, "dest", min_score=4)    # the scores survived too
        np.testing.assert_array_equal(np.sort(res.source_ids), np.array(log["session_ids"])[4:])
        assert_catalog_true(mem)


MOVE_CHILD = r'''
import sys, json, numpy as np
from memoryd import faults
import memoryd.storage.wal as wal_mod
from memoryd.api import BankSpec, SessionSpec
from memoryd.engine import LocalMemory
d, how = sys.argv[1], sys.argv[2]
armed, faults._CRASH_AT = faults._CRASH_AT, None
mem = LocalMemory(d, reap_interval=None)
rng = np.random.default_rng(0)
row = 8 + 4 * 8 + 4 * 4
if how == "fifo-mmap":   # full: the add's record carries evictions, which re-lay an mmap bank
    spec = BankSpec("target", dim=8, value_dim=4, eviction="fifo", quota_bytes=20 * row, tier="mmap")
else:
    spec = BankSpec("target", dim=8, value_dim=4)
mem.create_bank(spec)
mem.add("target", rng.standard_normal((20, 8)).astype(np.float32),
        rng.standard_normal((20, 4)).astype(np.float32))
sid = mem.open_session(SessionSpec(dim=8, value_dim=4, ttl_idle_s=3600)).session_id
mem.append(sid, rng.standard_normal((5, 8)).astype(np.float32),
           rng.standard_normal((5, 4)).astype(np.float32), scores=np.ones(5, np.float32))
print(json.dumps({"sid": sid}), flush=True)
if how == "log-size":
    wal_mod.CHECKPOINT_LOG_BYTES = 0       # as if the target's log had passed 64 MiB
faults._CRASH_AT = armed
mem.promote_session(sid, "target", min_score=0, move=True)
'''


@pytest.mark.parametrize("how", ["plain", "fifo-mmap", "log-size"])
def test_a_move_stays_whole_when_the_target_would_checkpoint_inside_its_add(tmp_path, how):
    """Found by tests/crash_loop.py: a target that checkpointed inside the
    promote's add emptied its log, and with it the record recovery needs to
    finish the move, so a kill at promote:added left the rows in both banks."""
    data_dir = tmp_path / "data"
    env = daemon_env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    env["MEMORYD_CRASH_AT"] = "promote:added"
    p = subprocess.run([sys.executable, "-c", MOVE_CHILD, str(data_dir), how], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == faults.CRASH_EXIT, p.stderr
    sid = json.loads(p.stdout.splitlines()[0])["sid"]
    with LocalMemory(data_dir, reap_interval=None) as mem:
        assert mem.session_info(sid).bank.count == 0            # all five moved ...
        keys = np.concatenate([c.keys for c in mem.export("target")])
        assert len(keys) == (20 if how == "fifo-mmap" else 25)  # ... and in the target once
        assert len(np.unique(keys, axis=0)) == len(keys)
        assert_catalog_true(mem)
