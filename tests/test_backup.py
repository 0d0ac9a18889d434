"""Bank snapshots, their restore, and daemon backups (memoryd.engine.backup),
on both backends: consistent while writes go on, byte-identical when
restored, charged to quotas, and refused precisely when they cannot be."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from click.testing import CliRunner

from memoryd import errors
from memoryd.api import BankSpec, SessionSpec
from memoryd.engine import LocalMemory
from conftest import unique_name
from reference import gaussian

DIM, VDIM = 8, 4


def rows(mem, bank):
    """(ids, keys, values) of a bank, sorted by id."""
    chunks = list(mem.export(bank))
    ids = np.concatenate([c.ids for c in chunks])
    o = np.argsort(ids)
    return (ids[o], np.concatenate([c.keys for c in chunks])[o],
            np.concatenate([c.values for c in chunks])[o])


@pytest.mark.parametrize("index,shards", [("Flat", 2), ("HNSW16", 1), ("IVF4,Flat", 3)])
def test_a_snapshot_restores_byte_identical(rig, make_bank, tmp_path, index, shards):
    mem = rig.mem
    spec = make_bank(mem, dim=DIM, value_dim=VDIM, index=index, shards=shards)
    ids = mem.add(spec.name, gaussian(200, DIM, 1), gaussian(200, VDIM, 2))
    mem.update_values(spec.name, ids[:7], gaussian(7, VDIM, 3))
    mem.remove(spec.name, ids[10:20])
    snap = mem.snapshot_bank(spec.name, str(tmp_path / "snap"))
    assert (snap.bank, snap.count) == (spec.name, 190)
    assert snap.used_bytes == mem.bank_info(spec.name).used_bytes
    mem.add(spec.name, gaussian(5, DIM, 4), gaussian(5, VDIM, 5))   # after: not in it
    copy = unique_name("copy")
    info = mem.restore_bank(str(tmp_path / "snap"), copy)
    assert (info.name, info.count, info.used_bytes) == (copy, 190, snap.used_bytes)
    want = rows(mem, spec.name)
    got = rows(mem, copy)
    keep = ~np.isin(want[0], np.arange(200, 205))              # the 5 added after
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b[keep])
    q = gaussian(9, DIM, 6)
    r_copy = mem.search(copy, q, 5)
    assert set(r_copy.ids.ravel()) <= set(got[0])
    # a snapshot restores twice, and the original bank is untouched
    assert mem.restore_bank(str(tmp_path / "snap"), unique_name("again")).count == 190
    assert mem.bank_info(spec.name).count == 195


def test_a_snapshot_is_one_moment_while_writes_go_on(rig, make_bank, tmp_path):
    """A writer adds batches of 10 while the snapshot is taken: the snapshot
    holds whole batches only, each byte-identical, the first ones in order."""
    mem = rig.mem
    spec = make_bank(mem, dim=DIM, value_dim=VDIM, shards=3)
    acked: list[np.ndarray] = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set() and i < 400:
            acked.append(mem.add(spec.name, gaussian(10, DIM, 100 + i), gaussian(10, VDIM, 900 + i)))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    while len(acked) < 5:
        pass
    mem.snapshot_bank(spec.name, str(tmp_path / "snap"))
    stop.set()
    t.join()
    copy = unique_name("copy")
    mem.restore_bank(str(tmp_path / "snap"), copy)
    ids, keys, vals = rows(mem, copy)
    n = len(ids) // 10
    assert len(ids) == 10 * n and n >= 5                     # whole batches
    np.testing.assert_array_equal(ids, np.concatenate(acked[:n]))   # the first n, no others
    np.testing.assert_array_equal(keys, np.concatenate([gaussian(10, DIM, 100 + i) for i in range(n)]))
    np.testing.assert_array_equal(vals, np.concatenate([gaussian(10, VDIM, 900 + i) for i in range(n)]))


def test_refusals_are_precise_and_change_nothing(rig, make_bank, tmp_path):
    mem = rig.mem
    spec = make_bank(mem, dim=DIM, value_dim=VDIM)
    mem.add(spec.name, gaussian(20, DIM, 1), gaussian(20, VDIM, 2))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(errors.AlreadyExists, match="not an empty folder"):
        mem.snapshot_bank(spec.name, str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "mine"
    with pytest.raises(errors.InvalidArgument, match="absolute"):
        mem.snapshot_bank(spec.name, "relative/dir")
    with pytest.raises(errors.NotFound):
        mem.snapshot_bank("no-such-bank", str(tmp_path / "a"))
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM)).session_id
    with pytest.raises(errors.FailedPrecondition, match="session"):
        mem.snapshot_bank(sid, str(tmp_path / "b"))
    with pytest.raises(errors.NotFound, match="no bank snapshot"):
        mem.restore_bank(str(tmp_path / "full"))
    mem.snapshot_bank(spec.name, str(tmp_path / "snap"))
    with pytest.raises(errors.AlreadyExists):                # its own name is taken
        mem.restore_bank(str(tmp_path / "snap"))
    # a tenant quota below the snapshot's bytes: refused, no bank left behind
    t = unique_name("t")
    mem.set_tenant_quota(t, 100)
    before = {b.name for b in mem.list_banks()}
    snap_t = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=unique_name("t"))
    mem.add(snap_t.name, gaussian(20, DIM, 1), gaussian(20, VDIM, 2))
    mem.snapshot_bank(snap_t.name, str(tmp_path / "snap-t"))
    import json
    manifest = json.loads((tmp_path / "snap-t" / "snapshot.json").read_text())
    manifest["spec"]["tenant"] = t
    (tmp_path / "snap-t" / "snapshot.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.QuotaExceeded):
        mem.restore_bank(str(tmp_path / "snap-t"), unique_name("over"))
    assert {b.name for b in mem.list_banks()} == before | {snap_t.name}
    # a damaged snapshot is refused, nothing is created
    keys = next((tmp_path / "snap" / "bank" / "shard-000").glob("keys.*.bin"))
    data = bytearray(keys.read_bytes())
    data[5] ^= 0xFF
    keys.unlink()                 # a hard link of the bank's own file: replace, do not edit
    keys.write_bytes(bytes(data))
    with pytest.raises(errors.FailedPrecondition, match="damaged"):
        mem.restore_bank(str(tmp_path / "snap"), unique_name("bad"))
    assert {b.name for b in mem.list_banks()} == before | {snap_t.name}
    assert mem.bank_info(spec.name).count == 20               # the bank itself is intact


def test_a_frozen_bank_restores_frozen(rig, make_bank, tmp_path):
    mem = rig.mem
    spec = make_bank(mem, dim=DIM, value_dim=VDIM, kind="base")
    mem.add(spec.name, gaussian(30, DIM, 1), gaussian(30, VDIM, 2))
    frozen = mem.freeze_bank(spec.name)
    mem.snapshot_bank(spec.name, str(tmp_path / "snap"))
    info = mem.restore_bank(str(tmp_path / "snap"), unique_name("copy"))
    assert info.frozen and info.checksum == frozen.checksum
    with pytest.raises(errors.BankFrozen):
        mem.add(info.name, gaussian(1, DIM, 3), gaussian(1, VDIM, 4))


def test_a_backup_is_a_data_dir(rig, make_bank, tmp_path):
    mem = rig.mem
    a = make_bank(mem, dim=DIM, value_dim=VDIM, shards=2, quota_bytes=10**6)
    b = make_bank(mem, dim=DIM, value_dim=VDIM, index="HNSW16", tier="mmap")
    mem.add(a.name, gaussian(50, DIM, 1), gaussian(50, VDIM, 2))
    mem.add(b.name, gaussian(40, DIM, 3), gaussian(40, VDIM, 4))
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, ttl_idle_s=3600)).session_id
    mem.append(sid, gaussian(6, DIM, 5), gaussian(6, VDIM, 6), scores=np.arange(6, dtype=np.float32))
    out = mem.backup(str(tmp_path / "backup"))
    assert {a.name, b.name, sid} <= set(out.banks)
    want = {n: rows(mem, n) for n in (a.name, b.name, sid)}
    with LocalMemory(tmp_path / "backup", reap_interval=None, clock=rig.clock) as restored:
        for name, w in want.items():
            for x, y in zip(rows(restored, name), w):
                np.testing.assert_array_equal(x, y)
        assert restored.bank_info(a.name).spec.quota_bytes == 10**6
        assert restored.bank_info(b.name).spec.tier == "mmap"
        assert restored.bank_info(a.name).used_bytes == mem.bank_info(a.name).used_bytes
        res = restored.promote_session(sid, a.name, min_score=4)   # session and scores came along
        assert res.promoted == 2


def test_memctl_snapshot_restore_and_backup(tmp_path):
    from memctl.cli import main
    data = tmp_path / "data"
    with LocalMemory(data, reap_interval=None) as mem:
        mem.create_bank(BankSpec("wiki", dim=DIM, value_dim=VDIM))
        mem.add("wiki", gaussian(12, DIM, 1), gaussian(12, VDIM, 2))
    run = CliRunner().invoke
    r = run(main, ["--data-dir", str(data), "bank", "snapshot", "wiki", str(tmp_path / "s")])
    assert r.exit_code == 0 and "12 items" in r.output, r.output
    r = run(main, ["--data-dir", str(data), "bank", "restore", str(tmp_path / "s"), "--name", "w2"])
    assert r.exit_code == 0 and "restored bank 'w2'" in r.output, r.output
    r = run(main, ["--data-dir", str(data), "bank", "restore", str(tmp_path / "s")])
    assert r.exit_code != 0 and "already exists" in r.output and "Traceback" not in r.output
    r = run(main, ["--data-dir", str(data), "backup", str(tmp_path / "b")])
    assert r.exit_code == 0 and "2 banks" in r.output, r.output
    with LocalMemory(tmp_path / "b", reap_interval=None) as mem:
        assert {b.name: b.count for b in mem.list_banks()} == {"wiki": 12, "w2": 12}
