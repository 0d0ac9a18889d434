"""The write-ahead log (memoryd.storage.wal) and what the banks build on it:
records round-trip, a torn or corrupt tail is dropped (never replayed), LSNs
go on across checkpoints, durable acks share their fsyncs (group commit),
and a full disk refuses a write without damaging anything stored."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from memoryd.api import BankSpec, SessionSpec
from memoryd.engine import LocalMemory
from memoryd.errors import InvalidArgument, StorageFull
from memoryd.storage import wal as wal_mod
from memoryd.storage.wal import ADD, REMOVE, UPDATE, Op, WriteAheadLog, check_ack
from daemon_util import daemon_env
from reference import gaussian


def _records(n: int) -> list[list[Op]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ids = np.arange(i * 10, i * 10 + 10, dtype=np.int64)
        out.append([Op(REMOVE, (ids[:2],)),
                    Op(ADD, (ids, rng.standard_normal((10, 4)).astype(np.float32),
                             rng.standard_normal((10, 3)).astype(np.float16), None)),
                    Op(UPDATE, (ids[:1], np.ones((1, 3), np.float16)))])
    return out


def _same(a: list[Op], b: list[Op]) -> None:
    assert [op.code for op in a] == [op.code for op in b]
    for x, y in zip(a, b):
        assert len(x.arrays) == len(y.arrays)
        for u, v in zip(x.arrays, y.arrays):
            if u is None:
                assert v is None
            else:
                assert u.dtype == v.dtype and u.shape == v.shape
                np.testing.assert_array_equal(u, v)


def _write(path, records) -> list[int]:
    log = WriteAheadLog(path)
    log.create()
    ends = [log.append(r) and log.size for r in records]
    log.close()
    return ends


def test_records_round_trip_with_their_lsns(tmp_path):
    recs = _records(5)
    _write(tmp_path / "wal.log", recs)
    log = WriteAheadLog(tmp_path / "wal.log")
    got = list(log.open(after_lsn=0))
    assert [lsn for lsn, _ in got] == [1, 2, 3, 4, 5]
    for (_, ops), want in zip(got, recs):
        _same(ops, want)
    assert log.next_lsn == 6
    # records the checkpoint covers are read past, not replayed
    log.close()
    log = WriteAheadLog(tmp_path / "wal.log")
    assert [lsn for lsn, _ in log.open(after_lsn=3)] == [4, 5]
    log.close()


def test_every_torn_tail_is_dropped_and_the_log_goes_on(tmp_path):
    """Cut the file at every byte of its last record: the first four records
    come back, the fifth never (not even in part), and an append after the
    cut is read back in sequence."""
    recs = _records(5)
    path = tmp_path / "wal.log"
    ends = _write(path, recs)
    whole = path.read_bytes()
    for cut in range(ends[3], ends[4]):
        path.write_bytes(whole[:cut])
        log = WriteAheadLog(path)
        got = list(log.open(after_lsn=0))
        assert [lsn for lsn, _ in got] == [1, 2, 3, 4], cut
        assert path.stat().st_size == ends[3]           # the torn bytes are gone
        assert log.append(recs[0]) == 5
        log.close()
        log = WriteAheadLog(path)
        again = list(log.open(after_lsn=0))
        assert [lsn for lsn, _ in again] == [1, 2, 3, 4, 5]
        _same(again[-1][1], recs[0])
        log.close()


@pytest.mark.parametrize("where", ["payload", "crc", "lsn"])
def test_a_corrupt_record_ends_the_log_there(tmp_path, where):
    recs = _records(4)
    path = tmp_path / "wal.log"
    ends = _write(path, recs)
    data = bytearray(path.read_bytes())
    head = ends[1]                                 # the third record starts here
    offset = {"payload": head + wal_mod._HEAD.size + 5, "crc": head + 8, "lsn": head + 12}[where]
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    log = WriteAheadLog(path)
    assert [lsn for lsn, _ in log.open(after_lsn=0)] == [1, 2]
    assert path.stat().st_size == ends[1]
    log.close()


def test_reset_empties_the_log_and_lsns_go_on(tmp_path):
    log = WriteAheadLog(tmp_path / "wal.log")
    log.create()
    for r in _records(3):
        log.append(r)
    log.reset(3)
    assert log.size == 0 and (tmp_path / "wal.log").stat().st_size == 0
    assert log.append(_records(1)[0]) == 4
    log.close()
    log = WriteAheadLog(tmp_path / "wal.log")
    assert [lsn for lsn, _ in log.open(after_lsn=3)] == [4]
    log.close()


def test_durable_waits_share_their_fsyncs(tmp_path, monkeypatch):
    """8 writers each append and wait for durability while an fsync takes 50 ms:
    group commit covers them with far fewer fsyncs than writers, and each
    sync returns only after an fsync that started after its append."""
    log = WriteAheadLog(tmp_path / "wal.log")
    log.create()
    calls = []
    real = os.fdatasync

    def slow(fd):
        calls.append(time.monotonic())
        time.sleep(0.05)
        real(fd)

    monkeypatch.setattr(wal_mod.os, "fdatasync", slow)
    appended, synced = {}, {}
    lock = threading.Lock()

    def writer(i):
        with lock:                                  # the bank's write lock
            lsn = log.append(_records(1)[0])
            appended[lsn] = time.monotonic()
        log.sync(lsn)
        synced[lsn] = time.monotonic()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(synced) == list(range(1, 9))
    assert 1 <= len(calls) <= 3, calls
    for lsn, at in appended.items():              # some fsync began after the append
        assert any(c >= at for c in calls) and synced[lsn] >= at
    log.sync(8)                                     # already durable: no new fsync
    assert len(calls) <= 3
    log.close()


def test_a_refused_write_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    log = WriteAheadLog(tmp_path / "wal.log")
    log.create()
    log.append(_records(1)[0])
    size = log.size

    def full(fd, parts, offset):
        os.pwrite(fd, parts[0] + parts[1][:10], offset)   # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_mod.os, "pwritev", full)
    with pytest.raises(StorageFull, match="full"):
        log.append(_records(1)[0])
    monkeypatch.undo()
    assert log.size == size and (tmp_path / "wal.log").stat().st_size == size
    assert log.append(_records(1)[0]) == 2
    log.close()


def test_ack_levels():
    assert check_ack(None) == "applied" and check_ack("durable") == "durable"
    with pytest.raises(InvalidArgument, match="applied, durable"):
        check_ack("sometimes")


def test_durable_ack_fsyncs_and_applied_does_not(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(wal_mod.os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(BankSpec("b", dim=8, value_dim=4, shards=3))
        sid = mem.open_session(SessionSpec(dim=8, value_dim=4)).session_id
        k, v = gaussian(30, 8, 1), gaussian(30, 4, 2)
        ids = mem.add("b", k, v)
        mem.update_values("b", ids[:3], v[:3])
        mem.append(sid, k, v)
        assert calls == []
        mem.add("b", k, v, ack="durable")
        mem.update_values("b", ids[:3], v[:3], ack="durable")
        mem.remove("b", ids[:2], ack="durable")
        mem.append(sid, k, v, ack="durable")
        assert len(calls) == 4                       # one per durable write, 3 shards or not
        with pytest.raises(InvalidArgument, match="ack must be one of"):
            mem.add("b", k, v, ack="soon")


def test_a_full_log_refuses_the_add_and_nothing_changes(tmp_path, monkeypatch):
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(BankSpec("b", dim=8, value_dim=4, shards=2, quota_bytes=10**6))
        ids = mem.add("b", gaussian(20, 8, 1), gaussian(20, 4, 2))
        before = (mem.bank_info("b"), mem.engine.bank("b").checksum())

        def full(fd, parts, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(wal_mod.os, "pwritev", full)
        with pytest.raises(StorageFull):
            mem.add("b", gaussian(5, 8, 3), gaussian(5, 4, 4))
        with pytest.raises(StorageFull):
            mem.remove("b", ids[:3])
        monkeypatch.undo()
        info = mem.bank_info("b")
        assert (info.count, info.used_bytes) == (before[0].count, before[0].used_bytes)
        assert mem.engine.bank("b").checksum() == before[1]
        assert mem.get("b", ids).found.all()           # reads go on
        assert mem.add("b", gaussian(5, 8, 3), gaussian(5, 4, 4)).tolist() == list(range(20, 25))


FSIZE_CHILD = r'''
import resource, signal, sys
import numpy as np
from memoryd.api import BankSpec
from memoryd.engine import LocalMemory
from memoryd.errors import StorageFull, StorageUnwritable
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # EFBIG instead of a kill
mem = LocalMemory(sys.argv[1], reap_interval=None)
mem.create_bank(BankSpec("b", dim=64, value_dim=16))
rng = np.random.default_rng(0)
small = rng.standard_normal((100, 64)).astype(np.float32)
ids = mem.add("b", small, small[:, :16])
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
big = rng.standard_normal((8000, 64)).astype(np.float32)   # a 2.5 MB record
try:
    mem.add("b", big, big[:, :16])
    print("accepted")
except StorageFull as e:
    print("refused:", e)
assert mem.get("b", ids).found.all() and mem.bank_info("b").count == 100
print("after", mem.add("b", small, small[:, :16])[:1].tolist(), mem.bank_info("b").count)
from memoryd.api import SessionSpec
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))   # no file may grow
for what, call in (("session", lambda: mem.open_session(SessionSpec(dim=64, value_dim=16))),
                   ("bank", lambda: mem.create_bank(BankSpec("c", dim=64))),
                   ("add", lambda: mem.add("b", small, small[:, :16]))):
    try:
        call()
        print(what, "accepted")
    except (StorageFull, StorageUnwritable) as e:
        print(what, "refused", type(e).__name__)
print("reads", mem.search("b", small[:3], 1).ids[:, 0].tolist(), mem.bank_info("b").count)
'''


def test_a_file_size_limit_is_a_clear_refusal(tmp_path):
    """A real refusal from the kernel (RLIMIT_FSIZE: EFBIG), not a mock."""
    out = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "d")],
                         capture_output=True, text=True, env=daemon_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: the data dir is full" in out.stdout, out.stdout
    assert "after [100] 200" in out.stdout
    for what in ("session", "bank", "add"):        # nothing may grow: each refused, clearly
        assert f"{what} refused" in out.stdout, out.stdout + out.stderr
    assert "reads [0, 1, 2] 200" in out.stdout


def test_every_write_takes_an_ack_on_every_backend(rig, make_bank):
    """ack= crosses the wire on each write RPC (for a stream, in its first
    message) with the same answers as in-process."""
    mem = rig.mem
    spec = make_bank(mem, dim=8, value_dim=4, shards=2)
    target = make_bank(mem, dim=8, value_dim=4)
    k, v = gaussian(40, 8, 1), gaussian(40, 4, 2)
    ids = mem.add(spec.name, k, v, ack="durable")
    assert mem.update_values(spec.name, ids[:5], v[:5] * 2, ack="durable") == 5
    assert mem.remove(spec.name, ids[:3], ack="applied") == 3
    sid = mem.open_session(SessionSpec(dim=8, value_dim=4)).session_id
    s_ids = mem.append(sid, k[:6], v[:6], scores=np.arange(6, dtype=np.float32), ack="durable")
    res = mem.promote_session(sid, target.name, min_score=3, move=True, ack="durable")
    assert res.promoted == 3 and mem.session_info(sid).bank.count == 3
    np.testing.assert_array_equal(np.sort(res.source_ids), s_ids[3:])
    got = mem.get(spec.name, ids[3:5])
    np.testing.assert_array_equal(got.values, v[3:5] * 2)
    for call in (lambda: mem.add(spec.name, k, v, ack="eventually"),
                 lambda: mem.remove(spec.name, ids, ack="fast")):
        with pytest.raises(InvalidArgument, match="ack"):
            call()
    assert mem.bank_info(spec.name).count == 37


def test_an_unknown_ack_on_the_wire_is_invalid_argument(tmp_path):
    """A raw Ack value no client would send (proto3 keeps unknown enum numbers)."""
    import grpc
    from memoryd.daemon.server import create_server
    from memoryd.v1 import memory_pb2 as pb, memory_pb2_grpc
    from memoryd.wire.tensors import encode
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(BankSpec("b", dim=4, value_dim=0))
        server, address = create_server(mem, "127.0.0.1:0")
        try:
            with grpc.insecure_channel(address) as ch:
                stub = memory_pb2_grpc.MemoryStub(ch)
                keys = encode(np.zeros((2, 4), np.float32), "keys")
                with pytest.raises(grpc.RpcError) as e:
                    stub.Add(iter([pb.AddRequest(bank="b", keys=keys, ack=9)]))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "unknown ack 9" in e.value.details()
                with pytest.raises(grpc.RpcError) as e:
                    stub.Remove(pb.RemoveRequest(bank="b", ids=encode(np.zeros(1, np.int64), "ids"),
                                                 ack=-1))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert mem.bank_info("b").count == 0
        finally:
            server.stop(None)


def test_an_apply_that_fails_half_way_is_taken_back(tmp_path, monkeypatch):
    """The record is logged, then the second of three shards fails to take its
    rows: the record is taken back and the bank reloaded, so neither the live
    bank nor a restart shows any of it."""
    from memoryd.storage import shard as shard_mod
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        mem.create_bank(BankSpec("b", dim=8, value_dim=4, shards=3))
        ids = mem.add("b", gaussian(30, 8, 1), gaussian(30, 4, 2))
        checksum = mem.engine.bank("b").checksum()
        real, calls = shard_mod.Shard.add, [0]

        def flaky(self, *a):
            calls[0] += 1
            if calls[0] == 2:
                raise MemoryError("no room for the rows")
            return real(self, *a)

        monkeypatch.setattr(shard_mod.Shard, "add", flaky)
        with pytest.raises(MemoryError):
            mem.add("b", gaussian(30, 8, 3), gaussian(30, 4, 4))
        monkeypatch.undo()
        assert mem.engine.bank("b").checksum() == checksum and mem.bank_info("b").count == 30
        assert not mem.get("b", np.arange(30, 60)).found.any()
        assert mem.add("b", gaussian(3, 8, 5), gaussian(3, 4, 6)).tolist() == [30, 31, 32]
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        assert mem.bank_info("b").count == 33
        assert mem.get("b", ids).found.all()
