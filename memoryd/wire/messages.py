"""The message codec: memoryd.api value types <-> memoryd.v1 messages, both ends.

Enums that the proto carries as enums (kind, metric, value dtype) map both
ways; an unset enum takes the interface default, an unknown one becomes a
name the backend refuses (e.g. "metric#7", "kind#9": INVALID_ARGUMENT, never
a default). Quotas are int64 with -1 for unlimited; any other negative quota
is INVALID_ARGUMENT (quota_from_pb). Strings (tier, eviction, names) and
numbers (dims, shards, TTLs, k, dedup) travel as they are and the backend
checks them (BankSpec/SessionSpec.validated, api.check_k, ...). Tensors go
through memoryd.wire.tensors.
"""
from __future__ import annotations

import numpy as np

from memoryd import api
from memoryd.errors import InvalidArgument
from memoryd.v1 import memory_pb2 as pb
from memoryd.wire.tensors import decode, encode

_DTYPE_NAME_TO_PB = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
_PB_TO_DTYPE_NAME = {v: k for k, v in _DTYPE_NAME_TO_PB.items()}
_KIND = {"base": pb.BASE, "domain": pb.DOMAIN, "session": pb.SESSION}
_KIND_BACK = {v: k for k, v in _KIND.items()}
_METRIC = {"l2": pb.L2, "ip": pb.IP}
_METRIC_BACK = {v: k for k, v in _METRIC.items()}


# ---- bank messages ---------------------------------------------------------

def spec_to_pb(s: api.BankSpec, check: bool = True) -> pb.BankSpec:
    """check=False for a spec the daemon already holds (BankInfo): one that a
    later, stricter check refuses must still be listed, not break ListBanks."""
    if check:
        s.validated()  # an unknown kind/metric/dtype or a negative quota cannot travel
    return pb.BankSpec(
        name=s.name, kind=_KIND.get(s.kind, pb.KIND_UNSPECIFIED), dim=s.dim,
        value_dim=s.value_dim, value_dtype=_DTYPE_NAME_TO_PB.get(s.value_dtype, 0),
        metric=_METRIC.get(s.metric, pb.METRIC_UNSPECIFIED), index=s.index,
        shards=s.shards, quota_bytes=-1 if s.quota_bytes is None else s.quota_bytes,
        tenant=s.tenant, tier=s.tier, eviction=s.eviction, key_version=s.key_version)


def spec_from_pb(m: pb.BankSpec) -> api.BankSpec:
    """Unset enum fields take the interface defaults; bad ones are refused later."""
    d = api.BankSpec(name=m.name, dim=m.dim)
    return api.BankSpec(
        name=m.name, dim=m.dim, value_dim=m.value_dim,
        kind=_KIND_BACK.get(m.kind, f"kind#{m.kind}") if m.kind else d.kind,
        value_dtype=_PB_TO_DTYPE_NAME.get(m.value_dtype, f"dtype#{m.value_dtype}")
        if m.value_dtype else d.value_dtype,
        metric=_METRIC_BACK.get(m.metric, f"metric#{m.metric}") if m.metric else d.metric,
        index=m.index or d.index, shards=m.shards or d.shards,
        quota_bytes=quota_from_pb(m.quota_bytes),
        tenant=m.tenant or d.tenant, tier=m.tier or d.tier, eviction=m.eviction or d.eviction,
        key_version=m.key_version)


def info_to_pb(i: api.BankInfo) -> pb.BankInfo:
    return pb.BankInfo(
        spec=spec_to_pb(i.spec, check=False), count=i.count, used_bytes=i.used_bytes,
        frozen=i.frozen, trained=i.trained, checksum=i.checksum, created_at=i.created_at,
        updated_at=i.updated_at, tier_bytes=i.tier_bytes, data_bytes=i.data_bytes)


def info_from_pb(m: pb.BankInfo) -> api.BankInfo:
    return api.BankInfo(
        spec=spec_from_pb(m.spec), count=m.count, used_bytes=m.used_bytes, frozen=m.frozen,
        trained=m.trained, checksum=m.checksum, created_at=m.created_at,
        updated_at=m.updated_at, tier_bytes=dict(m.tier_bytes), data_bytes=m.data_bytes)


def quota_to_pb(q: int | None) -> int:
    """-1 for unlimited; a negative or fractional quota cannot travel (int64, -1 taken)."""
    q = api.check_quota(q)
    return -1 if q is None else q


def quota_from_pb(q: int) -> int | None:
    """-1 -> None (unlimited); any other negative quota is INVALID_ARGUMENT, not
    "unlimited" (a client's arithmetic gone negative must not lift a quota)."""
    if q == -1:
        return None
    if q < 0:
        raise InvalidArgument(f"quota must be >= 0 bytes, or -1 for unlimited; got {q}")
    return q


def optional_from_pb(m, field: str) -> float | None:
    """A proto3 `optional` scalar: None when unset (so 0 stays a value)."""
    return getattr(m, field) if m.HasField(field) else None


# ---- search stacks -----------------------------------------------------------

def is_plain(stack: list[api.BankQuery]) -> bool:
    """True when every entry has default options (the stack travels as `banks`)."""
    return all(q == api.BankQuery(q.name) for q in stack)


def bank_query_to_pb(q: api.BankQuery) -> pb.BankQuery:
    return pb.BankQuery(name=q.name, k=0 if q.k is None else q.k, bias=q.bias,
                        exclude=not q.include)


def bank_query_from_pb(m: pb.BankQuery) -> api.BankQuery:
    """k 0 = the search's k; a negative k is refused by the backend."""
    return api.BankQuery(name=m.name, k=m.k or None, bias=m.bias, include=not m.exclude)


def row_stacks_to_pb(rs: api.RowStacks) -> list[pb.RowStack]:
    return [pb.RowStack(stack=[bank_query_to_pb(q) for q in stack], rows=n)
            for stack, n in zip(rs.stacks, rs.rows)]


def row_stacks_from_pb(ms) -> api.RowStacks:
    """InvalidArgument (api.RowStacks) for a bad stack or a negative row count."""
    return api.RowStacks(stacks=[[bank_query_from_pb(q) for q in m.stack] for m in ms],
                         rows=[m.rows for m in ms])


# ---- sessions ------------------------------------------------------------------

def session_spec_to_pb(s: api.SessionSpec) -> pb.SessionSpec:
    if not isinstance(s, api.SessionSpec):
        raise InvalidArgument(f"open_session needs a SessionSpec; got {type(s).__name__}")
    s.validated()  # an enum or number field cannot carry a bad value: refuse it here
    return pb.SessionSpec(
        dim=s.dim, value_dim=s.value_dim, value_dtype=_DTYPE_NAME_TO_PB[s.value_dtype],
        metric=_METRIC[s.metric], tenant=s.tenant, ttl_idle_s=s.ttl_idle_s,
        ttl_absolute_s=s.ttl_absolute_s, quota_bytes=quota_to_pb(s.quota_bytes),
        eviction=s.eviction)


def session_spec_from_pb(m: pb.SessionSpec) -> api.SessionSpec:
    """Unset fields take the interface defaults; bad ones are refused by the backend."""
    d = api.SessionSpec(dim=m.dim)
    return api.SessionSpec(
        dim=m.dim, value_dim=m.value_dim,
        value_dtype=_PB_TO_DTYPE_NAME.get(m.value_dtype, f"dtype#{m.value_dtype}")
        if m.value_dtype else d.value_dtype,
        metric=_METRIC_BACK.get(m.metric, f"metric#{m.metric}") if m.metric else d.metric,
        tenant=m.tenant or d.tenant, ttl_idle_s=optional_from_pb(m, "ttl_idle_s"),
        ttl_absolute_s=optional_from_pb(m, "ttl_absolute_s"),
        quota_bytes=quota_from_pb(m.quota_bytes), eviction=m.eviction or d.eviction)


def session_to_pb(i: api.SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=i.session_id, tenant=i.tenant, created_at=i.created_at,
        last_used_at=i.last_used_at, expires_at=i.expires_at, ttl_idle_s=i.ttl_idle_s,
        ttl_absolute_s=i.ttl_absolute_s, bank=info_to_pb(i.bank))


def session_from_pb(m: pb.SessionInfo) -> api.SessionInfo:
    return api.SessionInfo(
        session_id=m.session_id, tenant=m.tenant, created_at=m.created_at,
        last_used_at=m.last_used_at, expires_at=optional_from_pb(m, "expires_at"),
        ttl_idle_s=optional_from_pb(m, "ttl_idle_s"),
        ttl_absolute_s=optional_from_pb(m, "ttl_absolute_s"), bank=info_from_pb(m.bank))


def promote_to_pb(r: api.PromoteResult) -> pb.PromoteSessionResponse:
    return pb.PromoteSessionResponse(
        promoted=r.promoted, duplicates=r.duplicates,
        target_ids=encode(np.asarray(r.target_ids, dtype=np.int64)),
        source_ids=encode(np.asarray(r.source_ids, dtype=np.int64)), moved=r.moved)


def promote_from_pb(m: pb.PromoteSessionResponse) -> api.PromoteResult:
    return api.PromoteResult(
        promoted=m.promoted, duplicates=m.duplicates,
        target_ids=decode(m.target_ids, "target_ids").copy(),
        source_ids=decode(m.source_ids, "source_ids").copy(), moved=m.moved)


# ---- tenants and stats -------------------------------------------------------------

def tenant_to_pb(t: api.TenantInfo) -> pb.TenantInfo:
    return pb.TenantInfo(name=t.name, quota_bytes=quota_to_pb(t.quota_bytes),
                         used_bytes=t.used_bytes, banks=t.banks, sessions=t.sessions,
                         tier_bytes=t.tier_bytes)


def tenant_from_pb(m: pb.TenantInfo) -> api.TenantInfo:
    return api.TenantInfo(name=m.name, quota_bytes=quota_from_pb(m.quota_bytes),
                          used_bytes=m.used_bytes, banks=m.banks, sessions=m.sessions,
                          tier_bytes=dict(m.tier_bytes))


def stack_to_pb(u: api.StackUse) -> pb.StackUse:
    return pb.StackUse(client=u.client, banks=list(u.banks), searches=u.searches,
                       last_used_at=u.last_used_at)


def stack_from_pb(m: pb.StackUse) -> api.StackUse:
    return api.StackUse(client=m.client, banks=tuple(m.banks), searches=m.searches,
                        last_used_at=m.last_used_at)


def stats_to_pb(s: api.Stats) -> pb.StatsResponse:
    return pb.StatsResponse(
        version=s.version, data_dir=str(s.data_dir), catalog_url=s.catalog_url,
        uptime_s=s.uptime_s, banks=[info_to_pb(b) for b in s.banks],
        used_bytes=s.used_bytes, num_gpus=s.num_gpus,
        stacks=[stack_to_pb(u) for u in s.stacks], tenants=[tenant_to_pb(t) for t in s.tenants])


def stats_from_pb(m: pb.StatsResponse) -> api.Stats:
    return api.Stats(
        version=m.version, data_dir=m.data_dir, catalog_url=m.catalog_url,
        uptime_s=m.uptime_s, banks=[info_from_pb(b) for b in m.banks],
        used_bytes=m.used_bytes, num_gpus=m.num_gpus,
        stacks=[stack_from_pb(u) for u in m.stacks],
        tenants=[tenant_from_pb(t) for t in m.tenants])


# ---- acknowledgement levels (memoryd.storage.wal) --------------------------------------
_ACKS = {pb.ACK_DEFAULT: None, pb.ACK_APPLIED: "applied", pb.ACK_DURABLE: "durable"}


def ack_from_pb(value: int) -> str | None:
    """The wire's Ack as the backend's ack= (None: the default); unknown: INVALID_ARGUMENT."""
    try:
        return _ACKS[value]
    except KeyError:
        raise InvalidArgument(f"unknown ack {value}: send ACK_APPLIED or ACK_DURABLE") from None


def ack_to_pb(ack: str | None) -> int:
    if ack is None:
        return pb.ACK_DEFAULT
    for value, name in _ACKS.items():
        if name == ack:
            return value
    raise InvalidArgument(f"ack must be one of applied, durable; got {ack!r}")


# ---- snapshots and backups ----------------------------------------------------------
def snapshot_to_pb(info: api.SnapshotInfo) -> pb.SnapshotInfo:
    return pb.SnapshotInfo(path=info.path, bank=info.bank, count=info.count,
                           used_bytes=info.used_bytes, checksum=info.checksum, banks=list(info.banks))


def snapshot_from_pb(m: pb.SnapshotInfo) -> api.SnapshotInfo:
    return api.SnapshotInfo(path=m.path, bank=m.bank, count=m.count, used_bytes=m.used_bytes,
                            checksum=m.checksum, banks=tuple(m.banks))
