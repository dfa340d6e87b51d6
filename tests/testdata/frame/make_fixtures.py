"""Write the golden block-frame fixtures of this directory (deterministic).

Run ``.venv/bin/python tests/testdata/frame/make_fixtures.py`` after a deliberate
change of the frame layout (and bump ``FRAME_VERSION`` if old frames no longer
decode). ``tests/unit/test_frame_golden.py`` rebuilds everything with :func:`build`
and compares it with the committed files, so an accidental layout change fails.

Everything is fixed: the secrets (``secret.key``, ``other.key``), the session salt,
the disk id, the data and the zstd level. Only the zstd library version can change
the compressed bytes; it is recorded in ``cases.json`` (entry ``good-compressed.frame``).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import zstandard

from replication.frame import FrameEncoder, FrameHeader, peek_header

HERE = Path(__file__).resolve().parent
SECRET = hashlib.sha256(b"replication frame fixture secret").digest()
OTHER_SECRET = hashlib.sha256(b"replication frame fixture OTHER secret").digest()
SALT = bytes(range(0x10, 0x20))
DISK_ID = bytes.fromhex("6d1f2c3a9b8e4f70a1b2c3d4e5f60718")
LEVEL = 3
ZSTD_VERSION = ".".join(map(str, zstandard.ZSTD_VERSION))


def text_data() -> bytes:
    """16 KiB of log-like text (compresses well)."""
    lines = (
        f"{i:06d} 2026-11-25T12:{i % 60:02d}:00Z replication block={i * 7 % 4096} status=ok\n"
        for i in range(400)
    )
    return "".join(lines).encode()[:16384]


def random_data() -> bytes:
    """4 KiB of seeded pseudo-random bytes (stored raw)."""
    return random.Random(20261125).randbytes(4096)


def _with_header(frame: bytes, header: FrameHeader) -> bytes:
    return header.pack() + frame[64:]


def build() -> tuple[dict[str, bytes], dict[str, dict[str, object]]]:
    """Return (file name -> content, cases) of every fixture."""
    text, rnd = text_data(), random_data()
    enc = FrameEncoder(SECRET, DISK_ID, level=LEVEL, salt=SALT)
    good_c = enc.encode(1, 65536, text)
    good_r = enc.encode(2, 131072, rnd)
    other = FrameEncoder(OTHER_SECRET, DISK_ID, level=LEVEL, salt=SALT)
    header = peek_header(good_c)

    bad_version = bytearray(good_c)
    bad_version[4] = 2
    flipped = bytearray(good_c)
    flipped[64 + 10] ^= 0x01
    files = {
        "secret.key": SECRET.hex().encode() + b"\n",
        "other.key": OTHER_SECRET.hex().encode() + b"\n",
        "good-compressed.frame": good_c,
        "good-raw.frame": good_r,
        "bad-magic.frame": b"XPLF" + good_c[4:],
        "bad-version.frame": bytes(bad_version),
        "truncated-header.frame": good_c[:40],
        "truncated-payload.frame": good_c[:-7],
        "flipped-byte.frame": bytes(flipped),
        "flipped-header.frame": _with_header(good_c, replace(header, offset=header.offset + 4096)),
        "wrong-key.frame": other.encode(1, 65536, text),
    }

    def good(data: bytes, seq: int, offset: int, compressed: bool) -> dict[str, object]:
        return {
            "error_code": None,
            "secret": "secret.key",
            "sha256": hashlib.sha256(data).hexdigest(),
            "length": len(data),
            "seq": seq,
            "offset": offset,
            "compressed": compressed,
        }

    def bad(code: str) -> dict[str, object]:
        return {"error_code": code, "secret": "secret.key"}

    cases: dict[str, dict[str, object]] = {
        "good-compressed.frame": {
            **good(text, 1, 65536, True),
            "zstd_version": ZSTD_VERSION,
            "zstd_level": LEVEL,
        },
        "good-raw.frame": good(rnd, 2, 131072, False),
        "bad-magic.frame": bad("frame.format"),
        "bad-version.frame": bad("frame.format"),
        "truncated-header.frame": bad("frame.truncated"),
        "truncated-payload.frame": bad("frame.truncated"),
        "flipped-byte.frame": bad("frame.auth"),
        "flipped-header.frame": bad("frame.auth"),
        "wrong-key.frame": bad("frame.auth"),
    }
    files["cases.json"] = json.dumps(cases, indent=2).encode() + b"\n"
    return files, cases


def main(out: Path = HERE) -> int:
    files, _ = build()
    for name, content in files.items():
        (out / name).write_bytes(content)
    print(f"wrote {len(files)} files to {out} (zstd {ZSTD_VERSION})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
