"""Reply buffers: search results through shared memory (memoryd/wire/shm.py, memoryd/wire/reply_pool.py).

The daemon side is tested on its own (files, limits, expiry, stale files);
the client against a real server with buffers in a temp dir, comparing every
reply with LocalMemory's and checking which way it travelled.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from memoryd.wire import reply_pool
from knnlayer.client import MemoryClient
from memoryd.wire import shm
from memoryd.wire.search import FIELDS
from reference import assert_same_result as assert_same
from memoryd.api import BankSpec
from memoryd.errors import FailedPrecondition, InvalidArgument, QuotaExceeded, UnknownReplyBuffer
from memoryd.engine import LocalMemory
from memoryd.daemon.server import create_server



class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# ---- the daemon's side ----------------------------------------------------------------

def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_a_buffer_is_a_file_in_the_daemons_folder_unlinked_at_first_use(tmp_path):
    bufs = shm.ReplyBuffers(tmp_path)
    folder = tmp_path / f"memoryd-{os.getuid()}"
    assert bufs.directory == folder and stat.S_IMODE(folder.stat().st_mode) == 0o710
    b = bufs.open(10_000)
    assert b.size == 12_288                                 # whole pages
    assert b.path.parent == folder
    assert stat.S_IMODE(b.path.stat().st_mode) == 0o600 & ~umask()   # the daemon's user only
    (tmp_path / "g").mkdir()
    grouped = shm.ReplyBuffers(tmp_path / "g", file_mode=0o640).open(4096)   # socket-group daemon
    assert stat.S_IMODE(grouped.path.stat().st_mode) == 0o640 & ~umask()     # group: read only
    client = shm.MappedReplyBuffer(b.handle, str(b.path), b.size, shm.HEADER)
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    vals = np.linspace(0, 1, 30, dtype=np.float16).reshape(3, 10)
    placed = b.place({"ids": ids, "scores": None, "values": vals})
    assert not b.path.exists()                               # mapped on both sides: no name needed
    assert set(placed) == {"ids", "values"} and placed["values"].offset % shm.ALIGN == 0
    got = client.read(placed["values"])
    assert got.flags.writeable and np.array_equal(got, vals) and got.dtype == np.float16
    assert np.array_equal(client.read(placed["ids"]), ids)
    bufs.close(b.handle)
    assert np.array_equal(client.read(placed["ids"]), ids)   # the client's mapping outlives it
    client.close()


def test_a_reply_that_does_not_fit_is_left_to_the_socket(tmp_path):
    b = shm.ReplyBuffers(tmp_path).open(4096)
    assert b.place({"values": np.zeros(4097, np.uint8)}) is None
    assert b.path.exists()                                   # not used, so not unlinked


def test_a_client_checks_the_handle_in_the_header(tmp_path):
    b = shm.ReplyBuffers(tmp_path).open(4096)
    with pytest.raises(ValueError, match="is not reply buffer"):
        shm.MappedReplyBuffer("0" * 32, str(b.path), b.size, shm.HEADER)
    with pytest.raises(OSError):
        shm.MappedReplyBuffer(b.handle, str(tmp_path / "elsewhere"), b.size, shm.HEADER)


def test_a_placed_array_outside_the_buffer_is_refused(tmp_path):
    b = shm.ReplyBuffers(tmp_path).open(4096)
    client = shm.MappedReplyBuffer(b.handle, str(b.path), b.size, shm.HEADER)
    with pytest.raises(InvalidArgument, match="outside"):
        client.read(shm.Placed(np.dtype(np.float32), (1025,), 0))
    client.close()


def test_sizes_and_the_total_are_limited(tmp_path):
    bufs = shm.ReplyBuffers(tmp_path, total_bytes=3 * 4096)
    for bad in (0, 3 * 4096 + 1):
        with pytest.raises(InvalidArgument, match="reply buffer size"):
            bufs.open(bad)
    a = bufs.open(2 * 4096)
    with pytest.raises(QuotaExceeded) as e:
        bufs.open(2 * 4096)
    assert e.value.scope == "daemon" and e.value.used == 2 * 4096
    bufs.close(a.handle)
    bufs.open(3 * 4096)                                      # room again
    assert bufs.used_bytes() == 3 * 4096


def test_unknown_closed_and_idle_buffers(tmp_path):
    clock = Clock()
    bufs = shm.ReplyBuffers(tmp_path, idle_s=10, clock=clock)
    with pytest.raises(UnknownReplyBuffer):
        bufs.get("f" * 32)
    a, b = bufs.open(4096), bufs.open(4096)
    clock.now = 8
    bufs.get(b.handle)                                       # used: its idle time restarts
    clock.now = 12
    assert bufs.expire() == 1
    with pytest.raises(UnknownReplyBuffer):
        bufs.get(a.handle)
    assert not a.path.exists()                               # never used: unlinked on close
    with pytest.raises(UnknownReplyBuffer):
        bufs.close(a.handle)
    with pytest.raises(UnknownReplyBuffer, match="was closed"):
        a.place({"ids": np.zeros(1, np.int64)})              # a search that outlived the close
    assert bufs.get(b.handle) is b
    c = bufs.open(4096)
    clock.now = 21
    bufs.get(c.handle)
    clock.now = 24                                           # nobody opens: a lookup expires b
    bufs.get(c.handle)
    with pytest.raises(UnknownReplyBuffer):
        bufs.get(b.handle)
    bufs.close_all()
    assert bufs.used_bytes() == 0 and not list(bufs.directory.iterdir())


def test_buffers_off_without_a_directory():
    bufs = shm.ReplyBuffers(None)
    assert not bufs.enabled
    with pytest.raises(FailedPrecondition, match="off"):
        bufs.open(4096)


def test_files_of_dead_daemons_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    folder = tmp_path / f"memoryd-{os.getuid()}"
    folder.mkdir()
    stale = folder / f"memoryd-{dead}-{'a' * 32}"
    live = folder / f"memoryd-{os.getppid()}-{'b' * 32}"
    mine = folder / f"memoryd-{os.getpid()}-{'c' * 32}"     # a pid 1 daemon restarted
    other = folder / "someone-elses-file"
    for p in (stale, live, mine, other):
        p.write_bytes(b"x")
    shm.ReplyBuffers(tmp_path)
    assert not stale.exists() and not mine.exists() and live.exists() and other.exists()


# ---- through a daemon ----------------------------------------------------------------

@pytest.fixture
def rig(tmp_path):
    """(LocalMemory with bank 'b', start(buffers) -> client); servers stopped at the end."""
    mem = LocalMemory(tmp_path / "data")
    mem.create_bank(BankSpec("b", dim=16, value_dim=32, value_dtype="bfloat16"))
    rng = np.random.default_rng(0)
    mem.add("b", rng.standard_normal((3000, 16)).astype(np.float32),
            rng.standard_normal((3000, 32)).astype(np.float32))
    servers, clients = [], []

    def start(buffers: shm.ReplyBuffers | None, listen: str | None = None, **kw) -> MemoryClient:
        server, address = create_server(mem, listen or f"unix://{tmp_path}/s{len(servers)}.sock",
                                        buffers=buffers or shm.ReplyBuffers(None))
        servers.append(server)
        clients.append(MemoryClient(address, **kw))
        return clients[-1]

    yield mem, start
    for c in clients:
        c.close()
    for s in servers:
        s.stop(0).wait(10)
    mem.close()


def queries(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def test_replies_come_through_shared_memory_from_the_second_search_on(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)
    assert c.reply_buffers == "shared memory"
    q = queries(500)
    ref = mem.search("b", q, 20, values=True, keys=True)
    assert_same(c.search("b", q, 20, values=True, keys=True), ref)   # inline, then a buffer opens
    assert bufs.used_bytes() == reply_pool.buffer_size(
        shm.layout({f: getattr(ref, f) for f in FIELDS})[1])
    (b,) = bufs._open.values()
    assert not b.unlinked
    for _ in range(3):
        assert_same(c.search("b", q, 20, values=True, keys=True), ref)
    assert b.unlinked and len(bufs._open) == 1                       # the same buffer, reused
    small = mem.search("b", q[:2], 3, values=False)
    assert_same(c.search("b", q[:2], 3, values=False), small)         # tiny: inline, buffer kept
    assert list(bufs._open.values()) == [b]


def test_a_bigger_reply_swaps_the_buffer_for_a_bigger_one(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)
    q = queries(800)
    c.search("b", q[:400], 20, values=True)
    first = set(bufs._open)
    big = mem.search("b", q, 40, values=True, keys=True)
    assert_same(c.search("b", q, 40, values=True, keys=True), big)    # inline: did not fit
    assert set(bufs._open).isdisjoint(first) and len(bufs._open) == 1
    assert_same(c.search("b", q, 40, values=True, keys=True), big)    # through the new one
    assert next(iter(bufs._open.values())).unlinked


def test_a_buffer_the_daemon_dropped_is_replaced_without_an_error(rig, tmp_path):
    mem, start = rig
    clock = Clock()
    bufs = shm.ReplyBuffers(tmp_path, idle_s=60, clock=clock)
    c = start(bufs)
    q = queries(600)
    ref = mem.search("b", q, 20, values=True)
    c.search("b", q, 20, values=True)
    clock.now = 61
    assert bufs.expire() == 1
    assert_same(c.search("b", q, 20, values=True), ref)              # retried inline
    assert len(bufs._open) == 1                                      # and a new one opened
    assert_same(c.search("b", q, 20, values=True), ref)
    assert c.reply_buffers == "shared memory"


def test_without_buffers_on_the_daemon_the_client_uses_the_socket(rig):
    mem, start = rig
    c = start(None)
    q = queries(600)
    for _ in range(2):
        assert_same(c.search("b", q, 20, values=True), mem.search("b", q, 20, values=True))
    assert c.reply_buffers.startswith("socket (the daemon offers no reply buffers")


def test_a_client_that_cannot_map_the_file_falls_back_and_closes_it(rig, tmp_path, monkeypatch):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)

    def elsewhere(*args):
        raise FileNotFoundError("no such file on this host")
    monkeypatch.setattr(shm, "MappedReplyBuffer", elsewhere)
    q = queries(600)
    for _ in range(3):
        assert_same(c.search("b", q, 20, values=True), mem.search("b", q, 20, values=True))
    assert c.reply_buffers.startswith("socket (cannot map")
    assert bufs.used_bytes() == 0 and not list(bufs.directory.iterdir())


def test_a_full_daemon_means_inline_replies_not_an_error(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path, total_bytes=1 << 20)
    c = start(bufs)
    asked = []
    real_open = bufs.open
    bufs.open = lambda size, owner=None: asked.append(size) or real_open(size, owner)
    q = queries(3000)
    ref = mem.search("b", q, 20, values=True)                        # ~4.6 MiB: an 8 MiB buffer
    for _ in range(3):
        assert_same(c.search("b", q, 20, values=True), ref)
    assert asked == [8 << 20]                                        # asked once, not every search
    assert bufs.used_bytes() == 0 and c.reply_buffers == "shared memory"   # still willing
    small = queries(300)                                             # a smaller size may still fit
    for _ in range(2):
        assert_same(c.search("b", small, 20, values=True), mem.search("b", small, 20, values=True))
    assert asked == [8 << 20, 1 << 20] and bufs.used_bytes() == 1 << 20


def test_concurrent_searches_each_get_their_own_buffer(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)
    qs = [queries(300 + 50 * i, seed=i) for i in range(6)]
    refs = [mem.search("b", q, 16, values=True, keys=True) for q in qs]
    errors = []

    def worker(i):
        try:
            for _ in range(8):
                assert_same(c.search("b", qs[i], 16, values=True, keys=True), refs[i])
        except Exception as e:                                       # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert 1 <= len(bufs._open) <= reply_pool.MAX_BUFFERS


def test_tcp_clients_ask_only_when_told(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    default = start(bufs, listen="127.0.0.1:0")
    asked = start(bufs, listen="127.0.0.1:0", reply_buffers=True)
    q = queries(600)
    ref = mem.search("b", q, 20, values=True)
    for c in (default, asked):
        for _ in range(2):
            assert_same(c.search("b", q, 20, values=True), ref)
    assert default.reply_buffers.startswith("socket (reply buffers not asked for")
    assert asked.reply_buffers == "shared memory" and len(bufs._open) == 1


def test_closing_the_client_closes_its_buffers(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)
    c.search("b", queries(600), 20, values=True)
    assert len(bufs._open) == 1
    c.close()
    assert bufs.used_bytes() == 0


def test_serve_config_for_reply_buffers(tmp_path):
    from memoryd.daemon import config as cfg
    c = cfg.load(None, env={}, data_dir=str(tmp_path))
    assert c.shm_dir is None and c.shm_bytes == 1 << 30
    c = cfg.load(None, env={}, data_dir=str(tmp_path), shm_dir=str(tmp_path), shm_bytes="64MiB")
    assert c.shm_dir == Path(tmp_path) and c.shm_bytes == 64 << 20
    assert cfg.load(None, env={}, data_dir=str(tmp_path), shm_dir="off").shm_bytes == 0
    with pytest.raises(cfg.ConfigError, match="shm_bytes"):
        cfg.load(None, env={}, data_dir=str(tmp_path), shm_bytes="lots")


def test_queries_travel_in_the_buffer_too(rig, tmp_path, monkeypatch):
    mem, start = rig
    c = start(shm.ReplyBuffers(tmp_path))
    reads = []
    real_read = shm.ReplyBufferFile.read
    monkeypatch.setattr(shm.ReplyBufferFile, "read", lambda self, p: reads.append(p) or real_read(self, p))
    q = queries(700)
    ref = mem.search("b", q, 20, values=True, keys=True)
    for _ in range(3):
        assert_same(c.search("b", q, 20, values=True, keys=True), ref)
    assert reads == [shm.Placed(np.dtype(np.float32), (700, 16), 0)] * 2   # not the first: no buffer yet


@pytest.mark.parametrize("tensor, message", [
    (dict(dtype=1, shape=[2, 16], buffer_offset=0), "no reply_buffer named"),
    (dict(dtype=1, shape=[2, 16], buffer_offset=1 << 40), "outside"),
    (dict(dtype=1, shape=[1 << 62, 1 << 62], buffer_offset=0), "too large"),
    (dict(dtype=1, shape=[0, 1 << 62], buffer_offset=0), "too large"),       # 0 bytes, still absurd
    (dict(dtype=1, shape=[1 << 20, 16], buffer_offset=0), "outside"),
    (dict(dtype=1, shape=[-2, 16], buffer_offset=0), "negative dimension"),
    (dict(dtype=1, shape=[2, 16], buffer_offset=0, data=b"x" * 128), "no data"),
])
def test_bad_query_offsets_are_invalid_arguments(rig, tmp_path, tensor, message):
    import grpc
    from memoryd.v1 import memory_pb2 as pb
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)
    handle = "" if message == "no reply_buffer named" else bufs.open(4096).handle
    req = pb.SearchRequest(banks=["b"], k=3, queries=pb.Tensor(**tensor), reply_buffer=handle)
    with pytest.raises(grpc.RpcError) as e:
        list(c._stub.Search(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert c.search("b", queries(2), 3).ids.shape == (2, 3)          # the daemon is fine


def test_a_search_that_ends_after_close_drops_its_buffer(rig, tmp_path):
    mem, start = rig
    bufs = shm.ReplyBuffers(tmp_path)
    c = start(bufs)
    q = queries(600)
    c.search("b", q, 20, values=True)                    # a buffer now exists
    buf = c._buffers.take()                              # as a search in flight holds it
    c.close()
    c._buffers.give(buf, 1 << 20)                        # that search ends: dropped, no error
    assert c._buffers._count == 0 and not c._buffers._free


def test_a_folder_of_another_user_or_a_link_turns_buffers_off(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / f"memoryd-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    bufs = shm.ReplyBuffers(tmp_path)
    assert not bufs.enabled
    with pytest.raises(FailedPrecondition):
        bufs.open(4096)


def test_a_read_only_mapping_takes_replies_and_leaves_queries_inline(rig, tmp_path, monkeypatch):
    mem, start = rig
    c = start(shm.ReplyBuffers(tmp_path))
    real_open = os.open

    def group_read_only(path, flags, *args):      # the 0640 file seen from a group member
        if "memoryd-" in str(path) and flags & os.O_RDWR and not flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(shm.os, "open", group_read_only)
    reads = []
    real_read = shm.ReplyBufferFile.read
    monkeypatch.setattr(shm.ReplyBufferFile, "read", lambda self, p: reads.append(p) or real_read(self, p))
    q = queries(600)
    ref = mem.search("b", q, 20, values=True)
    for _ in range(3):
        assert_same(c.search("b", q, 20, values=True), ref)
    assert c.reply_buffers == "shared memory" and not c._buffers._free[0].writable
    assert reads == []                                               # queries came inline


@pytest.mark.parametrize("shape", [[0, 1 << 62], [1 << 62, 0], [2**63 - 1, 2**63 - 1, 0], [1] * 17])
def test_absurd_inline_shapes_are_invalid_arguments_too(rig, shape):
    import grpc
    from memoryd.v1 import memory_pb2 as pb
    mem, start = rig
    c = start(None)
    req = pb.SearchRequest(banks=["b"], k=3, queries=pb.Tensor(dtype=1, shape=shape))
    with pytest.raises(grpc.RpcError) as e:
        list(c._stub.Search(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too large" in e.value.details()


def test_only_float32_queries_go_through_the_buffer(rig, tmp_path):
    mem, start = rig
    c = start(shm.ReplyBuffers(tmp_path))
    q = queries(700)
    c.search("b", q, 20, values=True)                   # a buffer now exists
    for bad in (q > 0, q.astype(np.complex64)):
        with pytest.raises(InvalidArgument):
            c.search("b", bad, 20, values=True)
