"""memctl, end to end through click's CliRunner.

Most tests open a data directory in-process (--data-dir, LocalMemory); the
daemon tests start memoryd in this process (memoryd.daemon.server.create_server)
and talk to it over gRPC (--address, MemoryClient).
"""
from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from memctl.cli import main

ENV_VARS = ("MEMCTL_ADDRESS", "MEMORYD_ADDRESS", "MEMORYD_DATA_DIR", "MEMORYD_CATALOG_URL",
            "MEMCTL_TIMEOUT", "MEMCTL_DEBUG")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


class Mem:
    """Runs memctl commands against one backend target."""

    def __init__(self, target: list[str]):
        self.target = target
        self.runner = CliRunner()

    def __call__(self, *args, input=None, ok=True):
        args = [str(a) for a in args]
        result = self.runner.invoke(main, args + self.target, input=input)
        if ok:
            assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    def json(self, *args):
        return json.loads(self(*args, "--json").stdout)

    def fails(self, *args, needles=(), input=None):
        """The command fails cleanly: non-zero exit, one 'Error:' line, no traceback."""
        result = self(*args, input=input, ok=False)
        assert result.exit_code != 0, result.output
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1, result.output
        for needle in needles:
            assert needle.lower() in errors[0].lower(), (needle, errors[0])
        return errors[0]


@pytest.fixture
def cli(tmp_path):
    return Mem(["--data-dir", str(tmp_path / "data")])


def save(path, array):
    np.save(path, array)
    return str(path)


def rand(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ---- help ------------------------------------------------------------------------

def _walk(group, path=()):
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _walk(cmd, path + (name,))


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    seen = []
    for path, cmd in _walk(main):
        result = runner.invoke(main, list(path) + ["--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, path
        assert re.search(r"^\s+memctl " + " ".join(path), result.output, re.M), (path,
                                                                                 result.output)
        seen.append(" ".join(path))
    for cmd in ("bank create", "bank list", "bank show", "bank delete", "bank freeze",
                "bank resize", "bank tier", "import", "export", "search", "status",
                "session open", "session list", "session show", "session extend",
                "session close", "session promote", "session export", "session append", "quota set",
                "quota show"):
        assert cmd in seen


def test_backend_options_are_shared():
    result = CliRunner().invoke(main, ["bank", "list", "--help"])
    assert "--address" in result.output and "--data-dir" in result.output
    assert "--json" in result.output
    result = CliRunner().invoke(main, ["--help"])
    assert "--address" in result.output and "--data-dir" in result.output


def test_backend_options_on_the_group(tmp_path, monkeypatch):
    """`memctl --data-dir D bank list` works too; the command's own option wins."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(main, [str(x) for x in args])
        assert result.exit_code == 0, (args, result.output)
        return result.stdout

    run("--data-dir", a, "bank", "create", "in-a", "--dim", "4")
    run("bank", "create", "in-b", "--dim", "4", "--data-dir", b)
    names = lambda out: [x["name"] for x in json.loads(out)]  # noqa: E731
    assert names(run("--data-dir", a, "bank", "list", "--json")) == ["in-a"]
    assert names(run("-d", a, "bank", "list", "--json", "--data-dir", b)) == ["in-b"]
    # the group's command line beats the environment, the command's beats the group's
    monkeypatch.setenv("MEMORYD_DATA_DIR", b)
    assert names(run("bank", "list", "--json")) == ["in-b"]
    assert names(run("--data-dir", a, "bank", "list", "--json")) == ["in-a"]
    monkeypatch.setenv("MEMCTL_ADDRESS", "127.0.0.1:9")
    assert names(run("--data-dir", a, "bank", "list", "--json")) == ["in-a"]
    monkeypatch.delenv("MEMCTL_ADDRESS")
    st = json.loads(run("--data-dir", a, "status", "--json"))
    assert st["backend"] == f"embedded ({a})"
    Mem([]).fails("--address", "localhost:1", "--data-dir", a, "bank", "list",
                  needles=["not both"])
    # a command-level --address beats a group-level --data-dir
    Mem([]).fails("--data-dir", a, "bank", "list", "--address", "127.0.0.1:9", "--timeout", "1",
                  needles=["127.0.0.1:9"])


# ---- banks ----------------------------------------------------------------------------

def test_bank_create_list_show_resize_freeze_delete(cli):
    out = cli("bank", "create", "wiki", "--kind", "base", "--dim", "128", "--value-dim", "128",
              "--quota", "10GB", "--index", "HNSW32").output
    assert "created bank 'wiki'" in out
    info = cli.json("bank", "create", "notes", "--dim", "16", "--value-dim", "8",
                    "--value-dtype", "bfloat16", "--metric", "ip", "--tenant", "acme")
    assert (info["name"], info["dim"], info["value_dim"], info["value_dtype"], info["metric"],
            info["tenant"], info["quota_bytes"]) == ("notes", 16, 8, "bfloat16", "ip", "acme",
                                                     None)

    banks = {b["name"]: b for b in cli.json("bank", "list")}
    assert set(banks) == {"wiki", "notes"}
    wiki = banks["wiki"]
    assert (wiki["kind"], wiki["dim"], wiki["value_dim"], wiki["index"], wiki["quota_bytes"],
            wiki["count"], wiki["frozen"]) == ("base", 128, 128, "HNSW32", 10 * 10**9, 0, False)
    assert [b["name"] for b in cli.json("bank", "list", "--tenant", "acme")] == ["notes"]

    table = cli("bank", "list").output
    header = table.splitlines()[0].split()
    for col in ("NAME", "KIND", "DIM", "VALUES", "METRIC", "INDEX", "SHARDS", "COUNT", "USED",
                "QUOTA", "FROZEN"):
        assert col in header
    assert "9.3 GiB" in table and "HNSW32" in table and "unlimited" in table

    shown = cli.json("bank", "show", "wiki")
    assert shown["name"] == "wiki" and shown["quota_bytes"] == 10 * 10**9
    text = cli("bank", "show", "wiki").output
    assert "quota:" in text and "9.3 GiB" in text

    assert cli.json("bank", "resize", "wiki", "--quota", "50GB")["quota_bytes"] == 50 * 10**9
    out = cli("bank", "resize", "wiki", "--quota", "512MiB").output
    assert "46.6 GiB -> 512.0 MiB" in out
    assert cli.json("bank", "resize", "wiki", "--quota", "unlimited")["quota_bytes"] is None

    assert cli.json("bank", "freeze", "wiki")["frozen"] is True
    assert cli.json("bank", "show", "wiki")["frozen"] is True

    # delete asks first; "n" keeps the bank
    result = cli("bank", "delete", "wiki", input="n\n", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "wiki" in {b["name"] for b in cli.json("bank", "list")}
    assert "deleted bank 'wiki'" in cli("bank", "delete", "wiki", input="y\n").output
    assert "deleted bank 'notes'" in cli("bank", "delete", "notes", "--yes").output
    assert cli.json("bank", "list") == []
    assert "no banks" in cli("bank", "list").output


def test_create_refuses_bad_input(cli):
    cli.fails("bank", "create", "x", "--dim", "8", "--quota", "10XB", needles=["not a size"])
    cli.fails("bank", "create", "bad name!", "--dim", "8", needles=["bad bank name"])
    cli("bank", "create", "x", "--dim", "8")
    cli.fails("bank", "create", "x", "--dim", "8", needles=["x"])
    cli.fails("bank", "resize", "x", "--quota", "lots", needles=["not a size"])


def test_unknown_bank_is_a_clean_error(cli, tmp_path):
    keys = save(tmp_path / "k.npy", rand(4, 8))
    for args in (("bank", "show", "nope"), ("bank", "delete", "nope", "--yes"),
                 ("bank", "freeze", "nope"), ("bank", "resize", "nope", "--quota", "1GB"),
                 ("import", "nope", keys), ("export", "nope", tmp_path / "out"),
                 ("search", "nope", keys)):
        cli.fails(*args, needles=["nope"])


def test_no_backend_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Mem([]).fails("bank", "list", needles=["no daemon address", "--address", "--data-dir"])


def test_no_daemon_at_the_address_fails_fast(tmp_path):
    """A socket file nobody listens on, a missing one, a closed TCP port: one line
    at once, not after gRPC's reconnect backoff (it used to wait 10 s)."""
    import socket
    import time

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                                   # the file stays, nothing listens
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    for address in (f"unix://{stale}", str(tmp_path / "missing.sock"), f"127.0.0.1:{port}"):
        t = time.monotonic()
        Mem(["--address", address]).fails("bank", "list", needles=["no memoryd listening"])
        assert time.monotonic() - t < 2.0, address


def test_address_and_data_dir_together(tmp_path):
    Mem(["--address", "localhost:1", "--data-dir", str(tmp_path)]).fails(
        "bank", "list", needles=["not both"])


# ---- import ---------------------------------------------------------------------------

@pytest.fixture
def filled(cli, tmp_path):
    """Bank 'docs' (dim 8, values 4) and its 100 rows on disk."""
    keys, values = rand(100, 8, seed=1), rand(100, 4, seed=2)
    cli("bank", "create", "docs", "--dim", "8", "--value-dim", "4")
    return cli, save(tmp_path / "keys.npy", keys), save(tmp_path / "values.npy", values)


def test_import_with_progress_and_shape_checks(filled, tmp_path):
    cli, keys, values = filled
    result = cli("import", "docs", keys, values, "--batch-size", "30", "--progress")
    assert "imported 100 rows into 'docs'" in result.stdout
    m = re.search(r"ids (\d+)\.\.(\d+)", result.stdout)
    assert m and int(m.group(2)) - int(m.group(1)) >= 99
    assert "100/100" in result.stderr  # the progress bar went to stderr
    assert cli.json("bank", "show", "docs")["count"] == 100

    bad = {
        "keys7": save(tmp_path / "k7.npy", rand(10, 7)),
        "keys3d": save(tmp_path / "k3.npy", np.zeros((2, 2, 8), np.float32)),
        "vals5": save(tmp_path / "v5.npy", rand(100, 5)),
        "vals99": save(tmp_path / "v99.npy", rand(99, 4)),
    }
    cli.fails("import", "docs", bad["keys7"], values, needles=["dim 7", "dim 8"])
    cli.fails("import", "docs", bad["keys3d"], values, needles=["2-d"])
    cli.fails("import", "docs", keys, bad["vals5"], needles=["value dim 4"])
    cli.fails("import", "docs", keys, bad["vals99"], needles=["100 rows", "99"])
    cli.fails("import", "docs", keys, needles=["values"])
    cli.fails("import", "docs", tmp_path / "missing.npy", values, needles=["not found"])
    notnpy = tmp_path / "junk.npy"
    notnpy.write_text("hello")
    cli.fails("import", "docs", notnpy, values, needles=["junk.npy"])
    cli("bank", "create", "keyonly", "--dim", "8")
    cli.fails("import", "keyonly", keys, values, needles=["keys only"])
    cli("import", "keyonly", keys, "--quiet")
    # nothing was sent by the refused imports
    assert cli.json("bank", "show", "docs")["count"] == 100
    assert cli.json("bank", "show", "keyonly")["count"] == 100


def _per_row_bytes(cli, keys, values):
    cli("bank", "create", "probe", "--dim", "8", "--value-dim", "4")
    cli("import", "probe", keys, values, "--batch-size", "10")
    used = cli.json("bank", "show", "probe")["used_bytes"]
    cli("bank", "delete", "probe", "--yes")
    return used / 100


def test_import_stops_cleanly_and_resumes_with_start(filled, tmp_path):
    cli, keys, values = filled
    per_row = _per_row_bytes(cli, keys, values)
    cli("bank", "resize", "docs", "--quota", str(int(per_row * 35)))
    ids_out = tmp_path / "ids.npy"
    err = cli.fails("import", "docs", keys, values, "--batch-size", "10",
                    "--ids-out", ids_out, needles=["quota exceeded", "resume with --start"])
    start = int(re.search(r"--start (\d+)", err).group(1))
    assert 0 < start < 100 and start % 10 == 0
    assert cli.json("bank", "show", "docs")["count"] == start  # whole batches only
    partial = np.load(ids_out)
    assert (partial[:start] >= 0).all() and (partial[start:] == -1).all()

    cli("bank", "resize", "docs", "--quota", "unlimited")
    out = cli("import", "docs", keys, values, "--batch-size", "10", "--ids-out", ids_out,
              "--start", start).stdout
    assert f"imported {100 - start} rows" in out
    ids = np.load(ids_out)
    assert ids.shape == (100,) and (ids >= 0).all() and len(set(ids.tolist())) == 100
    assert (ids[:start] == partial[:start]).all()
    assert cli.json("bank", "show", "docs")["count"] == 100

    # the bank now holds exactly the file, row i under ids[i]
    outdir = tmp_path / "out"
    cli("export", "docs", outdir)
    got_ids = np.load(outdir / "ids.npy")
    order = np.argsort(got_ids)
    pos = {int(i): r for r, i in enumerate(ids)}
    rows = [pos[int(i)] for i in got_ids[order]]
    np.testing.assert_array_equal(np.load(outdir / "keys.npy")[order], np.load(keys)[rows])
    np.testing.assert_array_equal(np.load(outdir / "values.npy")[order], np.load(values)[rows])

    cli.fails("import", "docs", keys, values, "--start", "101", needles=["--start 101"])
    assert "nothing to import" in cli("import", "docs", keys, values, "--start", "100").stdout


def test_ids_out_of_another_shape_is_refused_on_resume(filled, tmp_path):
    cli, keys, values = filled
    other = save(tmp_path / "other.npy", np.zeros(7, np.int64))
    cli.fails("import", "docs", keys, values, "--start", "10", "--ids-out", other,
              needles=["--ids-out"])
    assert cli.json("bank", "show", "docs")["count"] == 0


def test_quota_exceeded_names_used_and_limit(filled):
    cli, keys, values = filled
    cli("bank", "resize", "docs", "--quota", "1KB")
    err = cli.fails("import", "docs", keys, values, needles=["quota exceeded", "docs", "used",
                                                             "limit", "nothing was imported"])
    assert "1000 B" in err
    assert cli.json("bank", "show", "docs")["count"] == 0


def test_write_to_frozen_bank_is_a_clean_error(filled):
    cli, keys, values = filled
    cli("import", "docs", keys, values)
    cli("bank", "freeze", "docs")
    cli.fails("import", "docs", keys, values, needles=["frozen"])
    assert cli.json("bank", "show", "docs")["count"] == 100


# ---- export ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_export_round_trip(cli, tmp_path, dtype):
    keys, values = rand(300, 8, seed=3), rand(300, 4, seed=4)
    cli("bank", "create", "b", "--dim", "8", "--value-dim", "4", "--value-dtype", dtype)
    cli("import", "b", save(tmp_path / "k.npy", keys), save(tmp_path / "v.npy", values),
        "--ids-out", tmp_path / "ids.npy", "--batch-size", "128")
    out = cli("export", "b", tmp_path / "out", "--chunk-rows", "100", "--progress")
    assert "exported 300 rows" in out.stdout
    assert ("saved as float32" in out.stdout) == (dtype == "bfloat16")
    ids = np.load(tmp_path / "out" / "ids.npy")
    got_k = np.load(tmp_path / "out" / "keys.npy")
    got_v = np.load(tmp_path / "out" / "values.npy")
    assert ids.dtype == np.int64 and got_k.dtype == np.float32
    assert got_v.dtype == (np.float32 if dtype in ("float32", "bfloat16") else np.float16)
    assert ids.shape == (300,) and got_k.shape == (300, 8) and got_v.shape == (300, 4)
    pos = {int(i): r for r, i in enumerate(np.load(tmp_path / "ids.npy"))}
    rows = np.array([pos[int(i)] for i in ids])
    np.testing.assert_array_equal(got_k, keys[rows])
    stored = values.astype({"float32": np.float32, "float16": np.float16,
                            "bfloat16": ml_dtypes.bfloat16}[dtype])
    np.testing.assert_array_equal(got_v, stored[rows].astype(got_v.dtype))

    # import --ids restores the exported ids: a faithful copy
    cli("bank", "create", "copy", "--dim", "8", "--value-dim", "4", "--value-dtype", dtype)
    out_dir = tmp_path / "out"
    cli("import", "copy", out_dir / "keys.npy", out_dir / "values.npy", "--ids",
        out_dir / "ids.npy")
    cli("export", "copy", tmp_path / "copy")
    for name in ("ids.npy", "keys.npy", "values.npy"):
        a, b = np.load(out_dir / name), np.load(tmp_path / "copy" / name)
        order_a = np.argsort(np.load(out_dir / "ids.npy"))
        order_b = np.argsort(np.load(tmp_path / "copy" / "ids.npy"))
        np.testing.assert_array_equal(a[order_a], b[order_b])
    cli.fails("import", "copy", out_dir / "keys.npy", out_dir / "values.npy", "--ids",
              save(tmp_path / "short.npy", np.arange(3)), needles=["--ids"])

    cli.fails("export", "b", tmp_path / "out", needles=["exists", "--force"])
    cli("export", "b", tmp_path / "out", "--force", "--quiet")


def test_export_key_only_and_empty_banks(cli, tmp_path):
    cli("bank", "create", "keys", "--dim", "3")
    cli("import", "keys", save(tmp_path / "k.npy", rand(5, 3)))
    cli("export", "keys", tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["ids.npy", "keys.npy"]
    np.testing.assert_array_equal(np.sort(np.load(tmp_path / "a" / "keys.npy"), axis=0),
                                  np.sort(rand(5, 3), axis=0))
    cli("bank", "create", "empty", "--dim", "3", "--value-dim", "2")
    assert "exported 0 rows" in cli("export", "empty", tmp_path / "e").stdout
    assert np.load(tmp_path / "e" / "keys.npy").shape == (0, 3)
    assert np.load(tmp_path / "e" / "values.npy").shape == (0, 2)


# ---- search -----------------------------------------------------------------------------

def test_search_output(cli, tmp_path):
    ka, kb = rand(20, 8, seed=5), rand(20, 8, seed=6)
    for name, k in (("a", ka), ("b", kb)):
        cli("bank", "create", name, "--dim", "8", "--value-dim", "2")
        cli("import", name, save(tmp_path / f"{name}.npy", k),
            save(tmp_path / f"{name}v.npy", np.full((20, 2), 0.5, np.float32)),
            "--ids-out", tmp_path / f"{name}ids.npy")
    ids_a, ids_b = np.load(tmp_path / "aids.npy"), np.load(tmp_path / "bids.npy")
    queries = save(tmp_path / "q.npy", np.stack([ka[3], kb[7], ka[0]]))

    text = cli("search", "a", queries, "-k", "3").stdout
    assert "query 0" in text and "query 2" in text and "RANK" in text and "SCORE" in text
    assert "VALUE" not in text

    res = cli.json("search", "a,b", queries, "-k", "4", "--values")
    assert [r["query"] for r in res] == [0, 1, 2]
    top = [r["results"][0] for r in res]
    assert (top[0]["bank"], top[0]["id"]) == ("a", int(ids_a[3]))
    assert (top[1]["bank"], top[1]["id"]) == ("b", int(ids_b[7]))
    assert abs(top[0]["score"]) < 1e-4 and top[0]["rank"] == 1
    assert top[0]["value"] == [0.5, 0.5]
    assert all(len(r["results"]) == 4 for r in res)

    assert len(cli.json("search", "a", queries, "--limit-queries", "1")) == 1
    # k above the bank size: the missing slots are left out, not shown as -1
    res = cli.json("search", "a", queries, "-k", "25")
    assert len(res[0]["results"]) == 20 and all(r["id"] >= 0 for r in res[0]["results"])
    assert "[0.5, 0.5]" in cli("search", "b", queries, "--values", "-k", "1").stdout

    cli.fails("search", "a", save(tmp_path / "q5.npy", rand(2, 5)), needles=["dim 5", "dim 8"])


# ---- status -------------------------------------------------------------------------------

def test_status(filled):
    cli, keys, values = filled
    cli("import", "docs", keys, values)
    cli("bank", "create", "small", "--dim", "4", "--quota", "1MB")
    text = cli("status").stdout
    for needle in ("memoryd", "data dir", "catalog", "uptime", "GPUs", "docs", "small",
                   "TOTAL", "unlimited", "976.6 KiB"):
        assert needle in text, needle
    st = cli.json("status")
    assert st["version"] and "uptime_s" in st and "num_gpus" in st
    assert {b["name"] for b in st["banks"]} == {"docs", "small"}
    assert st["totals"]["count"] == 100 and st["totals"]["banks"] == 2
    assert st["totals"]["used_bytes"] == st["used_bytes"] > 0
    assert st["totals"]["quota_bytes"] is None


# ---- against a daemon -------------------------------------------------------------------

@pytest.fixture
def daemon(tmp_path):
    import memoryd.daemon.server as server_mod
    from memoryd.engine import LocalMemory

    backend = LocalMemory(str(tmp_path / "daemon-data"))
    server, address = server_mod.create_server(backend, "127.0.0.1:0")  # started
    try:
        yield address
    finally:
        server.stop(grace=None)
        backend.close()


def test_commands_against_a_daemon(daemon, tmp_path):
    cli = Mem(["--address", daemon])
    keys, values = rand(50, 8, seed=7), rand(50, 4, seed=8)
    cli("bank", "create", "wiki", "--kind", "base", "--dim", "8", "--value-dim", "4",
        "--quota", "10GB", "--index", "Flat")
    out = cli("import", "wiki", save(tmp_path / "k.npy", keys), save(tmp_path / "v.npy", values),
              "--batch-size", "16", "--ids-out", tmp_path / "ids.npy").stdout
    assert "imported 50 rows" in out
    assert cli.json("bank", "show", "wiki")["count"] == 50
    res = cli.json("search", "wiki", save(tmp_path / "q.npy", keys[:2]), "-k", "2")
    assert res[0]["results"][0]["id"] == int(np.load(tmp_path / "ids.npy")[0])
    cli("export", "wiki", tmp_path / "out")
    assert np.load(tmp_path / "out" / "keys.npy").shape == (50, 8)
    st = cli.json("status")
    assert st["backend"].startswith("daemon at") and st["totals"]["count"] == 50
    cli.fails("import", "wiki", save(tmp_path / "k3.npy", rand(5, 3)), tmp_path / "v.npy",
              needles=["dim 3"])
    cli.fails("bank", "show", "nope", needles=["nope"])
    used = cli.json("bank", "show", "wiki")["used_bytes"]
    cli("bank", "resize", "wiki", "--quota", used)
    cli.fails("import", "wiki", tmp_path / "k.npy", tmp_path / "v.npy",
              needles=["quota exceeded", "limit"])
    cli("bank", "freeze", "wiki")
    cli.fails("import", "wiki", tmp_path / "k.npy", tmp_path / "v.npy", needles=["frozen"])
    cli("bank", "delete", "wiki", "--yes")
    assert cli.json("bank", "list") == []


def test_env_address(daemon, monkeypatch):
    monkeypatch.setenv("MEMCTL_ADDRESS", daemon)
    assert Mem([]).json("bank", "list") == []


def test_unreachable_daemon_is_a_clean_error():
    Mem(["--address", "127.0.0.1:9", "--timeout", "2"]).fails("bank", "list")


def test_default_socket_in_the_working_directory(tmp_path, monkeypatch):
    """Without --address/--data-dir, memctl uses ./mem/memoryd.sock when it exists."""
    import memoryd.daemon.server as server_mod
    from memoryd.engine import LocalMemory

    (tmp_path / "mem").mkdir()
    backend = LocalMemory(str(tmp_path / "data"))
    server, _ = server_mod.create_server(backend, f"unix://{tmp_path}/mem/memoryd.sock")
    try:
        monkeypatch.chdir(tmp_path)
        cli = Mem([])
        cli("bank", "create", "here", "--dim", "4")
        st = cli.json("status")
        assert st["backend"] == f"daemon at unix://{tmp_path}/mem/memoryd.sock"
        assert [b["name"] for b in st["banks"]] == ["here"]
    finally:
        server.stop(grace=None)
        backend.close()
