"""`memoryd route`: the process models connect to in front of N shard processes.

    memoryd route --listen 0.0.0.0:7070 --shards shard-0:7070,shard-1:7070

It serves memoryd.v1.Memory (plus health and reflection) exactly as one
daemon does, through the same servicer, over a memoryd.cluster.ShardedMemory
whose shards are gRPC clients of the `memoryd serve --shard-index i` processes.
It holds no data and no catalog: any number of routers may run side by side.

Tokens pass through: the router checks none itself (`Caller.credential`),
each shard checks the caller's own token against the shared catalog, so a
router needs no secret of its own. Health: SERVING once it listens, whatever
the shards' state (a shard that is down fails the calls that need it, with
UNAVAILABLE naming it; see memoryd.cluster.sharded for the policy).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from grpc_health.v1 import health

from memoryd import __version__
from memoryd.daemon.config import GRACE_S, MAX_WORKERS
from memoryd.daemon.server import StartupError, configure_logging, create_server
from memoryd.errors import MemorydError
from memoryd.wire.tls import ClientTLS, ServerTLS

log = logging.getLogger("memoryd.router")


@dataclass(frozen=True)
class RouteConfig:
    listen: str
    shards: tuple[str, ...]              # addresses, shard 0 first
    partial_results: bool = False        # searches answer without shards that are down
    shard_timeout_s: float | None = 30.0  # deadline of each call to a shard
    shard_tls: ClientTLS | None = None   # dial the shards with TLS
    tls: ServerTLS | None = None         # serve TLS
    metrics_listen: str | None = None
    log_level: str = "info"
    grace_s: float = GRACE_S
    max_workers: int = MAX_WORKERS


def connect(shards: tuple[str, ...], *, timeout_s: float | None, tls: ClientTLS | None,
            partial_results: bool, on_call=None):
    """A ShardedMemory over gRPC clients of the shard processes (not waiting for
    them: one that is down answers UNAVAILABLE when asked)."""
    from knnlayer.client import MemoryClient
    from memoryd.cluster import ShardedMemory

    clients = [MemoryClient(a, timeout=timeout_s, wait_ready=0, tls=tls,
                            client_name=f"memoryd-router:{os.getpid()}") for a in shards]
    return ShardedMemory(clients, names=list(shards), partial_results=partial_results,
                         on_call=on_call)


def route(config: RouteConfig) -> int:
    """Run the router until SIGTERM/SIGINT; the process exit code."""
    configure_logging(config.log_level)
    try:
        return _run(config)
    except (StartupError, OSError, MemorydError) as e:
        log.error(f"memoryd route cannot start: {e}", extra={"fields": {"listen": config.listen}})
        return 1


def _run(config: RouteConfig) -> int:
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        on_call, stop_metrics, metrics_at, interceptors = _metrics(config)
        backend = connect(config.shards, timeout_s=config.shard_timeout_s, tls=config.shard_tls,
                          partial_results=config.partial_results, on_call=on_call)
        health_servicer = health.HealthServicer()
        try:
            server, address = create_server(backend, config.listen,
                                            max_workers=config.max_workers,
                                            health_servicer=health_servicer, tls=config.tls,
                                            interceptors=interceptors)
        except BaseException:
            stop_metrics()
            backend.close()
            raise
        log.info("memoryd router started", extra={"fields": {
            "address": address, "shards": list(config.shards), "pid": os.getpid(),
            "version": __version__, "partial_results": config.partial_results,
            "metrics": metrics_at or "off"}})
        while not stop.wait(1.0):
            pass
        log.info("memoryd router stopping", extra={"fields": {"grace_s": config.grace_s}})
        health_servicer.enter_graceful_shutdown()
        server.stop(config.grace_s).wait(config.grace_s + 5)
        stop_metrics()
        backend.close()
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _metrics(config: RouteConfig):
    """(on_call for fan-out timings, stop, bound address, interceptors); all
    no-ops when --metrics-listen is off."""
    if config.metrics_listen is None:
        return None, (lambda: None), None, []
    from memoryd import telemetry
    from memoryd.daemon import metrics

    registry = metrics.new_registry()
    names = list(config.shards)

    def on_call(q: int, method: str, seconds: float, ok: bool) -> None:
        telemetry.observe_fanout(names[q], method, seconds, ok)

    try:
        stop, where = metrics.start_metrics(config.metrics_listen, None, registry=registry,
                                            banks=False)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {config.metrics_listen}: "
                           f"{e.strerror or e}") from None
    return on_call, stop, where, [metrics.metrics_interceptor(registry)]
