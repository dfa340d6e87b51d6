"""Write the golden manifest fixtures of this directory (deterministic, no zstd).

Run ``.venv/bin/python tests/testdata/manifest/make_fixtures.py`` after a deliberate
change of the manifest layout or of the Merkle tree. ``tests/unit/test_manifest.py``
rebuilds everything with :func:`build` and compares it byte for byte.

The volume: 11 blocks of 4 KiB, the last one short (1000 bytes), so 41,960 bytes;
blocks 2, 5 and 9 are zeros. The tree is tiny on purpose (4 digests per leaf, 2
children per node: three leaves, two inner levels). ``good/`` holds a full object
(point A) and a delta (point B: block 3 rewritten, block 5 written, block 9 still
zero). Each other case is a store directory that must fail with its error code.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import xxhash

from replication.manifest import ManifestStore

HERE = Path(__file__).resolve().parent
BLOCK = 4096
SIZE = 10 * BLOCK + 1000
LEAF, FANOUT = 4, 2
ZERO_BLOCKS = (2, 5, 9)


def volume_a() -> bytearray:
    """The volume at point A."""
    rng = random.Random(20251125)
    data = bytearray(rng.randbytes(SIZE))
    for b in ZERO_BLOCKS:
        data[b * BLOCK : (b + 1) * BLOCK] = bytes(BLOCK)
    return data


def volume_b() -> bytearray:
    """The volume at point B."""
    data = volume_a()
    data[3 * BLOCK + 100 : 3 * BLOCK + 200] = b"\xab" * 100
    data[5 * BLOCK : 5 * BLOCK + 10] = b"point B..."
    return data


def digests(data: bytes) -> np.ndarray:
    """XXH3-128 of every block, as HashMap.digests."""
    out = b"".join(
        xxhash.xxh3_128_digest(bytes(data[i : i + BLOCK])) for i in range(0, len(data), BLOCK)
    )
    return np.frombuffer(out, dtype=np.dtype((np.void, 16))).copy()


def _objects(store_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store_dir / "objects").iterdir())}


def build() -> tuple[dict[str, bytes], dict[str, dict[str, object]]]:
    """Return (relative path -> content, cases) of every fixture."""
    with tempfile.TemporaryDirectory() as tmp:
        store = ManifestStore(tmp, leaf_digests=LEAF, fanout=FANOUT)
        root_a = store.commit(digests(volume_a()), BLOCK, SIZE)
        root_b = store.commit(digests(volume_b()), BLOCK, SIZE, parent=root_a)
        objects = _objects(Path(tmp))
    full, delta = objects[root_a], objects[root_b]
    flipped = bytearray(delta)
    flipped[-20] ^= 0x01  # inside the last changed digest; trailer checksum left stale
    forged = bytearray(delta)
    forged[-20] ^= 0x01  # same flip, trailer recomputed: only the root can tell
    forged[-16:] = xxhash.xxh3_128_digest(bytes(forged[:-16]))
    files = {
        f"good/objects/{root_a}": full,
        f"good/objects/{root_b}": delta,
        f"bad-checksum/objects/{root_a}": full,
        f"bad-checksum/objects/{root_b}": bytes(flipped),
        f"forged-digest/objects/{root_a}": full,
        f"forged-digest/objects/{root_b}": bytes(forged),
        f"missing-parent/objects/{root_b}": delta,
        f"truncated/objects/{root_a}": full[:50],
    }
    good = {"roots": {"A": root_a, "B": root_b}, "kinds": {"A": "full", "B": "delta"}}
    cases: dict[str, dict[str, object]] = {
        "good": {"error_code": None, **good},
        "bad-checksum": {"error_code": "manifest.corrupt", "load": root_b},
        "forged-digest": {"error_code": "manifest.corrupt", "load": root_b},
        "missing-parent": {"error_code": "manifest.not_found", "load": root_b},
        "truncated": {"error_code": "manifest.corrupt", "load": root_a},
    }
    return files, cases


def main() -> None:
    files, cases = build()
    for name, content in files.items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (HERE / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    print(f"wrote {len(files)} fixtures to {HERE}", file=sys.stderr)


if __name__ == "__main__":
    main()
