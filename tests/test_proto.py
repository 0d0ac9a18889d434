"""The checked-in stubs in memoryd/v1/ must be what protoc makes of proto/."""
from pathlib import Path

import pytest

from memoryd import protogen

pytest.importorskip("grpc_tools")


def test_stubs_match_the_proto(tmp_path: Path):
    generated = protogen.generate(tmp_path)
    assert {p.name for p in generated} == {"memory_pb2.py", "memory_pb2.pyi", "memory_pb2_grpc.py"}
    for path in generated:
        checked_in = protogen.ROOT / "memoryd" / "v1" / path.name
        assert checked_in.read_text() == path.read_text(), (
            f"memoryd/v1/{path.name} is stale: run `python -m memoryd.protogen`")


def test_package_is_versioned():
    from memoryd.v1 import memory_pb2

    assert memory_pb2.DESCRIPTOR.package == "memoryd.v1"
    assert "Memory" in memory_pb2.DESCRIPTOR.services_by_name
