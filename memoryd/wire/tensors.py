"""The tensor codec: numpy <-> memoryd.v1.Tensor (raw little-endian bytes +
dtype + shape), with the checks every decoded tensor passes.

What the dtypes mean on the wire (memory.proto says the same):
    FLOAT32   IEEE 754 binary32
    FLOAT16   IEEE 754 binary16 (half precision: 1 sign, 5 exponent, 10 fraction bits)
    BFLOAT16  bfloat16 (1 sign, 8 exponent, 7 fraction bits: the top 16 bits of a
              binary32), numpy's ml_dtypes.bfloat16
    INT64, INT32  two's complement
"""
from __future__ import annotations

import math

import numpy as np

from memoryd.arrays import BFLOAT16
from memoryd.errors import InvalidArgument
from memoryd.v1 import memory_pb2 as pb

TO_PB = {
    np.dtype(np.float32): pb.FLOAT32,
    np.dtype(np.float16): pb.FLOAT16,
    BFLOAT16: pb.BFLOAT16,
    np.dtype(np.int64): pb.INT64,
    np.dtype(np.int32): pb.INT32,
}
FROM_PB = {v: k for k, v in TO_PB.items()}
MAX_DIM = 1 << 40             # no tensor dimension (nor product of the non-zero ones) is larger
MAX_NDIM = 16


def encode(a: np.ndarray, what: str | None = None) -> pb.Tensor:
    """numpy -> Tensor (little-endian, C order); `what` names the field in the error."""
    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in "=|" else a.dtype
    if dt not in TO_PB:
        raise InvalidArgument(f"{what + ': ' if what else ''}cannot send dtype {a.dtype} "
                              "over the wire")
    a = np.asarray(a, dtype=dt, order="C")  # (ascontiguousarray would make 0-d 1-d)
    return pb.Tensor(dtype=TO_PB[dt], shape=a.shape, data=a.tobytes())


def check_shape(shape: tuple[int, ...], what: str) -> None:
    """InvalidArgument for a shape no reply or request can have (numpy would fail later,
    e.g. on (0, 2**62), as an internal error)."""
    if any(s < 0 for s in shape):
        raise InvalidArgument(f"{what}: negative dimension in shape {shape}")
    if len(shape) > MAX_NDIM or math.prod(s for s in shape if s) > MAX_DIM:
        raise InvalidArgument(f"{what}: shape {shape} is too large")


def decode(t: pb.Tensor, what: str = "tensor") -> np.ndarray:
    """Tensor -> numpy (read-only view of the message bytes), validated."""
    if t.dtype not in FROM_PB:
        raise InvalidArgument(f"{what}: unknown or missing dtype {t.dtype}")
    dt = FROM_PB[t.dtype]
    shape = tuple(t.shape)
    check_shape(shape, what)
    expected = math.prod(shape) * dt.itemsize
    if len(t.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(t.data)} bytes do not match shape {shape} of {dt.name} "
            f"({expected} bytes)")
    return np.frombuffer(t.data, dtype=dt.newbyteorder("<")).astype(dt, copy=False).reshape(shape)


def maybe_decode(msg, field: str, what: str | None = None) -> np.ndarray | None:
    return decode(getattr(msg, field), what or field) if msg.HasField(field) else None


def required(msg, field: str, what: str) -> np.ndarray:
    """The decoded tensor field, or InvalidArgument when the message lacks it."""
    if not msg.HasField(field):
        raise InvalidArgument(f"{what} missing from the request")
    return decode(getattr(msg, field), what)
