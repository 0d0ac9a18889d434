"""Protobuf wire encoding of tensor-carrying messages, by hand, for the hot path.

A search reply is mostly raw array bytes. Going through protobuf's Python
objects copies them several times (tobytes, into the message, out again on
serialisation; and on the client: parse, `.data`, concatenate), which costs
more than the search itself for a 32 MiB reply on a slow memory bus. These
functions write and read the SAME bytes protobuf would for messages whose
fields are integers or `Tensor`s (memory.proto stays the one source of truth;
field numbers come from its descriptors, and tests/test_fastwire.py checks
both directions against protobuf's own codec):

    encode(pb.SearchResponse, offset=0, ids=arr, ...) -> bytes   (one copy)
    decode(pb.SearchResponse, data) -> {"offset": 0, "ids": ndarray, ...}
        arrays are read-only views into `data` (no copy)

A tensor may also be a `memoryd.wire.shm.Placed` (dtype, shape, offset): its
bytes lie in a reply buffer, and the Tensor carries `buffer_offset` instead
of `data` (see memoryd/wire/shm.py); decode returns such tensors as Placed.
"""
from __future__ import annotations

import math

import numpy as np

from memoryd.errors import InvalidArgument
from memoryd.wire.shm import Placed
from memoryd.wire.tensors import FROM_PB, TO_PB, check_shape

_VARINT, _LEN = 0, 2
_TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_DATA, _TENSOR_OFFSET = 1, 2, 3, 4


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]      # tags, dtypes, small dims


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:   # most varints of a reply: a decode-sized one is ~40 of them
        return _ONE_BYTE[n]
    n &= (1 << 64) - 1  # negative int64 -> two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _tensor_parts(a: np.ndarray | Placed) -> list:
    """The parts of an encoded Tensor message; the data part is a view, not a copy."""
    if not isinstance(a, Placed):
        a = np.asarray(a, order="C")
    parts: list = [_tag(_TENSOR_DTYPE, _VARINT), _varint(TO_PB[a.dtype])]
    if len(a.shape):
        shape = b"".join(_varint(s) for s in a.shape)
        parts += [_tag(_TENSOR_SHAPE, _LEN), _varint(len(shape)), shape]
    if isinstance(a, Placed):   # optional field: written even when 0
        parts += [_tag(_TENSOR_OFFSET, _VARINT), _varint(a.offset)]
    elif a.nbytes:  # bytes, not the dtype: ml_dtypes' bfloat16 has no buffer format
        parts += [_tag(_TENSOR_DATA, _LEN), _varint(a.nbytes), memoryview(a.reshape(-1).view(np.uint8))]
    return parts


def encode(message_type, **fields) -> bytes:
    """Serialised message_type with integer and ndarray (Tensor) fields; None skipped."""
    by_name = message_type.DESCRIPTOR.fields_by_name
    parts: list = []
    for name, value in fields.items():
        number = by_name[name].number
        if value is None:
            continue
        if isinstance(value, (np.ndarray, Placed)):
            sub = _tensor_parts(value)
            parts += [_tag(number, _LEN), _varint(sum(len(p) for p in sub)), *sub]
        elif value:  # proto3 leaves zero scalars out
            parts += [_tag(number, _VARINT), _varint(int(value))]
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    if pos < len(buf) and buf[pos] < 0x80:          # one byte: most of them
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise InvalidArgument("malformed message: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview):
    """(field number, wire type, int value or memoryview) for each field."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise InvalidArgument("malformed message: field past the end")
            value, pos = buf[pos: pos + size], pos + size
        elif wire_type == 1:
            value, pos = bytes(buf[pos: pos + 8]), pos + 8
        elif wire_type == 5:
            value, pos = bytes(buf[pos: pos + 4]), pos + 4
        else:
            raise InvalidArgument(f"malformed message: wire type {wire_type}")
        yield number, wire_type, value


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _tensor(buf: memoryview, what: str) -> np.ndarray | Placed:
    dtype, shape, data, offset = 0, [], memoryview(b""), None
    for number, wire_type, value in _fields(buf):
        if number == _TENSOR_DTYPE and wire_type == _VARINT:
            dtype = value
        elif number == _TENSOR_SHAPE and wire_type == _LEN:   # packed
            pos = 0
            while pos < len(value):
                s, pos = _read_varint(value, pos)
                shape.append(_signed(s))
        elif number == _TENSOR_SHAPE and wire_type == _VARINT:  # unpacked, also legal
            shape.append(_signed(value))
        elif number == _TENSOR_DATA and wire_type == _LEN:
            data = value
        elif number == _TENSOR_OFFSET and wire_type == _VARINT:
            offset = value
    if dtype not in FROM_PB:
        raise InvalidArgument(f"{what}: unknown or missing dtype {dtype}")
    dt = FROM_PB[dtype]
    check_shape(tuple(shape), what)
    if offset is not None:
        if len(data):
            raise InvalidArgument(f"{what}: both data and a buffer offset")
        return Placed(dt, tuple(shape), offset)
    if len(data) != math.prod(shape) * dt.itemsize:
        raise InvalidArgument(f"{what}: {len(data)} bytes do not match shape {tuple(shape)} of {dt.name}")
    return np.frombuffer(data, dtype=dt).reshape(tuple(shape))


def decode(message_type, data: bytes) -> dict:
    """{field name: int | ndarray | Placed} of a serialised message_type (unset fields absent)."""
    names = {f.number: f for f in message_type.DESCRIPTOR.fields}
    out: dict = {}
    for number, wire_type, value in _fields(memoryview(data)):
        field = names.get(number)
        if field is None:
            continue  # unknown field: skip, as protobuf does
        if field.message_type is not None and field.message_type.name == "Tensor":
            out[field.name] = _tensor(value, field.name)
        elif wire_type == _VARINT:
            out[field.name] = _signed(value)
    return out

