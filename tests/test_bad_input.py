"""Bad input, on both backends: the right exception class from memoryd.errors,
a message that says what is wrong, nothing half-written, and a backend that
still answers a normal search afterwards."""
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
