"""SearchOne: a search whose reply fits one message is one unary call.

The client picks SearchOne when it can predict that the reply fits (one
stream piece inline, or its reply buffer) and Search otherwise; both must
answer exactly what LocalMemory answers, errors included. A reply that fits
no single message is refused by the daemon (REPLY_TOO_LARGE) and the client
streams instead; a daemon without SearchOne (UNIMPLEMENTED) is asked once.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from knnlayer.client import MemoryClient
from memoryd import errors
from memoryd.api import BankQuery, BankSpec, Caller, RowStacks, SearchResult
from memoryd.daemon import server as daemon_server
from memoryd.engine import LocalMemory
from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc
from memoryd.wire import search as search_wire
from memoryd.wire import reply_pool, shm, streams
from memoryd.wire.tensors import encode
from memoryd.wire.search import FIELDS
from reference import assert_same_result as assert_same

DIM = 16


# ---- a daemon in this process, clients that count which RPC they made ----------------

class Rig:
    """LocalMemory with banks 'a' (fp16 values), 'b' (bf16) and 'keyless', and
    clients to one server over it: start(buffers) -> a counting client."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.local = LocalMemory(tmp_path / "data")
        rng = np.random.default_rng(0)
        for name, dtype, vdim in (("a", "float16", 8), ("b", "bfloat16", 8),
                                  ("keyless", "float32", 0)):
            self.local.create_bank(BankSpec(name, dim=DIM, value_dim=vdim, value_dtype=dtype))
            self.local.add(name, rng.standard_normal((500, DIM)).astype(np.float32),
                           rng.standard_normal((500, vdim)).astype(np.float32) if vdim else None)
        self.servers, self.clients = [], []

    def start(self, buffers: shm.ReplyBuffers | None = None) -> MemoryClient:
        server, address = daemon_server.create_server(
            self.local, f"unix://{self.tmp_path}/s{len(self.servers)}.sock",
            buffers=buffers or shm.ReplyBuffers(None))
        self.servers.append(server)
        return self.connect(address)

    def connect(self, address: str) -> MemoryClient:
        client = MemoryClient(address)
        client.calls = []                        # "one" / "stream", one per RPC made
        one, stream = client._search_unary, client._search_stream
        client._search_unary = lambda r, o: client.calls.append("one") or one(r, o)
        client._search_stream = lambda r, o: client.calls.append("stream") or stream(r, o)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for s in self.servers:
            s.stop(0).wait(10)
        for c in self.clients:
            c.close()
        self.local.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def queries(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def streaming(rig, client: MemoryClient) -> MemoryClient:
    """Another client of the same daemon that never uses SearchOne."""
    other = rig.connect(client.address)
    other._route.unary = False
    return other


STACKS = {
    "plain": ["a"],
    "options": [BankQuery("a", bias=0.1), BankQuery("b", k=3)],
    "row stacks": RowStacks([["a"], ["b", "a"], [BankQuery("keyless", include=False), "b"]],
                            [3, 5, 4]),
}


# ---- the unary path answers what the stream answers ------------------------------------

@pytest.mark.parametrize("buffers", [False, True], ids=["inline", "reply buffer"])
@pytest.mark.parametrize("stack", list(STACKS), ids=list(STACKS))
@pytest.mark.parametrize("values,keys", [(True, False), (True, True), (False, False)])
def test_one_message_equals_the_stream(rig, tmp_path, monkeypatch, buffers, stack, values,
                                      keys):
    placed = []
    if buffers:                              # small replies too: through the buffer
        monkeypatch.setattr(reply_pool, "MIN_REPLY_BYTES", 1)
        read = shm.MappedReplyBuffer.read
        monkeypatch.setattr(shm.MappedReplyBuffer, "read",
                            lambda self, p: placed.append(p) or read(self, p))
    c = rig.start(shm.ReplyBuffers(tmp_path) if buffers else None)
    s = streaming(rig, c)
    stack, q, k = STACKS[stack], queries(12), 7
    ref = rig.local.search(stack, q, k, values=values, keys=keys)
    for _ in range(3):                       # learns the value bytes; then SearchOne
        assert_same(c.search(stack, q, k, values=values, keys=keys), ref)
        assert_same(s.search(stack, q, k, values=values, keys=keys), ref)
    # with values the first search streams (value bytes not known yet), without at once one
    assert c.calls == (["stream", "one", "one"] if values else ["one"] * 3)
    assert s.calls == ["stream"] * 3
    if buffers:                              # from the 2nd search on, both clients
        fields = 3 + values + keys
        assert len(placed) == 2 * 2 * fields and c.reply_buffers == "shared memory"


def test_through_the_reply_buffer(rig, tmp_path, monkeypatch):
    """A reply over one stream piece but within the client's buffer: one message, placed."""
    monkeypatch.setattr(streams, "CHUNK_BYTES", 64 << 10)       # both ends: this process
    bufs = shm.ReplyBuffers(tmp_path)
    c = rig.start(bufs)
    q = queries(300)                                             # 300*32*(16+16+64) = 900 KiB
    ref = rig.local.search(["a"], q, 32, values=True, keys=True)
    placed = []
    read = shm.MappedReplyBuffer.read
    monkeypatch.setattr(shm.MappedReplyBuffer, "read",
                        lambda self, p: placed.append(p) or read(self, p))
    for _ in range(3):
        assert_same(c.search(["a"], q, 32, values=True, keys=True), ref)
    # 1st: streamed inline (no buffer, sizes unknown); 2nd: the buffer opened after
    # the 1st, the size learned: one message in the buffer; 3rd: the same
    assert c.calls == ["stream", "one", "one"]
    assert len(placed) == 2 * 5 and c.reply_buffers == "shared memory"


def test_the_callers_name_travels_with_the_unary_call(rig):
    c = rig.start()
    c.search(["a"], queries(2), 3, values=False, caller=Caller("router-9"))
    c.search(["a"], queries(2), 3, values=False)
    assert c.calls == ["one", "one"]
    clients = {(u.client, u.banks) for u in rig.local.stats().stacks}
    assert {("router-9", ("a",)), (c.client_name, ("a",))} <= clients


# ---- replies too big for one message ---------------------------------------------------

def test_a_predictably_big_reply_streams_at_once(rig, monkeypatch):
    monkeypatch.setattr(streams, "CHUNK_BYTES", 4096)
    c = rig.start()
    q = queries(40)                                    # 40*20*16 = 12.8 KB of ids/scores/bank
    ref = rig.local.search(["a"], q, 20, values=False)
    assert_same(c.search(["a"], q, 20, values=False), ref)
    assert c.calls == ["stream"]
    assert_same(c.search(["a"], q[:2], 20, values=False), rig.local.search(["a"], q[:2], 20,
                                                                           values=False))
    assert c.calls == ["stream", "one"]                # 2*20*16 = 640 bytes: one message


def test_a_reply_wider_than_learned_is_refused_and_streamed(rig, monkeypatch):
    """The client learned 16 value bytes a result; the bank is remade with 256:
    SearchOne refuses (after the search), the stream answers, the size is relearned."""
    monkeypatch.setattr(streams, "CHUNK_BYTES", 16 << 10)
    c = rig.start()
    rig.local.create_bank(BankSpec("w", dim=DIM, value_dim=8, value_dtype="float16"))
    rig.local.add("w", queries(100, 2), queries(100, 3)[:, :8])
    q = queries(20)
    c.search(["w"], q, 10, values=True)
    c.search(["w"], q, 10, values=True)
    assert c.calls == ["stream", "one"]                # 20*10*(16+16) = 6.4 KB
    rig.local.delete_bank("w")
    rig.local.create_bank(BankSpec("w", dim=DIM, value_dim=128, value_dtype="float16"))
    rig.local.add("w", queries(100, 2), np.tile(queries(100, 3), (1, 8)))
    ref = rig.local.search(["w"], q, 10, values=True)   # 20*10*(16+256) = 54 KB
    assert_same(c.search(["w"], q, 10, values=True), ref)
    assert c.calls == ["stream", "one", "one", "stream"]
    assert_same(c.search(["w"], q, 10, values=True), ref)
    assert c.calls[-1] == "stream"                     # learned: no second refusal


def test_the_daemon_refuses_with_reply_too_large(rig, monkeypatch):
    """The wire rule, from the generated stub alone: FAILED_PRECONDITION, ErrorInfo
    REPLY_TOO_LARGE; the same request through Search streams the answer."""
    monkeypatch.setattr(streams, "CHUNK_BYTES", 4096)
    c = rig.start()
    stub = pb_grpc.MemoryStub(c._channel)
    req = pb.SearchRequest(banks=["a"], queries=encode(queries(40)), k=20, values=True)
    with pytest.raises(grpc.RpcError) as e:
        stub.SearchOne(req)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(e.value).details[0].Unpack(info)
    assert (info.domain, info.reason) == ("memoryd", "REPLY_TOO_LARGE")
    assert len(list(stub.Search(req))) > 1
    small = pb.SearchRequest(banks=["a"], queries=encode(queries(2)), k=3, values=True)
    one = stub.SearchOne(small)
    assert one.offset == 0 and tuple(one.ids.shape) == (2, 3)
    assert tuple(one.values.shape) == (2, 3, 8) and not one.values.HasField("buffer_offset")


def test_encode_one_places_or_inlines_or_refuses(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "CHUNK_BYTES", 1000)

    def result(rows: int) -> SearchResult:                      # rows * 5 * (16 + 8) bytes
        return SearchResult(ids=np.zeros((rows, 5), np.int64),
                            scores=np.zeros((rows, 5), np.float32),
                            bank=np.zeros((rows, 5), np.int32),
                            values=np.ones((rows, 5, 4), np.float16))

    inline = pb.SearchResponse.FromString(search_wire.encode_one(result(2), None))
    assert inline.offset == 0 and len(inline.values.data) == 2 * 5 * 8
    with pytest.raises(errors.ReplyTooLarge, match="fit neither one message"):
        search_wire.encode_one(result(10), None)                # 1200 bytes > 1000
    buf = shm.ReplyBuffers(tmp_path).open(4096)
    placed = pb.SearchResponse.FromString(search_wire.encode_one(result(10), buf))
    assert all(getattr(placed, f).HasField("buffer_offset") for f in FIELDS[:4])
    with pytest.raises(errors.ReplyTooLarge, match="fit neither the reply buffer nor"):
        search_wire.encode_one(result(40), buf)                 # 4800 bytes > 4096


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["no such bank", "bad dim", "NaN", "row stacks"])
def test_errors_are_the_same_from_both_rpcs(rig, case):
    c = rig.start()
    s = streaming(rig, c)
    q = queries(4)
    stack = ["a"]
    if case == "no such bank":
        stack = ["a", "nope"]
    elif case == "bad dim":
        q = q[:, :8]
    elif case == "NaN":
        q[1, 2] = np.nan
    elif case == "row stacks":
        stack = RowStacks([["a"], ["b"]], [1, 1])      # rows sum to 2, not 4

    def failure(search):
        with pytest.raises(errors.MemorydError) as e:
            search(stack, q, 3, values=False)
        return type(e.value), str(e.value)

    got = failure(c.search)
    assert got == failure(s.search) == failure(rig.local.search)
    assert got[0] in (errors.NotFound, errors.InvalidArgument)
    assert c.calls == ["one"] and s.calls == ["stream"]


def test_an_expired_buffer_is_dropped_and_the_unary_call_retried(rig, tmp_path):
    clock = {"now": 0.0}
    bufs = shm.ReplyBuffers(tmp_path, idle_s=60, clock=lambda: clock["now"])
    c = rig.start(bufs)
    q = queries(600)                                   # 600*20*32 = 384 KB: a buffer
    ref = rig.local.search(["a"], q, 20, values=True)
    c.search(["a"], q, 20, values=True)
    clock["now"] = 61
    assert bufs.expire() == 1
    assert_same(c.search(["a"], q, 20, values=True), ref)
    assert c.calls == ["stream", "one", "one"]         # UNKNOWN_REPLY_BUFFER, then inline
    assert_same(c.search(["a"], q, 20, values=True), ref)
    assert c.reply_buffers == "shared memory" and len(bufs._open) == 1


# ---- a daemon older than SearchOne -----------------------------------------------------

class _WithoutSearchOne:
    """Stands in for a grpc.Server while add_to_server registers: hides SearchOne,
    as a daemon built before it has none."""

    def __init__(self, server: grpc.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_Hide(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.server.add_registered_method_handlers(
            service, {m: h for m, h in handlers.items() if m != "SearchOne"})


class _Hide(grpc.GenericRpcHandler):
    def __init__(self, inner):
        self.inner = inner

    def service(self, details):
        return None if details.method.endswith("/SearchOne") else self.inner.service(details)


def test_an_older_daemon_answers_unimplemented_once(rig, tmp_path, monkeypatch):
    add = daemon_server.add_to_server
    monkeypatch.setattr(daemon_server, "add_to_server",
                        lambda servicer, server: add(servicer, _WithoutSearchOne(server)))
    c = rig.start(shm.ReplyBuffers(tmp_path))
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.MemoryStub(c._channel).SearchOne(
            pb.SearchRequest(banks=["a"], queries=encode(queries(1)), k=1))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    for stack in (["a"], STACKS["row stacks"]):
        q = queries(12)
        for _ in range(2):
            assert_same(c.search(stack, q, 5, values=False),
                        rig.local.search(stack, q, 5, values=False))
    assert c.calls == ["one", "stream", "stream", "stream", "stream"]
    assert c._route.unary is False
