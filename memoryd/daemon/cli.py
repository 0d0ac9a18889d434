"""`memoryd`: run the daemon, probe its health, print the version."""
from __future__ import annotations

import os
import sys

import click

from memoryd import __version__
from memoryd.daemon.config import GRACE_S, MAX_WORKERS
from memoryd.sizes import format_size
from memoryd.wire.shm import DEFAULT_TOTAL_BYTES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """memoryd: the memory-bank daemon for attention models.

    \b
    Example:
      memoryd serve --data-dir ./mem
      memoryd health --address unix://$PWD/mem/memoryd.sock
    """


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder for banks, catalog and socket. [env MEMORYD_DATA_DIR]")
@click.option("--listen",
              help="'unix:///abs/path.sock', 'unix:rel.sock' or 'host:port' "
                   "(default: unix://<data-dir>/memoryd.sock). [env MEMORYD_LISTEN]")
@click.option("--catalog-url",
              help="SQLAlchemy URL of the catalog (default: sqlite:///<data-dir>/catalog.db). "
                   "[env MEMORYD_CATALOG_URL]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with the same settings (flags and env override it).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log level (default info; debug logs every RPC). [env MEMORYD_LOG_LEVEL]")
@click.option("--max-workers", type=click.IntRange(min=1),
              help=f"RPC worker threads (default {MAX_WORKERS}).")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0),
              help=f"Seconds in-flight calls may finish after SIGTERM (default {GRACE_S:g}).")
@click.option("--shm-dir", help="Folder for reply buffers, the shared memory through which "
                                "clients on this host get search results (default /dev/shm; "
                                "'off': none, every reply goes through the socket).")
@click.option("--shm-bytes", help=f"Reply buffers' total size (default "
                                  f"{format_size(DEFAULT_TOTAL_BYTES)}; 0: none).")
@click.option("--auth/--no-auth", default=None,
              help="Require an API token on every call but health (make the first with "
                   "`memctl --data-dir DIR token create --admin`). [default: off]")
@click.option("--socket-mode", metavar="OCTAL",
              help="Mode of the unix socket (default 0600: this user only; 0660 with "
                   "--socket-group).")
@click.option("--socket-group", metavar="GROUP",
              help="Group of the unix socket, whose members may connect (and map reply "
                   "buffers read-only).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="TLS certificate chain (PEM) for a TCP --listen; needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False),
              help="Mutual TLS: accept only clients whose certificate this CA (PEM) signed.")
def serve(config_file, **flags) -> None:
    """Run the daemon in the foreground until SIGTERM or Ctrl-C.

    Logs are JSON lines on stderr. Exit code 0 after a clean shutdown, 1 if
    it cannot start (e.g. another memoryd already serves this data dir).

    \b
    Example:
      memoryd serve --data-dir ./mem
      memoryd serve --data-dir /var/lib/memoryd --listen 127.0.0.1:7070 --log-level debug
      MEMORYD_DATA_DIR=/data memoryd serve --config /etc/memoryd.toml
      memoryd serve --data-dir ./mem --auth --socket-group memoryd
      memoryd serve --data-dir ./mem --auth --listen 0.0.0.0:7443 \\
          --tls-cert server.pem --tls-key server.key --tls-client-ca ca.pem
    """
    # A daemon shares its host's cores with the models it serves: FAISS's
    # OpenMP threads must sleep between searches, not spin (libgomp's default
    # spins for a while and takes a core from the client's torch threads).
    # Read once, when libgomp loads: before the first faiss import below.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from memoryd.daemon import config as cfg
    from memoryd.daemon.server import serve as run

    try:
        conf = cfg.load(config_file, **flags)
    except cfg.ConfigError as e:
        raise click.UsageError(str(e)) from None
    sys.exit(run(conf))


@main.command()
@click.option("--address", required=True,
              help="Daemon address: 'unix:///abs/path.sock' or 'host:port'.")
@click.option("--service", default="", show_default=True,
              help="Service to check ('' = the whole server, or memoryd.v1.Memory).")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds to wait for an answer.")
@click.option("--wait", "wait_s", default=0.0, type=click.FloatRange(min=0),
              help="Keep asking for up to this many seconds until it is SERVING "
                   "(e.g. right after starting it). [default: ask once]")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="Dial with TLS, trusting this CA (PEM).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="Client certificate (PEM) for a mutual-TLS daemon; needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Client key (PEM).")
def health(address: str, service: str, timeout: float, wait_s: float, tls_ca, tls_cert,
           tls_key) -> None:
    """Exit 0 if the daemon reports SERVING, 1 otherwise (for HEALTHCHECK/probes).

    \b
    Example:
      memoryd health --address 127.0.0.1:7070
      memoryd health --address unix:///run/memoryd/memoryd.sock --service memoryd.v1.Memory
      memoryd serve --data-dir ./mem & memoryd health --address unix:mem/memoryd.sock --wait 30
      memoryd health --address 127.0.0.1:7443 --tls-ca ca.pem --tls-cert client.pem --tls-key client.key
    """
    import time

    import grpc

    from memoryd.daemon.server import health_status
    from memoryd.errors import InvalidArgument
    from memoryd.wire.tls import ClientTLS

    tls = None
    if tls_ca or tls_cert or tls_key:
        try:
            tls = ClientTLS(ca=tls_ca, cert=tls_cert, key=tls_key)
        except InvalidArgument as e:
            raise click.UsageError(str(e)) from None

    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = health_status(address, service, timeout, tls=tls)
        except grpc.RpcError as e:
            status, error = None, f"{e.code().name}: {e.details()}"
        except InvalidArgument as e:         # an unreadable certificate file
            raise click.UsageError(str(e)) from None
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if status is None:
        click.echo(f"memoryd at {address}: {error}", err=True)
        sys.exit(1)
    click.echo(f"memoryd at {address}: {status}")
    sys.exit(0 if status == "SERVING" else 1)


@main.command()
def version() -> None:
    """Print the memoryd version.

    \b
    Example:
      memoryd version
    """
    click.echo(f"memoryd {__version__}")


if __name__ == "__main__":
    main()
