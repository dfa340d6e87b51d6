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


def mutate_blocks(
    data: bytearray, fraction: float, seed: int = 2, block: int = 65536
) -> list[int]:
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
