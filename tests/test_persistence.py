"""LocalMemory keeps everything across close + reopen on the same data dir:
banks, specs, counts, usage, frozen flags, ids, search results and values."""
from __future__ import annotations

import numpy as np
import pytest

from memoryd.api import BankSpec, SearchResult
from reference import gaussian, mixture, recall, values_for

QUERIES = gaussian(20, 16, 999)

SPECS = [
    BankSpec("p-flat", dim=16, value_dim=4, kind="base"),
    BankSpec("p-hnsw", dim=16, value_dim=4, index="HNSW32", metric="ip"),
    BankSpec("p-ivf", dim=16, value_dim=4, index="IVF8,Flat", quota_bytes=10**7),
    BankSpec("p-sharded", dim=16, value_dim=4, shards=3, tenant="acme"),
    BankSpec("p-fp16", dim=16, value_dim=4, value_dtype="float16", kind="session"),
    BankSpec("p-bf16", dim=16, value_dim=3, value_dtype="bfloat16", metric="ip", shards=2),
    BankSpec("p-keys", dim=16, value_dim=0),
    BankSpec("p-empty", dim=16, value_dim=4, index="IVF8,Flat"),
]
REMOVABLE = {"p-flat", "p-hnsw", "p-ivf", "p-sharded", "p-fp16", "p-bf16", "p-keys"}


def open_mem(path, **kw):
    from memoryd.engine import LocalMemory

    return LocalMemory(path, **kw)


def populate(mem) -> dict[str, np.ndarray]:
    """Create and fill SPECS; returns the ids removed from each bank."""
    removed = {}
    x, _ = mixture(600, 16, seed=5, clusters=12, spread=0.3)
    for i, spec in enumerate(SPECS):
        mem.create_bank(spec)
        if spec.name == "p-empty":
            continue
        vals = values_for(600, spec.value_dim, 100 + i, spec.value_dtype) \
            if spec.value_dim else None
        ids = np.asarray(mem.add(spec.name, x[:400], None if vals is None else vals[:400]))
        ids = np.concatenate([ids, mem.add(spec.name, x[400:],
                                           None if vals is None else vals[400:])])
        if spec.name in REMOVABLE:
            assert mem.remove(spec.name, ids[::5]) == len(ids[::5])
            removed[spec.name] = ids[::5]
        if spec.value_dim:
            upd = ids[1::7]
            mem.update_values(spec.name, upd,
                              values_for(len(upd), spec.value_dim, 200 + i, spec.value_dtype))
    mem.freeze_bank("p-flat")
    doomed = mem.create_bank(BankSpec("p-deleted", dim=16))
    mem.add(doomed.name, x[:10])
    mem.delete_bank(doomed.name)
    return removed


def populate_more(mem) -> None:
    """Adds after the removals, so that index snapshots lag behind the rows."""
    for i, spec in enumerate(SPECS):
        if spec.name in ("p-flat", "p-empty"):
            continue
        vals = values_for(50, spec.value_dim, 300 + i, spec.value_dtype) \
            if spec.value_dim else None
        mem.add(spec.name, mixture(50, 16, seed=6, clusters=12, spread=0.3)[0], vals)


def snapshot(mem) -> dict:
    """Everything observable about the banks, in comparable form."""
    out = {}
    for info in sorted(mem.list_banks(), key=lambda b: b.name):
        name = info.name
        chunks = list(mem.export(name, chunk_rows=97))
        ids = np.concatenate([c.ids for c in chunks]) if chunks else np.zeros(0, np.int64)
        order = np.argsort(ids)
        keys = np.concatenate([c.keys for c in chunks])[order] if chunks else None
        vals = (np.concatenate([c.values for c in chunks])[order]
                if chunks and chunks[0].values is not None else None)
        has_values = info.spec.value_dim > 0
        # (searching an untrained empty bank is covered by test_backend)
        res = (mem.search(name, QUERIES, 10, keys=True, values=has_values) if info.trained
               else SearchResult(ids=None, scores=None, bank=None))
        probe = ids[order][:50] if len(ids) else np.array([0])
        got = mem.get(name, probe, keys=True, values=has_values)
        out[name] = dict(info=info, ids=ids[order], keys=keys, values=vals,
                         s_ids=res.ids, s_scores=res.scores, s_values=res.values,
                         s_keys=res.keys, g_found=got.found, g_values=got.values,
                         g_keys=got.keys)
    return out


SEARCH_FIELDS = ("s_ids", "s_scores", "s_values", "s_keys")


def assert_same(a: dict, b: dict, *, same_dir=True, rebuilt_graphs=()):
    """b shows the same banks as a.

    same_dir=False: a and b come from different data dirs (creation times
    differ). rebuilt_graphs: banks whose HNSW graph was rebuilt from rows, so
    that their approximate search results need only mostly agree.
    """
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        ix, iy = x["info"], y["info"]
        assert iy.spec == ix.spec, name
        assert (iy.count, iy.used_bytes, iy.frozen, iy.trained, iy.checksum) == \
            (ix.count, ix.used_bytes, ix.frozen, ix.trained, ix.checksum), name
        if same_dir:
            assert iy.created_at == pytest.approx(ix.created_at), name
        for field in ("ids", "keys", "values", "g_found", "g_values", "g_keys") + SEARCH_FIELDS:
            if name in rebuilt_graphs and field in SEARCH_FIELDS:
                if field == "s_ids":
                    assert recall(y[field], x[field]) >= 0.98, name   # measured 0.99, 1.0
                continue
            if x[field] is None:
                assert y[field] is None, (name, field)
                continue
            assert y[field].dtype == x[field].dtype, (name, field)
            np.testing.assert_array_equal(y[field], x[field], err_msg=f"{name}.{field}")


def test_reopen_keeps_everything(tmp_path):
    mem = open_mem(tmp_path / "data")
    removed = populate(mem)
    before = snapshot(mem)
    assert "p-deleted" not in before
    assert before["p-flat"]["info"].frozen
    assert before["p-sharded"]["info"].count == 480
    assert before["p-hnsw"]["info"].count == 480
    assert before["p-empty"]["info"].count == 0
    mem.close()

    mem = open_mem(tmp_path / "data")
    try:
        after = snapshot(mem)
        assert_same(before, after)
        assert [b.name for b in mem.list_banks(tenant="acme")] == ["p-sharded"]
        assert mem.stats().used_bytes == sum(v["info"].used_bytes for v in before.values())

        # still writable, and new ids never collide with old (or removed) ones
        old_ids = set(before["p-sharded"]["ids"].tolist())
        new_ids = mem.add("p-sharded", gaussian(30, 16, 7), values_for(30, 4, 8))
        assert not set(np.asarray(new_ids).tolist()) & (old_ids | set(removed["p-sharded"].tolist()))
        assert mem.bank_info("p-sharded").count == 510
        # frozen stays frozen
        from memoryd import errors

        with pytest.raises(errors.BankFrozen):
            mem.add("p-flat", gaussian(1, 16, 9), values_for(1, 4, 10))
        # an untrained IVF bank is still untrained and can be trained now
        assert not mem.bank_info("p-empty").trained
        mem.add("p-empty", gaussian(400, 16, 11), values_for(400, 4, 12))
        assert mem.bank_info("p-empty").trained
        again = snapshot(mem)
    finally:
        mem.close()

    # a second cycle keeps what the first reopened session wrote
    mem = open_mem(tmp_path / "data")
    try:
        assert_same(again, snapshot(mem))
    finally:
        mem.close()


def test_reopen_with_explicit_catalog_url(tmp_path):
    url = f"sqlite:///{tmp_path}/catalog.db"
    mem = open_mem(tmp_path / "data", catalog_url=url)
    mem.create_bank(BankSpec("c-one", dim=16, value_dim=4, shards=2))
    ids = mem.add("c-one", gaussian(100, 16, 1), values_for(100, 4, 2))
    before = snapshot(mem)
    assert mem.stats().catalog_url == url
    mem.close()
    mem = open_mem(tmp_path / "data", catalog_url=url)
    try:
        assert_same(before, snapshot(mem))
        assert mem.get("c-one", ids).found.all()
    finally:
        mem.close()


def test_close_is_idempotent_and_reopen_empty(tmp_path):
    mem = open_mem(tmp_path / "data")
    mem.close()
    mem.close()
    mem = open_mem(tmp_path / "data")
    try:
        assert mem.list_banks() == []
        assert mem.stats().used_bytes == 0
    finally:
        mem.close()


def _shard_index_files(data_dir):
    return sorted(data_dir.glob("banks/*/shard-*/index.*.faiss"))


def test_reopen_without_index_snapshots(tmp_path):
    """An index snapshot holding codes of its own (IVF, a mapped HNSW) is a
    cache: with those gone, reopening rebuilds them from the rows. (An HNSW
    bank in RAM lends its vectors as the key column: its snapshot is where
    its keys are held, once, and not a cache: see test_wal.)"""
    data = tmp_path / "data"
    mem = open_mem(data)
    populate(mem)
    populate_more(mem)
    before = snapshot(mem)
    mem.close()
    hnsw_ram = {p.parent.parent for p in data.glob("banks/p-hnsw-*/shard-*/index.*.faiss")}
    files = [f for f in _shard_index_files(data) if f.parent.parent not in hnsw_ram]
    assert files                                          # IVF and mapped banks have some
    for f in files:
        f.unlink()
    mem = open_mem(data)
    try:
        assert_same(before, snapshot(mem), rebuilt_graphs={"p-hnsw"})
        # and writes go on normally
        ids = mem.add("p-sharded", gaussian(5, 16, 40), values_for(5, 4, 41))
        assert mem.get("p-sharded", ids).found.all()
    finally:
        mem.close()


def test_reopen_after_crash_without_close(tmp_path):
    """A process that dies without close() (no final checkpoint) loses nothing
    it acknowledged: compare with the same writes closed cleanly elsewhere."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    here = Path(__file__).resolve().parent
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    code = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = [{str(here)!r}, {str(here.parent)!r}]
        from memoryd.engine import LocalMemory
        from test_persistence import populate, populate_more
        mem = LocalMemory({str(crashed)!r})
        populate(mem)
        populate_more(mem)
        os._exit(0)      # no close(): no checkpoint, nothing flushed on the way out
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr

    mem = open_mem(clean)
    populate(mem)
    populate_more(mem)
    want = snapshot(mem)
    mem.close()

    mem = open_mem(crashed)
    try:
        assert_same(want, snapshot(mem), same_dir=False, rebuilt_graphs={"p-hnsw"})
    finally:
        mem.close()
