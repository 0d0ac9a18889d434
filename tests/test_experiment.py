"""The memory experiment (experiments/memory_lm): --tiny end to end through a real
daemon (`memoryd serve` spawned by run.py, MemoryClient), and the mechanics the
numbers rest on. Quality (bpb values, win lines) is the experiment's to report,
not a test's to assert."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def _floats(obj, path=""):
    if isinstance(obj, float):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floats(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _floats(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMORYD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-m", "experiments.memory_lm.run", "--tiny", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    res["_out"] = str(out)
    res["_stdout"] = r.stdout
    return res


def test_tiny_every_figure_finite(tiny):
    assert tiny["nonfinite"] == []
    bad = [p for p, v in _floats(tiny) if not math.isfinite(v)]
    assert not bad
    assert (Path(tiny["_out"]) / "summary.md").read_text().startswith("# memory_lm results (--tiny)")
    for section in ("pretrain", "finetune", "phase_s", "session", "mechanics", "timings_s"):
        assert section in tiny
    assert set(tiny["finetune"]["arms"]) == {"dense", "lora", "domain_random", "domain_data"}
    assert len(tiny["data"]["read"]["sha256"]) == 64 and tiny["versions"]["sympy"]


def test_tiny_plots_or_said_skipped(tiny):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "skipped" in tiny["plots"]
    else:
        assert all((Path(tiny["_out"]) / p).stat().st_size > 0 for p in tiny["plots"])


def test_base_bank_frozen_and_unchanged(tiny):
    bb = tiny["mechanics"]["base_bank"]
    assert bb["frozen"] and bb["kind"] == "base"
    assert bb["checksum_at_freeze"].startswith("sha256:")
    assert bb["export_sha256_before"] == bb["export_sha256_after"]
    assert bb["checksum_catalog_after"] == bb["checksum_at_freeze"]
    assert bb["unchanged"]
    assert bb["writes_after_freeze"] == {"update_values": "BankFrozen", "add": "BankFrozen"}


def test_domain_ft_touches_only_the_domain_table(tiny):
    for name in ("domain_random", "domain_data"):
        m = tiny["finetune"]["arms"][name]["mechanics"]
        assert m["dense_params_bitwise_equal"], name
        assert m["base_table_bitwise_equal"], name
        assert m["untouched_rows_bitwise_equal"], name
        assert m["rows_touched"] > 0 and m["rows_changed"] <= m["rows_touched"]


def test_zero_gate_episodic_leaves_logits_unchanged(tiny):
    assert tiny["mechanics"]["zero_gate_logits_equal"]
    assert tiny["mechanics"]["zero_gate_max_abs_diff"] == 0.0


def test_every_setting_scores_the_same_bytes_and_fifo_caps(tiny):
    s = tiny["session"]
    assert s["identical_bytes"] and len(set(s["scored_sha256"].values())) == 1
    cfg = tiny["config"]
    assert s["scored_bytes"] == cfg["docs"] * cfg["span"]
    assert set(s["bpb"]) == {"no-episodic", *s["settings"]}
    for m in cfg["mems"]:
        if m:
            rows = min(m, cfg["prefix"])
            assert s["rows_after_fill"][f"M={m}"] == [rows] * cfg["docs"]
            assert s["rows_at_end"][f"M={m}"] == [rows] * cfg["docs"]       # fifo kept its cap
    wrong = s["settings"][-1]
    assert s["rows_at_end"][wrong] == s["rows_after_fill"][wrong]      # the control writes nothing


def test_uniform_logits_give_8_bpb(tiny):
    from experiments.memory_lm.evaluate import bpb_of_logits
    assert abs(tiny["mechanics"]["uniform_logits_bpb"] - 8.0) < 1e-12
    targets = torch.randint(0, 256, (3, 17))
    for logits in (torch.zeros(3, 17, 256), torch.full((3, 17, 256), 5.0)):
        assert abs(bpb_of_logits(logits, targets) - 8.0) < 1e-12


def test_splits_deterministic_and_disjoint(tiny):
    from experiments.memory_lm import data
    sp = tiny["data"]["splits"]
    assert sp["stdlib"] == {"deterministic": True, "disjoint": True}
    assert sp["sympy"] == {"deterministic": True, "disjoint": True}
    assert sp["docs_not_in_training"]
    for root, excl in [(data.stdlib_root(), data.STDLIB_EXCLUDE), (data.sympy_root(), data.SYMPY_EXCLUDE)]:
        files = data.list_files(root, excl)
        a, b = data.split_files(files), data.split_files(list(reversed(files)))
        assert sorted(a[0]) == sorted(b[0]) and sorted(a[1]) == sorted(b[1])
        assert not set(a[0]) & set(a[1]) and set(a[0]) | set(a[1]) == set(files)
        assert a[1], "the val split is empty"
        assert not any(set(Path(f).parts[:-1]) & excl for f in files)
    for doc in tiny["data"]["docs"]:
        assert doc.startswith("test/") and data.split_of(doc) in ("train", "val")
        assert doc not in data.list_files(data.stdlib_root(), data.STDLIB_EXCLUDE)


def test_paired_bootstrap():
    from experiments.memory_lm.evaluate import paired_bootstrap
    a = np.arange(10.0)
    r = paired_bootstrap(a, a, 4)
    assert r["delta"] == 0 and r["lo"] == 0 and r["hi"] == 0
    r = paired_bootstrap(a, a - 4.0, 4)        # 1 bit per byte less, every unit
    assert r["delta"] == -1.0 and r["lo"] == r["hi"] == -1.0
