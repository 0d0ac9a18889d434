"""Bank stacks (BankQuery: per-bank k, bias, include) on both backends, against
a numpy reference of the semantics in memoryd.api.BankQuery's docstring:

    each included bank yields its own best k (default: the search's k); its
    scores are shifted by bias in its favour (+bias for ip, -bias for l2);
    the best k of the shifted scores over all banks are returned, best first,
    with the shifted scores; ties go to the bank named first; include=False
    leaves a bank out but keeps its position in `bank`.

Also Stats.stacks: which client searched which stack.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from memoryd import errors
from memoryd.api import BankQuery, SessionSpec
from reference import gaussian, rows_of, scores

DIM, VDIM = 8, 4


def stack_reference(key_sets, id_sets, queries, k, metric, stack):
    """(ids, bank, scores) of a stack search by the documented semantics.

    stack: one BankQuery per key set (name unused)."""
    nq = len(queries)
    cand_s, cand_b, cand_i = [], [], []
    for pos, (keys, ids, q) in enumerate(zip(key_sets, id_sets, stack)):
        if not q.include or not len(keys):
            continue
        s = scores(keys, queries, metric)                       # (nq, n) float64
        kb = min(q.k or k, len(keys))
        order = np.argsort(s if metric == "l2" else -s, axis=1, kind="stable")[:, :kb]
        top = np.take_along_axis(s, order, axis=1)
        cand_s.append(top + q.bias if metric == "ip" else top - q.bias)
        cand_b.append(np.full(top.shape, pos))
        cand_i.append(np.asarray(ids)[order])
    S, B, I = (np.concatenate(x, axis=1) for x in (cand_s, cand_b, cand_i))
    order = np.argsort(S if metric == "l2" else -S, axis=1, kind="stable")[:, :k]
    S, B, I = (np.take_along_axis(a, order, axis=1) for a in (S, B, I))
    if S.shape[1] < k:
        pad = ((0, 0), (0, k - S.shape[1]))
        S = np.pad(S, pad, constant_values=np.inf if metric == "l2" else -np.inf)
        B, I = np.pad(B, pad, constant_values=-1), np.pad(I, pad, constant_values=-1)
    assert S.shape == (nq, k)
    return I, B, S


def check_stack(mem, names, key_sets, id_sets, queries, k, metric, stack):
    res = mem.search(stack, queries, k, values=False)
    ref_ids, ref_bank, ref_scores = stack_reference(key_sets, id_sets, queries, k, metric, stack)
    np.testing.assert_array_equal(res.bank, ref_bank, err_msg="bank")
    np.testing.assert_array_equal(res.ids, ref_ids, err_msg="ids")
    np.testing.assert_allclose(res.scores, ref_scores, rtol=1e-5, atol=1e-5, err_msg="scores")
    return res


def banks_with(mem, make_bank, metric, sets, shards=(1, 1, 1)):
    names, ids = [], []
    for keys, sh in zip(sets, shards):
        spec = make_bank(mem, dim=DIM, value_dim=VDIM, metric=metric, shards=sh)
        names.append(spec.name)
        ids.append(mem.add(spec.name, keys, gaussian(len(keys), VDIM, len(names))))
    return names, ids


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("shards", [1, 3])
def test_per_bank_k_caps_what_a_bank_contributes(rig, make_bank, metric, shards):
    mem = rig.mem
    q = gaussian(5, DIM, 1)
    near = np.repeat(q, 6, axis=0) + 0.05 * gaussian(30, DIM, 2)   # would win everything
    sets = [near, gaussian(40, DIM, 3), gaussian(25, DIM, 4)]
    names, ids = banks_with(mem, make_bank, metric, sets, shards=(shards, 1, shards))
    stack = [BankQuery(names[0], k=2), BankQuery(names[1], k=3), BankQuery(names[2])]
    res = check_stack(mem, names, sets, ids, q, 8, metric, stack)
    assert ((res.bank == 0).sum(1) <= 2).all()
    assert ((res.bank == 1).sum(1) <= 3).all()
    # a bank k larger than the search's k; a bank smaller than its k
    small = sets[2][:3]
    names2, ids2 = banks_with(mem, make_bank, metric, [sets[0], small], shards=(shards, 1))
    stack2 = [BankQuery(names2[0], k=12), BankQuery(names2[1], k=7)]
    check_stack(mem, names2, [sets[0], small], ids2, q, 5, metric, stack2)
    check_stack(mem, names2, [sets[0], small], ids2, q, 40, metric, stack2)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_bias_lets_a_specialty_bank_win(rig, make_bank, metric):
    mem = rig.mem
    q = gaussian(6, DIM, 1)
    background = 0.1 * gaussian(40, DIM, 3)             # far (l2) and weak (ip) for every query
    general = np.concatenate([q + 0.05 * gaussian(6, DIM, 2), background[:20]])   # best match
    special = np.concatenate([0.7 * q + 0.05 * gaussian(6, DIM, 4), background[20:]])  # second
    names, ids = banks_with(mem, make_bank, metric, [general, special])
    plain = [BankQuery(names[0]), BankQuery(names[1])]
    res = check_stack(mem, names, [general, special], ids, q, 4, metric, plain)
    assert (res.bank[:, 0] == 0).all()                   # unbiased, the general bank wins
    bias = 8.0
    biased = [BankQuery(names[0]), BankQuery(names[1], bias=bias)]
    res_b = check_stack(mem, names, [general, special], ids, q, 4, metric, biased)
    assert (res_b.bank[:, 0] == 1).all()                 # biased, the specialty bank does
    rows = rows_of(ids[1], res_b.ids[:, 0])
    assert (rows >= 0).all()
    raw = scores(special[rows], q, metric)[np.arange(6), np.arange(6)]
    want = raw + bias if metric == "ip" else raw - bias
    np.testing.assert_allclose(res_b.scores[:, 0], want, rtol=1e-5, atol=1e-5)
    # best first, in the metric's direction, over the shifted scores
    d = np.diff(res_b.scores, axis=1)
    assert (d >= 0).all() if metric == "l2" else (d <= 0).all()
    # a negative bias works against a bank
    against = [BankQuery(names[0], bias=-bias), BankQuery(names[1])]
    check_stack(mem, names, [general, special], ids, q, 4, metric, against)
    # bias and per-bank k together
    mixed = [BankQuery(names[0], k=1, bias=0.5), BankQuery(names[1], k=2, bias=1.5)]
    check_stack(mem, names, [general, special], ids, q, 5, metric, mixed)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_excluded_bank_keeps_its_position(rig, make_bank, metric):
    mem = rig.mem
    q = gaussian(5, DIM, 1)
    best = np.concatenate([q, q])                      # would win every slot
    sets = [best, gaussian(30, DIM, 2), gaussian(30, DIM, 3)]
    names, ids = banks_with(mem, make_bank, metric, sets)
    stack = [BankQuery(names[0], include=False), BankQuery(names[1]), BankQuery(names[2])]
    res = check_stack(mem, names, sets, ids, q, 10, metric, stack)
    assert not (res.bank == 0).any()
    assert set(np.unique(res.bank).tolist()) == {1, 2}
    res_v = mem.search(stack, q, 10, values=True)
    np.testing.assert_array_equal(res_v.ids, res.ids)
    # excluded in the middle: the last bank is still position 2
    stack_mid = [BankQuery(names[1]), BankQuery(names[0], include=False), BankQuery(names[2])]
    res_m = check_stack(mem, names, [sets[1], sets[0], sets[2]], [ids[1], ids[0], ids[2]], q, 10,
                        metric, stack_mid)
    assert set(np.unique(res_m.bank).tolist()) == {0, 2}
    with pytest.raises(errors.NotFound):
        mem.search([BankQuery("no-such-bank", include=False), names[1]], q, 3)
    with pytest.raises(errors.InvalidArgument):
        mem.search([BankQuery(names[1], include=False)], q, 3)


def test_ties_go_to_the_bank_named_first(rig, make_bank):
    mem = rig.mem
    keys = gaussian(10, DIM, 1)
    names, ids = banks_with(mem, make_bank, "l2", [keys, keys])
    q = gaussian(4, DIM, 2)
    for order in ([0, 1], [1, 0]):
        stack = [names[i] for i in order]
        res = mem.search(stack, q, 6, values=False)
        # every score appears twice in a row, first from the bank named first
        np.testing.assert_array_equal(res.scores[:, 0::2], res.scores[:, 1::2])
        np.testing.assert_array_equal(res.bank, np.tile([0, 1], (4, 3)))
        # the same row of each bank (a sharded memory gives the two banks other ids)
        row = [{int(x): r for r, x in enumerate(ids[i])} for i in order]
        pos = np.vectorize(lambda b, x: row[b][x])(res.bank, res.ids)
        np.testing.assert_array_equal(pos[:, 0::2], pos[:, 1::2])
    # a tie made by a bias (exact in float32): 2.25 - 1.25 == 1.0
    e = np.zeros((1, DIM), np.float32)
    a, b = e.copy(), e.copy()
    a[0, 0], b[0, 0] = 1.0, 1.5
    na, _ = banks_with(mem, make_bank, "l2", [a, b])
    for first in (0, 1):
        stack = [BankQuery(na[0]), BankQuery(na[1], bias=1.25)]
        if first == 1:
            stack = stack[::-1]
        res = mem.search(stack, e, 2, values=False)
        np.testing.assert_array_equal(res.scores, [[1.0, 1.0]])
        np.testing.assert_array_equal(res.bank, [[0, 1]])


def test_bad_stacks_are_refused(rig, make_bank):
    mem = rig.mem
    names, _ = banks_with(mem, make_bank, "l2", [gaussian(3, DIM, 1), gaussian(3, DIM, 2)])
    q = gaussian(1, DIM, 3)
    for bad in ([BankQuery(names[0], k=0)], [BankQuery(names[0], bias=float("nan"))],
                [names[0], BankQuery(names[0])], []):
        with pytest.raises(errors.InvalidArgument):
            mem.search(bad, q, 2)


def expected_client(rig) -> str:
    return "local" if rig.kind == "local" else rig.CLIENT_NAME


def test_stats_lists_stacks_and_clients(rig, make_bank):
    mem = rig.mem
    names, _ = banks_with(mem, make_bank, "l2", [gaussian(5, DIM, 1), gaussian(5, DIM, 2)])
    q = gaussian(2, DIM, 3)
    assert mem.stats().stacks == []
    mem.search([names[0], names[1]], q, 2)
    mem.search([BankQuery(names[0], k=1), BankQuery(names[1], bias=1.0)], q, 2)
    mem.search(names[1], q, 2)
    mem.search([BankQuery(names[1], include=False), names[0]], q, 2)
    stacks = mem.stats().stacks
    got = [(s.client, tuple(s.banks), s.searches) for s in stacks]
    me = expected_client(rig)
    assert got == [(me, (names[1], names[0]), 1),           # most recent first
                   (me, (names[1],), 1),
                   (me, (names[0], names[1]), 2)]
    assert all(s.last_used_at > 0 for s in stacks)
    if rig.kind == "daemon":
        other = rig.connect("other-client")
        other.search([names[0], names[1]], q, 2)
        anon = rig.connect(None)
        anon.search(names[0], q, 1)
        got = [(s.client, tuple(s.banks), s.searches) for s in mem.stats().stacks]
        assert got[:2] == [(f"{socket.gethostname()}:{os.getpid()}", (names[0],), 1),
                           ("other-client", (names[0], names[1]), 1)]
        assert (me, (names[0], names[1]), 2) in got


def test_stats_stacks_count_only_client_searches(rig, make_bank):
    """Internal searches (promote's dedup) are not a client's stack."""
    mem = rig.mem
    target = make_bank(mem, dim=DIM, value_dim=VDIM).name
    mem.add(target, gaussian(5, DIM, 1), gaussian(5, VDIM, 2))
    sid = mem.open_session(SessionSpec(dim=DIM, value_dim=VDIM)).session_id
    mem.append(sid, gaussian(4, DIM, 3), gaussian(4, VDIM, 4))
    mem.search([target, sid], gaussian(1, DIM, 5), 2)
    before = [(s.client, tuple(s.banks), s.searches) for s in mem.stats().stacks]
    mem.promote_session(sid, target, dedup=0.9)
    after = [(s.client, tuple(s.banks), s.searches) for s in mem.stats().stacks]
    assert after == before == [(expected_client(rig), (target, sid), 1)]
