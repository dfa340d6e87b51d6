from pathlib import Path

import pytest

from replication import errors


def test_every_code_is_unique_and_registered():
    codes = [cls.code for cls in errors.ERRORS_BY_CODE.values()]
    assert len(codes) == len(set(codes))
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, errors.ReplicationError):
            assert errors.ERRORS_BY_CODE[obj.code] is obj


def test_reusing_a_code_is_refused():
    with pytest.raises(TypeError):

        class Again(errors.ReplicationError):
            code = errors.DiskError.code


def test_message_and_hint():
    e = errors.DiskHasSnapshotsError("disk x has snapshots", hint="delete them")
    assert str(e) == "disk x has snapshots (hint: delete them)"
    assert e.to_dict()["code"] == "disk.has_snapshots"


def test_error_doc_is_generated_from_the_classes():
    doc = Path(__file__).parents[2] / "docs" / "errors.md"
    assert doc.read_text() == errors.render_error_table(), "run `make docs`"
