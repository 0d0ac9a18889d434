"""Daemon-specific behaviour: health, reflection, wire robustness, rich errors,
streaming of big replies, and the `memoryd serve` process lifecycle.

Backend semantics (search correctness, bad-input statuses through both
backends) live in test_backend.py; here only what the daemon adds.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from daemon_util import daemon_env, daemon_log, serve_args, start_daemon, stop_daemon
from knnlayer.client import MemoryClient
from memoryd.daemon import config as cfg
from memoryd import errors
from memoryd.wire import messages, streams, tensors
from memoryd.wire.channel import CHANNEL_OPTIONS
from memoryd.api import BankQuery, BankSpec, Caller, SessionSpec, StackUse
from memoryd.engine import LocalMemory
from memoryd.daemon.server import create_server
from memoryd.v1 import memory_pb2 as pb
from memoryd.v1 import memory_pb2_grpc as pb_grpc

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def short_dir():
    """A short /tmp folder: AF_UNIX paths must stay under ~107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="mdt-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(short_dir):
    """An in-process daemon: (backend, address)."""
    backend = LocalMemory(short_dir / "inproc")
    server, address = create_server(backend, f"unix://{short_dir}/inproc.sock")
    yield backend, address
    server.stop(0).wait(10)
    backend.close()


@pytest.fixture(scope="module")
def channel(daemon):
    with grpc.insecure_channel(daemon[1], options=CHANNEL_OPTIONS) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.MemoryStub(channel)


@pytest.fixture(scope="module")
def client(daemon):
    with MemoryClient(daemon[1]) as c:
        yield c


_n = iter(range(10**6))


def new_bank(mem, **kw) -> BankSpec:
    spec = BankSpec(**{"name": f"d{next(_n)}", "dim": 16, "value_dim": 8, **kw})
    mem.create_bank(spec)
    return spec


def rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# ---- health, reflection, ping -------------------------------------------------------

def test_health_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "memoryd.v1.Memory"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_memory_service(channel):
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"memoryd.v1.Memory", "grpc.health.v1.Health"} <= names


def test_ping_echoes(client, stub):
    assert client.ping(b"\x00hello\xff") == b"\x00hello\xff"
    assert stub.Ping(pb.PingRequest(payload=b"x" * 100_000)).payload == b"x" * 100_000


def test_health_cli(daemon):
    ok = CliRunner().invoke(__import__("memoryd.daemon.cli").daemon.cli.main, ["health", "--address", daemon[1]])
    assert ok.exit_code == 0 and "SERVING" in ok.output
    out = CliRunner().invoke(__import__("memoryd.daemon.cli").daemon.cli.main, ["version"])
    assert out.exit_code == 0 and out.output.startswith("memoryd ")


# ---- corrupted wire input -------------------------------------------------------------

def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


@pytest.mark.parametrize("tensor", [
    pb.Tensor(dtype=pb.FLOAT32, shape=[2, 16], data=b"\x00" * 100),      # short
    pb.Tensor(dtype=pb.FLOAT32, shape=[2, 16], data=b"\x00" * 129),      # long
    pb.Tensor(dtype=77, shape=[2, 16], data=b"\x00" * 128),              # unknown dtype
    pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[2, 16], data=b"\x00" * 128),
    pb.Tensor(dtype=pb.FLOAT32, shape=[-2, -16], data=b""),              # negative shape
])
def test_corrupted_tensor_is_invalid_argument(client, stub, tensor):
    spec = new_bank(client)
    search = pb.SearchRequest(banks=[spec.name], queries=tensor, k=3)
    assert _code(lambda: list(stub.Search(search))) == grpc.StatusCode.INVALID_ARGUMENT
    add = pb.AddRequest(bank=spec.name, keys=tensor)
    assert _code(lambda: stub.Add(iter([add]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.ping(b"still here") == b"still here"


def test_add_stream_is_all_or_nothing(client, stub):
    spec = new_bank(client, value_dim=0)
    good = pb.AddRequest(bank=spec.name, keys=tensors.encode(rand(4, 16)))
    bad = pb.AddRequest(keys=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 16], data=b"\x00"))
    other = pb.AddRequest(bank="someone-else", keys=tensors.encode(rand(4, 16)))
    wrong_dim = pb.AddRequest(keys=tensors.encode(rand(4, 8)))
    for stream in ([good, bad], [good, other], [good, wrong_dim], []):
        assert _code(lambda: stub.Add(iter(stream))) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.bank_info(spec.name).count == 0
    later = pb.AddRequest(keys=tensors.encode(rand(4, 16)))         # later chunks: bank left empty
    reply = stub.Add(iter([good, later, pb.AddRequest(bank=spec.name, keys=good.keys)]))
    assert tensors.decode(reply.ids).shape == (12,)
    assert client.bank_info(spec.name).count == 12


def test_empty_update_stream_is_invalid_argument(stub):
    assert _code(lambda: stub.UpdateValues(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_error_is_internal_and_daemon_survives(short_dir, caplog):
    class Broken:
        def stats(self, *, caller=None):
            raise RuntimeError("disk on fire")

    server, address = create_server(Broken(), f"unix://{short_dir}/broken.sock")
    try:
        with grpc.insecure_channel(address) as ch:
            s = pb_grpc.MemoryStub(ch)
            with caplog.at_level("ERROR", logger="memoryd.rpc"):
                with pytest.raises(grpc.RpcError) as e:
                    s.Stats(pb.StatsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert "disk on fire" in e.value.details()
            assert any(r.exc_info and "disk on fire" in str(r.exc_info[1]) for r in caplog.records)
            assert s.Ping(pb.PingRequest(payload=b"ok"), timeout=5).payload == b"ok"
    finally:
        server.stop(0).wait(5)


# ---- rich errors -------------------------------------------------------------------------

def test_quota_exceeded_carries_details(client, stub):
    spec = new_bank(client, value_dim=0, quota_bytes=2000)
    req = pb.AddRequest(bank=spec.name, keys=tensors.encode(rand(1000, 16)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Add(iter([req]))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(e.value)
    failure, info = error_details_pb2.QuotaFailure(), error_details_pb2.ErrorInfo()
    assert [d.Unpack(failure) for d in status.details if d.Is(failure.DESCRIPTOR)] == [True]
    assert [d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR)] == [True]
    assert failure.violations[0].subject == f"bank:{spec.name}"
    assert "limit 2000 B" in failure.violations[0].description
    assert info.metadata["limit"] == "2000" and int(info.metadata["requested"]) > 2000

    with pytest.raises(errors.QuotaExceeded) as q:
        client.add(spec.name, rand(1000, 16))
    assert (q.value.bank, q.value.limit) == (spec.name, 2000)
    assert q.value.requested == int(info.metadata["requested"])
    assert q.value.used == client.bank_info(spec.name).used_bytes


def test_error_classes_survive_the_wire(client):
    spec = new_bank(client)
    client.add(spec.name, rand(2, 16), rand(2, 8))
    client.freeze_bank(spec.name)
    with pytest.raises(errors.BankFrozen):
        client.add(spec.name, rand(1, 16), rand(1, 8))
    with pytest.raises(errors.NotFound, match="no bank named"):
        client.bank_info("no-such-bank")


def test_unreachable_daemon_is_unavailable(short_dir):
    with pytest.raises(errors.Unavailable, match="nothing.sock"):
        MemoryClient(f"unix://{short_dir}/nothing.sock", wait_ready=0.2)


# ---- big replies stream in blocks ---------------------------------------------------------

def test_search_reply_above_4mib_streams_in_blocks(daemon, client, stub):
    backend, _ = daemon
    spec = new_bank(client, dim=32, value_dim=128)
    client.add(spec.name, rand(500, 32), rand(500, 128))
    queries = rand(4096, 32)                  # 4096 x 32 x 128 fp32 values = 64 MiB
    msgs = list(stub.Search(pb.SearchRequest(banks=[spec.name], queries=tensors.encode(queries),
                                             k=32, values=True)))
    assert len(msgs) >= 16
    assert [m.offset for m in msgs] == list(np.cumsum([0] + [m.ids.shape[0] for m in msgs[:-1]]))
    assert max(m.ByteSize() for m in msgs) <= streams.CHUNK_BYTES + 4096

    got, want = client.search(spec.name, queries, 32), backend.search(spec.name, queries, 32)
    assert got.values.shape == (4096, 32, 128) and got.values.dtype == np.float32
    for f in ("ids", "scores", "bank", "values"):
        assert getattr(got, f).dtype == getattr(want, f).dtype
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))


def test_big_add_is_chunked_and_export_round_trips(client):
    spec = new_bank(client, dim=128, value_dim=64, value_dtype="bfloat16")
    keys, values = rand(12_000, 128), rand(12_000, 64)   # ~9 MiB: three Add chunks
    ids = client.add(spec.name, keys, values)
    chunks = list(client.export(spec.name, chunk_rows=5000))
    assert [len(c.ids) for c in chunks] == [5000, 5000, 2000]
    exported = np.concatenate([c.ids for c in chunks])
    np.testing.assert_array_equal(np.sort(exported), np.sort(ids))
    assert chunks[0].values.dtype == np.dtype("bfloat16")


# ---- the wire of stacks, tiers, sessions and tenants ----------------------------------------

def _same(got, want) -> None:
    for f in ("ids", "scores", "bank", "values", "keys"):
        a, b = getattr(got, f), getattr(want, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f
            np.testing.assert_array_equal(a, b)


def test_stack_options_round_trip(daemon, client, stub):
    backend, _ = daemon
    a, b, c = (new_bank(client) for _ in range(3))
    for spec in (a, b, c):
        client.add(spec.name, rand(50, 16), rand(50, 8))
    queries = rand(7, 16)
    stack = [BankQuery(a.name, k=2, bias=0.75), BankQuery(b.name, include=False), c.name]
    got = client.search(stack, queries, 5, keys=True)
    _same(got, backend.search(stack, queries, 5, keys=True))
    assert not (got.bank == 1).any()                    # excluded, position kept
    assert (got.bank == 0).sum(axis=1).max() <= 2       # a's own k

    # the same stack from a raw stub: k 0 = the search's k, exclude defaults to false
    req = pb.SearchRequest(stack=[pb.BankQuery(name=a.name, k=2, bias=0.75),
                                  pb.BankQuery(name=b.name, exclude=True),
                                  pb.BankQuery(name=c.name)],
                           queries=tensors.encode(queries), k=5, values=True, keys=True)
    msgs = list(stub.Search(req))
    np.testing.assert_array_equal(np.concatenate([tensors.decode(m.ids) for m in msgs]), got.ids)
    np.testing.assert_array_equal(np.concatenate([tensors.decode(m.scores) for m in msgs]), got.scores)

    # default options travel as plain `banks` (older daemons understand them)
    assert messages.is_plain([BankQuery(a.name), BankQuery(c.name)])
    assert not messages.is_plain([BankQuery(a.name, bias=0.1)])
    _same(client.search([BankQuery(a.name), c.name], queries, 3),
          backend.search([a.name, c.name], queries, 3))

    # the shared checks run in the client too; a bad k from a raw stub is refused
    for bad in ([a.name, BankQuery(a.name)], [BankQuery(a.name, include=False)],
                [BankQuery(a.name, bias=float("nan"))], [BankQuery(a.name, k=0)]):
        with pytest.raises(errors.InvalidArgument):
            client.search(bad, queries, 3)
    bad_k = pb.SearchRequest(stack=[pb.BankQuery(name=a.name, k=-3)],
                             queries=tensors.encode(queries), k=3)
    assert _code(lambda: list(stub.Search(bad_k))) == grpc.StatusCode.INVALID_ARGUMENT


def test_client_name_reaches_stats(daemon, stub):
    backend, address = daemon
    spec = new_bank(backend)
    backend.add(spec.name, rand(5, 16), rand(5, 8))
    with MemoryClient(address, client_name="trainer-7") as named, MemoryClient(address) as anon:
        named.search([spec.name], rand(2, 16), 3)
        named.search([BankQuery(spec.name, bias=1.0)], rand(2, 16), 3)
        anon.search(spec.name, rand(2, 16), 3)
        assert anon.client_name == f"{socket.gethostname()}:{os.getpid()}"
        list(stub.Search(pb.SearchRequest(banks=[spec.name], queries=tensors.encode(rand(1, 16)),
                                          k=1)))
        stacks = {(u.client, u.banks): u for u in named.stats().stacks
                  if u.banks == (spec.name,)}
        assert all(isinstance(u, StackUse) for u in stacks.values())
        assert stacks["trainer-7", (spec.name,)].searches == 2
        assert stacks[anon.client_name, (spec.name,)].searches == 1
        assert len(stacks) == 3                           # the raw stub: its peer address
        with pytest.raises(errors.InvalidArgument, match="client_name"):
            MemoryClient(address, client_name="caf\u00e9\n", wait_ready=0)


def test_every_call_reaches_the_backend_with_its_caller(short_dir):
    """The daemon hands every backend call the Caller named in the call's
    metadata (no signature inspection): one plane after another."""
    seen: list[tuple[str, object]] = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            method = getattr(self.inner, name)

            def call(*args, caller=None, **kwargs):
                seen.append((name, caller))
                return method(*args, caller=caller, **kwargs)
            return call

    inner = LocalMemory(short_dir / "rec")
    server, address = create_server(Recording(inner), f"unix://{short_dir}/rec.sock")
    try:
        with MemoryClient(address, client_name="who") as c:
            c.create_bank(BankSpec("p", dim=16, value_dim=8))                     # admin
            c.add("p", rand(10, 16), rand(10, 8))                                 # data
            c.search([BankQuery("p", bias=0.5)], rand(3, 16), 4)
            sid = c.open_session(SessionSpec(dim=16, value_dim=8)).session_id     # sessions
            c.append(sid, rand(2, 16), rand(2, 8))
            c.tenant_info("default")                                              # tenants
            c.stats()
            with MemoryClient(address, client_name="other") as d:
                d.bank_info("p")
        names = [n for n, _ in seen]
        assert names == ["create_bank", "add", "search", "open_session", "append", "tenant_info",
                         "stats", "bank_info"]
        assert [cl for _, cl in seen] == [Caller("who")] * 7 + [Caller("other")]
        assert [(u.client, u.banks) for u in inner.stats().stacks] == [("who", ("p",))]
    finally:
        server.stop(0).wait(5)
        inner.close()


def test_tier_and_eviction_defaults_on_the_wire(client, stub):
    name = f"d{next(_n)}"
    info = messages.info_from_pb(stub.CreateBank(pb.CreateBankRequest(spec=pb.BankSpec(
        name=name, dim=16, quota_bytes=-1))))           # tier, eviction unset
    assert (info.spec.tier, info.spec.eviction) == ("ram", "reject")
    assert isinstance(info.tier_bytes, dict)
    assert all(isinstance(v, int) for v in info.tier_bytes.values())
    spec = new_bank(client, eviction="fifo", quota_bytes=10_000)
    assert client.bank_info(spec.name).spec.eviction == "fifo"
    with pytest.raises(errors.InvalidArgument, match="tier must be one of"):
        client.set_tier(spec.name, "floppy")          # named by the daemon
    with pytest.raises(errors.InvalidArgument, match="eviction must be one of"):
        client.create_bank(BankSpec(f"d{next(_n)}", dim=16, eviction="lifo"))


def test_session_ttls_none_and_zero_on_the_wire(daemon, client, stub):
    backend, _ = daemon
    info = client.open_session(SessionSpec(dim=16, value_dim=8))
    assert (info.ttl_idle_s, info.ttl_absolute_s, info.expires_at) == (None, None, None)
    raw = stub.GetSession(pb.SessionRef(session_id=info.session_id))
    assert not raw.HasField("expires_at") and not raw.HasField("ttl_idle_s")

    timed = client.open_session(SessionSpec(dim=16, ttl_idle_s=600.0))
    assert timed.ttl_idle_s == 600.0 and timed.ttl_absolute_s is None
    assert timed.expires_at == pytest.approx(timed.last_used_at + 600.0)
    assert timed == backend.session_info(timed.session_id)

    # 0 is a value on the wire, not "unset": refused like any bad TTL
    zero = pb.OpenSessionRequest(spec=pb.SessionSpec(dim=16, ttl_idle_s=0.0, quota_bytes=-1))
    assert _code(lambda: stub.OpenSession(zero)) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.InvalidArgument, match="ttl_idle_s"):
        client.open_session(SessionSpec(dim=16, ttl_idle_s=0))

    # extend: unset fields are left alone, a 0 is refused
    kept = stub.ExtendSession(pb.ExtendSessionRequest(session_id=timed.session_id))
    assert kept.ttl_idle_s == 600.0 and not kept.HasField("ttl_absolute_s")
    bad = pb.ExtendSessionRequest(session_id=timed.session_id, ttl_absolute_s=0.0)
    assert _code(lambda: stub.ExtendSession(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    longer = client.extend_session(timed.session_id, ttl_absolute_s=60.0)
    assert longer.ttl_idle_s == 600.0 and longer.ttl_absolute_s is not None
    assert longer.expires_at == pytest.approx(longer.created_at + longer.ttl_absolute_s)
    for sid in (info.session_id, timed.session_id):
        assert client.close_session(sid) >= 0


def test_append_stream_is_checked_and_all_or_nothing(client, stub):
    sid = client.open_session(SessionSpec(dim=16, value_dim=8)).session_id
    good = pb.AppendRequest(session_id=sid, keys=tensors.encode(rand(4, 16)),
                            values=tensors.encode(rand(4, 8)))
    wrong_dim = pb.AppendRequest(keys=tensors.encode(rand(4, 12)), values=tensors.encode(rand(4, 8)))
    other = pb.AppendRequest(session_id="s-other", keys=good.keys, values=good.values)
    unnamed = pb.AppendRequest(keys=good.keys, values=good.values)
    half_scores = pb.AppendRequest(keys=good.keys, values=good.values,
                                   scores=tensors.encode(np.ones(4, np.float32)))
    for stream in ([good, wrong_dim], [good, other], [unnamed], [good, half_scores], []):
        assert _code(lambda: stub.Append(iter(stream))) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.session_info(sid).bank.count == 0
    reply = stub.Append(iter([good, pb.AppendRequest(keys=good.keys, values=good.values)]))
    ids = tensors.decode(reply.ids)
    assert ids.dtype == np.int64 and ids.shape == (8,)
    assert client.session_info(sid).bank.count == 8

    # the client cuts a big append into chunks; scores ride along
    n = 50_000                                      # ~4.8 MiB: two Append messages
    big = client.append(sid, rand(n, 16), rand(n, 8), scores=np.linspace(0, 1, n))
    assert big.dtype == np.int64 and big.shape == (n,) and big.flags.writeable
    assert client.session_info(sid).bank.count == n + 8
    client.close_session(sid)
    with pytest.raises(errors.NotFound):
        client.session_info(sid)


def test_promote_and_tenants_on_the_wire(daemon, client):
    backend, _ = daemon
    target = new_bank(client, tenant="acme")
    sid = client.open_session(SessionSpec(dim=16, value_dim=8, tenant="acme")).session_id
    client.append(sid, rand(6, 16), rand(6, 8), scores=[0.1, 0.9, 0.5, 0.95, 0.2, 0.7])
    r = client.promote_session(sid, target.name, min_score=0.5, move=True)
    assert (r.promoted, r.duplicates, r.moved) == (4, 0, True)
    for a in (r.target_ids, r.source_ids):
        assert a.dtype == np.int64 and a.shape == (4,) and a.flags.writeable
    none = client.promote_session(sid, target.name, ids=[])        # [] is no rows, not float64
    assert none.promoted == 0 and none.target_ids.dtype == np.int64
    with pytest.raises(errors.InvalidArgument, match="min_score"):
        client.promote_session(sid, target.name, min_score="high")

    t = client.set_tenant_quota("acme", 10**9)
    assert t == backend.tenant_info("acme") and t.quota_bytes == 10**9
    assert t.banks >= 1 and t.sessions == 1
    assert client.set_tenant_quota("acme", None).quota_bytes is None
    with pytest.raises(errors.InvalidArgument, match="non-negative"):
        client.set_tenant_quota("acme", -1)                   # -1 is "unlimited" on the wire
    with pytest.raises(errors.NotFound):
        client.tenant_info("nobody-here")
    assert "acme" in {x.name for x in client.list_tenants()}
    assert {x.name for x in client.stats().tenants} == {x.name for x in client.list_tenants()}
    assert [s.session_id for s in client.list_sessions("acme")] == [sid]
    client.close_session(sid)


# ---- configuration --------------------------------------------------------------------------

def test_config_precedence(tmp_path):
    toml = tmp_path / "memoryd.toml"
    toml.write_text('data_dir = "rel"\nlisten = "127.0.0.1:1"\nmax_workers = 3\n')
    c = cfg.load(toml, env={})
    assert (c.data_dir, c.listen, c.max_workers) == (tmp_path / "rel", "127.0.0.1:1", 3)
    c = cfg.load(toml, env={"MEMORYD_LISTEN": "127.0.0.1:2"})
    assert c.listen == "127.0.0.1:2" and c.catalog_url is None
    c = cfg.load(toml, env={"MEMORYD_LISTEN": "127.0.0.1:2"}, listen="127.0.0.1:3",
                 data_dir=str(tmp_path / "x"))
    assert (c.listen, c.data_dir) == ("127.0.0.1:3", tmp_path / "x")
    assert cfg.load(None, env={}, data_dir=str(tmp_path)).listen == f"unix://{tmp_path}/memoryd.sock"
    with pytest.raises(cfg.ConfigError, match="no data dir"):
        cfg.load(None, env={})
    toml.write_text("bogus = 1\n")
    with pytest.raises(cfg.ConfigError, match="unknown key"):
        cfg.load(toml, env={})


# ---- the `memoryd serve` process -------------------------------------------------------------

def _stale_socket(path: Path) -> None:
    """Leave a socket file behind with nobody listening, as a crashed daemon does."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def test_serve_process_lifecycle(short_dir):
    data = short_dir / "proc"
    proc, address = start_daemon(data, "--log-level", "debug")
    try:
        # One daemon per data dir: a second one refuses with one clear line.
        second = subprocess.run(serve_args(data), capture_output=True, text=True, timeout=30,
                                env=daemon_env())
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already serving" in json.loads(lines[0])["msg"]

        with MemoryClient(address) as c:
            c.create_bank(BankSpec("kept", dim=32, value_dim=128))
            ids = c.add("kept", rand(600, 32), rand(600, 128))
            queries = rand(4096, 32)
            before = c.search("kept", queries, 32)

        # A 64 MiB reply we read slowly: the handler is mid-stream at SIGTERM.
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
            stream = pb_grpc.MemoryStub(ch).Search(pb.SearchRequest(
                banks=["kept"], queries=tensors.encode(queries), k=32, values=True), timeout=30)
            first = next(stream)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None, "the daemon must wait for the in-flight call"
            rest = list(stream)
        rows = sum(m.ids.shape[0] for m in [first, *rest])
        assert rows == 4096
        assert proc.wait(30) == 0, daemon_log(proc)
        assert not (data / "memoryd.sock").exists()
        log = [json.loads(line) for line in daemon_log(proc).splitlines()]  # JSON lines only
        assert {"memoryd started", "memoryd stopping", "memoryd stopped"} <= {e["msg"] for e in log}
        rpcs = [e["fields"] for e in log if e["msg"] == "rpc"]
        assert {"method": "Search", "code": "OK"}.items() <= rpcs[-1].items()
    finally:
        stop_daemon(proc)

    _stale_socket(data / "memoryd.sock")
    proc, address = start_daemon(data)
    try:
        with MemoryClient(address) as c:
            assert c.bank_info("kept").count == 600
            after = c.search("kept", queries, 32)
            np.testing.assert_array_equal(after.ids, before.ids)
            np.testing.assert_array_equal(after.values, before.values)
            np.testing.assert_array_equal(np.sort(np.concatenate(
                [x.ids for x in c.export("kept")])), np.sort(ids))
    finally:
        assert stop_daemon(proc) == 0, daemon_log(proc)
