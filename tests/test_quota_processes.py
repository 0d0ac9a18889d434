"""Quota races between PROCESSES: several client processes, each with its own
MemoryClient, add to the same banks of one daemon at the same time (on a
SQLite catalog, and on PostgreSQL); and shard processes, each with its own
Catalog(url, shard=i), reserve on slices of the same banks and tenant.

Bank "capped" has a bank quota; bank "shared" has none but its tenant has
one. Every worker adds batches of 1-3 rows to both, in a random order, until
each has refused it a few times, and reports the ids it was acknowledged.
While they run, this process samples the usage. Afterwards: usage never
exceeded either quota; each bank holds exactly the acknowledged ids (no id
twice, none lost, none extra); what the catalog charges is what the bank
holds (and what a probe bank of as many rows costs); the quotas did bind.

The shard race (test_shard_processes_racing_reserves_never_pass_a_quota):
usage never exceeded a quota, and what the catalog charges each slice, each
bank and the tenant is the sum of the reservations accepted (less the
releases) of the processes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import _socket_address, _start
from daemon_util import daemon_env
from memoryd import errors
from memoryd.api import BankSpec
from reference import gaussian

DIM, VDIM = 8, 4
WORKERS = 3

WORKER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from knnlayer.client import MemoryClient
    from memoryd import errors

    address, go, out, seed = sys.argv[1:5]
    rng = np.random.default_rng(int(seed))
    acked = {"capped": [], "shared": []}
    refused = {"capped": 0, "shared": 0}
    with MemoryClient(address, client_name=f"worker-{seed}") as c:
        c.bank_info("capped")                       # connected before the start line
        while not os.path.exists(go):
            time.sleep(0.005)
        while min(refused.values()) < 3:
            bank = "capped" if rng.random() < 0.5 else "shared"
            n = int(rng.integers(1, 4))
            keys = rng.standard_normal((n, 8)).astype(np.float32)
            vals = rng.standard_normal((n, 4)).astype(np.float32)
            try:
                acked[bank] += c.add(bank, keys, vals).tolist()
            except errors.QuotaExceeded:
                refused[bank] += 1
    with open(out, "w") as f:
        json.dump({"acked": acked, "refused": refused}, f)
""")


def costs(mem, n: int) -> int:
    """used_bytes of a probe bank of this spec holding n rows (own tenant, deleted)."""
    if n == 0:
        return 0
    mem.create_bank(BankSpec("probe", dim=DIM, value_dim=VDIM, tenant="probe"))
    mem.add("probe", gaussian(n, DIM, 1), gaussian(n, VDIM, 2))
    used = mem.bank_info("probe").used_bytes
    mem.delete_bank("probe")
    return used


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon(request, tmp_path):
    from memoryd.daemon.server import create_server
    from memoryd.engine import LocalMemory

    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    local = LocalMemory(tmp_path / "data", catalog_url=url, reap_interval=None)
    listen, short = _socket_address(tmp_path)
    server, address = create_server(local, listen)
    _start(server)
    try:
        yield local, address
    finally:
        server.stop(0).wait(10)
        local.close()
        if short:
            import shutil
            shutil.rmtree(short, ignore_errors=True)


def test_client_processes_racing_adds_never_pass_a_quota(daemon, tmp_path):
    local, address = daemon
    one, sixty = costs(local, 1), costs(local, 60)
    row = (sixty - one) // 59                                 # what one more row costs
    assert sixty == one + 59 * row
    bank_quota = sixty + row // 2                             # 60 rows and half of one more
    tenant_quota = costs(local, 45)                           # exactly 45 rows
    local.create_bank(BankSpec("capped", dim=DIM, value_dim=VDIM, quota_bytes=bank_quota))
    local.create_bank(BankSpec("shared", dim=DIM, value_dim=VDIM, tenant="acme"))
    local.set_tenant_quota("acme", tenant_quota)

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    go = tmp_path / "go"
    outs = [tmp_path / f"out{i}.json" for i in range(WORKERS)]
    procs = [subprocess.Popen([sys.executable, str(script), address, str(go), str(out), str(i)],
                              env=daemon_env(), stderr=subprocess.PIPE, text=True)
             for i, out in enumerate(outs)]

    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((local.bank_info("capped").used_bytes,
                            local.tenant_info("acme").used_bytes))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        time.sleep(0.2)
        go.touch()                                            # all of them at once
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
    finally:
        stop.set()
        sampler.join()
        for p in procs:
            if p.poll() is None:
                p.kill()

    reports = [json.loads(out.read_text()) for out in outs]
    for bank, quota in (("capped", bank_quota), ("shared", tenant_quota)):
        acked = np.array(sum((r["acked"][bank] for r in reports), []), np.int64)
        assert len(np.unique(acked)) == len(acked), f"{bank}: an id acknowledged twice"
        held = np.sort(np.concatenate([c.ids for c in local.export(bank)]))
        np.testing.assert_array_equal(held, np.sort(acked), err_msg=bank)
        info = local.bank_info(bank)
        assert info.count == len(acked)
        assert info.used_bytes <= quota
        assert info.used_bytes == costs(local, info.count) == local.engine.bank(bank).nbytes()
        assert quota - info.used_bytes < 3 * row, (bank, info.used_bytes)   # filled up
        assert all(r["refused"][bank] >= 3 for r in reports)  # the quota did bind, for everyone
    assert len(samples) > 10
    assert max(s[0] for s in samples) <= bank_quota
    assert max(s[1] for s in samples) <= tenant_quota
    assert local.bank_info("capped").count <= 60 and local.bank_info("shared").count <= 45
    assert local.tenant_info("acme").used_bytes == local.bank_info("shared").used_bytes
    assert local.tenant_info("default").used_bytes == local.bank_info("capped").used_bytes
    with pytest.raises(errors.QuotaExceeded):                 # still full afterwards
        local.add("shared", gaussian(1, DIM, 5), gaussian(1, VDIM, 6))


# ---- shard processes over one catalog ---------------------------------------------------

SHARDS = (1, 2, 3)                  # the test process holds shard 0 (an empty slice)
BANK_QUOTA, TENANT_QUOTA = 20_000, 30_000

SHARD_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from memoryd import errors
    from memoryd.api import BankSpec
    from memoryd.engine.catalog import Catalog

    url, shard, go, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rng = np.random.default_rng(shard)
    c = Catalog(url, shard=shard)
    for name, quota in (("capped", int(sys.argv[5])), ("open", None)):   # attach a slice
        c.create_bank(BankSpec(name, dim=8, value_dim=4, tenant="acme", quota_bytes=quota),
                      f"{name}-{shard}")
    held = {"capped": [], "open": []}
    accepted = {"capped": 0, "open": 0}
    released = {"capped": 0, "open": 0}
    refused = {"capped": 0, "open": 0}
    while not os.path.exists(go):
        time.sleep(0.002)
    for _ in range(5000):
        if min(refused.values()) >= 3:
            break
        bank = "capped" if rng.random() < 0.5 else "open"
        if held[bank] and rng.random() < 0.15:              # give some back
            n = held[bank].pop(int(rng.integers(len(held[bank]))))
            c.release(bank, n, 1)
            released[bank] += n
            continue
        n = int(rng.integers(1, 400))
        try:
            c.reserve(bank, n, 1)
        except errors.QuotaExceeded:
            refused[bank] += 1
            continue
        held[bank].append(n)
        accepted[bank] += n
    c.close()
    with open(out, "w") as f:
        json.dump({"accepted": accepted, "released": released, "refused": refused,
                   "held": {b: len(v) for b, v in held.items()}}, f)
""")


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/catalog.db"
    return request.getfixturevalue("pg_url")


def test_shard_processes_racing_reserves_never_pass_a_quota(catalog_url, tmp_path):
    from memoryd.engine.catalog import Catalog

    cat = Catalog(catalog_url)                                # shard 0
    cat.create_bank(BankSpec("capped", dim=8, value_dim=4, tenant="acme",
                             quota_bytes=BANK_QUOTA), "capped-0")
    cat.create_bank(BankSpec("open", dim=8, value_dim=4, tenant="acme"), "open-0")
    cat.set_tenant_quota("acme", TENANT_QUOTA)

    script, go = tmp_path / "shard_worker.py", tmp_path / "go"
    script.write_text(SHARD_WORKER)
    outs = {i: tmp_path / f"shard{i}.json" for i in SHARDS}
    procs = [subprocess.Popen([sys.executable, str(script), catalog_url, str(i), str(go),
                               str(outs[i]), str(BANK_QUOTA)],
                              env=daemon_env(), stderr=subprocess.PIPE, text=True)
             for i in SHARDS]

    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((cat.bank("capped").used_bytes, cat.tenant("acme")["used_bytes"]))
            time.sleep(0.002)

    try:
        deadline = time.monotonic() + 60
        while any(len(cat.slices(b)) < 1 + len(SHARDS) for b in ("capped", "open")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.stderr.read() for p in procs if p.poll() is not None]
            time.sleep(0.05)                                  # every slice attached
        sampler = threading.Thread(target=sample)
        sampler.start()
        go.touch()                                            # all of them at once
        try:
            for p in procs:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0, err
        finally:
            stop.set()
            sampler.join()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    try:
        reports = {i: json.loads(outs[i].read_text()) for i in SHARDS}
        total = {}
        for bank in ("capped", "open"):
            slices = {s["shard"]: s for s in cat.slices(bank)}
            assert set(slices) == {0, *SHARDS}
            assert slices[0]["used_bytes"] == slices[0]["count"] == 0
            for i, r in reports.items():                      # each slice: what its process kept
                assert slices[i]["used_bytes"] == r["accepted"][bank] - r["released"][bank]
                assert slices[i]["count"] == r["held"][bank]
                assert r["refused"][bank] >= 3                # the quota did bind, for everyone
            info = cat.bank(bank)
            total[bank] = sum(r["accepted"][bank] - r["released"][bank] for r in reports.values())
            assert info.used_bytes == total[bank]
            assert info.count == sum(r["held"][bank] for r in reports.values())
        assert total["capped"] <= BANK_QUOTA
        assert cat.tenant("acme")["used_bytes"] == total["capped"] + total["open"] <= TENANT_QUOTA
        assert len(samples) > 10
        assert max(s[0] for s in samples) <= BANK_QUOTA
        assert max(s[1] for s in samples) <= TENANT_QUOTA
        room = TENANT_QUOTA - total["capped"] - total["open"]  # the tenant's exact boundary
        with pytest.raises(errors.QuotaExceeded):
            cat.reserve("open", room + 1, 1)
        cat.reserve("open", room, 1)
        assert cat.tenant("acme")["used_bytes"] == TENANT_QUOTA
    finally:
        cat.close()
