"""VHD against independent readers: qemu-img (vpc driver) and libvhdi (pyvhdi, vhdiinfo)."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from replication.disks.vhd import DynamicVhdDisk, create_vhd, open_vhd
from tests.helpers import (
    SYSTEM_PYTHON,
    make_raw,
    qemu_compare,
    qemu_convert,
    qemu_info,
    qemu_map,
    require,
    run,
    write_raw,
)
from tests.unit.test_vhd_chain import make_chain

pytestmark = pytest.mark.oracle

MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 64 * MiB

_LIBVHDI = r"""
import hashlib, json, sys, pyvhdi
f = pyvhdi.file()
f.open(sys.argv[1])
size = f.get_media_size()
h = hashlib.sha256()
pos = 0
while pos < size:
    n = min(4 << 20, size - pos)
    chunk = f.read_buffer_at_offset(n, pos)
    assert len(chunk) == n, (pos, len(chunk))
    h.update(chunk)
    pos += n
f.close()
print(json.dumps({"size": size, "sha256": h.hexdigest()}))
"""


def libvhdi_read(path: Path) -> dict[str, object]:
    """Size and SHA-256 of the whole disk as libvhdi reads it."""
    require(SYSTEM_PYTHON)
    return json.loads(run(SYSTEM_PYTHON, "-c", _LIBVHDI, path).stdout)


def is_zero(buf: bytes | bytearray) -> bool:
    return not np.frombuffer(buf, dtype=np.uint8).any()


def checksum(buf: bytes, at: int) -> int:
    return (~(sum(buf) - sum(buf[at : at + 4]))) & 0xFFFFFFFF


def assert_metadata_valid(path: Path) -> None:
    """Footer (and for dynamic disks header, copy and BAT bounds) checked by hand."""
    data = path.read_bytes()
    tail = data[-512:]
    assert tail[:8] == b"conectix"
    assert checksum(tail, 64) == struct.unpack(">I", tail[64:68])[0]
    (current,) = struct.unpack(">Q", tail[48:56])
    (dtype,) = struct.unpack(">I", tail[60:64])
    if dtype == 2:
        assert len(data) == current + 512
        return
    assert dtype == 3 and data[:512] == tail
    hdr = data[512:1536]
    assert hdr[:8] == b"cxsparse" and checksum(hdr, 36) == struct.unpack(">I", hdr[36:40])[0]
    table, _v, entries, bsize = struct.unpack(">QIII", hdr[16:36])
    bat = np.frombuffer(data[table : table + 4 * entries], dtype=">u4")
    starts = np.sort(bat[bat != 0xFFFFFFFF].astype(np.int64) * 512)
    total = bsize + 512
    assert (starts >= table + 4 * entries).all()
    assert (np.diff(starts) >= total).all()
    if len(starts):
        assert starts[-1] + total <= len(data) - 512


def vhdiinfo_ok(path: Path) -> None:
    proc = run(require("vhdiinfo"), path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def qemu_data_blocks(path: Path) -> set[int]:
    blocks: set[int] = set()
    for m in qemu_map(path, "vpc"):
        if m["data"]:
            start, length = int(m["start"]), int(m["length"])
            blocks.update(range(start // BLOCK, (start + length + BLOCK - 1) // BLOCK))
    return blocks


def our_blocks(path: Path) -> set[int]:
    with open_vhd(str(path)) as d:
        assert isinstance(d, DynamicVhdDisk)
        return {int(i) for i in np.flatnonzero(d._bat[: d._nblocks] != 0xFFFFFFFF)}


def verify_with_oracles(path: Path, model: bytes | bytearray, tmp_path: Path) -> None:
    raw = tmp_path / "expected.raw"
    raw.write_bytes(model)
    cmp = qemu_compare(raw, path, "vpc")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    got = libvhdi_read(path)
    assert got == {"size": len(model), "sha256": hashlib.sha256(model).hexdigest()}
    vhdiinfo_ok(path)
    assert_metadata_valid(path)
    with open_vhd(str(path)) as d:
        assert d.virtual_size == len(model)
        assert d.read(0, len(model)) == model


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytearray]:
    path = tmp_path_factory.mktemp("src") / "src.raw"
    data = make_raw(path, SIZE, seed=11)
    for b in (5, 6, 20):  # whole zero blocks: holes in dynamic disks
        data[b * BLOCK : (b + 1) * BLOCK] = bytes(BLOCK)
    write_raw(path, data)
    return path, data


# --- reading qemu-made images -------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_qemu_images_read_identically(
    tmp_path: Path, source: tuple[Path, bytearray], subformat: str
) -> None:
    raw, data = source
    img = tmp_path / f"{subformat}.vhd"
    qemu_convert(raw, img, "vpc", f"subformat={subformat},force_size=on")
    assert qemu_info(img, "vpc")["virtual-size"] == SIZE
    with open_vhd(str(img)) as d:
        assert d.info().subformat == subformat
        assert d.read(0, SIZE) == data
        pos, step = 0, MiB + 3 * 512 + 7  # unaligned chunks crossing blocks
        while pos < SIZE:
            n = min(step, SIZE - pos)
            assert d.read(pos, n) == data[pos : pos + n]
            pos += n
        for e in d.extents():
            if e.zero:
                assert is_zero(data[e.offset : e.end])
        if subformat == "dynamic":
            assert our_blocks(img) == qemu_data_blocks(img)
            assert d.info().allocated_bytes == len(qemu_data_blocks(img)) * BLOCK


# --- writing, then reading with the oracles -----------------------------------------------


def _writes(model: bytearray, rng: random.Random) -> list[tuple[int, bytes]]:
    """~1% of the disk in random, unaligned writes, block-spanning writes and zero writes."""
    ops: list[tuple[int, bytes]] = []
    for _ in range(12):
        off = rng.randrange(0, SIZE - 70000)
        ops.append((off, rng.randbytes(rng.randrange(1, 65536))))
    for b in (3, 17, 30):  # spanning a block boundary, unaligned both ends
        ops.append((b * BLOCK - 777, rng.randbytes(5000)))
    for _ in range(6):
        off = rng.randrange(0, SIZE - 70000)
        ops.append((off, bytes(rng.randrange(1, 65536))))
    # zeros into wholly-zero blocks (must not allocate), and data into one of them
    zero_blocks = [b for b in range(SIZE // BLOCK) if is_zero(model[b * BLOCK : (b + 1) * BLOCK])]
    for b in zero_blocks[:2]:
        ops.append((b * BLOCK + 1000, bytes(300_000)))
    if len(zero_blocks) > 2:
        ops.append((zero_blocks[2] * BLOCK + 4099, b"late data"))
    return ops


def _make_image(
    kind: str, tmp_path: Path, source: tuple[Path, bytearray]
) -> tuple[Path, bytearray]:
    raw, data = source
    model = bytearray(data)
    img = tmp_path / f"{kind}.vhd"
    sub = kind.split("-")[1]
    if kind.startswith("qemu"):
        qemu_convert(raw, img, "vpc", f"subformat={sub},force_size=on")
    else:
        with create_vhd(str(img), SIZE, subformat=sub) as d:
            for off in range(0, SIZE, MiB):  # a full sync of the source
                d.write(off, model[off : off + MiB])
    return img, model


@pytest.mark.parametrize("kind", ["qemu-fixed", "qemu-dynamic", "ours-fixed", "ours-dynamic"])
def test_writes_verified_by_oracles(
    tmp_path: Path, source: tuple[Path, bytearray], kind: str
) -> None:
    img, model = _make_image(kind, tmp_path, source)
    dynamic = kind.endswith("dynamic")
    before = our_blocks(img) if dynamic else set()
    if kind == "ours-dynamic":
        assert before == qemu_data_blocks(img)
        assert before == {
            b for b in range(SIZE // BLOCK) if not is_zero(model[b * BLOCK : (b + 1) * BLOCK])
        }
    rng = random.Random(sum(kind.encode()))
    nonzero_touched: set[int] = set()
    with open_vhd(str(img), writable=True) as d:
        for off, buf in _writes(model, rng):
            d.write(off, buf)
            model[off : off + len(buf)] = buf
            if not is_zero(buf):
                nonzero_touched.update(range(off // BLOCK, (off + len(buf) - 1) // BLOCK + 1))
        d.write_zeroes(7 * BLOCK + 512, 3 * BLOCK)
        model[7 * BLOCK + 512 : 10 * BLOCK + 512] = bytes(3 * BLOCK)
        d.flush()
    verify_with_oracles(img, model, tmp_path)
    if dynamic:
        after = our_blocks(img)
        assert after == qemu_data_blocks(img)
        new = after - before
        assert new, "the test should allocate at least one block"
        assert new <= nonzero_touched  # no block allocated for all-zero content
        for b in new:
            assert not is_zero(model[b * BLOCK : (b + 1) * BLOCK])


# --- sizes: Azure rule, CHS, creators -----------------------------------------------------


@pytest.mark.parametrize(
    ("force", "size", "ok"), [(True, 16 * MiB, True), (False, 16781312, False)]
)
def test_azure_rule_on_qemu_sizes(tmp_path: Path, force: bool, size: int, ok: bool) -> None:
    img = tmp_path / "a.vhd"
    opts = "subformat=fixed" + (",force_size=on" if force else "")
    run(require("qemu-img"), "create", "-q", "-f", "vpc", "-o", opts, img, "16M")
    assert qemu_info(img, "vpc")["virtual-size"] == size  # qemu rounds to CHS without force
    with open_vhd(str(img)) as d:
        info = d.info()
    assert info.virtual_size == size and info.extra["azure_size_ok"] is ok
    assert info.extra["creator_app"] == ("qem2" if force else "qemu")
    want = (
        "azure: size is a whole number of MiB"
        if ok
        else f"azure: size {size} is not a whole number of MiB; Azure will reject this disk"
    )
    assert want in info.notes


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_qemu_and_libvhdi_read_our_sizes(tmp_path: Path, subformat: str) -> None:
    size = 16 * MiB + 3 * 512  # no CHS geometry gives this size: readers must use current size
    img = tmp_path / "s.vhd"
    model = bytearray(size)
    with create_vhd(str(img), size, subformat=subformat) as d:
        d.write(size - 1000, b"\x5a" * 1000)
        d.write(0, b"first")
    model[size - 1000 :] = b"\x5a" * 1000
    model[:5] = b"first"
    assert qemu_info(img, "vpc")["virtual-size"] == size
    verify_with_oracles(img, model, tmp_path)


def test_azure_exported_creator_uses_current_size(
    tmp_path: Path, source: tuple[Path, bytearray]
) -> None:
    raw, data = source
    img = tmp_path / "wa.vhd"
    qemu_convert(raw, img, "vpc", "subformat=fixed,force_size=on")
    with open(img, "r+b") as f:  # re-stamp as Azure exports do: creator "wa\0\0", spec CHS
        f.seek(SIZE)
        footer = bytearray(f.read(512))
        footer[28:32] = b"wa\0\0"
        struct.pack_into(">HBB", footer, 56, 130, 16, 63)
        struct.pack_into(">I", footer, 64, checksum(footer, 64))
        f.seek(SIZE)
        f.write(footer)
    assert qemu_info(img, "vpc")["virtual-size"] < SIZE  # qemu 7.2 believes the CHS
    with open_vhd(str(img)) as d:
        assert d.virtual_size == SIZE
        assert any("CHS geometry" in n for n in d.info().notes)
        assert d.read(0, SIZE) == data
    assert libvhdi_read(img) == {"size": SIZE, "sha256": hashlib.sha256(data).hexdigest()}
    proc = run(
        require("qemu-img"), "compare", "--image-opts",
        f"driver=raw,file.filename={raw}",
        f"driver=vpc,force_size_calc=current_size,file.filename={img}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_partial_bitmap_normalised_for_qemu(tmp_path: Path) -> None:
    """qemu ignores sector bitmaps: after our write, garbage under 0 bits must be gone."""
    img = tmp_path / "bm.vhd"
    with create_vhd(str(img), 4 * MiB, subformat="dynamic") as d:
        d.write(0, b"\x33" * BLOCK)
    bat_off = 1536
    with open(img, "r+b") as f:
        f.seek(bat_off)
        start = struct.unpack(">I", f.read(4))[0] * 512
        f.seek(start)
        f.write(b"\x0f")  # sectors 0..3 unset: their (non-zero) data must read as zeros
    model = bytearray(4 * MiB)
    model[:BLOCK] = b"\x33" * BLOCK
    model[: 4 * 512] = bytes(4 * 512)
    raw = tmp_path / "m.raw"
    raw.write_bytes(model)
    assert qemu_compare(raw, img, "vpc").returncode == 1  # qemu still sees the 0x33 bytes
    with open_vhd(str(img), writable=True) as d:
        assert d.read(0, 4 * MiB) == model
        d.write(2 * 512 + 10, b"in a cleared sector")
        model[2 * 512 + 10 : 2 * 512 + 29] = b"in a cleared sector"
    verify_with_oracles(img, model, tmp_path)


_LIBVHDI_CHAIN = r"""
import hashlib, json, sys, pyvhdi
child = pyvhdi.file(); child.open(sys.argv[1])
parent = pyvhdi.file(); parent.open(sys.argv[2])
child.set_parent(parent)
size = child.get_media_size()
h, pos = hashlib.sha256(), 0
while pos < size:
    n = min(4 << 20, size - pos); h.update(child.read_buffer_at_offset(n, pos)); pos += n
print(json.dumps({"size": size, "sha256": h.hexdigest(), "type": child.get_disk_type()}))
"""


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_libvhdi_agrees_on_differencing_chain(tmp_path: Path, subformat: str) -> None:
    parent, child, model = make_chain(tmp_path, tmp_path, subformat=subformat)
    with open_vhd(str(child)) as d:
        ours = d.read(0, d.virtual_size)
    theirs = json.loads(run(SYSTEM_PYTHON, "-c", _LIBVHDI_CHAIN, child, parent).stdout)
    assert theirs["type"] == 4  # libvhdi: differential
    assert theirs["size"] == len(ours)
    assert theirs["sha256"] == hashlib.sha256(ours).hexdigest() == hashlib.sha256(model).hexdigest()
    vhdiinfo_ok(child)
