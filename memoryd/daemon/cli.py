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
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Serve Prometheus metrics over HTTP here (':9464': every interface; "
                   "port 0: any free one, logged as 'metrics'). [default: off; env "
                   "MEMORYD_METRICS_LISTEN]")
@click.option("--shard-index", type=click.IntRange(min=0),
              help="This process's shard of a cluster, 0..N-1 (a StatefulSet's pod "
                   "ordinal). [default 0; env MEMORYD_SHARD_INDEX]")
@click.option("--num-shards", type=click.IntRange(min=1),
              help="Shard processes in the cluster, all on one --catalog-url; `memoryd "
                   "route` joins them. [default 1: alone; env MEMORYD_NUM_SHARDS]")
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
      memoryd serve --data-dir ./shard1 --listen 127.0.0.1:7071 --shard-index 1 \\
          --num-shards 4 --catalog-url postgresql+psycopg://memoryd@db/memoryd
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
@click.option("--shards", envvar="MEMORYD_SHARDS", required=True, metavar="ADDR,ADDR,...",
              help="The shard processes' addresses, shard 0 first (`memoryd serve "
                   "--shard-index i`). [env MEMORYD_SHARDS]")
@click.option("--listen", envvar="MEMORYD_LISTEN", default="127.0.0.1:7070", show_default=True,
              help="'host:port' or 'unix:///abs/path.sock' that models connect to.")
@click.option("--partial-results/--no-partial-results", default=False, show_default=True,
              help="Let searches answer without shards that are down (the reply lists them); "
                   "off: such a search is UNAVAILABLE.")
@click.option("--shard-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds each call to a shard may take before it counts as unavailable.")
@click.option("--shard-tls-ca", type=click.Path(dir_okay=False),
              help="Dial the shards with TLS, trusting this CA (PEM).")
@click.option("--shard-tls-cert", type=click.Path(dir_okay=False),
              help="Client certificate (PEM) for shards that ask for mutual TLS.")
@click.option("--shard-tls-key", type=click.Path(dir_okay=False), help="Its key (PEM).")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="Serve TLS with this certificate chain (PEM); needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False),
              help="Mutual TLS: accept only clients whose certificate this CA signed.")
@click.option("--metrics-listen", envvar="MEMORYD_METRICS_LISTEN", metavar="HOST:PORT",
              help="Serve Prometheus metrics (RPCs, fan-out per shard) here. [default: off]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              envvar="MEMORYD_LOG_LEVEL", default="info", show_default=True)
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=GRACE_S,
              show_default=True, help="Seconds in-flight calls may finish after SIGTERM.")
@click.option("--max-workers", type=click.IntRange(min=1), default=MAX_WORKERS,
              show_default=True, help="RPC worker threads.")
def route(shards, listen, partial_results, shard_timeout, shard_tls_ca, shard_tls_cert,
          shard_tls_key, tls_cert, tls_key, tls_client_ca, metrics_listen, log_level, grace_s,
          max_workers) -> None:
    """Run a router: one memory over shard processes, for models to connect to.

    It keeps no data: rows go to shard (id mod N), sessions to one shard each,
    searches to every shard holding a bank of the stack, merged exactly.
    Tokens pass through to the shards, which check them.

    \b
    Example:
      memoryd route --shards 127.0.0.1:7071,127.0.0.1:7072 --listen 127.0.0.1:7070
      MEMORYD_SHARDS=memoryd-shard-0.memoryd-shards:7070,memoryd-shard-1.memoryd-shards:7070 \\
          memoryd route --listen 0.0.0.0:7070 --shard-tls-ca /tls/ca.pem --metrics-listen :9464
    """
    from memoryd.daemon import config as cfg
    from memoryd.daemon.router import RouteConfig
    from memoryd.daemon.router import route as run
    from memoryd.errors import InvalidArgument
    from memoryd.wire.tls import ClientTLS, ServerTLS

    addresses = tuple(a.strip() for a in shards.split(",") if a.strip())
    if not addresses:
        raise click.UsageError("--shards needs at least one address")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("TLS needs both --tls-cert and --tls-key")
    try:
        shard_tls = (ClientTLS(ca=shard_tls_ca, cert=shard_tls_cert, key=shard_tls_key)
                     if shard_tls_ca or shard_tls_cert or shard_tls_key else None)
        tls = ServerTLS(tls_cert, tls_key, tls_client_ca) if tls_cert else None
        metrics_at = cfg.parse_metrics_listen(metrics_listen)
    except (InvalidArgument, cfg.ConfigError) as e:
        raise click.UsageError(str(e)) from None
    sys.exit(run(RouteConfig(listen=listen, shards=addresses, partial_results=partial_results,
                             shard_timeout_s=shard_timeout, shard_tls=shard_tls, tls=tls,
                             metrics_listen=metrics_at, log_level=log_level, grace_s=grace_s,
                             max_workers=max_workers)))


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
