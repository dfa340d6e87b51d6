"""Differencing VHDs (Hyper-V checkpoints): read through the parent, never written."""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from replication.disks import open_disk
from replication.disks.vhd import create_vhd, open_vhd
from replication.errors import CorruptHeaderError, DiskHasSnapshotsError

FIXTURES = Path(__file__).resolve().parents[1] / "testdata" / "vhd"
MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 8 * MiB


def _load_fixture_builder():
    path = FIXTURES / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("vhd_make_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_fixture_builder()


def is_zero(buf: bytes | bytearray) -> bool:
    return not np.frombuffer(buf, dtype=np.uint8).any()


def make_chain(
    base_dir: Path, child_dir: Path, *, subformat: str = "dynamic", **child_kw: object
) -> tuple[Path, Path, bytearray]:
    """A parent with data in blocks 0, 1 and 3, and a child overriding parts of 0 and 1.

    Block 0 of the child has a full bitmap; block 1 only its sectors 0..2047 (the
    first MiB); block 2 and 3 are the parent's. Returns (parent, child, model).
    """
    rng = random.Random(5)
    parent = base_dir / "parent.vhd"
    model = bytearray(SIZE)
    with create_vhd(str(parent), SIZE, subformat=subformat) as d:
        for b in (0, 1, 3):
            data = rng.randbytes(BLOCK)
            d.write(b * BLOCK, data)
            model[b * BLOCK : (b + 1) * BLOCK] = data
        uid = d.footer.unique_id.bytes
    child_data0 = rng.randbytes(BLOCK)
    child_data1 = rng.randbytes(BLOCK)
    half = b"\xff" * 256 + bytes(256)  # sectors 0..2047 set, 2048..4095 from the parent
    blocks = {0: (b"\xff" * 512, child_data0), 1: (half, child_data1)}
    kw: dict[str, object] = {"parent_name": "parent.vhd"}
    kw.update(child_kw)
    child = child_dir / "child.avhd"
    child.write_bytes(make_fixtures.differencing(SIZE, uid, blocks, block=BLOCK, **kw))
    model[0:BLOCK] = child_data0
    model[BLOCK : BLOCK + MiB] = child_data1[:MiB]
    return parent, child, model


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_child_reads_through_parent(tmp_path: Path, subformat: str) -> None:
    parent, child, model = make_chain(tmp_path, tmp_path, subformat=subformat)
    with open_vhd(str(child)) as d:
        assert d.read(0, SIZE) == model
        for off, n in [(BLOCK - 5, 10), (BLOCK + MiB - 700, 1400), (3 * BLOCK + 1, 77)]:
            assert d.read(off, n) == model[off : off + n]
        pos = 0
        for e in d.extents():
            assert e.offset == pos
            if e.zero:
                assert is_zero(model[e.offset : e.end])
            pos = e.end
        assert pos == SIZE
        assert any(e.zero for e in d.extents())  # block 2 is a hole in both disks
        info = d.info()
        assert info.subformat == "differencing" and info.parent == str(parent)
        assert info.files == (str(child), str(parent)) and info.writable is False
    with open_disk(str(child)) as d:  # detection finds it, too
        assert d.read(BLOCK, BLOCK) == model[BLOCK : 2 * BLOCK]


def test_chain_is_never_written(tmp_path: Path) -> None:
    parent, child, model = make_chain(tmp_path, tmp_path)
    before = (parent.read_bytes(), child.read_bytes())
    with pytest.raises(DiskHasSnapshotsError, match="snapshot chain"):
        open_vhd(str(child), writable=True)
    with pytest.raises(DiskHasSnapshotsError, match=r"child\.avhd"):
        open_vhd(str(parent), writable=True)  # its checkpoint would silently change
    assert (parent.read_bytes(), child.read_bytes()) == before
    with open_vhd(str(parent)) as d:  # reading the base is fine
        assert d.read(3 * BLOCK, BLOCK) == model[3 * BLOCK : 4 * BLOCK]
    child.unlink()
    with open_vhd(str(parent), writable=True) as d:  # no child any more
        d.write(0, b"ok")


def test_parent_found_by_relative_locator(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "snap").mkdir()
    _parent, child, model = make_chain(
        tmp_path / "base",
        tmp_path / "snap",
        parent_name="C:\\Hyper-V\\base\\parent.vhd",
        locators={b"W2ku": "C:\\Hyper-V\\base\\parent.vhd", b"W2ru": "..\\base\\parent.vhd"},
    )
    with open_vhd(str(child)) as d:
        assert d.read(0, SIZE) == model


def test_parent_found_beside_child_from_windows_path(tmp_path: Path) -> None:
    _parent, child, model = make_chain(
        tmp_path, tmp_path, parent_name="", locators={b"W2ku": "D:\\vms\\parent.vhd"}
    )
    with open_vhd(str(child)) as d:
        assert d.read(0, SIZE) == model


def test_wrong_parent_uuid_refused(tmp_path: Path) -> None:
    parent, child, _model = make_chain(tmp_path, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    create_vhd(str(other / "parent.vhd"), SIZE, subformat="dynamic").close()  # new UUID
    shutil.copyfile(child, other / "child.avhd")
    with pytest.raises(CorruptHeaderError, match="UUID"):
        open_vhd(str(other / "child.avhd"))
    parent.unlink()
    with pytest.raises(CorruptHeaderError, match="not found"):
        open_vhd(str(child))
