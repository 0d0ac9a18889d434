"""fastwire writes and reads exactly what protobuf does for tensor messages."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memoryd.wire import fastwire
from memoryd.wire import tensors
from memoryd.arrays import BFLOAT16
from memoryd.errors import InvalidArgument
from memoryd.wire.shm import Placed
from memoryd.v1 import memory_pb2 as pb

DTYPES = [np.float32, np.float16, BFLOAT16, np.int64, np.int32]


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                         max_size=int(np.prod(shape)) * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 2**40), ids=arrays(), values=st.one_of(st.none(), arrays()))
def test_encode_is_protobufs_encoding(offset, ids, values):
    fast = fastwire.encode(pb.SearchResponse, offset=offset, ids=ids, values=values)
    ref = pb.SearchResponse(offset=offset, ids=tensors.encode(ids),
                            values=None if values is None else tensors.encode(values))
    assert fast == ref.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(0, 2**40), ids=arrays(), keys=arrays())
def test_decode_reads_protobufs_encoding(offset, ids, keys):
    data = pb.SearchResponse(offset=offset, ids=tensors.encode(ids),
                             keys=tensors.encode(keys)).SerializeToString()
    got = fastwire.decode(pb.SearchResponse, data)
    assert got.get("offset", 0) == offset
    for name, a in (("ids", ids), ("keys", keys)):
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        assert got[name].tobytes() == a.tobytes()
    assert "values" not in got


def test_unpacked_shape_and_unknown_fields_are_read():
    t = pb.Tensor(dtype=pb.INT32, data=np.arange(6, dtype=np.int32).tobytes())
    # shape as two unpacked varint fields (legal protobuf), plus an unknown field 15
    body = t.SerializeToString() + bytes([0x10, 2, 0x10, 3]) + bytes([0x78, 1])
    msg = bytes([0x12, len(body)]) + body
    got = fastwire.decode(pb.SearchResponse, msg)
    assert got["ids"].shape == (2, 3) and got["ids"][1, 2] == 5


@pytest.mark.parametrize("data", [
    bytes([0x12, 0x05, 0x08]),                                   # field runs past the end
    bytes([0x12, 0x02, 0x08, 0x63]),                             # unknown dtype 99
    pb.SearchResponse(ids=pb.Tensor(dtype=pb.INT64, shape=[3], data=b"x" * 8)).SerializeToString(),
    bytes([0x08, 0xFF]),                                         # truncated varint
])
def test_malformed_messages_are_refused(data):
    with pytest.raises(InvalidArgument):
        fastwire.decode(pb.SearchResponse, data)


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 9), max_size=3),
       buffer_offset=st.integers(0, 2**40))
def test_a_placed_tensor_is_protobufs_buffer_offset_both_ways(dtype, shape, buffer_offset):
    placed = Placed(np.dtype(dtype), tuple(shape), buffer_offset)
    fast = fastwire.encode(pb.SearchResponse, offset=7, values=placed)
    ref = pb.SearchResponse(offset=7, values=pb.Tensor(
        dtype=tensors.TO_PB[np.dtype(dtype)], shape=shape, buffer_offset=buffer_offset))
    assert fast == ref.SerializeToString()           # offset 0 too: an optional field is sent
    assert fastwire.decode(pb.SearchResponse, fast)["values"] == placed


def test_a_tensor_with_both_data_and_a_buffer_offset_is_refused():
    t = pb.Tensor(dtype=pb.INT32, shape=[1], data=b"abcd", buffer_offset=0)
    with pytest.raises(InvalidArgument, match="both data and a buffer offset"):
        fastwire.decode(pb.SearchResponse, pb.SearchResponse(ids=t).SerializeToString())
