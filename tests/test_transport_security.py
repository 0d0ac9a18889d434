"""Transport security, through the daemon's own server code and a real daemon:
the unix socket's mode and group, TLS and mutual TLS (certificates made here,
tests/tls_util.py), `memoryd serve --auth --tls-*` with memctl through it,
and the README's secure setup run as written.
"""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from knnlayer.client import MemoryClient
from memoryd import errors
from memoryd.api import BankSpec


def test_the_unix_socket_is_0600_by_default(tmp_path):
    from daemon_util import start_daemon, stop_daemon

    proc, _ = start_daemon(tmp_path / "data")
    try:
        st = os.stat(tmp_path / "data" / "memoryd.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        assert stop_daemon(proc) == 0


# ---- transport -------------------------------------------------------------------------

def test_socket_mode_and_group_are_configurable(tmp_path):
    from memoryd.daemon.server import create_server
    from memoryd.engine import LocalMemory

    gid = os.getgid()
    with LocalMemory(tmp_path / "data", reap_interval=None) as local:
        for extra, mode in (({"socket_mode": 0o660, "socket_group": str(gid)}, 0o660),
                            ({"socket_mode": 0o640}, 0o640)):
            path = tmp_path / f"m{mode:o}.sock"
            server, _ = create_server(local, f"unix://{path}", **extra)
            try:
                st = os.stat(path)
                assert stat.S_IMODE(st.st_mode) == mode and st.st_gid == gid
            finally:
                server.stop(0).wait(5)


def test_config_reads_socket_and_tls_settings(tmp_path):
    from memoryd.daemon import config as cfg

    c = cfg.load(data_dir=str(tmp_path), socket_group="memoryd")
    assert (c.socket_mode, c.socket_group, c.auth, c.tls) == (0o660, "memoryd", False, None)
    assert cfg.load(data_dir=str(tmp_path)).socket_mode == 0o600
    assert cfg.load(data_dir=str(tmp_path), socket_mode="0640").socket_mode == 0o640
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    toml = tmp_path / "m.toml"
    toml.write_text('data_dir = "d"\nauth = true\nlisten = "127.0.0.1:7443"\nsocket_mode = 0o600\n'
                    'tls_cert = "c.pem"\ntls_key = "k.pem"\n')
    c = cfg.load(toml, env={})
    assert c.auth and c.tls.cert == tmp_path / "c.pem" and c.tls.client_ca is None
    for bad, needle in (({"socket_mode": "rw"}, "octal"), ({"socket_mode": 660}, "octal"),
                        ({"tls_cert": str(tmp_path / "c.pem"), "listen": "127.0.0.1:1"},
                         "both"),
                        ({"tls_cert": "c", "tls_key": "k"}, "TCP"),
                        ({"tls_client_ca": "ca.pem", "listen": "127.0.0.1:1"}, "needs")):
        with pytest.raises(cfg.ConfigError, match=needle):
            cfg.load(data_dir=str(tmp_path), env={}, **bad)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    from tls_util import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_server(tmp_path, pki, mutual: bool):
    from memoryd.daemon.server import create_server
    from memoryd.engine import LocalMemory
    from memoryd.wire.tls import ServerTLS

    local = LocalMemory(tmp_path / "data", reap_interval=None)
    tls = ServerTLS(pki.server_cert, pki.server_key, pki.ca if mutual else None)
    server, address = create_server(local, "127.0.0.1:0", tls=tls)
    return local, server, address


def test_tls_serves_a_client_that_trusts_the_ca_only(tmp_path, pki):
    from memoryd.wire.tls import ClientTLS

    local, server, address = _tls_server(tmp_path, pki, mutual=False)
    try:
        with MemoryClient(address, tls=ClientTLS(ca=pki.ca)) as mem:
            mem.create_bank(BankSpec("tls", dim=4))
            assert [b.name for b in mem.list_banks()] == ["tls"]
        for client in (dict(), dict(tls=ClientTLS())):     # plain text; system roots only
            with pytest.raises(errors.Unavailable):
                MemoryClient(address, wait_ready=1.5, **client).list_banks()
        localhost = address.replace("127.0.0.1", "localhost")   # the cert names it too
        with MemoryClient(localhost, tls=ClientTLS(ca=pki.ca)) as mem:
            assert mem.list_banks()
    finally:
        server.stop(0).wait(5)
        local.close()


def test_mutual_tls_rejects_a_client_without_a_signed_cert(tmp_path, pki):
    from memoryd.wire.tls import ClientTLS

    local, server, address = _tls_server(tmp_path, pki, mutual=True)
    try:
        mtls = ClientTLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        with MemoryClient(address, tls=mtls) as mem:
            assert mem.list_banks() == []
        for tls in (ClientTLS(ca=pki.ca),                                  # no cert
                    ClientTLS(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)):  # other CA
            with pytest.raises(errors.Unavailable):
                MemoryClient(address, tls=tls, wait_ready=1.5).list_banks()
        with pytest.raises(errors.InvalidArgument, match="needs its key"):
            ClientTLS(ca=pki.ca, cert=pki.client_cert)
    finally:
        server.stop(0).wait(5)
        local.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_daemon_with_auth_and_mutual_tls_and_memctl(tmp_path, pki):
    """`memoryd serve --auth --tls-*` as a process, memctl through it."""
    from click.testing import CliRunner

    from memctl.cli import main
    from memoryd.daemon.server import wait_serving
    from memoryd.wire.tls import ClientTLS

    data = tmp_path / "data"
    runner = CliRunner()
    made = runner.invoke(main, ["--data-dir", str(data), "token", "create", "--admin"])
    assert made.exit_code == 0, made.output
    admin = made.stdout.strip()
    address = f"127.0.0.1:{_free_port()}"
    log = open(tmp_path / "d.log", "wb")
    from daemon_util import daemon_env, serve_args

    proc = subprocess.Popen(serve_args(data, "--auth", "--listen", address, "--tls-cert",
                                       str(pki.server_cert), "--tls-key", str(pki.server_key),
                                       "--tls-client-ca", str(pki.ca)),
                            stdout=log, stderr=log, env=daemon_env())
    try:
        wait_serving(address, proc=proc, tls=ClientTLS(pki.ca, pki.client_cert, pki.client_key))
        tls = ["--address", address, "--tls-ca", str(pki.ca), "--tls-cert",
               str(pki.client_cert), "--tls-key", str(pki.client_key), "--timeout", "10"]

        def memctl(*args, token=admin):
            return runner.invoke(main, [*args, *tls] + (["--token", token] if token else []))

        r = memctl("token", "create", "--tenant", "acme")
        assert r.exit_code == 0, r.output
        acme = r.stdout.strip()
        assert memctl("bank", "create", "notes", "--dim", "4", token=acme).exit_code == 0
        r = memctl("bank", "list", "--json", token=None)
        assert r.exit_code == 1 and "token" in r.output.lower()
        r = memctl("quota", "set", "acme", "1GB", token=acme)
        assert r.exit_code == 1 and "admin right" in r.output
        assert memctl("quota", "set", "acme", "1GB").exit_code == 0
        assert memctl("token", "revoke", acme).exit_code == 0
        assert "acme" in memctl("token", "list").stdout
        r = runner.invoke(main, ["bank", "list", "--address", address, "--token", admin,
                                 "--tls-ca", str(pki.ca), "--timeout", "3"])   # no client cert
        assert r.exit_code == 1, r.output
        health = subprocess.run(
            [sys.executable, "-m", "memoryd.daemon.cli", "health", "--address", address,
             "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key",
             str(pki.client_key)], capture_output=True, text=True, env=daemon_env())
        assert health.returncode == 0, health.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "d.log").read_text()[-3000:]
        log.close()
    lines = (tmp_path / "d.log").read_text()
    assert '"auth": "on"' in lines and '"tls": "mutual"' in lines


def test_the_readme_secure_setup_runs_as_written(tmp_path):
    from test_readme import block, run_sh

    script = block("Secure setup", "sh").replace("7443", str(_free_port()))
    rc, out = run_sh(script, tmp_path, timeout=240)
    assert rc == 0, out[-4000:]
    for needle in ("SERVING", "refused: read-only", "['notes']", '"memoryd stopped"'):
        assert needle in out, (needle, out[-4000:])
