"""Hostile VMDK input: committed fixtures and fuzzing give typed errors, never crashes."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication.disks import detect_format, open_disk
from replication.disks.vmdk import create_vmdk, open_vmdk
from replication.errors import ERRORS_BY_CODE, DiskHasSnapshotsError, ReplicationError
from tests.helpers import MiB

FIXTURES = Path(__file__).resolve().parent.parent / "testdata" / "vmdk"
CASES: dict[str, str] = json.loads((FIXTURES / "cases.json").read_text())


def test_cases_cover_every_bad_fixture() -> None:
    on_disk = {p.name for p in FIXTURES.glob("bad-*.vmdk")}
    assert on_disk == set(CASES)
    assert len(CASES) >= 30
    assert all(code in ERRORS_BY_CODE for code in CASES.values())
    assert all(p.stat().st_size <= 1 << 20 for p in FIXTURES.iterdir())


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_fixture_raises_typed_error(name: str, tmp_path: Path) -> None:
    # work on a copy of the whole directory: extents and parents are referenced by name
    work = tmp_path / "vmdk"
    shutil.copytree(FIXTURES, work)
    path = work / name
    assert detect_format(str(path)) == "vmdk"  # the CLI routes it to the VMDK reader
    before = {p.name: hashlib.sha256(p.read_bytes()).digest() for p in work.iterdir()}
    with pytest.raises(ERRORS_BY_CODE[CASES[name]]) as info:
        open_disk(str(path))
    assert info.value.code == CASES[name]
    with pytest.raises(ReplicationError):  # writable opens are refused as well
        open_vmdk(str(path), writable=True)
    after = {p.name: hashlib.sha256(p.read_bytes()).digest() for p in work.iterdir()}
    assert after == before


def test_cowd_delta_opened_writable_is_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "d-delta.vmdk"
    shutil.copy(FIXTURES / "bad-cowd-delta.vmdk", path)
    with pytest.raises(DiskHasSnapshotsError):
        open_vmdk(str(path), writable=True)


# --- fuzzing -----------------------------------------------------------------------------------


def _base_image(directory: Path) -> bytes:
    """A small valid monolithicSparse image (2 grain tables via 128 GTEs) with data."""
    path = directory / "base.vmdk"
    with create_vmdk(str(path), 2 * MiB) as disk:
        disk.write(0, b"boot" * 1000)
        disk.write(MiB + 12345, b"data" * 5000)
    raw = bytearray(path.read_bytes())
    path.unlink()
    return bytes(raw)


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _base_image(tmp_path_factory.mktemp("fuzzbase"))


def _exercise(path: Path) -> None:
    """Open, read everything, list extents, info: only typed errors may escape."""
    start = time.monotonic()
    try:
        with open_vmdk(str(path)) as disk:
            disk.read(0, min(disk.virtual_size, 4 * MiB))
            list(disk.extents())
            disk.info()
            disk.generation()
    except ReplicationError:
        pass
    assert time.monotonic() - start < 5


# offsets of interesting header and descriptor bytes, plus GD/GT areas
_HOT = list(range(0, 80)) + list(range(512, 700))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(_HOT), st.integers(0, 70000)),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    ),
    field=st.sampled_from([None, 12, 20, 28, 36, 44, 48, 56, 64]),
    value=st.integers(0, (1 << 64) - 1),
)
def test_fuzz_header_and_tables(
    base_image: bytes, tmp_path: Path, edits: list[tuple[int, int]], field: int | None, value: int
) -> None:
    img = bytearray(base_image)
    for offset, byte in edits:
        if offset < len(img):
            img[offset] = byte
    if field is not None:
        if field == 44:
            struct.pack_into("<I", img, field, value & 0xFFFFFFFF)
        else:
            struct.pack_into("<Q", img, field, value)
    path = tmp_path / "base.vmdk"
    path.write_bytes(img)
    _exercise(path)


_DESCRIPTOR_LINES = [
    'RW 4096 SPARSE "base.vmdk"',
    'RW 99999999999 SPARSE "base.vmdk"',
    'RW 4096 FLAT "base.vmdk" 0',
    'RW 4096 VMFS "../../etc/passwd"',
    'RW 4096 SESPARSE "x.vmdk"',
    "RW 10 ZERO",
    "CID=ffffffff",
    "parentCID=00000000",
    'parentFileNameHint="base.vmdk"',
    'createType="streamOptimized"',
    'createType="vmfs"',
    "\x00",
    "ddb.uuid = ",
    "=",
    '"',
]


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    lines=st.lists(st.one_of(st.sampled_from(_DESCRIPTOR_LINES), st.text(max_size=40)), max_size=6),
    position=st.integers(0, 20),
    embedded=st.booleans(),
)
def test_fuzz_descriptor_text(
    base_image: bytes, tmp_path: Path, lines: list[str], position: int, embedded: bool
) -> None:
    img = bytearray(base_image)
    text = img[512 : 512 * 21].split(b"\0", 1)[0].decode().split("\n")
    text[position:position] = lines
    new = "\n".join(text).encode("utf-8", "surrogatepass")
    if embedded:
        img[512 : 512 * 21] = new[: 512 * 20].ljust(512 * 20, b"\0")
        (tmp_path / "base.vmdk").write_bytes(img)
        _exercise(tmp_path / "base.vmdk")
    else:
        (tmp_path / "base.vmdk").write_bytes(img)
        (tmp_path / "desc.vmdk").write_bytes(new)
        _exercise(tmp_path / "desc.vmdk")
