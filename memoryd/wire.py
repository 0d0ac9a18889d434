"""Proto <-> Python for the wire: tensors as raw little-endian bytes + dtype
+ shape, and the bank messages. Used by the service and by MemoryClient.

Message size: both ends allow MAX_MESSAGE_BYTES per message, deliberately
above gRPC's 4 MiB default, and big payloads are split into chunks of about
CHUNK_BYTES (Python gRPC moves ~1 GB/s in 1-16 MB messages but much less in
one 64 MB message).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from memoryd import api
from memoryd.arrays import BFLOAT16
from memoryd.errors import InvalidArgument
from memoryd.v1 import memory_pb2 as pb

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

_TO_PB = {
    np.dtype(np.float32): pb.FLOAT32,
    np.dtype(np.float16): pb.FLOAT16,
    BFLOAT16: pb.BFLOAT16,
    np.dtype(np.int64): pb.INT64,
    np.dtype(np.int32): pb.INT32,
}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
_DTYPE_NAME_TO_PB = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16}
_PB_TO_DTYPE_NAME = {v: k for k, v in _DTYPE_NAME_TO_PB.items()}
_KIND = {"base": pb.BASE, "domain": pb.DOMAIN, "session": pb.SESSION}
_KIND_BACK = {v: k for k, v in _KIND.items()}
_METRIC = {"l2": pb.L2, "ip": pb.IP}
_METRIC_BACK = {v: k for k, v in _METRIC.items()}


def encode(a: np.ndarray) -> pb.Tensor:
    """numpy -> Tensor (little-endian, C order)."""
    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in "=|" else a.dtype
    if dt not in _TO_PB:
        raise InvalidArgument(f"cannot send dtype {a.dtype} over the wire")
    a = np.asarray(a, dtype=dt, order="C")  # (ascontiguousarray would make 0-d 1-d)
    return pb.Tensor(dtype=_TO_PB[dt], shape=a.shape, data=a.tobytes())


def decode(t: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """Tensor -> numpy (read-only view of the message bytes), validated."""
    if t.dtype not in _FROM_PB:
        raise InvalidArgument(f"{what}: unknown or missing dtype {t.dtype}")
    dt = _FROM_PB[t.dtype]
    shape = tuple(t.shape)
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {shape}")
    expected = math.prod(shape) * dt.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(t.data)} bytes do not match shape {shape} of {dt.name} "
            f"({expected} bytes)")
    return np.frombuffer(t.data, dtype=dt.newbyteorder("<")).astype(dt, copy=False).reshape(shape)


def maybe_decode(msg, field: str, what: str | None = None) -> np.ndarray | None:
    return decode(getattr(msg, field), what or field) if msg.HasField(field) else None


def rows_per_chunk(row_bytes: int, total_rows: int) -> int:
    """Rows per message so that a message carries about CHUNK_BYTES."""
    return max(1, min(total_rows, CHUNK_BYTES // max(1, row_bytes)))


def chunk_slices(n: int, row_bytes: int) -> Iterator[slice]:
    step = rows_per_chunk(row_bytes, n)
    for start in range(0, max(n, 1), step):
        yield slice(start, min(n, start + step))


# ---- bank messages ---------------------------------------------------------

def spec_to_pb(s: api.BankSpec) -> pb.BankSpec:
    s.validated()  # an unknown kind/metric/dtype or a negative quota cannot travel
    return pb.BankSpec(
        name=s.name, kind=_KIND.get(s.kind, pb.KIND_UNSPECIFIED), dim=s.dim,
        value_dim=s.value_dim, value_dtype=_DTYPE_NAME_TO_PB.get(s.value_dtype, 0),
        metric=_METRIC.get(s.metric, pb.METRIC_UNSPECIFIED), index=s.index,
        shards=s.shards, quota_bytes=-1 if s.quota_bytes is None else s.quota_bytes,
        tenant=s.tenant)


def spec_from_pb(m: pb.BankSpec) -> api.BankSpec:
    """Unset enum fields take the interface defaults; bad ones are refused later."""
    d = api.BankSpec(name=m.name, dim=m.dim)
    return api.BankSpec(
        name=m.name, dim=m.dim, value_dim=m.value_dim,
        kind=_KIND_BACK.get(m.kind, d.kind) if m.kind else d.kind,
        value_dtype=_PB_TO_DTYPE_NAME.get(m.value_dtype, f"dtype#{m.value_dtype}")
        if m.value_dtype else d.value_dtype,
        metric=_METRIC_BACK.get(m.metric, f"metric#{m.metric}") if m.metric else d.metric,
        index=m.index or d.index, shards=m.shards or d.shards,
        quota_bytes=None if m.quota_bytes < 0 else m.quota_bytes,
        tenant=m.tenant or d.tenant)


def info_to_pb(i: api.BankInfo) -> pb.BankInfo:
    return pb.BankInfo(
        spec=spec_to_pb(i.spec), count=i.count, used_bytes=i.used_bytes, frozen=i.frozen,
        trained=i.trained, checksum=i.checksum, created_at=i.created_at,
        updated_at=i.updated_at)


def info_from_pb(m: pb.BankInfo) -> api.BankInfo:
    return api.BankInfo(
        spec=spec_from_pb(m.spec), count=m.count, used_bytes=m.used_bytes, frozen=m.frozen,
        trained=m.trained, checksum=m.checksum, created_at=m.created_at,
        updated_at=m.updated_at)


def quota_to_pb(q: int | None) -> int:
    if q is not None and q < 0:
        raise InvalidArgument(f"quota must not be negative; got {q}")
    return -1 if q is None else q


def quota_from_pb(q: int) -> int | None:
    return None if q < 0 else q


def stats_to_pb(s: api.Stats) -> pb.StatsResponse:
    return pb.StatsResponse(
        version=s.version, data_dir=str(s.data_dir), catalog_url=s.catalog_url,
        uptime_s=s.uptime_s, banks=[info_to_pb(b) for b in s.banks],
        used_bytes=s.used_bytes, num_gpus=s.num_gpus)


def stats_from_pb(m: pb.StatsResponse) -> api.Stats:
    return api.Stats(
        version=m.version, data_dir=m.data_dir, catalog_url=m.catalog_url,
        uptime_s=m.uptime_s, banks=[info_from_pb(b) for b in m.banks],
        used_bytes=m.used_bytes, num_gpus=m.num_gpus)


def grpc_target(address: str) -> str:
    """A gRPC target for 'unix:///abs.sock', 'unix:rel.sock', 'host:port' or a bare path."""
    return f"unix://{address}" if address.startswith("/") else address
