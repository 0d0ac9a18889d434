"""The wire works from memory.proto alone (issue item 8).

Every client here uses only the generated protobuf stubs (memoryd.v1) on a
DEFAULT grpc channel (no options: gRPC's 4 MiB receive limit applies), and
reads tensors by the rules memory.proto states (little-endian, C order,
BFLOAT16 = the upper 16 bits of a binary32), never through memoryd.wire.
The answers must equal LocalMemory's on the same data, every streamed
message must fit 4 MiB serialized, and errors must be readable from the
google.rpc details the proto documents.

The payload shapes are chosen so that the rows of a message would fill
EXACTLY 4 MiB if the daemon cut streams at 4 MiB of array data (the old
chunk size): the message is then 4 MiB plus its framing, which a default
client refuses ("Received message larger than max (4194351 vs. 4194304)").
"""
from __future__ import annotations

import shutil
import tempfile

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc

LIMIT = 4 * 1024 * 1024            # gRPC's default max receive message length
ARRAY_BYTES = LIMIT - 4096         # memory.proto: array data per streamed message, at most
NP = {pb.FLOAT32: "<f4", pb.FLOAT16: "<f2", pb.INT64: "<i8", pb.INT32: "<i4"}

# Search: 8192 queries, dim 8, k 32, values of value_dim 8 (FLOAT32)
S_DIM, S_VDIM, S_ROWS, NQ, K = 8, 8, 4096, 8192, 32
# Get/Export: dim 15, value_dim 30, BFLOAT16 values. Rows of 64 bytes (Get:
# found 4 + values 60), 124 bytes (Get with keys) and 128 bytes (Export:
# ids 8 + keys 60 + values 60) fill 4 MiB exactly (or to within 4 bytes).
G_DIM, G_VDIM, G_ROWS = 15, 30, 65536


# ---- the proto's tensor rules, by hand -------------------------------------------------

def tensor(a: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """numpy -> Tensor per memory.proto; float32 -> BFLOAT16 by keeping the upper 16 bits."""
    a = np.ascontiguousarray(a)
    if dtype == pb.BFLOAT16:
        bits = (a.astype("<f4").view("<u4") >> 16).astype("<u2")
        return pb.Tensor(dtype=pb.BFLOAT16, shape=a.shape, data=bits.tobytes())
    dtype = dtype or {v: k for k, v in NP.items()}["<" + a.dtype.str[1:]]
    return pb.Tensor(dtype=dtype, shape=a.shape, data=a.astype(NP[dtype]).tobytes())


def array(t: pb.Tensor) -> np.ndarray:
    """Tensor -> numpy per memory.proto (BFLOAT16 widened to float32 exactly)."""
    shape = tuple(t.shape)
    if t.dtype == pb.BFLOAT16:
        bits = np.frombuffer(t.data, "<u2").astype("<u4") << 16
        return bits.view("<f4").reshape(shape)
    return np.frombuffer(t.data, NP[t.dtype]).reshape(shape)


def bf16_exact(a: np.ndarray) -> np.ndarray:
    """float32 values that BFLOAT16 holds exactly (low 16 bits cleared)."""
    return (a.astype("<f4").view("<u4") & np.uint32(0xFFFF0000)).view("<f4")


def recording_stream(channel: grpc.Channel, method: str, request_type, reply_type, sizes: list):
    """A server-streaming call whose deserializer records each message's serialized size."""
    def parse(data: bytes):
        sizes.append(len(data))
        return reply_type.FromString(data)
    return channel.unary_stream(f"/memoryd.v1.Memory/{method}",
                                request_serializer=request_type.SerializeToString,
                                response_deserializer=parse)


def details(e: grpc.RpcError) -> tuple:
    """(google.rpc.Status, [unpacked details]) of a failed call, from its trailer."""
    status = rpc_status.from_call(e)
    assert status is not None, "no grpc-status-details-bin trailer"
    out = []
    for d in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.QuotaFailure):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out.append(msg)
                break
        else:
            out.append(d)
    return status, out


# ---- the daemon and its data -----------------------------------------------------------

@pytest.fixture(scope="module")
def rig():
    """(stub on a default channel, the channel, the daemon's LocalMemory, the data)."""
    from memoryd.daemon.server import create_server
    from memoryd.engine import LocalMemory

    tmp = tempfile.mkdtemp(prefix="md")
    backend = LocalMemory(f"{tmp}/data")
    server, address = create_server(backend, f"unix://{tmp}/md.sock")
    channel = grpc.insecure_channel(address)          # default options: 4 MiB receive limit
    stub = pb_grpc.MemoryStub(channel)
    rng = np.random.default_rng(8)
    data = {
        "s_keys": rng.standard_normal((S_ROWS, S_DIM), np.float32),
        "s_values": rng.standard_normal((S_ROWS, S_VDIM), np.float32),
        "queries": rng.standard_normal((NQ, S_DIM), np.float32),
        "g_keys": rng.standard_normal((G_ROWS, G_DIM), np.float32),
        "g_values": bf16_exact(rng.standard_normal((G_ROWS, G_VDIM), np.float32)),
    }
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(
        name="s", dim=S_DIM, value_dim=S_VDIM, value_dtype=pb.FLOAT32, quota_bytes=-1)))
    half = S_ROWS // 2                                   # the second message leaves the name empty
    reply = stub.Add(iter([
        pb.AddRequest(bank="s", keys=tensor(data["s_keys"][:half]),
                      values=tensor(data["s_values"][:half])),
        pb.AddRequest(keys=tensor(data["s_keys"][half:]), values=tensor(data["s_values"][half:])),
    ]))
    assert array(reply.ids).tolist() == list(range(S_ROWS))
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(
        name="g", dim=G_DIM, value_dim=G_VDIM, value_dtype=pb.BFLOAT16, quota_bytes=-1)))
    step = 30000                                         # ~3.5 MiB per message
    reply = stub.Add(pb.AddRequest(bank="g" if i == 0 else "",
                                   keys=tensor(data["g_keys"][i:i + step]),
                                   values=tensor(data["g_values"][i:i + step], pb.BFLOAT16))
                     for i in range(0, G_ROWS, step))
    assert array(reply.ids).tolist() == list(range(G_ROWS))
    try:
        yield stub, channel, backend, data
    finally:
        channel.close()
        server.stop(0).wait(5)
        backend.close()
        shutil.rmtree(tmp, ignore_errors=True)


def check_sizes(replies, sizes: list[int]) -> None:
    """memory.proto: several messages, each <= 4 MiB serialized and <= 4 MiB - 4096
    of array data."""
    assert len(replies) >= 2 and len(sizes) == len(replies)
    assert max(sizes) <= LIMIT, sizes
    data = [sum(len(t.data) for _, t in r.ListFields() if isinstance(t, pb.Tensor))
            for r in replies]
    assert max(data) <= ARRAY_BYTES, data


def check_offsets(replies, rows_of) -> None:
    """Each message starts where the previous one ended, from 0."""
    offsets = [r.offset for r in replies]
    starts = np.cumsum([0] + [rows_of(r) for r in replies[:-1]]).tolist()
    assert offsets == starts


# ---- streamed replies fit a default channel -------------------------------------------------

@pytest.mark.parametrize("values", [True, False], ids=["values", "no-values"])
def test_search_reply_streams_within_default_limit(rig, values):
    stub, channel, backend, data = rig
    request = pb.SearchRequest(banks=["s"], queries=tensor(data["queries"]), k=K, values=values)
    replies = list(stub.Search(request))                 # the generated stub, default channel
    sizes: list[int] = []
    raw = list(recording_stream(channel, "Search", pb.SearchRequest, pb.SearchResponse,
                                sizes)(request))
    assert raw == replies

    row = K * (8 + 4 + 4 + (4 * S_VDIM if values else 0))
    assert NQ * row > LIMIT - 4096                       # the reply needs more than one message
    check_sizes(replies, sizes)
    check_offsets(replies, lambda r: r.ids.shape[0])
    for r in replies:
        m = r.ids.shape[0]
        assert (r.ids.dtype, r.scores.dtype, r.bank.dtype) == (pb.INT64, pb.FLOAT32, pb.INT32)
        assert list(r.ids.shape) == list(r.scores.shape) == list(r.bank.shape) == [m, K]
        assert r.HasField("values") == values and not r.HasField("keys")
        if values:
            assert r.values.dtype == pb.FLOAT32 and list(r.values.shape) == [m, K, S_VDIM]

    want = backend.search(["s"], data["queries"], K, values=values)
    ids = np.concatenate([array(r.ids) for r in replies])
    assert ids.shape == (NQ, K) and (ids >= 0).all()
    np.testing.assert_array_equal(ids, want.ids)
    np.testing.assert_array_equal(np.concatenate([array(r.scores) for r in replies]), want.scores)
    np.testing.assert_array_equal(np.concatenate([array(r.bank) for r in replies]), want.bank)
    if values:
        got = np.concatenate([array(r.values) for r in replies])
        np.testing.assert_array_equal(got, want.values)
        np.testing.assert_array_equal(got, data["s_values"][ids])   # the rows added


@pytest.mark.parametrize("keys", [False, True], ids=["values", "values+keys"])
def test_get_reply_streams_within_default_limit(rig, keys):
    stub, channel, backend, data = rig
    ids = np.concatenate([np.arange(G_ROWS), np.arange(G_ROWS, G_ROWS + 1000)])   # 1000 unknown
    request = pb.GetRequest(bank="g", ids=tensor(ids.astype(np.int64)), values=True, keys=keys)
    sizes: list[int] = []
    replies = list(recording_stream(channel, "Get", pb.GetRequest, pb.GetResponse, sizes)(request))
    assert list(stub.Get(request)) == replies            # the generated stub reads it too

    check_sizes(replies, sizes)
    check_offsets(replies, lambda r: r.found.shape[0])
    assert {(r.found.dtype, r.values.dtype) for r in replies} == {(pb.INT32, pb.BFLOAT16)}
    found = np.concatenate([array(r.found) for r in replies])
    values = np.concatenate([array(r.values) for r in replies])
    np.testing.assert_array_equal(found, (ids < G_ROWS).astype(np.int32))
    np.testing.assert_array_equal(values[:G_ROWS], data["g_values"])   # BFLOAT16 as documented
    assert not values[G_ROWS:].any()                     # zeros where not found
    want = backend.get("g", ids, values=True, keys=keys)
    np.testing.assert_array_equal(values, want.values.astype(np.float32))
    if keys:
        got_keys = np.concatenate([array(r.keys) for r in replies])
        np.testing.assert_array_equal(got_keys[:G_ROWS], data["g_keys"])
        np.testing.assert_array_equal(got_keys, want.keys)
    else:
        assert not any(r.HasField("keys") for r in replies)


def test_export_streams_within_default_limit(rig):
    stub, channel, backend, data = rig
    sizes: list[int] = []
    replies = list(recording_stream(channel, "Export", pb.ExportRequest, pb.ExportChunk,
                                    sizes)(pb.ExportRequest(bank="g")))
    assert list(stub.Export(pb.ExportRequest(bank="g"))) == replies   # the generated stub too

    check_sizes(replies, sizes)
    ids = np.concatenate([array(r.ids) for r in replies])
    keys = np.concatenate([array(r.keys) for r in replies])
    values = np.concatenate([array(r.values) for r in replies])
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], np.arange(G_ROWS))
    np.testing.assert_array_equal(keys[order], data["g_keys"])
    np.testing.assert_array_equal(values[order], data["g_values"])
    local = list(backend.export("g"))
    np.testing.assert_array_equal(ids, np.concatenate([c.ids for c in local]))
    np.testing.assert_array_equal(values, np.concatenate([c.values for c in local]).astype(np.float32))


def test_unary_add_reply_limit_is_as_documented(rig):
    """memory.proto: AddResponse is not cut; 524,285 ids fit a default channel, one
    more does not: the client fails with RESOURCE_EXHAUSTED, no ErrorInfo, and the
    write was applied."""
    stub, *_ = rig
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(name="u", dim=1, quota_bytes=-1)))
    n = 524285
    keys = np.zeros((n, 1), np.float32)
    assert array(stub.Add(iter([pb.AddRequest(bank="u", keys=tensor(keys))])).ids).shape == (n,)
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(iter([pb.AddRequest(bank="u", keys=tensor(np.zeros((n + 1, 1), np.float32)))]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rpc_status.from_call(e.value) is None
    assert stub.GetBank(pb.BankRef(name="u")).count == 2 * n + 1
    stub.DeleteBank(pb.BankRef(name="u"))


# ---- errors, from the google.rpc details alone --------------------------------------------

def test_quota_exceeded_details(rig):
    stub, *_ = rig
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(name="q", dim=4, quota_bytes=1000)))
    keys = np.ones((100, 4), np.float32)
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(iter([pb.AddRequest(bank="q", keys=tensor(keys))]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, (info, failure) = details(e.value)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert status.message == e.value.details()
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.domain, info.reason) == ("memoryd", "QUOTA_EXCEEDED")
    m = dict(info.metadata)
    assert set(m) == {"bank", "used", "limit", "requested", "scope"}
    assert (m["bank"], m["scope"], m["limit"]) == ("q", "bank", "1000")
    used, requested = int(m["used"]), int(m["requested"])
    assert used >= 0 and requested >= 100 * 4 * 4 and used + requested > 1000
    assert isinstance(failure, error_details_pb2.QuotaFailure)
    [v] = failure.violations
    assert v.subject == "bank:q"
    assert v.description == f"used {used} B + requested {requested} B > limit 1000 B"
    assert stub.GetBank(pb.BankRef(name="q")).count == 0     # all or none


def test_tenant_quota_exceeded_details(rig):
    stub, *_ = rig
    stub.SetTenantQuota(pb.SetTenantQuotaRequest(tenant="acme", quota_bytes=500))
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(name="t", dim=4, tenant="acme",
                                                          quota_bytes=-1)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(iter([pb.AddRequest(bank="t", keys=tensor(np.ones((100, 4), np.float32)))]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, (info, failure) = details(e.value)
    assert info.reason == "QUOTA_EXCEEDED"
    assert (info.metadata["scope"], info.metadata["bank"], info.metadata["limit"]) == \
        ("tenant", "acme", "500")
    assert [v.subject for v in failure.violations] == ["tenant:acme"]


def test_frozen_bank_details(rig):
    stub, *_ = rig
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(name="f", dim=4, quota_bytes=-1)))
    stub.Add(iter([pb.AddRequest(bank="f", keys=tensor(np.ones((3, 4), np.float32)))]))
    assert stub.FreezeBank(pb.BankRef(name="f")).frozen
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(iter([pb.AddRequest(bank="f", keys=tensor(np.ones((1, 4), np.float32)))]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status, [info] = details(e.value)
    assert (info.domain, info.reason, dict(info.metadata)) == ("memoryd", "BANK_FROZEN", {})
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    with pytest.raises(grpc.RpcError) as e:
        stub.GetBank(pb.BankRef(name="no-such-bank"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(e.value)[1][0].reason == "NOT_FOUND"


# ---- write-stream rules and conversions as memory.proto states them ------------------------

def test_write_stream_rules(rig):
    stub, *_ = rig
    stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(name="w", dim=4, value_dim=2,
                                                          quota_bytes=-1)))
    k, v = np.ones((2, 4), np.float32), np.ones((2, 2), np.float32)

    def fails(messages, text):
        with pytest.raises(grpc.RpcError) as e:
            stub.Add(iter(messages))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(e.value)[1][0].reason == "INVALID_ARGUMENT"
        assert text in e.value.details()

    fails([pb.AddRequest(keys=tensor(k), values=tensor(v))], "first message must name")
    fails([pb.AddRequest(bank="w", keys=tensor(k), values=tensor(v)),
           pb.AddRequest(bank="s", keys=tensor(k), values=tensor(v))], "names bank 's'")
    fails([pb.AddRequest(bank="w", keys=tensor(k), values=tensor(v), ids=tensor(np.arange(2))),
           pb.AddRequest(keys=tensor(k), values=tensor(v))], "ids present in 1 of 2")
    fails([pb.AddRequest(bank="w", keys=tensor(k), values=tensor(v)),
           pb.AddRequest(keys=tensor(k, pb.FLOAT16), values=tensor(v))], "must agree on dtype")
    fails([pb.AddRequest(bank="w", keys=tensor(k), values=tensor(v),
                         ids=tensor(np.arange(2, dtype=np.float32)))], "must be integers")
    fails([pb.AddRequest(bank="w", keys=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 4], data=b"\0" * 8),
                         values=tensor(v))], "do not match shape")
    assert stub.GetBank(pb.BankRef(name="w")).count == 0          # nothing of those written

    # accepted: the name repeated; INT32 keys (converted to FLOAT32) and INT32 ids
    reply = stub.Add(iter([
        pb.AddRequest(bank="w", keys=tensor(k.astype(np.int32)), values=tensor(v),
                      ids=tensor(np.array([10, 11], np.int32))),
        pb.AddRequest(bank="w", keys=tensor(k.astype(np.int32)), values=tensor(v),
                      ids=tensor(np.array([12, 13], np.int32)))]))
    assert (reply.ids.dtype, array(reply.ids).tolist()) == (pb.INT64, [10, 11, 12, 13])
    [g] = stub.Get(pb.GetRequest(bank="w", ids=tensor(np.array([13], np.int64)), keys=True))
    assert g.keys.dtype == pb.FLOAT32 and array(g.keys).tolist() == [[1.0] * 4]


def test_client_metadata_names_the_caller(rig):
    stub, *_ = rig
    q = tensor(np.zeros((1, S_DIM), np.float32))
    list(stub.Search(pb.SearchRequest(banks=["s"], queries=q, k=1),
                     metadata=(("x-memoryd-client", "proto-only test 1"),)))
    stacks = {(u.client, tuple(u.banks)) for u in stub.Stats(pb.StatsRequest()).stacks}
    assert ("proto-only test 1", ("s",)) in stacks
