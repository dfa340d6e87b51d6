"""VMDK descriptor text: parsing, CID rewrite, hostile text."""

from __future__ import annotations

import pytest

from replication.disks.vmdk.descriptor import (
    Descriptor,
    ExtentLine,
    new_cid,
    parse_descriptor,
    render_descriptor,
)
from replication.errors import CorruptHeaderError

QEMU_TEXT = b"""# Disk DescriptorFile
version=1
CID=9d2aa895
parentCID=ffffffff
createType="monolithicSparse"

# Extent description
RW 204800 SPARSE "d.vmdk"

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.adapterType = "ide"
ddb.longContentID = "abc01f80a6019b4b2fa062d39d2aa895"
ddb.uuid = "60 00 C2 97 ee 00 4e ed-cb 09 ab 10 91 3f 7f 99"
"""


def test_parse_qemu_descriptor_stops_at_nul() -> None:
    desc = parse_descriptor(QEMU_TEXT + b"\0" * 300 + b"garbage after the NUL", "t")
    assert desc.cid == "9d2aa895"
    assert desc.parent_cid == "ffffffff"
    assert desc.create_type == "monolithicSparse"
    assert not desc.has_parent()
    assert desc.extents == [ExtentLine("RW", 204800, "SPARSE", "d.vmdk", 0)]
    assert desc.fields["ddb.uuid"].startswith("60 00 C2 97")


def test_extent_lines_flat_vmfs_zero() -> None:
    text = (
        b'CID=1\ncreateType="custom"\nRW 100 FLAT "a b-flat.vmdk" 7\n'
        b'RDONLY 50 VMFS "/abs/x-flat.vmdk"\nRW 10 ZERO\n'
    )
    desc = parse_descriptor(text, "t")
    assert desc.extents == [
        ExtentLine("RW", 100, "FLAT", "a b-flat.vmdk", 7),
        ExtentLine("RDONLY", 50, "VMFS", "/abs/x-flat.vmdk", 0),
        ExtentLine("RW", 10, "ZERO", None, 0),
    ]


def test_child_descriptor_has_parent() -> None:
    text = QEMU_TEXT.replace(b"parentCID=ffffffff", b"parentCID=12345678")
    assert parse_descriptor(text, "t").has_parent()
    text = QEMU_TEXT.replace(b"# Extent", b'parentFileNameHint="base.vmdk"\n# Extent')
    desc = parse_descriptor(text, "t")
    assert desc.has_parent() and desc.parent_hint == "base.vmdk"


def test_with_cid_changes_cid_and_long_content_id_tail_only() -> None:
    desc = parse_descriptor(QEMU_TEXT, "t")
    new = desc.with_cid("0badf00d")
    assert new.cid == "0badf00d"
    assert new.fields["ddb.longContentID"] == "abc01f80a6019b4b2fa062d30badf00d"
    old_lines = [line for line in desc.lines if "CID" not in line and "longContent" not in line]
    new_lines = [line for line in new.lines if "CID" not in line and "longContent" not in line]
    assert old_lines == new_lines
    assert parse_descriptor(render_descriptor(new), "t").cid == "0badf00d"


def test_new_cid_is_random_and_never_no_parent() -> None:
    cids = {new_cid() for _ in range(50)}
    assert len(cids) == 50
    assert all(len(c) == 8 and c != "ffffffff" for c in cids)
    assert new_cid(avoid="12345678") != "12345678"


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b'# Disk DescriptorFile\nCID=1\ncreateType="x"\n',  # no extents
        b'CID=1\nRW 10 SPARSE "a"\n',  # no createType
        b'createType="x"\nRW 10 SPARSE "a"\n',  # no CID
        b'CID=xyz\ncreateType="x"\nRW 10 SPARSE "a"\n',
        b'CID=1\nparentCID=nothex\ncreateType="x"\nRW 10 SPARSE "a"\n',
        b'CID=1\ncreateType="x"\nRW 0 SPARSE "a"\n',  # zero-size extent
        b'CID=1\ncreateType="x"\nRW 99999999999999999 FLAT "a" 0\n',
        b'CID=1\ncreateType="x"\nRW 10 FLAT\n',  # no file name
        b'CID=1\ncreateType="x"\nRW 10 SPARSE "a"\n!!! garbage\n',
        b"\xff\xfe\xfd",
        b"# Disk DescriptorFile\n" + b"#" * 70000,
    ],
)
def test_garbage_descriptors_raise_corrupt_header(text: bytes) -> None:
    with pytest.raises(CorruptHeaderError):
        parse_descriptor(text, "t")


def test_render_keeps_unknown_lines() -> None:
    text = QEMU_TEXT + b'isNativeSnapshot="no"\n# a comment\nddb.deletable = "true"\n'
    desc = parse_descriptor(text, "t")
    out = render_descriptor(Descriptor(desc.lines))
    assert b'isNativeSnapshot="no"' in out and b"# a comment" in out
    assert out.endswith(b'ddb.deletable = "true"\n')


def test_latin1_descriptor_survives_cid_rewrite_byte_for_byte() -> None:
    text = QEMU_TEXT.replace(b'encoding="UTF-8"', b"") + b'ddb.comment = "caf\xe9"\n'
    desc = parse_descriptor(text, "t")
    assert desc.encoding == "latin-1" and desc.fields["ddb.comment"] == "caf\xe9"
    out = render_descriptor(desc.with_cid("0000abcd"))
    assert out == text.replace(b"CID=9d2aa895", b"CID=0000abcd").replace(
        b"62d39d2aa895", b"62d30000abcd"
    )
