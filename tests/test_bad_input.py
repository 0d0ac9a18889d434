"""Bad input, on both backends: the right exception class from memoryd.errors,
a message that says what is wrong, nothing half-written, and a backend that
still answers a normal search afterwards.

Then, against a real daemon (`memoryd serve` in a subprocess, WireDaemon): a
table over every RPC of malformed requests on the wire, each with its exact
status code (test_wire_table), the daemon alive and the stored data unchanged
after each; and the defects fixed here one by one (existing and extreme ids,
index specs, allocations, enums and quotas from the wire, scalars, SIGTERM
after a burst, one user per data dir). tests/test_fuzz.py fuzzes the same
daemon.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from memoryd import api, errors
from reference import gaussian, values_for

DIM, VDIM = 16, 4


@pytest.fixture
def env(mem, make_bank):
    spec = make_bank(mem, dim=DIM, value_dim=VDIM)
    keys = gaussian(50, DIM, 1)
    vals = values_for(50, VDIM, 2)
    ids = np.asarray(mem.add(spec.name, keys, vals))
    key_only = make_bank(mem, dim=DIM, value_dim=0)
    mem.add(key_only.name, gaussian(20, DIM, 3))
    e = SimpleNamespace(mem=mem, make_bank=make_bank, spec=spec, bank=spec.name, keys=keys,
                        vals=vals, ids=ids, key_only=key_only.name)
    e.expected = mem.search(spec.name, keys[:4], 3).ids.copy()
    np.testing.assert_array_equal(e.expected[:, 0], ids[:4])
    return e


def healthy(env):
    """The backend still answers a normal search, with the same answer, and
    the test bank is unchanged."""
    res = env.mem.search(env.bank, env.keys[:4], 3)
    np.testing.assert_array_equal(res.ids, env.expected)
    assert env.mem.bank_info(env.bank).count == 50


def refuses(env, exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc) as ei:
        fn(*args, **kwargs)
    err = ei.value
    assert isinstance(err, errors.MemorydError)
    assert re.search(pattern, str(err), re.IGNORECASE), (
        f"message {str(err)!r} does not match {pattern!r}")
    healthy(env)
    return err


def keys_(n=5, dim=DIM, seed=10):
    return gaussian(n, dim, seed)


def vals_(n=5, vdim=VDIM, seed=11):
    return values_for(n, vdim, seed)


def poisoned(a, what):
    a = np.array(a, dtype=np.float32)
    a[1, 2] = np.nan if what == "nan" else (np.inf if what == "inf" else -np.inf)
    return a


# ---- add ------------------------------------------------------------------------

def test_add_wrong_key_dim(env):
    refuses(env, errors.InvalidArgument, r"dimension 15.*16|dim",
            env.mem.add, env.bank, keys_(dim=15), vals_())
    refuses(env, errors.InvalidArgument, r"2-d|shape|dim",
            env.mem.add, env.bank, keys_()[0], vals_(1))


def test_add_wrong_value_dim(env):
    refuses(env, errors.InvalidArgument, r"values.*dimension|dimension 3",
            env.mem.add, env.bank, keys_(), vals_(vdim=3))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_add_non_finite_keys(env, bad):
    refuses(env, errors.InvalidArgument, r"keys.*(nan|inf)",
            env.mem.add, env.bank, poisoned(keys_(), bad), vals_())


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_add_non_finite_values(env, bad):
    refuses(env, errors.InvalidArgument, r"values.*(nan|inf)",
            env.mem.add, env.bank, keys_(), poisoned(vals_(), bad))


def test_add_values_overflowing_bank_dtype(env):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=VDIM, value_dtype="float16")
    big = np.full((5, VDIM), 1e6, np.float32)      # finite in fp32, inf in fp16
    refuses(env, errors.InvalidArgument, r"inf|overflow|range",
            env.mem.add, spec.name, keys_(), big)
    assert env.mem.bank_info(spec.name).count == 0


def test_add_empty_batch(env):
    refuses(env, errors.InvalidArgument, r"empty|at least one|0 rows",
            env.mem.add, env.bank, np.zeros((0, DIM), np.float32),
            np.zeros((0, VDIM), np.float32))


def test_add_non_numeric_keys(env):
    refuses(env, errors.InvalidArgument, r"numeric|dtype|float",
            env.mem.add, env.bank, np.full((5, DIM), "x"), vals_())


def test_values_missing_for_value_bank(env):
    refuses(env, errors.InvalidArgument, r"values",
            env.mem.add, env.bank, keys_(), None)


def test_values_given_to_key_only_bank(env):
    refuses(env, errors.InvalidArgument, r"values|key.only|value_dim",
            env.mem.add, env.key_only, keys_(), vals_())
    assert env.mem.bank_info(env.key_only).count == 20


def test_mismatched_key_value_counts(env):
    refuses(env, errors.InvalidArgument, r"\b5\b.*\b4\b|\b4\b.*\b5\b|rows|match",
            env.mem.add, env.bank, keys_(5), vals_(4))


def test_mismatched_key_id_counts(env):
    refuses(env, errors.InvalidArgument, r"\b5\b.*\b3\b|\b3\b.*\b5\b|ids|match",
            env.mem.add, env.bank, keys_(5), vals_(5), ids=[1000, 1001, 1002])


def test_bad_explicit_ids(env):
    refuses(env, errors.InvalidArgument, r"negative|-1|>= ?0|non-negative",
            env.mem.add, env.bank, keys_(2), vals_(2), ids=[1000, -1])
    refuses(env, errors.InvalidArgument, r"integer|dtype",
            env.mem.add, env.bank, keys_(2), vals_(2), ids=[1000.5, 1001.5])
    refuses(env, errors.InvalidArgument, r"duplicate|twice|repeat|unique",
            env.mem.add, env.bank, keys_(2), vals_(2), ids=[1000, 1000])


# ---- search ------------------------------------------------------------------------

def test_search_wrong_query_dim(env):
    refuses(env, errors.InvalidArgument, r"dimension 17.*16|dim",
            env.mem.search, env.bank, keys_(3, dim=17), 3)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_search_non_finite_queries(env, bad):
    refuses(env, errors.InvalidArgument, r"quer.*(nan|inf)",
            env.mem.search, env.bank, poisoned(keys_(3), bad), 3)


@pytest.mark.parametrize("k", [0, -1, api.MAX_K + 1, 10**12])
def test_search_k_out_of_range(env, k):
    refuses(env, errors.InvalidArgument, rf"k must be in 1\.\.{api.MAX_K}|\bk\b",
            env.mem.search, env.bank, keys_(2), k)


@pytest.mark.parametrize("k", [2.5, 3.0, "3", None, True])
def test_search_k_not_an_int(env, k):
    refuses(env, errors.InvalidArgument, r"k must be an integer|\bk\b",
            env.mem.search, env.bank, keys_(2), k)


def test_search_k_max_is_allowed(env):
    res = env.mem.search(env.bank, keys_(1), api.MAX_K, values=False)
    assert res.ids.shape == (1, api.MAX_K)
    assert res.mask.sum() == 50


def test_search_empty_batch(env):
    refuses(env, errors.InvalidArgument, r"empty|at least one|0 rows",
            env.mem.search, env.bank, np.zeros((0, DIM), np.float32), 3)


def test_search_bank_list_errors(env):
    refuses(env, errors.InvalidArgument, r"at least one bank|bank",
            env.mem.search, [], keys_(2), 3)
    refuses(env, errors.InvalidArgument, r"twice|repeat|duplicate",
            env.mem.search, [env.bank, env.bank], keys_(2), 3)


def test_search_banks_of_different_dim(env):
    other = env.make_bank(env.mem, dim=8, value_dim=VDIM)
    env.mem.add(other.name, keys_(3, dim=8), vals_(3))
    refuses(env, errors.InvalidArgument, r"dim",
            env.mem.search, [env.bank, other.name], keys_(2), 3)


def test_search_banks_of_different_metric(env):
    other = env.make_bank(env.mem, dim=DIM, value_dim=VDIM, metric="ip")
    env.mem.add(other.name, keys_(3), vals_(3))
    refuses(env, errors.InvalidArgument, r"metric",
            env.mem.search, [env.bank, other.name], keys_(2), 3)


# ---- unknown banks and names ------------------------------------------------------------

UNKNOWN = "no-such-bank"


@pytest.mark.parametrize("op", ["add", "search", "search_many", "get", "update_values",
                                "remove", "export", "bank_info", "delete_bank",
                                "freeze_bank", "set_quota"])
def test_unknown_bank(env, op):
    m = env.mem
    calls = {
        "add": lambda: m.add(UNKNOWN, keys_(), vals_()),
        "search": lambda: m.search(UNKNOWN, keys_(2), 3),
        "search_many": lambda: m.search([env.bank, UNKNOWN], keys_(2), 3),
        "get": lambda: m.get(UNKNOWN, [1, 2]),
        "update_values": lambda: m.update_values(UNKNOWN, [1], vals_(1)),
        "remove": lambda: m.remove(UNKNOWN, [1]),
        "export": lambda: list(m.export(UNKNOWN)),
        "bank_info": lambda: m.bank_info(UNKNOWN),
        "delete_bank": lambda: m.delete_bank(UNKNOWN),
        "freeze_bank": lambda: m.freeze_bank(UNKNOWN),
        "set_quota": lambda: m.set_quota(UNKNOWN, 100),
    }
    refuses(env, errors.NotFound, re.escape(UNKNOWN), calls[op])


def test_deleted_bank_is_gone(env):
    spec = env.make_bank(env.mem)
    env.mem.delete_bank(spec.name)
    refuses(env, errors.NotFound, re.escape(spec.name), env.mem.search, spec.name, keys_(2), 3)
    refuses(env, errors.NotFound, re.escape(spec.name), env.mem.delete_bank, spec.name)


def test_duplicate_bank_name(env):
    before = env.mem.bank_info(env.bank)
    refuses(env, errors.AlreadyExists, re.escape(env.bank),
            env.mem.create_bank, env.spec.with_(dim=8))
    after = env.mem.bank_info(env.bank)
    assert after.spec == before.spec and after.count == before.count


@pytest.mark.parametrize("name", ["", "bad name", "bad/name", "-leading", ".hidden",
                                  "x" * 65, "naïve", "a\nb"])
def test_bad_bank_name(env, name):
    from conftest import new_spec

    refuses(env, errors.InvalidArgument, r"bank name",
            env.mem.create_bank, new_spec(name=name))
    assert name not in [b.name for b in env.mem.list_banks()]


@pytest.mark.parametrize("field,value,pattern", [
    ("kind", "archive", r"kind"),
    ("kind", "", r"kind"),
    ("metric", "cosine", r"metric"),
    ("metric", "L2 ", r"metric"),
    ("value_dtype", "int8", r"dtype"),
    ("value_dtype", "float64", r"dtype"),
    ("dim", 0, r"dim"),
    ("dim", -4, r"dim"),
    ("value_dim", -1, r"value_dim"),
    ("shards", 0, r"shards"),
    ("shards", api.MAX_SHARDS + 1, r"shards"),
    ("quota_bytes", -5, r"quota"),
    ("index", "", r"index"),
    ("tenant", "bad tenant", r"tenant"),
])
def test_bad_spec_field(env, field, value, pattern):
    from conftest import new_spec

    spec = new_spec(**{field: value})
    refuses(env, errors.InvalidArgument, pattern, env.mem.create_bank, spec)
    assert spec.name not in [b.name for b in env.mem.list_banks()]


def test_bad_index_spec(env):
    from conftest import new_spec

    spec = new_spec(index="NotAnIndex42")
    refuses(env, errors.InvalidArgument, r"NotAnIndex42", env.mem.create_bank, spec)
    refuses(env, errors.NotFound, re.escape(spec.name), env.mem.bank_info, spec.name)
    # nothing was left behind: the name is free
    assert env.mem.create_bank(spec.with_(index="Flat")).count == 0


def test_bad_quota(env):
    refuses(env, errors.InvalidArgument, r"quota|negative",
            env.mem.set_quota, env.bank, -1)


# ---- state: frozen, quota, training ------------------------------------------------------

def test_write_to_frozen_bank(env):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=VDIM)
    ids = env.mem.add(spec.name, keys_(), vals_())
    env.mem.freeze_bank(spec.name)
    for fn, args in [(env.mem.add, (spec.name, keys_(), vals_())),
                     (env.mem.update_values, (spec.name, ids[:2], vals_(2))),
                     (env.mem.remove, (spec.name, ids[:2]))]:
        err = refuses(env, errors.BankFrozen, r"frozen", fn, *args)
        assert isinstance(err, errors.FailedPrecondition)
        assert spec.name in str(err)
    assert env.mem.bank_info(spec.name).count == 5


def test_quota_exceeded(env):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=VDIM, quota_bytes=2000)
    err = refuses(env, errors.QuotaExceeded, r"quota",
                  env.mem.add, spec.name, keys_(50), vals_(50))
    assert err.bank == spec.name and err.limit == 2000
    assert err.used + err.requested > err.limit
    assert spec.name in str(err)
    info = env.mem.bank_info(spec.name)
    assert info.count == 0 and info.used_bytes == err.used


def test_needs_training(env):
    spec = env.make_bank(env.mem, dim=8, value_dim=0, index="IVF4096,Flat")
    assert not env.mem.bank_info(spec.name).trained
    err = refuses(env, errors.NeedsTraining, r"train",
                  env.mem.add, spec.name, gaussian(100, 8, 20))
    assert isinstance(err, errors.FailedPrecondition)
    info = env.mem.bank_info(spec.name)
    assert info.count == 0 and not info.trained
    # (searching it while untrained: test_backend.test_search_untrained_ivf_bank_is_empty)


def test_needs_training_then_big_enough_add(env):
    spec = env.make_bank(env.mem, dim=8, value_dim=2, index="IVF32,Flat")
    refuses(env, errors.NeedsTraining, r"train",
            env.mem.add, spec.name, gaussian(20, 8, 22), values_for(20, 2, 23))
    n = 32 * 39
    x = gaussian(n, 8, 24)
    ids = env.mem.add(spec.name, x, values_for(n, 2, 25))
    info = env.mem.bank_info(spec.name)
    assert info.trained and info.count == n
    res = env.mem.search(spec.name, x[:5], 1)
    np.testing.assert_array_equal(res.ids[:, 0], ids[:5])


# ---- get / update / remove ----------------------------------------------------------------

def test_get_bad_ids(env):
    refuses(env, errors.InvalidArgument, r"integer|dtype",
            env.mem.get, env.bank, [1.5, 2.5])
    refuses(env, errors.InvalidArgument, r"1-d|shape",
            env.mem.get, env.bank, np.zeros((2, 2), np.int64))


def test_update_values_bad_input(env):
    m = env.mem
    refuses(env, errors.InvalidArgument, r"values.*(nan|inf)",
            m.update_values, env.bank, env.ids[:5], poisoned(vals_(5), "nan"))
    refuses(env, errors.InvalidArgument, r"dimension|dim",
            m.update_values, env.bank, env.ids[:5], vals_(5, vdim=VDIM + 1))
    refuses(env, errors.InvalidArgument, r"\b5\b.*\b4\b|\b4\b.*\b5\b|rows|match",
            m.update_values, env.bank, env.ids[:5], vals_(4))
    refuses(env, (errors.InvalidArgument, errors.FailedPrecondition), r"value",
            m.update_values, env.key_only, [0], vals_(1))
    g = m.get(env.bank, env.ids[:5])
    np.testing.assert_array_equal(g.values, env.vals[:5])


def test_remove_bad_ids(env):
    refuses(env, errors.InvalidArgument, r"integer|dtype",
            env.mem.remove, env.bank, [1.5])


# =========================================================================================
# Against a real daemon (`memoryd serve` in a subprocess), on the wire: one table over
# every RPC with malformed requests, each with the exact status code it must end with.
# After each: the daemon answers Ping and ListBanks, and the stored data is unchanged
# (the names of all banks, and an export checksum of the test banks and the session).
# =========================================================================================

import hashlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402

from memoryd.v1 import memory_pb2 as pb  # noqa: E402
from memoryd.v1 import memory_pb2_grpc as pb_grpc  # noqa: E402
from memoryd.wire.channel import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, grpc_target  # noqa: E402
from memoryd.wire.tensors import encode  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["Memory"]
METHODS = {m.name: m for m in SERVICE.methods}
W_DIM, W_VDIM, W_ROWS = 8, 4, 30


def T(a) -> pb.Tensor:
    return encode(np.asarray(a))      # (not ascontiguousarray: it makes a 0-d array 1-d)


def raw(dtype: int, shape, data: bytes = b"") -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


def f32(n: int, d: int = W_DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def i64(*ids: int) -> pb.Tensor:
    return T(np.array(ids, np.int64))


class WireDaemon:
    """`memoryd serve` in a subprocess on a unix socket in a short tmp dir, and a raw
    channel to it (256 MiB messages, as our client). call() -> (code name, reply)."""

    def __init__(self, *extra: str):
        """Its working dir and TMPDIR are root/cwd and root/tmp (test_fuzz checks that
        nothing appears outside the data dir)."""
        from daemon_util import daemon_env, serve_args

        from memoryd.daemon.server import wait_serving

        self.root = Path(tempfile.mkdtemp(prefix="mdw-"))
        self.data_dir = self.root / "data"
        for sub in ("cwd", "tmp"):
            (self.root / sub).mkdir()
        self.address = f"unix://{self.data_dir / 'memoryd.sock'}"
        self.log_path = self.root / "daemon.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                serve_args(self.data_dir, "--grace", "2", *extra), stdout=log, stderr=log,
                cwd=self.root / "cwd", env={**daemon_env(), "TMPDIR": str(self.root / "tmp")})
        self.proc.log_path = self.log_path
        try:
            wait_serving(self.address, timeout=60, proc=self.proc)
        except (RuntimeError, TimeoutError) as e:
            self.proc.kill()
            raise RuntimeError(f"{e}:\n{self.log_path.read_text()}") from None
        self.channel = grpc.insecure_channel(grpc_target(self.address), options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.MemoryStub(self.channel)

    def call(self, method: str, request, timeout: float = 60.0):
        m = METHODS[method]
        fn = getattr(self.stub, method)
        try:
            if m.client_streaming:
                reply = fn(iter(request if isinstance(request, list) else [request]),
                           timeout=timeout)
            elif m.server_streaming:
                reply = list(fn(request, timeout=timeout))
            else:
                reply = fn(request, timeout=timeout)
            return "OK", reply
        except grpc.RpcError as e:
            return e.code().name, e.details()

    def ok(self, method: str, request):
        code, reply = self.call(method, request)
        assert code == "OK", (method, code, reply)
        return reply

    def alive(self) -> None:
        assert self.proc.poll() is None, f"the daemon died:\n{self.log()[-3000:]}"
        assert self.ok("Ping", pb.PingRequest(payload=b"still there")).payload == b"still there"
        self.ok("ListBanks", pb.ListBanksRequest())

    def export_sum(self, bank: str) -> str:
        h = hashlib.sha256()
        rows = []
        for c in self.ok("Export", pb.ExportRequest(bank=bank)):
            for t in (c.ids, c.keys, c.values):
                rows.append(t.data)
        for r in sorted(rows):
            h.update(r)
        return h.hexdigest()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> int:
        from daemon_util import stop_daemon

        self.channel.close()
        try:
            return stop_daemon(self.proc, timeout=30)
        finally:
            self.last_log = self.log() if self.log_path.exists() else ""
            shutil.rmtree(self.root, ignore_errors=True)


class WireWorld:
    """The daemon and what the table's requests aim at: a Flat bank 't' (8-d keys,
    4-d float32 values, 30 rows with ids 0..29), a key-only bank 'k', a base bank
    'base', a frozen bank 'ice', a 2-shard bank 's2' (ids 0..29) and a session."""

    def __init__(self):
        self.d = WireDaemon()
        d = self.d
        for name, kw in (("t", dict(value_dim=W_VDIM)), ("k", {}), ("s2", dict(shards=2)),
                         ("base", dict(kind=pb.BASE, value_dim=W_VDIM)),
                         ("ice", dict(value_dim=W_VDIM))):
            d.ok("CreateBank", pb.CreateBankRequest(spec=pb.BankSpec(
                name=name, dim=W_DIM, quota_bytes=-1, **kw)))
        self.keys, self.vals = f32(W_ROWS), f32(W_ROWS, W_VDIM, 1)
        d.ok("Add", pb.AddRequest(bank="t", keys=T(self.keys), values=T(self.vals)))
        d.ok("Add", pb.AddRequest(bank="k", keys=T(self.keys)))
        d.ok("Add", pb.AddRequest(bank="s2", keys=T(self.keys)))
        d.ok("Add", pb.AddRequest(bank="ice", keys=T(self.keys), values=T(self.vals)))
        d.ok("FreezeBank", pb.BankRef(name="ice"))
        s = d.ok("OpenSession", pb.OpenSessionRequest(spec=pb.SessionSpec(
            dim=W_DIM, value_dim=W_VDIM, quota_bytes=-1)))
        self.sid = s.session_id
        d.ok("Append", pb.AppendRequest(session_id=self.sid, keys=T(self.keys[:5]),
                                        values=T(self.vals[:5]), scores=T(np.ones(5, np.float32))))
        gone = d.ok("OpenSession", pb.OpenSessionRequest(spec=pb.SessionSpec(
            dim=W_DIM, quota_bytes=-1, ttl_idle_s=0.2)))
        self.expired = gone.session_id
        time.sleep(0.5)                                   # idle TTL passed: expired

    def state(self):
        d = self.d
        names = sorted(b.spec.name for b in d.ok("ListBanks", pb.ListBanksRequest()).banks)
        return names, {b: d.export_sum(b) for b in ("t", "k", "s2", "ice", self.sid)}


@pytest.fixture(scope="module")
def wire():
    w = WireWorld()
    try:
        yield w
    finally:
        assert w.d.close() == 0, w.d.log()[-3000:]


# Each case: (id, method, request builder (world -> request), expected status code).


NAN = float("nan")
INF = float("inf")
BIG = 2**31 - 1
_q = lambda n=2: T(f32(n, seed=7))                             # noqa: E731
_spec = lambda **kw: pb.CreateBankRequest(spec=pb.BankSpec(   # noqa: E731
    **{"name": "fresh", "dim": W_DIM, "quota_bytes": -1, **kw}))
_add = lambda **kw: pb.AddRequest(**{"bank": "t", "keys": T(f32(1, seed=3)),  # noqa: E731
                                     "values": T(f32(1, W_VDIM, 4)), **kw})
_search = lambda **kw: pb.SearchRequest(**{"banks": ["t"], "queries": _q(), "k": 3, **kw})  # noqa: E731
_sess = lambda **kw: pb.OpenSessionRequest(spec=pb.SessionSpec(  # noqa: E731
    **{"dim": W_DIM, "quota_bytes": -1, **kw}))
BAD_INDEX = ["HNSW0", "HNSW1", "NSG8", "NSG32,Flat", "IVF4,Flat|nprobe=0", "IVF4,Flat|nprobe=5",
             "HNSW32|efSearch=0", "HNSW32|efSearch=2147483647", "HNSW32|efConstruction=0",
             "HNSW32|efSearch=-1", "HNSW32|efSearch=1e3", "HNSW32|bogus=1", "IVF0,Flat",
             "IVF2000000,Flat", "IVF4", "PQ3", "PQ4x17", "PQ2x16,Flat", "Flat,RFlat",
             "IDMap,IVF4,Flat", "L2norm,Flat", "PCA16,Flat", "IVF4(IVF2,Flat),Flat",
             "Flat|nprobe=2", "HNSW1000", "NotAnIndex42", "x" * 300, "product-keys:1",
             "product-keys:70000", "product-keys:4|seed=-1"]

CASES = [
    # ---- CreateBank: names, every integer and enum field, index specs ----
    *[(f"create-name-{n!r}", "CreateBank", lambda w, n=n: _spec(name=n), "INVALID_ARGUMENT")
      for n in ["", "../x", "a/b", ".", "..", "/abs", "x" * 65, "a\x00b", "naïve", " lead"]],
    *[(f"create-{f}={v}", "CreateBank", lambda w, f=f, v=v: _spec(**{f: v}), "INVALID_ARGUMENT")
      for f, v in [("dim", 0), ("dim", -1), ("dim", BIG), ("dim", -(2**31)),
                   ("value_dim", -1), ("value_dim", 65537), ("value_dim", BIG),
                   ("kind", 99), ("kind", -5), ("metric", 99), ("value_dtype", 99),
                   ("value_dtype", pb.INT64), ("value_dtype", pb.INT32), ("shards", -1),
                   ("shards", 65), ("shards", BIG), ("quota_bytes", -2),
                   ("quota_bytes", -(2**63)), ("tier", "disk"), ("tier", "RAM"),
                   ("eviction", "lru"), ("tenant", "../t"), ("tenant", "a b"),
                   ("key_version", "\x00"), ("key_version", "v" * 200)]],
    *[(f"create-index-{s[:40]!r}", "CreateBank", lambda w, s=s: _spec(index=s), "INVALID_ARGUMENT")
      for s in BAD_INDEX],
    ("create-pk-odd-dim", "CreateBank", lambda w: _spec(dim=7, index="product-keys:4"),
     "INVALID_ARGUMENT"),
    ("create-pk-shards", "CreateBank", lambda w: _spec(shards=2, index="product-keys:4"),
     "INVALID_ARGUMENT"),
    ("create-pk-absurd", "CreateBank",
     lambda w: _spec(index="product-keys:65536", value_dim=65536), "INVALID_ARGUMENT"),
    ("create-pk-over-quota", "CreateBank",
     lambda w: _spec(index="product-keys:1024", value_dim=64, quota_bytes=1000),
     "RESOURCE_EXHAUSTED"),
    ("create-existing", "CreateBank", lambda w: _spec(name="t"), "ALREADY_EXISTS"),
    ("create-no-spec", "CreateBank", lambda w: pb.CreateBankRequest(), "INVALID_ARGUMENT"),
    # ---- bank admin by name ----
    *[(f"{m}-{n!r}", m, lambda w, n=n: pb.BankRef(name=n), "NOT_FOUND")
      for m in ("GetBank", "DeleteBank", "FreezeBank") for n in ("nope", "", "../t", "t/x")],
    ("setquota-unknown", "SetQuota", lambda w: pb.SetQuotaRequest(name="nope", quota_bytes=5),
     "NOT_FOUND"),
    ("setquota-negative", "SetQuota", lambda w: pb.SetQuotaRequest(name="t", quota_bytes=-2),
     "INVALID_ARGUMENT"),
    ("setquota-min-int64", "SetQuota",
     lambda w: pb.SetQuotaRequest(name="t", quota_bytes=-(2**63)), "INVALID_ARGUMENT"),
    ("setquota-below-use", "SetQuota", lambda w: pb.SetQuotaRequest(name="t", quota_bytes=0),
     "FAILED_PRECONDITION"),
    ("settier-bad", "SetTier", lambda w: pb.SetTierRequest(name="t", tier="tape"),
     "INVALID_ARGUMENT"),
    ("settier-empty", "SetTier", lambda w: pb.SetTierRequest(name="t"), "INVALID_ARGUMENT"),
    ("settier-unknown", "SetTier", lambda w: pb.SetTierRequest(name="nope", tier="ram"),
     "NOT_FOUND"),
    # ---- Add: shapes, byte lengths, dtypes, NaN/Inf, ids, stream rules ----
    ("add-empty-stream", "Add", lambda w: [], "INVALID_ARGUMENT"),
    ("add-no-bank", "Add", lambda w: _add(bank=""), "INVALID_ARGUMENT"),
    ("add-unknown-bank", "Add", lambda w: _add(bank="nope"), "NOT_FOUND"),
    ("add-path-bank", "Add", lambda w: _add(bank="../t"), "NOT_FOUND"),
    ("add-no-keys", "Add", lambda w: pb.AddRequest(bank="t", values=T(f32(1, W_VDIM))),
     "INVALID_ARGUMENT"),
    ("add-keys-wrong-dim", "Add", lambda w: _add(keys=T(f32(1, W_DIM + 1))), "INVALID_ARGUMENT"),
    ("add-keys-1d", "Add", lambda w: _add(keys=T(f32(1)[0])), "INVALID_ARGUMENT"),
    ("add-keys-0d", "Add", lambda w: _add(keys=T(np.float32(1))), "INVALID_ARGUMENT"),
    ("add-keys-3d", "Add", lambda w: _add(keys=T(f32(2).reshape(1, 2, W_DIM))),
     "INVALID_ARGUMENT"),
    ("add-keys-0-rows", "Add", lambda w: _add(keys=T(f32(0)), values=T(f32(0, W_VDIM))),
     "INVALID_ARGUMENT"),
    ("add-keys-nan", "Add", lambda w: _add(keys=T(np.full((1, W_DIM), NAN, np.float32))),
     "INVALID_ARGUMENT"),
    ("add-keys-inf", "Add", lambda w: _add(keys=T(np.full((1, W_DIM), INF, np.float32))),
     "INVALID_ARGUMENT"),
    ("add-keys-bytes-short", "Add",
     lambda w: _add(keys=raw(pb.FLOAT32, [1, W_DIM], b"\0" * 31)), "INVALID_ARGUMENT"),
    ("add-keys-bytes-long", "Add",
     lambda w: _add(keys=raw(pb.FLOAT32, [1, W_DIM], b"\0" * 33)), "INVALID_ARGUMENT"),
    ("add-keys-no-dtype", "Add", lambda w: _add(keys=raw(0, [1, W_DIM], b"\0" * 32)),
     "INVALID_ARGUMENT"),
    ("add-keys-dtype-99", "Add", lambda w: _add(keys=raw(99, [1, W_DIM], b"\0" * 32)),
     "INVALID_ARGUMENT"),
    ("add-keys-negative-shape", "Add", lambda w: _add(keys=raw(pb.FLOAT32, [-1, W_DIM])),
     "INVALID_ARGUMENT"),
    ("add-keys-huge-shape", "Add", lambda w: _add(keys=raw(pb.FLOAT32, [2**62, 2**62])),
     "INVALID_ARGUMENT"),
    ("add-keys-zero-huge-shape", "Add", lambda w: _add(keys=raw(pb.FLOAT32, [0, 2**62])),
     "INVALID_ARGUMENT"),
    ("add-keys-17-dims", "Add", lambda w: _add(keys=raw(pb.FLOAT32, [1] * 17, b"\0" * 4)),
     "INVALID_ARGUMENT"),
    ("add-keys-buffer-offset", "Add",
     lambda w: _add(keys=pb.Tensor(dtype=pb.FLOAT32, shape=[1, W_DIM], buffer_offset=0)),
     "INVALID_ARGUMENT"),
    ("add-no-values", "Add", lambda w: pb.AddRequest(bank="t", keys=T(f32(1))),
     "INVALID_ARGUMENT"),
    ("add-values-to-key-only", "Add", lambda w: _add(bank="k"), "INVALID_ARGUMENT"),
    ("add-values-wrong-dim", "Add", lambda w: _add(values=T(f32(1, W_VDIM + 1))),
     "INVALID_ARGUMENT"),
    ("add-values-nan", "Add", lambda w: _add(values=T(np.full((1, W_VDIM), NAN, np.float32))),
     "INVALID_ARGUMENT"),
    ("add-values-0d", "Add", lambda w: _add(values=T(np.float32(2))), "INVALID_ARGUMENT"),
    ("add-values-rows-mismatch", "Add", lambda w: _add(values=T(f32(2, W_VDIM))),
     "INVALID_ARGUMENT"),
    ("add-ids-negative", "Add", lambda w: _add(ids=i64(-1)), "INVALID_ARGUMENT"),
    ("add-ids-min-int64", "Add", lambda w: _add(ids=i64(-(2**63))), "INVALID_ARGUMENT"),
    ("add-ids-max-int64", "Add", lambda w: _add(ids=i64(2**63 - 1)), "INVALID_ARGUMENT"),
    ("add-ids-2**62", "Add", lambda w: _add(ids=i64(2**62)), "INVALID_ARGUMENT"),
    ("add-ids-existing-row0", "Add", lambda w: _add(ids=i64(0)), "INVALID_ARGUMENT"),
    ("add-ids-existing", "Add", lambda w: _add(ids=i64(17)), "INVALID_ARGUMENT"),
    ("add-ids-existing-2shards-row0", "Add", lambda w: _add(bank="s2", values=None, ids=i64(0)),
     "INVALID_ARGUMENT"),
    ("add-ids-existing-2shards", "Add", lambda w: _add(bank="s2", values=None, ids=i64(17)),
     "INVALID_ARGUMENT"),
    ("add-ids-repeat", "Add",
     lambda w: _add(keys=T(f32(2)), values=T(f32(2, W_VDIM)), ids=i64(100, 100)),
     "INVALID_ARGUMENT"),
    ("add-ids-count", "Add", lambda w: _add(ids=i64(100, 101)), "INVALID_ARGUMENT"),
    ("add-ids-float", "Add", lambda w: _add(ids=T(np.array([1.5], np.float32))),
     "INVALID_ARGUMENT"),
    ("add-ids-2d", "Add", lambda w: _add(ids=T(np.array([[100]], np.int64))), "INVALID_ARGUMENT"),
    ("add-ids-0d", "Add", lambda w: _add(ids=T(np.int64(-3))), "INVALID_ARGUMENT"),
    ("add-second-bank", "Add", lambda w: [_add(), _add(bank="k", values=None)],
     "INVALID_ARGUMENT"),
    ("add-chunk-dtype-mismatch", "Add",
     lambda w: [_add(), _add(bank="", keys=T(f32(1).astype(np.float16)))], "INVALID_ARGUMENT"),
    ("add-field-in-some", "Add", lambda w: [_add(), pb.AddRequest(keys=T(f32(1)))],
     "INVALID_ARGUMENT"),
    ("add-ack-99", "Add", lambda w: _add(ack=99), "INVALID_ARGUMENT"),
    ("add-frozen", "Add", lambda w: _add(bank="ice"), "FAILED_PRECONDITION"),
    ("add-to-session-bank-by-name-dim", "Add",
     lambda w: _add(bank=w.sid, keys=T(f32(1, 3))), "INVALID_ARGUMENT"),
    ("add-expired-session-bank", "Add", lambda w: _add(bank=w.expired, values=None),
     "NOT_FOUND"),
    # ---- Search / SearchOne (the same rules) ----
    *[(f"{m}-{name}", m, build, code) for m in ("Search", "SearchOne") for name, build, code in [
        ("k0", lambda w: _search(k=0), "INVALID_ARGUMENT"),
        ("k-1", lambda w: _search(k=-1), "INVALID_ARGUMENT"),
        ("k4097", lambda w: _search(k=4097), "INVALID_ARGUMENT"),
        ("k-int32-max", lambda w: _search(k=BIG), "INVALID_ARGUMENT"),
        ("no-banks", lambda w: _search(banks=[]), "INVALID_ARGUMENT"),
        ("unknown-bank", lambda w: _search(banks=["t", "nope"]), "NOT_FOUND"),
        ("path-bank", lambda w: _search(banks=["../t"]), "NOT_FOUND"),
        ("twice", lambda w: _search(banks=["t", "t"]), "INVALID_ARGUMENT"),
        ("expired-session", lambda w: _search(banks=[w.expired]), "NOT_FOUND"),
        ("no-queries", lambda w: pb.SearchRequest(banks=["t"], k=3), "INVALID_ARGUMENT"),
        ("queries-wrong-dim", lambda w: _search(queries=T(f32(2, 5))), "INVALID_ARGUMENT"),
        ("queries-0-rows", lambda w: _search(queries=T(f32(0))), "INVALID_ARGUMENT"),
        ("queries-nan", lambda w: _search(queries=T(np.full((1, W_DIM), NAN, np.float32))),
         "INVALID_ARGUMENT"),
        ("queries-bytes", lambda w: _search(queries=raw(pb.FLOAT32, [2, W_DIM], b"1")),
         "INVALID_ARGUMENT"),
        ("queries-int64", lambda w: _search(queries=T(np.ones((1, W_DIM), np.int64))), "OK"),
        ("queries-offset-no-buffer", lambda w: _search(
            queries=pb.Tensor(dtype=pb.FLOAT32, shape=[1, W_DIM], buffer_offset=0)),
         "INVALID_ARGUMENT"),
        ("unknown-reply-buffer", lambda w: _search(reply_buffer="feedface"), "NOT_FOUND"),
        ("stack-k-1", lambda w: pb.SearchRequest(stack=[pb.BankQuery(name="t", k=-1)],
                                                 queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("stack-k-big", lambda w: pb.SearchRequest(stack=[pb.BankQuery(name="t", k=BIG)],
                                                   queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("stack-bias-nan", lambda w: pb.SearchRequest(stack=[pb.BankQuery(name="t", bias=NAN)],
                                                      queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("stack-bias-inf", lambda w: pb.SearchRequest(stack=[pb.BankQuery(name="t", bias=INF)],
                                                      queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("stack-all-excluded", lambda w: pb.SearchRequest(
            stack=[pb.BankQuery(name="t", exclude=True)], queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("rows-negative", lambda w: pb.SearchRequest(row_stacks=[pb.RowStack(
            stack=[pb.BankQuery(name="t")], rows=-1)], queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("rows-huge", lambda w: pb.SearchRequest(row_stacks=[pb.RowStack(
            stack=[pb.BankQuery(name="t")], rows=2**62)], queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("rows-sum", lambda w: pb.SearchRequest(row_stacks=[
            pb.RowStack(stack=[pb.BankQuery(name="t")], rows=1),
            pb.RowStack(stack=[pb.BankQuery(name="k")], rows=5)], queries=_q(), k=3),
         "INVALID_ARGUMENT"),
        ("rows-empty-stack", lambda w: pb.SearchRequest(row_stacks=[pb.RowStack(rows=2)],
                                                        queries=_q(), k=3), "INVALID_ARGUMENT"),
        ("rows-and-banks", lambda w: pb.SearchRequest(banks=["t"], row_stacks=[pb.RowStack(
            stack=[pb.BankQuery(name="t")], rows=2)], queries=_q(), k=3), "INVALID_ARGUMENT"),
    ]],
    ("Search-stack-and-banks", "Search", lambda w: pb.SearchRequest(
        banks=["t"], stack=[pb.BankQuery(name="k")], queries=_q(), k=3), "INVALID_ARGUMENT"),
    # ---- Get / UpdateValues / Remove / Export ----
    ("get-unknown-bank", "Get", lambda w: pb.GetRequest(bank="nope", ids=i64(1)), "NOT_FOUND"),
    ("get-no-ids", "Get", lambda w: pb.GetRequest(bank="t"), "INVALID_ARGUMENT"),
    ("get-ids-float", "Get", lambda w: pb.GetRequest(bank="t", ids=T(np.ones(2, np.float32))),
     "INVALID_ARGUMENT"),
    ("get-ids-2d", "Get", lambda w: pb.GetRequest(bank="t", ids=T(np.ones((2, 2), np.int64))),
     "INVALID_ARGUMENT"),
    ("get-ids-empty", "Get", lambda w: pb.GetRequest(bank="t", ids=T(np.zeros(0, np.int64))),
     "INVALID_ARGUMENT"),
    ("get-ids-extreme", "Get", lambda w: pb.GetRequest(
        bank="s2", ids=i64(-1, -(2**63), 2**63 - 1, 2**31, 0), values=True, keys=True), "OK"),
    ("get-ids-bytes", "Get", lambda w: pb.GetRequest(bank="t", ids=raw(pb.INT64, [2], b"\0" * 9)),
     "INVALID_ARGUMENT"),
    ("update-empty-stream", "UpdateValues", lambda w: [], "INVALID_ARGUMENT"),
    ("update-unknown-bank", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="nope", ids=i64(1), values=T(f32(1, W_VDIM))), "NOT_FOUND"),
    ("update-no-values", "UpdateValues", lambda w: pb.UpdateValuesRequest(bank="t", ids=i64(1)),
     "INVALID_ARGUMENT"),
    ("update-count", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="t", ids=i64(1, 2), values=T(f32(1, W_VDIM))), "INVALID_ARGUMENT"),
    ("update-nan", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="t", ids=i64(1), values=T(np.full((1, W_VDIM), NAN, np.float32))),
     "INVALID_ARGUMENT"),
    ("update-key-only", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="k", ids=i64(1), values=T(f32(1, W_VDIM))), "INVALID_ARGUMENT"),
    ("update-frozen", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="ice", ids=i64(1), values=T(f32(1, W_VDIM))), "FAILED_PRECONDITION"),
    ("update-unknown-ids", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="t", ids=i64(-5, 2**63 - 1, 10**6), values=T(f32(3, W_VDIM))), "OK"),
    ("update-ack-bad", "UpdateValues", lambda w: pb.UpdateValuesRequest(
        bank="t", ids=i64(1), values=T(f32(1, W_VDIM)), ack=-3), "INVALID_ARGUMENT"),
    ("remove-unknown-bank", "Remove", lambda w: pb.RemoveRequest(bank="nope", ids=i64(1)),
     "NOT_FOUND"),
    ("remove-no-ids", "Remove", lambda w: pb.RemoveRequest(bank="t"), "INVALID_ARGUMENT"),
    ("remove-ids-float", "Remove", lambda w: pb.RemoveRequest(bank="t", ids=T(np.ones(1, np.float32))),
     "INVALID_ARGUMENT"),
    ("remove-unknown-ids", "Remove", lambda w: pb.RemoveRequest(
        bank="t", ids=i64(-1, 2**63 - 1, 10**9)), "OK"),
    ("remove-frozen", "Remove", lambda w: pb.RemoveRequest(bank="ice", ids=i64(1)),
     "FAILED_PRECONDITION"),
    ("export-unknown", "Export", lambda w: pb.ExportRequest(bank="nope"), "NOT_FOUND"),
    ("export-chunk-negative", "Export", lambda w: pb.ExportRequest(bank="t", chunk_rows=-1),
     "INVALID_ARGUMENT"),
    ("export-chunk-min", "Export", lambda w: pb.ExportRequest(bank="t", chunk_rows=-(2**63)),
     "INVALID_ARGUMENT"),
    ("export-chunk-huge", "Export", lambda w: pb.ExportRequest(bank="t", chunk_rows=2**62), "OK"),
    # ---- sessions ----
    *[(f"open-session-{f}={v}", "OpenSession", lambda w, f=f, v=v: _sess(**{f: v}),
       "INVALID_ARGUMENT")
      for f, v in [("dim", 0), ("dim", -1), ("dim", BIG), ("value_dim", -1),
                   ("metric", 42), ("value_dtype", 42), ("value_dtype", pb.INT64),
                   ("quota_bytes", -2), ("ttl_idle_s", 0.0), ("ttl_idle_s", -1.0),
                   ("ttl_idle_s", NAN), ("ttl_idle_s", INF), ("ttl_absolute_s", -INF),
                   ("eviction", "lru"), ("tenant", "../x")]],
    ("open-session-no-spec", "OpenSession", lambda w: pb.OpenSessionRequest(), "INVALID_ARGUMENT"),
    ("append-unknown", "Append", lambda w: pb.AppendRequest(session_id="nope", keys=T(f32(1))),
     "NOT_FOUND"),
    ("append-expired", "Append", lambda w: pb.AppendRequest(session_id=w.expired,
                                                            keys=T(f32(1))), "NOT_FOUND"),
    ("append-empty-stream", "Append", lambda w: [], "INVALID_ARGUMENT"),
    ("append-no-session", "Append", lambda w: pb.AppendRequest(keys=T(f32(1))),
     "INVALID_ARGUMENT"),
    ("append-keys-wrong-dim", "Append", lambda w: pb.AppendRequest(
        session_id=w.sid, keys=T(f32(1, 3)), values=T(f32(1, W_VDIM))), "INVALID_ARGUMENT"),
    ("append-keys-0d", "Append", lambda w: pb.AppendRequest(
        session_id=w.sid, keys=T(np.float32(1)), values=T(f32(1, W_VDIM))), "INVALID_ARGUMENT"),
    ("append-scores-count", "Append", lambda w: pb.AppendRequest(
        session_id=w.sid, keys=T(f32(1)), values=T(f32(1, W_VDIM)),
        scores=T(np.ones(3, np.float32))), "INVALID_ARGUMENT"),
    ("append-scores-nan", "Append", lambda w: pb.AppendRequest(
        session_id=w.sid, keys=T(f32(1)), values=T(f32(1, W_VDIM)),
        scores=T(np.full(1, NAN, np.float32))), "INVALID_ARGUMENT"),
    ("append-no-values", "Append", lambda w: pb.AppendRequest(session_id=w.sid, keys=T(f32(1))),
     "INVALID_ARGUMENT"),
    *[(f"{m}-{s!r}", m, lambda w, m=m, s=s: pb.SessionRef(session_id=s), "NOT_FOUND")
      for m in ("GetSession", "CloseSession") for s in ("nope", "", "../s", "t")],
    ("getsession-expired", "GetSession", lambda w: pb.SessionRef(session_id=w.expired),
     "NOT_FOUND"),
    ("extend-unknown", "ExtendSession", lambda w: pb.ExtendSessionRequest(session_id="nope"),
     "NOT_FOUND"),
    ("extend-expired", "ExtendSession", lambda w: pb.ExtendSessionRequest(
        session_id=w.expired, ttl_idle_s=60), "NOT_FOUND"),
    *[(f"extend-{f}={v}", "ExtendSession", lambda w, f=f, v=v: pb.ExtendSessionRequest(
        session_id=w.sid, **{f: v}), "INVALID_ARGUMENT")
      for f, v in [("ttl_idle_s", 0.0), ("ttl_idle_s", NAN), ("ttl_absolute_s", -1.0),
                   ("ttl_absolute_s", INF)]],
    ("promote-unknown", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id="nope", target="t"), "NOT_FOUND"),
    ("promote-expired", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.expired, target="t"), "NOT_FOUND"),
    ("promote-unknown-target", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.sid, target="nope"), "NOT_FOUND"),
    ("promote-to-base", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.sid, target="base"), "FAILED_PRECONDITION"),
    ("promote-shape-mismatch", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.sid, target="k"), "INVALID_ARGUMENT"),
    *[(f"promote-dedup={v}", "PromoteSession", lambda w, v=v: pb.PromoteSessionRequest(
        session_id=w.sid, target="t", dedup=v), "INVALID_ARGUMENT")
      for v in (0.0, -1.0, 1.5, NAN, INF)],
    ("promote-ids-not-there", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.sid, target="t", ids=i64(10**6)), "NOT_FOUND"),
    ("promote-ids-float", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.sid, target="t", ids=T(np.ones(1, np.float32))), "INVALID_ARGUMENT"),
    ("promote-ack-bad", "PromoteSession", lambda w: pb.PromoteSessionRequest(
        session_id=w.sid, target="t", ack=77), "INVALID_ARGUMENT"),
    # ---- tenants ----
    ("tenant-quota-bad-name", "SetTenantQuota", lambda w: pb.SetTenantQuotaRequest(
        tenant="../x", quota_bytes=5), "INVALID_ARGUMENT"),
    ("tenant-quota-empty-name", "SetTenantQuota", lambda w: pb.SetTenantQuotaRequest(
        quota_bytes=5), "INVALID_ARGUMENT"),
    ("tenant-quota-negative", "SetTenantQuota", lambda w: pb.SetTenantQuotaRequest(
        tenant="acme", quota_bytes=-7), "INVALID_ARGUMENT"),
    ("get-tenant-unknown", "GetTenant", lambda w: pb.TenantRef(name="nobody"), "NOT_FOUND"),
    ("get-tenant-path", "GetTenant", lambda w: pb.TenantRef(name="../x"), "NOT_FOUND"),
    # ---- reply buffers, tokens, snapshots ----
    ("open-buffer-huge", "OpenReplyBuffer", lambda w: pb.OpenReplyBufferRequest(
        size_bytes=2**64 - 1), "INVALID_ARGUMENT"),
    ("open-buffer-zero", "OpenReplyBuffer", lambda w: pb.OpenReplyBufferRequest(), "INVALID_ARGUMENT"),
    ("close-buffer-unknown", "CloseReplyBuffer", lambda w: pb.ReplyBufferRef(handle="nope"),
     "NOT_FOUND"),
    ("close-buffer-empty", "CloseReplyBuffer", lambda w: pb.ReplyBufferRef(), "NOT_FOUND"),
    ("token-bad-role", "CreateToken", lambda w: pb.CreateTokenRequest(tenant="acme", role="root"),
     "INVALID_ARGUMENT"),
    ("token-bad-tenant", "CreateToken", lambda w: pb.CreateTokenRequest(tenant="../x"),
     "INVALID_ARGUMENT"),
    ("revoke-unknown", "RevokeToken", lambda w: pb.RevokeTokenRequest(id="nope"), "NOT_FOUND"),
    ("snapshot-relative", "SnapshotBank", lambda w: pb.SnapshotBankRequest(name="t", path="x"),
     "INVALID_ARGUMENT"),
    ("snapshot-unknown", "SnapshotBank", lambda w: pb.SnapshotBankRequest(
        name="nope", path=str(w.d.root / "snap-nope")), "NOT_FOUND"),
    ("snapshot-into-data-dir", "SnapshotBank", lambda w: pb.SnapshotBankRequest(
        name="t", path=str(w.d.data_dir)), "ALREADY_EXISTS"),
    ("restore-relative", "RestoreBank", lambda w: pb.RestoreBankRequest(path="../x"),
     "INVALID_ARGUMENT"),
    ("restore-not-a-snapshot", "RestoreBank", lambda w: pb.RestoreBankRequest(
        path=str(w.d.root)), "NOT_FOUND"),
    ("backup-relative", "Backup", lambda w: pb.BackupRequest(path="b"), "INVALID_ARGUMENT"),
    ("backup-empty", "Backup", lambda w: pb.BackupRequest(), "INVALID_ARGUMENT"),
]


def test_wire_oversized_message_is_refused(wire):
    """A message over the daemon's 256 MiB limit: RESOURCE_EXHAUSTED from gRPC itself
    (no ErrorInfo), and the daemon goes on."""
    big = grpc.insecure_channel(grpc_target(wire.d.address),
                                options=[("grpc.max_send_message_length", -1)])
    try:
        with pytest.raises(grpc.RpcError) as ei:
            pb_grpc.MemoryStub(big).Ping(pb.PingRequest(payload=b"\0" * (MAX_MESSAGE_BYTES + 1)),
                                         timeout=60)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        big.close()
    wire.d.alive()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_wire_table(wire, case):
    """Each malformed request ends with its exact status code; the daemon answers
    afterwards, and nothing stored changed."""
    name, method, build, expected = case
    before = wire.state()
    code, detail = wire.d.call(method, build(wire))
    assert code == expected, f"{name}: {method} ended {code} ({detail!r}), expected {expected}"
    if code not in ("OK", "INTERNAL", "UNKNOWN"):
        assert isinstance(detail, str) and detail, f"{name}: no message with {code}"
    wire.d.alive()
    assert wire.state() == before, f"{name}: stored data changed"


# =========================================================================================
# The defects one by one, on both backends (`env`: LocalMemory and the daemon in process)
# =========================================================================================

# ---- 1. ids that exist already: refused, naming one, for an id in any row of any shard ----

@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("row", [0, 7])
def test_add_existing_id_is_refused(env, shards, row):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=VDIM, shards=shards)
    ids = np.asarray(env.mem.add(spec.name, keys_(10), vals_(10)))
    taken = int(ids[row])
    err = refuses(env, errors.InvalidArgument, rf"already exist.*\b{taken}\b",
                  env.mem.add, spec.name, keys_(2, seed=5), vals_(2), ids=[10**6, taken])
    assert spec.name in str(err)
    assert env.mem.bank_info(spec.name).count == 10
    got = env.mem.get(spec.name, ids, values=True)
    assert got.found.all()
    np.testing.assert_array_equal(got.values, vals_(10))       # nothing overwritten


# ---- 2. the id space: explicit ids leave room for assigned ones -------------------------

@pytest.mark.parametrize("bad", [api.MAX_ID + 1, 2**63 - 1])
def test_explicit_ids_above_max_id_are_refused(env, bad):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=VDIM)
    refuses(env, errors.InvalidArgument, rf"<= {api.MAX_ID}",
            env.mem.add, spec.name, keys_(1), vals_(1), ids=[bad])
    assert env.mem.bank_info(spec.name).count == 0


def test_max_id_then_assigned_ids(env):
    """The largest explicit id, then bank-assigned ids: they follow it, in int64."""
    spec = env.make_bank(env.mem, dim=DIM, value_dim=VDIM, shards=2)
    env.mem.add(spec.name, keys_(1), vals_(1), ids=[api.MAX_ID])
    ids = np.asarray(env.mem.add(spec.name, keys_(3, seed=4), vals_(3)))
    assert ids.tolist() == [api.MAX_ID + 1, api.MAX_ID + 2, api.MAX_ID + 3]
    assert env.mem.get(spec.name, ids).found.all()


def test_exhausted_id_space_is_a_precise_error(local_mem):
    """A bank written before the bound, holding id 2^63 - 1: the next assigned add
    is FAILED_PRECONDITION 'id space exhausted', not an overflow (INTERNAL)."""
    from conftest import new_spec

    spec = new_spec(dim=DIM, value_dim=VDIM)
    local_mem.create_bank(spec)
    local_mem.add(spec.name, keys_(1), vals_(1), ids=[7])
    local_mem.engine.bank(spec.name).next_id = 2**63      # as if id 2^63 - 1 were held
    with pytest.raises(errors.FailedPrecondition, match="id space exhausted"):
        local_mem.add(spec.name, keys_(1), vals_(1))
    assert local_mem.bank_info(spec.name).count == 1


# ---- 3. index specs: refused at creation with the reason, never at the first add ----------

BAD_SPECS = [
    ("HNSW0", r"M .*2\.\.256|links"), ("HNSW1", r"2\.\.256"), ("HNSW1000", r"2\.\.256"),
    ("IVF4_HNSW1,Flat", r"2\.\.256"), ("NSG8", r"NSG.*later adds"), ("NSG32,Flat", r"NSG"),
    ("IVF4,Flat|nprobe=0", r"nprobe must be in 1\.\.4"),
    ("IVF4,Flat|nprobe=5", r"nprobe must be in 1\.\.4"),
    ("HNSW32|efSearch=0", r"efSearch must be in 1\.\.4096"),
    ("HNSW32|efSearch=2147483647", r"efSearch must be in 1\.\.4096"),
    ("HNSW32|efSearch=-3", r"plain non-negative integer"),
    ("HNSW32|efSearch=2.5", r"plain non-negative integer"),
    ("HNSW32|efConstruction=0", r"efConstruction must be in 1\.\.4096"),
    ("HNSW32|efSearch=8,efSearch=9", r"twice"), ("HNSW32|verbose=1", r"search parameter"),
    ("Flat|nprobe=2", r"IVF indexes only"), ("IVF0,Flat", r"nlist must be in 1\.\."),
    ("IVF2000000,Flat", r"nlist"), ("IVF4", r"encoding"), ("PQ3", r"divide"),
    ("PQ4x17", r"bits"), ("PQ4x5fs", r"4 bits"), ("PCA32,Flat", r"output dim"),
    ("Flat,RFlat", r"refinement"), ("IDMap,IVF4,Flat", r"IDMap"), ("L2norm,Flat", r"clone"),
    ("IVF4(IVF2,Flat),Flat", r"parentheses"), ("NotAnIndex42", r"NotAnIndex42"),
    ("Flat,Flat", r"not an index part"), ("PCA8", r"no index part"), ("x" * 300, r"characters"),
]


@pytest.mark.parametrize("index,pattern", BAD_SPECS, ids=[s[:30] for s, _ in BAD_SPECS])
def test_bad_index_specs_refused_at_create(env, index, pattern):
    from conftest import new_spec

    spec = new_spec(dim=DIM, value_dim=VDIM, index=index)
    refuses(env, errors.InvalidArgument, pattern, env.mem.create_bank, spec)
    assert spec.name not in [b.name for b in env.mem.list_banks()]


def test_big_codebooks_refused_before_allocating(env):
    from conftest import new_spec

    for index in ("PQ64x16", "PCA60000,Flat"):   # 64 GiB of codebook; a 65536^2 covariance
        spec = new_spec(dim=65536, index=index)
        refuses(env, errors.InvalidArgument, r"would allocate", env.mem.create_bank, spec)


GOOD_SPECS = ["Flat", "HNSW2", "HNSW16_SQ8", "HNSW16,PQ4", "IVF8,Flat|nprobe=8",
              "IVF8_HNSW4,Flat|quantizer_efSearch=16", "IMI2x3,Flat", "IVF8,PQ4x4fs",
              "IVF8,SQ8", "PQ4np", "SQbf16", "LSHrt", "PCA8,Flat", "OPQ4_16,PQ4",
              "PCAR8,HNSW8|efSearch=16", "HNSW32|efConstruction=120,efSearch=48"]


@pytest.mark.parametrize("index", GOOD_SPECS)
def test_supported_index_specs_work_end_to_end(env, index):
    """What check_index accepts, memoryd runs: train, add twice, search, remove."""
    spec = env.make_bank(env.mem, dim=16, value_dim=2, index=index)
    x = gaussian(1200, 16, 30)
    v = values_for(1200, 2, 31)
    ids = np.concatenate([env.mem.add(spec.name, x[:1000], v[:1000]),
                          env.mem.add(spec.name, x[1000:], v[1000:])])
    res = env.mem.search(spec.name, x[:4], 20)
    assert res.mask.all()
    assert env.mem.remove(spec.name, ids[:10]) == 10
    assert env.mem.bank_info(spec.name).count == 1190
    healthy(env)


def test_hnsw_efsearch_below_k_still_gives_k_results(env):
    """faiss's HNSW keeps efSearch candidates: with efSearch=8 and k=200 it returned
    ~70 of 200 although the bank holds 3000 rows."""
    spec = env.make_bank(env.mem, dim=32, value_dim=0, index="HNSW16|efSearch=8")
    env.mem.add(spec.name, gaussian(3000, 32, 40))
    res = env.mem.search(spec.name, gaussian(8, 32, 41), 200, values=False)
    assert res.mask.all(), f"only {res.mask.sum(1).min()} of 200 results"


def test_search_params_helper_clamps_efsearch_to_k():
    """memoryd.storage.faiss_index.search_params: what the shard search needs (above)."""
    from memoryd.storage import faiss_index as fx

    index = fx.build(32, "HNSW16|efSearch=8", "l2")
    x = gaussian(3000, 32, 40)
    index.add_with_ids(x, np.arange(3000, dtype=np.int64) + 5)
    q = gaussian(8, 32, 41)
    assert fx.search_params(index, 8) is None                  # efSearch >= k: its own
    _, ids = index.search(q, 200, params=fx.search_params(index, 200))
    assert (ids >= 5).all()


def test_old_banks_with_bad_search_params_open_clamped():
    """A bank made before the checks keeps working: its parameters are clamped when
    its index is built or read back (nprobe 0 -> 1, efSearch 2^31-1 -> 4096)."""
    from memoryd.storage import faiss_index as fx

    assert fx._ivf(fx.build(8, "IVF4,Flat|nprobe=0", "l2")).nprobe == 1
    assert fx._hnsw(fx.build(8, "HNSW8|efSearch=0", "l2")).efSearch == 1
    assert fx._hnsw(fx.build(8, "HNSW8|efSearch=2147483647", "l2")).efSearch == 4096
    for unsafe in ("HNSW1", "HNSW0"):        # builds (an old bank opens), refuses every add
        index = fx.build(8, unsafe, "l2")          # (planning one asks bytes_per_vector)
        with pytest.raises(errors.InvalidArgument, match="M < 2"):
            fx.bytes_per_vector(index, 8)


# ---- 4. requests that would make the daemon allocate without bound ------------------------

def test_absurd_product_key_bank_refused_before_allocating(env):
    from conftest import new_spec

    for spec in (new_spec(dim=64, value_dim=65536, index="product-keys:65536"),   # 1 PiB
                 new_spec(dim=65536, value_dim=0, index="product-keys:65536")):   # 32 GiB keys
        refuses(env, errors.InvalidArgument, r"product-key bank .* of RAM",
                env.mem.create_bank, spec)
        assert spec.name not in [b.name for b in env.mem.list_banks()]


def test_product_key_bank_over_its_quota_refused_up_front(env):
    from conftest import new_spec

    spec = new_spec(dim=64, value_dim=64, index="product-keys:1024", quota_bytes=10**6)
    err = refuses(env, errors.QuotaExceeded, r"quota", env.mem.create_bank, spec)
    assert err.limit == 10**6 and err.requested > 256 * 2**20
    assert spec.name not in [b.name for b in env.mem.list_banks()]


# ---- 5. enums and integers from the wire -----------------------------------------------------

def test_unknown_kind_from_the_wire_is_refused_not_domain():
    from memoryd.wire import messages

    spec = messages.spec_from_pb(pb.BankSpec(name="x", dim=4, kind=9))
    with pytest.raises(errors.InvalidArgument, match="kind"):
        spec.validated()


@pytest.mark.parametrize("q", [-2, -5, -(2**63)])
def test_negative_quota_from_the_wire_is_refused_not_unlimited(q):
    from memoryd.wire import messages

    assert messages.quota_from_pb(-1) is None
    with pytest.raises(errors.InvalidArgument, match="quota"):
        messages.quota_from_pb(q)
    with pytest.raises(errors.InvalidArgument, match="quota"):
        messages.spec_from_pb(pb.BankSpec(name="x", dim=4, quota_bytes=q))
    with pytest.raises(errors.InvalidArgument, match="quota"):
        messages.session_spec_from_pb(pb.SessionSpec(dim=4, quota_bytes=q))


def test_bank_info_of_a_spec_refused_today_still_encodes():
    """A bank made before a check (here: efSearch=0) must still be listed."""
    from memoryd.wire import messages

    old = api.BankInfo(spec=api.BankSpec("old", dim=8, index="HNSW8|efSearch=0"))
    assert messages.info_from_pb(messages.info_to_pb(old)).spec.index == "HNSW8|efSearch=0"


# ---- 6. 0-d arrays (scalars) and other non-arrays: INVALID_ARGUMENT ---------------------------

@pytest.mark.parametrize("what", ["keys", "values", "scalar-list", "ragged", "object"])
def test_add_non_arrays(env, what):
    k, v = keys_(1), vals_(1)
    bad = {"keys": (np.float32(1.0), v), "values": (k, np.float32(2.0)),
           "scalar-list": (3.0, v), "ragged": ([[1.0, 2.0], [3.0]], v),
           "object": (np.array([[object()] * DIM]), v)}[what]
    refuses(env, errors.InvalidArgument, r"2-d|array|numeric|dtype", env.mem.add, env.bank, *bad)


def test_append_scalar_keys(env):
    from memoryd.api import SessionSpec

    sid = env.mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM)).session_id
    refuses(env, errors.InvalidArgument, r"2-d", env.mem.append, sid, np.float32(1.0), vals_(1))


# ---- 7. SIGTERM after a burst of malformed and half-open requests: exit 0 in time ---------

def test_sigterm_after_a_burst_exits_within_grace(tmp_path):
    """A burst of malformed requests, client streams left open (half-open: the
    handler waits on the request iterator), unread server streams, and searches that
    run for seconds inside FAISS; then SIGTERM. The daemon exits 0 within grace + 5 s
    (it used to wait in server.stop, and then on the bank locks, far beyond it)."""
    grace = 2.0                              # WireDaemon's --grace
    d = WireDaemon()
    stop_d = d
    try:
        d.ok("CreateBank", pb.CreateBankRequest(spec=pb.BankSpec(
            name="b", dim=W_DIM, value_dim=W_VDIM, quota_bytes=-1)))
        d.ok("Add", pb.AddRequest(bank="b", keys=T(f32(5000)), values=T(f32(5000, W_VDIM, 1))))
        release = threading.Event()

        def half_open(first):
            if first is not None:
                yield first
            release.wait(60)                 # never finishes the stream by itself

        pending = []
        stubs = [pb_grpc.MemoryStub(grpc.insecure_channel(
            grpc_target(d.address), options=CHANNEL_OPTIONS)) for _ in range(3)]
        for i in range(8):
            s = stubs[i % 3]
            pending += [s.Add.future(half_open(None)),
                        s.Add.future(half_open(_add(bank="b"))),    # valid, never finished
                        s.Add.future(half_open(_add(bank="b", ids=i64(-1)))),    # malformed
                        s.Add.future(half_open(_add(bank="nope"))),
                        s.Append.future(half_open(pb.AppendRequest(session_id="nope"))),
                        s.UpdateValues.future(half_open(pb.UpdateValuesRequest(bank="b"))),
                        s.Export(pb.ExportRequest(bank="b", chunk_rows=1)),          # unread
                        s.CreateBank.future(_spec(name="../x", index="HNSW0")),
                        s.SearchOne.future(_search(k=-5)),
                        s.Add.future(iter([_add(bank="b", keys=T(np.float32(1)))]))]
        for _ in range(4):                   # seconds of FAISS work each, replies unread
            pending.append(stubs[0].Search(pb.SearchRequest(
                banks=["b"], k=4096, values=True, keys=True, queries=T(f32(2000, seed=9)))))
        time.sleep(2.0)
        assert d.proc.poll() is None
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            code = d.proc.wait(grace + 5)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            pytest.fail(f"SIGTERM did not end the daemon in time:\n{d.log()[-3000:]}")
        took = time.monotonic() - t0
        release.set()
        assert code == 0, d.log()[-3000:]
        assert took <= grace + 5, f"{took:.1f} s"
        assert not (d.data_dir / "memoryd.sock").exists()
        # and the data dir opens again, with what was acknowledged
        from memoryd.engine import LocalMemory

        with LocalMemory(d.data_dir, reap_interval=None) as again:
            assert again.bank_info("b").count == 5000
        stop_d = None
    finally:
        if stop_d is not None:
            stop_d.proc.kill()
        shutil.rmtree(d.root, ignore_errors=True)


# ---- 8. one user per data dir: LocalMemory holds it, a second user is refused ------------

def test_second_local_memory_on_a_data_dir_is_refused(tmp_path):
    from memoryd.engine.datadir import DataDirInUse
    from memoryd.engine import LocalMemory

    with LocalMemory(tmp_path / "d", reap_interval=None) as first:
        first.create_bank(api.BankSpec("mine", dim=4))
        with pytest.raises(DataDirInUse, match=rf"in use by process {os.getpid()}") as ei:
            LocalMemory(tmp_path / "d", reap_interval=None)
        assert isinstance(ei.value, errors.FailedPrecondition)
        assert str(tmp_path / "d") in str(ei.value)
        assert [b.name for b in first.list_banks()] == ["mine"]
    with LocalMemory(tmp_path / "d", reap_interval=None) as again:   # released by close()
        assert [b.name for b in again.list_banks()] == ["mine"]


def test_data_dir_served_by_a_daemon_cannot_be_opened_in_process():
    """The daemon's data dir: LocalMemory and `memctl --data-dir` are refused with
    one line (a bank they made would show in the daemon's list, yet be NOT_FOUND)."""
    from click.testing import CliRunner

    from memctl.cli import main
    from memoryd.engine.datadir import DataDirInUse
    from memoryd.engine import LocalMemory

    d = WireDaemon()
    try:
        with pytest.raises(DataDirInUse, match=rf"in use by process {d.proc.pid}"):
            LocalMemory(d.data_dir, reap_interval=None)
        r = CliRunner().invoke(main, ["--data-dir", str(d.data_dir), "bank", "create", "sneak",
                                      "--dim", "4"])
        assert r.exit_code == 1
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "in use by process" in lines[0], r.output
        assert "Traceback" not in r.output
        assert d.ok("ListBanks", pb.ListBanksRequest()).banks == []
        from daemon_util import daemon_env, serve_args

        second = subprocess.run(serve_args(d.data_dir), capture_output=True, text=True,
                                timeout=60, env=daemon_env())
        assert second.returncode == 1
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "already serving" in err[0], second.stderr
        d.alive()
    finally:
        assert d.close() == 0


@pytest.mark.parametrize("index", ["PQ2", "IVF2,Flat"])
def test_untrained_index_on_mmap_snapshots(env, tmp_path, index):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=0, index=index, tier="mmap")
    refuses(env, errors.NeedsTraining, r"train", env.mem.add, spec.name, keys_(1))
    env.mem.set_tier(spec.name, "ram")              # checkpoints the shard on mmap first
    assert env.mem.bank_info(spec.name).count == 0
    env.mem.set_tier(spec.name, "mmap")             # and the backend's close checkpoints it too


def test_result_size_bound():
    """api.check_result_size: what a search / get must pass before FAISS allocates its
    reply (the engine asks it: test_absurd_result_sizes_are_refused_before_searching)."""
    api.check_result_size(16384, 32, 64 * 2)                   # a training forward's search
    api.check_result_size(1, api.MAX_K, 65536 * 4)             # one query, widest values
    for nq, k, payload in ((100_000, 4096, 0), (5000, 4096, 0), (100, 4096, 65536 * 4)):
        with pytest.raises(errors.InvalidArgument, match="results"):
            api.check_result_size(nq, k, payload)


def test_absurd_result_sizes_are_refused_before_searching(env):
    spec = env.make_bank(env.mem, dim=DIM, value_dim=0)
    env.mem.add(spec.name, keys_(10))
    q = np.zeros((5000, DIM), np.float32)              # 5000 x 4096 = 20M results > MAX_RESULTS
    refuses(env, errors.InvalidArgument, r"results", env.mem.search, spec.name, q, api.MAX_K)


def test_half_open_write_is_not_applied_at_shutdown():
    """Valid client streams left open at SIGTERM: the client never finished them, so
    none may be written. gRPC Python ends a cancelled call's request iterator as if
    the client had closed the stream, and the handlers applied what they had: 11 of 12
    such adds were written. The daemon's ShutdownGate refuses them now."""
    d = WireDaemon()
    try:
        d.ok("CreateBank", pb.CreateBankRequest(spec=pb.BankSpec(
            name="b", dim=W_DIM, value_dim=W_VDIM, quota_bytes=-1)))
        release = threading.Event()

        def half_open(first):
            yield first
            release.wait(60)

        stub = pb_grpc.MemoryStub(grpc.insecure_channel(grpc_target(d.address),
                                                        options=CHANNEL_OPTIONS))
        pending = [stub.Add.future(half_open(_add(bank="b"))) for _ in range(12)]
        time.sleep(1.0)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        release.set()
        from memoryd.engine import LocalMemory

        with LocalMemory(d.data_dir, reap_interval=None) as again:
            assert again.bank_info("b").count == 0
        del pending
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        shutil.rmtree(d.root, ignore_errors=True)
