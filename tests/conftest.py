"""Shared fixtures: every backend test runs against the in-process backend and
against the same backend served over gRPC (in this process, on a unix socket).

    mem          parametrised: "local" = LocalMemory(tmp dir);
                 "daemon" = that LocalMemory behind create_server + MemoryClient
    local_mem    LocalMemory only
    make_bank    make_bank(mem, **spec_overrides) -> BankSpec (created, unique name)
"""
from __future__ import annotations

import itertools
import os
import sys
import tempfile
from pathlib import Path

import pytest

from memoryd.api import BankSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import reference`
from pg_util import pg_url  # noqa: E402,F401  (fixture: a fresh PostgreSQL database)

_names = itertools.count()
_run = f"{os.getpid() % 100000}"


def unique_name(prefix: str = "b") -> str:
    return f"{prefix}{_run}-{next(_names)}"


def new_spec(**overrides) -> BankSpec:
    fields = dict(name=unique_name(), dim=16, value_dim=8)
    fields.update(overrides)
    return BankSpec(**fields)


def _make_bank(mem, **overrides) -> BankSpec:
    spec = new_spec(**overrides)
    info = mem.create_bank(spec)
    assert info.spec.name == spec.name
    return spec


@pytest.fixture
def make_bank():
    """make_bank(mem, **spec_overrides) -> the created BankSpec (unique name)."""
    return _make_bank


def _socket_address(tmp_path: Path) -> tuple[str, str | None]:
    path = tmp_path / "memoryd.sock"
    if len(str(path)) < 100:           # AF_UNIX paths are limited to ~107 bytes
        return f"unix://{path}", None
    short = tempfile.mkdtemp(prefix="mdsock")
    return f"unix://{short}/memoryd.sock", short


def _start(server) -> None:
    try:
        server.start()
    except ValueError:                 # create_server already started it
        pass


@pytest.fixture
def local_mem(tmp_path):
    from memoryd.engine import LocalMemory

    backend = LocalMemory(tmp_path / "data")
    try:
        yield backend
    finally:
        backend.close()


# The spine runs against a real local cluster too (tests/cluster_util.py: two
# `memoryd serve --shard-index i` processes on one PostgreSQL catalog behind a
# `memoryd route`): its "cluster" cases are kept in these modules only.
CLUSTER_SUITES = {"test_backend.py"}


def pytest_collection_modifyitems(config, items):
    def params(item):
        return getattr(getattr(item, "callspec", None), "params", {})

    items[:] = [i for i in items
                if (params(i).get("mem") != "cluster" or i.path.name in CLUSTER_SUITES)
                and (params(i).get("rig") != "sharded" or i.path.name in SHARDED_RIG_SUITES)]


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    """One cluster for the session (starting one takes seconds): 2 shards + router."""
    from cluster_util import LocalCluster
    from pg_util import fresh_database

    with fresh_database() as url:
        with LocalCluster(tmp_path_factory.mktemp("cluster"), url, shards=2) as c:
            yield c


def _emptied(client) -> None:
    """What a test left in the shared cluster, gone: the next starts empty."""
    for s in client.list_sessions():
        client.close_session(s.session_id)
    for b in client.list_banks():
        client.delete_bank(b.name)


@pytest.fixture(params=["local", "daemon", "cluster"])
def mem(request, tmp_path):
    from memoryd.engine import LocalMemory

    if request.param == "cluster":
        from knnlayer.client import MemoryClient

        cluster = request.getfixturevalue("local_cluster")
        client = MemoryClient(cluster.address)
        try:
            yield client
        finally:
            try:
                _emptied(client)
            finally:
                client.close()
        return
    backend = LocalMemory(tmp_path / "data")
    if request.param == "local":
        try:
            yield backend
        finally:
            backend.close()
        return

    from knnlayer.client import MemoryClient
    from memoryd.daemon.server import create_server

    listen, short = _socket_address(tmp_path)
    server = client = None
    try:
        server, address = create_server(backend, listen)
        _start(server)
        client = MemoryClient(address)
        yield client
    finally:
        # Stop the server before closing the channel: closing a channel whose
        # server is still up blocks ~0.2 s in gRPC core; the other way ~5 ms.
        if server is not None:
            server.stop(0).wait(10)
        if client is not None:
            client.close()
        backend.close()
        if short:
            import shutil

            shutil.rmtree(short, ignore_errors=True)


# ---- an injectable clock, and a backend built on it -------------------------------
#
#     clock        FakeClock: clock() -> seconds; clock.advance(s); starts at 1e6
#     rig          parametrised local/daemon: a LocalMemory(tmp, clock=clock,
#                  reap_interval=None) as .local, the backend under test as .mem
#                  (the LocalMemory itself, or a MemoryClient to a server that
#                  wraps it, so the fake clock drives the daemon too), .kind,
#                  .data_dir; .connect(name) opens another MemoryClient (daemon),
#                  .reopen() closes everything and opens the same data dir again
#     mem_clock    rig.mem

class FakeClock:
    def __init__(self, start: float = 1_000_000.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Rig:
    CLIENT_NAME = "rig-client"

    def __init__(self, kind: str, tmp_path: Path, clock: FakeClock):
        self.kind, self.tmp_path, self.clock = kind, tmp_path, clock
        self.data_dir = tmp_path / "data"
        self.local = self.mem = self.server = self.address = None
        self._clients: list = []
        self._shorts: list[str] = []
        self._generation = 0
        self.start()

    def start(self) -> None:
        from memoryd.engine import LocalMemory

        if self.kind == "sharded":     # 2 shards on one catalog, the router in this process
            self.local = _ShardedRig([
                LocalMemory(self.data_dir / f"shard{i}", f"sqlite:///{self.data_dir}/catalog.db",
                            clock=self.clock, reap_interval=None, placement=_placement(i, 2))
                for i in range(2)])
        else:
            self.local = LocalMemory(self.data_dir, clock=self.clock, reap_interval=None)
        if self.kind == "local":
            self.mem = self.local
            return
        from memoryd.daemon.server import create_server

        self._generation += 1
        listen, short = _socket_address(self.tmp_path / f"g{self._generation}")
        (self.tmp_path / f"g{self._generation}").mkdir(exist_ok=True)
        if short:
            self._shorts.append(short)
        self.server, self.address = create_server(self.local, listen)
        _start(self.server)
        self.mem = self.connect(self.CLIENT_NAME)

    def connect(self, client_name: str | None = None):
        from knnlayer.client import MemoryClient

        assert self.kind != "local", "connect() is for the daemon rigs"
        client = MemoryClient(self.address, client_name=client_name)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait(10)
            self.server = None
        for c in self._clients:
            c.close()
        self._clients.clear()
        if self.local is not None:
            self.local.close()
            self.local = None

    def reopen(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        import shutil

        for short in self._shorts:
            shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def clock():
    return FakeClock()


def _placement(i: int, n: int):
    from memoryd.cluster import Placement

    return Placement(i, n)


def _ShardedRig(shards):
    """A ShardedMemory with what tests ask of a LocalMemory: reap_expired (all shards)."""
    from memoryd.cluster import ShardedMemory

    class ShardedRig(ShardedMemory):
        def reap_expired(self) -> int:
            return sum(s.reap_expired() for s in self.shards)

    return ShardedRig(shards)


# The session life cycle runs against a sharded memory too ("sharded": two
# LocalMemory shards on one catalog behind a ShardedMemory, served over gRPC,
# on the fake clock): its cases are kept in these modules only.
SHARDED_RIG_SUITES = {"test_sessions.py", "test_row_stacks.py", "test_stacks.py",
                      "test_tenants.py"}


@pytest.fixture(params=["local", "daemon", "sharded"])
def rig(request, tmp_path, clock):
    if request.param == "sharded" and request.node.path.name not in SHARDED_RIG_SUITES:
        pytest.skip("sharded rig: see SHARDED_RIG_SUITES")
    r = Rig(request.param, tmp_path, clock)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def mem_clock(rig):
    return rig.mem
