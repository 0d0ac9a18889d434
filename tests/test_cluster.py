"""A real local cluster (tests/cluster_util.py): shard processes on one
PostgreSQL catalog, routers in front. What only processes can show:

  * a shard killed: searches and writes that need it are UNAVAILABLE naming
    it (default), or flagged partial from a router run with --partial-results;
    calls that do not need it go on; restarted, every acknowledged row is back;
  * quota reservations from several client processes through two routers at
    once never take a bank past its quota;
  * sessions are pinned to one shard, and the model-side API is unchanged.
"""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from knnlayer.client import MemoryClient
from memoryd import errors
from memoryd.api import BankSpec, SessionSpec
from memoryd.cluster.placement import session_shard

DIM = 16


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster_util import LocalCluster
    from pg_util import fresh_database

    with fresh_database() as url:
        c = LocalCluster(tmp_path_factory.mktemp("cl"), url, shards=3)
        try:
            partial = f"127.0.0.1:{__import__('cluster_util').free_port()}"
            c.partial_router = c._spawn("router-partial", [
                "route", "--listen", partial, "--shards", ",".join(c.shard_addresses),
                "--partial-results", "--shard-timeout", "10", "--grace", "1"])
            c._wait(c.partial_router, partial)
            c.partial_address = partial
            yield c
        finally:
            c.partial_router.terminate()
            c.partial_router.wait(20)
            c.close()


def test_a_killed_shard_is_unavailable_then_restarted_with_its_data(cluster):
    rng = np.random.default_rng(0)
    with MemoryClient(cluster.address) as mem, MemoryClient(cluster.partial_address) as part:
        mem.create_bank(BankSpec("kill", dim=DIM, value_dim=4))
        keys = rng.standard_normal((3000, DIM)).astype(np.float32)
        vals = rng.standard_normal((3000, 4)).astype(np.float32)
        ids = mem.add("kill", keys, vals, ids=np.arange(3000), ack="durable")
        q = keys[:5]
        whole = mem.search("kill", q, 8)
        assert (whole.ids[:, 0] == np.arange(5)).all()
        ranked = mem.search("kill", q, 3000, values=False).ids     # every row, best first
        others = np.stack([row[row % 3 != 1][:8] for row in ranked])  # the best off shard 1
        cluster.kill(1)
        try:
            with pytest.raises(errors.Unavailable, match=r"shard 1 \("):
                mem.search("kill", q, 8)
            with pytest.raises(errors.Unavailable):
                mem.add("kill", keys[:10], vals[:10], ids=np.arange(5000, 5010))
            # the ids of shards 0 and 2 are still written and read
            assert mem.get("kill", [0, 2, 3, 5]).found.all()
            r = part.search("kill", q, 8)
            assert r.missing_shards == (1,)
            assert (r.ids % 3 != 1).all() and (r.ids >= 0).all()
            np.testing.assert_array_equal(r.ids, others)
            assert mem.get("kill", [5001, 5003]).found.tolist() == [False, False]  # undone
        finally:
            cluster.restart(1)
        back = _eventually(lambda: mem.search("kill", q, 8, keys=True))   # router redials
        np.testing.assert_array_equal(back.ids, whole.ids)
        np.testing.assert_array_equal(mem.get("kill", ids).values, vals)
        assert mem.bank_info("kill").count == 3000
        assert part.search("kill", q, 8).missing_shards == ()


def _eventually(call, timeout: float = 10.0):
    """call() once the router has dialled the restarted shard again (<= 1 s backoff)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _reserver(address: str, bank: str, n: int, out) -> None:
    ok = 0
    with MemoryClient(address) as mem:
        for _ in range(n):
            try:
                mem.add(bank, np.ones((7, DIM), np.float32))
                ok += 7
            except errors.QuotaExceeded:
                pass
    out.put(ok)


def test_concurrent_reservations_from_processes_never_pass_the_quota(cluster):
    with MemoryClient(cluster.address) as mem:
        mem.create_bank(BankSpec("race", dim=DIM))
        row = 8 + 4 * DIM
        base = mem.bank_info("race").used_bytes
        mem.set_quota("race", base + 100 * row)      # room for 100 rows: 14 adds of 7
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_reserver,
                             args=(a, "race", 8, out))
                 for a in (cluster.address, cluster.partial_address) * 2]
        for p in procs:
            p.start()
        accepted = sum(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
        info = mem.bank_info("race")
        assert accepted == info.count <= 100
        assert accepted >= 98 - 6                     # it filled up (14 adds of 7 = 98)
        assert info.used_bytes <= info.spec.quota_bytes
        assert info.used_bytes == base + info.count * row


def test_sessions_are_pinned_to_one_shard(cluster):
    with MemoryClient(cluster.address) as mem:
        mem.create_bank(BankSpec("base-s", dim=DIM, value_dim=2))
        mem.add("base-s", np.eye(DIM, dtype=np.float32)[:8] * 3, np.zeros((8, 2), np.float32))
        sids = [mem.open_session(SessionSpec(dim=DIM, value_dim=2)).session_id for _ in range(4)]
        homes = [session_shard(s, 3) for s in sids]
        assert len(set(homes)) >= 2
        for s in sids:
            mem.append(s, np.ones((2, DIM), np.float32), np.ones((2, 2), np.float32))
            r = mem.search([s, "base-s"], np.ones((1, DIM), np.float32), 3)
            assert r.bank[0, :2].tolist() == [0, 0]          # read-your-writes, via the router
        on_shard = {}
        for i, a in enumerate(cluster.shard_addresses):
            with MemoryClient(a) as shard:
                on_shard[i] = {x.session_id for x in shard.list_sessions()}
        for s, h in zip(sids, homes):
            assert s in on_shard[h] and all(s not in on_shard[i] for i in on_shard if i != h)
        assert {x.session_id for x in mem.list_sessions()} >= set(sids)
        for s in sids:
            mem.close_session(s)


def test_tokens_pass_through_the_router_to_shards_that_check_them(tmp_path):
    """The first admin token is made on the cluster's catalog alone (no data dir,
    no daemon); shards run --auth; the router forwards each caller's own token."""
    from click.testing import CliRunner
    from cluster_util import LocalCluster
    from memctl.cli import main as memctl
    from pg_util import fresh_database

    with fresh_database() as url:
        made = CliRunner().invoke(memctl, ["--catalog-url", url, "token", "create", "--admin"])
        assert made.exit_code == 0, made.output
        admin = made.stdout.strip()
        with LocalCluster(tmp_path / "auth", url, shards=2, shard_args=("--auth",)) as c:
            with MemoryClient(c.address) as anon:
                with pytest.raises(errors.Unauthenticated):
                    anon.list_banks()
            with MemoryClient(c.address, token=admin) as root:
                acme = root.create_token(tenant="acme", role="write").token
                other = root.create_token(tenant="other", role="write").token
            with MemoryClient(c.address, token=acme) as a, MemoryClient(c.address, token=other) as o:
                a.create_bank(BankSpec("acme-docs", dim=DIM, tenant="acme"))
                a.add("acme-docs", np.ones((5000, DIM), np.float32))   # lands on both shards
                assert a.bank_info("acme-docs").count == 5000
                with pytest.raises(errors.NotFound):
                    o.search("acme-docs", np.ones((1, DIM), np.float32), 1)
                with pytest.raises(errors.PermissionDenied):
                    o.create_bank(BankSpec("x", dim=DIM, tenant="acme"))
                assert [b.name for b in o.list_banks()] == []


def test_a_cluster_catalog_is_not_opened_as_a_single_process(cluster, tmp_path):
    from memoryd.engine import LocalMemory

    with MemoryClient(cluster.address) as mem:
        mem.create_bank(BankSpec("everywhere", dim=DIM))      # a slice on each shard
    with pytest.raises(errors.FailedPrecondition, match="cluster of at least 3 shards"):
        LocalMemory(tmp_path / "alone", cluster.catalog_url)
