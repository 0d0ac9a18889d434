"""Daemon-specific behaviour: health, reflection, wire robustness, rich errors,
streaming of big replies, and the `memoryd serve` process lifecycle.

Backend semantics (search correctness, bad-input statuses through both
backends) live in test_backend.py; here only what the daemon adds.
"""
from __future__ import annotations

import json
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
from memoryd import config as cfg
from memoryd import errors, wire
from memoryd.api import BankSpec
from memoryd.local import LocalMemory
from memoryd.server import create_server
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
    with grpc.insecure_channel(daemon[1], options=wire.CHANNEL_OPTIONS) as ch:
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
    ok = CliRunner().invoke(__import__("memoryd.cli").cli.main, ["health", "--address", daemon[1]])
    assert ok.exit_code == 0 and "SERVING" in ok.output
    out = CliRunner().invoke(__import__("memoryd.cli").cli.main, ["version"])
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
    good = pb.AddRequest(bank=spec.name, keys=wire.encode(rand(4, 16)))
    bad = pb.AddRequest(keys=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 16], data=b"\x00"))
    other = pb.AddRequest(bank="someone-else", keys=wire.encode(rand(4, 16)))
    wrong_dim = pb.AddRequest(keys=wire.encode(rand(4, 8)))
    for stream in ([good, bad], [good, other], [good, wrong_dim], []):
        assert _code(lambda: stub.Add(iter(stream))) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.bank_info(spec.name).count == 0
    later = pb.AddRequest(keys=wire.encode(rand(4, 16)))         # later chunks: bank left empty
    reply = stub.Add(iter([good, later, pb.AddRequest(bank=spec.name, keys=good.keys)]))
    assert wire.decode(reply.ids).shape == (12,)
    assert client.bank_info(spec.name).count == 12


def test_empty_update_stream_is_invalid_argument(stub):
    assert _code(lambda: stub.UpdateValues(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT


def test_unexpected_error_is_internal_and_daemon_survives(short_dir, caplog):
    class Broken:
        def stats(self):
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
    req = pb.AddRequest(bank=spec.name, keys=wire.encode(rand(1000, 16)))
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
    msgs = list(stub.Search(pb.SearchRequest(banks=[spec.name], queries=wire.encode(queries),
                                             k=32, values=True)))
    assert len(msgs) >= 16
    assert [m.offset for m in msgs] == list(np.cumsum([0] + [m.ids.shape[0] for m in msgs[:-1]]))
    assert max(m.ByteSize() for m in msgs) <= wire.CHUNK_BYTES + 4096

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
        with grpc.insecure_channel(address, options=wire.CHANNEL_OPTIONS) as ch:
            stream = pb_grpc.MemoryStub(ch).Search(pb.SearchRequest(
                banks=["kept"], queries=wire.encode(queries), k=32, values=True), timeout=30)
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
