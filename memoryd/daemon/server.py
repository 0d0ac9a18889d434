"""Wiring of the daemon: gRPC server, health, reflection, logging, lifecycle.

    create_server(backend, listen)  a started in-process server (tests,
                                    embedding); returns (server, address)
    serve(config)                   the `memoryd serve` process: exit code

Shutdown (SIGTERM or SIGINT): health goes NOT_SERVING, the server stops
taking calls and gives in-flight ones `grace_s` to finish, the backend is
closed (which flushes everything to disk), the socket file is removed, exit
0. A second signal cancels what is still in flight. The whole stop takes at
most grace_s + 2 * STOP_SLACK_S unless the backend's own close is slow: calls
left at the end of the grace period are cancelled (a client stream left
open ends then), and when handlers are still running STOP_SLACK_S later (a
FAISS search cannot be interrupted) the daemon exits without waiting for
them or for its final snapshot (logged; acknowledged writes are on disk
already and the next start replays them), so that a supervisor's SIGKILL
never has to.

One daemon per data dir: the daemon's backend, a LocalMemory, holds an
exclusive lock on `<data_dir>/memoryd.pid` (memoryd.engine.datadir) for its
lifetime, as every LocalMemory does (so `memctl --data-dir` and in-process
users exclude a daemon, and each other); serve() refuses to start, with one
clear line and exit code 1, when another process holds it or when a live
daemon answers on its unix socket. A stale socket file is removed (with the
lock held).
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import weakref
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memoryd import __version__
from memoryd.api import MemoryBackend
from memoryd.auth.callers import Authenticator
from memoryd.daemon.config import MAX_WORKERS, Config
from memoryd.daemon.service import MemoryServicer, add_to_server
from memoryd.errors import MemorydError, Unavailable
from memoryd.v1 import memory_pb2
from memoryd.wire import shm
from memoryd.wire.channel import SERVER_OPTIONS, grpc_target, socket_path
from memoryd.wire.tls import ClientTLS, ServerTLS, secure_channel

log = logging.getLogger("memoryd.server")

SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name  # memoryd.v1.Memory
STOP_SLACK_S = 1.5   # after the grace period: for cancelled calls to end, then for the close


class StartupError(RuntimeError):
    """The daemon cannot start; the message is the one line the user sees."""


# ---- logging: one JSON object per line on stderr ------------------------------

class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "fields"[, "exc"]}; extra={"fields": {...}}."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
                     .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "fields": getattr(record, "fields", {}),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # faiss announces at info which SIMD build it loaded; keep that for debug.
    logging.getLogger("faiss").setLevel(max(logging.WARNING, root.level)
                                        if level != "debug" else logging.DEBUG)


# ---- the server -------------------------------------------------------------------

def dial_address(listen: str, port: int) -> str:
    """What a client dials for a listen address (the real port for ':0')."""
    if socket_path(listen) is not None:
        return listen
    host = listen.rsplit(":", 1)[0]
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    return f"{host}:{port}"


def create_server(backend: MemoryBackend, listen: str, *, max_workers: int = MAX_WORKERS,
                  health_servicer: health.HealthServicer | None = None,
                  buffers: shm.ReplyBuffers | None = None, auth: Authenticator | None = None,
                  tls: ServerTLS | None = None, socket_mode: int = 0o600,
                  socket_group: str | None = None,
                  interceptors: Sequence[grpc.ServerInterceptor] = ()
                  ) -> tuple[grpc.Server, str]:
    """Start memoryd.v1.Memory (+ health, reflection) on listen; (server, address).

    buffers: the reply buffers (shared memory for same-host clients); default
    up to 1 GiB in /dev/shm when it exists. They are unmapped when the server
    object is collected or the process exits; serve() closes them at stop.
    auth: check tokens (None: off); tls: serve TLS (mutual with a client CA);
    socket_mode/socket_group: of a unix socket (see _bind).
    interceptors: grpc.ServerInterceptors, outermost first (e.g.
    memoryd.daemon.metrics.metrics_interceptor).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memoryd-rpc"),
        options=SERVER_OPTIONS, interceptors=list(interceptors) or None)
    if buffers is None:
        buffers = shm.ReplyBuffers(shm.default_dir(), file_mode=buffer_mode(socket_mode))
        weakref.finalize(server, buffers.close_all)
    add_to_server(MemoryServicer(backend, buffers, auth), server)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, listen, tls, socket_mode, socket_group)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, dial_address(listen, port)


def buffer_mode(socket_mode: int) -> int:
    """Reply buffers follow the socket: group-readable only when its group may connect."""
    return 0o640 if socket_mode & 0o060 else 0o600


def _bind(server: grpc.Server, listen: str, tls: ServerTLS | None, socket_mode: int,
          socket_group: str | None) -> int:
    """Add the listening port: TLS when configured; a unix socket gets socket_mode
    (0600 by default: the daemon's user alone) and socket_group. The socket is
    born 0600 (umask 0177 around the bind, so no other user can connect in
    the window before the chmod); the umask is the process's, but nothing
    else creates files while a server starts."""
    path = socket_path(listen)
    try:
        creds = tls.credentials() if tls is not None else None
    except MemorydError as e:
        raise StartupError(str(e)) from None
    old = os.umask(0o177) if path is not None else None
    try:
        port = server.add_secure_port(listen, creds) if creds is not None \
            else server.add_insecure_port(listen)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {listen}: {e}") from None
    finally:
        if old is not None:
            os.umask(old)
    if not port:
        raise StartupError(f"cannot listen on {listen}")
    if path is not None:
        try:
            if socket_group is not None:
                os.chown(path, -1, group_id(socket_group))
            os.chmod(path, socket_mode)
        except OSError as e:
            server.stop(0)
            raise StartupError(f"cannot set the mode/group of socket {path}: {e.strerror}") \
                from None
    return port


def group_id(group: str) -> int:
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"no group named {group!r} for the socket") from None


# ---- one daemon per data dir ------------------------------------------------------

# memoryd.engine.datadir.DataDirLock is taken by the daemon's LocalMemory; the
# socket is claimed once it is held.

def claim_socket(path: Path) -> None:
    """Make path free for our socket: refuse a live one, remove a stale one."""
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not path.is_socket():
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)            # stale: its daemon is gone
        log.info("removed stale socket", extra={"fields": {"socket": str(path)}})
        return
    except OSError as e:
        raise StartupError(f"cannot probe socket {path}: {os.strerror(e.errno or errno.EIO)}")
    finally:
        probe.close()
    raise StartupError(f"another daemon is listening on {path}; refusing to start")


# ---- serve: the process -------------------------------------------------------------

def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit code."""
    configure_logging(config.log_level)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        return _run(config)
    except (StartupError, OSError, MemorydError) as e:
        log.error(f"memoryd cannot start: {e}", extra={"fields": {
            "data_dir": str(config.data_dir), "listen": config.listen}})
        return 1
    except Exception:                       # noqa: BLE001 - a bug: keep the traceback
        log.exception("memoryd failed")
        return 1


def _run(config: Config) -> int:
    from memoryd.engine import LocalMemory   # imported late: faiss, sqlalchemy
    from memoryd.engine.datadir import DataDirInUse
    from memoryd.cluster.placement import Placement

    stop = threading.Event()
    seen: list[int] = []
    live: dict[str, grpc.Server] = {}

    def on_signal(signum, _frame):
        seen.append(signum)
        if len(seen) > 1 and "server" in live:   # impatient operator: cancel in-flight calls
            log.warning("second signal: cancelling in-flight calls")
            live["gate"].close()
            live["server"].stop(0)
        stop.set()

    # Handlers first: a SIGTERM while banks are still opening (which can take
    # a while) must also end in a clean close, not in the default kill.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            backend = LocalMemory(config.data_dir, config.catalog_url,   # the data dir's lock
                                  placement=Placement(config.shard_index, config.num_shards))
        except DataDirInUse as e:
            raise StartupError(f"another memoryd (pid {e.pid}) is already serving data dir "
                               f"{e.data_dir} (or memctl --data-dir / a LocalMemory has it "
                               "open)") from None
        try:
            if config.socket_path is not None:
                claim_socket(config.socket_path)    # with the lock held: no daemon races us
        except BaseException:
            backend.close()
            raise
        health_servicer = health.HealthServicer()
        buffers = shm.ReplyBuffers(config.shm_dir or shm.default_dir(),
                                   total_bytes=config.shm_bytes,
                                   file_mode=buffer_mode(config.socket_mode))
        stop_metrics = lambda: None    # noqa: E731 - until --metrics-listen serves
        try:
            gate = ShutdownGate(backend)   # what the servicer calls (see _shutdown)
            stop_metrics, metrics_at, interceptors = _start_metrics(config, backend)
            server, address = create_server(gate, config.listen,
                                            max_workers=config.max_workers,
                                            health_servicer=health_servicer, buffers=buffers,
                                            auth=_authenticator(config, backend),
                                            tls=config.tls, socket_mode=config.socket_mode,
                                            socket_group=config.socket_group,
                                            interceptors=interceptors)
        except BaseException:
            stop_metrics()
            backend.close()
            raise
        live["server"], live["gate"] = server, gate
        log.info("memoryd started", extra={"fields": {
            "address": address, "data_dir": str(config.data_dir), "pid": os.getpid(),
            "catalog_url": config.catalog_url, "version": __version__,
            "max_workers": config.max_workers,
            # how faiss's idle OpenMP threads wait: the user's policy, else
            # PASSIVE (storage.faiss_index sets it around `import faiss`)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE",
            "reply_buffers": str(buffers.directory) if buffers.enabled else "off",
            "auth": "on" if config.auth else "off", "tls": _tls_mode(config),
            "metrics": metrics_at or "off",
            "shard": f"{config.shard_index}/{config.num_shards}"}})
        while not stop.wait(1.0):
            pass
        log.info("memoryd stopping", extra={"fields": {
            "signal": signal.Signals(seen[0]).name, "grace_s": config.grace_s}})
        health_servicer.enter_graceful_shutdown()
        try:
            return _shutdown(config, server, buffers, backend, gate)
        finally:
            stop_metrics()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _start_metrics(config: Config, backend: MemoryBackend):
    """--metrics-listen (memoryd.daemon.metrics): (stop, the bound 'host:port',
    the server's interceptors); when off: (a no-op, None, [])."""
    if config.metrics_listen is None:
        return (lambda: None), None, []
    from memoryd.daemon import metrics

    registry = metrics.new_registry()
    interceptors = [metrics.metrics_interceptor(registry)]
    try:
        stop, where = metrics.start_metrics(config.metrics_listen, backend, registry=registry)
    except OSError as e:
        raise StartupError(f"cannot serve metrics on {config.metrics_listen}: "
                           f"{e.strerror or e}") from None
    return stop, where, interceptors


def _authenticator(config: Config, backend) -> Authenticator | None:
    """Tokens checked against the catalog (auth on), with the warnings an operator needs."""
    if not config.auth:
        return None
    if not backend.tokens.has_admin():
        log.warning("auth is on but the catalog holds no admin token: stop the daemon and run "
                    f"`memctl --data-dir {config.data_dir} token create --admin`")
    if config.socket_path is None and config.tls is None:
        log.warning("auth over plain TCP: tokens cross the network in clear; "
                    "add --tls-cert/--tls-key")
    return Authenticator(backend.tokens)


def _tls_mode(config: Config) -> str:
    if config.tls is None:
        return "off"
    return "mutual" if config.tls.client_ca is not None else "on"


def _handlers_running(server: grpc.Server) -> int:
    """RPC handlers still running in the server's pool (gRPC Python's own count,
    which ends when a handler returns, not when its call is cancelled); 0 if
    this gRPC does not keep one."""
    return int(getattr(getattr(server, "_state", None), "active_rpc_count", 0) or 0)


def _wait(until, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class ShutdownGate:
    """The backend as the daemon's servicer sees it; close() refuses, from then
    on, the writes that client streams feed (add, update_values, append).

    When the shutdown cancels a call whose client stream is still open, gRPC
    Python ends the handler's request iterator as if the client had finished
    the stream (StopIteration, not an error), and the handler would apply the
    rows received so far although the client never completed its write. The
    gate closes just BEFORE the cancel, so such a write is refused (Unavailable;
    its client sees CANCELLED) while every stream that ended before is applied."""

    STREAM_WRITES = frozenset({"add", "update_values", "append"})

    def __init__(self, backend: MemoryBackend):
        self._backend = backend
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def __getattr__(self, name: str):
        attr = getattr(self._backend, name)
        if name not in self.STREAM_WRITES:
            return attr

        def gated(*args, **kwargs):
            if self._closed:
                raise Unavailable("memoryd is shutting down: the write stream was cut before "
                                  "its end, and nothing of it was applied")
            return attr(*args, **kwargs)
        return gated


def _shutdown(config: Config, server: grpc.Server, buffers: shm.ReplyBuffers,
              backend: MemoryBackend, gate: ShutdownGate) -> int:
    """Stop serving within grace_s + 2 * STOP_SLACK_S (module doc); the exit code.

    server.stop() refuses new calls; the calls in flight get grace_s, and then
    the gate closes (ShutdownGate) and they are cancelled (a handler blocked on
    a client stream left open then sees it end). gRPC's own cancel at the end
    of its grace would come before the gate, so it is given more time than
    ours. Its event is not waited on blindly: a handler that runs on (a search
    inside FAISS, a queued call started late) would hold the main thread, and
    then a supervisor's SIGKILL, past any grace."""
    stopped = server.stop(config.grace_s + 3600)     # we cancel, after the gate closes
    done = lambda: stopped.is_set() and _handlers_running(server) == 0   # noqa: E731
    if not _wait(done, config.grace_s):
        gate.close()
        log.warning("calls outlived the grace period: cancelling them", extra={"fields": {
            "grace_s": config.grace_s, "handlers_running": _handlers_running(server)}})
        server.stop(0)                       # cancel whatever is still in flight
        _wait(done, STOP_SLACK_S)
    buffers.close_all()                      # each buffer under its lock: no write is torn
    if _handlers_running(server) == 0:
        return _close(config, backend)
    # Handlers still run and hold bank locks the close would wait for: close in
    # a thread, and if it cannot finish in time, exit without it.
    result: list[int] = []
    closer = threading.Thread(target=lambda: result.append(_close(config, backend)),
                              name="memoryd-close", daemon=True)
    closer.start()
    closer.join(STOP_SLACK_S)
    if result:
        return result[0]
    log.error("handlers still running after the grace period hold banks open: exiting "
              "without the final snapshot (acknowledged writes are on disk; the next start "
              "replays them)", extra={"fields": {
                  "handlers_running": _handlers_running(server), "exit_code": 0}})
    if config.socket_path is not None:
        config.socket_path.unlink(missing_ok=True)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(0)   # the pool's threads are not daemons: a normal exit would wait for them


def _close(config: Config, backend: MemoryBackend) -> int:
    code = 0
    try:
        backend.close()
    except Exception:                       # noqa: BLE001 - report, still clean up
        log.exception("closing the backend failed; data written since the last flush "
                      "may be lost")
        code = 1
    if config.socket_path is not None:
        config.socket_path.unlink(missing_ok=True)
    log.info("memoryd stopped", extra={"fields": {"exit_code": code}})
    return code


# ---- probes ---------------------------------------------------------------------

def health_status(address: str, service: str = "", timeout: float = 1.0,
                  tls: ClientTLS | None = None) -> str:
    """The daemon's health status name (e.g. 'SERVING'); grpc.RpcError if it does not answer.
    Health needs no token, but a TLS daemon needs TLS (and its client cert for mutual TLS)."""
    target = grpc_target(address)
    with (secure_channel(target, tls, []) if tls is not None
          else grpc.insecure_channel(target)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(address: str, *, timeout: float = 30.0, proc=None,
                 tls: ClientTLS | None = None) -> None:
    """Return once the daemon at address is SERVING; RuntimeError if `proc`
    (its subprocess.Popen) exits first, TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"memoryd exited with code {proc.returncode} while starting")
        try:
            if health_status(address, timeout=1.0, tls=tls) == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"memoryd at {address} was not serving within {timeout:g} s")


def spawn(data_dir: str | Path, *extra: str, timeout: float = 600.0, **popen):
    """Start `memoryd serve --data-dir data_dir` as a subprocess (benchmarks,
    demos); return (process, address) once it is SERVING on its unix socket."""
    import subprocess

    address = f"unix://{Path(data_dir).resolve() / 'memoryd.sock'}"
    proc = subprocess.Popen([sys.executable, "-m", "memoryd.daemon.cli", "serve", "--data-dir",
                             str(data_dir), "--log-level", "warning", *extra], **popen)
    wait_serving(address, timeout=timeout, proc=proc)  # loading a big bank takes a while
    return proc, address
