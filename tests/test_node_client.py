"""A Node.js client built from memory.proto alone talks to a real daemon.

tests/node/client.js loads proto/memoryd/v1/memory.proto with
@grpc/proto-loader (no generated code), creates a bank, adds rows in two
messages of one Add stream, searches with a reply that spans several
streamed messages on DEFAULT channel options (4 MiB receive limit), decodes
the raw little-endian tensors itself, and reads two errors' google.rpc
details from the trailer. Its answers must equal LocalMemory's.

Needs `node` on PATH (else skipped) and `npm ci --prefix tests/node` (else
this test fails and says so).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

NODE_DIR = Path(__file__).resolve().parent / "node"
DIM, VDIM, ROWS, NQ, K = 8, 8, 3000, 6000, 32
LIMIT = 4 * 1024 * 1024


def node() -> str:
    """The node executable; skip without one, fail without the installed packages."""
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not on PATH")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs"):
        if not (NODE_DIR / "node_modules" / package / "package.json").exists():
            pytest.fail(f"tests/node/node_modules lacks {package}: run `npm ci --prefix tests/node`")
    return exe


@pytest.fixture
def daemon(tmp_path):
    from memoryd.daemon.server import create_server
    from memoryd.engine import LocalMemory

    backend = LocalMemory(tmp_path / "data")
    server, address = create_server(backend, "127.0.0.1:0")
    try:
        yield backend, address
    finally:
        server.stop(0).wait(5)
        backend.close()


def test_node_client_from_proto_alone(daemon, tmp_path):
    exe = node()
    backend, address = daemon
    rng = np.random.default_rng(20)
    keys = rng.standard_normal((ROWS, DIM), np.float32)
    values = rng.standard_normal((ROWS, VDIM), np.float32)
    queries = rng.standard_normal((NQ, DIM), np.float32)
    work = tmp_path / "node-input"
    work.mkdir()
    for name, a in (("keys", keys), ("values", values), ("queries", queries)):
        (work / f"{name}.bin").write_bytes(a.astype("<f4").tobytes())
    params = dict(bank="nodebank", dim=DIM, value_dim=VDIM, rows=ROWS, nq=NQ, k=K,
                  client_name="node-client test", quota_bank="nodequota")
    (work / "params.json").write_text(json.dumps(params))

    run = subprocess.run([exe, str(NODE_DIR / "client.js"), address, str(work)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)

    # CreateBank: defaults filled in by the daemon, the quota unlimited (-1)
    assert out["bank"] == {"name": "nodebank", "dim": DIM, "value_dim": VDIM,
                           "value_dtype": "FLOAT32", "metric": "L2", "kind": "DOMAIN",
                           "index": "Flat", "quota_bytes": "-1", "count": "0"}
    # Add over two messages: all rows, ids 0..n-1
    assert out["add"] == {"dtype": "INT64", "shape": [ROWS], "ids_first": 0,
                          "ids_last": ROWS - 1, "consecutive": True}
    assert backend.bank_info("nodebank").count == ROWS
    np.testing.assert_array_equal(backend.get("nodebank", np.arange(ROWS), keys=True).keys, keys)

    # Search: several messages, each within 4 MiB, consecutive offsets
    s = out["search"]
    assert s["messages"] >= 2 and len(s["bytes"]) == s["messages"]
    assert max(s["bytes"]) <= LIMIT, s["bytes"]
    assert max(s["rows"]) * K * (8 + 4 + 4 + 4 * VDIM) <= LIMIT - 4096   # array data per message
    assert s["offsets"] == np.cumsum([0] + s["rows"][:-1]).tolist()
    assert sum(s["rows"]) == NQ
    assert {tuple(d) for d in s["dtypes"]} == {("INT64", "FLOAT32", "INT32", "FLOAT32")}
    want = backend.search(["nodebank"], queries, K, values=True)
    ids = np.array(s["ids"], np.int64).reshape(NQ, K)
    np.testing.assert_array_equal(ids, want.ids)
    np.testing.assert_array_equal(np.array(s["scores"], np.float32).reshape(NQ, K), want.scores)
    np.testing.assert_array_equal(np.array(s["bank"], np.int32).reshape(NQ, K), want.bank)
    assert s["values_shape"] == [K, VDIM]
    for offset, row in s["values_rows"].items():
        np.testing.assert_array_equal(np.array(row, np.float32).reshape(K, VDIM),
                                      want.values[int(offset)])

    # errors, read from grpc-status-details-bin
    missing, quota = out["errors"]
    assert missing["call"] == "Search" and missing["code"] == 5 and missing["code_name"] == "NOT_FOUND"
    assert missing["status_code"] == 5 and missing["status_message"] == missing["details"]
    assert missing["detail_types"] == ["type.googleapis.com/google.rpc.ErrorInfo"]
    assert missing["error_info"] == {"reason": "NOT_FOUND", "domain": "memoryd", "metadata": {}}
    assert quota["call"] == "Add" and quota["code"] == 8 and quota["code_name"] == "RESOURCE_EXHAUSTED"
    assert quota["detail_types"] == ["type.googleapis.com/google.rpc.ErrorInfo",
                                     "type.googleapis.com/google.rpc.QuotaFailure"]
    info = quota["error_info"]
    assert (info["reason"], info["domain"]) == ("QUOTA_EXCEEDED", "memoryd")
    assert set(info["metadata"]) == {"bank", "used", "limit", "requested", "scope"}
    assert (info["metadata"]["bank"], info["metadata"]["scope"], info["metadata"]["limit"]) == \
        ("nodequota", "bank", "1000")
    assert [v["subject"] for v in quota["quota_violations"]] == ["bank:nodequota"]
    assert backend.bank_info("nodequota").count == 0

    # the x-memoryd-client metadata names the caller
    stacks = {(u.client, u.banks) for u in backend.stats().stacks}
    assert ("node-client test", ("nodebank",)) in stacks
