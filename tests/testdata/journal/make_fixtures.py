"""Write the golden journal fixtures of this directory (deterministic).

Run ``.venv/bin/python tests/testdata/journal/make_fixtures.py`` after a deliberate
change of the journal layout (and bump the record version if old journals no longer
open). ``tests/unit/test_journal.py`` rebuilds everything with :func:`build` and
compares it with the committed files, so an accidental layout change fails.

Each case is a journal directory (``<case>/journal-00000001.seg``) written by the
real :class:`~replication.journal.Journal` with a fixed journal id and clock. Only
``good-zstd`` holds a zstd frame; its bytes depend on the libzstd version, recorded
in ``cases.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path
from unittest import mock

import zstandard

from replication import journal as jmod

HERE = Path(__file__).resolve().parent
VOLUME = "vol-golden"
JOURNAL_ID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
ROOT_A = hashlib.sha256(b"manifest A").hexdigest()
ROOT_B = hashlib.sha256(b"manifest B").hexdigest()
T0 = 1_764_072_000.0  # 2025-11-25T12:00:00Z
ZSTD_VERSION = ".".join(map(str, zstandard.ZSTD_VERSION))
SEGMENT = "journal-00000001.seg"


def _write(directory: Path, *, zeros: bool) -> None:
    """A point, two undo records (random: raw; zeros: zstd if asked), an app point."""
    rng = random.Random(20251125)
    clock = iter([T0, T0 + 300.5])
    with (
        mock.patch.object(jmod, "_new_journal_id", lambda: JOURNAL_ID),
        jmod.Journal.open(
            directory, volume=VOLUME, retention_bytes=1 << 20, clock=lambda: next(clock)
        ) as j,
    ):
        j.add_point("crash", manifest_root=ROOT_A, tag="boot")
        j.record_undo(65536, rng.randbytes(100))
        j.record_undo(4096, bytes(512) if zeros else rng.randbytes(48))
        j.sync()
        j.add_point("app", manifest_root=ROOT_B, tag="sql-flush", group="cut-7")


def _segment(zeros: bool) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        _write(Path(tmp), zeros=zeros)
        return (Path(tmp) / SEGMENT).read_bytes()


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x10
    return bytes(out)


def build() -> tuple[dict[str, bytes], dict[str, dict[str, object]]]:
    """Return (relative path -> content, cases) of every fixture."""
    raw, packed = _segment(zeros=False), _segment(zeros=True)
    header = 56 + len(VOLUME)
    first_undo = header + 40 + 48 + len("boot")  # after the first point record
    files = {
        f"good-raw/{SEGMENT}": raw,
        f"good-zstd/{SEGMENT}": packed,
        # the app point (last record, 40 + 48 + 5 + 9 bytes) torn 10 bytes short
        f"torn-tail/{SEGMENT}": raw[:-10],
        # a bit flipped inside the first undo record's data: later records prove it synced
        f"corrupt-middle/{SEGMENT}": _flip(raw, first_undo + 40 + 16 + 3),
        f"bad-segment-magic/{SEGMENT}": b"X" + raw[1:],
    }
    cases: dict[str, dict[str, object]] = {
        "good-raw": {"error_code": None, "zstd": False},
        "good-zstd": {"error_code": None, "zstd": True, "zstd_version": ZSTD_VERSION},
        "torn-tail": {"error_code": None, "truncated_at": len(raw) - 102, "dropped": 92},
        "corrupt-middle": {"error_code": "journal.corrupt", "offset": first_undo},
        "bad-segment-magic": {"error_code": "journal.corrupt", "offset": 0},
    }
    return files, cases


def main() -> None:
    files, cases = build()
    for name, content in files.items():
        path = HERE / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
    (HERE / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    print(f"wrote {len(files)} fixtures to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
