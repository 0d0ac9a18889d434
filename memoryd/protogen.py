"""Generate the Python stubs in memoryd/v1/ from proto/memoryd/v1/*.proto.

The .proto files are the source of truth; the stubs are checked in so that an
install needs no code generator. tests/test_proto.py regenerates them into a
temporary folder and fails when the checked-in copies differ.

    python -m memoryd.protogen            # rewrite memoryd/v1/*_pb2*.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "memoryd" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    from grpc_tools import protoc  # dev-only dependency
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_dir / "memoryd" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copy(path, ROOT / "memoryd" / "v1" / path.name)
            print("wrote", f"memoryd/v1/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
