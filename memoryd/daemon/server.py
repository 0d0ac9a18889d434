"""Wiring of the daemon: gRPC server, health, reflection, logging, lifecycle.

    create_server(backend, listen)  a started in-process server (tests,
                                    embedding); returns (server, address)
    serve(config)                   the `memoryd serve` process: exit code

Shutdown (SIGTERM or SIGINT): health goes NOT_SERVING, the server stops
taking calls and gives in-flight ones `grace_s` to finish, the backend is
closed (which flushes everything to disk), the socket file is removed, exit
0. A second signal cancels what is still in flight.

One daemon per data dir: serve() holds an exclusive lock on
`<data_dir>/memoryd.pid` for its lifetime and refuses to start, with one
clear line and exit code 1, when another process holds it or when a live
daemon answers on its unix socket. A stale socket file is removed.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
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

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memoryd import __version__
from memoryd.api import MemoryBackend
from memoryd.daemon.config import MAX_WORKERS, Config
from memoryd.daemon.service import MemoryServicer, add_to_server
from memoryd.errors import MemorydError
from memoryd.v1 import memory_pb2
from memoryd.wire import shm
from memoryd.wire.channel import SERVER_OPTIONS, grpc_target, socket_path

log = logging.getLogger("memoryd.server")

SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["Memory"].full_name  # memoryd.v1.Memory
LOCK_NAME = "memoryd.pid"


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
                  buffers: shm.ReplyBuffers | None = None) -> tuple[grpc.Server, str]:
    """Start memoryd.v1.Memory (+ health, reflection) on listen; (server, address).

    buffers: the reply buffers (shared memory for same-host clients); default
    up to 1 GiB in /dev/shm when it exists. They are unmapped when the server
    object is collected or the process exits; serve() closes them at stop.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="memoryd-rpc"),
        options=SERVER_OPTIONS)
    if buffers is None:
        buffers = shm.ReplyBuffers(shm.default_dir())
        weakref.finalize(server, buffers.close_all)
    add_to_server(MemoryServicer(backend, buffers), server)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise StartupError(f"cannot listen on {listen}: {e}") from None
    if not port:
        raise StartupError(f"cannot listen on {listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, dial_address(listen, port)


# ---- one daemon per data dir ------------------------------------------------------

class DataDirLock:
    """An exclusive flock on <data_dir>/memoryd.pid, held while the daemon lives."""

    def __init__(self, data_dir: Path):
        self.path = data_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(f"another memoryd (pid {pid}) is already serving data dir "
                               f"{self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


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
    lock = DataDirLock(config.data_dir)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        sock = config.socket_path
        if sock is not None:
            claim_socket(sock)
        return _run(config)
    except (StartupError, OSError, MemorydError) as e:
        log.error(f"memoryd cannot start: {e}", extra={"fields": {
            "data_dir": str(config.data_dir), "listen": config.listen}})
        return 1
    except Exception:                       # noqa: BLE001 - a bug: keep the traceback
        log.exception("memoryd failed")
        return 1
    finally:
        lock.release()


def _run(config: Config) -> int:
    from memoryd.engine import LocalMemory   # imported late: faiss, sqlalchemy

    stop = threading.Event()
    seen: list[int] = []
    live: dict[str, grpc.Server] = {}

    def on_signal(signum, _frame):
        seen.append(signum)
        if len(seen) > 1 and "server" in live:   # impatient operator: cancel in-flight calls
            log.warning("second signal: cancelling in-flight calls")
            live["server"].stop(0)
        stop.set()

    # Handlers first: a SIGTERM while banks are still opening (which can take
    # a while) must also end in a clean close, not in the default kill.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        backend = LocalMemory(config.data_dir, config.catalog_url)
        health_servicer = health.HealthServicer()
        buffers = shm.ReplyBuffers(config.shm_dir or shm.default_dir(),
                                   total_bytes=config.shm_bytes)
        try:
            server, address = create_server(backend, config.listen,
                                            max_workers=config.max_workers,
                                            health_servicer=health_servicer, buffers=buffers)
        except BaseException:
            backend.close()
            raise
        live["server"] = server
        log.info("memoryd started", extra={"fields": {
            "address": address, "data_dir": str(config.data_dir), "pid": os.getpid(),
            "catalog_url": config.catalog_url, "version": __version__,
            "max_workers": config.max_workers,
            # how faiss's idle OpenMP threads wait: the user's policy, else
            # PASSIVE (storage.faiss_index sets it around `import faiss`)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE",
            "reply_buffers": str(buffers.directory) if buffers.enabled else "off"}})
        while not stop.wait(1.0):
            pass
        log.info("memoryd stopping", extra={"fields": {
            "signal": signal.Signals(seen[0]).name, "grace_s": config.grace_s}})
        health_servicer.enter_graceful_shutdown()
        server.stop(config.grace_s).wait()
        buffers.close_all()
        return _close(config, backend)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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

def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The daemon's health status name (e.g. 'SERVING'); grpc.RpcError if it does not answer."""
    with grpc.insecure_channel(grpc_target(address)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(address: str, *, timeout: float = 30.0, proc=None) -> None:
    """Return once the daemon at address is SERVING; RuntimeError if `proc`
    (its subprocess.Popen) exits first, TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"memoryd exited with code {proc.returncode} while starting")
        try:
            if health_status(address, timeout=1.0) == "SERVING":
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
