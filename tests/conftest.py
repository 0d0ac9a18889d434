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
    from memoryd.local import LocalMemory

    backend = LocalMemory(tmp_path / "data")
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(params=["local", "daemon"])
def mem(request, tmp_path):
    from memoryd.local import LocalMemory

    backend = LocalMemory(tmp_path / "data")
    if request.param == "local":
        try:
            yield backend
        finally:
            backend.close()
        return

    from knnlayer.client import MemoryClient
    from memoryd.server import create_server

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
