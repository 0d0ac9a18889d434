"""Each key is held once: what a bank is charged, holds in RAM and on disk,
against the bytes of its rows, per index and tier (issue: a Flat bank of
1M x 128-d keys with fp16 values held 1,235 MiB for 739 MiB of data)."""
from __future__ import annotations

import numpy as np
import pytest

from memoryd.api import BankSpec
from memoryd.engine import LocalMemory
from memoryd.storage import faiss_index as fx
from reference import gaussian

DIM, VDIM, N = 32, 16, 3000
ROW = 8 + 4 * DIM + 2 * VDIM          # id, key, fp16 value


def fill(mem, name, index, tier="ram", shards=1):
    mem.create_bank(BankSpec(name, dim=DIM, value_dim=VDIM, value_dtype="float16", index=index,
                             tier=tier, shards=shards))
    k = gaussian(N, DIM, 1)
    mem.add(name, k, k[:, :VDIM].astype(np.float16))
    return k


def key_files(mem, name):
    return sorted(mem.engine.bank(name).path.glob("shard-*/keys.*.bin"))


@pytest.mark.parametrize("tier", ["ram", "mmap"])
def test_a_flat_bank_holds_its_rows_and_nothing_else(tmp_path, tier):
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        fill(mem, "f", "Flat", tier, shards=2)
        mem.engine.bank("f").checkpoint()
        info = mem.bank_info("f")
        assert info.used_bytes == info.data_bytes == N * ROW and info.index_bytes == 0
        on_disk = info.tier_bytes["disk"]
        assert N * ROW <= on_disk <= 1.01 * N * ROW + 4096       # the rows, and a few small files
        if tier == "ram":
            assert info.tier_bytes["ram"] == N * ROW
        assert not list(mem.engine.bank("f").path.glob("shard-*/index.*.faiss"))


def test_an_hnsw_bank_in_ram_lends_its_vectors_as_keys(tmp_path):
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        k = fill(mem, "h", "HNSW16")
        bank = mem.engine.bank("h")
        bank.checkpoint()
        info = mem.bank_info("h")
        assert info.data_bytes == N * ROW
        # what the index adds is its id and links, not a second copy of the keys
        t = bank.template
        assert info.index_bytes == fx.fixed_bytes(t) + N * (fx.bytes_per_vector(t, DIM) - 4 * DIM)
        assert info.tier_bytes["ram"] == info.used_bytes
        assert not key_files(mem, "h")                            # the snapshot holds them
        assert info.tier_bytes["disk"] <= 1.1 * info.used_bytes + 4096
        got = mem.get("h", np.arange(N), keys=True)
        np.testing.assert_array_equal(got.keys, k)
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:  # and back from disk
        np.testing.assert_array_equal(mem.get("h", np.arange(N), keys=True).keys, k)
        # a removal rebuilds the graph from what stays, keys still exact
        mem.remove("h", np.arange(0, N, 3))
        keep = np.setdiff1d(np.arange(N), np.arange(0, N, 3))
        np.testing.assert_array_equal(mem.get("h", keep, keys=True).keys, k[keep])
        r = mem.search("h", k[keep[:50]], 1, values=False)
        assert (r.ids[:, 0] == keep[:50]).mean() > 0.95
        # off the ram tier the bank needs a key file again, and back without it
        mem.set_tier("h", "mmap")
        assert key_files(mem, "h")
        np.testing.assert_array_equal(mem.get("h", keep, keys=True).keys, k[keep])
        mem.set_tier("h", "ram")
        np.testing.assert_array_equal(mem.get("h", keep, keys=True).keys, k[keep])
        mem.add("h", k[:5], k[:5, :VDIM].astype(np.float16))
        mem.engine.bank("h").checkpoint()
        assert not key_files(mem, "h")
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        np.testing.assert_array_equal(mem.get("h", keep, keys=True).keys, k[keep])
        assert mem.bank_info("h").count == len(keep) + 5


def test_quantised_indexes_keep_their_codes_beside_the_keys(tmp_path):
    """IVF-PQ codes are lossy: the exact key column stays, the codes are the
    index's own bytes (a few per row), never a second full copy."""
    with LocalMemory(tmp_path / "d", reap_interval=None) as mem:
        fill(mem, "q", "IVF16,PQ8")
        info = mem.bank_info("q")
        assert info.data_bytes == N * ROW
        t = mem.engine.bank("q").template
        per = fx.bytes_per_vector(t, DIM)
        assert per < 4 * DIM // 4                            # a PQ8 code, its list and id: no key copy
        assert info.index_bytes == fx.fixed_bytes(t) + N * per
