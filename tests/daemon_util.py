"""Run `memoryd serve` as a subprocess for tests.

    proc, address = start_daemon(data_dir)     # waits until health is SERVING
    ...
    code = stop_daemon(proc)                   # SIGTERM, wait, exit code

The daemon's stderr (JSON log lines) goes to `proc.log_path`, a file next to
the data dir, so a chatty daemon can never block on a full pipe.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from memoryd.daemon.server import wait_serving

ROOT = Path(__file__).resolve().parent.parent


def memoryd_command() -> list[str]:
    """The installed console script if there is one, else `python -m memoryd.daemon.cli`."""
    script = Path(sys.executable).parent / "memoryd"
    if script.exists():
        return [str(script)]
    found = shutil.which("memoryd")
    return [found] if found else [sys.executable, "-m", "memoryd.daemon.cli"]


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORYD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def serve_args(data_dir: str | Path, *extra: str) -> list[str]:
    return [*memoryd_command(), "serve", "--data-dir", str(data_dir), *extra]


def start_daemon(data_dir: str | Path, *extra: str, timeout: float = 30.0
                 ) -> tuple[subprocess.Popen, str]:
    """Start `memoryd serve --data-dir data_dir` and wait until it serves."""
    data_dir = Path(data_dir)
    address = f"unix://{data_dir.resolve() / 'memoryd.sock'}"
    log_path = data_dir.parent / f"{data_dir.name}.{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(serve_args(data_dir, *extra), stdout=log, stderr=log,
                                env=daemon_env())
    proc.log_path = log_path  # type: ignore[attr-defined]
    try:
        wait_serving(address, timeout=timeout, proc=proc)
    except RuntimeError as e:
        raise RuntimeError(f"{e}:\n{log_path.read_text()}") from None
    except TimeoutError as e:
        stop_daemon(proc, timeout=5)
        raise TimeoutError(f"{e}:\n{log_path.read_text()}") from None
    return proc, address


def stop_daemon(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal the daemon and wait for it; kill it if it overstays. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise
    return proc.returncode


def daemon_log(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]
