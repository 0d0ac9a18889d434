"""Both metrics through every reply path of the daemon, against brute force.

The reply-path tests (test_search_unary.py, test_reply_buffers.py) compare
the daemon with LocalMemory on l2 banks only; here each of the three ways a
search reply travels is checked for l2 AND ip against a float64 brute-force
top-k (not against the backend itself): best first in the metric's
direction, the metric's padding (+inf for l2, -inf for ip, id -1, bank -1,
zero values) where a stack holds fewer than k rows, merged over two banks
and over per-row stacks.

    stream   Search (server streaming), the client's SearchOne switched off
    unary    SearchOne, the reply inline in one message
    shm      SearchOne, the reply in a shared-memory reply buffer (offsets only)
"""
from __future__ import annotations

import numpy as np
import pytest

from knnlayer.client import MemoryClient
from memoryd.api import BankSpec, RowStacks
from memoryd.daemon import server as daemon_server
from memoryd.engine import LocalMemory
from memoryd.wire import reply_pool, shm
from reference import assert_scores_close, empty_score, gaussian, topk_union

DIM, VDIM = 16, 4
METRICS = ["l2", "ip"]
PATHS = ["stream", "unary", "shm"]


@pytest.fixture
def world(tmp_path):
    """LocalMemory with, per metric, banks big (40 rows, 2 shards) and small (3 rows)."""
    local = LocalMemory(tmp_path / "data", reap_interval=None)
    data = {}
    for metric in METRICS:
        for name, n, shards, seed in (("big", 40, 2, 1), ("small", 3, 1, 2)):
            full = f"{name}-{metric}"
            local.create_bank(BankSpec(full, dim=DIM, value_dim=VDIM, metric=metric, shards=shards))
            keys, vals = gaussian(n, DIM, seed), gaussian(n, VDIM, seed + 10)
            local.add(full, keys, vals, ids=np.arange(n))
            data[full] = (keys, vals)
    servers, clients = [], []

    def client(path: str, monkeypatch) -> MemoryClient:
        if path == "shm":
            monkeypatch.setattr(reply_pool, "MIN_REPLY_BYTES", 1)   # small replies too
            buffers = shm.ReplyBuffers(tmp_path)
        else:
            buffers = shm.ReplyBuffers(None)
        server, address = daemon_server.create_server(
            local, f"unix://{tmp_path}/s{len(servers)}.sock", buffers=buffers)
        servers.append(server)
        c = MemoryClient(address)
        c.calls = []
        one, stream = c._search_unary, c._search_stream
        c._search_unary = lambda r, o: c.calls.append("one") or one(r, o)
        c._search_stream = lambda r, o: c.calls.append("stream") or stream(r, o)
        if path == "stream":
            c._route.unary = False
        clients.append(c)
        return c

    try:
        yield data, client
    finally:
        for s in servers:
            s.stop(0).wait(10)
        for c in clients:
            c.close()
        local.close()


def expected(data, stack, q, k, metric):
    """(ids, bank, scores float64, values) of the exact top-k over a stack of bank names."""
    sets = [data[name] for name in stack]
    bank, pos, sc = topk_union([s[0] for s in sets], q, k, metric)
    ids = np.where(pos >= 0, pos, -1)                    # ids are 0..n-1 in every bank
    vals = np.zeros((*ids.shape, VDIM), np.float32)
    for b, (_, v) in enumerate(sets):
        sel = bank == b
        vals[sel] = v[pos[sel]]
    return ids, bank, sc, vals


def check(res, want, rows=slice(None)):
    ids, bank, sc, vals = want
    np.testing.assert_array_equal(res.ids[rows], ids)
    np.testing.assert_array_equal(res.bank[rows], bank)
    assert_scores_close(res.scores[rows], sc)
    np.testing.assert_array_equal(res.values[rows], vals)
    np.testing.assert_array_equal(res.mask[rows], ids >= 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", METRICS)
def test_every_reply_path_gives_the_exact_top_k(world, monkeypatch, metric, path):
    data, client = world
    c = client(path, monkeypatch)
    placed = []
    if path == "shm":
        read = shm.MappedReplyBuffer.read
        monkeypatch.setattr(shm.MappedReplyBuffer, "read",
                            lambda self, p: placed.append(p) or read(self, p))
    big, small = f"big-{metric}", f"small-{metric}"
    q = gaussian(9, DIM, 3)
    cases = [([big], 5),                    # k < bank: the merge over its 2 shards
             ([small], 6),                  # k > bank: padding
             ([small, big], 7),             # two banks: one merged top-k
             ([small, big], 50)]            # more than both hold: padding after the merge
    for _ in range(2):                      # the first with values streams (bytes unknown)
        for stack, k in cases:
            res = c.search(stack, q, k, values=True)
            check(res, expected(data, stack, q, k, metric))
            pad = res.ids < 0
            assert (res.scores[pad] == empty_score(metric)).all()
            assert (res.bank[pad] == -1).all() and (res.values[pad] == 0).all()
            if metric == "ip":              # best first, largest first
                assert (np.diff(res.scores[~pad.any(1)], axis=1) <= 0).all()
            else:
                assert (np.diff(res.scores[~pad.any(1)], axis=1) >= 0).all()
    # per-row stacks: group 0 searches [small], group 1 [big, small], group 2 [big]
    rs = RowStacks([[small], [big, small], [big]], [3, 4, 2])
    for _ in range(2):
        res = c.search(rs, q, 6, values=True)
        for stack, rows in (([small], slice(0, 3)), ([big, small], slice(3, 7)),
                            ([big], slice(7, 9))):
            check(res, expected(data, stack, q[rows], 6, metric), rows)
    if path == "stream":
        assert set(c.calls) == {"stream"}
    else:
        assert c.calls.count("one") >= 5, c.calls   # after the first reply of each stack
    if path == "shm":
        assert placed and c.reply_buffers == "shared memory"
