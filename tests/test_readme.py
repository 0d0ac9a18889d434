"""The README runs as written: its CLI tour and its Python section, verbatim,
against a real daemon in a temp dir (so they can never drift from the code)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from daemon_util import start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block(section: str, lang: str) -> str:
    """The first ```lang block under the '## section' heading."""
    body = README.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"```{lang}\n(.*?)```", body, re.S)
    assert m, f"no {lang} block under '## {section}'"
    return m.group(1)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEMCTL_", "MEMORYD_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_sh(script: str, cwd: Path, timeout: float) -> tuple[int, str]:
    """(exit code, output) of a README shell block run in bash -eu -o pipefail;
    whatever it left running (a daemon started with &) is killed with it."""
    proc = subprocess.Popen(["bash", "-eu", "-o", "pipefail", "-c", script], cwd=cwd,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def test_cli_tour_runs_as_written(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "tour_files.py")], cwd=tmp_path,
                   check=True, capture_output=True)
    proc = subprocess.Popen(["bash", "-eu", "-o", "pipefail", "-c", block("CLI tour", "sh")],
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None or (tmp_path / "mem" / "memoryd.sock").exists():
            os.killpg(proc.pid, signal.SIGKILL)    # a failed tour leaves its daemon behind
    assert proc.returncode == 0, out[-4000:]
    for needle in ("memoryd at unix://", "SERVING", "refused: over med's quota",
                   "promoted", "tier: ram -> mmap", '"memoryd stopped"'):
        assert needle in out, (needle, out[-4000:])
    assert not (tmp_path / "mem" / "memoryd.sock").exists()      # stopped cleanly by the tour
    assert (tmp_path / "med-dump" / "keys.npy").exists()


def test_python_section_runs_as_written(tmp_path):
    proc, _ = start_daemon(tmp_path / "mem")
    try:
        out = subprocess.run([sys.executable, "-c", block("Python", "python")], cwd=tmp_path,
                             env=clean_env(), capture_output=True, text=True, timeout=180)
    finally:
        assert stop_daemon(proc) == 0
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip() == "shared memory"


def test_memory_augmented_transformer_section_runs_as_written(tmp_path):
    proc, _ = start_daemon(tmp_path / "mem")
    try:
        out = subprocess.run([sys.executable, "-c", block("Memory-augmented transformer", "python")],
                             cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                             timeout=240)
    finally:
        assert stop_daemon(proc) == 0
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip() == "32"


def test_the_gpu_hint_is_the_readme_install_line():
    from memoryd.storage.faiss_index import GPU_HINT, INSTALL_HINT

    line = "pip install -e '.[gpu]'"
    assert line in README
    assert line in GPU_HINT and "-e '.[gpu]'" in INSTALL_HINT


def test_cluster_section_runs_as_written(tmp_path):
    """Two shard processes on one catalog, a router, memctl and the client
    through it, the in-process router, a metrics scrape: the README's ports
    swapped for free ones (tests never bind fixed ports)."""
    import socket

    def free() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    script = block("Past one machine: shards, a router, PostgreSQL", "sh")
    for port in ("7070", "7071", "7072", "9464"):
        assert f"127.0.0.1:{port}" in script
        script = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free()}")
    rc, out = run_sh(script, tmp_path, timeout=180)
    assert rc == 0, out[-4000:]
    for needle in ("rows per shard: [5000, 5000]", "found themselves: True",
                   "same answer in-process: True", "memoryd_fanout_requests_total{"):
        assert needle in out, (needle, out[-4000:])
    assert re.search(r"^count: +10,?000$", out, re.M), out[-4000:]
    assert "alembic" not in out          # the catalog's migrations log nothing at info
