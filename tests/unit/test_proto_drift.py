"""The committed generated code in replication/v1 must match proto/ (run `make proto`)."""

from replication.protogen import ROOT, generate


def test_generated_code_matches_proto_files(tmp_path):
    produced = generate(tmp_path)
    assert produced, "protoc produced nothing"
    committed = ROOT / "replication" / "v1"
    names = {p.name for p in produced}
    assert names == {p.name for p in committed.glob("*.py*") if p.name != "__init__.py"}
    for path in produced:
        assert path.read_bytes() == (committed / path.name).read_bytes(), (
            f"{path.name} is stale: run `make proto`"
        )


def test_drift_is_detected(tmp_path):
    """The comparison above can fail: an edited .proto yields different code."""
    import shutil

    protos = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", protos)
    common = protos / "replication" / "v1" / "common.proto"
    common.write_text(
        common.read_text().replace(
            "string agent_version = 4;", "string agent_version = 4;\n  bool x = 9;"
        )
    )
    edited = {p.name: p.read_bytes() for p in generate(tmp_path / "out", protos)}
    committed = ROOT / "replication" / "v1" / "common_pb2.py"
    assert edited["common_pb2.py"] != committed.read_bytes()
