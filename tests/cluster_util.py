"""A local cluster for tests: N `memoryd serve --shard-index i` processes on one
shared catalog, and a `memoryd route` process in front of them.

    with LocalCluster(root, catalog_url, shards=2) as c:
        mem = MemoryClient(c.address)          # the router
        c.kill(1); c.restart(1)                # SIGKILL a shard, start it again

Every process listens on 127.0.0.1 at a port picked free when the cluster
starts; a shard keeps its port across restarts, so the router's --shards
list stays true. Logs go to files under root (shown when a start fails).
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from daemon_util import daemon_env, memoryd_command
from memoryd.daemon.server import wait_serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path, catalog_url: str, shards: int = 2,
                 router_args: tuple[str, ...] = (), shard_args: tuple[str, ...] = ()):
        self.root, self.catalog_url, self.n = Path(root), catalog_url, shards
        self.shard_args = shard_args
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = [free_port() for _ in range(shards)]
        self.shard_addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.procs: list[subprocess.Popen | None] = [None] * shards
        self.router: subprocess.Popen | None = None
        self.address = f"127.0.0.1:{free_port()}"
        try:
            for i in range(shards):
                self._start_shard(i)
            self.router = self._spawn("router", [
                "route", "--listen", self.address, "--shards", ",".join(self.shard_addresses),
                "--shard-timeout", "10", "--grace", "1", *router_args])
            self._wait(self.router, self.address)
        except BaseException:
            self.close()
            raise

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log_path = self.root / f"{name}.{time.monotonic_ns()}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*memoryd_command(), *args], stdout=log, stderr=log,
                                    env=daemon_env())
        proc.log_path = log_path  # type: ignore[attr-defined]
        return proc

    def _wait(self, proc: subprocess.Popen, address: str) -> None:
        try:
            wait_serving(address, timeout=60, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}:\n{proc.log_path.read_text()}") from None

    def _start_shard(self, i: int) -> None:
        proc = self._spawn(f"shard{i}", [
            "serve", "--data-dir", str(self.root / f"shard{i}"),
            "--listen", self.shard_addresses[i], "--shard-index", str(i),
            "--num-shards", str(self.n), "--catalog-url", self.catalog_url,
            "--grace", "1", "--shm-dir", "off", *self.shard_args])
        self.procs[i] = proc
        self._wait(proc, self.shard_addresses[i])

    def kill(self, i: int) -> None:
        """SIGKILL shard i (no clean shutdown: its log replays at restart)."""
        proc = self.procs[i]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.procs[i] = None

    def restart(self, i: int) -> None:
        self._start_shard(i)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for proc in [self.router, *self.procs]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [self.router, *self.procs]:
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

