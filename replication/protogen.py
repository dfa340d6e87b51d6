"""Generate the Python code of ``proto/replication/v1/*.proto`` (``make proto``).

The generated modules are committed in ``replication/v1/`` (so installing needs no
compiler) and ``tests/unit/test_proto_drift.py`` regenerates them into a temporary
directory and fails when they differ from the committed ones. They land in
``replication/v1`` because protoc writes imports as ``from replication.v1 import
common_pb2``, which then resolve inside this package without any rewriting.

Only ``replication/wire.py`` imports these modules: ``*_pb2`` types never leak
further (agents convert at that one boundary).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ("common.proto", "data.proto", "control.proto")


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc (from grpcio-tools) for every .proto file into ``out_dir``."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    files = [f"replication/v1/{name}" for name in PROTO_FILES]
    args = [
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
    ]
    rc = protoc.main(["protoc", *args, *files])
    if rc != 0:
        raise SystemExit(f"protoc failed with status {rc}")
    gen = out_dir / "replication" / "v1"
    return sorted(gen.glob("*.py*"))


def main() -> int:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        target = ROOT / "replication" / "v1"
        target.mkdir(exist_ok=True)
        for path in produced:
            shutil.copyfile(path, target / path.name)
        (target / "__init__.py").write_text('"""Generated protobuf code (make proto)."""\n')
    print(f"generated {len(produced)} files into replication/v1", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
