"""memctl session / quota / bank tier / per-bank search options / status
additions, end to end through click's CliRunner, against both an embedded
data dir (--data-dir) and a daemon in this process (--address)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from test_cli import Mem, rand, save  # noqa: F401 - also its autouse env cleaner below
from test_cli import _clean_env  # noqa: F401


@pytest.fixture(params=["embedded", "daemon", "cluster"])
def cli(request, tmp_path):
    if request.param == "embedded":
        yield Mem(["--data-dir", str(tmp_path / "data")])
        return
    if request.param == "cluster":   # the session's local cluster (conftest): shards + router
        from conftest import _emptied
        from knnlayer.client import MemoryClient

        cluster = request.getfixturevalue("local_cluster")
        try:
            yield Mem(["--address", cluster.address])
        finally:
            with MemoryClient(cluster.address) as client:
                _emptied(client)
        return
    import memoryd.daemon.server as server_mod
    from memoryd.engine import LocalMemory

    backend = LocalMemory(str(tmp_path / "daemon-data"))
    server, address = server_mod.create_server(backend, "127.0.0.1:0")
    try:
        yield Mem(["--address", address])
    finally:
        server.stop(grace=None)
        backend.close()


def unit(n, d, seed=0):
    x = rand(n, d, seed)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _open(cli, *args) -> str:
    sid = cli("session", "open", *args).stdout.strip()
    assert sid and "\n" not in sid and " " not in sid, sid
    return sid


# ---- sessions ------------------------------------------------------------------------

def test_session_open_list_show_extend_close(cli, tmp_path):
    sid = _open(cli, "--dim", "8", "--value-dim", "4", "--ttl-idle", "30m", "--ttl", "24h",
                "--quota", "1MB", "--tenant", "acme")
    info = cli.json("session", "open", "--dim", "8", "--value-dtype", "float16",
                    "--metric", "ip", "--ttl-idle", "90s", "--eviction", "fifo", "--quota", "10KB")
    other = info["session_id"]
    assert (info["ttl_idle_s"], info["ttl_absolute_s"]) == (90, None)
    assert (info["bank"]["dim"], info["bank"]["value_dtype"], info["bank"]["metric"],
            info["bank"]["eviction"], info["bank"]["quota_bytes"]) == (8, "float16", "ip",
                                                                      "fifo", 10_000)
    assert info["expires_at"] is not None

    # the session id names its bank: import writes to it
    cli("import", sid, save(tmp_path / "k.npy", rand(30, 8)),
        save(tmp_path / "v.npy", rand(30, 4, seed=1)), "--quiet")

    listed = {x["session_id"]: x for x in cli.json("session", "list")}
    assert set(listed) == {sid, other}
    assert listed[sid]["tenant"] == "acme" and listed[sid]["bank"]["count"] == 30
    assert [x["session_id"] for x in cli.json("session", "list", "--tenant", "acme")] == [sid]
    table = cli("session", "list").stdout
    for needle in ("SESSION", "EXPIRES IN", "LAST USED", sid, other, "30m", "1d", "1m 30s"):
        assert needle in table, needle
    assert "no sessions for tenant 'nobody'" in cli("session", "list", "--tenant", "nobody").stdout

    text = cli("session", "show", sid).stdout
    for needle in ("count:", "30", "used:", "of 976.6 KiB", "created:", "last used:",
                   "expires in:", "idle ttl:", "30m", "ttl:", "1d"):
        assert needle in text, needle
    assert re.search(r"expires in:\s+(29m|30m)", text), text
    shown = cli.json("session", "show", sid)
    assert shown["session_id"] == sid and shown["bank"]["count"] == 30

    out = cli("session", "extend", sid, "--ttl-idle", "2h").stdout
    assert re.search(r"expires in (1h 59m|2h)", out) and "idle ttl 2h" in out, out
    assert cli.json("session", "extend", sid, "--ttl", "7d")["ttl_idle_s"] == 7200
    assert re.search(r"expires in:\s+(1h 59m|2h) ", cli("session", "show", sid).stdout)

    out = cli("session", "close", sid).stdout
    assert f"closed session '{sid}'" in out and "released" in out
    assert [x["session_id"] for x in cli.json("session", "list")] == [other]
    cli.fails("session", "show", sid, needles=[sid])
    cli("session", "close", other)
    assert "no sessions" in cli("session", "list").stdout


def test_session_errors_are_one_line(cli, tmp_path):
    for args in (("show", "s-nope"), ("extend", "s-nope", "--ttl-idle", "1h"),
                 ("close", "s-nope"), ("promote", "s-nope", "wiki"),
                 ("export", "s-nope", tmp_path / "out")):
        cli.fails("session", *args, needles=["s-nope"])
    for bad in ("30x", "0", "-5m", "1h30", "soon"):
        cli.fails("session", "open", "--dim", "8", "--ttl-idle", bad, needles=["duration"])
    cli.fails("session", "open", "--dim", "8", "--ttl", "forever", needles=["not a duration"])
    cli.fails("session", "open", "--dim", "8", "--quota", "lots", needles=["not a size"])
    sid = _open(cli, "--dim", "8")
    cli.fails("session", "extend", sid, needles=["--ttl-idle", "--ttl"])
    cli.fails("session", "extend", sid, "--ttl-idle", "2 fortnights", needles=["duration"])
    cli.fails("session", "promote", sid, "nope", needles=["nope"])
    cli.fails("session", "promote", sid, "nope", "--ids", tmp_path / "missing.npy",
              needles=["not found"])
    assert not (tmp_path / "out").exists()


def test_session_promote_and_export(cli, tmp_path):
    d = 32
    keys = unit(20, d, seed=3)
    keys = np.concatenate([keys, keys[:5]])              # 5 exact repeats
    values = rand(25, 4, seed=4)
    sid = _open(cli, "--dim", d, "--value-dim", "4")
    cli("import", sid, save(tmp_path / "k.npy", keys), save(tmp_path / "v.npy", values),
        "--ids-out", tmp_path / "sids.npy", "--quiet")
    sids = np.load(tmp_path / "sids.npy")

    out = cli("session", "export", sid, tmp_path / "dump").stdout
    assert f"exported 25 rows of session '{sid}'" in out
    assert np.load(tmp_path / "dump" / "keys.npy").shape == (25, d)
    assert sorted(np.load(tmp_path / "dump" / "ids.npy").tolist()) == sorted(sids.tolist())
    cli.fails("session", "export", sid, tmp_path / "dump", needles=["--force"])
    cli("session", "export", sid, tmp_path / "dump", "--force", "--quiet")

    cli("bank", "create", "kept", "--dim", d, "--value-dim", "4")
    out = cli("session", "promote", sid, "kept", "--dedup", "0.98").stdout
    assert f"promoted 20 memories from session '{sid}' to bank 'kept'" in out, out
    assert "5 duplicates skipped" in out
    assert cli.json("bank", "show", "kept")["count"] == 20
    assert cli.json("session", "show", sid)["bank"]["count"] == 25   # copied, not moved

    cli("bank", "create", "few", "--dim", d, "--value-dim", "4")
    chosen = save(tmp_path / "chosen.npy", sids[[0, 7, 9]])
    res = cli.json("session", "promote", sid, "few", "--ids", chosen, "--move")
    assert (res["promoted"], res["duplicates"], res["moved"]) == (3, 0, True)
    assert sorted(res["source_ids"]) == sorted(sids[[0, 7, 9]].tolist())
    assert len(res["target_ids"]) == 3
    assert cli.json("session", "show", sid)["bank"]["count"] == 22
    cli.fails("session", "promote", sid, "few", "--ids",
              save(tmp_path / "f.npy", np.zeros(3, np.float32)), needles=["integer"])
    cli.fails("session", "promote", sid, "few", "--dedup", "1.5", needles=["1.5"])


def test_session_append_with_scores_and_promote_by_score(cli, tmp_path):
    sid = _open(cli, "--dim", "8", "--value-dim", "2", "--ttl-idle", "1h")
    keys, values = save(tmp_path / "k.npy", rand(10, 8)), save(tmp_path / "v.npy", rand(10, 2))
    scores = save(tmp_path / "s.npy", np.linspace(0, 1, 10, dtype=np.float32))
    out = cli("session", "append", sid, keys, values, "--scores", scores,
              "--ids-out", tmp_path / "ids.npy").stdout
    assert f"appended 10 memories to session '{sid}'" in out
    assert np.load(tmp_path / "ids.npy").shape == (10,)
    cli("bank", "create", "best", "--dim", "8", "--value-dim", "2")
    out = cli("session", "promote", sid, "best", "--min-score", "0.5").stdout
    assert "promoted 5 memories" in out and "duplicates" not in out, out
    cli.fails("session", "append", sid, keys, values, "--scores",
              save(tmp_path / "s3.npy", np.zeros(3, np.float32)), needles=["3"])
    cli.fails("session", "append", sid, save(tmp_path / "k4.npy", rand(3, 4)),
              save(tmp_path / "v3.npy", rand(3, 2)), needles=["dim"])
    cli.fails("session", "append", "s-nope", keys, values, needles=["s-nope"])


# ---- tenant quotas -------------------------------------------------------------------

def test_quota_set_show(cli, tmp_path):
    cli("bank", "create", "docs", "--dim", "8", "--value-dim", "4", "--tenant", "acme")
    keys, values = save(tmp_path / "k.npy", rand(50, 8)), save(tmp_path / "v.npy", rand(50, 4))
    cli("import", "docs", keys, values, "--quiet")
    _open(cli, "--dim", "8", "--tenant", "acme")

    out = cli("quota", "set", "acme", "50GB").stdout
    assert "tenant 'acme' quota: 46.6 GiB" in out and "used" in out
    tenants = {t["name"]: t for t in cli.json("quota", "show")}
    acme = tenants["acme"]
    assert (acme["quota_bytes"], acme["banks"], acme["sessions"]) == (50 * 10**9, 2, 1) or \
        (acme["quota_bytes"], acme["banks"], acme["sessions"]) == (50 * 10**9, 1, 1)
    assert acme["used_bytes"] > 0 and acme["tier_bytes"].get("ram", 0) > 0
    assert cli.json("quota", "show", "acme")["name"] == "acme"
    table = cli("quota", "show").stdout
    for needle in ("TENANT", "QUOTA", "USED", "RAM", "DISK", "GPU", "BANKS", "SESSIONS",
                   "acme", "46.6 GiB"):
        assert needle in table, needle
    text = cli("quota", "show", "acme").stdout
    assert "quota:" in text and "tier bytes:" in text and "ram " in text

    # below usage: refused, cleanly, and nothing changes
    cli.fails("quota", "set", "acme", "1KB", needles=["acme", "below"])
    assert cli.json("quota", "show", "acme")["quota_bytes"] == 50 * 10**9
    # at usage: later writes are refused by the tenant quota
    used = cli.json("quota", "show", "acme")["used_bytes"]
    cli("quota", "set", "acme", used)
    cli.fails("import", "docs", keys, values, needles=["quota exceeded", "acme"])
    assert cli.json("quota", "set", "acme", "unlimited")["quota_bytes"] is None
    cli("import", "docs", keys, values, "--quiet")

    cli.fails("quota", "show", "nobody", needles=["nobody"])
    cli.fails("quota", "set", "acme", "lots", needles=["not a size"])
    cli.fails("quota", "set", "bad name!", "1GB", needles=["bad name!"])


# ---- tiers -------------------------------------------------------------------------------

def test_bank_tiers(cli, tmp_path):
    cli("bank", "create", "t", "--dim", "8", "--value-dim", "4", "--tier", "mmap",
        "--eviction", "fifo", "--quota", "1MB")
    cli("import", "t", save(tmp_path / "k.npy", rand(40, 8)), save(tmp_path / "v.npy", rand(40, 4)),
        "--quiet")
    shown = cli.json("bank", "show", "t")
    assert (shown["tier"], shown["eviction"]) == ("mmap", "fifo")
    assert sum(shown["tier_bytes"].values()) > 0
    text = cli("bank", "show", "t").stdout
    assert re.search(r"tier:\s+mmap", text) and "tier bytes:" in text and "eviction:" in text
    table = cli("bank", "list").stdout
    assert "TIER" in table.splitlines()[0] and "mmap" in table

    out = cli("bank", "tier", "t", "--tier", "ram").stdout
    assert "bank 't' tier: mmap -> ram" in out and "ram " in out and "disk " in out, out
    moved = cli.json("bank", "tier", "t", "--tier", "ram")
    assert moved["tier"] == "ram" and moved["tier_bytes"].get("ram", 0) > 0
    assert cli.json("bank", "show", "t")["count"] == 40      # searchable, nothing lost

    cli.fails("bank", "tier", "t", "--tier", "floppy", needles=["floppy"])
    cli.fails("bank", "tier", "nope", "--tier", "ram", needles=["nope"])
    if cli.json("status")["num_gpus"] == 0:
        cli.fails("bank", "tier", "t", "--tier", "gpu", needles=["gpu"])
        assert cli.json("bank", "show", "t")["tier"] == "ram"


# ---- search: per-bank options --------------------------------------------------------------

def test_search_bias_bank_k_exclude(cli, tmp_path):
    ka, kb = rand(20, 8, seed=5), rand(20, 8, seed=6)
    for name, k in (("a", ka), ("b", kb)):
        cli("bank", "create", name, "--dim", "8")
        cli("import", name, save(tmp_path / f"{name}.npy", k), "--quiet")
    queries = save(tmp_path / "q.npy", np.stack([ka[3], kb[7]]))

    res = cli.json("search", "a,b", queries, "-k", "5", "--exclude", "b")
    assert {r["bank"] for q in res for r in q["results"]} == {"a"}
    # l2: a bias of 1000 in b's favour puts b's rows first, even for a's own key
    res = cli.json("search", "a,b", queries, "-k", "5", "--bias", "b=1000")
    assert all(r["bank"] == "b" for q in res for r in q["results"])
    assert res[1]["results"][0]["score"] < -900
    res = cli.json("search", "a,b", queries, "-k", "6", "--bank-k", "a=1", "--bank-k", "b=2")
    for q in res:
        banks = [r["bank"] for r in q["results"]]
        assert banks.count("a") == 1 and banks.count("b") == 2
    assert "query 1" in cli("search", "a,b", queries, "--bias", "a=0.5", "--exclude", "b").stdout

    cli.fails("search", "a,b", queries, "--bias", "c=0.1", needles=["'c'", "not one of"])
    cli.fails("search", "a,b", queries, "--bias", "a", needles=["BANK="])
    cli.fails("search", "a,b", queries, "--bias", "a=much", needles=["much"])
    cli.fails("search", "a,b", queries, "--bank-k", "a=0", needles=["at least 1"])
    cli.fails("search", "a,b", queries, "--bias", "a=1", "--bias", "a=2", needles=["twice"])
    cli.fails("search", "a,b", queries, "--exclude", "a", "--exclude", "b",
              needles=["every bank"])


# ---- status -------------------------------------------------------------------------------

def test_status_shows_tenants_and_stacks(cli, tmp_path):
    cli("bank", "create", "a", "--dim", "8", "--tenant", "acme")
    cli("bank", "create", "b", "--dim", "8")
    cli("import", "a", save(tmp_path / "k.npy", rand(10, 8)), "--quiet")
    cli("quota", "set", "acme", "1GB")
    q = save(tmp_path / "q.npy", rand(2, 8))
    cli("search", "a,b", q)
    cli("search", "a,b", q, "--exclude", "b")

    st = cli.json("status")
    tenants = {t["name"]: t for t in st["tenants"]}
    assert tenants["acme"]["quota_bytes"] == 10**9 and tenants["acme"]["used_bytes"] > 0
    text = cli("status").stdout
    assert "tenants:" in text and "acme" in text and "953.7 MiB" in text
    if "--address" in cli.target:   # the daemon remembers; an embedded run starts afresh
        stacks = [s for s in st["stacks"] if s["banks"] == ["a", "b"]]
        assert stacks and stacks[0]["searches"] == 2 and stacks[0]["client"]
        assert "bank stacks searched" in text and "a,b" in text and "ago" in text


# ---- units -------------------------------------------------------------------------------

def test_durations_parse_and_print():
    from memctl.common import parse_duration
    from memctl.output import span

    for text, seconds in (("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400),
                          ("1h30m", 5400), ("1h 30m", 5400), ("45", 45), ("1.5h", 5400),
                          ("2 days", 172800), ("1w", 604800)):
        assert parse_duration(text) == seconds, text
    for bad in ("", "0", "0s", "-1m", "1h30", "30x", "m", "1e3s", "inf"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for seconds, text in ((90, "1m 30s"), (1800, "30m"), (5400, "1h 30m"), (86400, "1d"),
                          (0.2, "0s"), (None, "-"), (7 * 86400 + 5, "7d")):
        assert span(seconds) == text, seconds


def test_an_older_daemon_is_a_clean_error():
    import click

    from memctl.common import cli_errors
    from memoryd import errors

    err = errors.MemorydError("UNIMPLEMENTED: Method not found!")
    err.code = "UNIMPLEMENTED"
    with pytest.raises(click.ClickException, match="upgrade memoryd"):
        with cli_errors("memoryd at unix:///x.sock "):
            raise err
