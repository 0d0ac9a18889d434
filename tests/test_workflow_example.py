"""examples/memory_workflow.py runs as the README says (tiny settings): the
three steps through a real daemon, the frozen base bank byte-identical."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_memory_workflow_runs_end_to_end():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "memory_workflow.py"),
                        "--steps", "3", "--segments", "3"],
                       capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for line in ("base bank frozen: checksum sha256:", "key version:",
                 "base bank byte-identical: True", "hold [192, 192] rows after 3 segments",
                 "into 'notes'"):
        assert line in out, (line, out)
