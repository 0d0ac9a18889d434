"""The layout is the architecture: layers import only the layers below them,
no module imports itself round a circle, and the model-side layer never
loads the daemon's engine, storage or faiss.

Every import counts, also those inside functions (a lazy import is still an
arrow). `from pkg import name` is an arrow to pkg.name when that is a module
of ours, else to pkg.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"memoryd": ROOT / "memoryd", "knnlayer": ROOT / "knnlayer",
           "memctl": ROOT / "cli" / "memctl"}

# Each layer and the layers it may import (besides its own modules).
CORE = "core"
LAYERS = {
    CORE: set(),
    "storage": {CORE},
    "wire": {CORE},
    "auth": {CORE},                   # token format, rights rules, token checks
    "cluster": {CORE},                # placement, exact merge, ShardedMemory over backends
    "engine": {CORE, "storage", "auth", "cluster"},   # a shard's placement
    # the router (daemon/router.py) dials its shards with the gRPC client
    "daemon": {CORE, "wire", "engine", "auth", "cluster", "knnlayer"},
    "knnlayer": {CORE, "wire", "cluster"},            # MemoryClient.sharded
    "memctl": {CORE, "wire", "engine", "knnlayer", "auth", "cluster"},
    "tools": {CORE},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("knnlayer", "memctl"):
        return parts[0]
    if len(parts) > 1 and parts[1] in ("storage", "wire", "engine", "daemon", "auth", "cluster"):
        return parts[1]
    if module == "memoryd.protogen":
        return "tools"
    return CORE                       # memoryd's own top-level modules and v1 stubs


def modules() -> dict[str, Path]:
    out = {}
    for top, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Our modules that the file at path imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_the_layers_are_folders(graph):
    for folder in ("storage", "engine", "wire", "daemon", "auth", "cluster"):
        assert f"memoryd.{folder}" in graph
    assert "memctl.cli" in graph and (ROOT / "cli" / "memctl" / "cli.py").exists()
    top = sorted(m for m in graph if m.count(".") == 1 and m.startswith("memoryd.")
                 and layer_of(m) == CORE)
    assert top == ["memoryd.api", "memoryd.arrays", "memoryd.errors",
                   "memoryd.faults", "memoryd.keyspace", "memoryd.sizes", "memoryd.stacklog",
                   "memoryd.telemetry",
                   "memoryd.topk", "memoryd.v1"]


def test_no_upward_arrows(graph):
    bad = [(a, b) for a, deps in graph.items() for b in deps
           if layer_of(b) != layer_of(a) and layer_of(b) not in LAYERS[layer_of(a)]]
    assert bad == []


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: each must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_sessions_are_built_on_the_engine_not_beside_it(graph):
    assert "memoryd.engine.banks" in graph["memoryd.engine.sessions"]
    assert "memoryd.engine.sessions" not in graph["memoryd.engine.banks"]
    assert "memoryd.engine.local" not in graph["memoryd.engine.sessions"]


def test_knnlayer_needs_no_engine_storage_or_daemon(graph):
    reach, todo = set(), [m for m in graph if m.startswith("knnlayer")]
    while todo:
        m = todo.pop()
        for d in graph[m] - reach:
            reach.add(d)
            todo.append(d)
    assert not {m for m in reach if layer_of(m) in ("storage", "engine", "daemon")}


def test_a_model_on_a_remote_memory_never_loads_faiss(tmp_path):
    """KNNAttention against a MemoryClient, forward included, in a fresh process:
    faiss and the daemon's layers stay out of sys.modules."""
    from daemon_util import start_daemon, stop_daemon

    proc, address = start_daemon(tmp_path / "data")
    script = textwrap.dedent(f"""
        import sys
        import torch
        from knnlayer import KNNAttention, MemoryClient, create_base_bank
        mem = MemoryClient({address!r})
        create_base_bank(mem, "pk", 64, 8, 4, index="product-keys")
        create_base_bank(mem, "flat", 50, 8, 4)
        for banks in (["pk"], ["flat"]):
            attn = KNNAttention(input_dim=6, key_dim=8, value_dim=4, num_heads=2, topk=3,
                                memory=mem, banks=banks)
            y = attn(torch.randn(2, 5, 6))
            y.sum().backward()
            with torch.no_grad():
                attn(torch.randn(1, 1, 6))
            assert y.shape == (2, 5, 8)
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] == "faiss" or m.startswith(("memoryd.storage",
                           "memoryd.engine", "memoryd.daemon")))
        print("LOADED", loaded)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    finally:
        stop_daemon(proc)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout
