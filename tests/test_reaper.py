"""The background session reaper, run for real (no test calls reap_expired()):
an expired session's bank is deleted by the reaper thread, its bytes go back
to its tenant, its catalog rows and its folder are gone; sessions still alive
are left alone.

    LocalMemory(reap_interval=0.05) on a FakeClock, in process and behind an
        in-process gRPC server (MemoryClient), and
    `memoryd serve` (a subprocess: real clock, its default 1 s reap interval).
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FakeClock, _socket_address, _start, unique_name
from daemon_util import start_daemon, stop_daemon, daemon_log
from knnlayer.client import MemoryClient
from memoryd import errors
from memoryd.api import BankSpec, SessionSpec
from reference import gaussian

DIM, VDIM = 8, 4


def wait_until(pred, timeout: float = 10.0, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def bank_gone(mem, name: str) -> bool:
    try:
        mem.bank_info(name)
    except errors.NotFound:
        return True
    return False


def folders(data_dir: Path, name: str) -> list[Path]:
    return list((data_dir / "banks").glob(f"{name}-*"))


def reaped(mem, data_dir: Path, name: str) -> bool:
    """The bank is out of the catalog and its folder off the disk (the reaper
    drops the catalog row first, then the files)."""
    return bank_gone(mem, name) and not folders(data_dir, name)


def catalog_rows(db: Path, sid: str) -> tuple[int, int]:
    """(rows in the sessions table, rows in the banks table) for sid, read-only."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as c:
        s = c.execute("SELECT count(*) FROM sessions WHERE id = ?", (sid,)).fetchone()[0]
        b = c.execute("SELECT count(*) FROM banks WHERE name = ?", (sid,)).fetchone()[0]
    return int(s), int(b)


@pytest.fixture(params=["local", "daemon"])
def reaping(request, tmp_path):
    """(LocalMemory with a 50 ms reaper on a FakeClock, the backend under test, clock)."""
    from memoryd.daemon.server import create_server
    from memoryd.engine import LocalMemory

    clock = FakeClock()
    local = LocalMemory(tmp_path / "data", clock=clock, reap_interval=0.05)
    server = client = None
    short = None
    try:
        if request.param == "local":
            yield local, local, clock
        else:
            listen, short = _socket_address(tmp_path)
            server, address = create_server(local, listen)
            _start(server)
            client = MemoryClient(address)
            yield local, client, clock
    finally:
        if server is not None:
            server.stop(0).wait(10)
        if client is not None:
            client.close()
        local.close()
        if short:
            import shutil
            shutil.rmtree(short, ignore_errors=True)


def test_the_reaper_thread_deletes_expired_sessions(reaping, make_bank):
    local, mem, clock = reaping
    t = unique_name("t")
    keep = make_bank(mem, dim=DIM, value_dim=VDIM, tenant=t).name
    mem.add(keep, gaussian(5, DIM, 1), gaussian(5, VDIM, 2))
    base = mem.tenant_info(t).used_bytes
    idle = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t,
                                        ttl_idle_s=10)).session_id
    absolute = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t,
                                            ttl_absolute_s=30)).session_id
    forever = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant=t)).session_id
    for i, sid in enumerate((idle, absolute, forever)):
        mem.append(sid, gaussian(4, DIM, 10 + i), gaussian(4, VDIM, 20 + i), scores=np.ones(4))
    cost = {sid: mem.session_info(sid).bank.used_bytes for sid in (idle, absolute, forever)}
    assert all(c > 0 for c in cost.values())
    assert mem.tenant_info(t).used_bytes == base + sum(cost.values())
    for sid in (idle, absolute, forever):
        assert len(folders(local.data_dir, sid)) == 1
    time.sleep(0.3)                                       # several passes: nothing expired yet
    assert mem.tenant_info(t).sessions == 3

    clock.advance(11)                                     # idle's deadline passed
    assert wait_until(lambda: reaped(mem, local.data_dir, idle)), "the reaper never dropped it"
    assert mem.tenant_info(t).used_bytes == base + cost[absolute] + cost[forever]
    assert mem.tenant_info(t).sessions == 2
    assert local.catalog.session(idle) is None
    assert idle not in [b.name for b in mem.list_banks()]
    assert folders(local.data_dir, idle) == []
    with pytest.raises(errors.NotFound):
        mem.session_info(idle)
    for sid in (absolute, forever):                       # the others are untouched
        assert mem.session_info(sid).bank.count == 4

    clock.advance(20)                                     # 31 s after opening: absolute's
    assert wait_until(lambda: reaped(mem, local.data_dir, absolute))
    assert mem.tenant_info(t).used_bytes == base + cost[forever]
    assert local.catalog.session(absolute) is None and folders(local.data_dir, absolute) == []
    assert catalog_rows(local.data_dir / "catalog.db", absolute) == (0, 0)
    # a session without TTLs and a plain bank outlive any time
    clock.advance(10**6)
    time.sleep(0.3)
    assert mem.session_info(forever).bank.count == 4 and mem.bank_info(keep).count == 5
    assert [s.session_id for s in mem.list_sessions(t)] == [forever]
    assert mem.tenant_info(t).used_bytes == base + cost[forever]
    assert sum(b.used_bytes for b in mem.list_banks(t)) == mem.tenant_info(t).used_bytes


def test_use_keeps_a_session_from_the_reaper(reaping):
    local, mem, clock = reaping
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM, ttl_idle_s=10)).session_id
    mem.append(sid, gaussian(3, DIM, 1), gaussian(3, VDIM, 2))
    for _ in range(5):                                    # 40 s in all, never 10 idle
        clock.advance(8)
        mem.search(sid, gaussian(1, DIM, 3), 1)
        time.sleep(0.12)                                  # passes of the reaper in between
        assert not bank_gone(mem, sid)
    clock.advance(10)
    assert wait_until(lambda: reaped(mem, local.data_dir, sid))
    assert mem.tenant_info("default").used_bytes == 0 and folders(local.data_dir, sid) == []


def test_memoryd_serve_reaps_expired_sessions(tmp_path):
    """The real daemon (real clock, default reap interval): a session with a
    0.5 s idle TTL is gone within seconds, bytes, catalog rows and folder too."""
    import tempfile
    data = Path(tempfile.mkdtemp(prefix="mdr-")) / "data"    # short: an AF_UNIX path
    proc, address = start_daemon(data)
    try:
        with MemoryClient(address) as c:
            c.create_bank(BankSpec("kept", dim=DIM, value_dim=VDIM, tenant="acme"))
            c.add("kept", gaussian(3, DIM, 1), gaussian(3, VDIM, 2))
            base = c.tenant_info("acme").used_bytes
            sid = c.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant="acme",
                                             ttl_idle_s=0.5)).session_id
            live = c.open_session(SessionSpec(dim=DIM, value_dim=VDIM, tenant="acme",
                                              ttl_idle_s=3600)).session_id
            for s in (sid, live):
                c.append(s, gaussian(6, DIM, 3), gaussian(6, VDIM, 4))
            live_cost = c.session_info(live).bank.used_bytes
            assert c.tenant_info("acme").used_bytes == base + 2 * live_cost
            assert len(folders(data, sid)) == 1
            assert wait_until(lambda: reaped(c, data, sid), timeout=15), daemon_log(proc)
            assert c.tenant_info("acme").used_bytes == base + live_cost
            assert c.tenant_info("acme").sessions == 1
            assert folders(data, sid) == []
            assert catalog_rows(data / "catalog.db", sid) == (0, 0)
            assert catalog_rows(data / "catalog.db", live) == (1, 1)
            assert c.session_info(live).bank.count == 6
    finally:
        assert stop_daemon(proc) == 0, daemon_log(proc)
        import shutil
        shutil.rmtree(data.parent, ignore_errors=True)
