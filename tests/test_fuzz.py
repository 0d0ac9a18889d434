"""Fuzzing the daemon on the wire (hypothesis), against `memoryd serve` in a subprocess.

Two kinds of input for every method of memoryd.v1.Memory (found in the service
descriptor, so a new RPC is fuzzed without a change here):

  * random protobuf messages built from the request's descriptor: every field
    maybe set, integers drawn from each type's extremes (0, -1, 2^31 - 1, 2^63 - 1,
    -2^63, ...) and small values, names from the fixture's banks and session plus
    junk ("", "../x", "a/b"), index specs good and bad, tensors well formed (bytes
    matching dtype and shape) or not (any dtype, shape and bytes), streams of 0-3
    messages;
  * random raw bytes as the request (gRPC's generic calls, no serializer).

Every call must end with a status in ACCEPTED (a precise one: never INTERNAL or
UNKNOWN), with ONE exception: bytes that do not parse as the request message are
refused by gRPC Python itself, before any handler, as INTERNAL "Exception
deserializing request!" (see DESERIALIZE_INTERNAL). After each call the daemon is
alive; at the end its RSS grew by less than RSS_GROWTH_BYTES, and no file appeared
outside its data dir (its working dir and TMPDIR are watched; snapshot and backup
paths are drawn inside a sandbox folder, or relative, which must be refused).

Runtime in the suite: under a minute (MEMORYD_FUZZ_EXAMPLES=40 examples per method and
kind, derandomized: the same examples every run). Run it longer, and with fresh random
examples, with e.g.

    MEMORYD_FUZZ_EXAMPLES=2000 MEMORYD_FUZZ_RANDOM=1 .venv/bin/python -m pytest -q tests/test_fuzz.py

(hypothesis's database in .hypothesis/ keeps and replays what failed).
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as _d
from google.protobuf.message import DecodeError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_bad_input import METHODS, W_DIM, W_VDIM, WireDaemon, T, f32, pb  # noqa: E402

EXAMPLES = int(os.environ.get("MEMORYD_FUZZ_EXAMPLES", "40"))
RSS_GROWTH_BYTES = 200 << 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                derandomize=not os.environ.get("MEMORYD_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
# Precise statuses a malformed request may end with. OK: many random requests are
# valid (a bank name drawn from the fixture's). RESOURCE_EXHAUSTED: a quota, or a
# message over gRPC's size limit. PERMISSION_DENIED/UNAUTHENTICATED cannot happen here
# (auth off) but are precise. DEADLINE_EXCEEDED is NOT accepted: no request may hang.
ACCEPTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION",
            "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "PERMISSION_DENIED", "UNAUTHENTICATED"}
DESERIALIZE_INTERNAL = "Exception deserializing request!"   # gRPC Python's own, see module doc
# It found two INTERNALs (Append with 0-d keys; SetTier/SnapshotBank/close of an
# untrained index on tier mmap), fixed, each with a test of its own in test_bad_input.py.

EXTREME = [0, 1, -1, 2, 3, 8, 255, 256, 4096, 4097, 65536, 65537, 2**31 - 1, -(2**31), 2**31,
           2**32, 2**53, 2**62, 2**62 - 1, 2**63 - 1, -(2**63), 2**64 - 1]
RANGES = {_d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
          _d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
          _d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
          _d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
          _d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
          _d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
          _d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
          _d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
          _d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
          _d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1)}
SID = "$SID"      # replaced by the fixture's live session id at call time
NAMES = ["t", "k", "ice", "base", SID, "", "nope", "../x", "a/b", "/etc", ".", "x" * 65,
         "t\x00", "naïve", "default", "acme"]
INDEX = ["Flat", "HNSW8", "HNSW8|efSearch=1", "IVF2,Flat", "IVF2,Flat|nprobe=2", "PQ2",
         "SQ8", "product-keys:4", "product-keys:8|seed=3", "HNSW0", "HNSW1", "NSG8",
         "IVF4,Flat|nprobe=0", "HNSW32|efSearch=2147483647", "PQ4x16", "", "Flat|", "|",
         "IVF1048577,Flat", "product-keys:65536", "x" * 300]
WORDS = ["ram", "mmap", "gpu", "reject", "fifo", "read", "write", "admin", "", "RAM", "lru",
         "x" * 300]


def _sandbox() -> str:
    return "$SANDBOX"     # replaced by <daemon root>/sandbox/<n>: snapshot/backup paths


@st.composite
def tensors(draw) -> pb.Tensor:
    if draw(st.booleans()):                                     # well formed
        dt = draw(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.INT64, pb.INT32]))
        item = 8 if dt == pb.INT64 else 2 if dt in (pb.FLOAT16, pb.BFLOAT16) else 4
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, W_VDIM, W_DIM, 5]), max_size=3))
        n = int(np.prod(shape)) if shape else 1
        special = draw(st.sampled_from([None, "nan", "inf", "big"]))
        if dt == pb.FLOAT32 and special is not None and n:
            a = np.full(n, {"nan": np.nan, "inf": np.inf, "big": 3e38}[special], np.float32)
            data = a.tobytes()
        else:
            data = draw(st.binary(min_size=n * item, max_size=n * item))
        return pb.Tensor(dtype=dt, shape=shape, data=data)
    kw = dict(dtype=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 99, -1, 2**31 - 1])),
              shape=draw(st.lists(st.sampled_from([v for v in EXTREME if v < 2**63] + [-2, 5, 7]),
                                  max_size=5)),
              data=draw(st.binary(max_size=64)))
    if draw(st.booleans()):
        kw["buffer_offset"] = draw(st.sampled_from([0, 1, 4096, 2**63, 2**64 - 1]))
    return pb.Tensor(**kw)


def _scalar(f: _d.FieldDescriptor):
    t = f.type
    if t in RANGES:
        lo, hi = RANGES[t]
        return st.one_of(st.sampled_from([v for v in EXTREME if lo <= v <= hi]),
                         st.integers(lo, hi), st.integers(-2, 40))
    if t == _d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, -0.0, -1.0, 0.5, 1.0, 1e300, float("nan"),
                                          float("inf"), -float("inf"), 1e-320]),
                         st.floats(allow_nan=True, allow_infinity=True, width=64))
    if t == _d.FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in f.enum_type.values]
        return st.sampled_from(values + [max(values) + 1, 99, -1, 2**31 - 1])
    if t == _d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    # strings: by what the field names
    name = f.name
    if name == "index":
        return st.one_of(st.sampled_from(INDEX), st.text(max_size=20))
    if name == "path":
        return st.one_of(st.just(_sandbox()), st.sampled_from(["", "x", "../x", "a/b"]))
    if name in ("tier", "eviction", "role"):
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=8))
    if name in ("reply_buffer", "handle"):
        return st.one_of(st.sampled_from(["", "feedface", "x" * 64]), st.text(max_size=8))
    return st.one_of(st.sampled_from(NAMES), st.text(max_size=12))


def _field(f: _d.FieldDescriptor, depth: int):
    if f.message_type is not None:
        if f.message_type.full_name == "memoryd.v1.Tensor":
            one = tensors()
        elif f.message_type.GetOptions().map_entry or depth > 3:
            return None
        else:
            one = messages(f.message_type, depth + 1)
    else:
        one = _scalar(f)
    if f.is_repeated:
        return st.lists(one, max_size=3)
    return one


@st.composite
def messages(draw, desc: _d.Descriptor, depth: int = 0):
    """A message of type desc, each field set or not, with values as above."""
    kw = {}
    for f in desc.fields:
        strat = _field(f, depth)
        if strat is None or not draw(st.booleans()):
            continue
        kw[f.name] = draw(strat)
    cls = getattr(pb, desc.name)
    msg = cls()
    for name, value in kw.items():
        field = desc.fields_by_name[name]
        try:
            if field.is_repeated:
                getattr(msg, name).extend(value)
            elif field.message_type is not None:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError):   # e.g. a surrogate in a string: not sendable
            pass
    return msg


# ---- near-valid requests, then a mutation: reaches past the first check ---------------

BANKS = st.sampled_from(["t", "t", "k", "base", SID, "ice", "pk"])
FRESH = st.text("abcdefgh0123456789", min_size=1, max_size=8).map(lambda s: "f" + s)


@st.composite
def rows(draw, cols: int = W_DIM, dtype=np.float32, n=None):
    n = draw(st.integers(1, 5)) if n is None else n
    a = draw(st.sampled_from([0, 1, 2])) == 0
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((n, cols))
    if a:                                           # extreme values (3e38 * 2: inf in fp32)
        x *= draw(st.sampled_from([1e-30, 1e30, 3e38]))
    with np.errstate(over="ignore"):
        return T(x.astype(dtype))


@st.composite
def id_tensor(draw, n=None):
    n = draw(st.integers(1, 5)) if n is None else n
    ids = draw(st.lists(st.sampled_from([0, 1, 5, 19, 20, 10**6, 2**62 - 1, 2**62, 2**63 - 1,
                                         -1, -(2**63)]) | st.integers(0, 10**6),
                        min_size=n, max_size=n))
    return T(np.array(ids, np.int64))


def _templates():
    """method -> strategy of a plausible request (a list of messages for streams)."""
    spec = st.builds(
        pb.BankSpec, name=FRESH, dim=st.sampled_from([1, 2, 4, 8, 16]),
        value_dim=st.sampled_from([0, 1, 4, 8]), kind=st.sampled_from([0, 1, 2, 3]),
        value_dtype=st.sampled_from([0, 1, 2, 3]), metric=st.sampled_from([0, 1, 2]),
        index=st.sampled_from(INDEX), shards=st.sampled_from([0, 1, 2, 3]),
        quota_bytes=st.sampled_from([-1, 0, 10**4, 10**9]),
        tier=st.sampled_from(["", "ram", "mmap"]), eviction=st.sampled_from(["", "reject", "fifo"]))
    sess = st.builds(pb.SessionSpec, dim=st.just(W_DIM), value_dim=st.sampled_from([0, W_VDIM]),
                     quota_bytes=st.sampled_from([-1, 10**5]),
                     ttl_idle_s=st.sampled_from([60.0, 0.01, 1e9]),
                     eviction=st.sampled_from(["reject", "fifo"]))
    n = st.integers(1, 5)
    add = n.flatmap(lambda k: st.builds(pb.AddRequest, bank=BANKS, keys=rows(n=k),
                                        values=rows(W_VDIM, n=k), ids=id_tensor(n=k)))
    query = st.builds(pb.SearchRequest, banks=st.lists(BANKS, min_size=1, max_size=3),
                      queries=rows(), k=st.sampled_from([1, 3, 20, 64, 4096]),
                      values=st.booleans(), keys=st.booleans())
    stack = st.builds(pb.BankQuery, name=BANKS, k=st.sampled_from([0, 1, 5]),
                      bias=st.sampled_from([0.0, 0.5, -2.0]), exclude=st.booleans())
    query2 = st.builds(pb.SearchRequest, stack=st.lists(stack, min_size=1, max_size=3),
                       queries=rows(), k=st.sampled_from([1, 8]))
    rowstack = st.builds(pb.RowStack, stack=st.lists(stack, min_size=1, max_size=2),
                         rows=st.sampled_from([0, 1, 2]))
    query3 = st.builds(pb.SearchRequest, row_stacks=st.lists(rowstack, min_size=1, max_size=3),
                       queries=rows(n=2), k=st.sampled_from([1, 8]))
    upd = n.flatmap(lambda k: st.builds(pb.UpdateValuesRequest, bank=BANKS, ids=id_tensor(n=k),
                                        values=rows(W_VDIM, n=k)))
    app = n.flatmap(lambda k: st.builds(pb.AppendRequest, session_id=st.just(SID),
                                        keys=rows(n=k), values=rows(W_VDIM, n=k),
                                        scores=rows(1, n=k).map(lambda t: pb.Tensor(
                                            dtype=t.dtype, shape=[t.shape[0]], data=t.data))))
    stream = lambda m: st.lists(m, min_size=1, max_size=3)   # noqa: E731
    return {
        "CreateBank": st.builds(pb.CreateBankRequest, spec=spec),
        "Add": stream(add), "UpdateValues": stream(upd), "Append": stream(app),
        "Search": st.one_of(query, query2, query3), "SearchOne": st.one_of(query, query2, query3),
        "Get": st.builds(pb.GetRequest, bank=BANKS, ids=id_tensor(), values=st.booleans(),
                         keys=st.booleans()),
        "Remove": st.builds(pb.RemoveRequest, bank=BANKS, ids=id_tensor()),
        "Export": st.builds(pb.ExportRequest, bank=BANKS, chunk_rows=st.sampled_from([0, 1, 7])),
        "OpenSession": st.builds(pb.OpenSessionRequest, spec=sess),
        "PromoteSession": st.builds(pb.PromoteSessionRequest, session_id=st.just(SID),
                                    target=st.sampled_from(["t", "k", "base"]),
                                    min_score=st.sampled_from([0.0, 0.5]),
                                    dedup=st.sampled_from([0.5, 1.0]), move=st.booleans()),
        "SetQuota": st.builds(pb.SetQuotaRequest, name=BANKS,
                              quota_bytes=st.sampled_from([-1, 0, 100, 10**9])),
        "SetTier": st.builds(pb.SetTierRequest, name=BANKS, tier=st.sampled_from(["ram", "mmap"])),
        "ExtendSession": st.builds(pb.ExtendSessionRequest, session_id=st.just(SID),
                                   ttl_idle_s=st.sampled_from([1.0, 3600.0])),
        "SnapshotBank": st.builds(pb.SnapshotBankRequest, name=BANKS, path=st.just("$SANDBOX")),
        "OpenReplyBuffer": st.builds(pb.OpenReplyBufferRequest,
                                     size_bytes=st.sampled_from([1, 4096, 1 << 20])),
    }


TEMPLATES = _templates()


@st.composite
def mutated(draw, desc: _d.Descriptor, template):
    """A plausible request with 0-2 of its fields (top level or one level down) redrawn
    from the generic strategies: one wrong thing at a time reaches the deeper checks."""
    msg = draw(template)
    for m in (msg if isinstance(msg, list) else [msg]):
        for _ in range(draw(st.integers(0, 2))):
            target, tdesc = m, desc
            sub = [f for f in tdesc.fields if f.message_type is not None and not f.is_repeated
                   and f.message_type.full_name != "memoryd.v1.Tensor" and m.HasField(f.name)]
            if sub and draw(st.booleans()):
                f = draw(st.sampled_from(sub))
                target, tdesc = getattr(m, f.name), f.message_type
            f = draw(st.sampled_from(list(tdesc.fields)))
            strat = _field(f, 2)
            if strat is None:
                continue
            value = draw(strat)
            try:
                if f.is_repeated:
                    del getattr(target, f.name)[:]
                    getattr(target, f.name).extend(value)
                elif f.message_type is not None:
                    getattr(target, f.name).CopyFrom(value)
                else:
                    setattr(target, f.name, value)
            except (ValueError, TypeError):
                pass
    return msg


def _substitute(msg, sid: str, sandbox: Path, counter=[0]):  # noqa: B006 - a call counter
    """SID and SANDBOX placeholders in every string field (recursively)."""
    for f, value in msg.ListFields():
        if f.message_type is not None:
            for m in (value if f.is_repeated else [value]):
                if not (f.message_type.GetOptions().map_entry):
                    _substitute(m, sid, sandbox)
        elif f.type == _d.FieldDescriptor.TYPE_STRING:
            def sub(s: str) -> str:
                if s == "$SANDBOX":
                    counter[0] += 1
                    return str(sandbox / f"p{counter[0]}")
                return s.replace(SID, sid)
            if f.is_repeated:
                items = [sub(s) for s in value]
                del value[:]
                value.extend(items)
            else:
                setattr(msg, f.name, sub(value))


# ---- the fixture: a daemon with a few banks and a session --------------------------------

class FuzzWorld:
    def __init__(self):
        # reply buffers bounded (each is reserved up front), so a drawn size cannot grow RSS
        self.d = WireDaemon("--shm-bytes", "16MiB")
        self.sandbox = self.d.root / "sandbox"
        self.sandbox.mkdir()
        self.setup()
        self.sid = self.session()
        for name in METHODS:                    # warm every path once before measuring
            self.d.call(name, [] if METHODS[name].client_streaming else
                        getattr(pb, METHODS[name].input_type.name)())
        self.rss0 = self.d.rss_bytes()
        self.outside0 = self.outside()

    def setup(self) -> None:
        d = self.d
        have = {b.spec.name for b in d.ok("ListBanks", pb.ListBanksRequest()).banks}
        for name, kw in (("t", dict(value_dim=W_VDIM)), ("k", {}),
                         ("base", dict(kind=pb.BASE, value_dim=W_VDIM)),
                         ("ice", dict(value_dim=W_VDIM, index="HNSW8", shards=2)),
                         ("pk", dict(value_dim=W_VDIM, index="product-keys:8"))):
            if name not in have:
                d.call("CreateBank", pb.CreateBankRequest(spec=pb.BankSpec(
                    name=name, dim=W_DIM, quota_bytes=-1, **kw)))
                if name != "pk":
                    d.call("Add", pb.AddRequest(bank=name, keys=T(f32(20)),
                                                values=T(f32(20, W_VDIM)) if kw.get("value_dim")
                                                else None))
                if name == "ice":
                    d.call("FreezeBank", pb.BankRef(name="ice"))
        # the whole daemon's data stays small whatever a request asks
        d.call("SetTenantQuota", pb.SetTenantQuotaRequest(tenant="default", quota_bytes=64 << 20))

    def session(self) -> str:
        return self.d.ok("OpenSession", pb.OpenSessionRequest(spec=pb.SessionSpec(
            dim=W_DIM, value_dim=W_VDIM, quota_bytes=-1))).session_id

    def outside(self) -> set[str]:
        """Everything under the daemon's root but its data dir and the sandbox."""
        out = set()
        for p in self.d.root.rglob("*"):
            rel = p.relative_to(self.d.root)
            if rel.parts[0] not in ("data", "sandbox") and p.name != "daemon.log":
                out.add(str(rel))
        return out

    def after_call(self, method: str) -> None:
        self.d.alive()
        if method in ("DeleteBank", "CloseSession", "FreezeBank", "SetTenantQuota", "SetQuota",
                      "RestoreBank", "PromoteSession"):
            self.setup()
            if self.d.call("GetSession", pb.SessionRef(session_id=self.sid))[0] != "OK":
                self.sid = self.session()


@pytest.fixture(scope="module")
def world():
    w = FuzzWorld()
    try:
        yield w
        # ---- the checks over the whole run ----
        grown = w.d.rss_bytes() - w.rss0
        assert grown < RSS_GROWTH_BYTES, f"RSS grew by {grown / 2**20:.0f} MiB"
        assert w.outside() == w.outside0, f"files outside the data dir: {w.outside() - w.outside0}"
    finally:
        code = w.d.close()
    log = "\n".join(line for line in w.d.last_log.splitlines() if "deserializ" not in line)
    assert code == 0, log[-4000:]


def _check(method: str, code: str, detail, request_bytes: bytes | None = None) -> None:
    if code in ACCEPTED:
        return
    if code == "INTERNAL" and detail == DESERIALIZE_INTERNAL and request_bytes is not None:
        req = getattr(pb, METHODS[method].input_type.name)
        try:
            req.FromString(request_bytes)
        except DecodeError:
            return                                   # gRPC's own refusal of unparsable bytes
    pytest.fail(f"{method} ended {code}: {detail!r}")


MESSAGE_METHODS = sorted(METHODS)


@pytest.mark.parametrize("method", MESSAGE_METHODS)
def test_fuzz_messages(world, method):
    m = METHODS[method]
    one = messages(m.input_type)
    strategy = st.lists(one, max_size=3) if m.client_streaming else one
    if method in TEMPLATES:       # half near-valid-then-mutated, half anything
        strategy = st.one_of(strategy, mutated(m.input_type, TEMPLATES[method]))

    @FUZZ
    @given(request=strategy)
    def run(request):
        for r in (request if isinstance(request, list) else [request]):
            _substitute(r, world.sid, world.sandbox)
        code, detail = world.d.call(method, request, timeout=30)
        _check(method, code, detail)
        world.after_call(method)

    run()


@pytest.mark.parametrize("method", MESSAGE_METHODS)
def test_fuzz_raw_bytes(world, method):
    m = METHODS[method]
    path = f"/memoryd.v1.Memory/{method}"
    ch = world.d.channel
    if m.client_streaming:
        call = ch.stream_unary(path)
    elif m.server_streaming:
        call = ch.unary_stream(path)
    else:
        call = ch.unary_unary(path)
    chunk = st.one_of(st.binary(max_size=96),
                      messages(m.input_type).map(lambda msg: msg.SerializeToString())
                      .flatmap(lambda b: st.sampled_from([b, b[:-1], b + b"\xff", b[1:]])))

    @FUZZ
    @given(chunks=st.lists(chunk, min_size=0 if m.client_streaming else 1,
                           max_size=3 if m.client_streaming else 1))
    def run(chunks):
        try:
            if m.client_streaming:
                call(iter(chunks), timeout=30)
            elif m.server_streaming:
                list(call(chunks[0], timeout=30))
            else:
                call(chunks[0], timeout=30)
            code, detail = "OK", None
        except grpc.RpcError as e:
            code, detail = e.code().name, e.details()
        bad = [c for c in chunks if _unparsable(method, c)]
        _check(method, code, detail, bad[0] if bad else None)
        world.after_call(method)

    run()


def _unparsable(method: str, data: bytes) -> bool:
    try:
        getattr(pb, METHODS[method].input_type.name).FromString(data)
        return False
    except DecodeError:
        return True
