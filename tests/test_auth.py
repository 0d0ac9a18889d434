"""Auth, through a real daemon: tokens (UNAUTHENTICATED / PERMISSION_DENIED) and
tenant isolation of banks, sessions and reply buffers (the transport's side,
socket modes and TLS, is tests/test_transport_security.py).

One `memoryd serve --auth` subprocess serves most tests (module fixture); its
first admin token is made on the data dir before it starts, as an operator
does. Tenants "acme" and "umbrella" each get a write token; "acme" also a
read-only one.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from daemon_util import daemon_log, start_daemon, stop_daemon
from knnlayer.client import MemoryClient
from memoryd import errors
from memoryd.api import BankQuery, BankSpec, RowStacks, SessionSpec

DIM, DV = 8, 4
rng = np.random.default_rng(0)


def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
    k = rng.standard_normal((n, DIM)).astype(np.float32)
    return k, rng.standard_normal((n, DV)).astype(np.float32)


class Daemon:
    def __init__(self, data_dir: Path):
        from memoryd.engine import LocalMemory

        with LocalMemory(data_dir, reap_interval=None) as local:   # bootstrap, daemon stopped
            self.admin_token = local.create_token(role="admin", name="ops").token
        self.data_dir = data_dir
        self.proc, self.address = start_daemon(data_dir, "--auth")
        self._clients: list[MemoryClient] = []
        self.admin = self.client(self.admin_token)
        self.acme_token = self.admin.create_token("acme", "write", "acme-rw").token
        self.acme_ro_token = self.admin.create_token("acme", "read", "acme-ro").token
        self.umbrella_token = self.admin.create_token("umbrella", name="umbrella-rw").token
        self.acme, self.acme_ro = self.client(self.acme_token), self.client(self.acme_ro_token)
        self.umbrella = self.client(self.umbrella_token)

    def client(self, token: str | None, **kw) -> MemoryClient:
        c = MemoryClient(self.address, token=token, **kw)
        self._clients.append(c)
        return c

    def close(self) -> int:
        for c in self._clients:
            c.close()
        return stop_daemon(self.proc)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("auth") / "data")
    try:
        yield d
    finally:
        assert d.close() == 0, daemon_log(d.proc)[-3000:]


_n = iter(range(10**6))


def bank_of(mem, **kw) -> str:
    name = f"sec{os.getpid() % 10000}-{next(_n)}"
    mem.create_bank(BankSpec(name, dim=DIM, value_dim=DV, **kw))
    return name


# ---- authentication --------------------------------------------------------------------

def test_a_call_without_a_token_is_unauthenticated_but_health_answers(daemon):
    from memoryd.daemon.server import health_status

    anonymous = daemon.client(None)
    for call in (anonymous.list_banks, anonymous.stats, anonymous.list_sessions,
                 lambda: anonymous.create_bank(BankSpec("x", dim=4)), anonymous.ping):
        with pytest.raises(errors.Unauthenticated, match="no token"):
            call()
    assert health_status(daemon.address) == "SERVING"     # probes need no token


def test_bad_tokens_are_unauthenticated(daemon):
    good = daemon.acme_token
    token_id = good.split("_")[1]
    wrong_secret = f"mdt_{token_id}_{'0' * 64}"
    unknown_id = f"mdt_{'0' * 12}_{good.split('_')[2]}"
    for token in ("nope", good[:-1], wrong_secret, unknown_id):
        with pytest.raises(errors.Unauthenticated, match="invalid"):
            daemon.client(token).list_banks()
    assert daemon.client(good).list_banks() is not None


def test_a_revoked_token_is_refused_within_the_cache_ttl(daemon):
    created = daemon.admin.create_token("acme", "write", "short-lived")
    mem = daemon.client(created.token)
    mem.list_banks()
    info = daemon.admin.revoke_token(created.info.id)
    assert info.revoked_at is not None
    deadline = time.monotonic() + 5
    while True:                                           # the daemon caches rows for 1 s
        try:
            mem.list_banks()
        except errors.Unauthenticated:
            break
        assert time.monotonic() < deadline, "a revoked token still works after 5 s"
        time.sleep(0.1)
    assert time.monotonic() - (deadline - 5) < 2.5
    listed = {t.id: t for t in daemon.admin.list_tokens("acme")}
    assert listed[created.info.id].revoked_at is not None


def test_tokens_are_stored_hashed(daemon):
    import hashlib

    created = daemon.admin.create_token("acme", "read", "hash-check")
    secret = created.token.split("_")[2]
    blob = b"".join(p.read_bytes() for p in daemon.data_dir.glob("catalog.db*"))
    assert secret.encode() not in blob and created.token.encode() not in blob
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in blob
    for t in daemon.admin.list_tokens():
        assert not hasattr(t, "token") and "secret" not in str(t.to_dict())


# ---- rights ----------------------------------------------------------------------------

def test_a_read_only_token_reads_but_cannot_write(daemon):
    name = bank_of(daemon.acme)
    k, v = rows(10)
    daemon.acme.add(name, k, v)
    ro = daemon.acme_ro
    assert ro.search([name], k[:2], k=3).ids.shape == (2, 3)
    assert ro.get(name, [0]).found.tolist() == [True]
    assert name in [b.name for b in ro.list_banks()]
    assert sum(len(c.ids) for c in ro.export(name)) == 10
    for call in (lambda: ro.add(name, k, v), lambda: ro.update_values(name, [0], v[:1]),
                 lambda: ro.remove(name, [0]), lambda: ro.delete_bank(name),
                 lambda: ro.freeze_bank(name), lambda: ro.set_quota(name, 10**9),
                 lambda: ro.create_bank(BankSpec("ro-new", dim=4)),
                 lambda: ro.open_session(SessionSpec(dim=DIM))):
        with pytest.raises(errors.PermissionDenied, match="write right"):
            call()
    assert daemon.acme.bank_info(name).count == 10


def test_only_an_admin_sets_tenant_quotas_and_manages_tokens(daemon):
    info = daemon.admin.set_tenant_quota("acme", 10**9)
    assert info.quota_bytes == 10**9
    for mem in (daemon.acme, daemon.acme_ro, daemon.umbrella):
        for call in (lambda: mem.set_tenant_quota("acme", 10**12),
                     lambda: mem.create_token("acme", "write"), mem.list_tokens,
                     lambda: mem.revoke_token("0" * 12)):
            with pytest.raises(errors.PermissionDenied, match="admin right"):
                call()
    assert daemon.admin.tenant_info("acme").quota_bytes == 10**9
    daemon.admin.set_tenant_quota("acme", None)
    # an admin acts on every tenant: creates, reads and deletes umbrella's banks
    name = bank_of(daemon.admin, tenant="umbrella")
    assert daemon.umbrella.bank_info(name).spec.tenant == "umbrella"
    assert name in [b.name for b in daemon.admin.list_banks()]
    daemon.admin.delete_bank(name)


# ---- isolation -------------------------------------------------------------------------

def test_a_tenant_cannot_touch_another_tenants_banks(daemon):
    a, b = daemon.acme, daemon.umbrella
    mine, theirs = bank_of(a), bank_of(b)
    k, v = rows(20)
    a.add(mine, k, v)
    b.add(theirs, k, v)
    assert a.bank_info(mine).spec.tenant == "acme"       # "default" means the token's tenant
    missing = f"nope-{next(_n)}"
    with pytest.raises(errors.NotFound) as absent:
        a.bank_info(missing)
    assert str(absent.value) == f"no bank named '{missing}'"

    calls = {
        "info": lambda: a.bank_info(theirs),
        "search": lambda: a.search([theirs], k[:2], k=3),
        "search a stack": lambda: a.search([mine, BankQuery(theirs, k=2)], k[:2], k=3),
        "row stacks": lambda: a.search(RowStacks(stacks=[[mine], [theirs]], rows=[1, 1]),
                                       k[:2], k=3),
        "get": lambda: a.get(theirs, [0, 1]),
        "export": lambda: list(a.export(theirs)),
        "add": lambda: a.add(theirs, k, v),
        "update": lambda: a.update_values(theirs, [0], v[:1]),
        "remove": lambda: a.remove(theirs, [0, 1]),
        "delete": lambda: a.delete_bank(theirs),
        "freeze": lambda: a.freeze_bank(theirs),
        "resize": lambda: a.set_quota(theirs, 1),
        "tier": lambda: a.set_tier(theirs, "mmap"),
        "read-only info": lambda: daemon.acme_ro.bank_info(theirs),
    }
    for what, call in calls.items():
        with pytest.raises(errors.NotFound) as e:
            call()
        assert str(e.value) == f"no bank named '{theirs}'", what   # as if it did not exist

    assert theirs not in [x.name for x in a.list_banks()]
    assert {x.spec.tenant for x in a.list_banks()} == {"acme"}
    with pytest.raises(errors.PermissionDenied):
        a.list_banks("umbrella")
    with pytest.raises(errors.PermissionDenied):
        a.create_bank(BankSpec("for-umbrella", dim=4, tenant="umbrella"))
    with pytest.raises(errors.PermissionDenied):
        a.tenant_info("umbrella")
    assert [t.name for t in a.list_tenants()] == ["acme"]
    b.search([theirs], k[:1], k=1)                     # umbrella's search shows in stats...
    st = a.stats()
    assert {x.spec.tenant for x in st.banks} == {"acme"}
    assert [t.name for t in st.tenants] == ["acme"]
    assert all(theirs not in u.banks for u in st.stacks)   # ...but not to acme
    assert st.data_dir == "" and st.catalog_url == ""
    info = b.bank_info(theirs)                         # untouched by all of the above
    assert (info.count, info.frozen, info.spec.tier, info.spec.quota_bytes) == (20, False,
                                                                              "ram", None)


def test_a_session_is_the_tenants_that_opened_it(daemon):
    a, b = daemon.acme, daemon.umbrella
    k, v = rows(6)
    sb = b.open_session(SessionSpec(dim=DIM, value_dim=DV)).session_id
    b.append(sb, k, v, scores=np.ones(6))
    sa = a.open_session(SessionSpec(dim=DIM, value_dim=DV)).session_id
    a.append(sa, k, v)
    assert a.session_info(sa).tenant == "acme"
    target_a, target_b = bank_of(a), bank_of(b)

    calls = {
        "info": lambda: a.session_info(sb),
        "append": lambda: a.append(sb, k, v),
        "extend": lambda: a.extend_session(sb, ttl_idle_s=60),
        "close": lambda: a.close_session(sb),
        "promote": lambda: a.promote_session(sb, target_a),
    }
    for what, call in calls.items():
        with pytest.raises(errors.NotFound) as e:
            call()
        assert str(e.value) == f"no session '{sb}'", what
    for what, call in {"search": lambda: a.search([sb], k[:1], k=2),
                       "get": lambda: a.get(sb, [0]),
                       "export": lambda: list(a.export(sb)),
                       "delete its bank": lambda: a.delete_bank(sb),
                       "promote into theirs": lambda: a.promote_session(sa, target_b)}.items():
        with pytest.raises(errors.NotFound, match="no bank named"):
            call()
    assert [s.session_id for s in a.list_sessions()] == [sa]
    with pytest.raises(errors.PermissionDenied):
        a.list_sessions("umbrella")
    with pytest.raises(errors.PermissionDenied):
        a.open_session(SessionSpec(dim=DIM, tenant="umbrella"))
    assert b.session_info(sb).bank.count == 6          # untouched
    assert b.promote_session(sb, target_b).promoted == 6
    assert a.promote_session(sa, target_a).promoted == 6


def test_a_reply_buffer_serves_only_the_token_that_opened_it(daemon):
    from memoryd.wire import search as search_wire
    from memoryd.wire.tensors import encode

    name = bank_of(daemon.acme)
    k, v = rows(50)
    daemon.acme.add(name, k, v)
    try:
        buf = daemon.acme._open_reply_buffer(1 << 20)
    except errors.FailedPrecondition:
        pytest.skip("this host offers no reply buffers (no /dev/shm)")
    path = Path(buf.path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 & ~_umask()   # the daemon's user only

    def search(mem):
        req = search_wire.request([BankQuery(name)], 4, True, False)
        req.reply_buffer = buf.handle
        req.queries.CopyFrom(encode(k[:3], "queries"))
        return mem._search_unary(req, mem._opts())

    with pytest.raises(errors.UnknownReplyBuffer):          # another tenant: no such buffer
        search(daemon.umbrella)
    with pytest.raises(errors.UnknownReplyBuffer):
        daemon.umbrella._close_reply_buffer(buf.handle)
    with pytest.raises(errors.UnknownReplyBuffer):          # nor another token of the tenant
        search(daemon.acme_ro)
    assert "ids" in search(daemon.acme)                     # still the owner's
    daemon.acme._close_reply_buffer(buf.handle)
    # and through the client's own pool: a tenant's searches come back whole
    r = daemon.acme.search([name], k[:40], k=8)
    assert (r.ids[:, 0] == np.arange(40)).all()


def test_the_auth_daemons_socket_is_0600(daemon):
    st = os.stat(daemon.data_dir / "memoryd.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ---- the pieces, in process ------------------------------------------------------------

def test_the_authenticator_caches_rows_for_its_ttl(tmp_path):
    from memoryd.auth.callers import Authenticator
    from memoryd.engine import LocalMemory

    now = [0.0]
    with LocalMemory(tmp_path / "data", reap_interval=None) as local:
        created = local.create_token("acme", "read", "t")
        auth = Authenticator(local.tokens, ttl_s=1.0, clock=lambda: now[0])
        caller = auth.caller(created.token, "me")
        assert (caller.name, caller.tenant, caller.rights, caller.token_id) == (
            "me", "acme", frozenset({"read"}), created.info.id)
        local.revoke_token(created.info.id)
        now[0] = 0.9
        assert auth.caller(created.token, "me").tenant == "acme"      # cached: still valid
        now[0] = 1.1
        with pytest.raises(errors.Unauthenticated, match="revoked"):
            auth.caller(created.token, "me")
        with pytest.raises(errors.Unauthenticated, match="no token"):
            auth.caller(None, "me")
        with pytest.raises(errors.InvalidArgument):
            local.create_token("acme", "admin")                       # admins have no tenant
        with pytest.raises(errors.InvalidArgument):
            local.create_token(None, "write")                         # tenant tokens need one


def test_local_memory_applies_the_same_rules_in_process(tmp_path):
    """The rules live in LocalMemory: an in-process caller= is held to them too,
    and no caller is the owner."""
    from memoryd.api import ROLES, Caller
    from memoryd.engine import LocalMemory

    acme = Caller("a", tenant="acme", rights=ROLES["write"])
    reader = Caller("r", tenant="acme", rights=ROLES["read"])
    with LocalMemory(tmp_path / "data", reap_interval=None) as local:
        local.create_bank(BankSpec("theirs", dim=4, tenant="umbrella"))   # the owner: any tenant
        assert local.create_bank(BankSpec("mine", dim=4), caller=acme).spec.tenant == "acme"
        assert [b.name for b in local.list_banks(caller=acme)] == ["mine"]
        assert len(local.list_banks()) == 2
        with pytest.raises(errors.NotFound):
            local.search(["theirs"], np.zeros((1, 4), np.float32), k=1, caller=acme)
        with pytest.raises(errors.PermissionDenied):
            local.add("mine", np.zeros((1, 4), np.float32), caller=reader)
        with pytest.raises(errors.PermissionDenied):
            local.set_tenant_quota("acme", 10, caller=acme)
