"""Test helpers: deterministic realistic images and wrappers around external oracles.

The oracles (``qemu-img``, libvmdk and libvhdi through Debian's /usr/bin/python3)
are installed by ``make install``; tests that need one call :func:`require`,
which fails loudly (it never skips) when the tool is missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

MiB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"


def require(tool: str) -> str:
    """Return the path of ``tool`` or fail the test (oracles are mandatory, not optional)."""
    path = shutil.which(tool)
    if path is None:
        raise AssertionError(f"{tool} is missing: run `make install` (it apt-get installs it)")
    return path


def run(*cmd: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed rc={proc.returncode}: {proc.stderr or proc.stdout}")
    return proc


# --- realistic deterministic content ----------------------------------------------------

_TEXT = (
    b"Lorem ipsum dolor sit amet, replication block engine log line status=ok user=alice\n"
    b"kernel: [  12.345678] EXT4-fs (vda1): mounted filesystem with ordered data mode\n"
)


def realistic_bytes(size: int, seed: int = 1) -> bytearray:
    """Return ``size`` bytes mixing zero runs, text, random data and 0xFF runs.

    Run boundaries are 512-aligned but not grain-aligned, and the first and last
    sectors are non-zero, to catch boundary bugs.
    """
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        kind = rng.choices(["zero", "random", "text", "ff"], [40, 30, 25, 5])[0]
        n = min(size - pos, rng.randrange(1, 2048) * 512)
        if kind == "random":
            buf[pos : pos + n] = rng.randbytes(n)
        elif kind == "text":
            rep = (_TEXT * (n // len(_TEXT) + 1))[:n]
            buf[pos : pos + n] = rep
        elif kind == "ff":
            buf[pos : pos + n] = b"\xff" * n
        pos += n
    if size >= 1024:
        buf[:512] = rng.randbytes(512)
        buf[-512:] = rng.randbytes(512)
    return buf


def write_raw(path: Path, data: bytes | bytearray) -> Path:
    """Write ``data`` as a sparse raw image (zero 64 KiB runs are left as holes)."""
    with open(path, "wb") as f:
        f.truncate(len(data))
        view = memoryview(data)
        for off in range(0, len(data), 65536):
            chunk = view[off : off + 65536]
            if chunk.tobytes().count(0) != len(chunk):
                f.seek(off)
                f.write(chunk)
    return path


def make_raw(path: Path, size: int, seed: int = 1) -> bytearray:
    """Create a realistic raw image at ``path``; return its content."""
    data = realistic_bytes(size, seed)
    write_raw(path, data)
    return data


def mutate_blocks(data: bytearray, fraction: float, seed: int = 2, block: int = 65536) -> list[int]:
    """Rewrite about ``fraction`` of the blocks of ``data`` in place; return their indexes.

    Some rewrites are partial (a 4 KiB write inside the block) and some turn a block
    to zeros, as a real guest does.
    """
    rng = random.Random(seed)
    nblocks = len(data) // block
    picked = sorted(rng.sample(range(nblocks), max(1, int(nblocks * fraction))))
    for i in picked:
        base = i * block
        mode = rng.random()
        if mode < 0.6:
            data[base : base + block] = rng.randbytes(block)
        elif mode < 0.9:
            off = rng.randrange(0, block // 4096) * 4096
            new = rng.randbytes(4096)
            if data[base + off : base + off + 4096] == new:  # pragma: no cover - 2^-32768
                continue
            data[base + off : base + off + 4096] = new
        else:
            data[base : base + block] = bytes(block)
    return picked


# --- qemu-img ------------------------------------------------------------------------------


def qemu_convert(src: Path, dst: Path, out_fmt: str, *opts: str, in_fmt: str = "raw") -> None:
    """Convert with qemu-img (qemu as *creator* of reference images only)."""
    qemu_img = require("qemu-img")
    args = [qemu_img, "convert", "-q", "-f", in_fmt, "-O", out_fmt]
    for o in opts:
        args += ["-o", o]
    run(*args, src, dst)


def qemu_compare(raw: Path, image: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare -f raw -F FMT``; returncode 0 means identical."""
    return run(require("qemu-img"), "compare", "-f", "raw", "-F", fmt, raw, image, check=False)


def qemu_check(image: Path, fmt: str = "vmdk") -> subprocess.CompletedProcess[str]:
    """``qemu-img check``; returncode 0 means no errors found."""
    return run(require("qemu-img"), "check", "-f", fmt, image, check=False)


def qemu_map(image: Path, fmt: str) -> list[dict[str, object]]:
    """``qemu-img map --output=json``, parsed."""
    out = run(require("qemu-img"), "map", "-f", fmt, "--output=json", image).stdout
    return json.loads(out)


def qemu_info(image: Path, fmt: str) -> dict[str, object]:
    """``qemu-img info --output=json``, parsed."""
    return json.loads(run(require("qemu-img"), "info", "-f", fmt, "--output=json", image).stdout)


# --- second, independent readers (Debian's libvmdk / libvhdi through /usr/bin/python3) -----

_LIB_SHA = r"""
import hashlib, os, sys
kind, path = sys.argv[1], sys.argv[2]
keep = []
if kind == "vmdk":
    import pyvmdk
    def open_chain(p):
        h = pyvmdk.handle(); h.open(p); h.open_extent_data_files(); keep.append(h)
        parent = h.get_parent_filename()
        if parent:
            here = os.path.dirname(os.path.abspath(p))
            pp = parent if os.path.isabs(parent) else os.path.join(here, parent)
            h.set_parent(open_chain(pp))
        return h
    h = open_chain(path)
    size = h.get_media_size()
else:
    import pyvhdi
    h = pyvhdi.file(); h.open(path); size = h.get_media_size()
sha, off = hashlib.sha256(), 0
while off < size:
    n = min(4 << 20, size - off)
    sha.update(h.read_buffer_at_offset(n, off)); off += n
print(size, sha.hexdigest())
"""


def libyal_sha256(path: Path, kind: str) -> tuple[int, str]:
    """Read a whole VMDK (libvmdk) or VHD (libvhdi) image; return (size, sha256)."""
    proc = run(SYSTEM_PYTHON, "-c", _LIB_SHA, kind, path)
    size, digest = proc.stdout.split()
    return int(size), digest


def sha256_file(path: Path, length: int | None = None) -> str:
    """Return the sha256 of a file's first ``length`` bytes (all by default)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length if length is not None else -1
        while remaining != 0:
            chunk = f.read(4 << 20 if remaining < 0 else min(4 << 20, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
    return h.hexdigest()


def vmdk_descriptor_vmfs(raw_flat: Path, vmdk: Path, size: int) -> None:
    """Write a hand-made ESXi-thick ("vmfs") descriptor for an existing flat file."""
    sectors = size // 512
    vmdk.write_text(
        '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=12345678\n'
        'parentCID=ffffffff\ncreateType="vmfs"\n\n# Extent description\n'
        f'RW {sectors} VMFS "{raw_flat.name}"\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "lsilogic"\nddb.geometry.cylinders = "1024"\n'
        'ddb.geometry.heads = "255"\nddb.geometry.sectors = "63"\n'
        'ddb.virtualHWVersion = "13"\n'
    )


#: every layout our engine reads: (format, subformat)
SOURCE_LAYOUTS = [
    ("raw", None),
    ("vhd", "fixed"),
    ("vhd", "dynamic"),
    ("vmdk", "monolithicSparse"),
    ("vmdk", "twoGbMaxExtentSparse"),
    ("vmdk", "monolithicFlat"),
    ("vmdk", "twoGbMaxExtentFlat"),
    ("vmdk", "vmfs"),
    ("vmdk", "streamOptimized"),
]
#: every layout our engine writes
TARGET_LAYOUTS = [lay for lay in SOURCE_LAYOUTS if lay[1] != "streamOptimized"]


def make_image(raw: Path, out_dir: Path, name: str, layout: tuple[str, str | None]) -> Path:
    """Make an image of ``raw``'s content in ``layout`` with qemu-img (qemu as creator)."""
    fmt, sub = layout
    if fmt == "raw":
        dst = out_dir / f"{name}.raw"
        run("cp", "--sparse=always", raw, dst)
        return dst
    if fmt == "vhd":
        dst = out_dir / f"{name}.vhd"
        qemu_convert(raw, dst, "vpc", f"subformat={sub},force_size=on")
        return dst
    dst = out_dir / f"{name}.vmdk"
    if sub == "vmfs":
        flat = out_dir / f"{name}-flat.vmdk"
        run("cp", "--sparse=always", raw, flat)
        vmdk_descriptor_vmfs(flat, dst, raw.stat().st_size)
        return dst
    qemu_convert(raw, dst, "vmdk", f"subformat={sub}")
    return dst


def image_files(image: Path) -> list[Path]:
    """Return every file that belongs to an image (descriptor and extent files)."""
    if image.suffix != ".vmdk":
        return [image]
    stem = image.stem
    return sorted(
        p
        for p in image.parent.iterdir()
        if p == image or (p.name.startswith(stem + "-") and p.suffix == ".vmdk")
    )


# --- structure checks of our own (helpers, not external oracles) -------------------------


def vmdk_extent_files(image: Path) -> list[Path]:
    """Return the KDMV sparse extent files of a VMDK image."""
    return [p for p in image_files(image) if p.read_bytes()[:4] == b"KDMV"]


def vmdk_redundant_tables_equal(extent: Path) -> list[str]:
    """Compare every grain table of a KDMV extent with its redundant copy; list problems."""
    import struct

    data = extent.read_bytes()
    (_magic, _ver, flags, capacity, grain, _do, _ds, ngte, rgd, gd, _oh) = struct.unpack_from(
        "<IIIQQQQIQQQ", data, 0
    )
    problems: list[str] = []
    if not flags & 2:
        return problems  # no redundant tables to keep in step
    ngd = -(-capacity // (grain * ngte))
    gds = struct.unpack_from(f"<{ngd}I", data, gd * 512)
    rgds = struct.unpack_from(f"<{ngd}I", data, rgd * 512)
    for i, (g, r) in enumerate(zip(gds, rgds, strict=True)):
        if (g == 0) != (r == 0):
            problems.append(f"GD[{i}]={g} but RGD[{i}]={r}")
            continue
        if g == 0:
            continue
        gt = data[g * 512 : g * 512 + ngte * 4]
        rgt = data[r * 512 : r * 512 + ngte * 4]
        if gt != rgt:
            problems.append(f"GT {i} differs from its redundant copy")
    return problems


def allocated_zero_grains(image: Path, expected: bytes, grain: int = 65536) -> set[int]:
    """Return grain indexes that qemu-img map reports allocated (depth 0) whose content is zero."""
    found: set[int] = set()
    for ext in qemu_map(image, "vmdk"):
        if not ext.get("data") or ext.get("depth", 0) != 0:
            continue
        start, length = int(ext["start"]), int(ext["length"])  # type: ignore[arg-type]
        for g in range(start // grain, -(-(start + length) // grain)):
            chunk = expected[g * grain : (g + 1) * grain]
            if chunk.count(0) == len(chunk):
                found.add(g)
    return found


# --- counting what a process writes, from outside it -------------------------------------


def strace_written_bytes(log: Path, under: Path) -> int:
    """Sum the bytes a traced process wrote to files below directory ``under``.

    Parses ``strace -f -y -s0`` output, including calls split into
    ``<unfinished ...>`` / ``<... resumed>`` lines by other threads.
    """
    import re

    call = re.compile(r"^(\d+)\s+(p?writev?2?|pwrite64)\((\d+)<([^>]*)>")
    done = re.compile(r"=\s+(-?\d+)")
    pending: dict[str, str] = {}
    total = 0
    prefix = str(under.resolve()) + os.sep
    for line in log.read_text(errors="replace").splitlines():
        m = call.match(line)
        if m:
            pid, path = m.group(1), m.group(4)
            if line.rstrip().endswith("<unfinished ...>"):
                pending[pid] = path
                continue
        elif "resumed>" in line:
            pid = line.split()[0]
            path = pending.pop(pid, "")
        else:
            continue
        r = done.search(line.rsplit(")", 1)[-1])
        if r and path.startswith(prefix) and int(r.group(1)) > 0:
            total += int(r.group(1))
    return total


# --- a small, really full device ---------------------------------------------------------


def mount_tmpfs(path: Path, size: int):
    """Context manager: a tmpfs of ``size`` bytes mounted at ``path``, always unmounted.

    Needs root (the tests run as root); a failed mount fails the test, never skips it.
    """
    import contextlib

    @contextlib.contextmanager
    def mounted():
        path.mkdir(parents=True, exist_ok=True)
        run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
        try:
            yield path
        finally:
            # lazy: a process killed by the test may still hold a file open for a moment
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)

    return mounted()


def fill_device(directory: Path, leave: int) -> Path:
    """Allocate a filler file so that only ``leave`` bytes stay free; return its path."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if free > leave:
            os.posix_fallocate(fd, 0, free - leave)
    finally:
        os.close(fd)
    return filler
