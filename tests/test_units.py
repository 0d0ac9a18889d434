"""Units without a backend: sizes, array checks, the wire codec, spec checks."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from memoryd import api, errors
from memoryd.wire import messages, streams, tensors
from memoryd.api import BankInfo, BankSpec
from memoryd.arrays import BFLOAT16, VALUE_DTYPES, id_vector, matrix, to_numpy, value_dtype
from memoryd.sizes import format_size, parse_size
from memoryd.v1 import memory_pb2 as pb


# ---- sizes ------------------------------------------------------------------------

@pytest.mark.parametrize("text,n", [
    ("4096", 4096), ("0", 0), ("10GB", 10 * 1000**3), ("10 gb", 10 * 1000**3),
    ("512MiB", 512 * 1024**2), ("1.5 TB", 1_500_000_000_000), ("2KiB", 2048),
    ("1kB", 1000), ("3 k", 3000), ("7M", 7_000_000), ("1 TiB", 1024**4), ("12 B", 12),
    ("  64 MB  ", 64_000_000), ("0.5 KiB", 512), (123, 123),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["unlimited", "UNLIMITED", "none", "None", "inf", " inf "])
def test_parse_size_unlimited(text):
    assert parse_size(text) is None


@pytest.mark.parametrize("text", ["", "GB", "10 XB", "-5", "-5GB", "1.2.3", "ten", "5 G B",
                                  "1e3", "0x10", -1])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("text,n", [("1.001 kB", 1001), ("1.005 kB", 1005),
                                    ("4.35 MB", 4_350_000), ("0.1 kB", 100)])
def test_parse_size_decimal_fractions_are_exact(text, n):
    """'1.001 kB' is 1001 bytes: no binary floating-point truncation."""
    assert parse_size(text) == n


@pytest.mark.parametrize("n,text", [
    (None, "unlimited"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
    (1536, "1.5 KiB"), (10 * 1024**3, "10.0 GiB"), (5 * 1024**4, "5.0 TiB"),
    (3000 * 1024**4, "3000.0 TiB"),
])
def test_format_size(n, text):
    assert format_size(n) == text


@given(st.integers(min_value=0, max_value=10**15))
@settings(database=None)
def test_size_round_trips(n):
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n
    assert parse_size(f"{n} KiB") == n * 1024
    # the short form parses back to within its rounding (0.05 of the unit)
    back = parse_size(format_size(n).replace(" ", ""))
    assert abs(back - n) <= max(1, 0.0501 * n)


# ---- arrays ---------------------------------------------------------------------------

def test_value_dtypes():
    assert value_dtype("float32") == np.float32
    assert value_dtype("float16") == np.float16
    assert value_dtype("bfloat16") == BFLOAT16
    assert set(VALUE_DTYPES) == {"float32", "float16", "bfloat16"}
    with pytest.raises(errors.InvalidArgument, match="value dtype"):
        value_dtype("int8")


def test_to_numpy_torch():
    torch = pytest.importorskip("torch")
    t = torch.randn(3, 4, requires_grad=True)
    a = to_numpy(t)
    assert a.dtype == np.float32 and np.array_equal(a, t.detach().numpy())
    b = torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.bfloat16)
    nb = to_numpy(b)
    assert nb.dtype == BFLOAT16
    np.testing.assert_array_equal(nb.astype(np.float32), [[1.5, -2.0, 3.25]])
    # a non-contiguous bf16 view keeps its values
    c = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(torch.bfloat16).t()
    np.testing.assert_array_equal(to_numpy(c).astype(np.float32), c.float().numpy())
    assert to_numpy([[1, 2]]).shape == (1, 2)


def test_matrix_accepts_and_converts():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    m = matrix(a, "keys", 4, np.dtype(np.float32))
    assert m.dtype == np.float32 and m.flags.c_contiguous
    np.testing.assert_array_equal(m, a)
    t = matrix(a.T, "keys", 3, np.dtype(np.float32))        # non-contiguous input
    assert t.flags.c_contiguous and np.array_equal(t, a.T)
    assert matrix(np.arange(4).reshape(2, 2), "v", 2, BFLOAT16).dtype == BFLOAT16
    e = matrix(np.zeros((0, 4)), "keys", 4, np.dtype(np.float32), allow_empty=True)
    assert e.shape == (0, 4)


@pytest.mark.parametrize("x,pattern", [
    (np.zeros((2, 3)), "dimension 3; expected 4"),
    (np.zeros(4), "2-d"),
    (np.zeros((1, 2, 4)), "2-d"),
    (np.zeros((0, 4)), "empty"),
    (np.full((2, 4), np.nan), "8 NaN or Inf"),
    (np.array([[0, 0, 0, np.inf]]), "NaN or Inf"),
    (np.array([["a", "b", "c", "d"]]), "numeric"),
    (np.ones((2, 4), bool), "numeric"),
    (np.full((1, 4), 1e300), "after conversion"),
])
def test_matrix_rejects(x, pattern):
    with pytest.raises(errors.InvalidArgument, match=pattern):
        matrix(x, "keys", 4, np.dtype(np.float32))


def test_matrix_rejects_bf16_nan_and_fp16_overflow():
    bad = np.array([[1.0, np.nan]], np.float32).astype(BFLOAT16)
    with pytest.raises(errors.InvalidArgument, match="NaN"):
        matrix(bad, "values", 2, BFLOAT16)
    with pytest.raises(errors.InvalidArgument, match="after conversion to float16"):
        matrix(np.array([[1e5, 1.0]], np.float32), "values", 2, np.dtype(np.float16))


def test_id_vector():
    np.testing.assert_array_equal(id_vector([3, 1, 2]), [3, 1, 2])
    assert id_vector(np.int32(7)).tolist() == [7]
    assert id_vector(np.array([1, 2], np.uint8)).dtype == np.int64
    assert id_vector([], allow_empty=True).shape == (0,)
    with pytest.raises(errors.InvalidArgument, match="empty"):
        id_vector([])
    with pytest.raises(errors.InvalidArgument, match="integers"):
        id_vector([1.5])
    with pytest.raises(errors.InvalidArgument, match="1-d"):
        id_vector(np.zeros((2, 2), np.int64))


def test_id_vector_refuses_uint64_that_would_wrap():
    """A uint64 id >= 2**63 has no int64 form; it must not silently turn negative."""
    with pytest.raises(errors.InvalidArgument):
        id_vector(np.array([2**63], np.uint64))


# ---- wire codec -------------------------------------------------------------------------

WIRE_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BFLOAT16, np.dtype(np.int64),
               np.dtype(np.int32)]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.size else a


@pytest.mark.parametrize("dt", WIRE_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_codec_round_trip(dt, shape):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(shape) * 100).astype(np.float32).astype(dt)
    t = tensors.encode(a)
    assert list(t.shape) == list(shape)
    assert len(t.data) == a.size * dt.itemsize
    b = tensors.decode(pb.Tensor.FromString(t.SerializeToString()))
    assert b.dtype == dt and b.shape == a.shape
    np.testing.assert_array_equal(_bits(b), _bits(a))


def test_codec_is_little_endian_and_takes_views():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    t = tensors.encode(a)
    assert t.data == np.arange(6, dtype="<f4").tobytes()
    b = tensors.decode(t)
    assert b.dtype == np.float32 and np.array_equal(b, a)
    v = np.arange(20, dtype=np.int64).reshape(4, 5)[:, ::2]      # strided view
    np.testing.assert_array_equal(tensors.decode(tensors.encode(v)), v)
    bf = np.array([1.0, -2.5, 3.0e38], np.float32).astype(BFLOAT16)
    assert tensors.encode(bf).dtype == pb.BFLOAT16
    np.testing.assert_array_equal(_bits(tensors.decode(tensors.encode(bf))), _bits(bf))


@st.composite
def wire_arrays(draw):
    """Arrays of any wire dtype holding arbitrary bit patterns (NaNs included)."""
    dt = draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    raw = draw(hnp.arrays(np.dtype(f"u{dt.itemsize}"), shape))
    a = raw.view(dt)
    if draw(st.booleans()) and a.ndim > 1 and a.shape[-1] > 1:
        a = a[..., ::2]                     # non-contiguous
    return a


@given(wire_arrays())
@settings(max_examples=80, deadline=None, database=None)
def test_codec_round_trip_any_bits(a):
    b = tensors.decode(pb.Tensor.FromString(tensors.encode(a).SerializeToString()))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(_bits(b), _bits(np.ascontiguousarray(a)))


def test_codec_rejects():
    with pytest.raises(errors.InvalidArgument, match="cannot send"):
        tensors.encode(np.zeros(3, np.float64))
    with pytest.raises(errors.InvalidArgument, match="cannot send"):
        tensors.encode(np.zeros(3, np.uint8))
    good = tensors.encode(np.zeros((2, 3), np.float32))
    short = pb.Tensor(dtype=good.dtype, shape=[2, 3], data=good.data[:-1])
    with pytest.raises(errors.InvalidArgument, match="do not match"):
        tensors.decode(short, "keys")
    with pytest.raises(errors.InvalidArgument, match="dtype"):
        tensors.decode(pb.Tensor(shape=[1], data=b"\0\0\0\0"))
    with pytest.raises(errors.InvalidArgument, match="negative"):
        tensors.decode(pb.Tensor(dtype=pb.FLOAT32, shape=[-1, 2], data=b""))
    msg = pb.SearchRequest()
    assert tensors.maybe_decode(msg, "queries") is None


@pytest.mark.parametrize("n,row", [(0, 16), (1, 16), (10, 16), (1000, 4 << 20),
                                   (100_000, 1000), (3, 10 << 20)])
def test_chunk_slices_cover_rows(n, row):
    slices = list(streams.chunk_slices(n, row))
    covered = [i for s in slices for i in range(s.start, s.stop)]
    assert covered == list(range(n))
    for s in slices:
        assert (s.stop - s.start) * row <= max(streams.CHUNK_BYTES, row)


# ---- bank specs ------------------------------------------------------------------------------

def test_spec_defaults_are_valid():
    s = BankSpec("wiki", dim=128)
    assert s.validated() is s
    assert (s.value_dim, s.kind, s.value_dtype, s.metric, s.index, s.shards, s.quota_bytes,
            s.tenant) == (0, "domain", "float32", "l2", "Flat", 1, None, "default")
    assert s.with_(quota_bytes=5).quota_bytes == 5 and s.quota_bytes is None


@pytest.mark.parametrize("name", ["a", "wiki", "Wiki_2.v-1", "0day", "x" * 64])
def test_spec_good_names(name):
    BankSpec(name, dim=4).validated()


def _change_id(v):
    if isinstance(v, dict):
        (k, x), = v.items()
        return f"{k}={str(x)[:12]!r}"
    return ""


@pytest.mark.parametrize("changes,pattern", ids=_change_id, argvalues=[
    (dict(name=""), "bank name"),
    (dict(name="_x"), "bank name"),
    (dict(name="a b"), "bank name"),
    (dict(name="x" * 65), "bank name"),
    (dict(name="ab\n"), "bank name"),          # '$' alone would let a trailing newline in
    (dict(name=None), "bank name"),
    (dict(dim=0), "dim"),
    (dict(dim=65537), "dim"),
    (dict(dim=16.0), "dim"),
    (dict(dim=True), "dim"),
    (dict(value_dim=-1), "value_dim"),
    (dict(value_dim=70000), "value_dim"),
    (dict(kind="archive"), "kind"),
    (dict(metric="cosine"), "metric"),
    (dict(value_dtype="float64"), "dtype"),
    (dict(shards=0), "shards"),
    (dict(shards=api.MAX_SHARDS + 1), "shards"),
    (dict(quota_bytes=-1), "quota"),
    (dict(quota_bytes="10GB"), "quota"),
    (dict(index=""), "index"),
    (dict(index=None), "index"),
    (dict(tenant=""), "tenant"),
    (dict(tenant="a b"), "tenant"),
    (dict(tenant=7), "tenant"),
])
def test_spec_validation(changes, pattern):
    """Every bad field gives InvalidArgument naming it (never another exception)."""
    with pytest.raises(errors.InvalidArgument, match=pattern):
        BankSpec("ok", dim=16).with_(**changes).validated()


def test_spec_and_info_wire_round_trip():
    for kind in api.KINDS:
        for metric in api.METRICS:
            for vdt in VALUE_DTYPES:
                for quota in (None, 0, 10**12):
                    s = BankSpec(f"b-{kind}", dim=24, value_dim=8, kind=kind, value_dtype=vdt,
                                 metric=metric, index="IVF16,Flat|nprobe=4", shards=3,
                                 quota_bytes=quota, tenant="acme")
                    m = pb.BankSpec.FromString(messages.spec_to_pb(s).SerializeToString())
                    assert messages.spec_from_pb(m) == s
    info = BankInfo(spec=BankSpec("x", dim=4), count=7, used_bytes=99, frozen=True,
                    trained=True, checksum="sha256:ab", created_at=1.5, updated_at=2.5)
    assert messages.info_from_pb(messages.info_to_pb(info)) == info
    assert messages.quota_from_pb(messages.quota_to_pb(None)) is None
    assert messages.quota_from_pb(messages.quota_to_pb(0)) == 0


def test_spec_from_pb_defaults_and_unknown_enums():
    s = messages.spec_from_pb(pb.BankSpec(name="x", dim=4))
    assert (s.kind, s.metric, s.value_dtype, s.index, s.shards, s.tenant) == \
        ("domain", "l2", "float32", "Flat", 1, "default")
    assert s.quota_bytes == 0 or s.quota_bytes is None
    bad = messages.spec_from_pb(pb.BankSpec(name="x", dim=4, metric=7, value_dtype=9))
    with pytest.raises(errors.InvalidArgument, match="metric"):
        bad.validated()
    with pytest.raises(errors.InvalidArgument, match="dtype"):
        bad.with_(metric="l2").validated()


def test_bank_info_to_dict():
    d = BankInfo(spec=BankSpec("x", dim=4, tenant="t"), count=3).to_dict()
    assert d["name"] == "x" and d["dim"] == 4 and d["tenant"] == "t" and d["count"] == 3
    assert "spec" not in d


# ---- small api helpers and errors ---------------------------------------------------------------

def test_check_k():
    assert api.check_k(1) == 1 and api.check_k(np.int32(5)) == 5
    assert api.check_k(api.MAX_K) == api.MAX_K
    for bad in (0, -3, api.MAX_K + 1):
        with pytest.raises(errors.InvalidArgument, match="k must be in"):
            api.check_k(bad)
    for bad in (2.0, "3", None, True, np.float32(2)):
        with pytest.raises(errors.InvalidArgument, match="k must be an integer"):
            api.check_k(bad)


def test_bank_list():
    Q = api.BankQuery
    assert api.bank_list("a") == [Q("a")]
    assert api.bank_list(("a", Q("b", k=3, bias=0.5))) == [Q("a"), Q("b", k=3, bias=0.5)]
    with pytest.raises(errors.InvalidArgument, match="excluded"):
        api.bank_list([Q("a", include=False)])
    with pytest.raises(errors.InvalidArgument, match="k must"):
        api.bank_list([Q("a", k=0)])
    with pytest.raises(errors.InvalidArgument, match="bias"):
        api.bank_list([Q("a", bias=float("nan"))])
    with pytest.raises(errors.InvalidArgument, match="at least one"):
        api.bank_list([])
    with pytest.raises(errors.InvalidArgument, match="twice"):
        api.bank_list(["a", "b", "a"])


def test_search_result_mask():
    r = api.SearchResult(ids=np.array([[3, -1]]), scores=np.zeros((1, 2), np.float32),
                         bank=np.array([[0, -1]], np.int32))
    assert r.mask.tolist() == [[True, False]]


def test_error_classes():
    assert issubclass(errors.BankFrozen, errors.FailedPrecondition)
    assert issubclass(errors.NeedsTraining, errors.FailedPrecondition)
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.NotFound, KeyError)
    assert str(errors.NotFound("no bank named 'x'")) == "no bank named 'x'"
    assert errors.QuotaExceeded.code == "RESOURCE_EXHAUSTED"
    for code, cls in errors.BY_CODE.items():
        assert cls.code == code
    import grpc

    for code in errors.BY_CODE:
        assert hasattr(grpc.StatusCode, code), code


def test_quota_exceeded_message_and_pickle():
    e = errors.QuotaExceeded("wiki", used=900, limit=1000, requested=2048)
    s = str(e)
    assert "wiki" in s and "900 B" in s and "2.0 KiB" in s and "1000 B" in s
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is errors.QuotaExceeded
    assert (e2.bank, e2.used, e2.limit, e2.requested) == ("wiki", 900, 1000, 2048)
    assert str(e2) == s


@pytest.mark.parametrize("spec, exact", [
    ("Flat", True), ("HNSW32|efSearch=64", True), ("IVF4096,Flat|nprobe=48", True),
    ("IDMap,Flat", True), ("IVF256_HNSW32,Flat", True),
    ("PQ2x4", False), ("SQ4", False), ("IVF256,PQ8", False), ("PCA64,Flat", False),
    ("HNSW32_PQ8", False), ("IVF100,SQ8", False),
])
def test_exact_scores_only_for_indexes_that_keep_the_keys(spec, exact):
    from memoryd.keyspace import exact_scores
    assert exact_scores(spec) is exact
