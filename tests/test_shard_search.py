"""The shard-level seam (api.ShardSearch): a bank's pieces answer a search in
one call each, payload included, so a piece in another process is one round
trip. Shown with pieces that are daemons: the engine's stack search over
them equals one bank holding all their rows."""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from knnlayer.client import MemoryClient
from memoryd.api import BankQuery, BankSpec, ShardSearch
from memoryd.daemon.server import create_server
from memoryd.engine import LocalMemory
from memoryd.engine.searching import StackEntry, search_stack


class RemoteShard:
    """A ShardSearch that is a bank in another memoryd: one RPC per search."""

    def __init__(self, client: MemoryClient, bank: str):
        self.client, self.bank, self.calls = client, bank, 0

    def search(self, queries, k, *, values, keys):
        self.calls += 1
        return self.client.search(self.bank, queries, k, values=values, keys=keys)


def unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def short_dir():
    import shutil
    import tempfile
    from pathlib import Path

    d = tempfile.mkdtemp(prefix="mdss")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemons(tmp_path, short_dir):
    backends, servers, clients = [], [], []
    for i in range(3):
        backends.append(LocalMemory(tmp_path / f"d{i}"))
        server, address = create_server(backends[-1], f"unix://{short_dir}/d{i}.sock")
        servers.append(server)
        clients.append(MemoryClient(address))
    yield backends, clients
    for s in servers:
        s.stop(0).wait(5)
    for c in clients:
        c.close()
    for b in backends:
        b.close()


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [5, 60])                      # 60 > all rows: -1 padding
def test_remote_shards_equal_one_bank(daemons, tmp_path, metric, k):
    (b0, b1, whole), (c0, c1, _) = daemons
    rng = np.random.default_rng(3)
    keys, vals = unit(rng, 50, 16), rng.standard_normal((50, 4), dtype=np.float32)
    ids = rng.permutation(1000)[:50].astype(np.int64)
    for mem, sel in ((b0, slice(0, 20)), (b1, slice(20, 50)), (whole, slice(0, 50))):
        mem.create_bank(BankSpec("part", dim=16, value_dim=4, metric=metric))
        mem.add("part", keys[sel], vals[sel], ids=ids[sel])
    q = unit(rng, 7, 16)
    pieces = [RemoteShard(c0, "part"), RemoteShard(c1, "part")]
    assert all(isinstance(p, ShardSearch) for p in pieces)
    with cf.ThreadPoolExecutor(2) as pool:
        got = search_stack([StackEntry(0, BankQuery("part"), pieces)], q, k, metric,
                           np.dtype(np.float32), 4, True, pool)
    want = whole.search("part", q, k, values=True, keys=True)
    assert [p.calls for p in pieces] == [1, 1]                   # one round trip each
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.bank, want.bank)
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.keys, want.keys)


def test_local_pieces_are_shard_searchers(tmp_path):
    with LocalMemory(tmp_path) as mem:
        mem.create_bank(BankSpec("s", dim=8, value_dim=2, shards=3))
        mem.create_bank(BankSpec("pk", dim=8, value_dim=2, index="product-keys:3"))
        pieces = mem.engine.bank("s").searchers() + mem.engine.bank("pk").searchers()
    assert len(pieces) == 4 and all(isinstance(p, ShardSearch) for p in pieces)
